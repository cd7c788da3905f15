"""Wire types shared by the orchestrator and the SDK: the request/response models (``schema``) and the gRPC
code generated from ``proto/``. Nothing here imports the rest of tritonrag."""
