"""`cmaclip shards`: a product catalogue (JSONL/CSV) -> WebDataset tar shards + DALI index files +
dataset.json, in the layout of cmaclip/data/format.py.

    write_shards("catalog.jsonl", ["colour", "category"], "shards/", val_fraction=0.1, workers=4)

Stages: read and check the rows (catalog.py) -> tokenize the titles -> assign splits -> validate and
prepare every image in parallel, spooling the JPEG bytes to disk -> build the label vocabulary from
the training split -> write the shards. Images are fully decoded before anything is written because
a bad JPEG would kill a DALI pipeline mid-training.

Decisions (also in the README):
- Split: the row's `split`, else a hash of the id (same id -> same split, whatever the row order).
  Within a split, samples are ordered by another hash of the id: shards are mixed even when the
  catalogue is sorted by category, and the output does not depend on the row order.
- Vocabulary: per task, the classes with at least `min_class_count` training samples, sorted by
  name. Labels of other classes (rare ones, or ones seen only in val/test) become missing (-1) and
  are listed in dataset.json["dropped_classes"]; a row left with no label at all is skipped.
  `vocab_from` reuses another shards folder's classes instead (to evaluate a model on new data).
- Safety: a shard is written under a temporary name in a staging folder, fsync'ed, and renamed
  into place with its index (index first, so a .tar in place always has its .tar.idx);
  dataset.json is written last, atomically. Readers start from dataset.json, so an interrupted run
  leaves nothing they would read. --overwrite deletes the previous dataset.json first and only
  cmaclip's own files; it happens after every check has passed.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cmaclip.data.catalog import (BadRow, CatalogError, CatalogRow, placeholder_jpeg, prepare_image, read_catalog,
                                  skip_record)
from cmaclip.data.format import (COMPONENTS, DATASET_FILE, FORMAT_VERSION, IMAGE, SHARD_FILE, SPLITS, TEXT, EOT_TOKEN_ID,
                                 encode_int32, load_dataset_info, sample_key, shard_name)
from cmaclip.data.integrity import FILES_KEY, file_record, verify
from cmaclip.errors import CmaclipError, command
from cmaclip.files import write_durably, write_json_atomic

TAR_BLOCK = 512
INDEX_VERSION = "v1.2"  # what DALI's wds2idx writes
STAGING_PREFIX = ".cmaclip-staging-"


class ShardsError(CmaclipError, ValueError):
    """A structural problem: nothing was written (the message says why)."""


@dataclass
class Sample:
    row: CatalogRow
    tokens: np.ndarray
    """int32 [context_length]: [SOT, ..., EOT, 0, ...]."""
    split: str = ""
    order: int = 0
    """Position key within the split (a hash of the id)."""
    jpeg: tuple[str, int, int] | None = None
    """(spool file, offset, length) of the prepared JPEG; None = text-only (placeholder image)."""
    image_note: str = "placeholder"
    labels: list[int] | None = None

    @property
    def has_text(self) -> bool:
        return bool(self.tokens[1] != EOT_TOKEN_ID)


def id_hash(row_id: str) -> bytes:
    return hashlib.sha256(row_id.encode("utf-8")).digest()


def assign_split(row_id: str, val_fraction: float, test_fraction: float) -> str:
    """test for the first test_fraction of the hash range, val for the next val_fraction, else train."""
    position = int.from_bytes(id_hash(row_id)[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


# ---- stage: images (runs in worker processes) -------------------------------------------------

_worker = {}


def init_image_worker(staging: str, max_side: int) -> None:
    _worker.update(staging=Path(staging), max_side=max_side)


def prepare_image_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, tuple | None, str]]:
    """Prepare each (row number, image path); JPEG bytes go to this process's spool file.
    Returns (row number, (spool name, offset, length) or None, note or skip reason)."""
    spool_name = f"images-{os.getpid()}.bin"
    results = []
    with open(_worker["staging"] / spool_name, "ab") as spool:
        for number, path in chunk:
            try:
                data, note = prepare_image(Path(path), _worker["max_side"])
            except BadRow as error:
                results.append((number, None, str(error)))
                continue
            results.append((number, (spool_name, spool.tell(), len(data)), note))
            spool.write(data)
    return results


def worker_context():
    """forkserver: workers fork from a clean server process, never from a parent that may hold
    torch/OpenMP/tokenizer threads, and start fast once it runs; spawn where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cmaclip.data.shards"])
    return context


def prepare_images(samples: list[Sample], staging: Path, max_side: int, workers: int, progress: bool) -> list[tuple]:
    from tqdm import tqdm

    jobs = [(number, str(s.row.image)) for number, s in enumerate(samples) if s.row.image is not None]
    chunk_size = max(1, min(64, len(jobs) // (workers * 8)))
    chunks = [jobs[i : i + chunk_size] for i in range(0, len(jobs), chunk_size)]
    bar = tqdm(total=len(jobs), desc="checking images", unit="img", disable=not progress, file=sys.stderr)
    results = []
    if workers <= 1:
        init_image_worker(str(staging), max_side)
        for chunk in chunks:
            results += prepare_image_chunk(chunk)
            bar.update(len(chunk))
    else:
        with worker_context().Pool(workers, initializer=init_image_worker, initargs=(str(staging), max_side)) as pool:
            for chunk_results in pool.imap_unordered(prepare_image_chunk, chunks):
                results += chunk_results
                bar.update(len(chunk_results))
    bar.close()
    return results


# ---- stage: vocabulary ------------------------------------------------------------------------

def build_vocabulary(samples: list[Sample], tasks: list[str], min_class_count: int) -> tuple[dict, dict]:
    """classes per task (sorted) and, per task, the dropped classes with their training counts."""
    classes, dropped = {}, {}
    for task in tasks:
        train_counts = Counter(s.row.labels[task] for s in samples if s.split == "train" and task in s.row.labels)
        seen = {s.row.labels[task] for s in samples if task in s.row.labels}
        classes[task] = sorted(c for c in seen if train_counts[c] >= min_class_count)
        dropped[task] = {c: train_counts[c] for c in sorted(seen) if train_counts[c] < min_class_count}
    return classes, dropped


def vocabulary_from(shards_dir: str | Path, tasks: list[str], samples: list[Sample]) -> tuple[dict, dict]:
    try:
        info = load_dataset_info(shards_dir)
    except (FileNotFoundError, ValueError) as error:
        raise ShardsError(f"--vocab-from: {error}") from None
    missing = [task for task in tasks if task not in info.tasks]
    if missing:
        raise ShardsError(f"{Path(shards_dir) / DATASET_FILE}: has no task(s) {', '.join(missing)} "
                          f"(tasks: {', '.join(info.tasks)})")
    classes = {task: info.tasks[task] for task in tasks}
    dropped = {}
    for task in tasks:
        unknown = Counter(s.row.labels[task] for s in samples
                          if task in s.row.labels and s.row.labels[task] not in classes[task])
        dropped[task] = dict(sorted(unknown.items()))
    return classes, dropped


# ---- stage: writing ---------------------------------------------------------------------------

def _ustar_template() -> bytes:
    info = tarfile.TarInfo("")
    info.mtime, info.mode = 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


# A ustar header with fixed content (mtime 0, root-owned, mode 644, so identical input gives
# identical shards); per member only the name, size and checksum change. tarfile's own header
# builder costs more than writing the sample's bytes.
USTAR_TEMPLATE = _ustar_template()
NAME_FIELD, SIZE_FIELD, CHECKSUM_FIELD = slice(0, 100), slice(124, 136), slice(148, 156)


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` (ASCII, < 100 characters) of `size` bytes."""
    encoded = name.encode("ascii")
    if len(encoded) >= 100:
        raise ValueError(f"tar member name too long for a ustar header: {name!r}")
    header = bytearray(USTAR_TEMPLATE)
    header[NAME_FIELD] = encoded.ljust(100, b"\0")
    header[SIZE_FIELD] = b"%011o\0" % size
    header[CHECKSUM_FIELD] = b" " * 8  # the checksum is computed with its own field as spaces
    header[CHECKSUM_FIELD] = b"%06o\0 " % sum(header)
    return bytes(header)


def write_shard(staging: Path, final_tar: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write one tar + its DALI index (the `wds2idx` format: per sample, `ext offset size name` per
    component, offsets of the data) in `staging`, then rename both into place, index first."""
    partial_tar = staging / (final_tar.name + ".partial")
    index_lines = [f"{INDEX_VERSION} {len(samples)}"]
    with open(partial_tar, "wb") as file:
        for key, components in samples:
            entries = []
            for ext in COMPONENTS:
                name, data = f"{key}.{ext}", components[ext]
                file.write(tar_header(name, len(data)))
                entries.append(f"{ext} {file.tell()} {len(data)} {name}")
                file.write(data + b"\0" * (-len(data) % TAR_BLOCK))
            index_lines.append(" ".join(entries))
        file.write(b"\0" * (2 * TAR_BLOCK))  # end-of-archive marker
        file.write(b"\0" * (-file.tell() % tarfile.RECORDSIZE))
        file.flush()
        os.fsync(file.fileno())
    partial_index = staging / (final_tar.name + ".idx.partial")
    write_durably(partial_index, ("\n".join(index_lines) + "\n").encode())
    os.replace(partial_index, final_tar.with_name(final_tar.name + ".idx"))
    os.replace(partial_tar, final_tar)


def sample_components(sample: Sample, index: int, image: bytes) -> dict[str, bytes]:
    present = [0, 0]
    present[TEXT], present[IMAGE] = int(sample.has_text), int(sample.jpeg is not None)
    return {
        "jpg": image,
        "txt": sample.row.text.encode("utf-8"),
        "id": sample.row.id.encode("utf-8"),
        "tok": encode_int32(sample.tokens),
        "lbl": encode_int32(sample.labels),
        "idx": encode_int32([index]),
        "mod": encode_int32(present),
    }


def write_split_shards(split: str, samples: list[Sample], out_dir: Path, staging: Path,
                       samples_per_shard: int, progress_bar) -> list[str]:
    placeholder = placeholder_jpeg()
    spools: dict[str, object] = {}
    names = []
    try:
        for number, start in enumerate(range(0, len(samples), samples_per_shard)):
            batch = []
            for index, sample in enumerate(samples[start : start + samples_per_shard], start=start):
                image = placeholder
                if sample.jpeg is not None:
                    spool_name, offset, length = sample.jpeg
                    spool = spools.get(spool_name) or spools.setdefault(spool_name, open(staging / spool_name, "rb"))
                    spool.seek(offset)
                    image = spool.read(length)
                batch.append((sample_key(split, index), sample_components(sample, index, image)))
            names.append(shard_name(split, number))
            write_shard(staging, out_dir / names[-1], batch)
            progress_bar.update(len(batch))
    finally:
        for spool in spools.values():
            spool.close()
    return names


# ---- the whole run ----------------------------------------------------------------------------

@dataclass
class ShardsConfig:
    """The options of `write_shards` / `cmaclip shards` (flags: --image-root, --val-fraction, ...)."""

    image_root: str | None = None
    """Folder that relative image paths start from; None = the input file's folder."""
    allow_outside_image_root: bool = False
    """Read image paths that leave the image root (absolute paths, `..`); by default such a row is
    skipped, so a catalogue cannot make the writer embed any file it can read."""
    text_column: str = "text"
    """The title: a CSV column or a JSONL key."""
    val_fraction: float = 0.1
    """Share of the rows without a `split` field that go to val (decided by a hash of the id)."""
    test_fraction: float = 0.0
    """Share of the rows without a `split` field that go to test."""
    min_class_count: int = 1
    """A class enters the vocabulary with at least this many training samples; labels of rarer
    classes become missing (-1). 1 drops only the classes never seen in training."""
    vocab_from: str | None = None
    """A shards folder whose classes to reuse instead (writing new data for a trained model)."""
    samples_per_shard: int = 1000
    """Samples per tar file."""
    max_side: int = 512
    """Images with a longer side are shrunk to it and re-encoded; 0 = keep every size."""
    context_length: int = 77
    """Title tokens stored per sample, SOT and EOT included (CLIP: 77)."""
    workers: int = 1
    """Processes that decode and check the images."""
    overwrite: bool = False
    """Replace the cmaclip files already in the output folder (other files are left alone)."""
    unlabelled: bool = False
    """Keep rows without any label (a catalogue to predict, not to train on); needs vocab_from, the
    trained model's classes."""
    progress: bool = False
    """Show progress bars (stderr)."""

    def check(self) -> None:
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ShardsError(f"need 0 <= val fraction, test fraction and val + test < 1 "
                              f"(got val {self.val_fraction}, test {self.test_fraction})")
        for name in ("samples_per_shard", "min_class_count", "workers", "context_length"):
            if getattr(self, name) < (2 if name == "context_length" else 1):
                raise ShardsError(f"{name} must be at least {2 if name == 'context_length' else 1}, "
                                  f"got {getattr(self, name)}")
        if self.max_side < 0:
            raise ShardsError(f"max_side must be >= 0 (0 = no limit), got {self.max_side}")
        if self.unlabelled and self.vocab_from is None:
            raise ShardsError("--unlabelled needs --vocab-from SHARDS_DIR: the classes of the shards the model was "
                              "trained on")


def clean_task_names(tasks: list[str]) -> list[str]:
    tasks = [task.strip() for task in tasks]
    if not tasks or not all(tasks) or len(set(tasks)) != len(tasks):
        raise ShardsError(f"tasks must be distinct non-empty names, got {tasks}")
    return tasks


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ShardsError(f"{out_dir}: folder is not empty (pass --overwrite to replace earlier shards)")


@contextmanager
def staging_folder(out_dir: Path):
    """A hidden scratch folder inside out_dir (same file system: renames out of it are atomic),
    always removed at the end. On failure, an output folder this run created is removed too."""
    created = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        yield staging
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_previous_output(out_dir: Path, current_staging: Path) -> None:
    """dataset.json first: from then on no reader accepts the folder until the new one is complete."""
    (out_dir / DATASET_FILE).unlink(missing_ok=True)
    for entry in out_dir.iterdir():
        if entry == current_staging:
            continue
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif SHARD_FILE.match(entry.name) or entry.name.endswith(".partial"):
            entry.unlink()


def summarize_skips(skipped: list[dict], limit: int = 5) -> str:
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    return "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(limit))


def tokenize_and_split(catalog, config: ShardsConfig, skipped: list[dict]) -> list[Sample]:
    from cmaclip.data.tokenizer import load_tokenizer

    token_rows = load_tokenizer(config.context_length).encode([row.text for row in catalog.rows])
    samples = []
    for row, tokens in zip(catalog.rows, token_rows):
        sample = Sample(row=row, tokens=tokens)
        if row.image is None and not sample.has_text:  # e.g. a title of characters CLIP's cleaning removes
            skipped.append(skip_record(row.line, row.id, "neither a title nor an image (the title has no tokens)"))
            continue
        sample.split = row.split or assign_split(row.id, config.val_fraction, config.test_fraction)
        sample.order = int.from_bytes(id_hash(row.id)[8:16], "big")
        samples.append(sample)
    return samples


def attach_images(samples: list[Sample], staging: Path, config: ShardsConfig, skipped: list[dict]) -> list[Sample]:
    """The samples whose image was prepared (or that have none); the others go to `skipped`."""
    for number, spool_ref, note in prepare_images(samples, staging, config.max_side, config.workers, config.progress):
        samples[number].jpeg, samples[number].image_note = spool_ref, note
    kept = []
    for sample in samples:
        if sample.row.image is not None and sample.jpeg is None:
            skipped.append(skip_record(sample.row.line, sample.row.id, sample.image_note))
        else:
            kept.append(sample)
    return kept


def label_vocabulary(samples: list[Sample], tasks: list[str], config: ShardsConfig,
                     input_path) -> tuple[dict, dict, str]:
    """(classes per task, dropped classes per task, the skip reason for a row left without labels)."""
    if config.vocab_from is not None:
        classes, dropped = vocabulary_from(config.vocab_from, tasks, samples)
        return classes, dropped, f"no label in the classes of {config.vocab_from}"
    if not any(s.split == "train" for s in samples):
        raise ShardsError(f"{input_path}: no usable training rows to build the class vocabulary from "
                          f"(pass --vocab-from SHARDS_DIR to reuse another dataset's classes)")
    classes, dropped = build_vocabulary(samples, tasks, config.min_class_count)
    empty = [task for task in tasks if not classes[task]]
    if empty:
        raise ShardsError(f"{input_path}: task(s) {', '.join(empty)} have no class with at least "
                          f"{config.min_class_count} training samples (lower --min-class-count)")
    return classes, dropped, f"every label is a class with fewer than {config.min_class_count} training samples"


def label_and_group(samples: list[Sample], tasks: list[str], classes: dict, drop_reason: str | None,
                    skipped: list[dict]) -> dict[str, list[Sample]]:
    """Label indices per sample; samples per split in their stored order (by id hash). A sample left
    without labels is skipped with `drop_reason` (kept when it is None)."""
    class_index = {task: {name: i for i, name in enumerate(classes[task])} for task in tasks}
    by_split = {split: [] for split in SPLITS}
    for sample in samples:
        sample.labels = [class_index[task].get(sample.row.labels.get(task), -1) for task in tasks]
        if drop_reason is not None and all(label < 0 for label in sample.labels):
            skipped.append(skip_record(sample.row.line, sample.row.id, drop_reason))
        else:
            by_split[sample.split].append(sample)
    for split_samples in by_split.values():
        split_samples.sort(key=lambda s: (s.order, s.row.id))
    return by_split


def write_shards(input_path: str | Path, tasks: list[str], out_dir: str | Path, **options) -> dict:
    """Write the shards folder `out_dir` from the catalogue `input_path` and return its dataset.json
    content. `options` are ShardsConfig fields. Structural problems raise ShardsError or
    CatalogError (both ValueError) before anything is written."""
    config = ShardsConfig(**options)
    config.check()
    tasks = clean_task_names(tasks)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, config.overwrite)

    catalog = read_catalog(input_path, tasks, text_column=config.text_column, image_root=config.image_root,
                           contain=not config.allow_outside_image_root, require_labels=not config.unlabelled)
    skipped = list(catalog.skipped)
    samples = tokenize_and_split(catalog, config, skipped)
    if not samples:
        raise ShardsError(f"{input_path}: no usable rows ({len(skipped)} skipped: {summarize_skips(skipped)})")

    with staging_folder(out_dir) as staging:
        samples = attach_images(samples, staging, config, skipped)
        classes, dropped, drop_reason = label_vocabulary(samples, tasks, config, input_path)
        by_split = label_and_group(samples, tasks, classes, None if config.unlabelled else drop_reason, skipped)
        if not any(by_split.values()):
            raise ShardsError(f"{input_path}: no usable rows ({len(skipped)} skipped: {summarize_skips(skipped)})")

        if config.overwrite:
            remove_previous_output(out_dir, staging)
        from tqdm import tqdm

        bar = tqdm(total=sum(map(len, by_split.values())), desc="writing shards", unit="sample",
                   disable=not config.progress, file=sys.stderr)
        splits = {}
        for split, split_samples in by_split.items():
            names = write_split_shards(split, split_samples, out_dir, staging, config.samples_per_shard, bar)
            splits[split] = {"samples": len(split_samples), "shards": names}
        bar.close()
        dataset = dataset_json(input_path, tasks, config, classes, dropped, splits, by_split, skipped)
        dataset[FILES_KEY] = {path.name: file_record(path) for split in splits.values()
                              for name in split["shards"] for path in (out_dir / name, out_dir / f"{name}.idx")}
        write_json_atomic(out_dir / DATASET_FILE, dataset)
    return dataset


def dataset_json(input_path, tasks, config: ShardsConfig, classes, dropped, splits, by_split, skipped) -> dict:
    """dataset.json: the format contract (format_version, tasks, context_length, splits, skipped) plus
    what a user checks first: label counts per split, dropped classes, how images were stored."""
    label_counts = {
        task: {split: {**{name: 0 for name in classes[task]},
                       **Counter(classes[task][s.labels[k]] for s in by_split[split] if s.labels[k] >= 0),
                       "(missing)": sum(s.labels[k] < 0 for s in by_split[split])}
               for split in SPLITS}
        for k, task in enumerate(tasks)
    }
    modalities = {split: {"text_and_image": sum(s.has_text and s.jpeg is not None for s in by_split[split]),
                          "text_only": sum(s.jpeg is None for s in by_split[split]),
                          "image_only": sum(not s.has_text for s in by_split[split])}
                  for split in SPLITS}
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()
                if key not in ("workers", "overwrite", "progress")}
    return {
        "format_version": FORMAT_VERSION,
        "tasks": classes,
        "context_length": config.context_length,
        "splits": splits,
        "label_counts": label_counts,
        "dropped_classes": {
            "policy": (f"classes not in {config.vocab_from}" if config.vocab_from is not None else
                       f"fewer than {config.min_class_count} training samples"),
            "classes": dropped,
        },
        "modalities": modalities,
        "images": dict(sorted(Counter(s.image_note for split in SPLITS for s in by_split[split]).items())),
        "skipped": sorted(skipped, key=lambda s: s["line"]),
        "settings": {"input": str(input_path), **settings},
    }


def parse_args(argv):
    defaults = ShardsConfig()
    parser = argparse.ArgumentParser(prog="cmaclip shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--verify", metavar="DIR", help="instead of writing: check a shards folder (checksums, "
                                                        "indexes, every sample) and list each problem")
    parser.add_argument("--input", help="catalogue: .jsonl or .csv")
    parser.add_argument("--tasks", help="comma-separated task names (JSONL label keys / CSV columns)")
    parser.add_argument("--out", help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--allow-outside-image-root", action="store_true",
                        help="read image paths that leave --image-root (absolute, ..); default: skip those rows")
    parser.add_argument("--image-root", default=defaults.image_root,
                        help="folder relative image paths start from (None: the input file's folder)")
    parser.add_argument("--text-column", default=defaults.text_column, help="title column (CSV) or key (JSONL)")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of rows without a `split` that go to val")
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                        help="share of rows without a `split` that go to test")
    parser.add_argument("--min-class-count", type=int, default=defaults.min_class_count,
                        help="classes with fewer training samples become missing labels (listed in dataset.json)")
    parser.add_argument("--vocab-from", default=defaults.vocab_from, help="reuse the classes of this shards folder")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--max-side", type=int, default=defaults.max_side,
                        help="longer images are shrunk to this many pixels (0 = keep)")
    parser.add_argument("--context-length", type=int, default=defaults.context_length,
                        help="title tokens per sample, SOT and EOT included")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-checking processes")
    parser.add_argument("--overwrite", action="store_true", help="replace the cmaclip files already in --out")
    parser.add_argument("--unlabelled", action="store_true",
                        help="keep rows without labels (a catalogue to predict); needs --vocab-from")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.verify is None and not (args.input and args.tasks and args.out):
        parser.error("--input, --tasks and --out are required (or --verify DIR)")
    return args


@command("cmaclip shards")
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.verify is not None:
        checked, problems = verify(args.verify)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.verify}: {checked} samples checked, {len(problems)} problem(s)")
        sys.exit(1 if problems else 0)
    start = time.perf_counter()
    try:
        dataset = write_shards(
            args.input, [t for t in args.tasks.split(",") if t.strip()], args.out, image_root=args.image_root,
            text_column=args.text_column, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            min_class_count=args.min_class_count, vocab_from=args.vocab_from,
            samples_per_shard=args.samples_per_shard, max_side=args.max_side, context_length=args.context_length,
            workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
            allow_outside_image_root=args.allow_outside_image_root, unlabelled=args.unlabelled)
    except (CatalogError, ShardsError) as error:
        print(f"cmaclip shards: error: {error}", file=sys.stderr)
        sys.exit(1)
    seconds = time.perf_counter() - start
    total = sum(split["samples"] for split in dataset["splits"].values())
    per_split = ", ".join(f"{name} {split['samples']} ({len(split['shards'])} shards)"
                          for name, split in dataset["splits"].items() if split["samples"])
    print(f"wrote {total} samples to {args.out}: {per_split}")
    policy = dataset["dropped_classes"]["policy"]
    for task, classes in dataset["tasks"].items():
        dropped = dataset["dropped_classes"]["classes"][task]
        print(f"  {task}: {len(classes)} classes" + (f", {len(dropped)} dropped ({policy})" if dropped else ""))
    if dataset["skipped"]:
        print(f"skipped {len(dataset['skipped'])} rows ({summarize_skips(dataset['skipped'])}); "
              f"see {Path(args.out) / DATASET_FILE} \"skipped\"")
    print(f"{total / seconds:.1f} samples/s ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
