"""Single-process pieces of training: the optimizer groups, the schedule, checkpoint bookkeeping
(atomic save, keep-last-K, resume=auto), the world-size check, the stop request, progress output."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmaclip import checkpoint
from cmaclip.config import ConfigError, OptimConfig, RunConfig
from cmaclip.distributed import StopRequest, check_world_size
from cmaclip.model import CMAClip, ModelConfig
from cmaclip.train import Monitor, build_optimizer, build_scheduler, lr_factor, parameter_groups

TASKS = {"colour": ["red", "blue", "green"], "kind": ["shirt", "shoe"]}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return CMAClip(ModelConfig(preset="tiny"), TASKS)


def test_parameter_groups_split_backbone_and_exempt_norms_biases_embeddings(tiny_model):
    groups = {group["name"]: group for group in parameter_groups(tiny_model, OptimConfig(lr=1e-3, backbone_lr=1e-5))}
    assert set(groups) == {"backbone", "backbone_no_decay", "new", "new_no_decay"}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    grouped = {names[id(p)]: name for name, group in groups.items() for p in group["params"]}
    assert len(grouped) == len(names)  # every parameter exactly once
    assert grouped["backbone.text_model.embeddings.token_embedding.weight"] == "backbone_no_decay"
    assert grouped["backbone.text_model.embeddings.position_embedding.weight"] == "backbone_no_decay"
    assert grouped["backbone.vision_model.embeddings.class_embedding"] == "backbone_no_decay"
    assert grouped["backbone.text_model.final_layer_norm.weight"] == "backbone_no_decay"
    assert grouped["backbone.text_model.encoder.layers.0.mlp.fc1.bias"] == "backbone_no_decay"
    assert grouped["backbone.text_model.encoder.layers.0.mlp.fc1.weight"] == "backbone"
    assert grouped["modality_embedding"] == "new_no_decay"
    assert grouped["heads.0.net.1.weight"] == "new"
    assert groups["backbone"]["lr"] == 1e-5 and groups["new"]["lr"] == 1e-3
    assert groups["new_no_decay"]["weight_decay"] == 0.0 and groups["new"]["weight_decay"] == 0.05


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, 0, 4, 20, 0.1) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert lr_factor(20, 0, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 0, 4, 20, 0.1) == pytest.approx(0.1)  # past max_steps: stays at the floor


def test_frozen_backbone_has_lr_zero_then_its_own_warmup(tiny_model):
    optim = OptimConfig(lr=1e-3, backbone_lr=1e-4, warmup_steps=2, freeze_backbone_steps=3)
    optimizer = build_optimizer(tiny_model, optim)
    scheduler = build_scheduler(optimizer, optim, max_steps=10)
    seen = []
    for _ in range(6):
        seen.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert [lrs["backbone"] for lrs in seen] == pytest.approx([0, 0, 0, 0.5e-4, 1e-4, lr_factor(5, 3, 2, 10, 0) * 1e-4])
    assert [lrs["new"] for lrs in seen][:3] == pytest.approx([0.5e-3, 1e-3, lr_factor(2, 0, 2, 10, 0) * 1e-3])


class FakeAccelerator:
    """One process: the calls checkpoint.py makes, with save_state writing a small file."""

    def __init__(self, fail_in_save: bool = False):
        self.is_main_process, self.process_index, self.num_processes = True, 0, 1
        self.fail_in_save = fail_in_save
        self.state = SimpleNamespace(deepspeed_plugin=None)

    def wait_for_everyone(self):
        pass

    def save_state(self, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"weights")
        if self.fail_in_save:
            raise KeyboardInterrupt("killed during the save")

    def load_state(self, directory):
        self.loaded = directory


class FakeLoader:
    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    saved = checkpoint.save_checkpoint(FakeAccelerator(), tmp_path, 10, FakeLoader(3), keep_last=2)
    assert saved == tmp_path / "checkpoints" / "step-000000010"
    assert json.loads((saved / "trainer_state.json").read_text()) == {"step": 10, "world_size": 1}
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(FakeAccelerator(fail_in_save=True), tmp_path, 20, FakeLoader(5), keep_last=2)
    assert (tmp_path / "checkpoints" / ".tmp-step-000000020").is_dir()  # the half-written one
    assert checkpoint.resolve_resume("auto", tmp_path) == saved

    loader, accelerator = FakeLoader(), FakeAccelerator()
    assert checkpoint.load_checkpoint(accelerator, saved, loader) == 10
    assert loader.position == 3 and accelerator.loaded == str(saved)

    # the next save clears the leftover staging folder
    checkpoint.save_checkpoint(FakeAccelerator(), tmp_path, 20, FakeLoader(5), keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000010", "step-000000020"]


def test_only_the_last_k_checkpoints_are_kept_and_resave_replaces(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(FakeAccelerator(), tmp_path, step, FakeLoader(step), keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000003", "step-000000004"]
    checkpoint.save_checkpoint(FakeAccelerator(), tmp_path, 4, FakeLoader(99), keep_last=2)
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert torch.load(latest / "loader-rank00000.pt", weights_only=False) == {"position": 99}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000003", "step-000000004"]


def test_resume_settings(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path) is None
    assert checkpoint.resolve_resume("", tmp_path) is None
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        checkpoint.resolve_resume(str(tmp_path), tmp_path)
    saved = checkpoint.save_checkpoint(FakeAccelerator(), tmp_path, 5, FakeLoader(), keep_last=1)
    assert checkpoint.resolve_resume(str(saved), tmp_path) == saved
    with pytest.raises(ConfigError, match="train.resume=auto"):
        checkpoint.resolve_resume("", tmp_path)


def test_a_launcher_that_started_fewer_processes_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="asked for 2 processes.*set up 1"):
        check_world_size(SimpleNamespace(num_processes=1, distributed_type="NO"))
    check_world_size(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_sigusr1_and_sigterm_request_a_stop(sig, monkeypatch):
    from cmaclip import errors

    # the handler records the signal process-wide; later tests in this process must not see it
    monkeypatch.setattr(errors, "received_signal", None)
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop = StopRequest()
        accelerator = SimpleNamespace(num_processes=1)
        assert not stop.agreed(accelerator)
        os.kill(os.getpid(), sig)
        assert stop.agreed(accelerator)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log-file"])
def test_progress_is_a_bar_in_a_terminal_and_lines_in_a_log_file(terminal, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr.isatty", lambda: terminal)
    config = RunConfig()
    config.logging.tensorboard = False
    config.train.max_steps = 20
    monitor = Monitor(config, SimpleNamespace(is_main_process=True), start_step=0)
    monitor.log_step({"loss": 1.23456, "samples_per_second": 99.0, "lr": 1e-3, "data_wait_fraction": 0.05}, 10)
    monitor.close()
    line = "step 10/20: loss 1.2346, 99.0 samples/s, lr 1.00e-03, waiting for data 5%"
    assert (monitor.bar is not None) == terminal
    assert (line in capsys.readouterr().out) != terminal
