"""Typed configuration and artifact records: the fixed schema every stage speaks.

The bottom layer: records only, importing nothing of xray but ``xray.errors``
and ``xray.typed``, and no torch at run time. What a record needs to load itself lives one
layer up (``xray.data.preprocessing.preprocessing_of``,
``xray.models.builders.load_candidate``).
"""
