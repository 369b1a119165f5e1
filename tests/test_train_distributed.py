"""Training in subprocesses on the CPU: DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3 (same losses as
DDP, consolidated export), gradient accumulation, bitwise resume, and the Slurm job on two
simulated nodes with SIGUSR1 preemption, requeue and auto-resume. The same in bf16 (what every GPU
run gets): one process, DDP, ZeRO-2 and ZeRO-3, all on the CPU with the GPUs hidden.

Every run trains the tiny preset on the session's fashion shards (90 training products) for a few
steps, through the command lines users run (`accelerate launch ... -m cmaclip.train`,
`python -m cmaclip.train`, `launchers/slurm/train.sbatch`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmaclip.data.format import load_dataset_info
from cmaclip.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_DIR = REPO / "launchers" / "accelerate"
SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
RECIPE = "configs/cpu-demo.yaml"
STEPS = 8

pytestmark = pytest.mark.slow


def environment() -> dict:
    # one thread per rank (two ranks share the machine), no library warnings, the CPU even on a
    # GPU machine (GPUs hidden), no GPU probing; the temp and build folders: conftest.py
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
            "CUDA_VISIBLE_DEVICES": ""}


def overrides(shards: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"train.max_steps={STEPS}", "train.batch_size=8", "train.save_every=4",
            "train.keep_last=5", "train.eval_every=0", "logging.log_every=1", "logging.progress_bar=false",
            "data.workers=1", "data.eval_split=none", "optim.warmup_steps=2", *extra]


def launch(accelerate_config: str | None, shards: Path, output_dir: Path, *extra: str, launch_flags=(),
           module: str = "cmaclip.train", recipe: str = RECIPE) -> str:
    """One training run through a user's command line: `accelerate launch --config_file
    launchers/accelerate/<accelerate_config> ... -m cmaclip.train`, or with accelerate_config None
    a single process, `python -m cmaclip.train`; `module` and `recipe` pick another command of the
    same loop (cmaclip.pretrain). -> its stdout."""
    launcher = [] if accelerate_config is None else [
        "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_DIR / accelerate_config),
        "--main_process_port", str(free_port()), *launch_flags]
    command = [sys.executable, *launcher, "-m", module, "--config", recipe, *overrides(shards, *extra),
               f"output_dir={output_dir}"]
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
    stdout = launch("cpu.yaml", fashion_shards, output_dir, "train.eval_every=4", "data.eval_split=val")
    assert "training on 2 process(es)" in stdout
    validation = load_dataset_info(fashion_shards).num_samples("val")
    assert f"step 4: eval ({validation} samples): mean accuracy" in stdout and "step 8: eval" in stdout
    return output_dir


def test_launched_processes_write_their_temp_and_build_folders_where_the_suite_cleans_up(tmp_path_factory):
    # where torch elastic's and multiprocessing's folders and DeepSpeed's op build would go
    script = "import os, tempfile; print(tempfile.gettempdir()); print(os.environ['TORCH_EXTENSIONS_DIR'])"
    done = subprocess.run([sys.executable, "-c", script], env=environment(), capture_output=True, text=True,
                          timeout=60, check=True)
    temp_dir, build_dir = done.stdout.split()
    assert Path(temp_dir).is_relative_to(tmp_path_factory.getbasetemp())
    assert Path(build_dir) == Path(sys.prefix) / "torch_extensions"


def test_ddp_on_two_processes_lowers_the_loss(ddp_run, fashion_shards):
    assert_learns(losses(ddp_run))
    tasks = load_dataset_info(fashion_shards).task_names
    for tag in ["train/lr", "train/lr_backbone", "train/samples_per_second", "train/data_wait_fraction",
                *(f"train/loss_{task}" for task in tasks)]:
        assert set(losses(ddp_run, tag)) == set(range(1, STEPS + 1)), tag
    for tag in [*(f"eval/{task}/accuracy" for task in tasks), *(f"modality_weight/{task}/image" for task in tasks)]:
        assert set(losses(ddp_run, tag)) == {4, 8}, tag
    assert {p.name for p in (ddp_run / "checkpoints").iterdir()} == {"step-000000004", "step-000000008"}
    assert (ddp_run / "checkpoints" / "step-000000008" / "loader-rank00001.json").is_file()
    log = (ddp_run / "train.log").read_text()  # rank 0's alone: once each, not once per rank
    assert log.count(" INFO start: 2 process(es)") == 1 and log.count("training on 2 process(es)") == 1, log
    assert log.count("step 8: eval (") == 1 and log.count("efficiency: ") == 1, log


# One update whose size is the raw gradient: Adam's first step is lr * g / (|g| + eps), so with eps
# far above |g| and lr = eps the weights move by -g (AdamW's usual first step, lr * sign(g), would
# hide a gradient summed over micro-batches instead of averaged; so would clipping). The random
# training noise is off: its draws depend on the batch's shape (dropout, modality dropout, noisy titles).
RAW_GRADIENT_STEP = ["train.max_steps=1", "optim.lr=1e4", "optim.backbone_lr=1e4", "optim.eps=1e4",
                     "optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup_steps=0",
                     "model.dropout=0", "model.modality_dropout=0", "model.noisy_title_loss_weight=0",
                     "data.loader=pil", "data.workers=0"]


@pytest.mark.parametrize("accelerate_config", ["cpu.yaml", "cpu-deepspeed.yaml"])
def test_gradient_accumulation_matches_the_large_batch_in_raw_gradients(accelerate_config, fashion_shards, tmp_path):
    """2 processes (DDP, then DeepSpeed ZeRO-2): 2 micro-batches of 4 per rank and step give the
    gradient of batches of 8 (the PIL loader's order and crops do not depend on the batch)."""
    weights = []
    for name, batch, accumulation in (("large", 8, 1), ("accumulated", 4, 2)):
        output_dir = tmp_path / name
        launch(accelerate_config, fashion_shards, output_dir, *RAW_GRADIENT_STEP, f"train.batch_size={batch}",
               f"train.grad_accum_steps={accumulation}")
        weights.append(load_file(output_dir / "model" / "model.safetensors"))
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_resumed_run_matches_the_uninterrupted_one_bitwise(ddp_run, fashion_shards, tmp_path):
    """Resumed from the step-4 checkpoint (and without the original's evaluations, which must not
    touch the training's random stream), steps 5-8 repeat the original's losses and weights."""
    resumed = tmp_path / "resumed"
    stdout = launch("cpu.yaml", fashion_shards, resumed,
                    f"train.resume={ddp_run / 'checkpoints' / 'step-000000004'}")
    assert "resumed from" in stdout and "at step 4" in stdout
    original, again = losses(ddp_run), losses(resumed)
    assert sorted(again) == list(range(5, STEPS + 1))
    assert [again[s] for s in again] == [original[s] for s in again]
    for name, tensor in load_file(resumed / "model" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(ddp_run / "model" / "model.safetensors")[name]), name


@pytest.fixture(scope="module", params=["zero1", "zero2", "zero3", "zero3_offload"])
def zero_run(request, fashion_shards, tmp_path_factory) -> Path:
    """A run with each shipped DeepSpeed config (zero3_offload: Accelerate swaps AdamW for
    DeepSpeedCPUAdam, whose C++ op compiles on first use, about 2 minutes)."""
    output_dir = tmp_path_factory.mktemp(request.param) / "run"
    stdout = launch("cpu-deepspeed.yaml", fashion_shards, output_dir,
                    launch_flags=("--deepspeed_config_file", f"ds_configs/{request.param}.json"))
    assert "DEEPSPEED" in stdout
    return output_dir


def test_deepspeed_zero_matches_ddp(zero_run, ddp_run):
    """Same seed, same data: every ZeRO stage follows DDP's loss curve (up to float summation
    order) and exports the same consolidated fp32 model (ZeRO-3's gathered from its partitions)."""
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


# bf16 on the CPU, through each launcher a GPU run would use: autocast for one process and DDP,
# DeepSpeed's bf16 (bf16 weights, fp32 master copy and communication) for ZeRO-2 and ZeRO-3.
BF16_LAUNCHES = {
    "one process": (None, ()),
    "ddp": ("cpu.yaml", ()),
    "zero2": ("cpu-deepspeed.yaml", ("--deepspeed_config_file", "ds_configs/zero2.json")),
    "zero3": ("cpu-deepspeed.yaml", ("--deepspeed_config_file", "ds_configs/zero3.json")),
}


@pytest.fixture(scope="module")
def bf16_runs(fashion_shards, tmp_path_factory):
    """launch name -> the output_dir of its 8-step bf16 run (each run once, on first use)."""
    runs = {}

    def run(name: str) -> Path:
        if name not in runs:
            accelerate_config, flags = BF16_LAUNCHES[name]
            output_dir = tmp_path_factory.mktemp(f"bf16-{name.replace(' ', '-')}") / "run"
            stdout = launch(accelerate_config, fashion_shards, output_dir, "train.mixed_precision=bf16",
                            launch_flags=flags)
            assert "precision bf16" in stdout and "loader: " in stdout
            runs[name] = output_dir
        return runs[name]

    return run


@pytest.mark.parametrize("name", BF16_LAUNCHES)
def test_bf16_training_learns_and_exports_fp32_weights(name, bf16_runs):
    run = bf16_runs(name)
    assert_learns(losses(run))
    exported = load_file(run / "model" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in exported.values())


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_bf16_deepspeed_resumes_bitwise(name, bf16_runs, fashion_shards, tmp_path):
    """DeepSpeed's bf16 checkpoints hold bf16 weights and fp32 master copies (autocast's hold fp32
    weights, as the fp32 resume test does): steps 5-8 resumed from step 4 repeat the original's."""
    run = bf16_runs(name)
    accelerate_config, flags = BF16_LAUNCHES[name]
    resumed = tmp_path / "resumed"
    launch(accelerate_config, fashion_shards, resumed, "train.mixed_precision=bf16",
           f"train.resume={run / 'checkpoints' / 'step-000000004'}", launch_flags=flags)
    original, again = losses(run), losses(resumed)
    assert sorted(again) == list(range(5, STEPS + 1))
    assert [again[s] for s in again] == [original[s] for s in again]


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_bf16_deepspeed_follows_bf16_ddp(name, bf16_runs):
    """DeepSpeed computes in bf16 weights (autocast keeps fp32 weights), so the curves differ by
    bf16 rounding; reductions in fp32 (communication_data_type) keep that difference small."""
    assert losses(bf16_runs(name)) == pytest.approx(losses(bf16_runs("ddp")), rel=2e-3)


SRUN_STUB = """#!/usr/bin/env bash
# srun for one machine: runs the command once per "node" with SLURM_NODEID set, like srun
# --ntasks-per-node 1 on N nodes, and records each task's pid (to signal one node) and the CPUs per
# task it was given.
echo "${SRUN_CPUS_PER_TASK:-none}" > "$SRUN_CPUS"
while [[ "$1" == --* ]]; do case "$1" in --nodes|--ntasks-per-node) shift 2;; *) shift;; esac; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
  echo $! >> "$SRUN_PIDS"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

SCONTROL_STUB = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo 127.0.0.1; echo 127.0.0.2 ;;
  requeue*) echo "$2" >> "$REQUEUED" ;;
esac
"""


def submit(tmp_path: Path, shards: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    """launchers/slurm/train.sbatch as Slurm would run it on 2 nodes x 1 process, with srun and
    scontrol stubbed for one machine."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "pids").unlink(missing_ok=True)
    env = {**environment(), "PATH": f"{stubs}:{os.environ['PATH']}", "SRUN_PIDS": str(tmp_path / "pids"),
           "REQUEUED": str(tmp_path / "requeued"), "SRUN_CPUS": str(tmp_path / "srun-cpus"),
           "SLURM_CPUS_PER_TASK": "3", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cmaclip",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "1",
           "MAIN_PORT": str(free_port()), "OUTPUT_DIR": str(output_dir), "PYTHON_ENV": sys.prefix}
    env.pop("ACCELERATE_CONFIG", None)  # the script's default: multinode-zero2.yaml
    env.pop("SRUN_CPUS_PER_TASK", None)
    return subprocess.Popen(["bash", str(SBATCH), RECIPE, *overrides(shards, *extra)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_slurm_job_on_two_simulated_nodes_is_preempted_requeued_and_resumed(fashion_shards, tmp_path):
    """train.sbatch -> srun (one task per node, given the job's CPUs per task) -> launch.sh ->
    accelerate launch with the script's default multinode-zero2.yaml, two "nodes" on one machine.
    SIGUSR1 reaches node 1's task only (as a signal may reach one node first): both ranks stop at
    the same step, save, mark the run PREEMPTED, and the job requeues itself; the requeued job
    resumes from that checkpoint (train.resume=auto) and finishes."""
    output_dir = tmp_path / "run"
    job = submit(tmp_path, fashion_shards, output_dir, "train.max_steps=1000", "train.save_every=0")
    deadline = time.time() + 240
    while not losses(output_dir):
        assert time.time() < deadline and job.poll() is None, job.stdout.read() if job.poll() is not None else "slow"
        time.sleep(1)
    node_tasks = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    os.kill(node_tasks[1], signal.SIGUSR1)
    output = job.communicate(timeout=180)[0]
    assert job.returncode == 0, output
    stopped_at = int((output_dir / "PREEMPTED").read_text())
    assert "stopped on SIGUSR1" in output and "requeueing" in output
    assert (tmp_path / "srun-cpus").read_text().split() == ["3"]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    assert 1 <= stopped_at < 1000
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == [f"step-{stopped_at:09d}"]
    assert not (output_dir / "model").exists()

    # the requeued job: the same script, run again, continues to the end and does not requeue
    job = submit(tmp_path, fashion_shards, output_dir, f"train.max_steps={stopped_at + 2}", "train.save_every=0")
    output = job.communicate(timeout=240)[0]
    assert job.returncode == 0, output
    assert f"at step {stopped_at}" in output and "training on 2 process(es) (DistributedType.DEEPSPEED)" in output
    assert max(losses(output_dir)) == stopped_at + 2
    assert not (output_dir / "PREEMPTED").exists()
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    assert (output_dir / "model" / "model.safetensors").is_file()


def elastic_legs(shards: Path, saved_run: Path, output_dir: Path, accelerate_config: str, *flags: str) -> None:
    """Elastic resume of `saved_run`'s 2-rank step-4 checkpoint: 1 rank trains steps 5-6, then 2
    ranks train steps 7-8, saving after every step."""
    (output_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved_run / "checkpoints" / "step-000000004", output_dir / "checkpoints" / "step-000000004")
    for processes, steps in ((1, 6), (2, STEPS)):
        stdout = launch(accelerate_config, shards, output_dir, "train.resume=auto", f"train.max_steps={steps}",
                        "train.save_every=1", launch_flags=("--num_processes", str(processes), *flags))
        assert f"at step {steps - 2}" in stdout and f"training on {processes} process(es)" in stdout


def assert_elastic_epoch_and_curve(shards: Path, output_dir: Path, reference: dict[int, float]) -> None:
    """The first epoch, read by 2, then 1, then 2 ranks, holds every training sample exactly once:
    the checkpoint where it ends lists what each rank consumed (rank 0 also what the earlier legs
    consumed, unmerged, so a sample read twice would show twice). The loss curve goes on like the
    uninterrupted 2-rank run's: each of steps 5-8 within 25% of it (the batches differ, and steps
    5-6 average 8 samples instead of 16), and their mean within 10%."""
    from cmaclip.data.batch import batches_per_epoch, decode

    samples = load_dataset_info(shards).num_samples("train")
    consumed_before_resume = 4 * 2 * 8
    one_rank_steps = batches_per_epoch(samples - consumed_before_resume, 1, 8)
    assert one_rank_steps > 2, "the 1-rank leg must stop mid-epoch for this test to mean anything"
    left = samples - consumed_before_resume - 2 * 8
    epoch_end = 6 + batches_per_epoch(left, 2, 8)
    checkpoint = output_dir / "checkpoints" / f"step-{epoch_end:09d}"
    states = [json.loads((checkpoint / f"loader-rank{rank:05d}.json").read_text()) for rank in range(2)]
    assert all(state["epoch"] == 0 for state in states)
    seen = sorted(int(i) for state in states for i in decode(state["consumed"]))
    assert seen == list(range(samples))

    curve = losses(output_dir)
    assert sorted(curve) == list(range(5, STEPS + 1))
    for step in curve:
        assert curve[step] == pytest.approx(reference[step], rel=0.25), (step, curve, reference)
    mean = sum(curve.values()) / len(curve)
    assert mean == pytest.approx(sum(reference[step] for step in curve) / len(curve), rel=0.10)


@pytest.fixture(scope="module")
def elastic_ddp_run(ddp_run, fashion_shards, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("elastic-ddp") / "run"
    elastic_legs(fashion_shards, ddp_run, output_dir, "cpu.yaml")
    return output_dir


def test_elastic_resume_ddp_two_one_two_ranks(elastic_ddp_run, ddp_run, fashion_shards):
    assert_elastic_epoch_and_curve(fashion_shards, elastic_ddp_run, losses(ddp_run))


@pytest.mark.parametrize("zero_run", ["zero2", "zero3"], indirect=True)
def test_elastic_resume_zero_two_one_two_ranks(zero_run, elastic_ddp_run, fashion_shards, tmp_path, request):
    """As the DDP test, with the optimizer state (ZeRO-3: also the weights) partitioned by rank:
    each change of world size goes through DeepSpeed's universal checkpoint. Same batches as the
    elastic DDP run, whose optimizer state is whole: the same losses (up to float summation order)
    show that the weights, Adam moments and each parameter group's lr and weight decay arrived."""
    output_dir = tmp_path / "elastic"
    stage = f"ds_configs/{request.node.callspec.params['zero_run']}.json"
    elastic_legs(fashion_shards, zero_run, output_dir, "cpu-deepspeed.yaml", "--deepspeed_config_file", stage)
    assert_elastic_epoch_and_curve(fashion_shards, output_dir, losses(zero_run))
    assert losses(output_dir) == pytest.approx(losses(elastic_ddp_run), rel=5e-3)
    assert not list((output_dir / "checkpoints").glob(".tmp-*"))
