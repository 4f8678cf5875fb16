"""Soak benchmark: mixed traffic against `worker-candle serve` on a fixture model, on loopback only, for a
bounded time; samples the worker's RSS (VmRSS of /proc/<pid>/status) and prints the RSS curve, the
requests served and any valid request that failed.

usage: python3 scripts/soak.py [--minutes 30] [--sample-seconds 60]
                               [--model tests/fixtures/llama] [--binary target/release/worker-candle]
                               [--clients 8]

Traffic, drawn at random by each client thread: unstreamed and streamed chat and completions requests,
streams the client drops after the first event (a cancellation), large responses (`n: 8`, `logprobs: 5`,
200 tokens), `/run` + `/status` and `/runsync` jobs, and bad requests (wrong model, `n: 1000`,
`max_tokens: -1`, an over-long prompt, a 20 MB body, invalid JSON) that must get their 4xx. A valid request
that does not end in 200 (or a bad one that does not get its 4xx) counts as a failure. Exit status 1 when
any did, or when the worker exited. Standard library only; builds nothing (build the binary first:
`cargo build --release`; without it the debug binary is used).
"""
import argparse
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.served = {}
        self.failed = []

    def ok(self, kind):
        with self.lock:
            self.served[kind] = self.served.get(kind, 0) + 1

    def fail(self, kind, detail):
        with self.lock:
            self.failed.append((kind, str(detail)[:300]))


def request(port, method, path, body=None, timeout=300, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"content-type": "application/json"} if data is not None else {}
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


PROMPT = "The future of AI is"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


def valid_cases(model):
    small = {"max_tokens": 24, "temperature": 0.8}
    return [
        ("chat", "/v1/chat/completions", {"model": model, "messages": CHAT, **small}),
        ("completion", "/v1/completions", {"model": model, "prompt": PROMPT, **small}),
        ("openai-prefix", "/openai/v1/completions", {"prompt": PROMPT, **small}),
        ("large-n", "/v1/completions", {"prompt": PROMPT, "n": 8, "max_tokens": 200, "logprobs": 5,
                                        "ignore_eos": True, "temperature": 1.0}),
    ]


def bad_cases(model):
    long = "The future of AI is bright. " * 4000
    return [
        ("bad-model", "/v1/completions", {"model": "no-such-model", "prompt": PROMPT}, 404),
        ("bad-n", "/v1/completions", {"prompt": PROMPT, "n": 1000}, 400),
        ("bad-max-tokens", "/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400),
        ("bad-long-prompt", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": long}], "max_tokens": 4}, 400),
        ("bad-stream-n", "/v1/completions", {"prompt": PROMPT, "n": 1000, "stream": True}, 400),
    ]


def stream(port, path, body, drop_after_first):
    """A streamed request: True once it ends with [DONE] (or, when dropping, once the first event came)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                     headers={"content-type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return False, f"status {r.status}: {r.read()[:200]!r}"
        seen = b""
        while True:
            line = r.readline()
            if not line:
                return False, f"stream ended without [DONE]: {seen[-200:]!r}"
            seen += line
            if line.startswith(b"data: ") and drop_after_first:
                # Hang up mid-stream: the worker must cancel the request.
                conn.sock.shutdown(socket.SHUT_RDWR)
                return True, None
            if line.strip() == b"data: [DONE]":
                return True, None
    finally:
        conn.close()


def client(port, model, stop, stats, seed):
    rng = random.Random(seed)
    valid, bad = valid_cases(model), bad_cases(model)
    huge = b'{"prompt": "' + b"a" * (20 << 20) + b'"}'
    while not stop.is_set():
        roll = rng.random()
        try:
            if roll < 0.35:
                kind, path, body = rng.choice(valid[:3])
                status, data = request(port, "POST", path, body)
                (stats.ok if status == 200 else lambda k: stats.fail(k, data))(kind)
            elif roll < 0.45:
                kind, path, body = valid[3]
                status, data = request(port, "POST", path, body)
                (stats.ok if status == 200 else lambda k: stats.fail(k, data))(kind)
            elif roll < 0.60:
                kind, path, body = rng.choice(valid[:3])
                good, detail = stream(port, path, body, drop_after_first=False)
                (stats.ok if good else lambda k: stats.fail(k, detail))("stream")
            elif roll < 0.70:
                kind, path, body = rng.choice(valid[:2])
                body = {**body, "max_tokens": 200}
                good, detail = stream(port, path, body, drop_after_first=True)
                (stats.ok if good else lambda k: stats.fail(k, detail))("cancelled-stream")
            elif roll < 0.80:
                status, data = request(port, "POST", "/runsync", {"input": {"prompt": PROMPT,
                                                                            "sampling_params": {"max_tokens": 16}}})
                good = status == 200 and json.loads(data).get("status") == "COMPLETED"
                (stats.ok if good else lambda k: stats.fail(k, data))("runsync")
            elif roll < 0.85:
                status, data = request(port, "POST", "/run", {"input": {"prompt": PROMPT,
                                                                        "sampling_params": {"max_tokens": 16}}})
                job = json.loads(data)["id"] if status == 200 else None
                for _ in range(600):
                    if job is None:
                        break
                    status, data = request(port, "GET", f"/status/{job}")
                    state = json.loads(data).get("status") if status == 200 else None
                    if state not in ("IN_QUEUE", "IN_PROGRESS"):
                        break
                    time.sleep(0.1)
                good = status == 200 and json.loads(data).get("status") == "COMPLETED"
                (stats.ok if good else lambda k: stats.fail(k, data))("run")
            elif roll < 0.98:
                kind, path, body, want = rng.choice(bad)
                status, data = request(port, "POST", path, body)
                (stats.ok if status == want else lambda k: stats.fail(k, f"{status}: {data[:200]!r}"))(kind)
            else:
                status, data = request(port, "POST", "/v1/completions", raw=huge)
                (stats.ok if status == 413 else lambda k: stats.fail(k, f"{status}: {data[:200]!r}"))("bad-20MB-body")
        except (OSError, http.client.HTTPException) as e:
            stats.fail("connection", repr(e))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the traffic runs (default 30)")
    p.add_argument("--sample-seconds", type=float, default=60.0, help="RSS sampling interval (default 60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "llama"))
    release = os.path.join(ROOT, "target", "release", "worker-candle")
    debug = os.path.join(ROOT, "target", "debug", "worker-candle")
    p.add_argument("--binary", default=release if os.path.exists(release) else debug,
                   help="the worker (default: target/release/worker-candle, else target/debug's)")
    args = p.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} does not exist: build it first (cargo build --release) or pass --binary")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "MODEL_", "API_KEY"))}
    env.update({"MODEL_NAME": args.model, "DEVICE": "cpu", "RUST_LOG": "warn"})
    worker = subprocess.Popen([args.binary, "serve", "--host", "127.0.0.1", "--port", "0"], env=env,
                              stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    port = None
    for line in worker.stdout:
        m = re.match(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        sys.exit("the worker did not start")
    threading.Thread(target=lambda: [None for _ in worker.stdout], daemon=True).start()

    stats, stop = Stats(), threading.Event()
    start = time.monotonic()
    curve = [(0.0, rss_mib(worker.pid))]
    print(f"worker pid {worker.pid} on 127.0.0.1:{port}; {args.minutes} min, {args.clients} clients; "
          f"RSS at start {curve[0][1]:.0f} MiB", flush=True)
    threads = [threading.Thread(target=client, args=(port, args.model, stop, stats, i), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    end = start + args.minutes * 60
    next_sample = start + args.sample_seconds
    while time.monotonic() < end and worker.poll() is None:
        time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
        if time.monotonic() >= next_sample:
            t, rss = time.monotonic() - start, rss_mib(worker.pid)
            curve.append((t, rss))
            with stats.lock:
                served, failed = sum(stats.served.values()), len(stats.failed)
            print(f"  t={t / 60:6.2f} min  RSS {rss:7.1f} MiB  served {served}  failed {failed}", flush=True)
            next_sample += args.sample_seconds
    stop.set()
    for t in threads:
        t.join(timeout=330)
    time.sleep(3)  # the worker hands freed memory back a second after the last request
    alive = worker.poll() is None
    if alive:
        curve.append((time.monotonic() - start, rss_mib(worker.pid)))
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()

    print("\nRSS curve (minutes, MiB):")
    for t, rss in curve:
        print(f"  {t / 60:6.2f}  {rss:7.1f}")
    warm = [rss for t, rss in curve if t >= min(args.sample_seconds, args.minutes * 60 / 2)]
    if warm:
        print(f"after warm-up: min {min(warm):.1f} MiB, max {max(warm):.1f} MiB, last {curve[-1][1]:.1f} MiB")
    print(f"requests served: {sum(stats.served.values())}")
    for kind in sorted(stats.served):
        print(f"  {kind}: {stats.served[kind]}")
    print(f"failed requests: {len(stats.failed)}")
    for kind, detail in stats.failed[:20]:
        print(f"  {kind}: {detail}")
    if not alive:
        print(f"the worker exited ({worker.returncode})")
    sys.exit(1 if stats.failed or not alive else 0)


if __name__ == "__main__":
    main()
