"""Serving: what answers ``/predict``.

The BentoML service, the serving model (``model.json`` + weights, integrity
checks) and batched inference. May import ``xray.entity``, ``xray.models``,
``xray.data`` (the one decode path), ``xray.evaluation`` (Grad-CAM, the
operating point), ``xray.audit`` (registry, tokens) and the global modules;
never a stage, training, or the app.
"""
