"""`cmaclip calibrate`: fit the auto-fill calibration (cmaclip/calibration.py) of a trained model on
a labelled split, and save it next to the model as calibration.json.

    cmaclip calibrate --checkpoint runs/x --shards DIR [--split val] [--precision 0.9]
    accelerate launch --config_file launchers/accelerate/cpu.yaml -m cmaclip.calibrate ...

Then `cmaclip predict --shards` marks each attribute accept or review, and `cmaclip eval` reports
the accepted predictions' precision and coverage on the split it evaluates (use the test split:
the thresholds were chosen on this one). Distributed like `cmaclip eval`: every rank predicts its
share, the logits are gathered, each sample counted once.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from cmaclip.calibration import calibrate, format_report
from cmaclip.data.config import LOADERS
from cmaclip.data.format import SPLITS
from cmaclip.errors import command


def collect_logits(model, loader, tasks: list[str], autocast) -> dict[str, np.ndarray]:
    """Every rank's call -> the whole split's index [N], labels [N, K] and logits/<task> [N, C], on
    every rank, padding dropped, each sample once, in sample order."""
    from cmaclip.batch_predict import model_outputs
    from cmaclip.evaluate import gather_to_all, unique_samples

    parts = {"index": [], "labels": [], **{f"logits/{task}": [] for task in tasks}}
    for batch, output in model_outputs(model, loader, autocast):
        parts["index"].append(batch["index"].cpu().numpy())
        parts["labels"].append(batch["labels"].cpu().numpy())
        for task in tasks:
            parts[f"logits/{task}"].append(output.logits[task].float().cpu().numpy())
    return unique_samples(gather_to_all({key: np.concatenate(values) for key, values in parts.items()}))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="cmaclip calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training output_dir or its model/ folder")
    parser.add_argument("--shards", required=True, help="a folder written by `cmaclip shards` (labelled)")
    parser.add_argument("--split", default="val", choices=SPLITS,
                        help="the labelled split to fit on (not the one you report on)")
    parser.add_argument("--precision", type=float, default=0.9, help="target precision of the accepted predictions")
    parser.add_argument("--min-class-samples", type=int, default=100,
                        help="a predicted class with this many samples in the split gets its own threshold")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--loader", default="auto", choices=LOADERS, help="input pipeline")
    args = parser.parse_args(argv)
    if not 0 < args.precision <= 1:
        parser.error(f"--precision must be in (0, 1], got {args.precision}")
    if args.min_class_samples < 1 or args.batch_size < 1:
        parser.error("--min-class-samples and --batch-size must be >= 1")
    return args


def run(args) -> None:
    from cmaclip.checkpoint import load_model, resolve_model_dir
    from cmaclip.config import RunConfig
    from cmaclip.data.config import DataConfig
    from cmaclip.data.format import load_dataset_info
    from cmaclip.data.loader import build_loader
    from cmaclip.distributed import make_accelerator, quiet_libraries, shutdown
    from cmaclip.evaluate import check_model_fits_shards

    model_dir = resolve_model_dir(args.checkpoint)  # checked before any process group exists
    info = load_dataset_info(args.shards)
    info.num_samples(args.split)
    quiet_libraries()
    accelerator = make_accelerator(RunConfig())
    model = load_model(model_dir, accelerator.device)
    check_model_fits_shards(model.tasks, info.tasks, args.checkpoint, args.shards)
    loader = build_loader(args.shards, args.split, config=DataConfig(loader=args.loader), batch_size=args.batch_size,
                          image_size=model.config.image_size, train=False, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, device=accelerator.device)
    samples = collect_logits(model, loader, list(model.tasks), accelerator.autocast)
    if accelerator.is_main_process:
        result = calibrate({task: samples[f"logits/{task}"] for task in model.tasks}, samples["labels"], model.tasks,
                           precision=args.precision, min_class_samples=args.min_class_samples)
        result.split, result.shards = args.split, str(args.shards)
        path = result.save(model_dir)
        print(format_report(result))
        print(f"calibrated on {result.samples} {args.split} samples -> {path}")
    shutdown(accelerator)


@command("cmaclip calibrate")
def main(argv=None) -> None:
    run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
