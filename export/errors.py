"""Errors raised by model export."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export that cannot be done, or whose result failed its checks; no version is written."""


class SourceError(ExportError):
    """A model source string that cannot be resolved or loaded."""
