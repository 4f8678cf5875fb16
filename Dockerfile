# syntax=docker/dockerfile:1.7
# CPU image of worker-candle. Generic (model from the environment at start-up) unless MODEL_NAME is
# given, in which case the model is baked into BASE_PATH at build time:
#   docker build -t user/worker-candle:cpu --build-arg MODEL_NAME=org/name --build-arg BASE_PATH=/models .
#   docker build ... --secret id=HF_TOKEN ...        # private or gated models (BuildKit secret)

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Caches keep the registry and the target dir across builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin worker-candle \
    && strip target/release/worker-candle \
    && cp target/release/worker-candle /usr/local/bin/worker-candle

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/worker-candle /usr/local/bin/worker-candle
COPY builder/download-model.sh /usr/local/bin/download-model.sh

ARG MODEL_NAME=""
ARG MODEL_REVISION=""
ARG BASE_PATH="/runpod-volume"
ARG QUANTIZATION=""
# TOKENIZER_* name a repository, not a secret (DL3064 matches "TOKEN").
# hadolint ignore=DL3064
ARG TOKENIZER_NAME=""
# hadolint ignore=DL3064
ARG TOKENIZER_REVISION=""
ARG GGUF_FILE=""
# hadolint ignore=DL3064
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION} \
    BASE_PATH=${BASE_PATH} \
    QUANTIZATION=${QUANTIZATION} \
    TOKENIZER_NAME=${TOKENIZER_NAME} \
    TOKENIZER_REVISION=${TOKENIZER_REVISION} \
    GGUF_FILE=${GGUF_FILE}

# The token is a BuildKit secret, visible to this step only.
RUN --mount=type=secret,id=HF_TOKEN,required=false /usr/local/bin/download-model.sh

# One entry point for both endpoint kinds: the queue worker when the platform sets RUNPOD_WEBHOOK_GET_JOB
# (queue endpoints); `serve` on 0.0.0.0:$PORT, GET /ping on $PORT_HEALTH, when PORT is set without a queue
# (load-balancing endpoints).
ENTRYPOINT ["/usr/local/bin/worker-candle"]
