"""Triton model ``reranker``: (``QUERY``, ``PASSAGE``) rows in, one relevance ``SCORE`` per row out."""

from .text_model import TextModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
