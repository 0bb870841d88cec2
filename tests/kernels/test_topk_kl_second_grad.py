"""Gradients of the top-k KL with respect to its second argument, and to both, against autograd of the naive
formula: torch and Triton (interpreter) paths, logits and fused linear."""

import os

import pytest
import torch

# The Triton kernels run on the CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before opcd_cli.kernels.topk_kl_triton is first imported. (No conftest.py here: it would shadow
# the suite's own conftest module.)
os.environ.setdefault("TRITON_INTERPRET", "1")

from opcd_cli import kernels  # noqa: E402
from opcd_cli.kernels.fused_linear_triton import fused_linear_topk_kl_triton  # noqa: E402
from opcd_cli.kernels.naive import naive_topk_kl  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch, topk_kl_torch  # noqa: E402
from opcd_cli.kernels.topk_kl_triton import topk_kl_triton  # noqa: E402

from _testing import LOSS_TOLERANCE, assert_close, tolerance  # noqa: E402

N, V = 7, 1271  # odd sizes; every row is one Triton program, so N only sets how many the interpreter runs
LOGITS = {"torch": lambda *a, **kw: topk_kl_torch(*a, chunk_size=3, **kw), "triton": topk_kl_triton}
FUSED = {"torch": fused_linear_topk_kl_torch, "triton": fused_linear_topk_kl_triton}
WRT = {"first": (True, False), "second": (False, True), "both": (True, True)}


def logits(n, v, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen) * scale).to(dtype)


def loss_and_grads(fn, first, second, upstream_N, wrt, **kw):
    """Per-token losses (reduction "none") and the gradients of sum(upstream * loss) to the arguments in ``wrt``
    ((first, second) flags); a gradient not asked for is None."""
    a = first.detach().clone().requires_grad_(WRT[wrt][0])
    b = second.detach().clone().requires_grad_(WRT[wrt][1])
    loss_N = fn(a, b, reduction="none", **kw)
    (loss_N * upstream_N).sum().backward()
    return loss_N.detach(), a.grad, b.grad


def reference_grads(first, second, upstream_N, **kw):
    """Autograd of the naive formula, to both arguments."""
    return loss_and_grads(naive_topk_kl, first, second, upstream_N, "both", **kw)


def check_against_reference(impl, dtype, k, renorm, wrt):
    first, second = logits(N, V, dtype, 1), logits(N, V, dtype, 2)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.25
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(4))
    kw = dict(k=k, mask=mask, renorm=renorm)
    loss_ref, grad_a_ref, grad_b_ref = reference_grads(first, second, upstream, **kw)
    loss, grad_a, grad_b = loss_and_grads(LOGITS[impl], first, second, upstream, wrt, **kw)
    atol, rtol = tolerance(dtype)
    assert_close(f"{impl} loss_N", loss_ref, loss, *LOSS_TOLERANCE)
    assert_close(f"{impl} grad second", grad_b_ref, grad_b, atol, rtol)
    assert grad_b.dtype == dtype and (grad_b[~mask] == 0).all()
    if wrt == "both":
        assert_close(f"{impl} grad first", grad_a_ref, grad_a, atol, rtol)
    else:
        assert grad_a is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 16, V])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("wrt", ["second", "both"])
def test_torch_logits_match_autograd(dtype, k, renorm, wrt):
    check_against_reference("torch", dtype, k, renorm, wrt)


# The interpreter is slow: each (dtype, k) once, renorm alternating; float32 with both gradients, bf16 with
# the second only (the torch matrix above is complete, and the kernel's formulas do not depend on k).
@pytest.mark.parametrize(
    "dtype, wrt, k, renorm",
    [
        (torch.float32, "both", 1, False),
        (torch.float32, "both", 16, True),
        (torch.float32, "both", V, False),
        (torch.bfloat16, "second", 1, True),
        (torch.bfloat16, "second", 16, False),
        (torch.bfloat16, "second", V, True),
    ],
)
def test_triton_logits_match_autograd(dtype, wrt, k, renorm):
    check_against_reference("triton", dtype, k, renorm, wrt)


def test_second_gradient_formula():
    """The closed forms d/db_j = q_j P - [j in S] p_j and, renormalised, [j in S] (q~_j - p~_j) (float64)."""
    first, second = logits(5, 50, torch.float32, 20), logits(5, 50, torch.float32, 21)
    p, q = torch.softmax(first.double(), -1), torch.softmax(second.double(), -1)
    in_s = torch.zeros_like(p, dtype=torch.bool).scatter_(1, torch.topk(first, 7).indices, True)
    mass = (p * in_s).sum(-1, keepdim=True)
    q_s = torch.where(in_s, q, 0)
    expected = {False: q * mass - p * in_s, True: q_s / q_s.sum(-1, keepdim=True) - p * in_s / mass}
    for renorm, grad_expected in expected.items():
        b = second.clone().requires_grad_()
        topk_kl_torch(first, b, k=7, renorm=renorm, reduction="sum").backward()
        assert_close(f"closed form renorm={renorm}", grad_expected, b.grad, 1e-7, 1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(impl, reduction):
    n = 11
    first, second = logits(n, V, torch.float32, 8), logits(n, V, torch.float32, 9)
    mask = torch.tensor([True, False] * 5 + [True])
    results = {}
    for name, fn in (("naive", naive_topk_kl), (impl, LOGITS[impl])):
        a, b = first.clone().requires_grad_(), second.clone().requires_grad_()
        loss = fn(a, b, k=16, mask=mask, reduction=reduction)
        assert loss.shape == ((n,) if reduction == "none" else ())
        (loss * 1.7).sum().backward()  # an upstream gradient other than 1
        results[name] = (loss.detach(), a.grad, b.grad)
    assert_close(f"loss {reduction}", results["naive"][0], results[impl][0], *LOSS_TOLERANCE)
    assert_close(f"grad first {reduction}", results["naive"][1], results[impl][1], *tolerance(torch.float32))
    assert_close(f"grad second {reduction}", results["naive"][2], results[impl][2], *tolerance(torch.float32))


@pytest.mark.parametrize("renorm", [False, True])
def test_triton_rows_of_several_blocks(renorm):
    """Blocks of 256 columns, ties crossing block boundaries: membership in S decides the second gradient too."""
    n = 8
    first = (logits(n, V, torch.float32, 10, scale=1.0) * 4).round().to(torch.bfloat16)  # few distinct values
    second = logits(n, V, torch.bfloat16, 11)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(12))
    _, grad_a_ref, grad_b_ref = reference_grads(first, second, upstream, k=100, renorm=renorm)
    _, grad_a, grad_b = loss_and_grads(
        topk_kl_triton, first, second, upstream, "both", k=100, renorm=renorm, block_v=256
    )
    assert_close("grad first", grad_a_ref, grad_a, *tolerance(torch.bfloat16))
    assert_close("grad second", grad_b_ref, grad_b, *tolerance(torch.bfloat16))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * -inf, masked, in numpy
def test_minus_infinity_padding_gets_no_gradient():
    """Vocabulary padding at -inf in both arguments: zero probability on both sides, zero gradient there."""
    first, second = logits(5, 300, torch.float32, 14), logits(5, 300, torch.float32, 15)
    first[:, 250:] = float("-inf")
    second[:, 250:] = float("-inf")
    upstream = torch.full((5,), 0.5)
    for renorm in (False, True):
        _, grad_a_ref, grad_b_ref = loss_and_grads(
            LOGITS["torch"], first, second, upstream, "both", k=16, renorm=renorm
        )
        _, grad_a, grad_b = loss_and_grads(topk_kl_triton, first, second, upstream, "both", k=16, renorm=renorm)
        for name, ref, got in (("first", grad_a_ref, grad_a), ("second", grad_b_ref, grad_b)):
            assert torch.isfinite(got).all() and (got[:, 250:] == 0).all()
            assert_close(f"grad {name} renorm={renorm}", ref, got, *tolerance(torch.float32))
        # the finite part of the second gradient is the naive one on the unpadded vocabulary
        _, _, grad_b_cut = reference_grads(first[:, :250], second[:, :250], upstream, k=16, renorm=renorm)
        assert_close(f"grad second vs unpadded renorm={renorm}", grad_b_cut, grad_b[:, :250], *tolerance(torch.float32))


# ------------------------------------------------------------------------------------------ fused linear

H, M = 24, 40


def hidden_inputs(dtype, seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    h1 = torch.randn(n, H, generator=gen).to(dtype)
    w1 = (torch.randn(V, H, generator=gen) / 2).to(dtype)
    h2 = torch.randn(n, M, generator=gen).to(dtype)
    w2 = (torch.randn(V, M, generator=gen) / 2).to(dtype)
    mask = torch.rand(n, generator=gen) > 0.3
    mask[0] = False
    return (h1, w1, h2, w2), mask


def fused_logits_level(tensors, chunk, upstream, **kw):
    """Loss and gradients of the four tensors through materialised logits, made chunk by chunk as the fused
    paths make them, the naive formula's autograd taken to both logits and chained through the matmuls."""
    h1, w1, h2, w2 = tensors
    n = h1.shape[0]
    a = torch.cat([h1[s : s + chunk] @ w1.T for s in range(0, n, chunk)]).float().requires_grad_()
    b = torch.cat([h2[s : s + chunk] @ w2.T for s in range(0, n, chunk)]).float().requires_grad_()
    loss = naive_topk_kl(a, b, **kw)
    grad_a, grad_b = torch.autograd.grad(loss * upstream, (a, b))
    return loss.detach(), [grad_a @ w1.float(), grad_a.T @ h1.float(), grad_b @ w2.float(), grad_b.T @ h2.float()]


def run_fused(fn, tensors, needs, upstream, **kw):
    leaves = [x.clone().requires_grad_(need) for x, need in zip(tensors, needs)]
    loss = fn(*leaves, **kw)
    (loss * upstream).backward()
    return loss.detach(), [x.grad for x in leaves]


NAMES = ("first hidden", "first weight", "second hidden", "second weight")


@pytest.mark.parametrize(
    "path, dtype, renorm",
    [("torch", dtype, renorm) for dtype in (torch.float32, torch.bfloat16) for renorm in (False, True)]
    + [("triton", torch.float32, False), ("triton", torch.bfloat16, True)],  # the interpreter is slow
)
def test_fused_linear_both_sides_match_logits_level(path, dtype, renorm):
    tensors, mask = hidden_inputs(dtype, 1)
    kw = dict(k=16, mask=mask, renorm=renorm)
    loss_ref, grads_ref = fused_logits_level(tensors, 3, 2.5, **kw)
    loss, grads = run_fused(FUSED[path], tensors, (True, True, True, True), 2.5, chunk_size=3, **kw)
    assert_close(f"{path} loss", loss_ref, loss, *LOSS_TOLERANCE)
    atol, rtol = tolerance(dtype)
    for name, ref, got in zip(NAMES, grads_ref, grads):
        assert got.dtype == dtype
        # a bf16 gradient of the hidden states sums H rounded terms; compare relative to the largest entry
        assert_close(f"{path} grad {name}", ref, got, atol * 4, rtol)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize(
    "needs", [(False, False, True, True), (False, False, True, False), (False, False, False, True)]
)
def test_fused_linear_second_side_only(path, needs):
    """The regulariser's use: the first side frozen; only the second side's tensors that require grad get one."""
    tensors, mask = hidden_inputs(torch.float32, 2, n=12)
    kw = dict(k=16, mask=mask, renorm=True, reduction="sum")  # float32 and renorm: the other fused cases differ
    loss_ref, grads_ref = fused_logits_level(tensors, 5, -1.3, **kw)
    loss, grads = run_fused(FUSED[path], tensors, needs, -1.3, chunk_size=5, **kw)
    assert_close(f"{path} loss", loss_ref, loss, *LOSS_TOLERANCE)
    for name, need, ref, got in zip(NAMES, needs, grads_ref, grads):
        if need:
            assert_close(f"{path} grad {name}", ref, got, *tolerance(torch.float32))
        else:
            assert got is None, name


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_fused_linear_shared_weight_sums_both_gradients(path):
    """One lm_head for both sides (context-free and in-context runs of one model): its gradient is the sum."""
    (h1, w, h2, _), mask = hidden_inputs(torch.float32, 3, n=12)
    w = w.clone().requires_grad_()
    h2 = h2[:, :H].clone().requires_grad_()
    loss = FUSED[path](h1, w, h2, w, k=16, mask=mask, chunk_size=5)
    loss.backward()
    w_ref, h2_ref = w.detach().clone().requires_grad_(), h2.detach().clone().requires_grad_()
    naive_topk_kl(h1 @ w_ref.T, h2_ref @ w_ref.T, k=16, mask=mask).backward()
    assert_close(f"{path} grad shared weight", w_ref.grad, w.grad, *tolerance(torch.float32))
    assert_close(f"{path} grad second hidden", h2_ref.grad, h2.grad, *tolerance(torch.float32))


# ---------------------------------------------------------------------------------------------- public API


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_public_api_trains_either_side_and_reverse_kl_still_refuses_the_teacher(monkeypatch, setting):
    monkeypatch.setenv("OPCD_KERNEL", setting)
    first, second = logits(4, 64, torch.float32, 30), logits(4, 64, torch.float32, 31)
    upstream = torch.ones(4)
    _, _, grad_b_ref = reference_grads(first, second, upstream, k=8)
    _, grad_a, grad_b = loss_and_grads(kernels.topk_kl, first, second, upstream, "second", k=8)
    assert grad_a is None
    assert_close(f"{setting} topk_kl grad second", grad_b_ref, grad_b, *tolerance(torch.float32))
    with pytest.raises(ValueError, match="teacher"):
        kernels.topk_reverse_kl(first.clone().requires_grad_(), second.clone().requires_grad_(), k=8)
    with pytest.raises(ValueError, match="teacher"):
        kernels.topk_reverse_kl(first, second.clone().requires_grad_(), k=8)
    gen = torch.Generator().manual_seed(32)
    h1, w1, h2, w2 = (torch.randn(4, 8, generator=gen), torch.randn(64, 8, generator=gen),
                      torch.randn(4, 6, generator=gen), torch.randn(64, 6, generator=gen))
    for teacher in ((h2.clone().requires_grad_(), w2), (h2, w2.clone().requires_grad_())):
        with pytest.raises(ValueError, match="teacher"):
            kernels.fused_linear_topk_reverse_kl(h1.clone().requires_grad_(), w1, *teacher, k=8)
    h2_ = h2.clone().requires_grad_()
    kernels.fused_linear_topk_kl(h1, w1, h2_, w2, k=8).backward()
    h2_ref = h2.clone().requires_grad_()
    naive_topk_kl(h1 @ w1.T, h2_ref @ w2.T, k=8).backward()
    assert_close(f"{setting} fused_linear_topk_kl grad second hidden", h2_ref.grad, h2_.grad, *tolerance(torch.float32))
