"""Audit: the evidence a run leaves and how it is checked.

Run seals (and ending a run, which seals it), the ledger, signing keys, the
model registry and its audit log, reports, run diffs and API tokens. May
import ``xray.entity``, ``xray.pipeline``'s store and run ids (runs are read
through them), ``xray.config`` (run diffs) and the global modules.
"""
