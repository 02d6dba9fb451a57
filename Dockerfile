# The xray training service (uvicorn app:app) on CPU.
#   docker build -t xray .
#   docker run -p 8000:8000 -v xray-data:/data -e XRAY_TRAIN_TOKENS=... -e XRAY_READ_TOKENS=... xray
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/data/bentoml \
    XRAY_ARTIFACTS_DIR=/data/artifacts \
    XRAY_KEYS_DIR=/data/keys \
    XRAY_EXCLUSIVE_ARTIFACTS=true

# tini as PID 1: forwards signals to uvicorn and reaps whatever a dead training worker leaves behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# CPU wheels of torch first: the PyPI build of the pinned version is the CUDA one (gigabytes).
COPY requirements.txt ./
RUN TORCH=$(grep -E '^torch==' requirements.txt) \
    && VISION=$(grep -E '^torchvision==' requirements.txt) \
    && pip install --index-url https://download.pytorch.org/whl/cpu "$TORCH" "$VISION"
# Everything above the '# tests' line of requirements.txt (the test tools stay out of the image).
RUN sed '/^# tests/,$d' requirements.txt > /tmp/requirements-runtime.txt \
    && pip install -r /tmp/requirements-runtime.txt \
    && rm /tmp/requirements-runtime.txt

COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 xray \
    && mkdir -p /data/artifacts /data/bentoml /data/keys \
    && chown -R xray:xray /data \
    && chmod 700 /data/keys

USER xray
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["tini", "--"]
CMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000"]
