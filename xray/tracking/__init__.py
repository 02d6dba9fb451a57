"""Links to tracking tools outside xray (MLflow)."""
