"""Durable state: the catalog of collections and jobs, and each collection's document store (SQLite)."""
