"""``pellucid serve`` under concurrent load: 20 valid explain requests sent one after another and
the same 20 sent at once, to one server with a pool of worker processes; and ``/health`` latency
while the pool is busy. Prints the wall times and their ratio.

    .venv/bin/python benchmarks/service_concurrency.py [--requests 20] [--workers 2] [--method gradcam]

The server runs on 127.0.0.1 in a subprocess with a randomly initialised ResNet-18 (1 x 224 x 224
input); requests are PNG uploads of noise. Each worker runs torch with cores / workers threads.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def _png(seed: int, side: int = 224) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (side, side), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(root: Path, workers: int, queue: int):
    port = _free_port()
    cmd = [sys.executable, "-m", "pellucid.cli", "serve", "--models", str(root / "models"),
           "--out", str(root / f"results-{workers}"), "--port", str(port), "--workers", str(workers),
           "--queue", str(queue), "--retention-hours", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return proc, url


def _post(client: httpx.Client, seed: int, method: str) -> float:
    start = time.perf_counter()
    r = client.post("/v1/explain", files={"file": ("x.png", _png(seed), "image/png")},
                    data={"model": "net", "methods": method})
    if r.status_code != 200:
        raise SystemExit(f"request failed: {r.status_code} {r.text[:200]}")
    return time.perf_counter() - start


def measure(root: Path, workers: int, n: int, method: str) -> dict[str, float]:
    proc, url = _server(root, workers, queue=n)
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            for k in range(2 * workers):  # every worker has started and explained once
                _post(c, 1000 + k, method)
            start = time.perf_counter()
            for k in range(n):
                _post(c, k, method)
            serial = time.perf_counter() - start
        health: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=30) as h:
                while not stop.is_set():
                    t = time.perf_counter()
                    h.get("/health")
                    health.append(time.perf_counter() - t)
                    time.sleep(0.05)

        def one(k: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                _post(c, k, method)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
        prober = threading.Thread(target=probe)
        start = time.perf_counter()
        prober.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parallel = time.perf_counter() - start
        stop.set()
        prober.join()
    finally:
        proc.terminate()
        proc.wait(30)
    return {"serial": serial, "parallel": parallel, "health_median_ms": 1000 * statistics.median(health),
            "health_max_ms": 1000 * max(health)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="gradcam,saliency")
    args = parser.parse_args()
    from pellucid.models import build, save_model
    from pellucid.models.card import ModelCard

    root = Path(tempfile.mkdtemp(prefix="pellucid-service-bench-"))
    card = ModelCard(arch="resnet18", task="classification", class_names=["a", "b"], in_channels=1,
                     spatial_dims=2, input_size=[224, 224], activation="softmax", backend="torchvision")
    save_model(root / "models" / "net", build("resnet18", 2, 1, 2, backend="torchvision").module, card)
    print(f"{args.requests} requests of {args.method} on a 224 px ResNet-18, {os.cpu_count()} cores")
    print(f"{'workers':>8} {'threads/worker':>15} {'serial s':>9} {'parallel s':>11} {'ratio':>6} "
          f"{'/health median ms':>18} {'max ms':>7}")
    for w in args.workers:
        r = measure(root, w, args.requests, args.method)
        threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1) // w)
        ratio = r["parallel"] / r["serial"]
        print(f"{w:>8} {threads:>15} {r['serial']:>9.2f} {r['parallel']:>11.2f} {ratio:>6.2f} "
              f"{r['health_median_ms']:>18.1f} {r['health_max_ms']:>7.1f}")


if __name__ == "__main__":
    main()
