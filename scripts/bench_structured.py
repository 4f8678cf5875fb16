"""Structured-output benchmark: decode tokens/s of `worker-candle serve` at 1 and 16 concurrent streams,
without and with a JSON-schema constraint (`guided_json`), on one model (the SmolLM2-135M shape of
`../shared/bench/bench_model.py` by default). Loopback only; standard library only; builds nothing
(`cargo build --release` first; without it the debug binary is used).

usage: python3 scripts/bench_structured.py [MODEL_DIR] [--tokens 128] [--rounds 2] [--streams 1,16]

Each run sends N concurrent completions requests (prompt "Hello", `max_tokens` tokens, `ignore_eos`,
temperature 1, distinct seeds) and counts generated tokens over the wall time of the whole batch; the best
of `--rounds` runs is kept. The constraint is an open-ended schema (a list of records with integers,
strings and enums) so the grammar stays live for the whole run and every step computes real masks.
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "name": {"type": "string"},
                    "kind": {"enum": ["alpha", "beta", "gamma"]},
                    "score": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["id", "name", "kind", "score", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(data)
    return data


def run(port, streams, tokens, constrained, round_no):
    results = [None] * streams

    def one(i):
        body = {"model": "m", "prompt": "Hello", "max_tokens": tokens, "temperature": 1.0,
                "seed": 1000 * round_no + i, "ignore_eos": True}
        if constrained:
            body["guided_json"] = SCHEMA
        results[i] = post(port, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    generated = sum(r["usage"]["completion_tokens"] for r in results if r)
    if constrained:
        for r in results:
            text = r["choices"][0]["text"]
            # the constrained prefix must be a prefix of valid JSON of the schema: it starts as the schema does
            assert text.startswith('{"records":['), text[:80]
    return generated / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="/tmp/bench/smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--binary", default=None)
    args = ap.parse_args()
    binary = args.binary or next(
        (b for b in [os.path.join(ROOT, "target/release/worker-candle"), os.path.join(ROOT, "target/debug/worker-candle")]
         if os.path.exists(b)), None)
    if not binary:
        sys.exit("build the worker first: cargo build --release")
    env = dict(os.environ, MODEL_NAME=args.model, OPENAI_SERVED_MODEL_NAME_OVERRIDE="m", MAX_CONCURRENCY="64",
               KV_CACHE_MEMORY="1GiB", RUST_LOG="warn")
    proc = subprocess.Popen([binary, "serve", "--host", "127.0.0.1", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    lines = []
    try:
        deadline = time.time() + 300
        while port is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        if port is None:
            sys.exit("the worker did not start:\n" + "".join(lines))
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        while True:  # the model loads after the port opens
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/ping")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                break
            time.sleep(0.5)
        # warm up (the first constrained request builds the token trie)
        post(port, {"model": "m", "prompt": "Hi", "max_tokens": 4, "guided_json": SCHEMA})
        print(f"model {args.model}, {args.tokens} tokens per request, best of {args.rounds}; load "
              f"{os.getloadavg()[0]:.1f}")
        print("| streams | unconstrained tok/s | JSON schema tok/s | ratio |")
        print("| --- | --- | --- | --- |")
        for streams in [int(s) for s in args.streams.split(",")]:
            free = max(run(port, streams, args.tokens, False, r) for r in range(args.rounds))
            constrained = max(run(port, streams, args.tokens, True, r) for r in range(args.rounds))
            print(f"| {streams} | {free:.1f} | {constrained:.1f} | {constrained / free:.2f}x |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
