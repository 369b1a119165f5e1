"""Files that are either complete or absent: what every writer of cmaclip (shards, metrics,
predictions, ablation tables) uses, so an interrupted run never leaves a half-written file."""
from __future__ import annotations

import json
import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def write_durably(path: Path, data: bytes) -> None:
    """Write and fsync, so that a rename after it never publishes data still in the page cache."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_json_atomic(path: str | Path, content: dict) -> None:
    """Write `<path>.partial` durably, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    write_durably(partial, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(partial, path)


def publish(partial: str | Path, path: str | Path) -> None:
    """Make a file that a library wrote under a temporary name durable (fsync), then rename it over
    `path`: readers see it whole or not at all."""
    with open(partial, "rb") as file:
        os.fsync(file.fileno())
    os.replace(partial, path)
