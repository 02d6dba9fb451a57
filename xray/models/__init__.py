"""Models: the candidate architectures and how they are built and loaded.

One table of builders (name, Grad-CAM target layer, input channels) serves
training, evaluation and serving alike. May import ``xray.entity`` and
``xray.errors`` only: it sits below every stage.
"""
