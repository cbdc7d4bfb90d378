# One image for every meshgate service; the command picks the service:
#   meshgate up | meshgate-gateway | meshgate-inference | meshgate-router | meshgate-quota | meshgate-analytics | meshgate-sync
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM python:3.11-slim-bookworm AS onnxruntime
RUN pip install --no-cache-dir onnxruntime==1.31.1

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 meshgate
COPY --from=onnxruntime /usr/local/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 /usr/lib/meshgate/
COPY --from=build /src/target/release/meshgate /src/target/release/meshgate-* /usr/local/bin/
ENV ORT_DYLIB_PATH=/usr/lib/meshgate/libonnxruntime.so.1.31.1
USER 10001
ENTRYPOINT []
CMD ["meshgate", "up"]
