"""`tunelab serve` under load (issue 24): batching, the body limit, abandoned streams.

Starts `tunelab serve` as a subprocess (so its RSS is its own) on a tiny random model and on the default
model, and measures, each against the other within the same run:

  (a) 20 chat requests of 64 new tokens (greedy) sent all at once, against the same requests one at a
      time: wall time of each and the ratio, and whether every answer is identical;
  (b) a 20 MB body (Content-Length, and chunked without one): time to the 413, and the server's RSS
      before and after (the client streams the body from one 64 kB buffer);
  (c) the latency of one request alone, and right after 5 streams were opened and abandoned
      (medians of a few repeats): the ratio.

    .venv/bin/python bench/serve_speed.py                         # tiny and smollm2-135m-instruct
    .venv/bin/python bench/serve_speed.py --models tiny --pythonpath /tmp/old-tunelab   # another checkout
    .venv/bin/python bench/serve_speed.py --threads 1             # a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["cats", "the sea", "a small town", "winter", "robots", "a lighthouse", "bread", "trains", "the moon",
          "a garden", "rivers", "a library", "chess", "volcanoes", "bees", "a violin", "deserts", "clocks",
          "a market", "owls"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(spec: str, pythonpath: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": pythonpath}
    if threads:  # on a machine shared with other jobs, torch's default (all cores) can spin and stall
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "tunelab", "serve", spec, "--port", str(port), "--device", "cpu", "--name", "m"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server for {spec} exited with {proc.returncode}") from None
            time.sleep(0.2)
    raise SystemExit(f"the server for {spec} did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chat(url: str, topic: str, max_tokens: int = 64) -> tuple[str, int, float]:
    body = {"model": "m", "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})  # fmt: skip
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        reply = json.loads(r.read())
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"], time.perf_counter() - t


# --------------------------------------------------------------------------------------- (a)
def batching(url: str) -> dict:
    chat(url, "warming up", 8)
    t = time.perf_counter()
    alone = [chat(url, topic) for topic in TOPICS]
    sequential = time.perf_counter() - t
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(TOPICS)) as pool:
        together = list(pool.map(lambda topic: chat(url, topic), TOPICS))
    concurrent_s = time.perf_counter() - t
    return {
        "requests": len(TOPICS),
        "new_tokens": sum(n for _, n, _ in alone),
        "sequential_s": round(sequential, 2),
        "concurrent_s": round(concurrent_s, 2),
        "speedup": round(sequential / concurrent_s, 2),
        "median_latency_concurrent_s": round(statistics.median(s for _, _, s in together), 2),
        "identical_outputs": [a[:2] for a in alone] == [b[:2] for b in together],
    }


# --------------------------------------------------------------------------------------- (b)
def huge_body(url: str, pid: int, chunked: bool, size: int = 20 * 1024 * 1024) -> dict:
    host, port = url.removeprefix("http://").split(":")
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
    block = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 65000
    if chunked:
        block = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    before = rss_mb(pid)
    t = time.perf_counter()
    status, sent, offset = None, 0, 0  # the same block again and again, resumed where a partial send stopped
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode())
        s.setblocking(False)
        reply = b""
        while status is None and time.perf_counter() - t < 60:
            try:
                if sent < size:
                    n = s.send(memoryview(block)[offset:])
                    sent, offset = sent + n, (offset + n) % len(block)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.001)
            try:
                reply += s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            if b"\r\n" in reply:
                status = int(reply.split(b" ", 2)[1])
    elapsed = time.perf_counter() - t
    time.sleep(0.5)
    return {"status": status, "seconds": round(elapsed, 3), "bytes_sent_before_reply": sent,
            "rss_before_mb": round(before, 1), "rss_after_mb": round(rss_mb(pid), 1)}  # fmt: skip


# --------------------------------------------------------------------------------------- (c)
def abandon_streams(url: str, n: int = 5) -> None:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Tell me everything about ships."}],
                       "max_tokens": 200, "stream": True}).encode()  # fmt: skip
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=600)
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(s)
    for s in socks:  # every stream is generating ...
        got = b""
        while b"data:" not in got:
            got += s.recv(65536)
    for s in socks:  # ... and its client goes away
        s.close()


def abandoned(url: str, repeats: int = 3) -> dict:
    chat(url, "warming up", 8)
    alone, after = [], []
    for _ in range(repeats):
        time.sleep(1)
        alone.append(chat(url, "a quiet morning", 32)[2])
        abandon_streams(url)
        after.append(chat(url, "a quiet morning", 32)[2])
    a, b = statistics.median(alone), statistics.median(after)
    return {"alone_s": round(a, 3), "after_5_abandoned_s": round(b, 3), "slowdown": round(b / a, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2-135m-instruct")
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's own choice)")
    p.add_argument("--pythonpath", default=str(ROOT), help="the tunelab checkout the server runs (default: this one)")
    args = p.parse_args()
    from tunelab.testing import save_tiny_model_dir

    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    results = {}
    for spec in args.models.split(","):
        path = save_tiny_model_dir(f"{tmp}/tiny") if spec == "tiny" else spec
        proc, url = start_server(path, args.pythonpath, args.threads)
        try:
            out = results[spec] = {}
            if "b" in args.parts:
                out["body_20mb"] = huge_body(url, proc.pid, chunked=False)
                out["body_20mb_chunked"] = huge_body(url, proc.pid, chunked=True)
            if "c" in args.parts:
                out["abandoned_streams"] = abandoned(url)
            if "a" in args.parts:
                out["batching"] = batching(url)
            print(json.dumps({spec: out}, indent=2), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
