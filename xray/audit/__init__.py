"""Audit: the evidence a run leaves and how it is checked.

Run seals, the ledger, signing keys, the model registry and its audit log,
reports, run diffs and API tokens. May import ``xray.entity``,
``xray.pipeline.store`` (runs are read through it) and the global modules.
"""
