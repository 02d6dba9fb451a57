"""Data: where films come from and how they are read.

Sources (folder, ``.npz``, demo, S3), decoding (images and DICOM), snapshots,
patient grouping and the demo phantoms live here. This package may import
``xray.entity``, ``xray.errors``, ``xray.typed`` and ``xray.config``; never a
stage, training, evaluation, serving or the app.
"""
