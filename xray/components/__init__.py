"""The five pipeline stages, one module each, all of one shape (xray/stage.py); none imports another."""
