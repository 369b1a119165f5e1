"""Shard-writing throughput on the embedded fashion products (858 real photos + titles): samples/s
of `write_shards` with 1 and 2 image-checking worker processes, runs interleaved, median of each.

    .venv/bin/python bench/shards.py [--repeats 3]

Two cases: the photos as they are (small clean JPEGs: each is decoded to check it and its original
bytes are stored), and with max_side=160, which makes every photo go through the path of real
catalogues with large photos (decode, shrink, re-encode). A warm-up run first loads the tokenizer
and starts the worker server, which a real run pays once (about 1.5 s).
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cmaclip.data.shards import write_shards

DATA = Path(__file__).resolve().parents[1] / "shards" / "fashion-products"
TASKS = ["masterCategory", "subCategory", "baseColour", "gender", "usage"]


def timed_run(out: Path, workers: int, max_side: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    dataset = write_shards(DATA / "metadata.csv", TASKS, out, text_column="productDisplayName",
                           workers=workers, max_side=max_side, min_class_count=5)
    seconds = time.perf_counter() - start
    return seconds, sum(split["samples"] for split in dataset["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = [(workers, max_side) for max_side in (512, 160) for workers in (1, 2)]
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        out = Path(tmp) / "shards"
        timed_run(out, 2, 512)  # warm-up
        seconds = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case in cases:
                elapsed, samples = timed_run(out, *case)
                seconds[case].append(elapsed)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{samples} samples (embedded fashion products), {args.repeats} interleaved runs each, median; "
          f"{os.cpu_count()} cores, load average {load} (2 workers only help when a core is free)")
    print(f"{'images':<28} | {'workers':>7} | {'seconds':>7} | {'samples/s':>9} | runs (s)")
    rates = {}
    for workers, max_side in cases:
        median = statistics.median(seconds[workers, max_side])
        rates[workers, max_side] = samples / median
        runs = " ".join(f"{s:.2f}" for s in seconds[workers, max_side])
        images = "as they are (224 px JPEG)" if max_side == 512 else f"shrunk to {max_side} px, re-encoded"
        print(f"{images:<28} | {workers:>7} | {median:>7.2f} | {rates[workers, max_side]:>9.0f} | {runs}")
    for max_side in (512, 160):
        print(f"speed-up 2 workers / 1 (max_side {max_side}): {rates[2, max_side] / rates[1, max_side]:.2f}")
    print(f"shards samples/s: {max(rates[case] for case in cases if case[1] == 512):.0f}")


if __name__ == "__main__":
    main()
