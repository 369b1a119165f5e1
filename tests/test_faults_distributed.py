"""Fault tolerance across processes (slow): a signal sent to `accelerate launch` itself, and a
two-node launch whose second node never arrives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_distributed import ACCELERATE_DIR, RECIPE, REPO, environment, free_port, losses, overrides

pytestmark = pytest.mark.slow


def start(shards: Path, output_dir: Path, *extra: str, launch_flags=()) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_DIR / "cpu.yaml"),
               "--main_process_port", str(free_port()), *launch_flags, "-m", "cmaclip.train", "--config", RECIPE,
               *overrides(shards, "train.max_steps=1000", "train.save_every=0", *extra), f"output_dir={output_dir}"]
    return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_to_the_launcher_stops_every_rank_with_a_checkpoint(sig, fashion_shards, tmp_path):
    """Before: SIGUSR1 to `accelerate launch` killed it and left both ranks training as orphans;
    SIGTERM stopped them without a checkpoint or a PREEMPTED file."""
    output_dir = tmp_path / "run"
    launcher = start(fashion_shards, output_dir)
    deadline = time.time() + 240
    while not losses(output_dir):
        assert time.time() < deadline and launcher.poll() is None, launcher.stdout.read()
        time.sleep(1)
    ranks = children(launcher.pid)
    assert len(ranks) == 2
    launcher.send_signal(sig)
    try:
        deadline = time.time() + 90
        while any(alive(pid) for pid in ranks):
            assert time.time() < deadline, f"ranks {ranks} still running after the launcher ended"
            time.sleep(0.5)
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = launcher.communicate(timeout=60)[0]
    assert (output_dir / "PREEMPTED").is_file(), output
    stopped_at = int((output_dir / "PREEMPTED").read_text())
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == [f"step-{stopped_at:09d}"], output
    assert not (output_dir / "LOCK").exists()


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_ranks_skip_non_finite_steps_together_and_stop_in_one_line(backend, fashion_shards, tmp_path):
    """optim.lr=1e4: before the guard both ranks trained on with NaN weights, exited 0 and wrote
    NaN checkpoints and model/. DeepSpeed steps inside backward: its own overflow check skips the
    step, and the guard reads it."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "run"
    flags = ("--deepspeed_config_file", "ds_configs/zero2.json") if backend == "zero2" else ()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ACCELERATE_DIR / ("cpu-deepspeed.yaml" if backend == "zero2" else "cpu.yaml")),
               "--main_process_port", str(free_port()), *flags, "-m", "cmaclip.train", "--config", RECIPE,
               *overrides(fashion_shards, "train.max_steps=30", "train.save_every=1", "train.keep_last=30",
                          "optim.lr=1e4", "optim.backbone_lr=1e4", "optim.warmup_steps=1",
                          "train.max_nonfinite_steps=2"), f"output_dir={output_dir}"]
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=400)
    ours = [line for line in done.stderr.splitlines() if line.startswith("cmaclip train")]
    assert done.returncode != 0 and len(ours) == 1, done.stderr[-4000:]
    assert ours[0].startswith("cmaclip train: 2 optimizer steps in a row had a non-finite loss"), ours
    assert max(losses(output_dir, "train/nonfinite_steps").values()) >= 1
    assert not (output_dir / "model").exists()
    saved = sorted((output_dir / "checkpoints").iterdir())
    assert saved
    if backend == "ddp":
        for folder in saved:
            weights = load_file(folder / "model.safetensors")
            assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point()), folder
    else:
        import torch
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(saved[-1]), tag="pytorch_model")
        assert all(torch.isfinite(t).all() for t in weights.values()), saved[-1]
