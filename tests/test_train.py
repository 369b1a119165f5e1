"""Single-process pieces of training: the optimizer groups, the schedule, the world-size check, the
stop request, progress output (checkpoint bookkeeping: test_checkpoint.py)."""
from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch

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
