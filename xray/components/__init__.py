"""The five pipeline stages, one module each, all of one shape (xray/pipeline/stage.py); none imports another."""
