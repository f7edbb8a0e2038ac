"""LVLM client throughput: sequential vs concurrent requests, and a rerun served from the response cache.

Usage: python benchmarks/lvlm_throughput.py [--images 256] [--latency 0.2] [--concurrency 16] [--json OUT]

A loopback OpenAI-compatible chat-completions server (``tests/lvlm_server.py``, 127.0.0.1, one thread per
connection) answers every request after a fixed latency (200 ms: a stand-in for a local vLLM/Ollama server's
generation time) with a reply naming the image's colour. :class:`vlmood.lvlm.http.OpenAIClient` sends the same
``--images`` distinct 32x32 PNG images (base64 data URLs) with the same prompt:

1. at concurrency 1 (a fresh cache: every image is a request);
2. at ``--concurrency`` (another fresh cache), replies checked equal to run 1's;
3. again at ``--concurrency`` with run 2's cache: every reply must come from the cache, with no chat request.

Reported: images/s of runs 1 and 2 and their ratio (target >= 10x at concurrency 16), and run 3's time and its
request count (the server's counter of chat POSTs; the one ``GET /models`` check per client is counted apart).

Measured (2-core CPU box shared with other jobs, Python 3.11, httpx 0.28; `python benchmarks/lvlm_throughput.py`):

    images=256 latency=0.200 s
    concurrency  1:  53.16 s     4.82 images/s  (256 requests, max in flight 1)
    concurrency 16:   3.47 s    73.70 images/s  (256 requests, max in flight 16)
    speed-up: 15.3x (target >= 10x)
    rerun from the cache: 0.077 s, 0 chat requests, 256/256 replies cached

The ideal is 16x (256 x 0.2 s / 16 = 3.2 s); the rest is PNG encoding, hashing and HTTP overhead (about 6 ms per
request at latency 0 on this box). The loopback server disables Nagle's algorithm: without it each reply (headers
and body written separately) waited for a 40 ms delayed ACK and the sequential run took 65 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tests.lvlm_server import LoopbackServer, request_image  # noqa: E402
from vlmood.lvlm.base import Request  # noqa: E402
from vlmood.lvlm.http import OpenAIClient  # noqa: E402


def colour_reply(req: dict) -> str:
    r, g, b = request_image(req).getpixel((0, 0))
    return f"Prediction: colour {r},{g},{b}"


def run(server: LoopbackServer, requests: list[Request], concurrency: int, cache: Path) -> dict:
    server.reset()
    client = OpenAIClient(server.base_url, server.models[0], concurrency=concurrency, cache=cache, timeout=30.0)
    t = time.perf_counter()
    replies = client.generate_many(requests, progress=False)
    seconds = time.perf_counter() - t
    client.close()
    errors = [r.error for r in replies if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return {"concurrency": concurrency, "seconds": seconds, "images_per_s": len(requests) / seconds,
            "requests": server.requests, "max_in_flight": server.max_in_flight,
            "cached": sum(r.cached for r in replies), "texts": [r.text for r in replies]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args(argv)
    images = [Image.new("RGB", (32, 32), (i % 256, i // 256, 100)) for i in range(a.images)]
    requests = [Request("What colour is this image?", im) for im in images]
    print(f"images={a.images} latency={a.latency:.3f} s")
    with tempfile.TemporaryDirectory() as tmp, LoopbackServer(colour_reply, latency=a.latency) as server:
        seq = run(server, requests, 1, Path(tmp) / "seq")
        par = run(server, requests, a.concurrency, Path(tmp) / "par")
        if par["texts"] != seq["texts"]:
            raise SystemExit("concurrent replies differ from sequential ones")
        again = run(server, requests, a.concurrency, Path(tmp) / "par")
    for r in (seq, par):
        print(f"concurrency {r['concurrency']:2d}: {r['seconds']:6.2f} s  {r['images_per_s']:7.2f} images/s  "
              f"({r['requests']} requests, max in flight {r['max_in_flight']})")
    ratio = par["images_per_s"] / seq["images_per_s"]
    print(f"speed-up: {ratio:.1f}x (target >= 10x)")
    print(f"rerun from the cache: {again['seconds']:.3f} s, {again['requests']} chat requests, "
          f"{again['cached']}/{a.images} replies cached")
    out = {"images": a.images, "latency_s": a.latency, "ratio": ratio,
           **{name: {k: v for k, v in r.items() if k != "texts"}
              for name, r in (("sequential", seq), ("concurrent", par), ("cached_rerun", again))}}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
