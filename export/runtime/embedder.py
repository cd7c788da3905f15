"""Triton model ``embedder``: ``TEXT`` rows in, L2-normalised ``EMBEDDING`` vectors out."""

from .text_model import TextModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
