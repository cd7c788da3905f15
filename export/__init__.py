"""The exporter: model sources → ONNX → a new version in the Triton model repository, with parity checks."""
