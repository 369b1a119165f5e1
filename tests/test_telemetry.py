"""Efficiency telemetry: FLOP counts of known layers, the MFU arithmetic and peak table, and a
short training run that reports them in its log lines and TensorBoard."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cmaclip import telemetry
from cmaclip.config import RunConfig
from cmaclip.model import CMAClip, ModelConfig
from cmaclip.telemetry import CPU_ATTENTION_FLOPS, mfu, parameter_counts, peak_bf16_flops

TASKS = {"colour": ["red", "blue", "green"], "kind": ["shirt", "shoe"]}


def counted(function) -> int:
    """torch's count of what `function` runs, with the CPU attention kernels telemetry adds."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        function()
    return counter.get_total_flops()


def test_a_linear_layer_costs_two_flops_per_multiply_add_forward_and_twice_that_backward():
    layer, x = nn.Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    assert counted(lambda: layer(x)) == 2 * 4 * 16 * 8
    out = layer(x)
    assert counted(lambda: out.sum().backward()) == 2 * (2 * 4 * 16 * 8)  # input and weight gradients


def test_masked_attention_on_the_cpu_is_counted():
    """torch's counter knows only the CUDA attention kernels; SDPA on a CPU picks another one."""
    batch, heads, length, dim = 2, 4, 10, 16
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    # QK^T and (softmax)V: two [S, S] x d products per head
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == 2 * (2 * batch * heads * length * length * dim)


@pytest.mark.parametrize("noisy_title_loss_weight, lengths", [(0.0, [5, 9, 12, 7]), (1.0, [60, 77, 70, 65])])
def test_the_counted_training_step_is_the_model_forward_and_backward(noisy_title_loss_weight, lengths):
    """Long titles for the noisy-title pass: its text encoder, run without gradients, must count once."""
    torch.manual_seed(0)
    model = CMAClip(ModelConfig(preset="tiny", dropout=0.0, noisy_title_loss_weight=noisy_title_loss_weight), TASKS)
    lengths = torch.tensor(lengths)
    batch = {"pixel_values": torch.randn(4, 3, 64, 64),
             "input_ids": torch.randint(1, 49000, (4, 77)),
             "attention_mask": (torch.arange(77) < lengths[:, None]).long(),
             "modality_mask": torch.ones(4, 2, dtype=torch.bool)}
    labels = torch.zeros(4, 2, dtype=torch.long)
    torch.manual_seed(1)
    random_draw = torch.rand(1)
    torch.manual_seed(1)
    estimated = telemetry.training_flops(model, batch)
    assert model.training and torch.equal(torch.rand(1), random_draw)  # the mode and the random stream as they were
    step = counted(lambda: model(**batch, labels=labels).loss.backward())
    # near, not equal: the patch embedding's input gradient is never computed (less), the attention
    # backward recomputes the attention (more); on the tiny model the two come within 1%
    assert step == pytest.approx(estimated, rel=0.02)


def test_parameter_counts_per_part_split_trainable_and_frozen():
    torch.manual_seed(0)
    model = CMAClip(ModelConfig(preset="tiny"), TASKS)
    for parameter in model.backbone.text_model.parameters():
        parameter.requires_grad_(False)
    counts = parameter_counts(model)
    assert set(counts) == {"text encoder", "image encoder", "new layers"}
    assert counts["text encoder"]["frozen"] == sum(p.numel() for p in model.backbone.text_model.parameters())
    assert counts["text encoder"]["trainable"] == model.backbone.text_projection.weight.numel()
    assert counts["image encoder"]["frozen"] == 0
    assert sum(c["trainable"] + c["frozen"] for c in counts.values()) == sum(p.numel() for p in model.parameters())


def test_mfu_is_achieved_model_flops_over_the_bf16_peak(monkeypatch):
    # 1 GFLOP per sample at 400 samples/s on a 989 TFLOP/s H100 SXM
    assert mfu(1e9, 400.0, 989e12) == pytest.approx(4e11 / 989e12)
    assert mfu(1e9, 400.0, None) is None
    assert peak_bf16_flops(torch.device("cpu")) == (None, "CPU")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-32GB", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_bf16_flops(torch.device("cuda", 0)) == (peak, name)


def test_window_values_and_the_closing_line_leave_out_the_warm_up():
    meter = telemetry.Telemetry.__new__(telemetry.Telemetry)
    meter.devices, meter.device, meter.flops_per_sample, meter.windows = 2, torch.device("cpu"), 1e9, []
    meter.peak_flops, meter.device_name = 100e12, "a GPU"
    values = meter.window({"samples_per_second": 400.0, "data_wait_fraction": 0.5}, seconds=10.0)  # warm-up
    assert values["samples_per_second_per_device"] == 200.0
    assert values["tflops_per_device"] == pytest.approx(0.2)
    assert values["mfu"] == pytest.approx(0.002)
    assert values["peak_memory_gib"] > 0
    meter.window({"samples_per_second": 800.0, "data_wait_fraction": 0.1}, seconds=1.0)
    meter.window({"samples_per_second": 1600.0, "data_wait_fraction": 0.4}, seconds=1.0)
    line = meter.closing_line()
    # time-weighted means of the last two windows: 600 samples/s per device, waiting 25%
    assert "1200.0 samples/s (600.0 per device x 2)" in line and "0.6 TFLOP/s per device" in line
    assert "MFU 0.6% of a GPU bf16 peak" in line and "waiting for data 25%" in line


def test_a_training_run_reports_its_efficiency(fashion_shards, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cmaclip.train import fit

    monkeypatch.setattr("sys.stderr.isatty", lambda: False)  # step lines, as in a log file
    config = RunConfig()
    config.data.shards, config.data.workers, config.data.eval_split = str(fashion_shards), 0, "none"
    config.train.max_steps, config.train.batch_size, config.train.export = 4, 8, False
    config.logging.log_every, config.output_dir = 2, str(tmp_path / "run")
    fit(config)
    out = capsys.readouterr().out
    assert "trainable + 0 frozen parameters (text encoder" in out
    assert "GFLOP per training sample" in out and "no MFU: no bf16 peak known for CPU" in out
    assert "step 4/4: loss" in out and "TFLOP/s per device, peak memory" in out
    assert "efficiency: " in out and "no MFU (CPU: no bf16 peak known)" in out
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ["train/samples_per_second_per_device", "train/tflops_per_device", "train/peak_memory_gib",
                "model/gflops_per_sample", "model/parameters_trainable/image_encoder"]:
        assert tag in scalars, tag
    assert "train/mfu" not in scalars
    assert events.Scalars("model/gflops_per_sample")[0].value > 0


@pytest.mark.gpu
def test_fp32_matrix_products_use_tf32_on_cuda():
    from cmaclip.distributed import make_accelerator

    make_accelerator(RunConfig())
    assert torch.get_float32_matmul_precision() == "high"
