"""One module per pipeline stage, each with one entry point ``run(...)``."""
