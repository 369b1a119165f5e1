"""`cmaclip predict --shards`: catalogue-scale prediction over a split of a shards folder, on any
number of ranks and nodes, with the auto-fill decision of `cmaclip calibrate`.

    cmaclip predict --checkpoint runs/x --shards DIR [--split train] --out preds/
    accelerate launch --config_file launchers/accelerate/gpu-ddp.yaml -m cmaclip.predict \
        --checkpoint runs/x --shards DIR --out preds/
    sbatch --nodes 4 launchers/slurm/predict.sbatch --checkpoint runs/x --shards DIR --out preds/

Every rank reads its share of the split with the training loader (DALI with nvJPEG on a GPU, or
the PIL fallback; the eval transform). data/batch.py's rule cuts the split into world_size contiguous
parts and marks padding rows with index -1, which are dropped here, so every sample is predicted
exactly once across ranks. No gradients; bf16 autocast on a GPU that has it. A product's id is
its sample's `id` component, found from the batch's `index` through the shards' .idx files (the
batch contract stays as training uses it).

Output folder (on a filesystem every node sees):
  part-RRRRR-of-WWWWW.parquet  rank R's products; written as `.<name>.partial`, renamed when whole
  _summary.json                written by rank 0 once every part exists: counts per task and decision
The folder reads as one table: `pandas.read_parquet(out)` (readers skip names starting with "_" or ".").

Resumable: a rank whose part already exists skips its share, so a rerun after a crash or a
preemption redoes only the unfinished parts. A part records the run it belongs to (checkpoint,
shards, split, world size, top-k, calibration); parts of any other run in --out are an error.

Parquet schema, one row per product and task (the same columns whatever the model's tasks):
  id            string   the product id
  index         int64    the sample's position in the split
  task          string
  label         string   the predicted class
  confidence    float32  its probability: softmax(logits / T), T the task's calibrated temperature
                         (1 without calibration.json); null if the model gave no finite number
  top_k         list<struct<label: string, confidence: float32>>  the --top-k most probable, best first
  weight_text   float32  the task's modality weights (0 for a missing modality)
  weight_image  float32
  decision      string   "accept" (confidence >= the calibrated threshold of the predicted class:
                         fill it in) or "review"; always "review" when the model has no calibration.json
File metadata key "cmaclip" (JSON): {"run": {...}, "rank": int, "products": int,
  "unreadable": [ids of samples the loader could not decode]}.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cmaclip.calibration import CALIBRATION_FILE, Calibration, probabilities
from cmaclip.data.config import LOADERS
from cmaclip.data.format import IMAGE, SPLITS, TEXT
from cmaclip.errors import CmaclipError, DataError

PART_FORMAT = "part-{rank:05d}-of-{world_size:05d}.parquet"
# Readers of a Parquet folder (pyarrow, pandas, Spark) skip names that start with "_" or ".": the
# summary and a part being written never get in the way of `pd.read_parquet(out)`.
SUMMARY_FILE = "_summary.json"
METADATA_KEY = b"cmaclip"
ROW_GROUP_ROWS = 1 << 17  # rows buffered before a Parquet row group is written
DECISIONS = ("accept", "review")


def parquet_schema():
    import pyarrow as pa

    top_entry = pa.struct([("label", pa.string()), ("confidence", pa.float32())])
    return pa.schema([("id", pa.string()), ("index", pa.int64()), ("task", pa.string()), ("label", pa.string()),
                      ("confidence", pa.float32()), ("top_k", pa.list_(top_entry)), ("weight_text", pa.float32()),
                      ("weight_image", pa.float32()), ("decision", pa.string())])


# ---- one batch -> rows -----------------------------------------------------------------------------

def _floats(values: np.ndarray):
    """float32 Arrow array, null where not finite (a NaN confidence is never written as a number)."""
    import pyarrow as pa

    values = np.asarray(values, dtype=np.float32)
    return pa.array(values, pa.float32(), mask=~np.isfinite(values))


def batch_rows(ids: list[str], index: np.ndarray, tasks: dict[str, list[str]], logits: dict[str, np.ndarray],
               modality_weights: np.ndarray, calibration: Calibration | None, top_k: int):
    """The rows (a pyarrow Table) of one batch's products: task by task."""
    import pyarrow as pa

    tables = []
    for k, (task, classes) in enumerate(tasks.items()):
        if calibration is not None:
            probs, _, accepted = calibration.decide(task, classes, logits[task])
        else:
            probs, accepted = probabilities(logits[task]), np.zeros(len(ids), bool)
        count = min(top_k, len(classes))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :count]  # top[:, 0] is the argmax
        top_confidence = np.take_along_axis(probs, top, axis=1)
        names = np.asarray(classes, dtype=object)
        top_entries = pa.StructArray.from_arrays(
            [pa.array(names[top].ravel(), pa.string()), _floats(top_confidence.ravel())], names=["label", "confidence"])
        offsets = pa.array(np.arange(0, len(ids) * count + 1, count, dtype=np.int32))
        tables.append(pa.Table.from_arrays([
            pa.array(ids, pa.string()), pa.array(index, pa.int64()), pa.array([task] * len(ids), pa.string()),
            pa.array(names[top[:, 0]], pa.string()), _floats(top_confidence[:, 0]),
            pa.ListArray.from_arrays(offsets, top_entries), _floats(modality_weights[:, k, TEXT]),
            _floats(modality_weights[:, k, IMAGE]), pa.array(np.where(accepted, *DECISIONS), pa.string()),
        ], schema=parquet_schema()))
    return pa.concat_tables(tables)


# ---- the part file of one rank ---------------------------------------------------------------------

class PartWriter:
    """One rank's Parquet part: row groups of ROW_GROUP_ROWS rows into `.<name>.partial`, renamed
    to its name by close(), or removed by abort()."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path, self.partial = path, path.with_name(f".{path.name}.partial")
        self.writer = pq.ParquetWriter(self.partial, parquet_schema())
        self.pending, self.pending_rows = [], 0

    def write(self, table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP_ROWS)
        self.pending, self.pending_rows = [], 0

    def close(self, metadata: dict) -> None:
        from cmaclip.files import publish

        self._flush()
        self.writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata)})
        self.writer.close()
        publish(self.partial, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.partial.unlink(missing_ok=True)


def part_metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    try:
        return json.loads(pq.read_metadata(path).metadata[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a part written by cmaclip predict ({error}); remove it or use a new --out")


def check_existing_parts(out: Path, run: dict) -> None:
    """Every part already in `out` must belong to this run (same inputs and world size)."""
    for path in sorted(out.glob("part-*.parquet")):
        theirs = part_metadata(path)["run"]
        different = [key for key in run if theirs.get(key) != run[key]]
        if different:
            details = ", ".join(f"{key} {theirs.get(key)!r} (now {run[key]!r})" for key in different)
            raise CmaclipError(f"{path}: a part of another run ({details}); use a new --out, or remove "
                             "the old parts to start over")


# ---- running a rank's share ------------------------------------------------------------------------

@torch.no_grad()
def model_outputs(model, loader, autocast=contextlib.nullcontext):
    """(batch, output) for each batch of the loader's current epoch, no gradients."""
    from cmaclip.data.batch import model_inputs

    for batch in loader:
        with autocast():
            output = model(**model_inputs(batch, with_host_facts=True))
        yield batch, output


def predict_share(model, loader, ids, part: PartWriter, *, calibration: Calibration | None, top_k: int,
                  autocast=contextlib.nullcontext) -> tuple[int, list[str]]:
    """Write this rank's share of the loader's split into `part` -> (products written, ids of the
    samples of the share the loader could not read). ids: sample index -> product id."""
    from cmaclip.data.batch import rank_share

    share = rank_share(loader.num_samples, loader.rank, loader.world_size, loader.epoch)
    seen = np.zeros(len(share), bool)
    for batch, output in model_outputs(model, loader, autocast):
        index = batch["index"].cpu().numpy()
        keep = index >= 0
        if not keep.any():
            continue
        index = index[keep]
        seen[index - share.start] = True
        logits = {task: values.float().cpu().numpy()[keep] for task, values in output.logits.items()}
        weights = output.modality_weights.float().cpu().numpy()[keep]
        part.write(batch_rows([ids(i) for i in index], index, model.tasks, logits, weights, calibration, top_k))
    return int(seen.sum()), [ids(share.start + int(i)) for i in np.flatnonzero(~seen)]


def product_ids(info, split: str):
    """sample index -> product id, read from the shards (the `id` component) when asked."""
    from cmaclip.data.pil import SampleTable

    table = SampleTable(info.shard_paths(split), info.index_paths(split), components=("id",))
    return lambda index: table.read(int(index))["id"].decode("utf-8")


# ---- summary ---------------------------------------------------------------------------------------

def summarize(out: Path, run: dict, num_samples: int) -> dict:
    """_summary.json's content, from the parts (all of them must exist)."""
    import pyarrow.parquet as pq

    names = [PART_FORMAT.format(rank=r, world_size=run["world_size"]) for r in range(run["world_size"])]
    missing = [name for name in names if not (out / name).is_file()]
    if missing:
        raise CmaclipError(f"{out}: parts {missing[:3]} are missing after every rank finished")
    counts = {}  # task -> decision -> rows, tasks in the parts' order
    products, unreadable = 0, []
    for name in names:
        metadata = part_metadata(out / name)
        products += metadata["products"]
        unreadable += metadata["unreadable"]
        grouped = pq.read_table(out / name, columns=["task", "decision"]).group_by(["task", "decision"]).aggregate(
            [("task", "count")])
        for task, decision, count in zip(*(grouped.column(c).to_pylist() for c in ("task", "decision", "task_count"))):
            counts.setdefault(task, dict.fromkeys(DECISIONS, 0))[decision] += count
    return {**run, "samples": num_samples, "products": products, "unreadable": unreadable, "parts": names,
            "tasks": {task: {**c, "accept_fraction": c["accept"] / products if products else None}
                      for task, c in counts.items()}}


def format_summary(summary: dict) -> str:
    lines = ["| task | accept | review | accept fraction |", "|---|---:|---:|---:|"]
    for task, c in summary["tasks"].items():
        fraction = "-" if c["accept_fraction"] is None else f"{c['accept_fraction']:.3f}"
        lines.append(f"| {task} | {c['accept']} | {c['review']} | {fraction} |")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="cmaclip predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training output_dir or its model/ folder "
                                                            f"(its {CALIBRATION_FILE}, if any, gives the decisions)")
    parser.add_argument("--shards", required=True, help="a folder written by `cmaclip shards`")
    parser.add_argument("--split", default="train", choices=SPLITS,
                        help="the split to predict (a catalogue written with --val-fraction 0 is all train)")
    parser.add_argument("--out", required=True, help="output folder: one Parquet part per rank + summary.json")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per task")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--loader", default="auto", choices=LOADERS, help="input pipeline")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / PIL DataLoader workers per process")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        parser.error("--top-k and --batch-size must be >= 1, --workers >= 0")
    return args


def calibration_digest(model_dir: Path) -> str | None:
    path = model_dir / CALIBRATION_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def run(args) -> None:
    from cmaclip.checkpoint import load_model, resolve_model_dir
    from cmaclip.config import RunConfig
    from cmaclip.data.config import DataConfig
    from cmaclip.data.format import load_dataset_info
    from cmaclip.data.loader import build_loader
    from cmaclip.distributed import make_accelerator, quiet_libraries, shutdown
    from cmaclip.files import write_json_atomic

    # the arguments are checked before any process group exists: every rank stops with one line
    model_dir = resolve_model_dir(args.checkpoint)
    info = load_dataset_info(args.shards)
    num_samples = info.num_samples(args.split)
    calibration = Calibration.load(model_dir)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CmaclipError(f"{out}: --out must be a folder (it is a file)")
    quiet_libraries()
    accelerator = make_accelerator(RunConfig())  # gloo without CUDA, bf16 autocast on a GPU that has it
    run_identity = {"checkpoint": str(model_dir.resolve()), "shards": str(Path(args.shards).resolve()),
                    "split": args.split, "world_size": accelerator.num_processes, "top_k": args.top_k,
                    "calibration": calibration_digest(model_dir)}
    out.mkdir(parents=True, exist_ok=True)
    check_existing_parts(out, run_identity)
    rank = accelerator.process_index
    path = out / PART_FORMAT.format(rank=rank, world_size=accelerator.num_processes)
    if path.is_file():
        print(f"rank {rank}: {path.name} exists, its share is done")
    else:
        model = load_model(model_dir, accelerator.device)
        if calibration is not None:
            calibration.check_fits_model(model.tasks, model_dir / CALIBRATION_FILE)
        loader = build_loader(args.shards, args.split, config=DataConfig(loader=args.loader, workers=args.workers),
                              batch_size=args.batch_size, image_size=model.config.image_size, train=False,
                              rank=rank, world_size=accelerator.num_processes, device=accelerator.device)
        part = PartWriter(path)
        try:
            products, unreadable = predict_share(model, loader, product_ids(info, args.split), part,
                                                 calibration=calibration, top_k=args.top_k,
                                                 autocast=accelerator.autocast)
            part.close({"run": run_identity, "rank": rank, "products": products, "unreadable": unreadable})
        except BaseException:
            part.abort()
            raise
        print(f"rank {rank}: {products} products -> {path}"
              + (f"; {len(unreadable)} unreadable samples skipped" if unreadable else ""))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = summarize(out, run_identity, num_samples)
        write_json_atomic(out / SUMMARY_FILE, summary)
        print(format_summary(summary))
        note = "" if calibration else f" (no {CALIBRATION_FILE} next to the model: every decision is review)"
        print(f"predicted {summary['products']} of {num_samples} products -> {out}/part-*.parquet, "
              f"{SUMMARY_FILE}{note}")
    shutdown(accelerator)


def main(argv) -> None:
    """predict.main hands over here when given --shards (its error boundary reports failures)."""
    run(parse_args(argv))
