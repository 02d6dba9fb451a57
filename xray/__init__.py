"""xray: labelled chest X-rays in, a served and audited classifier out."""

__version__ = "0.1.0"
