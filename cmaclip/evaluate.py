"""Evaluation: run a model over a split, count each sample once, compute the metrics; `cmaclip eval`.

    result = evaluate_model(model, loader, accelerator)   # every rank calls it (the trainer too)
    log_evaluation(writer, result, step)                    # rank 0: TensorBoard scalars + images
    print(result.summary())

Distributed: every rank runs its own share of the split (the loader shards it and pads with
index -1 so that all ranks run the same number of forwards, which ZeRO-3 needs), then the
per-sample predictions of all ranks are gathered to every rank, padding is dropped and duplicate
indices are kept once. The metrics are therefore identical on every rank and count each sample
of the split exactly once, whatever the world size.

Robustness (the paper's noise claim): `perturb` changes the batch before the forward:
`no-text` empties every title (as the shards store a product without a title), `no-image`
removes every image (as a text-only product), `drop-words` drops 30% of each title's words at
random, seeded per sample so that the same words go whatever the world size or batch size.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cmaclip.calibration import Calibration, auto_fill_report, format_report
from cmaclip.data.batch import model_inputs
from cmaclip.data.config import LOADERS, DataConfig
from cmaclip.data.format import (EOT_TOKEN_ID, IMAGE, MODALITIES, PAD_TOKEN_ID, SOT_TOKEN_ID, SPLITS, TEXT,
                                 attention_mask_from_tokens, load_dataset_info)
from cmaclip.data.loader import build_loader
from cmaclip.errors import DataError, command
from cmaclip.files import write_json_atomic
from cmaclip.metrics import (DEFAULT_PRECISIONS, accuracy, class_table, confusion_matrix, mean_over_tasks,
                             task_metrics)
from cmaclip.pictures import confusion_image, draw_explanation, piece_at, relevant_tokens, title_pieces, unnormalize

PERTURBATIONS = ("none", "no-text", "no-image", "drop-words")
DROP_WORDS_FRACTION = 0.3


@dataclass
class EvalResult:
    """One evaluation. `metrics` is metrics.json's core: {"tasks": {task: {...}}, "mean": {...}}."""

    metrics: dict
    confusion: dict[str, np.ndarray]
    class_names: dict[str, list[str]]
    modality_weights: dict[str, dict[str, float]]  # task -> mean weight per modality
    num_samples: int
    perturb: str = "none"
    pictures: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, uint8 HWC)
    unimodal: dict = field(default_factory=dict)
    """The model's accuracy from each modality alone (fused variants trained with
    model.unimodal_loss_weight > 0): {"text" | "image": {"tasks": {task:
    accuracy}, "mean": accuracy, "overruled": {"tasks": {task: share}, "mean": share}}}, the
    accuracy over the samples that have the modality; `overruled` (see unimodal_accuracy) over
    those that have both."""
    auto_fill: dict | None = None  # with a calibration: {task: accepted precision, coverage, ...}

    def class_tables(self) -> dict[str, list[dict]]:
        return {task: class_table(self.confusion[task], self.class_names[task]) for task in self.confusion}

    def to_json(self) -> dict:
        """metrics.json: the INTERFACE.md keys plus the modality weights and per-class tables."""
        return {**self.metrics, "samples": self.num_samples, "perturb": self.perturb,
                "modality_weights": self.modality_weights, "unimodal": self.unimodal,
                "classes": self.class_tables(),
                **({"auto_fill": self.auto_fill} if self.auto_fill is not None else {})}

    def summary(self) -> str:
        """One line for logs: the means, then each task's accuracy."""
        mean = self.metrics["mean"]
        tasks = " | ".join(f"{task} {_fmt(m['accuracy'])}" for task, m in self.metrics["tasks"].items())
        alone = "".join(f" | {name} alone {_fmt(accuracy['mean'])}" for name, accuracy in self.unimodal.items())
        return (f"eval ({self.num_samples} samples{'' if self.perturb == 'none' else ', ' + self.perturb}): "
                f"mean accuracy {_fmt(mean['accuracy'])}, recall@p90 {_fmt(mean['recall_at_p90'])} | {tasks}{alone}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---- perturbations ---------------------------------------------------------------------------------

def _titles_removed(batch: dict) -> dict:
    input_ids = torch.zeros_like(batch["input_ids"])
    input_ids[:, 0], input_ids[:, 1] = SOT_TOKEN_ID, EOT_TOKEN_ID
    attention_mask = torch.zeros_like(batch["attention_mask"])
    attention_mask[:, :2] = 1
    modality_mask = batch["modality_mask"].clone()
    modality_mask[:, TEXT] = False
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "modality_mask": modality_mask}


def _images_removed(batch: dict) -> dict:
    modality_mask = batch["modality_mask"].clone()
    modality_mask[:, IMAGE] = False
    return {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"]), "modality_mask": modality_mask}


def word_end_table(context_length: int) -> np.ndarray:
    """bool [vocab]: token id ends a word (CLIP BPE marks a word's last piece with </w>)."""
    from cmaclip.data.tokenizer import load_tokenizer

    hf = load_tokenizer(context_length).hf
    tokens = hf.convert_ids_to_tokens(list(range(len(hf))))
    return np.array([token.endswith("</w>") for token in tokens])


def drop_words(ids: np.ndarray, keep_word, word_end: np.ndarray) -> np.ndarray:
    """One token row [SOT, pieces..., EOT, 0...] with the words for which keep_word() is False
    removed; a word is a run of pieces ending in a </w> piece."""
    ids = np.asarray(ids)
    end = int(np.flatnonzero(ids == EOT_TOKEN_ID)[0]) if (ids == EOT_TOKEN_ID).any() else len(ids)
    kept, word = [], []
    for token in ids[1:end]:
        word.append(int(token))
        if word_end[token]:
            if keep_word():
                kept += word
            word = []
    if word and keep_word():
        kept += word
    out = np.full_like(ids, PAD_TOKEN_ID)
    out[0], out[1:len(kept) + 1], out[len(kept) + 1] = SOT_TOKEN_ID, kept, EOT_TOKEN_ID
    return out


def _words_dropped(batch: dict, seed: int, word_end: np.ndarray) -> dict:
    rows = batch["input_ids"].cpu().numpy()
    out = rows.copy()
    for row, (ids, index) in enumerate(zip(rows, batch["index"].tolist())):
        rng = np.random.default_rng([seed, index + 1])  # per sample: same words whatever the batching
        out[row] = drop_words(ids, lambda: rng.random() >= DROP_WORDS_FRACTION, word_end)
    input_ids = torch.from_numpy(out).to(batch["input_ids"].device)
    attention_mask = torch.from_numpy(attention_mask_from_tokens(out)).to(batch["attention_mask"].device)
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask}


def perturb_batch(batch: dict, perturb: str, seed: int = 0, word_end: np.ndarray | None = None) -> dict:
    if perturb == "none":
        return batch
    if perturb == "no-text":
        return _titles_removed(batch)
    if perturb == "no-image":
        return _images_removed(batch)
    if perturb == "drop-words":
        return _words_dropped(batch, seed, word_end)
    raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")


# ---- running the model -----------------------------------------------------------------------------

def all_gather(value) -> list:
    """Every rank's `value` (any picklable object), on every rank; [value] in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_to_all(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each rank's arrays on every rank (any lengths)."""
    gathered = all_gather(arrays)
    return {key: np.concatenate([part[key] for part in gathered]) for key in arrays}


def unique_samples(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop padding (index -1) and repeated indices; order by sample index."""
    index = arrays["index"]
    _, first = np.unique(np.where(index >= 0, index, -1), return_index=True)
    first = first[index[first] >= 0]
    return {key: values[first] for key, values in arrays.items()}


@torch.no_grad()
def predict_split(model, loader, tasks: list[str], *, accelerator=None, perturb: str = "none", seed: int = 0,
                  progress: bool = False, calibration=None) -> tuple[dict[str, np.ndarray], dict | None]:
    """This rank's per-sample predictions: index [N], labels/predicted/confidence [N, K],
    modality_weights [N, K, 2], with a calibration also accepted [N, K] (auto-fill); and its
    first batch, unperturbed (for attention pictures: the loader is iterated once per evaluation,
    as a second `iter` would start mid-epoch)."""
    word_end = word_end_table(loader.dataset.context_length) if perturb == "drop-words" else None
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    parts = {"index": [], "labels": [], "predicted": [], "confidence": [], "modality_weights": []}
    batches = iter(loader)
    if progress:
        from tqdm import tqdm

        # in a terminal the bar goes away when done; in a log file (no terminal to erase it) it ends
        # its line, or what is printed next would continue that line
        batches = tqdm(batches, total=len(loader), desc=f"eval{'' if perturb == 'none' else ' ' + perturb}",
                       leave=not sys.stderr.isatty(), dynamic_ncols=True)
    first_batch = None
    for batch in batches:
        first_batch = batch if first_batch is None else first_batch
        batch = perturb_batch(batch, perturb, seed, word_end)
        with autocast():
            output = model(**model_inputs(batch), unimodal=True)
        # per task: the predicted class and its softmax probability
        confidence, predicted = zip(*(output.logits[task].float().softmax(dim=-1).max(dim=-1) for task in tasks))
        parts["index"].append(batch["index"].cpu().numpy())
        parts["labels"].append(batch["labels"].cpu().numpy())
        parts["predicted"].append(torch.stack(predicted, dim=1).cpu().numpy())
        parts["confidence"].append(torch.stack(confidence, dim=1).cpu().numpy())
        parts["modality_weights"].append(output.modality_weights.float().cpu().numpy())
        for name, alone_logits in output.unimodal_logits.items():  # fused variants trained on each modality alone
            predicted = torch.stack([alone_logits[task].argmax(dim=-1) for task in tasks], dim=1)
            parts.setdefault(f"predicted_{name}", []).append(predicted.cpu().numpy())
            parts.setdefault(f"has_{name}", []).append(batch["modality_mask"][:, MODALITIES.index(name)].cpu().numpy())
        if calibration is not None:
            accepted = [calibration.decide(task, loader.dataset.tasks[task], output.logits[task].float().cpu().numpy())[2]
                        for task in tasks]
            parts.setdefault("accepted", []).append(np.stack(accepted, axis=1))
    if first_batch is None:
        raise ValueError(f"the {loader.dataset.root} loader yielded no batch on this rank")
    return {key: np.concatenate(values) for key, values in parts.items()}, first_batch


def evaluate_model(model, loader, accelerator=None, *, perturb: str = "none", seed: int = 0,
                   precisions=DEFAULT_PRECISIONS, pictures: int = 3, progress: bool = False,
                   calibration=None) -> EvalResult:
    """Evaluate on the loader's split. Call it on EVERY rank (collectives inside); the result is the
    same everywhere. `pictures` > 0 adds that many attention pictures (pictures.py) of products from
    the first batches (one extra forward per rank, as ZeRO-3 needs). A `calibration`
    (calibration.Calibration) adds `auto_fill`: the accepted predictions' precision and coverage."""
    tasks = loader.dataset.task_names
    was_training = model.training
    model.eval()
    try:
        local, first_batch = predict_split(model, loader, tasks, accelerator=accelerator, perturb=perturb,
                                           seed=seed, progress=progress, calibration=calibration)
        drawn = []
        if pictures > 0 and perturb == "none":
            drawn = attention_pictures(model, first_batch, loader.dataset.context_length, pictures, accelerator)
    finally:
        model.train(was_training)
    samples = unique_samples(gather_to_all(local))
    per_task, confusion, weights = {}, {}, {}
    for k, task in enumerate(tasks):
        classes = loader.dataset.tasks[task]
        labels, predicted = samples["labels"][:, k], samples["predicted"][:, k]
        per_task[task] = task_metrics(labels, predicted, samples["confidence"][:, k], len(classes), precisions)
        labelled = labels >= 0
        confusion[task] = confusion_matrix(labels[labelled], predicted[labelled], len(classes))
        mean_weights = samples["modality_weights"][:, k].mean(axis=0) if len(labels) else np.zeros(2)
        weights[task] = {name: float(mean_weights[m]) for m, name in enumerate(MODALITIES)}
    return EvalResult(
        unimodal=unimodal_accuracy(samples, tasks),
        metrics={"tasks": per_task, "mean": mean_over_tasks(per_task)},
        confusion=confusion,
        class_names={task: list(loader.dataset.tasks[task]) for task in tasks},
        modality_weights=weights,
        num_samples=int(len(samples["index"])),
        perturb=perturb,
        pictures=drawn,
        auto_fill=None if calibration is None else {
            "target_precision": calibration.target_precision,
            "tasks": auto_fill_report(samples["labels"], samples["predicted"], samples["accepted"], tasks)},
    )


def unimodal_accuracy(samples: dict[str, np.ndarray], tasks: list[str]) -> dict:
    """Accuracy from each modality alone over the labelled samples that have that modality, and
    how often the fused answer overrules it: over the labelled samples that have both modalities,
    the share where this modality alone is right and the fused answer wrong. A fusion that uses
    each modality where it carries the answer keeps that near 0; a title that looks informative
    and is not (it does not name the attribute) shows up as the image overruled."""
    def over_tasks(per_task: dict) -> dict:
        present = [value for value in per_task.values() if value is not None]
        return {"tasks": per_task, "mean": float(np.mean(present)) if present else None}

    labels = samples["labels"]
    both = (samples["has_text"].astype(bool) & samples["has_image"].astype(bool)
            if all(f"predicted_{name}" in samples for name in MODALITIES) else None)
    result = {}
    for name in MODALITIES:
        if f"predicted_{name}" not in samples:
            continue
        has, alone = samples[f"has_{name}"].astype(bool), samples[f"predicted_{name}"]
        per_task, overruled = {}, {}
        for k, task in enumerate(tasks):
            labelled = has & (labels[:, k] >= 0)
            per_task[task] = accuracy(labels[labelled, k], alone[labelled, k]) if labelled.any() else None
            if both is not None:
                rows = both & (labels[:, k] >= 0)
                lost = (alone[rows, k] == labels[rows, k]) & (samples["predicted"][rows, k] != labels[rows, k])
                overruled[task] = float(lost.mean()) if rows.any() else None
        result[name] = {**over_tasks(per_task), **({"overruled": over_tasks(overruled)} if both is not None else {})}
    return result


@torch.no_grad()
def attention_pictures(model, batch: dict, context_length: int, count: int,
                       accelerator=None) -> list[tuple[str, np.ndarray]]:
    """Figure-2 pictures (on the eval crop) of the `count` products with the smallest sample
    indices among the first batches of all ranks that have a title and an image: the same products
    at every evaluation (an eval loader reads in a fixed order), so TensorBoard shows their
    attention evolving. Every rank runs one forward (ZeRO-3) and draws its candidates; all get the
    chosen pictures."""
    from cmaclip.data.tokenizer import load_tokenizer

    usable = batch["modality_mask"].all(dim=1) & (batch["index"] >= 0)
    candidates = torch.nonzero(usable).flatten()
    rows = candidates[batch["index"][candidates].argsort()][:count]
    inputs = {key: value[rows if len(rows) else torch.arange(1)] for key, value in model_inputs(batch).items()}
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    with autocast():
        output = model(**inputs, return_attentions=True)
    drawn = []
    if output.attentions is not None and len(rows):  # concat, image, text: no sequence attention to draw
        best, mass, maps = relevant_tokens(output.attentions[-1], inputs["attention_mask"][:, :output.text_length])
        tokenizer = load_tokenizer(context_length)
        images = unnormalize(inputs["pixel_values"])
        for row, sample in enumerate(batch["index"][rows].tolist()):
            pieces = title_pieces(tokenizer, inputs["input_ids"][row].cpu().numpy())
            picture = draw_explanation(images[row], pieces, piece_at(int(best[row])), maps[row].cpu().numpy(),
                                       float(mass[row]))
            drawn.append((sample, np.asarray(picture)))
    chosen = sorted((item for part in all_gather(drawn) for item in part), key=lambda item: item[0])[:count]
    return [(f"sample_{sample}", picture) for sample, picture in chosen]


# ---- reporting -------------------------------------------------------------------------------------

def log_evaluation(writer, result: EvalResult, step: int) -> None:
    """TensorBoard: eval/<task>/{accuracy,macro_f1,recall_at_pNN}, eval/mean/..., confusion matrices
    (eval/<task>/confusion), modality_weight/<task>/{image,text}, and the attention pictures
    (eval/explain/<sample>). A `None` writer (ranks other than 0) does nothing."""
    if writer is None:
        return
    suffix = "" if result.perturb == "none" else f"_{result.perturb}"
    for task, scores in result.metrics["tasks"].items():
        for name, value in scores.items():
            if name != "n" and value is not None:
                writer.add_scalar(f"eval{suffix}/{task}/{name}", value, step)
        writer.add_image(f"eval{suffix}/{task}/confusion",
                         confusion_image(result.confusion[task], result.class_names[task]), step, dataformats="HWC")
        if result.perturb == "none":
            for modality, weight in result.modality_weights[task].items():
                writer.add_scalar(f"modality_weight/{task}/{modality}", weight, step)
    for name, value in result.metrics["mean"].items():
        if value is not None:
            writer.add_scalar(f"eval{suffix}/mean/{name}", value, step)
    for name, picture in result.pictures:
        writer.add_image(f"eval{suffix}/explain/{name}", picture, step, dataformats="HWC")
    writer.flush()


def format_table(metrics: dict, modality_weights: dict | None = None) -> str:
    """The per-task table as markdown (also readable in a terminal)."""
    recall_names = [name for name in metrics["mean"] if name.startswith("recall_at_p")]
    header = ["task", "n", "accuracy", "macro-F1"] + [name.replace("recall_at_p", "R@P") for name in recall_names]
    if modality_weights:
        header.append("image weight")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, m in metrics["tasks"].items():
        cells = [task, str(m["n"]), _fmt(m["accuracy"]), _fmt(m["macro_f1"])] + [_fmt(m[r]) for r in recall_names]
        if modality_weights:
            cells.append(_fmt(modality_weights[task]["image"]))
        lines.append("| " + " | ".join(cells) + " |")
    mean = metrics["mean"]
    cells = ["**mean**", "", _fmt(mean["accuracy"]), _fmt(mean["macro_f1"])] + [_fmt(mean[r]) for r in recall_names]
    if modality_weights:
        cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- checks ----------------------------------------------------------------------------------------

def check_model_fits_shards(model_tasks: dict[str, list[str]], data_tasks: dict[str, list[str]], checkpoint,
                            shards) -> None:
    if dict(model_tasks) != dict(data_tasks):
        raise DataError(f"the model in {checkpoint} was trained on tasks/classes that differ from {shards}'s "
                         f"dataset.json (model tasks {list(model_tasks)}, shards tasks {list(data_tasks)}): "
                         "evaluate on shards written from the same catalogue")


# ---- command line ----------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="cmaclip eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training output_dir or its model/ folder")
    parser.add_argument("--shards", required=True, help="a folder written by `cmaclip shards`")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--precision", type=float, nargs="+", default=list(DEFAULT_PRECISIONS),
                        help="precision levels for recall_at_pNN (0.9 is always reported)")
    parser.add_argument("--perturb", default="none", choices=PERTURBATIONS,
                        help="robustness check: remove titles, remove images, or drop 30%% of title words")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drop-words perturbation")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--loader", default="auto", choices=LOADERS, help="input pipeline (data.loader)")
    parser.add_argument("--tensorboard", default=None,
                        help="TensorBoard folder for the scalars and confusion matrices (default: "
                             "<output_dir>/tensorboard/eval-<split> when --checkpoint is an output_dir)")
    args = parser.parse_args(argv)
    bad = [p for p in args.precision if not 0 < p <= 1]
    if bad:
        parser.error(f"--precision must be in (0, 1], got {bad}")
    always = list(DEFAULT_PRECISIONS)
    args.precision = sorted(set(always + args.precision), key=[*always, *args.precision].index)
    return args


@command("cmaclip eval")
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from cmaclip.checkpoint import TENSORBOARD_DIR, load_model, resolve_model_dir
    from cmaclip.config import RunConfig
    from cmaclip.distributed import make_accelerator, quiet_libraries, shutdown

    quiet_libraries()
    # the run defaults: gloo without CUDA, bf16 autocast on a GPU that has it, the world-size check
    accelerator = make_accelerator(RunConfig())
    info = load_dataset_info(args.shards)
    model_dir = resolve_model_dir(args.checkpoint)
    model = load_model(model_dir, accelerator.device)
    check_model_fits_shards(model.tasks, info.tasks, args.checkpoint, args.shards)
    calibration = Calibration.load(model_dir)  # calibration.json, if fitted
    if calibration is not None:
        calibration.check_fits_model(model.tasks, model_dir)
    loader = build_loader(args.shards, args.split, config=DataConfig(loader=args.loader), batch_size=args.batch_size,
                          image_size=model.config.image_size, train=False, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, seed=args.seed, device=accelerator.device)
    result = evaluate_model(model, loader, accelerator, perturb=args.perturb, seed=args.seed,
                            precisions=tuple(args.precision), pictures=4,
                            progress=accelerator.is_main_process, calibration=calibration)
    if accelerator.is_main_process:
        content = {**result.to_json(), "checkpoint": str(model_dir),
                   "shards": str(args.shards), "split": args.split}
        write_json_atomic(Path(args.out), content)
        tensorboard_dir = args.tensorboard
        if tensorboard_dir is None and model_dir != Path(args.checkpoint):
            tensorboard_dir = Path(args.checkpoint) / TENSORBOARD_DIR / f"eval-{args.split}"
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(tensorboard_dir)) as writer:
                log_evaluation(writer, result, step=0)
        print(format_table(result.metrics, result.modality_weights if args.perturb == "none" else None))
        print(result.summary())
        if calibration is not None:
            print(format_report(calibration, result.auto_fill["tasks"]))
        print(f"wrote {args.out}" + (f"; TensorBoard: {tensorboard_dir}" if tensorboard_dir else ""))
    shutdown(accelerator)


if __name__ == "__main__":
    main()
