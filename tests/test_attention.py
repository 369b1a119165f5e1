"""Sequence-wise attention: the fused SDPA path against the explicit reference."""
import pytest
import torch

from cmaclip.model.attention import SequenceAttention, fused_attention, reference_attention


def padded_key_mask(lengths, text_positions, image_positions, image_present=None):
    """[B, S] key mask of a [text; image] sequence: text up to each length, image if present."""
    text = torch.arange(text_positions)[None, :] < torch.tensor(lengths)[:, None]
    present = torch.ones(len(lengths), dtype=torch.bool) if image_present is None else torch.tensor(image_present, dtype=torch.bool)
    return torch.cat([text, present[:, None].expand(-1, image_positions)], dim=1)


def test_fused_core_equals_reference_with_padding():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 30, 16) for _ in range(3))
    key_mask = padded_key_mask([5, 20, 12], text_positions=20, image_positions=10, image_present=[1, 1, 0])
    expected, weights = reference_attention(q, k, v, key_mask)
    assert (fused_attention(q, k, v, key_mask) - expected).abs().max() < 1e-5
    assert torch.all(weights[~key_mask[:, None, None, :].expand_as(weights)] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 30))


def test_sequence_attention_fused_equals_reference_forward_and_backward(untrained_fusion):
    torch.manual_seed(0)
    block = untrained_fusion(SequenceAttention(width=64, heads=4, layers=2)).eval()
    x = torch.randn(3, 30, 64, requires_grad=True)
    key_mask = padded_key_mask([5, 20, 12], text_positions=20, image_positions=10, image_present=[1, 1, 0])

    fused, none = block(x, key_mask)
    (fused_grad,) = torch.autograd.grad(fused.square().sum(), x)
    reference, attentions = block(x, key_mask, return_attentions=True)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)

    assert none is None and len(attentions) == 2 and attentions[0].shape == (3, 4, 30, 30)
    assert (fused - reference).abs().max() < 1e-5
    assert (fused_grad - reference_grad).abs().max() < 1e-4


def test_padding_positions_do_not_change_real_outputs(untrained_fusion):
    torch.manual_seed(0)
    block = untrained_fusion(SequenceAttention(width=32, heads=2, layers=2)).eval()
    x = torch.randn(1, 12, 32)
    key_mask = padded_key_mask([4], text_positions=8, image_positions=4)
    noisy = x.clone()
    noisy[0, 4:8] = torch.randn(4, 32) * 100  # whatever sits in the padded slots
    out, _ = block(x, key_mask)
    out_noisy, _ = block(noisy, key_mask)
    real = key_mask[0]
    assert (out[0, real] - out_noisy[0, real]).abs().max() < 1e-5


def test_sample_without_any_key_gives_finite_outputs(untrained_fusion):
    block = untrained_fusion(SequenceAttention(width=32, heads=2, layers=1)).eval()
    key_mask = torch.zeros(2, 10, dtype=torch.bool)
    key_mask[1, :3] = True
    out, _ = block(torch.randn(2, 10, 32), key_mask)
    ref, _ = block(torch.randn(2, 10, 32), key_mask, return_attentions=True)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()


def test_gradient_checkpointing_gives_the_same_gradients(untrained_fusion):
    torch.manual_seed(0)
    block = untrained_fusion(SequenceAttention(width=32, heads=2, layers=2)).train()
    x = torch.randn(2, 10, 32)
    key_mask = padded_key_mask([3, 6], text_positions=6, image_positions=4)
    block(x, key_mask)[0].sum().backward()
    plain = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    block.gradient_checkpointing = True
    block(x, key_mask)[0].sum().backward()
    for a, p in zip(plain, block.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


@pytest.mark.gpu
def test_cuda_bf16_attention_matches_reference_and_uses_fused_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 8, 77 + 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    key_mask = padded_key_mask([10, 77, 30, 5, 60, 77, 1, 40], 77, 197).cuda()
    expected, _ = reference_attention(q.float(), k.float(), v.float(), key_mask)
    assert (fused_attention(q, k, v, key_mask).float() - expected).abs().max() < 2e-2

    # no mask (equal-length texts after trimming): Flash must be usable
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = fused_attention(q, k, v, None)
    assert (out.float() - reference_attention(q.float(), k.float(), v.float(), None)[0]).abs().max() < 2e-2
    # padding mask: the memory-efficient kernel takes it (Flash does not take masks)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = fused_attention(q, k, v, key_mask)
    assert (out.float() - expected).abs().max() < 2e-2


@pytest.mark.gpu
def test_cuda_bf16_autocast_sequence_attention_matches_its_reference_path(untrained_fusion):
    torch.manual_seed(0)
    block = untrained_fusion(SequenceAttention(width=512, heads=8, layers=2)).cuda().eval()
    x = torch.randn(8, 77 + 50, 512, device="cuda")
    key_mask = padded_key_mask([10, 77, 30, 5, 60, 77, 1, 40], 77, 50).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused, _ = block(x, key_mask)
        reference, _ = block(x, key_mask, return_attentions=True)
    assert torch.isfinite(fused).all()
    assert (fused.float() - reference.float()).abs().max() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn-allowed", "cudnn-off"])
@pytest.mark.parametrize("masked", [True, False], ids=["padding-mask", "no-mask"])
def test_cuda_bf16_backward_through_the_packed_qkv_view(masked, cudnn):
    """SelfAttention hands SDPA q, k, v as strided views into one packed projection (no copies);
    the fused kernels torch picks on this GPU (cuDNN too, unless train.cudnn_attention=false) must
    give finite gradients of the input and of every weight, matching the explicit fp32 path."""
    torch.manual_seed(0)
    block = SequenceAttention(width=512, heads=8, layers=2).cuda().train()
    with torch.no_grad():  # the zero-initialised residual branches would hide the attention's gradients
        for parameter in block.parameters():
            parameter.normal_(0, 0.05)
    x = torch.randn(8, 77 + 50, 512, device="cuda", requires_grad=True)
    key_mask = padded_key_mask([10, 77, 30, 5, 60, 77, 1, 40], 77, 50).cuda() if masked else None

    def gradients(**kwargs):
        block.zero_grad()
        x.grad = None
        out, _ = block(x, key_mask, **kwargs)
        out.float().square().mean().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    expected = gradients(return_attentions=True)  # explicit softmax(QK^T)V in fp32
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = gradients()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    for got, want in zip(fused, expected):
        assert torch.isfinite(got).all()
        assert (got.float() - want).norm() <= 0.05 * want.norm() + 1e-6
