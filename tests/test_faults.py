"""Fault tolerance in one process: the non-finite guard, the run lock, one-line errors for every
command, config checks on resume, checkpoint fallback, disk-full reporting, shard integrity."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmaclip import checkpoint

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "configs" / "cpu-demo.yaml")


def train_args(shards: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--config", RECIPE, f"data.shards={shards}", f"output_dir={output_dir}", "train.max_steps=4",
            "train.batch_size=8", "train.save_every=2", "train.eval_every=0", "data.eval_split=none",
            "data.loader=pil", "data.workers=0", "logging.progress_bar=false", "logging.log_every=1",
            "optim.warmup_steps=1", *extra]


def run_train(shards: Path, output_dir: Path, *extra: str) -> int:
    """`cmaclip train` in this process. -> its exit code (0 when it returned)."""
    from cmaclip.train import main

    try:
        main(train_args(shards, output_dir, *extra))
    except SystemExit as stopped:
        return stopped.code
    return 0


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_diverging_run_skips_non_finite_steps_then_stops_with_one_line(fashion_shards, tmp_path, capsys):
    """optim.lr=1e4 turns the loss NaN within a few steps: before the guard the run went on, exited 0
    and wrote NaN checkpoints and a NaN model/."""
    output_dir = tmp_path / "run"
    code = run_train(fashion_shards, output_dir, "train.max_steps=30", "train.save_every=1", "train.keep_last=30",
                     "optim.lr=1e4", "optim.backbone_lr=1e4", "train.max_nonfinite_steps=2")
    line = one_error_line(capsys)
    assert code == 1 and line.startswith("cmaclip train: 2 optimizer steps in a row had a non-finite loss"), line
    assert not (output_dir / "model").exists()
    saved = checkpoint.list_checkpoints(output_dir)
    assert saved
    for folder in saved:
        weights = load_file(folder / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), folder


def test_a_second_run_into_the_same_output_dir_is_refused(fashion_shards, tmp_path, capsys):
    """Before the lock, two trainings into one folder both exited 0, one replacing the other's files."""
    import subprocess
    import sys

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "the first run"
    try:
        (output_dir / "LOCK").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": other.pid}))
        assert run_train(fashion_shards, output_dir) == 1
        line = one_error_line(capsys)
        assert f"is in use by another run (pid {other.pid}" in line and "LOCK" in line
        assert not (output_dir / "checkpoints").exists()
    finally:
        other.kill()
        other.wait()
    # that process is gone now: its lock is stale, taken over, and released at the end
    assert run_train(fashion_shards, output_dir, "train.max_steps=1") == 0
    assert "removed a stale lock" in capsys.readouterr().out
    assert not (output_dir / "LOCK").exists() and (output_dir / "model").is_dir()


def test_output_dir_that_is_a_file_is_one_line(fashion_shards, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run_train(fashion_shards, tmp_path / "file") == 2
    assert one_error_line(capsys) == f"cmaclip train: output_dir: {tmp_path / 'file'} is a file, not a folder"
