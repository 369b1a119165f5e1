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

import torch

from cmaclip.distributed import quiet_libraries
from step import DEVICE, Trainer, interleaved  # bench/step.py: a training step on product-like batches

SHAPES = 3  # distinct batches (title lengths) the runs cycle through


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,vit-b-32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    quiet_libraries()  # the title-length trim's graph break would be logged at every compilation

    print(f"device {DEVICE}, {torch.get_num_threads()} threads, batch {args.batch}, {SHAPES} title lengths "
          f"cycled, {args.repeats} interleaved repeats, median step time")
    print(f"{'backbone':<10} {'mode':<9} {'first steps s':>14} {'step ms':>9}")
    speedup = None
    for preset in args.presets.split(","):
        trainers = {mode: Trainer(preset, "cma", args.batch, compiled=mode == "compiled", shapes=SHAPES)
                    for mode in ("eager", "compiled")}
        # warm-up: every shape once more than needed (compile, recompile as dynamic)
        warmup, medians = interleaved(trainers, warmup_steps=SHAPES + 1, repeats=args.repeats)
        for mode in trainers:
            print(f"{preset:<10} {mode:<9} {warmup[mode]:>14.1f} {medians[mode] * 1e3:>9.1f}")
        speedup = medians["eager"] / medians["compiled"]
        print(f"{preset:<10} compiled/eager speedup {speedup:.2f}")
        del trainers
    print(f"compile step speedup compiled/eager: {speedup:.2f}")


if __name__ == "__main__":
    main()
