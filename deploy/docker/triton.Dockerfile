# Triton on NVIDIA's container, with the Python packages the model versions' runtime code imports (each version
# carries its runtime/ in its directory). The model repository is mounted at /models at run time, never baked in.
# Build from the repository root (CPU, or GPU with the CUDA build of ONNX Runtime):
#   docker build -f deploy/docker/triton.Dockerfile -t tritonrag/triton .
#   docker build -f deploy/docker/triton.Dockerfile --build-arg ONNXRUNTIME=onnxruntime-gpu -t tritonrag/triton-gpu .
# 25.10: Ubuntu 24.04, whose Python 3.12 runs the Python backend (onnxruntime 1.31 has no wheel for the Python 3.10
# of the 24.xx images), and CUDA 13, which onnxruntime-gpu 1.31 is built for.

FROM nvcr.io/nvidia/tritonserver:25.10-py3
ARG ONNXRUNTIME=onnxruntime
# The versions pyproject.toml pins, read from it, so that the served runtime matches what the tests ran.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=bind,source=deploy/docker/pins.py,target=/tmp/pins.py \
    python3 /tmp/pins.py /tmp/pyproject.toml numpy onnxruntime="${ONNXRUNTIME}" tokenizers jinja2 \
        > /tmp/runtime-requirements.txt \
    && pip install --no-cache-dir --disable-pip-version-check --break-system-packages \
        -r /tmp/runtime-requirements.txt \
    && rm /tmp/runtime-requirements.txt
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["tritonserver"]
# As deploy/launcher.py starts it (explicit model control, its ports and exit timeout), except that Triton loads
# the models itself here: no launcher loads them, and the orchestrator adopts the versions Triton serves.
# Caveat: Triton takes each config.pbtxt as it is (KIND_CPU), where the launcher switches instances to
# KIND_GPU when it sees a GPU.
CMD ["--model-repository=/models", "--model-control-mode=explicit", \
     "--load-model=embedder", "--load-model=reranker", "--load-model=generator", \
     "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", \
     "--exit-timeout-secs=20", "--log-verbose=0"]
