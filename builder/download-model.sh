#!/bin/sh
# Image build step: bake MODEL_NAME into the image's hub cache under BASE_PATH, with the same
# downloader the worker uses at cold start (`worker-candle download`). Without MODEL_NAME the
# image stays the generic, environment-configured worker.
#
# Inputs (build arguments exported as environment variables by the Dockerfile): MODEL_NAME,
# MODEL_REVISION, BASE_PATH, TOKENIZER_NAME, TOKENIZER_REVISION, QUANTIZATION, GGUF_FILE.
# The Hugging Face token comes from the BuildKit secret mounted at /run/secrets/HF_TOKEN, read
# into this process only: it never enters a layer or the image's environment.
set -eu

if [ -z "${MODEL_NAME:-}" ]; then
    echo "builder: no MODEL_NAME build argument; building the generic worker (model fetched at start-up)"
    exit 0
fi

secret="${HF_TOKEN_SECRET_FILE:-/run/secrets/HF_TOKEN}"
if [ -s "$secret" ]; then
    HF_TOKEN="$(cat "$secret")"
    export HF_TOKEN
fi

worker="${WORKER_BIN:-/usr/local/bin/worker-candle}"
echo "builder: downloading ${MODEL_NAME}@${MODEL_REVISION:-main} into ${BASE_PATH:-/runpod-volume}"
"$worker" download
