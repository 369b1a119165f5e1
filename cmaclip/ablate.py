"""`cmaclip ablate`: the paper's Table 6. Train the five `model.fusion` variants with one recipe,
budget and seed, evaluate each, and write output_dir/ablation.md (+ ablation.json).

    cmaclip ablate --config configs/cpu-demo.yaml --shards demo-out/shards [key.sub=value ...]
    cmaclip ablate ... --launcher "accelerate launch --config_file launchers/accelerate/cpu.yaml"

Each variant trains in its own process (the training entry point, `-m cmaclip.train`, started with
`--launcher`, default: one plain process) under output_dir/<variant>/, with the same YAML and
overrides plus `model.fusion=<variant>`. Only the fusion differs: same steps, batch size, learning
rates, seed, data order. The resolved recipe is written once to output_dir/ablation-config.yaml
and every variant trains from it. Then each exported model is evaluated on `--split`, clean and under the
robustness perturbations (title removed, image removed, 30% of title words dropped), and the
tables are written. A variant whose metrics are already in its folder is not retrained, so an
interrupted ablation continues where it stopped (delete the folder to redo one).

`--seeds 0,1,2` repeats every variant with each seed (`train.seed`: initial weights, data order,
augmentation) under output_dir/<variant>/seed<k>/ and reports mean ± standard deviation over
the seeds: on a small evaluation split, single runs of close variants differ by noise.
`--draws 5` (the default) averages `drop-words` over that many draws of the dropped words (seeds
0..N-1) for the same reason: one draw on a few hundred products moves a variant's drop by +-0.5.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cmaclip.data.format import SPLITS
from cmaclip.errors import command
from cmaclip.evaluate import PERTURBATIONS
from cmaclip.files import write_json_atomic
from cmaclip.model.config import FUSIONS

VARIANT_NAMES = {
    "image": "image only (CLIP image encoder)",
    "text": "text only (CLIP text encoder)",
    "concat": "CLIP, concatenated embeddings",
    "cma-no-modality": "CMA-CLIP without modality attention",
    "cma": "CMA-CLIP",
}
METRICS_FILE = "metrics-{perturb}.json"
DRAWN = "drop-words"  # the perturbation that is random, so evaluated over several draws
FROZEN_CONFIG = "ablation-config.yaml"


# ---- tables ----------------------------------------------------------------------------------------

def _cell(value, best: bool = False, spread=None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}" + ("" if spread is None else f" ± {100 * spread:.1f}")
    return f"**{text}**" if best else text


def average_runs(runs: list[dict]) -> dict:
    """Several seeds' metrics.json contents -> the same layout holding the means, plus "std"
    (same layout, sample standard deviations; None for a single run) and "runs"."""
    def combine(values, reduce):
        present = [v for v in values if v is not None]
        return reduce(present) if present else None

    def over_runs(reduce):
        tasks = {task: {metric: combine([run["tasks"][task][metric] for run in runs], reduce)
                        for metric in runs[0]["tasks"][task] if metric != "n"}
                 for task in runs[0]["tasks"]}
        mean = {metric: combine([run["mean"][metric] for run in runs], reduce) for metric in runs[0]["mean"]}
        return {"tasks": tasks, "mean": mean}

    averaged = over_runs(lambda values: float(np.mean(values)))
    spread = over_runs(lambda values: float(np.std(values, ddof=1))) if len(runs) > 1 else None
    weights = {task: {modality: float(np.mean([run["modality_weights"][task][modality] for run in runs]))
                      for modality in runs[0]["modality_weights"][task]}
               for task in runs[0].get("modality_weights", {})}
    def overruled(name):  # the share of each task where the fused answer overrules this modality alone
        saved = [run["unimodal"][name].get("overruled") for run in runs]
        if any(part is None for part in saved):  # a run evaluated before it was measured
            return {}
        return {"overruled": {"tasks": {task: combine([part["tasks"][task] for part in saved], np.mean)
                                        for task in saved[0]["tasks"]},
                              "mean": combine([part["mean"] for part in saved], np.mean)}}

    unimodal = {name: {"mean": combine([run["unimodal"][name]["mean"] for run in runs], np.mean), **overruled(name)}
                for name in runs[0].get("unimodal", {})}
    return {**averaged, "std": spread, "runs": len(runs), "samples": runs[0].get("samples"),
            "modality_weights": weights, "unimodal": unimodal}


def _best(values: dict[str, float | None]) -> set[str]:
    present = {key: value for key, value in values.items() if value is not None}
    if not present:
        return set()
    top = max(present.values())
    return {key for key, value in present.items() if abs(value - top) < 1e-12}


def table6(results: dict[str, dict]) -> str:
    """Per-task accuracy and recall at 90% precision (percent) of each variant, and the means;
    the best value of each column in bold. results: variant -> clean metrics.json content, or
    average_runs() of several seeds (then cells read mean ± std)."""
    variants = [v for v in FUSIONS if v in results] + [v for v in results if v not in FUSIONS]
    tasks = list(next(iter(results.values()))["tasks"])
    columns = [(task, "accuracy") for task in tasks] + [(task, "recall_at_p90") for task in tasks]
    columns += [("mean", "accuracy"), ("mean", "recall_at_p90")]

    def value(variant, task, metric, key=None):
        metrics = results[variant] if key is None else results[variant].get(key)
        if metrics is None:
            return None
        return (metrics["mean"] if task == "mean" else metrics["tasks"][task]).get(metric)

    best = {column: _best({v: value(v, *column) for v in variants}) for column in columns}
    header = ["variant"] + [f"{task} acc" for task in tasks] + [f"{task} R@P90" for task in tasks]
    header += ["mean acc", "mean R@P90"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for variant in variants:
        cells = [VARIANT_NAMES.get(variant, variant) + f" (`{variant}`)"]
        cells += [_cell(value(variant, *column), variant in best[column], value(variant, *column, key="std"))
                  for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def robustness_table(results: dict[str, dict[str, dict]]) -> str:
    """Mean accuracy (percent) clean and under each perturbation, with the drop from clean.
    results: variant -> perturb -> metrics.json content."""
    variants = [v for v in FUSIONS if v in results] + [v for v in results if v not in FUSIONS]
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


def modality_weights_table(results: dict[str, dict]) -> str:
    """The mean image weight per task (the text weight is 1 minus it) of `cma`, the variant with
    modality attention, on the clean split ("" without it). results: variant -> clean metrics."""
    weights = results.get("cma", {}).get("modality_weights")
    if not weights:
        return ""
    return "\n".join(["| variant | " + " | ".join(f"{task} image weight" for task in weights) + " |",
                      "|---|" + "---:|" * len(weights),
                      "| `cma` | " + " | ".join(f"{w['image']:.2f}" for w in weights.values()) + " |"])


def overruled_table(results: dict[str, dict[str, dict]]) -> str:
    """Per task (clean split), the percent of products with a title and a photo where the text
    alone / the image alone is right and the fused answer wrong. results: variant -> perturb -> metrics."""
    alone_by_variant = {variant: by_perturb["none"].get("unimodal", {}) for variant, by_perturb in results.items()}
    rows = {variant: alone for variant, alone in alone_by_variant.items()
            if alone and all("overruled" in modality for modality in alone.values())}
    if not rows:
        return ""
    tasks = list(next(iter(rows.values()))["text"]["overruled"]["tasks"])
    lines = ["| variant | " + " | ".join(f"{task} text / image" for task in tasks) + " | mean text / image |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for variant, alone in rows.items():
        cells = [" / ".join(_cell(alone[name]["overruled"]["tasks"][task]) for name in ("text", "image"))
                 for task in tasks]
        cells.append(" / ".join(_cell(alone[name]["overruled"]["mean"]) for name in ("text", "image")))
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def each_modality_alone_table(results: dict[str, dict[str, dict]]) -> str:
    """Mean accuracy (percent) of the fused prediction and of the model's prediction from the text
    alone and from the image alone (variants trained on each alone), clean and under each
    perturbation (each alone is scored on the samples that have its modality). results: variant ->
    perturb -> metrics."""
    variants = [v for v in results if results[v]["none"].get("unimodal")]
    if not variants:
        return ""
    perturbs = [p for p in PERTURBATIONS if all(p in results[v] for v in variants)]
    lines = ["| variant | " + " | ".join(f"{p} fused / text alone / image alone" for p in perturbs) + " |",
             "|---|" + "---:|" * len(perturbs)]
    for variant in variants:
        cells = []
        for perturb in perturbs:
            metrics = results[variant][perturb]
            alone = [metrics["unimodal"].get(name, {}).get("mean") for name in ("text", "image")]
            cells.append(" / ".join(_cell(value) for value in [metrics["mean"]["accuracy"], *alone]))
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_markdown(results: dict[str, dict[str, dict]], *, command: str, budget: str, split: str,
                      samples: int, seeds: list[int], draws: int = 1) -> str:
    """results: variant -> perturbation -> metrics (one run's, or average_runs() of the seeds)."""
    over_seeds = (f" Mean ± standard deviation over seeds {', '.join(map(str, seeds))}." if len(seeds) > 1
                  else "")
    drawn = f"the mean over {draws} seeded draws" if draws > 1 else "one seeded draw"
    weights = modality_weights_table({variant: by_perturb["none"] for variant, by_perturb in results.items()})
    alone = each_modality_alone_table(results)
    overruled = overruled_table(results)
    return "\n".join([
        "# Ablation (the paper's Table 6)",
        "",
        f"Command: `{command}`",
        "",
        f"Budget, the same for every variant: {budget}. Evaluated on split `{split}` ({samples} samples, "
        "each counted once).",
        "",
        f"Accuracy and recall at 90% precision (R@P90), in percent; best of each column in bold.{over_seeds}",
        "",
        table6({variant: by_perturb["none"] for variant, by_perturb in results.items()}),
        "",
        "## Robustness",
        "",
        "Mean accuracy over tasks (percent) on the same split with every title removed (`no-text`), "
        "every image removed (`no-image`), or 30% of each title's words dropped at random (`drop-words`, "
        f"{drawn}); in brackets the change "
        "from clean.",
        "",
        robustness_table(results),
        "",
        *(["## Modality weights", "",
           "Mean weight of the image per task in the modality attention (clean split); the text gets "
           "the rest. A task that only the photo carries should lean on the image, and one that only "
           "the title carries on the text.", "", weights, ""] if weights else []),
        *(["## Each modality alone", "",
           "Mean accuracy of the fused prediction and of the same model given only the text or only the "
           "image (the other masked: what a product without a photo or a title gets; trained with "
           "`model.unimodal_loss_weight`); each alone counts the samples that have its modality.", "", alone, ""]
          if alone else []),
        *(["## Where the fusion overrules one modality", "",
           "Percent of the products with a title and a photo (clean split) where the model's answer from "
           "the text alone / the image alone is right and its fused answer wrong. Near 0 when the fusion "
           "uses each modality where it carries the answer; a task whose titles often do not name it, "
           "answered wrong where the photo alone was right, shows as a high image share.", "", overruled, ""]
          if overruled else []),
    ])


# ---- running the variants --------------------------------------------------------------------------

def train_command(launcher: list[str], config: str, overrides: list[str]) -> list[str]:
    """The launcher's program is looked up on PATH, then next to this Python (a venv's
    `accelerate` works without activating the venv)."""
    program = launcher[0]
    beside_python = Path(sys.executable).parent / program
    if shutil.which(program) is None and beside_python.is_file():
        program = str(beside_python)
    return [program, *launcher[1:], "-m", "cmaclip.train", "--config", config, *overrides]


def evaluate_variant(run_dir: Path, shards: str, split: str, perturbs, batch_size: int, loader: str,
                     draws: int) -> dict:
    """Clean and perturbed metrics of one trained variant, in this process (one model load); the
    random perturbation averaged over `draws` draws (its file says how many, and their spread)."""
    from cmaclip.checkpoint import load_model
    from cmaclip.data.config import DataConfig
    from cmaclip.data.loader import build_loader
    from cmaclip.evaluate import check_model_fits_shards, evaluate_model

    model = load_model(run_dir)
    eval_loader = build_loader(shards, split, config=DataConfig(loader=loader), batch_size=batch_size,
                               image_size=model.config.image_size, train=False)
    check_model_fits_shards(model.tasks, eval_loader.dataset.tasks, run_dir, shards)
    results = {}
    for perturb in perturbs:
        if perturb == DRAWN:
            result = average_runs([evaluate_model(model, eval_loader, perturb=perturb, seed=draw, pictures=0)
                                   .to_json() for draw in range(draws)])
            result["draws"], result["draw_std"] = result.pop("runs"), result.pop("std")
        else:
            result = evaluate_model(model, eval_loader, perturb=perturb, pictures=0).to_json()
        results[perturb] = {**result, "split": split}
        write_json_atomic(run_dir / METRICS_FILE.format(perturb=perturb), results[perturb])
    return results


def load_variant_metrics(run_dir: Path, perturbs) -> dict | None:
    """The saved metrics of a finished variant, or None if any is missing."""
    paths = [run_dir / METRICS_FILE.format(perturb=perturb) for perturb in perturbs]
    if not all(path.is_file() for path in paths):
        return None
    return {perturb: json.loads(path.read_text()) for perturb, path in zip(perturbs, paths)}


def saved_draws(metrics: dict) -> int | None:
    """How many draws a variant's saved random perturbation was averaged over (1: before --draws)."""
    return metrics[DRAWN].get("draws", 1) if DRAWN in metrics else None


def freeze_config(config, path: Path) -> Path:
    """Write the resolved recipe once; every variant trains from this file, so an edit of the YAML
    while the ablation runs cannot give variants different budgets. An output_dir that already
    holds an ablation of another recipe is refused (its finished variants would be reused)."""
    from cmaclip.config import ConfigError, to_yaml

    text = to_yaml(config)
    if path.is_file() and path.read_text() != text:
        raise ConfigError(f"{path.parent} holds an ablation with another recipe ({path}); "
                          "use another output_dir, or delete that folder to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def train_and_evaluate(run_dir: Path, variant: str, label: str, *, launcher, config_path, overrides, shards,
                       split, perturbs, eval_batch_size, loader, draws, log) -> dict:
    """One variant with one seed (its metrics reused when already there). -> perturbation -> metrics."""
    saved = load_variant_metrics(run_dir, perturbs)
    if saved is not None and saved_draws(saved) in (None, draws):
        log(f"{label}: already trained and evaluated in {run_dir}, reusing")
        return saved
    if saved is not None:
        log(f"{label}: already trained in {run_dir}; evaluating again ({draws} draws of {DRAWN}, "
            f"{saved_draws(saved)} saved)")
        return evaluate_variant(run_dir, shards, split, perturbs, eval_batch_size, loader, draws)
    command = train_command(launcher, config_path, [*overrides, f"model.fusion={variant}", f"output_dir={run_dir}"])
    log(f"{label}: training: {shlex.join(command)}")
    started = time.perf_counter()
    completed = subprocess.run(command)
    if completed.returncode != 0:
        raise RuntimeError(f"training variant {variant!r} failed (exit {completed.returncode}); "
                           f"its output is above; the command was: {shlex.join(command)}")
    log(f"{label}: trained in {time.perf_counter() - started:.0f} s; evaluating")
    results = evaluate_variant(run_dir, shards, split, perturbs, eval_batch_size, loader, draws)
    log(f"{label}: mean accuracy {results['none']['mean']['accuracy']:.3f}")
    return results


def ablate(config_path: str, shards: str, overrides: list[str], *, variants=FUSIONS, seeds: list[int] | None = None,
           launcher: list[str] = (), split: str = "val", eval_batch_size: int = 64, robustness: bool = True,
           draws: int = 5, log=lambda message: print(message, flush=True)) -> Path:
    """Train and evaluate `variants` (with each of `seeds`, default: the config's train.seed);
    returns the path of ablation.md."""
    from cmaclip.config import load_config

    overrides = [*overrides, f"data.shards={shards}"]
    base = load_config(config_path, overrides)  # fail on a bad key before training anything
    output_dir = Path(base.output_dir)
    frozen = freeze_config(base, output_dir / FROZEN_CONFIG)
    launcher = list(launcher) or [sys.executable]
    perturbs = list(PERTURBATIONS) if robustness else ["none"]
    several = seeds is not None and len(seeds) > 1
    seeds = list(seeds) if seeds else [base.train.seed]
    results = {}
    for number, variant in enumerate(variants, start=1):
        runs = []
        for seed in seeds:
            label = f"[{number}/{len(variants)}] {variant}" + (f" seed {seed}" if several else "")
            runs.append(train_and_evaluate(
                output_dir / variant / f"seed{seed}" if several else output_dir / variant, variant, label,
                launcher=launcher, config_path=str(frozen), overrides=[f"train.seed={seed}"],
                shards=shards, split=split, perturbs=perturbs, eval_batch_size=eval_batch_size,
                loader=base.data.loader, draws=draws, log=log))
        results[variant] = {perturb: average_runs([run[perturb] for run in runs]) if several else runs[0][perturb]
                            for perturb in perturbs}

    world = launcher_world_size(launcher)
    budget = (f"{base.train.max_steps} steps x batch {base.train.batch_size} per process x "
              f"{base.train.grad_accum_steps} accumulation x {world} process(es), lr {base.optim.lr:g} "
              f"(backbone {base.optim.backbone_lr:g}), model.preset={base.model.preset}"
              + (f", pretrained {base.model.pretrained}" if base.model.pretrained else ", random init")
              + f", seed{'s' if several else ''} {', '.join(map(str, seeds))}")
    command = shlex.join(["cmaclip", "ablate", "--config", config_path, "--shards", shards,
                          *(["--seeds", ",".join(map(str, seeds))] if several else []),
                          *(["--draws", str(draws)] if robustness else []),
                          *(["--launcher", shlex.join(launcher)] if launcher != [sys.executable] else []),
                          *[o for o in overrides if not o.startswith("data.shards=")]])
    samples = next(iter(results.values()))["none"]["samples"]
    markdown = ablation_markdown(results, command=command, budget=budget, split=split, samples=samples, seeds=seeds,
                                 draws=draws)
    path = output_dir / "ablation.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    write_json_atomic(output_dir / "ablation.json", {"command": command, "budget": budget, "split": split,
                                                     "seeds": seeds, "results": results})
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
    parser.add_argument("--variants", default=",".join(FUSIONS),
                        help=f"comma-separated subset of {','.join(FUSIONS)} (default: all five)")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values, e.g. 0,1,2: every variant "
                                                     "runs with each and the tables show mean ± std (default: "
                                                     "the config's seed, one run)")
    parser.add_argument("--launcher", default="",
                        help='how to start each training, e.g. "accelerate launch --config_file '
                             'launchers/accelerate/cpu.yaml" (default: one process of this Python)')
    parser.add_argument("--split", default="val", choices=SPLITS, help="evaluation split")
    parser.add_argument("--no-robustness", action="store_true", help="skip the perturbed evaluations")
    parser.add_argument("--draws", type=int, default=5,
                        help=f"{DRAWN} is averaged over this many draws of the dropped words (default 5)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()] or None
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    unknown = [v for v in args.variants if v not in FUSIONS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(FUSIONS)}")
    if args.draws < 1:
        parser.error(f"--draws: must be >= 1, got {args.draws}")
    return args


@command("cmaclip ablate")
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from cmaclip.config import ConfigError

    try:
        path = ablate(args.config, args.shards, args.overrides, variants=args.variants, seeds=args.seeds,
                      launcher=shlex.split(args.launcher), split=args.split, robustness=not args.no_robustness,
                      draws=args.draws)
    except (ConfigError, RuntimeError, FileNotFoundError) as error:
        print(f"cmaclip ablate: {error}", file=sys.stderr)
        sys.exit(2)
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
