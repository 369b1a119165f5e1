"""Shard integrity: what `cmaclip shards` records, what a loader checks at start, `--verify`.

- The writer records every tar's and index's size and SHA-256 under dataset.json "files".
- `check_split_files` (every loader, at start: a stat per file) finds a missing or truncated tar or
  .idx and names it, instead of a "malformed index" or a crash inside DALI.
- `verify` (`cmaclip shards --verify DIR`) re-hashes every file and reads every sample: component
  sizes, labels in range, and a full JPEG decode; each problem is one line naming the file.
- `find_damage` names the shard behind a failure inside DALI (which says only "nvImageCodec
  failure"): checksums first, then the samples themselves.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from cmaclip.errors import DataError

from .format import DATASET_FILE, DatasetInfo, decode_int32

FILES_KEY = "files"
CHUNK = 1 << 20


def file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def split_files(dataset: DatasetInfo, split: str) -> list[Path]:
    return [Path(p) for tar in dataset.shard_paths(split) for p in (tar, tar + ".idx")]


def check_split_files(dataset: DatasetInfo, split: str) -> None:
    """Every tar and .idx of the split exists and has the recorded size (cheap: one stat each)."""
    recorded = dataset.raw.get(FILES_KEY, {})
    for path in split_files(dataset, split):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: missing (listed in {dataset.root / DATASET_FILE}, split {split!r})") from None
        expected = recorded.get(path.name, {}).get("bytes")
        if expected is not None and size != expected:
            raise DataError(f"{path}: {size} bytes, but {DATASET_FILE} records {expected} (truncated or replaced); "
                            f"check the folder with `cmaclip shards --verify {dataset.root}`")


def checksum_problems(dataset: DatasetInfo, paths: list[Path]) -> list[str]:
    recorded = dataset.raw.get(FILES_KEY, {})
    problems = []
    for path in paths:
        expected = recorded.get(path.name)
        if expected is None or not path.is_file():
            continue
        actual = file_record(path)
        if actual != {"bytes": expected["bytes"], "sha256": expected["sha256"]}:
            problems.append(f"{path}: contents differ from the SHA-256 recorded in {DATASET_FILE} (damaged)")
    return problems


def sample_problems(dataset: DatasetInfo, tar: Path) -> list[str]:
    """Every sample of one tar, as its .idx locates it: sizes, labels, and a full JPEG decode."""
    from PIL import Image

    from .catalog import jpeg_layout
    from .pil import SampleTable

    try:
        table = SampleTable([str(tar)], [str(tar) + ".idx"])
    except (DataError, OSError, ValueError) as error:
        return [str(error)]
    sizes = {"tok": 4 * dataset.context_length, "lbl": 4 * len(dataset.tasks), "idx": 4, "mod": 8}
    classes = np.array([len(c) for c in dataset.tasks.values()])
    problems = []
    for sample in range(len(table)):
        where = table.location(sample)
        components = table.read(sample)
        wrong = [ext for ext, size in sizes.items() if len(components[ext]) != size]
        if wrong:
            problems.append(f"{where}: component(s) {', '.join(wrong)} of the wrong size (truncated tar?)")
            continue
        labels = decode_int32(components["lbl"])
        if ((labels < -1) | (labels >= classes)).any():
            problems.append(f"{where}: labels {labels.tolist()} outside the classes of {DATASET_FILE}")
        data = components["jpg"]
        _, damage = jpeg_layout(data)
        if damage is None:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except Exception as error:  # PIL raises many types for a bad image
                damage = f"{type(error).__name__}: {error}"
        if damage is not None:
            problems.append(f"{where}: image does not decode ({damage})"[:300])
    return problems


def verify(root: str | Path) -> tuple[int, list[str]]:
    """-> (samples checked, problems: one line each)."""
    from .format import load_dataset_info

    dataset = load_dataset_info(root)
    problems, checked = [], 0
    if FILES_KEY not in dataset.raw:
        problems.append(f"{Path(root) / DATASET_FILE}: no \"{FILES_KEY}\" checksums (written by an older "
                        "cmaclip): only the samples are checked")
    for split, info in dataset.splits.items():
        if not info.samples:
            continue
        try:
            check_split_files(dataset, split)
        except DataError as error:
            problems.append(str(error))
        files = [path for path in split_files(dataset, split) if path.is_file()]
        problems += checksum_problems(dataset, files)
        for tar in dataset.shard_paths(split):
            if Path(tar).is_file() and Path(tar + ".idx").is_file():
                problems += sample_problems(dataset, Path(tar))
        checked += info.samples
    return checked, problems


def find_damage(dataset: DatasetInfo, split: str) -> str:
    """The first damaged file or sample of a split (checksums, then samples), or a note that none
    was found."""
    problems = checksum_problems(dataset, split_files(dataset, split))
    for tar in dataset.shard_paths(split):
        if problems:
            break
        problems = sample_problems(dataset, Path(tar))
    if not problems:
        return f"no damaged file found in split {split!r} of {dataset.root}"
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
