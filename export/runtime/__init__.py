"""Code that runs inside Triton's Python backend for the exported text-in models.

It needs only NumPy, ``tokenizers`` and ONNX Runtime, so serving never imports torch.
"""
