# Two commands from a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
XRAY := $(VENV)/bin/xray
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
unexport PYTHONDONTWRITEBYTECODE

# Demo S3 (a local SeaweedFS on loopback; nothing leaves the machine).
DEMO_DIR := .demo
S3_PORT ?= 8333
DEMO_S3 := AWS_ENDPOINT_URL=http://127.0.0.1:$(S3_PORT) AWS_ACCESS_KEY_ID=xray-demo \
	AWS_SECRET_ACCESS_KEY=xray-demo-secret AWS_DEFAULT_REGION=us-east-1

.PHONY: install lock demo test test-fast browser bench clean-demo

# uv installs the lock file's exact set (hashes checked) from the same places pip is configured to read:
# its find-links and extra indexes (this machine's local wheel stores), with its constraints file.
# Bytecode is written on first import (only for what runs), even where the shell sets PYTHONDONTWRITEBYTECODE.
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
PIP_CONF = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.$(1)='\(.*\)'$$/\1/p")
UV_SOURCES = --index-strategy unsafe-best-match $(foreach l,$(call PIP_CONF,find-links),--find-links $(l)) \
	$(foreach u,$(call PIP_CONF,extra-index-url),--extra-index-url $(u)) \
	$(foreach c,$(call PIP_CONF,constraint),--constraint $(c))
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip install -q --python $(PY) $(UV_SOURCES) -r requirements.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

# Re-pin the lock after changing requirements.txt (tests/test_unit_packaging.py holds the three in step).
lock: install
	$(UV) pip compile -q requirements.txt -o requirements.lock --python-version 3.11 --generate-hashes \
		$(UV_SOURCES) --no-emit-index-url --no-emit-find-links

install: $(VENV)/.installed

# The whole pipeline on the embedded synthetic dataset, pulled from a local S3 server.
# Demo-only overrides (real data keep the defaults): 32 px phantoms, 6 epochs and a 45 s training budget,
# so both candidate families train, pass the gate and push, and a fresh clone's `make demo` (the install
# included) stays under 2 minutes.
DEMO_OVERRIDES := --set trainer.min_steps=0 --set transformation.image_size=32 --set trainer.epochs=6 \
	--set trainer.time_budget=45s
# A fresh venv holds no bytecode, and Python writes it on first import: the training stack's is compiled
# on the second core while the data are drawn and uploaded, ahead of `xray train` importing the same
# modules (a .pyc is written by atomic rename, so the two never see half a file). Its failure is not the demo's.
DEMO_WARM := import xray.pipeline.training_pipeline, xray.serving.runtime, onnxruntime.quantization, openvino, bentoml
demo: install
	$(PY) -c '$(DEMO_WARM)' >/dev/null 2>&1 & warm=$$!; trap 'kill $$warm 2>/dev/null' EXIT; \
	$(XRAY) data demo $(DEMO_DIR)/data && \
	$(PY) scripts/s3_server.py start --dir $(DEMO_DIR)/s3 --port $(S3_PORT) --bucket xray-data && { \
	  set -o pipefail; trap 'kill $$warm 2>/dev/null; $(PY) scripts/s3_server.py stop --dir $(DEMO_DIR)/s3 --port $(S3_PORT)' EXIT; \
	  $(DEMO_S3) $(XRAY) data upload $(DEMO_DIR)/data s3://xray-data/demo && \
	  $(DEMO_S3) $(XRAY) train --data s3://xray-data/demo $(DEMO_OVERRIDES); }
	@echo "Runs: $(XRAY) runs list   |   serve: $(VENV)/bin/bentoml serve xray.serving.service:XrayClassifier"

# Headless Chromium for the page tests (Debian's package; tests skip with a message without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and cannot apt-get it: page tests will skip"; fi; }

test: install browser
	$(PY) -m pytest -q --timeout=900

# The quick loop (unit, config and stage tests; about 2 minutes): not a substitute for `make test`.
FAST_TESTS := tests/test_unit_*.py tests/test_config.py tests/test_quality.py tests/test_ingestion.py tests/test_transformation.py
test-fast: install
	$(PY) -m pytest -q --timeout=600 $(FAST_TESTS)

bench: install
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_serve.py

clean-demo:
	-$(PY) scripts/s3_server.py stop --dir $(DEMO_DIR)/s3 --port $(S3_PORT)
	rm -rf $(DEMO_DIR)
