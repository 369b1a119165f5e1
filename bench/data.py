"""Input pipeline throughput: DALI vs the PIL fallback on the same shards.

Shards: 1000 samples made from the repository's 224 px product photos (cycled) by `write_shards`.
Setting: training batches (random resized crop to 224 + flip + normalize), batch 64, one rank,
2 DALI threads vs 2 DataLoader workers. Each run is a fresh process (so one loader's prefetching
never runs on the other's clock) that reads a warm-up epoch and then times one epoch; runs
alternate DALI / PIL; the table shows medians. CPU time is the process's (all its threads) plus
its children's (the DataLoader workers), so images per CPU-second is fair on a shared machine.

    .venv/bin/python bench/data.py [--runs 5] [--samples 1000] [--batch-size 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmaclip.data.config import DataConfig  # noqa: E402
from cmaclip.data.loader import build_loader  # noqa: E402
from cmaclip.data.shards import write_shards  # noqa: E402

PHOTOS = REPO / "shards" / "fashion-products" / "images"
BACKENDS = ("dali", "pil")


def make_shards(folder: Path, samples: int) -> Path:
    photos = sorted(PHOTOS.glob("*.jpg"))
    rows = [{"id": f"p{n}", "image": str(photos[n % len(photos)]), "text": f"product {n}",
             "labels": {"kind": f"k{n % 5}"}, "split": "train"} for n in range(samples)]
    (folder / "catalog.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    write_shards(folder / "catalog.jsonl", ["kind"], folder / "shards", workers=2, samples_per_shard=250)
    return folder / "shards"


def cpu_seconds() -> float:
    """This process (all its threads) + its live children (DataLoader workers) + reaped ones."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks, me = 0, str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields[1] == me:  # fields after the name: state, ppid, ..., utime (12th), stime (13th)
            ticks += int(fields[11]) + int(fields[12])
    return time.process_time() + reaped.ru_utime + reaped.ru_stime + ticks / os.sysconf("SC_CLK_TCK")


def measure(backend: str, shards: str, batch_size: int, workers: int) -> dict:
    """One run: a warm-up epoch (pipeline build, worker start, page cache), then one timed epoch."""
    loader = build_loader(shards, "train", config=DataConfig(loader=backend, workers=workers),
                          batch_size=batch_size, image_size=224, train=True)
    for _ in loader:
        pass
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = sum(len(batch["pixel_values"]) for batch in loader)
    return {"wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch_size, args.workers)))
        return

    results = {backend: [] for backend in BACKENDS}
    with tempfile.TemporaryDirectory() as folder:
        shards = make_shards(Path(folder), args.samples)
        for _ in range(args.runs):
            for backend in BACKENDS:
                command = [sys.executable, __file__, "--measure", backend, str(shards),
                           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[backend].append(json.loads(output.strip().splitlines()[-1]))

    print(f"{args.samples} samples, 224 px photos -> random resized crop 224, batch {args.batch_size}, "
          f"{args.workers} threads/workers, median of {args.runs} interleaved runs (one epoch each)")
    print(f"{'loader':8} {'images/s':>10} {'images/CPU-s':>13} {'CPU-s/epoch':>12}")
    per_cpu = {}
    for backend, runs in results.items():
        speed = statistics.median(run["images"] / run["wall"] for run in runs)
        per_cpu[backend] = statistics.median(run["images"] / run["cpu"] for run in runs)
        cpu = statistics.median(run["cpu"] for run in runs)
        print(f"{backend:8} {speed:10.1f} {per_cpu[backend]:13.1f} {cpu:12.2f}")
    print(f"data speedup dali/pil per-cpu-second: {per_cpu['dali'] / per_cpu['pil']:.2f}")


if __name__ == "__main__":
    main()
