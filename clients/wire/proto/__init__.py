"""The gRPC API: ``tritonrag/v1/tritonrag.proto`` and the Python code generated from it by ``build.py``."""
