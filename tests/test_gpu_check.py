"""bench/gpu_check.sh: shell-checked, and its --cpu dry run goes through every part on the CPU."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_gpu_check_passes_shellcheck():
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_the_gpu_check_dry_runs_on_the_cpu(tmp_path):
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu", "--steps", "4", "--out", str(tmp_path)], env=environment,
                          capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    for expected in ["attention: ok", "SDPA backend (float32, padding mask, cpu): _scaled_dot_product_flash_attention_for_cpu",
                     "shards: ok", "ddp: ok", "zero2: ok", "training on 2 process(es) (DistributedType.DEEPSPEED)",
                     "no MFU (CPU: no bf16 peak known)", "failed parts: 0"]:
        assert expected in summary, expected
    assert summary.count("efficiency: ") == 2  # one closing line per training run
