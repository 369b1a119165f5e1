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
