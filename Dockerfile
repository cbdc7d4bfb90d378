# One image for every meshgate service; the command picks the service:
#   meshgate up | meshgate migrate | meshgate-gateway | meshgate-inference | meshgate-router |
#   meshgate-quota | meshgate-analytics | meshgate-sync | meshgate-mock-provider
# Used by docker-compose.yml and the Helm chart (helm/meshgate). Runs as uid 10001 and writes
# nothing outside /tmp, so it works with a read-only root filesystem. /etc/meshgate/tls (the
# services' [mesh] tls_dir) belongs to that user, so that a volume mounted there (Compose's
# mesh-tls, filled by `meshgate certs`) is writable by it.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and target/ between builds on the same machine.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/meshgate target/release/meshgate-* /out/ \
    && rm -f /out/*.d

# ONNX Runtime's shared library (loaded at run time by the inference service) from its PyPI wheel.
FROM python:3.11-slim-bookworm AS onnxruntime
RUN pip install --no-cache-dir onnxruntime==1.31.1

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 meshgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin meshgate \
    && mkdir -p /models /etc/meshgate/tls \
    && chown 10001:10001 /models /etc/meshgate/tls
COPY --from=onnxruntime /usr/local/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 /usr/lib/meshgate/
COPY --from=build /out/ /usr/local/bin/
ENV ORT_DYLIB_PATH=/usr/lib/meshgate/libonnxruntime.so.1.31.1 \
    MESHGATE_INFERENCE__MODELS_DIR=/models
LABEL org.opencontainers.image.title="meshgate" \
      org.opencontainers.image.description="AI gateway as a gRPC mesh: gateway, inference, router, quota, analytics, sync"
# Edge HTTP, gRPC (gateway ... sync), admin (/livez, /readyz, /metrics).
EXPOSE 8080 50051 50052 50053 50054 50055 50056 9101 9102 9103 9104 9105 9106
USER 10001:10001
ENTRYPOINT []
CMD ["meshgate", "up"]
