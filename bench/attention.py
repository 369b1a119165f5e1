"""Sequence-wise attention, fused SDPA vs the naive softmax(QK^T)V, forward + backward.

Batch 32 at the B-size fusion width (512, 8 heads), with the text padding mask, for the two
sequence shapes of the B presets: ViT-B/32 (77 text + 50 image tokens) and ViT-B/16 (77 + 197).
fp32 on CPU, bf16 on CUDA when present. Two measurements per shape:
  core   the attention alone (q, k, v -> output): what the fused kernel replaces;
  block  one whole fusion layer (layer norms, qkv/out projections, MLP, residuals).
The headline (last line) is the core at the B/16 shape: the block adds the same projection and MLP
work to both sides, so its ratio shows how much of a layer the attention is, not the kernel.
Runs are interleaved (fused, naive, fused, ...) and the median is reported.
A roofline line follows: the fused core does 7 [S, S] x d matrix products per head (2 forward,
5 backward, which recomputes the attention instead of storing it), so at this machine's measured
matrix-multiply peak it could not take less than 7 products' time; that bounds the speedup
any fused kernel can reach here, and shows how close torch's is.

The SDPA kernel torch picked for the fused core (profiled at the B/16 shape with the padding
mask) is printed too: on a GPU, which of flash / memory-efficient / cuDNN / math really ran.

    .venv/bin/python bench/attention.py [--backend-only]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cmaclip.model.attention import FusionLayer, fused_attention, reference_attention

BATCH, WIDTH, HEADS, TEXT = 32, 512, 8, 77
SHAPES = {"B/32": 50, "B/16": 197}  # image tokens: [CLS] + patches
REPEATS = {"core": 7, "block": 3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def key_mask(image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Product titles: 8..40 tokens of 77, both modalities present."""
    lengths = torch.randint(8, 41, (BATCH,), generator=generator)
    text = torch.arange(TEXT)[None, :] < lengths[:, None]
    return torch.cat([text, torch.ones(BATCH, image_tokens, dtype=torch.bool)], dim=1).to(DEVICE)


def timed(step) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def core_steps(length: int, mask: torch.Tensor, generator: torch.Generator):
    shape = (BATCH, HEADS, length, WIDTH // HEADS)
    q, k, v = (torch.randn(shape, generator=generator).to(DEVICE, DTYPE).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=generator).to(DEVICE, DTYPE)

    def fused():
        fused_attention(q, k, v, mask).backward(grad)

    def naive():
        reference_attention(q, k, v, mask)[0].backward(grad)

    return fused, naive


def block_steps(length: int, mask: torch.Tensor, generator: torch.Generator):
    torch.manual_seed(0)
    layer = FusionLayer(WIDTH, HEADS, mlp_ratio=4, dropout=0.0).to(DEVICE, DTYPE)
    x = torch.randn(BATCH, length, WIDTH, generator=generator).to(DEVICE, DTYPE).requires_grad_()
    grad = torch.randn(BATCH, length, WIDTH, generator=generator).to(DEVICE, DTYPE)

    def fused():
        layer(x, mask)[0].backward(grad)

    def naive():
        layer(x, mask, reference=True)[0].backward(grad)

    return fused, naive


def measure(fused, naive, repeats: int) -> tuple[float, float]:
    fused(), naive()  # warm-up
    times = {"fused": [], "naive": []}
    for _ in range(repeats):
        times["fused"].append(timed(fused))
        times["naive"].append(timed(naive))
    return statistics.median(times["fused"]), statistics.median(times["naive"])


def matmul_peak() -> float:
    """FLOP/s of a large square matrix product: the machine's practical ceiling."""
    a, b = (torch.randn(2048, 2048, device=DEVICE, dtype=DTYPE) for _ in range(2))
    seconds = statistics.median(timed(lambda: a @ b) for _ in range(7))
    return 2 * 2048**3 / seconds


def sdpa_backend() -> str:
    """The attention kernels (aten ops) the fused core runs at the B/16 shape, padding mask on."""
    generator = torch.Generator().manual_seed(0)
    fused, _ = core_steps(TEXT + SHAPES["B/16"], key_mask(SHAPES["B/16"], generator), generator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fused()
    kernels = sorted({event.name.removeprefix("aten::") for event in profile.events()
                      if "attention" in event.name and event.name.startswith("aten::_")})
    return (f"SDPA backend ({str(DTYPE).removeprefix('torch.')}, padding mask, {DEVICE}): "
            + (", ".join(kernels) or "none found (math fallback)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend-only", action="store_true", help="only print the SDPA kernels that run")
    if parser.parse_args().backend_only:
        print(sdpa_backend())
        return
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"sequence attention, fused SDPA vs naive, forward+backward: batch {BATCH}, width {WIDTH}, "
          f"{HEADS} heads, {str(DTYPE).removeprefix('torch.')} on {device_name}; median of interleaved runs")
    print(f"{'shape':<6} {'tokens':<10} {'part':<6} {'fused ms':>9} {'naive ms':>9} {'speedup':>8}")
    headline = None
    for name, image_tokens in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        length = TEXT + image_tokens
        mask = key_mask(image_tokens, generator)
        for part, build in (("core", core_steps), ("block", block_steps)):
            fused_s, naive_s = measure(*build(length, mask, generator), REPEATS[part])
            speedup = naive_s / fused_s
            print(f"{name:<6} {f'{TEXT}+{image_tokens}':<10} {part:<6} {fused_s * 1e3:9.1f} {naive_s * 1e3:9.1f} "
                  f"{speedup:7.2f}x")
            if name == "B/16" and part == "core":
                headline, fused_b16, naive_b16 = speedup, fused_s, naive_s
    products = 7 * 2 * BATCH * (TEXT + SHAPES["B/16"]) ** 2 * WIDTH  # FLOP of the fused core, all heads
    peak = matmul_peak()
    print(f"roofline (B/16 core): matmul peak {peak / 1e9:.0f} GFLOP/s; fused runs at "
          f"{products / fused_b16 / 1e9:.0f} GFLOP/s ({products / fused_b16 / peak:.0%} of peak); a fused "
          f"kernel at 100% of peak would be {naive_b16 / (products / peak):.2f}x the naive one")
    print(sdpa_backend())
    print(f"attention speedup fused/naive: {headline:.2f}")


if __name__ == "__main__":
    main()
