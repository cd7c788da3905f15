"""What a remote user needs: the wire types, the Python SDK (HTTP) and reading files into documents for ingestion."""
