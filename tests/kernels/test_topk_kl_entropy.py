"""The entropies the top-k KL reports (``return_entropy=True``): each side's full-vocabulary entropy, computed in
the pass that makes the log-sum-exps, against a naive full softmax. PyTorch path and Triton kernels
(interpreter): odd shapes, rows of several blocks, masks, -inf logits, a large common offset, float32 and bf16,
renorm and tail, logits and the fused linear paths; and asking for them changes neither the loss nor a gradient."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from opcd_cli import kernels  # noqa: E402
from opcd_cli.kernels.fused_linear_triton import fused_linear_topk_kl_triton  # noqa: E402
from opcd_cli.kernels.naive import naive_entropy  # noqa: E402
from opcd_cli.kernels.torch_chunked import fused_linear_topk_kl_torch, topk_kl_torch  # noqa: E402
from opcd_cli.kernels.topk_kl_triton import topk_kl_triton  # noqa: E402

from _testing import assert_close  # noqa: E402

N, V, K = 11, 517, 7
LOGITS = {"torch": lambda *a, **kw: topk_kl_torch(*a, chunk_size=4, **kw),
          "triton": lambda *a, **kw: topk_kl_triton(*a, block_v=128, **kw)}
FUSED = {"torch": lambda *a, **kw: fused_linear_topk_kl_torch(*a, chunk_size=4, **kw),
         "triton": lambda *a, **kw: fused_linear_topk_kl_triton(*a, chunk_size=4, block_v=128, **kw)}
# entropies are float32 sums over the vocabulary: a few ulps of log V
ATOL, RTOL = 2e-5, 2e-5


def logits_pair(dtype, seed=0, offset=0.0):
    """Random logits of mixed spread, with a sure row, a row mostly -inf, and a uniform row."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(N, V, generator=gen) * torch.linspace(0.1, 6, N)[:, None]
    second = torch.randn(N, V, generator=gen) * 2
    first[0, 3] = 60.0  # almost one-hot: entropy near 0
    first[1, : V - 40] = float("-inf")  # only 40 possible tokens
    second[2, first[2].argsort()[: V // 3]] = float("-inf")  # off the first's top-k: the KL stays finite
    first[4] = 0.0  # uniform: log V
    return (first + offset).to(dtype), (second + offset).to(dtype)


def masked_mean(values_N, mask_N):
    return values_N[mask_N].mean() if mask_N is not None else values_N.mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("support", ["plain", "renorm", "tail"])
def test_entropies_match_a_full_softmax(backend, dtype, support):
    first, second = logits_pair(dtype)
    mask = torch.tensor([True, True, False, True, True, False, True, True, True, True, False])
    kw = {"renorm": support == "renorm", "tail": support == "tail"}
    _, (h_first, h_second) = LOGITS[backend](first, second, k=K, mask=mask, return_entropy=True, **kw)
    # the reference sees the same (rounded) values, upcast
    assert_close("first entropy", masked_mean(naive_entropy(first.float()), mask), h_first, ATOL, RTOL)
    assert_close("second entropy", masked_mean(naive_entropy(second.float()), mask), h_second, ATOL, RTOL)
    assert not h_first.requires_grad and not h_second.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropies_per_row_including_the_extremes(backend):
    """Row by row (one-row calls): near 0 for the sure row, log 40 and log V for the restricted and uniform rows."""
    first, second = logits_pair(torch.float32)
    for n in range(N):
        _, (h_first, h_second) = LOGITS[backend](first[n : n + 1], second[n : n + 1], k=K, return_entropy=True)
        assert_close(f"row {n} first", naive_entropy(first[n : n + 1])[0], h_first, ATOL, RTOL)
        assert_close(f"row {n} second", naive_entropy(second[n : n + 1])[0], h_second, ATOL, RTOL)
    _, (h_uniform, _) = LOGITS[backend](first[4:5], second[4:5], k=K, return_entropy=True)
    assert abs(h_uniform.item() - torch.log(torch.tensor(float(V))).item()) < 1e-4
    _, (h_sure, _) = LOGITS[backend](first[:1], second[:1], k=K, return_entropy=True)
    assert 0 <= h_sure.item() < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropies_do_not_lose_digits_under_a_large_common_offset(backend):
    """Entropy is shift invariant; the kernel accumulates relative to the running max, so logits around 3,000
    give the entropies of logits around 0 (lse - E[x] in float32 would lose them)."""
    near, far = logits_pair(torch.float32), logits_pair(torch.float32, offset=3000.0)
    _, (h_near, g_near) = LOGITS[backend](*near, k=K, return_entropy=True)
    _, (h_far, g_far) = LOGITS[backend](*far, k=K, return_entropy=True)
    reference = naive_entropy(far[0]).mean()
    assert_close("first, offset", reference, h_far, 2e-4, 2e-4)
    assert_close("offset against none", h_near, h_far, 2e-3, 2e-4)  # the offset itself rounds the logits
    assert_close("second, offset against none", g_near, g_far, 2e-3, 2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_asking_for_entropies_changes_neither_loss_nor_gradients(backend):
    first, second = logits_pair(torch.float32, seed=1)
    results = []
    for entropy in (False, True):
        a, b = first.clone().requires_grad_(), second.clone().requires_grad_()
        out = LOGITS[backend](a, b, k=K, reduction="sum", return_topk_mass=True, return_entropy=entropy)
        out[0].backward()
        results.append((out[0].detach(), out[1], a.grad, b.grad))
        assert len(out) == (3 if entropy else 2)
    for name, plain, with_entropy in zip(("loss", "mass", "grad first", "grad second"), *results):
        assert torch.equal(plain, with_entropy), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_entropies_match_a_full_softmax(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    H = 24
    h1, w1 = torch.randn(N, H, generator=gen).to(dtype), (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    h2, w2 = torch.randn(N, H, generator=gen).to(dtype), (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    mask = torch.arange(N) % 4 != 1
    h1.requires_grad_()
    loss, mass, (h_first, h_second) = FUSED[backend](h1, w1, h2, w2, k=K, mask=mask, return_topk_mass=True,
                                                     return_entropy=True)
    loss.backward()  # the gradient still flows with the entropies asked for
    assert h1.grad is not None and torch.isfinite(h1.grad).all()
    first, second = (h1.detach() @ w1.T).float(), (h2 @ w2.T).float()  # the logits in the compute dtype, upcast
    tol = (ATOL, RTOL) if dtype == torch.float32 else (2e-4, 2e-4)
    assert_close("first entropy", masked_mean(naive_entropy(first), mask), h_first, *tol)
    assert_close("second entropy", masked_mean(naive_entropy(second), mask), h_second, *tol)


def test_the_reverse_kl_entry_points_pass_the_entropies_through():
    first, second = logits_pair(torch.float32, seed=2)
    loss, (h_student, h_teacher) = kernels.topk_reverse_kl(first, second, k=K, return_entropy=True,
                                                           backend="torch")
    assert_close("student", naive_entropy(first).mean(), h_student, ATOL, RTOL)
    assert_close("teacher", naive_entropy(second).mean(), h_teacher, ATOL, RTOL)
