"""bf16 mixed precision on the CPU: the code paths every GPU run takes (`mixed_precision: auto` is
bf16 wherever CUDA supports it), exercised where torch allows bf16 autocast without a GPU."""
from __future__ import annotations

import pytest
import torch

from cmaclip.model import CMAClip, ModelConfig

TASKS = {"colour": ["red", "blue", "green"], "kind": ["shirt", "shoe"]}


@pytest.fixture
def bf16_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # the next Accelerator starts afresh


def test_accelerate_bf16_forward_and_backward(bf16_accelerator):
    """Accelerate wraps forward in convert_outputs_to_fp32, which rebuilds the output dict from one
    mapping: CMAClipOutput must take that (it crashed the first step of every GPU run)."""
    torch.manual_seed(0)
    model = bf16_accelerator.prepare(CMAClip(ModelConfig(preset="tiny"), TASKS).train())
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[1, 2] = 49406, 300, 49407
    ids[0, 1] = 49407
    mask = (ids != 0).long()
    out = model(torch.randn(2, 3, 64, 64), ids, mask, labels=torch.tensor([[0, 1], [2, -1]]))
    assert out.logits["colour"].dtype == torch.float32 and out.modality_weights.dtype == torch.float32
    assert out.text_length == 3 and set(out.task_losses) == set(TASKS) and out.attentions is None
    bf16_accelerator.backward(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
