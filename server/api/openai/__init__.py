"""The OpenAI-compatible API: wire models (``protocol``), mapping to the services (``serving``), routes (``routes``)."""

from .routes import openai_router

__all__ = ["openai_router"]
