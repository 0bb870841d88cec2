"""The union support (``union=True``): S is the union of the first's and the second's top-k ids.

Loss and gradients of both arguments against autograd of the naive formula (S as a full-vocabulary mask), in the
PyTorch path and the Triton kernels (interpreter): odd shapes, masks, float32 and bf16, plain, renorm and tail,
rows of several blocks, the radix-select path and its fallback on ties, the fused linear paths; and what the
support is: equal to the student's alone when the teacher's top-k lies inside it, and never smaller."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from opcd_cli import kernels  # noqa: E402
from opcd_cli.kernels.fused_linear_triton import fused_linear_topk_kl_triton  # noqa: E402
from opcd_cli.kernels.naive import naive_topk_kl  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch, topk_kl_torch  # noqa: E402
from opcd_cli.kernels.topk_kl_triton import topk_kl_triton  # noqa: E402

from _testing import assert_close, check_against_naive, check_fused_linear_against_logits  # noqa: E402

N, V = 7, 517
LOGITS = {"torch": lambda *a, **kw: topk_kl_torch(*a, chunk_size=3, **kw), "triton": topk_kl_triton}
FUSED = {"torch": fused_linear_topk_kl_torch, "triton": fused_linear_topk_kl_triton}


def logits_pair(dtype, seed=1):
    """Random logits, with a row where the teacher agrees with the student (the union is the student's top-k),
    a row of tied teacher logits (its top-k by lowest id), and a row with -inf student logits."""
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.randn(N, V, generator=gen) * 3, torch.randn(N, V, generator=gen) * 3
    second[0] = first[0] * 2  # the same order: the same top-k
    second[1] = 0.5  # every teacher logit tied
    first[2, : V // 2] = float("-inf")
    return first.to(dtype), second.to(dtype)


def check(impl, dtype, k, support="plain", **kw):
    first, second = logits_pair(dtype)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.25
    mask[:3] = True
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(4))
    loss_kw = {"k": k, "union": True, "renorm": support == "renorm", "tail": support == "tail"}
    check_against_naive(impl, LOGITS[impl], naive_topk_kl, first, second, mask, upstream, loss_kw, **kw)


@pytest.mark.parametrize("support", ["plain", "renorm", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 16])
def test_torch_matches_autograd(dtype, k, support):
    check("torch", dtype, k, support)


@pytest.mark.parametrize("dtype, k, support", [(torch.float32, 16, "plain"), (torch.float32, 16, "renorm"),
                                                (torch.float32, 5, "tail"), (torch.bfloat16, 16, "plain")])
def test_triton_matches_autograd(dtype, k, support):
    check("triton", dtype, k, support, block_v=128)


def test_triton_radix_select_path():
    """k above the block width: both top-k come from the exact radix select (no candidate filter)."""
    check("triton", torch.float32, 40, block_v=32)


def test_k_equal_to_v_is_the_full_kl():
    first, second = logits_pair(torch.float32)
    p, q = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
    full = torch.where(p > float("-inf"), p.exp() * (p - q), torch.zeros_like(p)).sum(-1)
    for impl, fn in LOGITS.items():
        assert_close(f"{impl} k = V", full, fn(first, second, k=V, union=True, reduction="none"), 2e-5, 2e-5)


def test_the_union_is_the_students_top_k_when_the_teachers_lies_inside_it():
    """Row 0 (the teacher orders the vocabulary as the student does): the union adds nothing, and the loss, the
    gradients and the mass are those of the student's top-k alone; elsewhere the union's mass is at least the
    student's."""
    first, second = logits_pair(torch.float32)
    for impl, fn in LOGITS.items():
        kw = {"block_v": 128} if impl == "triton" else {}
        outs = []
        for union in (False, True):
            a = first[:1].clone().requires_grad_()
            loss, mass = fn(a, second[:1], k=16, reduction="sum", return_topk_mass=True, union=union, **kw)
            loss.backward()
            outs.append((loss.detach(), mass, a.grad))
        for name, plain, union in zip(("loss", "mass", "grad"), *outs):
            assert_close(f"{impl} {name}", plain, union, 1e-6, 1e-6)
        _, mass_student = fn(first, second, k=16, reduction="none", return_topk_mass=True, **kw)
        _, mass_union = fn(first, second, k=16, reduction="none", return_topk_mass=True, union=True, **kw)
        assert mass_union >= mass_student - 1e-6


@pytest.mark.parametrize("path, dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                         ("triton", torch.float32)])
def test_fused_linear_matches_logits_level(path, dtype):
    check_fused_linear_against_logits(path, FUSED[path], naive_topk_kl, dtype, V, union=True)


def test_the_reverse_kl_entry_points_take_the_union():
    first, second = logits_pair(torch.float32)
    expected = naive_topk_kl(first, second, k=8, union=True)
    assert_close("topk_reverse_kl", expected, kernels.topk_reverse_kl(first, second, k=8, union=True), 2e-6, 2e-6)
    assert not torch.allclose(expected, kernels.topk_reverse_kl(first, second, k=8))  # the union is not the default
