"""Data: where films come from and how they are read.

Sources (one registry: folder, ``.npz``, demo, S3), decoding (images and
DICOM), snapshots, patient grouping and the demo phantoms live here. This
package may import ``xray.entity`` and the global modules (``xray.errors``,
``xray.typed`` and the like); never ``xray.config`` (which imports it), a
stage, training, evaluation, serving or the app.
"""
