# The orchestrator (`tritonrag serve`, the CMD) and the Celery workers (`tritonrag worker`): the project's wheel
# alone, without the export extras (no torch). Build from the repository root:
#   docker build -f deploy/docker/orchestrator.Dockerfile -t tritonrag/orchestrator .

FROM python:3.11-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY deploy/docker/pins.py deploy/docker/pins.py
# The gRPC code is generated, not tracked: the generator's tools, at the versions of the dev extra.
RUN python deploy/docker/pins.py pyproject.toml --extra dev grpcio-tools mypy-protobuf > /tmp/build-requirements.txt \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/build-requirements.txt
COPY server server
COPY export export
COPY clients clients
COPY deploy deploy
COPY model_repository model_repository
RUN python clients/wire/proto/build.py \
    && pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# Only the wheel: its dependencies come pinned from its metadata (pyproject.toml).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check /wheels/tritonrag-*.whl
RUN groupadd --system --gid 10001 tritonrag \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tritonrag --create-home tritonrag \
    && mkdir -p /var/lib/tritonrag/data /models \
    && chown -R tritonrag:tritonrag /var/lib/tritonrag
# What a container needs unlike `make up`: listen beyond loopback, keep state on the volume, and read the model
# repository Triton serves (each served version's tokenizer.json) where it is mounted.
ENV TRITONRAG_API__HOST=0.0.0.0 \
    TRITONRAG_WORK_DIR=/var/lib/tritonrag \
    TRITONRAG_DATA_DIR=/var/lib/tritonrag/data \
    TRITONRAG_TRITON__REPOSITORY=/models \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/tritonrag
VOLUME ["/var/lib/tritonrag"]
EXPOSE 8080 50051
# Liveness on the HTTP port the settings name (plain HTTP: with api.tls_* set, probe from outside instead); a
# worker serves no HTTP: turn it off there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; from tritonrag.server.config import Settings; urllib.request.urlopen(f'http://127.0.0.1:{Settings().api.http_port}/healthz', timeout=4)"]
ENTRYPOINT ["tritonrag"]
# The settings come from TRITONRAG_* variables (docs/CONFIGURATION.md).
CMD ["serve"]
