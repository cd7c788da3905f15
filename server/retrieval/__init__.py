"""Retrieval over a collection: FAISS (dense) and tantivy BM25 (sparse) indexes derived from the store, filters,
fusion."""
