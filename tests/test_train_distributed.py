"""Multi-process training on the CPU: DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3, bitwise resume,
two simulated nodes through the Slurm launch script, SIGUSR1 preemption, the exported model.

Every run trains the tiny preset on the session's fashion shards (90 training products) for a few
steps, through the same `accelerate launch ... -m cmaclip.train` command line users run.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_DIR = REPO / "launchers" / "accelerate"
LAUNCH_SCRIPT = REPO / "launchers" / "slurm" / "launch.sh"
STEPS = 8

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict:
    # one thread per rank (two ranks share the machine), no library warnings, no GPU probing
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}


def run_args(shards: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/cpu-demo.yaml", f"data.shards={shards}", f"output_dir={output_dir}",
            f"train.max_steps={STEPS}", "train.batch_size=8", "train.save_every=4", "train.keep_last=5",
            "train.eval_every=0", "logging.log_every=1", "logging.progress_bar=false", "data.workers=1",
            "data.eval_split=none", "optim.warmup_steps=2", *extra]


def launch(accelerate_config: str, shards: Path, output_dir: Path, *extra: str, launch_flags=()) -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ACCELERATE_DIR / accelerate_config), "--main_process_port", str(free_port()), *launch_flags,
               "-m", "cmaclip.train", *run_args(shards, output_dir, *extra)]
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def losses(output_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    """{step: value} of a TensorBoard scalar written by rank 0 ({} while there is none yet)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (output_dir / "tensorboard").is_dir():
        return {}
    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in events.Scalars(tag)}


def assert_learns(curve: dict[int, float]) -> None:
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = (curve[1] + curve[2]) / 2, (curve[STEPS - 1] + curve[STEPS]) / 2
    assert last < 0.9 * first, curve


@pytest.fixture(scope="module")
def ddp_run(fashion_shards, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("ddp") / "run"
    stdout = launch("cpu.yaml", fashion_shards, output_dir)
    assert "training on 2 process(es)" in stdout
    return output_dir


def test_ddp_on_two_processes_lowers_the_loss(ddp_run):
    assert_learns(losses(ddp_run))
    assert set(losses(ddp_run, "train/samples_per_second")) == set(range(1, STEPS + 1))
    assert {p.name for p in (ddp_run / "checkpoints").iterdir()} == {"step-000000004", "step-000000008"}
    assert (ddp_run / "checkpoints" / "step-000000008" / "loader-rank00001.pt").is_file()


def test_resumed_run_matches_the_uninterrupted_one_bitwise(ddp_run, fashion_shards, tmp_path):
    resumed = tmp_path / "resumed"
    stdout = launch("cpu.yaml", fashion_shards, resumed,
                    f"train.resume={ddp_run / 'checkpoints' / 'step-000000004'}")
    assert "resumed from" in stdout and "at step 4" in stdout
    original, again = losses(ddp_run), losses(resumed)
    assert sorted(again) == list(range(5, STEPS + 1))
    assert [again[s] for s in again] == [original[s] for s in again]
    for name, tensor in load_file(resumed / "model" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(ddp_run / "model" / "model.safetensors")[name]), name


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, fashion_shards, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp(f"zero{request.param}") / "run"
    stdout = launch("cpu-deepspeed.yaml", fashion_shards, output_dir,
                    launch_flags=("--deepspeed_config_file", f"ds_configs/zero{request.param}.json"))
    assert "DEEPSPEED" in stdout
    return output_dir


def test_deepspeed_zero_matches_ddp(zero_run, ddp_run):
    """Same seed, same data: ZeRO-2/3 follow DDP's loss curve (up to float summation order) and
    export the same consolidated fp32 model (ZeRO-3's gathered from its partitions)."""
    curve, reference = losses(zero_run), losses(ddp_run)
    assert_learns(curve)
    assert curve == pytest.approx(reference, rel=1e-4)
    exported = load_file(zero_run / "model" / "model.safetensors")
    expected = load_file(ddp_run / "model" / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4)


def test_deepspeed_export_loads_in_a_fresh_process_without_deepspeed(zero_run, tmp_path):
    script = (
        "import sys, torch\n"
        "from cmaclip.model import CMAClip\n"
        f"model = CMAClip.from_pretrained({str(zero_run / 'model')!r}).eval()\n"
        "assert 'deepspeed' not in sys.modules\n"
        "size = model.config.image_size\n"
        "ids = torch.zeros(2, 77, dtype=torch.long); ids[:, 0], ids[:, 1] = 49406, 49407\n"
        "mask = (torch.arange(77) < 2).long().expand(2, -1)\n"
        "out = model(torch.zeros(2, 3, size, size), ids, mask)\n"
        "assert all(torch.isfinite(v).all() for v in out.logits.values())\n"
        "print(list(model.tasks))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "masterCategory" in done.stdout


def start_node(rank: int, port: int, shards: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**environment(), "NUM_NODES": "2", "PROCS_PER_NODE": "1", "NODE_RANK": str(rank),
           "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": str(port),
           "ACCELERATE_CONFIG": str(ACCELERATE_DIR / "cpu.yaml"),
           "ACCELERATE": str(Path(sys.executable).parent / "accelerate")}
    return subprocess.Popen(["bash", str(LAUNCH_SCRIPT), *run_args(shards, output_dir, *extra)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_simulated_nodes_stop_on_sigusr1_and_resume(fashion_shards, tmp_path):
    """The Slurm launch line on two "nodes" (machine ranks 0 and 1 on 127.0.0.1). SIGUSR1 reaches
    node 1's launch script only (as a signal may reach one node first): both ranks stop at the
    same step, save a checkpoint, mark the run PREEMPTED and exit 0; a relaunch resumes it."""
    output_dir = tmp_path / "run"
    long_run = ("train.max_steps=1000", "train.save_every=0")
    port = free_port()
    nodes = [start_node(rank, port, fashion_shards, output_dir, *long_run) for rank in (0, 1)]
    deadline = time.time() + 240
    while not losses(output_dir):
        assert time.time() < deadline and all(node.poll() is None for node in nodes), "training never started"
        time.sleep(1)
    nodes[1].send_signal(signal.SIGUSR1)
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    stopped_at = int((output_dir / "PREEMPTED").read_text())
    assert "stopped on SIGUSR1" in outputs[0]
    assert 1 <= stopped_at < 1000
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == [f"step-{stopped_at:09d}"]
    assert not (output_dir / "model").exists()

    # the requeued job: the same command with train.resume=auto runs on to the end
    finish = (f"train.max_steps={stopped_at + 2}", "train.save_every=0", "train.resume=auto")
    port = free_port()
    nodes = [start_node(rank, port, fashion_shards, output_dir, *finish) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert f"at step {stopped_at}" in outputs[0]
    assert "training on 2 process(es)" in outputs[0]
    assert max(losses(output_dir)) == stopped_at + 2
    assert not (output_dir / "PREEMPTED").exists()
    assert (output_dir / "model" / "model.safetensors").is_file()
