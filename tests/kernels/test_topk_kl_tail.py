"""The tail bucket (``tail=True``): the mass outside the top-k as one more bucket of both distributions.

Loss and gradients of both arguments against autograd of the naive formula, in the PyTorch path and the Triton
kernels (interpreter): odd shapes, masks, float32 and bf16, rows whose tail is capped, rows of several blocks,
the fused linear paths; and what the term is: a KL divergence on k + 1 buckets."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from opcd_cli import kernels  # noqa: E402
from opcd_cli.kernels.fused_linear_triton import fused_linear_topk_kl_triton  # noqa: E402
from opcd_cli.kernels.naive import TAIL_LOG_MASS_MAX, naive_topk_kl, topk_ids  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch, topk_kl_torch  # noqa: E402
from opcd_cli.kernels.topk_kl_triton import topk_kl_triton  # noqa: E402

from _testing import (assert_close, check_against_naive, check_fused_linear_against_logits,  # noqa: E402
                      loss_and_grads, tolerance)

N, V = 13, 1271
LOGITS = {"torch": lambda *a, **kw: topk_kl_torch(*a, chunk_size=4, **kw), "triton": topk_kl_triton}
FUSED = {"torch": fused_linear_topk_kl_torch, "triton": fused_linear_topk_kl_triton}


def logits_pair(n, v, dtype, seed, k):
    """Random logits with two special rows: a student sure of one token (its tail capped), and a teacher sure
    of the student's top token (the teacher's tail capped)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.randn(n, v, generator=gen) * 3, torch.randn(n, v, generator=gen) * 3
    first[0, 5] = 90.0
    second[1, first[1].argmax()] = 90.0
    return first.to(dtype), second.to(dtype)


def check(impl, dtype, k, **kw):
    first, second = logits_pair(N, V, dtype, 1, k)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.25
    mask[:2] = True
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(4))
    check_against_naive(impl, LOGITS[impl], naive_topk_kl, first, second, mask, upstream, {"k": k, "tail": True}, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 16, V])
def test_torch_matches_autograd(dtype, k):
    check("torch", dtype, k)


@pytest.mark.parametrize("dtype, k", [(torch.float32, 16), (torch.float32, V), (torch.bfloat16, 1)])
def test_triton_matches_autograd(dtype, k):
    check("triton", dtype, k)


def test_triton_rows_of_several_blocks():
    check("triton", torch.float32, 100, block_v=256)


def test_the_term_is_the_kl_on_k_plus_one_buckets():
    """Computed by hand in float64: the k probabilities of S and one bucket for the rest, on both sides; it is
    at least 0, at most the full-vocabulary KL, and equal to it at k = V."""
    gen = torch.Generator().manual_seed(7)
    first, second = torch.randn(6, 80, generator=gen, dtype=torch.float64) * 2, torch.randn(6, 80, generator=gen,
                                                                                           dtype=torch.float64) * 2
    p, q = torch.softmax(first, -1), torch.softmax(second, -1)
    ids = topk_ids(first, 9)
    p_b = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], -1)
    expected = (p_b * (p_b.log() - q_b.log())).sum(-1)
    full = (p * (p.log() - q.log())).sum(-1)
    for impl, fn in LOGITS.items():
        got = fn(first.float(), second.float(), k=9, tail=True, reduction="none").double()
        assert_close(f"{impl} k + 1 buckets", expected, got, 1e-5, 1e-5)
        assert (got >= -1e-6).all() and (got <= full + 1e-5).all()
        at_v = fn(first.float(), second.float(), k=80, tail=True, reduction="none").double()
        assert_close(f"{impl} k = V is the full KL", full, at_v, 1e-5, 1e-5)
    untailed = topk_kl_torch(first.float(), second.float(), k=9, reduction="none").double()
    assert not torch.allclose(untailed, expected, atol=1e-3)  # the tail changes the loss


def test_a_capped_tail_passes_no_gradient_through_it():
    """A student whose top-k holds all but 1e-12 of its mass: its tail is the cap (about 1e-7), constant, so the
    gradient is that of the top-k terms alone plus the teacher-tail part."""
    first = torch.full((1, 40), -30.0)
    first[0, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    second = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    log_mass = torch.logsumexp(torch.log_softmax(first, -1)[0, :4], 0)
    assert log_mass > TAIL_LOG_MASS_MAX  # the cap applies
    for impl, fn in LOGITS.items():
        _, grad_a, _ = loss_and_grads(fn, first, second, torch.ones(1), k=4, tail=True)
        _, grad_a_ref, _ = loss_and_grads(naive_topk_kl, first, second, torch.ones(1), k=4, tail=True)
        assert torch.isfinite(grad_a).all()
        assert_close(f"{impl} capped", grad_a_ref, grad_a, *tolerance(torch.float32))


@pytest.mark.parametrize("path, dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                         ("triton", torch.float32)])
def test_fused_linear_matches_logits_level(path, dtype):
    check_fused_linear_against_logits(path, FUSED[path], naive_topk_kl, dtype, V, tail=True)


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_renorm_and_tail_exclude_each_other(monkeypatch, setting):
    monkeypatch.setenv("OPCD_KERNEL", setting)
    first, second = torch.randn(3, 20), torch.randn(3, 20)
    with pytest.raises(ValueError, match="renorm and tail"):
        kernels.topk_kl(first, second, k=4, renorm=True, tail=True)
    with pytest.raises(ValueError, match="renorm and tail"):
        kernels.fused_linear_topk_kl(torch.randn(3, 4), torch.randn(20, 4), torch.randn(3, 4), torch.randn(20, 4),
                                     k=4, renorm=True, tail=True)
