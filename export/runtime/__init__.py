"""Code that runs inside Triton's Python backend: the embedder, reranker and generator models, and their contract.

It needs only NumPy, ``tokenizers``, Jinja and ONNX Runtime, so serving never imports torch. ``contract``
names everything that crosses the boundary to the orchestrator.
"""
