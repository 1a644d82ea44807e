"""Checkpoint upload/download throughput through S3Store vs raw boto3 (target: >= 0.9x raw).

    python -m benchmarks.s3_throughput [--mb 200] [--repeat 3] [--json]

Starts its own moto S3 server on 127.0.0.1 and moves the same checkpoint-like folder (one large
file + a few small ones) both ways, in the same run:

- ``store``: ``S3Store.commit_checkpoint`` then ``S3Store.download``. These also hash every file
  with sha256 (the manifest on commit, the verification on download): reported as is, and also
  with the measured hashing time taken out, so the transfer path itself can be compared.
- ``raw``: ``boto3`` ``upload_file`` / ``download_file`` per file, default settings.

Best of ``--repeat`` runs each, alternating which goes first. moto is a Python server sharing the
machine's cores with the client, so absolute MB/s say little about real S3; the ratio is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def make_folder(root: Path, mb: int) -> int:
    """One large file (``mb`` MiB of random bytes) and a few small ones; returns total bytes."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "model.safetensors", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(MB))
    small = {
        "adapter_config.json": b'{"r": 16, "lora_alpha": 32}',
        "trainer_state.json": os.urandom(20_000),
        "rng_state.pth": os.urandom(15_000),
        "scheduler.pt": os.urandom(1_000),
    }
    for name, data in small.items():
        (root / name).write_bytes(data)
    return sum(p.stat().st_size for p in root.iterdir())


@contextlib.contextmanager
def moto_endpoint():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(mb: int, repeat: int) -> dict:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(name, value)
    import boto3

    from infra.s3 import S3Store
    from infra.storage import sha256_file

    work = Path(tempfile.mkdtemp(prefix="s3bench-"))
    try:
        src = work / "src"
        total = make_folder(src, mb)
        files = sorted(p for p in src.iterdir() if p.is_file())
        with moto_endpoint() as endpoint:
            raw = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
            raw.create_bucket(Bucket="bench")
            store = S3Store("s3://bench/store", endpoint_url=endpoint)

            def store_up():
                store.commit_checkpoint("job", 1, src)

            def store_down():
                shutil.rmtree(work / "store-out", ignore_errors=True)
                store.download(store.latest_checkpoint("job"), work / "store-out")

            def raw_up():
                for p in files:
                    raw.upload_file(str(p), "bench", f"raw/{p.name}")

            def raw_down():
                shutil.rmtree(work / "raw-out", ignore_errors=True)
                (work / "raw-out").mkdir()
                for p in files:
                    raw.download_file("bench", f"raw/{p.name}", str(work / "raw-out" / p.name))

            def hash_all():
                for p in files:
                    sha256_file(p)

            best = {k: float("inf") for k in ("store_up", "store_down", "raw_up", "raw_down", "hash")}
            for i in range(repeat):
                order = [("store", store_up, store_down), ("raw", raw_up, raw_down)]
                for name, up, down in order if i % 2 == 0 else order[::-1]:
                    best[f"{name}_up"] = min(best[f"{name}_up"], timed(up))
                    best[f"{name}_down"] = min(best[f"{name}_down"], timed(down))
                best["hash"] = min(best["hash"], timed(hash_all))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mbps(seconds: float) -> float:
        return round(total / MB / seconds, 1)

    h = best["hash"]  # commit hashes each file once; download verifies each file once
    out = {"total_mb": round(total / MB, 1), "repeat": repeat, "hash_s": round(h, 3)}
    for d in ("up", "down"):
        s, r = best[f"store_{d}"], best[f"raw_{d}"]
        out[d] = {
            "store_mb_s": mbps(s), "raw_mb_s": mbps(r), "ratio": round(r / s, 3),
            "store_without_hash_mb_s": mbps(max(s - h, 1e-9)), "ratio_without_hash": round(r / max(s - h, 1e-9), 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the large file, MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.mb, args.repeat)
    if args.json:
        print(json.dumps(result))
        return
    print(f"checkpoint of {result['total_mb']} MiB through moto on 127.0.0.1, best of {result['repeat']}; "
          f"sha256 of all files: {result['hash_s']} s")
    for d, label in (("up", "upload  "), ("down", "download")):
        r = result[d]
        print(f"{label}: S3Store {r['store_mb_s']:7.1f} MB/s  raw boto3 {r['raw_mb_s']:7.1f} MB/s  "
              f"ratio {r['ratio']:.2f}x   (hashing taken out: {r['store_without_hash_mb_s']:7.1f} MB/s, "
              f"{r['ratio_without_hash']:.2f}x)")


if __name__ == "__main__":
    main()
