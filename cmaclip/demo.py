"""`make demo` (`python -m cmaclip.demo`): the whole pipeline on the embedded real fashion sample,
CPU only, a few minutes on 2 cores.

    1. shards    shards/fashion-products (858 products, photo + title + labels) -> demo-out/shards
    2. train     the tiny CMA-CLIP from random init, 2 processes:
                 accelerate launch --config_file launchers/accelerate/cpu.yaml -m cmaclip.train
                     --config configs/cpu-demo.yaml data.shards=demo-out/shards output_dir=demo-out/run
    3. evaluate  the exported model on the validation split: the per-task table, and the accuracy
                 with the titles or the images removed -> demo-out/metrics.json
    4. explain   attention pictures (the paper's Figure 2) of a few products -> demo-out/explain/
With --pretrain (or CMACLIP_DEMO_PRETRAIN=1), step 2 first pretrains the backbone contrastively on
the image-title pairs (`-m cmaclip.pretrain --config configs/cpu-pretrain.yaml`, -> demo-out/pretrain,
a few minutes more) and fine-tunes CMA-CLIP from it (`model.pretrained=demo-out/pretrain/model`).
Then it says how to open TensorBoard and how to run the same on a GPU cluster.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "shards" / "fashion-products"
LAUNCHER = REPO / "launchers" / "accelerate" / "cpu.yaml"
CONFIG = "configs/cpu-demo.yaml"
PRETRAIN_CONFIG = "configs/cpu-pretrain.yaml"
# The attributes the tiny model learns: a category hierarchy, a colour, who and what it is for.
TASKS = ["masterCategory", "subCategory", "baseColour", "gender", "usage"]
TITLE_COLUMN = "productDisplayName"
VAL_FRACTION = 0.2


def heading(number: int, text: str) -> None:
    print(f"\n== {number}/4 {text} ==", flush=True)


def build_shards(out: Path) -> Path:
    from cmaclip.data.format import DATASET_FILE, load_dataset_info
    from cmaclip.data.shards import write_shards

    shards = out / "shards"
    if (shards / DATASET_FILE).is_file() and list(load_dataset_info(shards).tasks) == TASKS:
        print(f"reusing {shards} (delete it to rebuild)")
        return shards
    write_shards(FASHION / "metadata.csv", TASKS, shards, image_root=FASHION, text_column=TITLE_COLUMN,
                 val_fraction=VAL_FRACTION, workers=2, overwrite=True, progress=True)
    info = load_dataset_info(shards)
    print(f"{info.num_samples('train')} training and {info.num_samples('val')} validation products; tasks: "
          + ", ".join(f"{task} ({len(classes)} classes)" for task, classes in info.tasks.items()))
    return shards


def launch_training(shards: Path, run: Path, processes: int, overrides: list[str], module: str = "cmaclip.train",
                    config: str = CONFIG) -> None:
    if run.exists():
        print(f"removing the previous demo run {run}")
        shutil.rmtree(run)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCHER),
               "--num_processes", str(processes), "-m", module, "--config", config,
               f"data.shards={shards}", f"output_dir={run}", *overrides]
    print("$ " + " ".join(["accelerate", "launch", *command[3:]]), flush=True)
    # One thread per process: the ranks share the cores (and torch would warn about it otherwise).
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if not torch.cuda.is_available():
        environment.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=environment)
    if completed.returncode != 0:
        sys.exit(f"demo: training failed (exit {completed.returncode}); its messages are above")
    print(f"trained in {time.perf_counter() - started:.0f} s")


def evaluate_on_val(shards: Path, run: Path, out: Path) -> None:
    from cmaclip.checkpoint import load_model
    from cmaclip.data.config import DataConfig
    from cmaclip.data.loader import build_loader
    from cmaclip.evaluate import evaluate_model, format_table
    from cmaclip.files import write_json_atomic

    model = load_model(run)
    loader = build_loader(shards, "val", config=DataConfig(loader="pil", workers=1), batch_size=64,
                          image_size=model.config.image_size, train=False)
    clean = evaluate_model(model, loader, pictures=0, progress=True)
    print(format_table(clean.metrics, clean.modality_weights))
    robustness = {perturb: evaluate_model(model, loader, perturb=perturb, pictures=0).metrics["mean"]["accuracy"]
                  for perturb in ("no-text", "no-image")}
    # the majority baseline: always predicting each task's most frequent validation class
    majority = sum(confusion.sum(axis=1).max() / max(confusion.sum(), 1) for confusion in clean.confusion.values())
    print(f"mean accuracy {clean.metrics['mean']['accuracy']:.3f}; with every title removed "
          f"{robustness['no-text']:.3f}, with every image removed {robustness['no-image']:.3f} "
          f"(majority-class baseline {majority / len(clean.confusion):.3f})")
    write_json_atomic(out / "metrics.json", {**clean.to_json(), "split": "val",
                                             "robustness_mean_accuracy": robustness})
    print(f"wrote {out / 'metrics.json'} (per-class tables included)")


def draw_attention_pictures(run: Path, out: Path) -> None:
    from cmaclip.checkpoint import load_model
    from cmaclip.explain import explain_file

    model = load_model(run)
    rows = explain_file(model, FASHION / "metadata.csv", out / "explain", image_root=FASHION,
                        text_column=TITLE_COLUMN, limit=6)
    for row in rows:
        print(f"  {row['png']}: \"{row['title'].strip()}\" -> most relevant token \"{row['token']}\"")
    print(f"pictures in {out / 'explain'}")


def next_steps(out: Path, run: Path) -> str:
    return f"""
== done ==
Everything is under {out}/: shards/, run/ (tensorboard/, checkpoints/, model/), metrics.json, explain/.

TensorBoard (losses, learning rates, per-task accuracy and recall at 90% precision, modality
weights, confusion matrices, attention pictures; samples/s, TFLOP/s and peak memory per device,
and MFU on a GPU, next to the "model:" and "efficiency:" lines training printed above):
    .venv/bin/tensorboard --logdir {run}/tensorboard      # then open http://localhost:6006

Use the trained model:
    .venv/bin/cmaclip eval --checkpoint {run} --shards {out}/shards --split val --out metrics.json
    .venv/bin/cmaclip predict --checkpoint {run} --input products.jsonl --out preds.jsonl
    .venv/bin/cmaclip explain --checkpoint {run} --input products.jsonl --out pictures/

The same on GPUs (install a CUDA torch: make TORCH="torch==2.13.0 --index-url <CUDA wheel index>"):
    one GPU:        accelerate launch --config_file launchers/accelerate/gpu-single.yaml \\
                        -m cmaclip.train --config configs/vit-b16-fashiongen.yaml data.shards=DIR output_dir=DIR
    one node, 8 GPUs, DeepSpeed ZeRO-2:  --config_file launchers/accelerate/gpu-zero2.yaml
    Slurm, several nodes, ZeRO-3, preemption-safe:
                    sbatch --nodes 4 launchers/slurm/train.sbatch configs/vit-b16-fashiongen.yaml data.shards=DIR
    the five-variant ablation (the paper's Table 6):
                    cmaclip ablate --config configs/cpu-demo.yaml --shards {out}/shards
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m cmaclip.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    parser.add_argument("--processes", type=int, default=2, help="training processes (CPU ranks)")
    parser.add_argument("--pretrain", action="store_true",
                        default=os.environ.get("CMACLIP_DEMO_PRETRAIN", "") not in ("", "0"),
                        help="pretrain the backbone contrastively first, then fine-tune from it "
                             "(also CMACLIP_DEMO_PRETRAIN=1; a few minutes more)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="passed on to training (and pretraining), e.g. train.max_steps=50 for a quicker look")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from cmaclip.checkpoint import MODEL_DIR
    from cmaclip.distributed import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    heading(1, "shards from the embedded fashion sample")
    shards = build_shards(out)
    overrides = list(args.overrides)
    start = "random init"
    if args.pretrain:
        heading(2, f"contrastive image-title pretraining of the tiny CLIP backbone on {args.processes} CPU processes")
        launch_training(shards, out / "pretrain", args.processes, args.overrides, module="cmaclip.pretrain",
                        config=PRETRAIN_CONFIG)
        overrides.insert(0, f"model.pretrained={out / 'pretrain' / MODEL_DIR}")
        start = "the pretrained backbone"
    heading(2, f"training the tiny CMA-CLIP from {start} on {args.processes} CPU processes")
    launch_training(shards, run, args.processes, overrides)
    heading(3, "evaluation on the validation split")
    evaluate_on_val(shards, run, out)
    heading(4, "attention pictures")
    draw_attention_pictures(run, out)
    print(next_steps(Path(args.out), Path(args.out) / "run"))
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
