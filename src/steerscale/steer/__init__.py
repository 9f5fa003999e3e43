"""Steering vectors: contrastive data, extraction methods, the ``SteeringVector`` artifact, GGUF export, baking.

Importing the package registers the file formats that ``SteeringVector.load`` reads besides safetensors
(``vector`` sits below them and imports none).
"""

from . import gguf  # noqa: F401 (registers the .gguf reader of SteeringVector.load)
