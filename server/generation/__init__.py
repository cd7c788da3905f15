"""Grounded answers: prompts and citations, packing passages into the generator's context window, fallbacks."""
