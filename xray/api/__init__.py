"""The training service (``uvicorn app:app``): the JSON API for engineers and the pages auditors read.

Kept empty on purpose: ``python -m xray.api.worker`` imports this package
first, and the worker should not pay for (or pre-import) the web stack.
"""
