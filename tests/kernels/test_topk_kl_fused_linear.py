"""Fused linear top-k reverse KL (torch and Triton paths) against the loss on materialised logits."""

import os

import pytest
import torch

# The Triton kernels run on the CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before opcd_cli.kernels.topk_kl_triton is first imported. (No conftest.py here: it would shadow
# the suite's own conftest module.)
os.environ.setdefault("TRITON_INTERPRET", "1")

from opcd_cli.kernels import fused_linear_topk_reverse_kl  # noqa: E402
from opcd_cli.kernels.fused_linear_triton import chunk_rows, fused_linear_topk_kl_triton  # noqa: E402
from opcd_cli.kernels.naive import naive_topk_kl, topk_ids  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch  # noqa: E402

from _testing import LOSS_TOLERANCE, assert_close, assert_close_norm, tolerance  # noqa: E402

N, V, H, M = 13, 1271, 24, 40
FUSED = {"torch": fused_linear_topk_kl_torch, "triton": fused_linear_topk_kl_triton}


def inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=gen).to(dtype)
    ws = (torch.randn(V, H, generator=gen) / 2).to(dtype)
    ht = torch.randn(N, M, generator=gen).to(dtype)
    wt = (torch.randn(V, M, generator=gen) / 2).to(dtype)
    mask = torch.rand(N, generator=gen) > 0.3
    return hs, ws, ht, wt, mask


def logits_level(hs, ws, ht, wt, chunk, **kw):
    """The loss and gradients through materialised logits, each chunk's logits made as the fused paths make them."""
    z = torch.cat([hs[s : s + chunk] @ ws.T for s in range(0, N, chunk)]).float().requires_grad_()
    t = torch.cat([ht[s : s + chunk] @ wt.T for s in range(0, N, chunk)]).float()
    loss = naive_topk_kl(z, t, **kw)
    (grad_z,) = torch.autograd.grad(loss * 2.5, z)
    return loss.detach(), grad_z @ ws.float(), grad_z.T @ hs.float(), z.detach()


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renorm", [False, True])
def test_matches_logits_level(path, dtype, renorm):
    hs, ws, ht, wt, mask = inputs(dtype, 1)
    chunk = 5
    loss_ref, gh_ref, gw_ref, z = logits_level(hs, ws, ht, wt, chunk, k=16, mask=mask, renorm=renorm)
    hs_, ws_ = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, mass = FUSED[path](hs_, ws_, ht, wt, k=16, mask=mask, renorm=renorm, chunk_size=chunk, return_topk_mass=True)
    (loss * 2.5).backward()  # an upstream gradient other than 1
    assert hs_.grad.dtype == ws_.grad.dtype == dtype
    assert_close(f"{path} loss", loss_ref, loss, *LOSS_TOLERANCE)
    atol, rtol = tolerance(dtype)
    # a bf16 gradient of the hidden states sums H rounded terms; compare relative to the largest entry
    assert_close(f"{path} grad hidden", gh_ref, hs_.grad, atol * 4, rtol)
    assert_close(f"{path} grad weight", gw_ref, ws_.grad, atol * 4, rtol)
    expected_mass = torch.softmax(z, -1).gather(1, topk_ids(z, 16)).sum(-1)[mask].mean()
    assert_close(f"{path} top-k mass", expected_mass, mass, 1e-6, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_and_triton_paths_agree(reduction):
    """Same chunks, same logits: the two implementations give the same loss and gradients (bf16, no mask).

    Both round the logits' gradient to bf16 before the output layer's matmuls (as autograd does for bf16
    logits), each after its own float32 arithmetic, so an entry can round one unit apart (and Triton's interpreter
    truncates float32 to bf16 where a GPU rounds to nearest); the matmul outputs are compared norm-wise (bf16
    operands: under 1e-2)."""
    hs, ws, ht, wt, _ = inputs(torch.bfloat16, 2)
    grads = {}
    for path, fn in FUSED.items():
        hs_, ws_ = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = fn(hs_, ws_, ht, wt, k=64, reduction=reduction, chunk_size=5)
        loss.backward()
        grads[path] = (loss.detach(), hs_.grad, ws_.grad)
    assert_close(f"loss {reduction}", grads["torch"][0], grads["triton"][0], *LOSS_TOLERANCE)
    assert_close_norm(f"grad hidden {reduction}", grads["torch"][1], grads["triton"][1], 1e-2)
    assert_close_norm(f"grad weight {reduction}", grads["torch"][2], grads["triton"][2], 1e-2)


def test_chunk_length_comes_from_the_byte_budget():
    per_row = 1271 * (2 + 4) + 4 * 16  # bf16 student logits, float32 teacher logits, int32 ids
    assert chunk_rows(1271, 16, torch.bfloat16, torch.float32, budget_bytes=10 * per_row) == 10
    assert chunk_rows(1271, 16, torch.bfloat16, torch.float32, budget_bytes=1000 * per_row) == 960  # whole tiles of 64
    assert chunk_rows(1271, 16, torch.float32, torch.float32, budget_bytes=1) == 1
    hs, ws, ht, wt, mask = inputs(torch.float32, 3)
    one_chunk = fused_linear_topk_kl_triton(hs, ws, ht, wt, k=8, mask=mask, chunk_size=N)
    budget = 3 * (1271 * 8 + 4 * 8)  # 3 tokens per chunk
    many_chunks = fused_linear_topk_kl_triton(hs, ws, ht, wt, k=8, mask=mask, chunk_bytes=budget)
    assert_close("loss over 5 chunks", one_chunk, many_chunks, *LOSS_TOLERANCE)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_teacher_requiring_grad_is_refused(path):
    hs, ws, ht, wt, _ = inputs(torch.float32, 4)
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_topk_reverse_kl(hs, ws, ht, wt.requires_grad_(), k=4, backend=path)
    with pytest.raises(ValueError, match="reduction"):
        FUSED[path](hs, ws, ht, wt.detach(), k=4, reduction="none")
