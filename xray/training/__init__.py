"""Model fitting that is not a stage: the fit engine, rank handling, the time budget and cross-validation.

The trainer stage (xray/components/model_trainer.py) calls these; cross-validation
calls the same fit engine, so neither stage module imports the other. May import
``xray.entity``, ``xray.models``, ``xray.data``, ``xray.evaluation`` (metrics),
``xray.serving`` (batched inference), ``xray.config`` and the global modules;
never a stage or the app.
"""
