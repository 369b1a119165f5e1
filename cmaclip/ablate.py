"""`cmaclip ablate`: the paper's Table 6. Train the five `model.fusion` variants with one recipe,
budget and seed, evaluate each, and write output_dir/ablation.md (+ ablation.json).

    cmaclip ablate --config configs/cpu-demo.yaml --shards demo-out/shards [key.sub=value ...]
    cmaclip ablate ... --launcher "accelerate launch --config_file launchers/accelerate/cpu.yaml"

Each variant trains in its own process (the training entry point, `-m cmaclip.train`, started with
`--launcher`, default: one plain process) under output_dir/<variant>/, with the same YAML and
overrides plus `model.fusion=<variant>`. Only the fusion differs: same steps, batch size, learning
rates, seed, data order. Then each exported model is evaluated on `--split`, clean and under the
robustness perturbations (title removed, image removed, 30% of title words dropped), and the
tables are written. A variant whose metrics are already in output_dir/<variant>/ is not
retrained, so an interrupted ablation continues where it stopped (delete the folder to redo one).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cmaclip.evaluate import PERTURBATIONS, write_json_atomic

VARIANTS = ("image", "text", "concat", "cma-no-modality", "cma")
VARIANT_NAMES = {
    "image": "image only (CLIP image encoder)",
    "text": "text only (CLIP text encoder)",
    "concat": "CLIP, concatenated embeddings",
    "cma-no-modality": "CMA-CLIP without modality attention",
    "cma": "CMA-CLIP",
}
METRICS_FILE = "metrics-{perturb}.json"


# ---- tables ----------------------------------------------------------------------------------------

def _cell(value, best: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}"
    return f"**{text}**" if best else text


def _best(values: dict[str, float | None]) -> set[str]:
    present = {key: value for key, value in values.items() if value is not None}
    if not present:
        return set()
    top = max(present.values())
    return {key for key, value in present.items() if abs(value - top) < 1e-12}


def table6(results: dict[str, dict]) -> str:
    """Per-task accuracy and recall at 90% precision (percent) of each variant, and the means;
    the best value of each column in bold. results: variant -> clean metrics.json content."""
    variants = [v for v in VARIANTS if v in results] + [v for v in results if v not in VARIANTS]
    tasks = list(next(iter(results.values()))["tasks"])
    columns = [(task, "accuracy") for task in tasks] + [(task, "recall_at_p90") for task in tasks]
    columns += [("mean", "accuracy"), ("mean", "recall_at_p90")]

    def value(variant, task, metric):
        metrics = results[variant]
        return (metrics["mean"] if task == "mean" else metrics["tasks"][task]).get(metric)

    best = {column: _best({v: value(v, *column) for v in variants}) for column in columns}
    header = ["variant"] + [f"{task} acc" for task in tasks] + [f"{task} R@P90" for task in tasks]
    header += ["mean acc", "mean R@P90"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for variant in variants:
        cells = [VARIANT_NAMES.get(variant, variant) + f" (`{variant}`)"]
        cells += [_cell(value(variant, *column), variant in best[column]) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def robustness_table(results: dict[str, dict[str, dict]]) -> str:
    """Mean accuracy (percent) clean and under each perturbation, with the drop from clean.
    results: variant -> perturb -> metrics.json content."""
    variants = [v for v in VARIANTS if v in results] + [v for v in results if v not in VARIANTS]
    perturbs = [p for p in PERTURBATIONS if p != "none"]
    header = ["variant", "clean"] + [f"{p} (drop)" for p in perturbs]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for variant in variants:
        clean = results[variant]["none"]["mean"]["accuracy"]
        cells = [f"`{variant}`", _cell(clean)]
        for perturb in perturbs:
            accuracy = results[variant].get(perturb, {}).get("mean", {}).get("accuracy")
            if accuracy is None or clean is None:
                cells.append("-")
            else:
                cells.append(f"{_cell(accuracy)} ({100 * (accuracy - clean):+.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_markdown(results: dict[str, dict[str, dict]], *, command: str, budget: str, split: str,
                      samples: int) -> str:
    return "\n".join([
        "# Ablation (the paper's Table 6)",
        "",
        f"Command: `{command}`",
        "",
        f"Budget, the same for every variant: {budget}. Evaluated on split `{split}` ({samples} samples, "
        "each counted once).",
        "",
        "Accuracy and recall at 90% precision (R@P90), in percent; best of each column in bold.",
        "",
        table6({variant: by_perturb["none"] for variant, by_perturb in results.items()}),
        "",
        "## Robustness",
        "",
        "Mean accuracy over tasks (percent) on the same split with every title removed (`no-text`), "
        "every image removed (`no-image`), or 30% of each title's words dropped at random (`drop-words`, "
        "seeded); in brackets the change from clean.",
        "",
        robustness_table(results),
        "",
    ])


# ---- running the variants --------------------------------------------------------------------------

def train_command(launcher: list[str], config: str, overrides: list[str]) -> list[str]:
    return [*launcher, "-m", "cmaclip.train", "--config", config, *overrides]


def evaluate_variant(run_dir: Path, shards: str, split: str, perturbs, batch_size: int, loader: str) -> dict:
    """Clean and perturbed metrics of one trained variant, in this process (one model load)."""
    from cmaclip.data.config import DataConfig
    from cmaclip.data.loader import build_loader
    from cmaclip.evaluate import check_tasks, evaluate_model, load_model

    model = load_model(run_dir)
    eval_loader = build_loader(shards, split, config=DataConfig(loader=loader), batch_size=batch_size,
                               image_size=model.config.image_size, train=False)
    check_tasks(model.tasks, eval_loader.dataset.tasks, run_dir, shards)
    results = {}
    for perturb in perturbs:
        result = evaluate_model(model, eval_loader, perturb=perturb, pictures=0)
        results[perturb] = {**result.to_json(), "split": split}
        write_json_atomic(run_dir / METRICS_FILE.format(perturb=perturb), results[perturb])
    return results


def load_variant_metrics(run_dir: Path, perturbs) -> dict | None:
    """The saved metrics of a finished variant, or None if any is missing."""
    paths = [run_dir / METRICS_FILE.format(perturb=perturb) for perturb in perturbs]
    if not all(path.is_file() for path in paths):
        return None
    return {perturb: json.loads(path.read_text()) for perturb, path in zip(perturbs, paths)}


def ablate(config_path: str, shards: str, overrides: list[str], *, variants=VARIANTS, launcher: list[str] = (),
           split: str = "val", eval_batch_size: int = 64, robustness: bool = True,
           log=lambda message: print(message, flush=True)) -> Path:
    """Train and evaluate `variants`; returns the path of ablation.md."""
    from cmaclip.config import load_config

    overrides = [*overrides, f"data.shards={shards}"]
    base = load_config(config_path, overrides)  # fail on a bad key before training anything
    output_dir = Path(base.output_dir)
    launcher = list(launcher) or [sys.executable]
    perturbs = list(PERTURBATIONS) if robustness else ["none"]
    results = {}
    for number, variant in enumerate(variants, start=1):
        run_dir = output_dir / variant
        saved = load_variant_metrics(run_dir, perturbs)
        if saved is not None:
            log(f"[{number}/{len(variants)}] {variant}: already trained and evaluated in {run_dir}, reusing")
            results[variant] = saved
            continue
        command = train_command(launcher, config_path, [*overrides, f"model.fusion={variant}",
                                                        f"output_dir={run_dir}"])
        log(f"[{number}/{len(variants)}] {variant}: training: {shlex.join(command)}")
        started = time.perf_counter()
        completed = subprocess.run(command)
        if completed.returncode != 0:
            raise RuntimeError(f"training variant {variant!r} failed (exit {completed.returncode}); "
                               f"its output is above; the command was: {shlex.join(command)}")
        log(f"[{number}/{len(variants)}] {variant}: trained in {time.perf_counter() - started:.0f} s; evaluating")
        results[variant] = evaluate_variant(run_dir, shards, split, perturbs, eval_batch_size, base.data.loader)
        log(f"[{number}/{len(variants)}] {variant}: mean accuracy "
            f"{results[variant]['none']['mean']['accuracy']:.3f}")

    world = launcher_world_size(launcher)
    budget = (f"{base.train.max_steps} steps x batch {base.train.batch_size} per process x "
              f"{base.train.grad_accum_steps} accumulation x {world} process(es), lr {base.optim.lr:g} "
              f"(backbone {base.optim.backbone_lr:g}), seed {base.train.seed}, model.preset={base.model.preset}"
              + (f", pretrained {base.model.pretrained}" if base.model.pretrained else ", random init"))
    command = shlex.join(["cmaclip", "ablate", "--config", config_path, "--shards", shards,
                          *(["--launcher", shlex.join(launcher)] if launcher != [sys.executable] else []),
                          *[o for o in overrides if not o.startswith("data.shards=")]])
    samples = next(iter(results.values()))["none"]["samples"]
    markdown = ablation_markdown(results, command=command, budget=budget, split=split, samples=samples)
    path = output_dir / "ablation.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    write_json_atomic(output_dir / "ablation.json", {"command": command, "budget": budget, "split": split,
                                                     "results": results})
    return path


def launcher_world_size(launcher: list[str]) -> str:
    """The process count a launcher asks for, as far as its command line says (for the report)."""
    if "--num_processes" in launcher:
        return launcher[launcher.index("--num_processes") + 1]
    if "--config_file" in launcher:
        import yaml

        try:
            config = yaml.safe_load(Path(launcher[launcher.index("--config_file") + 1]).read_text())
            return str(config.get("num_processes", 1))
        except (OSError, yaml.YAMLError, AttributeError):
            return "?"
    return "1"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="cmaclip ablate", description=__doc__.split("\n")[0],
                                     epilog="overrides: key.sub=value pairs applied to every variant")
    parser.add_argument("--config", required=True, help="the YAML recipe every variant trains with")
    parser.add_argument("--shards", required=True, help="a folder written by `cmaclip shards`")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all five)")
    parser.add_argument("--launcher", default="",
                        help='how to start each training, e.g. "accelerate launch --config_file '
                             'launchers/accelerate/cpu.yaml" (default: one process of this Python)')
    parser.add_argument("--split", default="val", choices=("val", "test", "train"), help="evaluation split")
    parser.add_argument("--no-robustness", action="store_true", help="skip the perturbed evaluations")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from cmaclip.config import ConfigError

    try:
        path = ablate(args.config, args.shards, args.overrides, variants=args.variants,
                      launcher=shlex.split(args.launcher), split=args.split, robustness=not args.no_robustness)
    except (ConfigError, RuntimeError, FileNotFoundError) as error:
        print(f"cmaclip ablate: {error}", file=sys.stderr)
        sys.exit(2)
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
