"""Evaluation: the figures a model is judged by.

Clinical metrics, bootstrap intervals, candidate selection, the operating
point, the model card, plots, Grad-CAM and the external check. May import
``xray.entity``, ``xray.models``, ``xray.data`` and the global modules; never
serving (which imports Grad-CAM and the operating point from here), a stage
or the app.
"""
