"""Retrieval over a collection: FAISS (dense) and BM25 (sparse) indexes derived from the store, filters, fusion."""
