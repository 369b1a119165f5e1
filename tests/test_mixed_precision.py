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

    # Accelerate's state is process-wide: start from none (a test before may have made one) and
    # leave none behind
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


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


def test_device_is_what_the_launch_asked_for_not_whether_a_gpu_exists(monkeypatch):
    from cmaclip import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert distributed.launch_device() == "cuda"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate config use_cpu: true
    assert distributed.launch_device() == "cpu"
    assert distributed.resolve_mixed_precision("auto", "cpu") == "no"
    assert distributed.resolve_mixed_precision("bf16", "cpu") == "bf16"


def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    from cmaclip import distributed

    def is_bf16_supported(including_emulation=True):
        return including_emulation  # a V100: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert distributed.resolve_mixed_precision("auto", "cuda") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert distributed.resolve_mixed_precision("auto", "cuda") == "bf16"
    assert distributed.resolve_mixed_precision("no", "cuda") == "no"


def test_quiet_libraries_lets_attention_kernel_and_nccl_warnings_through():
    import warnings

    from cmaclip.distributed import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        quiet_libraries()
        for message in ("Memory efficient kernel not used because: ...", "Flash attention kernel not used because",
                        "ProcessGroupNCCL: NCCL_ASYNC_ERROR_HANDLING is deprecated", "a torch deprecation"):
            warnings.warn_explicit(message, UserWarning, "functional.py", 1, module="torch.nn.functional")
    assert [str(w.message) for w in caught] == ["Memory efficient kernel not used because: ...",
                                                "Flash attention kernel not used because",
                                                "ProcessGroupNCCL: NCCL_ASYNC_ERROR_HANDLING is deprecated"]


def test_adamw_kernel_follows_the_device_and_zero_offload():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cmaclip.distributed import adamw_implementation

    def accelerator(device, offload=None):
        zero = {} if offload is None else {"offload_optimizer": {"device": offload}}
        return SimpleNamespace(device=torch.device(device), distributed_type=(
            DistributedType.MULTI_GPU if offload is None else DistributedType.DEEPSPEED),
            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": zero})))
    assert adamw_implementation(accelerator("cuda")) == {"fused": True}
    assert adamw_implementation(accelerator("cpu")) == {"foreach": True}
    assert adamw_implementation(accelerator("cuda", offload="none")) == {"fused": True}
    assert adamw_implementation(accelerator("cuda", offload="cpu")) == {}


def test_cudnn_attention_switch():
    from accelerate.state import AcceleratorState

    from cmaclip.config import RunConfig
    from cmaclip.distributed import make_accelerator

    config = RunConfig()
    config.train.cudnn_attention = False
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        make_accelerator(config)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
        AcceleratorState._reset_state(reset_partial_state=True)


def test_evaluation_under_bf16_autocast_agrees_with_fp32(bf16_accelerator, fashion_shards):
    from cmaclip.data.config import DataConfig
    from cmaclip.data.format import load_dataset_info
    from cmaclip.data.loader import build_loader
    from cmaclip.evaluate import evaluate_model

    info = load_dataset_info(fashion_shards)
    torch.manual_seed(0)
    model = CMAClip(ModelConfig(preset="tiny"), info.tasks)
    results = [evaluate_model(model, build_loader(fashion_shards, "val", config=DataConfig(loader="pil", workers=0),
                                                  batch_size=16, image_size=model.config.image_size, train=False),
                              accelerator, pictures=1)
               for accelerator in (None, bf16_accelerator)]
    fp32, bf16 = (result.metrics["mean"] for result in results)
    assert results[1].num_samples == results[0].num_samples == info.num_samples("val")
    assert bf16["accuracy"] == pytest.approx(fp32["accuracy"], abs=0.05)
    assert len(results[1].pictures) == 1
