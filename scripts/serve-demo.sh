#!/usr/bin/env bash
# Serve a Palu checkpoint with `mistralrs-server --kv-cache palu` on loopback, ask one chat
# question and one completion over the OpenAI API, show the live KV-cache bytes, then stop it.
set -euo pipefail
ckpt=$1
port=${PALU_DEMO_PORT:-18123}
cd "$(dirname "$0")/.."
./target/release/mistralrs-server --kv-cache palu --palu-checkpoint "$ckpt" --cpu --dtype f32 --port "$port" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && break
    sleep 1
done
echo "--- POST /v1/chat/completions"
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"default","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":24,"temperature":0}'
echo
echo "--- POST /v1/completions"
curl -s "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"model":"default","prompt":"The capital of France is","max_tokens":8,"temperature":0}'
echo
echo "--- GET /v1/palu/kv_cache (bytes of the live latent cache, measured on its tensors)"
curl -s "http://127.0.0.1:$port/v1/palu/kv_cache"
echo
