"""Server-side ingestion: chunking documents with the embedder's tokenizer, and large upserts run as jobs."""
