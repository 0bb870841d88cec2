"""The fused losses under the trainer's mixed precision: float32 master weights inside ``torch.autocast`` (bf16).

This is how ``opcd distill`` calls them on a GPU (``--dtype auto``): the student's final hidden states and
output weight are float32, autocast is on, the teacher is bf16. The output layer must then run in bf16, as the
model's own ``lm_head`` would, and the gradients must come back float32. CPU autocast reproduces it here (the
Triton path through the interpreter).
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from opcd_cli.kernels.fused_linear_triton import fused_linear_topk_kl_triton  # noqa: E402
from opcd_cli.kernels.naive import naive_topk_kl  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch  # noqa: E402
from opcd_cli.kernels.naive import naive_sparse_target_kl  # noqa: E402
from opcd_cli.kernels.sparse_target import fused_linear_sparse_target_kl  # noqa: E402

from _testing import assert_close  # noqa: E402

N, V, H, M = 11, 1031, 24, 40
FUSED = {"torch": fused_linear_topk_kl_torch, "triton": fused_linear_topk_kl_triton}
BF16_GRAD = (5e-3, 2e-2)  # a bf16 matmul's rounding, compared with the same matmuls done by autocast


def inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=gen)
    ws = torch.randn(V, H, generator=gen) / 2
    ht = torch.randn(N, M, generator=gen).bfloat16()  # the teacher runs in bf16
    wt = (torch.randn(V, M, generator=gen) / 2).bfloat16()
    mask = torch.rand(N, generator=gen) > 0.3
    return hs, ws, ht, wt, mask


def reference(hs, ws, ht, wt, wrt_second=False, **kw):
    """Autograd of the naive loss on logits made by autocast itself."""
    a, b, c, d = (x.clone().requires_grad_(g) for x, g in zip((hs, ws, ht.float(), wt.float()),
                                                              (True, True, wrt_second, wrt_second)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, t = a @ b.T, c @ d.T
    assert z.dtype == t.dtype == torch.bfloat16
    loss = naive_topk_kl(z, t, **kw)
    (loss * 1.5).backward()
    return loss.detach(), a.grad, b.grad, c.grad, d.grad


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("renorm", [False, True])
def test_float32_master_weights_under_bf16_autocast(path, renorm):
    hs, ws, ht, wt, mask = inputs(1)
    loss_ref, gh_ref, gw_ref, _, _ = reference(hs, ws, ht, wt, k=16, mask=mask, renorm=renorm)
    hs_, ws_ = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FUSED[path](hs_, ws_, ht, wt, k=16, mask=mask, renorm=renorm, chunk_size=4)
    (loss * 1.5).backward()
    assert hs_.grad.dtype == ws_.grad.dtype == torch.float32  # gradients of float32 masters stay float32
    assert_close(f"{path} loss", loss_ref, loss, 1e-5, 1e-5)  # same bf16 logits, float32 maths
    assert_close(f"{path} grad hidden", gh_ref, hs_.grad, *BF16_GRAD)
    assert_close(f"{path} grad weight", gw_ref, ws_.grad, *BF16_GRAD)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_second_side_under_autocast(path):
    """The consistency term differentiates the second argument: float32 there too, under autocast."""
    hs, ws, _, _, mask = inputs(2)
    ht, wt = hs.flip(0).clone(), ws.clone() * 0.9
    _, _, _, gh2_ref, gw2_ref = reference(hs, ws, ht, wt, wrt_second=True, k=16, mask=mask)
    h2, w2 = ht.clone().requires_grad_(), wt.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FUSED[path](hs, ws, h2, w2, k=16, mask=mask, chunk_size=4)
    (loss * 1.5).backward()
    assert h2.grad.dtype == w2.grad.dtype == torch.float32
    assert_close(f"{path} grad second hidden", gh2_ref, h2.grad, *BF16_GRAD)
    assert_close(f"{path} grad second weight", gw2_ref, w2.grad, *BF16_GRAD)


def test_sparse_target_under_autocast():
    hs, ws, _, _, mask = inputs(3)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (N, 8), generator=gen)
    lq = torch.log_softmax(torch.randn(N, 8, generator=gen), -1)
    a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = a @ b.T
    naive_sparse_target_kl(ids, lq, z, mask=mask).backward()
    h_, w_ = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_sparse_target_kl(ids, lq, h_, w_, mask=mask, chunk_size=4)
    loss.backward()
    assert h_.grad.dtype == w_.grad.dtype == torch.float32
    assert_close("sparse grad hidden", a.grad, h_.grad, *BF16_GRAD)
    assert_close("sparse grad weight", b.grad, w_.grad, *BF16_GRAD)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_second_backward_is_refused(path):
    """The gradients are scaled in place in the one backward pass; a second one must fail, not double them."""
    hs, ws, ht, wt, _ = inputs(5)
    hs_ = hs.clone().requires_grad_()
    loss = FUSED[path](hs_, ws, ht.float(), wt.float(), k=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
