"""Evaluation: the figures a model is judged by.

Clinical metrics, bootstrap intervals, candidate selection, the operating
point, the model card, plots, Grad-CAM and the external check. May import
``xray.entity``, ``xray.models``, ``xray.data``, ``xray.serving`` (to score
through serving's own path) and the global modules; never a stage or the app.
"""
