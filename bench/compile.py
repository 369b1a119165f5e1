"""`train.compile`: training-step time of the model under torch.compile (inductor) vs eager.

Same model, same batches, single process: forward + loss + backward + AdamW step (the trainer's
parameter groups; the optimizer itself stays eager, as in the trainer). The batches cycle through
titles of different lengths, as real batches do: the model trims text to the batch's longest
title, so a compiled model sees several shapes (it recompiles once, then goes dynamic), and the
data-dependent trim is a graph break. The one-off compile time is reported apart from the steady
state. Runs are interleaved (eager, compiled, eager, ...) and the median is reported; the headline
(last line) is the ViT-B/32 step speedup compiled/eager (above 1 = compile is faster).

    .venv/bin/python bench/compile.py [--presets tiny,vit-b-32] [--batch 4] [--repeats 6]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from cmaclip.config import OptimConfig
from cmaclip.model import CMAClip, ModelConfig
from cmaclip.train import build_optimizer
from step import DEVICE, TASKS, make_batch  # bench/step.py: product-like batches

SHAPES = 3  # distinct batches (title lengths) the runs cycle through


class Trainer:
    def __init__(self, preset: str, compiled: bool, batches: list[dict]):
        torch.manual_seed(0)
        model = CMAClip(ModelConfig(preset=preset, dropout=0.0), TASKS).to(DEVICE).train()
        self.optimizer = build_optimizer(model, OptimConfig())
        self.model = torch.compile(model) if compiled else model
        self.batches, self.taken = batches, 0

    def step(self) -> float:
        batch = self.batches[self.taken % len(self.batches)]
        self.taken += 1
        autocast = torch.autocast("cuda", torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,vit-b-32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    print(f"device {DEVICE}, {torch.get_num_threads()} threads, batch {args.batch}, {SHAPES} title lengths "
          f"cycled, {args.repeats} interleaved repeats, median step time")
    print(f"{'backbone':<10} {'mode':<9} {'first steps s':>14} {'step ms':>9}")
    speedup = None
    for preset in args.presets.split(","):
        generator = torch.Generator().manual_seed(1)
        image_size = CMAClip(ModelConfig(preset=preset), TASKS).config.image_size
        batches = [make_batch(args.batch, image_size, generator) for _ in range(SHAPES)]
        trainers = {"eager": Trainer(preset, False, batches), "compiled": Trainer(preset, True, batches)}
        # warm-up: every shape once more than needed (compile, recompile as dynamic, allocator)
        warmup = {mode: sum(trainer.step() for _ in range(SHAPES + 1)) for mode, trainer in trainers.items()}
        times = {mode: [] for mode in trainers}
        for _ in range(args.repeats):
            for mode, trainer in trainers.items():
                times[mode].append(trainer.step())
        medians = {mode: statistics.median(values) for mode, values in times.items()}
        for mode in trainers:
            print(f"{preset:<10} {mode:<9} {warmup[mode]:>14.1f} {medians[mode] * 1e3:>9.1f}")
        speedup = medians["eager"] / medians["compiled"]
        print(f"{preset:<10} compiled/eager speedup {speedup:.2f}")
        del trainers
    print(f"compile step speedup compiled/eager: {speedup:.2f}")


if __name__ == "__main__":
    main()
