"""Efficiency telemetry of a training run: what the model costs and how well the hardware runs it.

Reported in the run's log (an opening line, every logging step, a closing line) and TensorBoard:
- parameters, trainable and frozen, per part (text encoder, image encoder, new layers);
- model FLOPs per training sample: the forward of one real batch counted by
  torch.utils.flop_counter, times 3 (the backward of every matrix product costs twice its forward:
  the gradient of the input and the gradient of the weight). The usual "model FLOPs" of MFU
  (PaLM, appendix B): recomputation by gradient checkpointing is not counted, nor elementwise work;
- achieved FLOP/s per device (FLOPs per sample x samples/s per device) and MFU, its fraction of the
  device's dense bf16 peak when the device is in PEAK_BF16_FLOPS (no MFU on a CPU or an unknown
  GPU, and the log says so);
- peak memory of rank 0: CUDA max allocated, or the process's peak RSS on a CPU;
- samples/s per device and the share of step time spent waiting for data.
"""
from __future__ import annotations

import dataclasses
import resource
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from cmaclip.data.batch import model_inputs
from cmaclip.data.loader import build_loader

# Dense (no sparsity) bf16 tensor-core peak FLOP/s from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in this order (the first key the name contains wins).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
}
# model FLOPs of a training step per FLOP of its forward (forward 1 + backward 2)
TRAINING_FLOPS_PER_FORWARD = 3
GIB = 2**30


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts its CUDA attention kernels but not the CPU one SDPA picks (with or without a mask)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


class _TrainingFlopCounter(FlopCounterMode):
    """torch's counter (CPU attention included), which also sums apart the FLOPs of the operations
    run without gradients."""

    def __init__(self):
        super().__init__(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        self.without_gradients = 0

    def _count_flops(self, func_packet, out, args, kwargs):  # torch's hook, once per operation
        before = self.get_total_flops()
        out = super()._count_flops(func_packet, out, args, kwargs)
        if not torch.is_grad_enabled():
            self.without_gradients += self.get_total_flops() - before
        return out


def training_flops(model, batch: dict) -> int:
    """Model FLOPs of one training step of `model` over `batch`: 3 x the forward operations run with
    gradients (their backward costs twice the forward) plus once those the model runs without (the
    noisy-title pass's text encoder). One training forward, in a forked random stream (the run's
    does not move) and with the parameters set not to require gradients meanwhile (no graph kept)."""
    was_training = model.training
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    device = requires_grad[0][0].device
    try:
        for parameter, _ in requires_grad:
            parameter.requires_grad_(False)
        model.train()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                _TrainingFlopCounter() as counter:
            model(**model_inputs(batch))
    finally:
        for parameter, required in requires_grad:
            parameter.requires_grad_(required)
        model.train(was_training)
    with_gradients = counter.get_total_flops() - counter.without_gradients
    return TRAINING_FLOPS_PER_FORWARD * with_gradients + counter.without_gradients


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "frozen": n}} for the text encoder, the image encoder (each with its
    projection) and the new layers (sequence and modality attention, heads, embeddings)."""
    counts = {part: {"trainable": 0, "frozen": 0} for part in ("text encoder", "image encoder", "new layers")}
    for name, parameter in model.named_parameters():
        if name.startswith(("backbone.text_model.", "backbone.text_projection.")):
            part = "text encoder"
        elif name.startswith(("backbone.vision_model.", "backbone.visual_projection.")):
            part = "image encoder"
        else:
            part = "new layers"
        kind = "trainable" if parameter.requires_grad else "frozen"
        counts[part][kind] += parameter.numel()
    return {part: count for part, count in counts.items() if count["trainable"] + count["frozen"]}


def peak_bf16_flops(device: torch.device) -> tuple[float | None, str]:
    """(the device's dense bf16 peak FLOP/s, or None when it is not in the table; its name)."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak, name
    return None, name


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: CUDA max allocated on a GPU, peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def mfu(flops_per_sample: float, samples_per_second: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization of one device: achieved model FLOP/s over its peak (None: no peak)."""
    if peak_flops is None:
        return None
    return flops_per_sample * samples_per_second / peak_flops


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count else "0"


class Telemetry:
    """Rank 0's efficiency numbers. Build it before `accelerator.prepare` (it counts the FLOPs on
    the plain model); `window` after each logging window; `closing_line` at the end."""

    def __init__(self, model, config, accelerator):
        self.enabled = accelerator.is_main_process
        self.devices = accelerator.num_processes
        self.device = accelerator.device
        self.parameters = parameter_counts(model)
        self.peak_flops, self.device_name = peak_bf16_flops(self.device)
        self.batch_size = config.train.batch_size
        self.flops_per_sample = self._count_flops(model, config) if self.enabled else 0.0
        self.windows: list[tuple[float, float, float]] = []  # (seconds, samples/s, data-wait share)

    def _count_flops(self, model, config) -> float:
        """Model FLOPs per training sample, counted on the first batch of the training split."""
        loader = build_loader(config.data.shards, config.data.train_split, batch_size=config.train.batch_size,
                              config=dataclasses.replace(config.data, loader="pil", workers=0),
                              image_size=model.config.image_size, train=False, device=self.device)
        model.to(self.device)
        # a DataLoader draws its base seed from torch's generator: the run's random stream must not move
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(loader))
        flops = training_flops(model, batch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return flops / self.batch_size

    # ---- what is reported --------------------------------------------------------------------

    def opening_line(self) -> str:
        trainable = sum(part["trainable"] for part in self.parameters.values())
        frozen = sum(part["frozen"] for part in self.parameters.values())
        parts = ", ".join(f"{name} {_millions(part['trainable'] + part['frozen'])}"
                          for name, part in self.parameters.items())
        peak = (f"MFU against the {self.device_name}'s bf16 peak of {self.peak_flops / 1e12:.0f} TFLOP/s"
                if self.peak_flops else f"no MFU: no bf16 peak known for {self.device_name}")
        return (f"model: {_millions(trainable)} trainable + {_millions(frozen)} frozen parameters ({parts}); "
                f"{self.flops_per_sample / 1e9:.3g} GFLOP per training sample (forward and backward, counted "
                f"on one batch); {peak}")

    def window(self, values: dict[str, float], seconds: float) -> dict[str, float]:
        """The efficiency values of a logging window whose `values` hold samples_per_second (all
        ranks) and data_wait_fraction, and which lasted `seconds`. -> values to log as train/*."""
        per_device = values["samples_per_second"] / self.devices
        self.windows.append((seconds, per_device, values["data_wait_fraction"]))
        out = {"samples_per_second_per_device": per_device,
               "tflops_per_device": self.flops_per_sample * per_device / 1e12,
               "peak_memory_gib": peak_memory_bytes(self.device) / GIB}
        utilization = mfu(self.flops_per_sample, per_device, self.peak_flops)
        if utilization is not None:
            out["mfu"] = utilization
        return out

    @staticmethod
    def step_text(values: dict[str, float]) -> str:
        """The part of a step's log line that `window` added."""
        text = f", {values['tflops_per_device']:.3g} TFLOP/s per device"
        if "mfu" in values:
            text += f" (MFU {values['mfu']:.1%})"
        return text + f", peak memory {values['peak_memory_gib']:.2f} GiB"

    def closing_line(self) -> str:
        """Means over the run's logging windows, the first one (warm-up) left out when there are more."""
        windows = self.windows[1:] if len(self.windows) > 1 else self.windows
        seconds = sum(window[0] for window in windows)
        if not seconds:
            return "efficiency: no logging window completed"
        per_device = sum(s * rate for s, rate, _ in windows) / seconds
        waiting = sum(s * wait for s, _, wait in windows) / seconds
        utilization = mfu(self.flops_per_sample, per_device, self.peak_flops)
        memory = "CUDA max allocated" if self.device.type == "cuda" else "peak RSS"
        return (f"efficiency: {per_device * self.devices:.1f} samples/s ({per_device:.1f} per device x "
                f"{self.devices}), {self.flops_per_sample * per_device / 1e12:.3g} TFLOP/s per device, "
                + (f"MFU {utilization:.1%} of {self.device_name} bf16 peak" if utilization is not None
                   else f"no MFU ({self.device_name}: no bf16 peak known)")
                + f", peak memory {peak_memory_bytes(self.device) / GIB:.2f} GiB (rank 0 {memory}), "
                f"waiting for data {waiting:.0%}")

    def log_start(self, writer, step: int) -> None:
        """The run's constants to TensorBoard: model/* scalars and the opening line as text."""
        if writer is None:
            return
        for part, counts in self.parameters.items():
            for kind, count in counts.items():
                writer.add_scalar(f"model/parameters_{kind}/{part.replace(' ', '_')}", count, step)
        writer.add_scalar("model/gflops_per_sample", self.flops_per_sample / 1e9, step)
        writer.add_text("efficiency/model", self.opening_line(), step)

    def log_end(self, writer, step: int) -> None:
        if writer is not None:
            writer.add_text("efficiency/summary", self.closing_line(), step)
