"""Tolerances and a comparison that names the tensor and reports its errors."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype of the inputs: float32 work is exact up to reduction order; a bf16 or fp16
# gradient is rounded to its dtype once, so its error is about one unit in the last place.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (2e-3, 1.6e-2),
}
# The loss itself is accumulated in float32 whatever the input dtype.
LOSS_TOLERANCE = (2e-5, 2e-5)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> None:
    """Elementwise |got - ref| <= atol + rtol * |ref|, reporting the worst absolute and relative error."""
    ref = torch.as_tensor(ref).detach().double().cpu()
    got = torch.as_tensor(got).detach().double().cpu()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.equal(torch.isfinite(ref), torch.isfinite(got)), f"{name}: finite entries differ from the reference"
    finite = torch.isfinite(ref)
    assert torch.equal(ref[~finite], got[~finite]), f"{name}: non-finite entries differ from the reference"
    err = (got - ref)[finite].abs()
    abs_err = err.max().item() if err.numel() else 0.0
    scale = ref[finite].abs().max().item() if err.numel() else 0.0
    rel_err = abs_err / scale if scale > 0 else abs_err
    report = f"{name}: max abs err {abs_err:.3e}, rel err {rel_err:.3e} (atol {atol:.1e}, rtol {rtol:.1e})"
    print(report)
    bad = err > atol + rtol * ref[finite].abs()
    assert not bad.any(), f"{report}; {int(bad.sum())} of {err.numel()} elements out of tolerance"


def assert_close_norm(name: str, ref: torch.Tensor, got: torch.Tensor, limit: float) -> None:
    """||got - ref|| / ||ref|| <= limit (for matmul outputs of rounded operands, where an elementwise relative
    bound is meaningless: one rounding flip of an operand moves entries that cancel to near zero)."""
    ref = torch.as_tensor(ref).detach().double().cpu()
    got = torch.as_tensor(got).detach().double().cpu()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries"
    err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    print(f"{name}: norm-wise rel err {err:.3e} (limit {limit:.1e})")
    assert err <= limit, f"{name}: norm-wise relative error {err:.3e} > {limit:.1e}"


def check_fused_linear_against_logits(label: str, fused_fn, naive_fn, dtype, V: int, k: int = 16, **kw) -> None:
    """A fused linear top-k KL (``fused_fn(h1, w1, h2, w2, k=, mask=, chunk_size=4, **kw)``) against
    ``naive_fn(a, b, k=, mask=, **kw)`` on the logits made 4 rows at a time as the fused path makes them: the
    loss, and all four gradients (the logits' gradients taken back through the matmuls in float32)."""
    gen = torch.Generator().manual_seed(11)
    n, h = 11, 24
    tensors = [torch.randn(n, h, generator=gen).to(dtype), (torch.randn(V, h, generator=gen) / 2).to(dtype),
               torch.randn(n, h, generator=gen).to(dtype), (torch.randn(V, h, generator=gen) / 2).to(dtype)]
    mask = torch.rand(n, generator=gen) > 0.3
    leaves = [x.clone().requires_grad_() for x in tensors]
    loss = fused_fn(*leaves, k=k, mask=mask, chunk_size=4, **kw)
    (loss * 1.5).backward()
    a = torch.cat([(tensors[0][s:s + 4] @ tensors[1].T).float() for s in range(0, n, 4)]).requires_grad_()
    b = torch.cat([(tensors[2][s:s + 4] @ tensors[3].T).float() for s in range(0, n, 4)]).requires_grad_()
    loss_ref = naive_fn(a, b, k=k, mask=mask, **kw)
    ga, gb = torch.autograd.grad(loss_ref * 1.5, (a, b))
    refs = [ga @ tensors[1].float(), ga.T @ tensors[0].float(), gb @ tensors[3].float(), gb.T @ tensors[2].float()]
    assert_close(f"{label} loss", loss_ref, loss, *LOSS_TOLERANCE)
    atol, rtol = tolerance(dtype)
    for name, ref, leaf in zip(("h1", "w1", "h2", "w2"), refs, leaves):
        assert_close(f"{label} grad {name}", ref, leaf.grad, atol * 4, rtol)


def loss_and_grads(fn, first, second, upstream_N, **kw):
    """Per-token losses ``fn(first, second, reduction="none", **kw)`` and the gradients of their sum weighted by
    ``upstream_N`` with respect to both logits (fresh leaves)."""
    a, b = first.detach().clone().requires_grad_(), second.detach().clone().requires_grad_()
    loss_N = fn(a, b, reduction="none", **kw)
    (loss_N * upstream_N).sum().backward()
    return loss_N.detach(), a.grad, b.grad


def check_against_naive(label: str, fn, naive_fn, first, second, mask_N, upstream_N, loss_kw: dict, **fn_kw) -> None:
    """``fn`` against ``naive_fn`` (both with ``loss_kw`` and the mask; ``fn`` also with ``fn_kw``): per-token
    losses within the loss tolerance, both gradients within their dtype's, and masked tokens exactly 0."""
    ref = loss_and_grads(naive_fn, first, second, upstream_N, mask=mask_N, **loss_kw)
    got = loss_and_grads(fn, first, second, upstream_N, mask=mask_N, **loss_kw, **fn_kw)
    assert_close(f"{label} loss_N", ref[0], got[0], *LOSS_TOLERANCE)
    assert (got[0][~mask_N] == 0).all()
    for name, r, g in (("first", ref[1], got[1]), ("second", ref[2], got[2])):
        assert g.dtype == first.dtype and (g[~mask_N] == 0).all()
        assert_close(f"{label} grad {name}", r, g, *tolerance(first.dtype))
