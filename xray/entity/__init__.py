"""Typed configuration and artifact records: the fixed schema every stage speaks."""
