"""The Triton row kernels (run by Triton's interpreter on the CPU) against the plain-PyTorch reference."""

import os

import pytest
import torch

# The Triton kernels run on the CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before opcd_cli.kernels.topk_kl_triton is first imported. (No conftest.py here: it would shadow
# the suite's own conftest module.)
os.environ.setdefault("TRITON_INTERPRET", "1")

from opcd_cli.kernels.naive import naive_topk_kl, topk_ids  # noqa: E402
from opcd_cli.kernels.torch_chunked import topk_kl_torch  # noqa: E402
from opcd_cli.kernels.topk_kl_triton import topk_kl_forward, topk_kl_triton  # noqa: E402

from _testing import LOSS_TOLERANCE, assert_close, tolerance  # noqa: E402

N, V = 7, 1271  # odd sizes; every row is one Triton program, so N only sets how many the interpreter runs


def logits(n, v, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen) * scale).to(dtype)


def loss_and_grad(fn, student, teacher, upstream_N, **kw):
    """Per-token losses (reduction "none") and the gradient of sum(upstream * loss) w.r.t. the student."""
    s = student.detach().clone().requires_grad_()
    loss_N = fn(s, teacher, reduction="none", **kw)
    (grad,) = torch.autograd.grad((loss_N * upstream_N).sum(), s)
    return loss_N.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 16, V])
@pytest.mark.parametrize("renorm", [False, True])
def test_matches_reference(dtype, k, renorm):
    student, teacher = logits(N, V, dtype, 1), logits(N, V, dtype, 2)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.25
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(4))
    kw = dict(k=k, mask=mask, renorm=renorm)
    loss_ref, grad_ref = loss_and_grad(naive_topk_kl, student, teacher, upstream, **kw)
    loss_chunked, grad_chunked = loss_and_grad(topk_kl_torch, student, teacher, upstream, chunk_size=3, **kw)
    loss_tri, grad_tri = loss_and_grad(topk_kl_triton, student, teacher, upstream, **kw)
    atol, rtol = tolerance(dtype)
    assert grad_tri.dtype == dtype
    assert (loss_tri[~mask] == 0).all() and (grad_tri[~mask] == 0).all()
    assert_close("loss_N naive", loss_ref, loss_tri, *LOSS_TOLERANCE)
    assert_close("loss_N chunked", loss_chunked, loss_tri, *LOSS_TOLERANCE)
    assert_close("grad naive", grad_ref, grad_tri, atol, rtol)
    assert_close("grad chunked", grad_chunked, grad_tri, atol, rtol)


def test_float16_three_radix_passes():
    student, teacher = logits(N, V, torch.float16, 5), logits(N, V, torch.float16, 6)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(7))
    loss_ref, grad_ref = loss_and_grad(naive_topk_kl, student, teacher, upstream, k=16)
    loss_tri, grad_tri = loss_and_grad(topk_kl_triton, student, teacher, upstream, k=16)
    assert_close("loss_N", loss_ref, loss_tri, *LOSS_TOLERANCE)
    assert_close("grad", grad_ref, grad_tri, *tolerance(torch.float16))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_topk_mass(reduction):
    n = 11
    student, teacher = logits(n, V, torch.float32, 8), logits(n, V, torch.float32, 9)
    mask = torch.tensor([True, False] * 5 + [True])
    s_ref, s_tri = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss_ref = naive_topk_kl(s_ref, teacher, k=16, mask=mask, reduction=reduction)
    loss_tri, mass = topk_kl_triton(s_tri, teacher, k=16, mask=mask, reduction=reduction, return_topk_mass=True)
    assert loss_tri.shape == loss_ref.shape == ((n,) if reduction == "none" else ())
    assert_close(f"loss {reduction}", loss_ref, loss_tri, *LOSS_TOLERANCE)
    # an upstream gradient other than 1 reaches every element
    (loss_ref * 1.7).sum().backward()
    (loss_tri * 1.7).sum().backward()
    assert_close(f"grad {reduction}", s_ref.grad, s_tri.grad, *tolerance(torch.float32))
    ids = topk_ids(student, 16)
    expected_mass = torch.softmax(student, -1).gather(1, ids).sum(-1)[mask].mean()
    assert_close("top-k mass", expected_mass, mass, 1e-6, 1e-6)
    assert not mass.requires_grad


def test_rows_of_several_blocks():
    """Blocks of 256 columns: the last block is partial, and ties cross block boundaries."""
    n = 5
    student = (logits(n, V, torch.float32, 10, scale=1.0) * 4).round().to(torch.bfloat16)  # few distinct values
    teacher = logits(n, V, torch.bfloat16, 11)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(12))
    for renorm in (False, True):
        loss_ref, grad_ref = loss_and_grad(naive_topk_kl, student, teacher, upstream, k=100, renorm=renorm)
        loss_tri, grad_tri = loss_and_grad(
            topk_kl_triton, student, teacher, upstream, k=100, renorm=renorm, block_v=256
        )
        assert_close(f"loss_N renorm={renorm}", loss_ref, loss_tri, *LOSS_TOLERANCE)
        assert_close(f"grad renorm={renorm}", grad_ref, grad_tri, *tolerance(torch.bfloat16))


def tied_rows(dtype):
    """Rows whose k-th largest value (k = 8) is shared by many ids spread over the row, teacher varying."""
    v, k = 700, 8
    gen = torch.Generator().manual_seed(13)
    rows = []
    for r in range(6):
        row = -5.0 - torch.rand(v, generator=gen)  # the bulk, below every tied value
        above = torch.randperm(v, generator=gen)[: r % 4]  # 0..3 values above the tie
        tied = torch.randperm(v, generator=gen)[: 20 + r]
        row[tied] = 0.0 if r == 5 else 1.25
        row[above] = 3.0 + torch.arange(len(above), dtype=torch.float32)
        rows.append(row)
    student = torch.stack(rows).to(dtype)
    student[5, tied[::2]] = -0.0  # -0.0 and +0.0 are the same value and must tie
    teacher = torch.randn(6, v, generator=gen).to(dtype) * 2
    return student, teacher, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_at_the_kth_place_go_to_the_lower_id(dtype):
    student, teacher, k = tied_rows(dtype)
    _, _, _, ids_Nk = topk_kl_forward(student, teacher, k, False, block_v=128)
    expected = topk_ids(student.float(), k)
    assert torch.equal(ids_Nk.long().sort(1).values, expected)  # the kernel's ids come in no particular order
    # the choice matters: the highest tied ids instead of the lowest give another loss
    flipped = topk_ids(student.float() * 1e4 + torch.arange(student.shape[1], dtype=torch.float32), k)
    assert not torch.equal(flipped, expected)
    upstream = torch.ones(student.shape[0])
    loss_ref, grad_ref = loss_and_grad(naive_topk_kl, student, teacher, upstream, k=k)
    loss_tri, grad_tri = loss_and_grad(topk_kl_triton, student, teacher, upstream, k=k, block_v=128)
    assert_close("loss_N with ties", loss_ref, loss_tri, *LOSS_TOLERANCE)
    assert_close("grad with ties", grad_ref, grad_tri, *tolerance(dtype))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * -inf, masked, in numpy
def test_minus_infinity_logits_contribute_nothing():
    """Vocabulary padding at -inf: zero probability, zero loss term, zero gradient (as the torch reference)."""
    student, teacher = logits(5, 300, torch.float32, 14), logits(5, 300, torch.float32, 15)
    student[:, 250:] = float("-inf")
    upstream = torch.full((5,), 0.5)
    for k in (16, 300):
        loss_ref, grad_ref = loss_and_grad(topk_kl_torch, student, teacher, upstream, k=k)
        loss_tri, grad_tri = loss_and_grad(topk_kl_triton, student, teacher, upstream, k=k)
        assert torch.isfinite(loss_tri).all() and torch.isfinite(grad_tri).all()
        assert (grad_tri[:, 250:] == 0).all()
        assert_close(f"loss_N k={k}", loss_ref, loss_tri, *LOSS_TOLERANCE)
        assert_close(f"grad k={k}", grad_ref, grad_tri, *tolerance(torch.float32))


def test_teacher_requiring_grad_is_refused():
    from opcd_cli.kernels import topk_reverse_kl

    student, teacher = logits(3, 50, torch.float32, 16), logits(3, 50, torch.float32, 17)
    with pytest.raises(ValueError, match="teacher"):
        topk_reverse_kl(student.requires_grad_(), teacher.requires_grad_(), k=4, backend="triton")


def candidate_count(first, k, block_v):
    """How many elements the kernel's first pass keeps as candidates: those >= the k-th largest of the running
    maxima of the block_v strided slices of the row (as the kernel computes it, in float32)."""
    a = first.float()
    pad = (-a.shape[1]) % block_v
    a = torch.cat([a, torch.full((a.shape[0], pad), float("-inf"))], 1)
    t0 = a.view(a.shape[0], -1, block_v).amax(1).topk(k, 1).values[:, -1:]
    return (first.float() >= t0).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_candidate_buffer_overflow_falls_back_to_radix_select(dtype, monkeypatch):
    """Rows with more candidates than the buffer holds (many equal values at the k-th place, or a buffer made
    as small as k) take the exact radix path: the same ids, loss and gradients as the reference."""
    import opcd_cli.kernels.topk_kl_triton as kernel

    student, teacher, k = tied_rows(dtype)
    random_student = logits(6, 700, dtype, 18)
    for factor in (kernel.CANDIDATE_FACTOR, 1):
        monkeypatch.setattr(kernel, "CANDIDATE_FACTOR", factor)
        slots = kernel.candidate_slots(k)
        for first in (student, random_student):
            if factor == 1 and first is student:  # a buffer of exactly k: every tied row overflows
                assert (candidate_count(first, k, 128) > slots).all()
            _, _, _, ids_Nk = topk_kl_forward(first, teacher, k, False, block_v=128)
            assert torch.equal(ids_Nk.long().sort(1).values, topk_ids(first.float(), k))
            upstream = torch.linspace(0.5, 1.5, first.shape[0])
            loss_ref, grad_ref = loss_and_grad(naive_topk_kl, first, teacher, upstream, k=k)
            loss_tri, grad_tri = loss_and_grad(topk_kl_triton, first, teacher, upstream, k=k, block_v=128)
            assert_close(f"loss_N factor={factor}", loss_ref, loss_tri, *LOSS_TOLERANCE)
            assert_close(f"grad factor={factor}", grad_ref, grad_tri, *tolerance(dtype))


def test_tied_rows_fit_the_candidate_buffer():
    """The tie test above runs the candidate path, not the fallback: its rows' candidates fit the buffer."""
    import opcd_cli.kernels.topk_kl_triton as kernel

    student, _, k = tied_rows(torch.bfloat16)
    assert (candidate_count(student, k, 128) <= kernel.candidate_slots(k)).all()


def test_k_larger_than_a_block_uses_radix_select():
    """k above the block width cannot be bounded by the first pass: the radix path, still exact."""
    n, v, k = 5, 900, 300
    student, teacher = logits(n, v, torch.bfloat16, 19), logits(n, v, torch.bfloat16, 20)
    assert not kernel_config_is_fast(v, k, 128)
    _, _, _, ids_Nk = topk_kl_forward(student, teacher, k, False, block_v=128)
    assert torch.equal(ids_Nk.long().sort(1).values, topk_ids(student.float(), k))
    upstream = torch.full((n,), 0.7)
    for renorm in (False, True):
        loss_ref, grad_ref = loss_and_grad(naive_topk_kl, student, teacher, upstream, k=k, renorm=renorm)
        loss_tri, grad_tri = loss_and_grad(topk_kl_triton, student, teacher, upstream, k=k, renorm=renorm,
                                           block_v=128)
        assert_close(f"loss_N renorm={renorm}", loss_ref, loss_tri, *LOSS_TOLERANCE)
        assert_close(f"grad renorm={renorm}", grad_ref, grad_tri, *tolerance(torch.bfloat16))


def kernel_config_is_fast(v, k, block_v):
    from opcd_cli.kernels.topk_kl_triton import _launch_config

    return _launch_config(v, k, block_v)[4]
