"""KL from a sparse fixed target (saved top-k ids and log-probabilities) against the naive formula and kl_div."""

import pytest
import torch
import torch.nn.functional as F

from opcd_cli import kernels
from opcd_cli.kernels.naive import naive_sparse_target_kl
from opcd_cli.kernels.sparse_target import fused_linear_sparse_target_kl, sparse_target_kl

from _testing import LOSS_TOLERANCE, assert_close, tolerance

N, V, K = 37, 1271, 16


def target(n, v, k, seed, pad=0):
    """k distinct ids per row, in no particular order, with the log-probabilities of a random full-vocabulary
    target; the last ``pad`` entries of each row are padding at -inf (with ids repeating real ones)."""
    gen = torch.Generator().manual_seed(seed)
    logq_nv = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    ids_nk = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    logprobs_nk = logq_nv.gather(1, ids_nk)
    if pad:
        ids_nk[:, k - pad :] = ids_nk[:, :pad]
        logprobs_nk[:, k - pad :] = float("-inf")
    return ids_nk, logprobs_nk, logq_nv


def logits(n, v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen) * 3).to(dtype)


def loss_and_grad(fn, ids, logprobs, z, upstream, **kw):
    z = z.detach().clone().requires_grad_()
    loss = fn(ids, logprobs, z, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 5])
def test_matches_naive(dtype, pad):
    ids, logprobs, _ = target(N, V, K, 1, pad=pad)
    z = logits(N, V, dtype, 2)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.25
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(4))
    kw = dict(mask=mask, reduction="none")
    loss_ref, grad_ref = loss_and_grad(naive_sparse_target_kl, ids, logprobs, z, upstream, **kw)
    loss, grad = loss_and_grad(sparse_target_kl, ids, logprobs, z, upstream, chunk_size=8, **kw)
    assert grad.dtype == dtype and (grad[~mask] == 0).all() and (loss[~mask] == 0).all()
    assert_close("loss_N", loss_ref, loss, *LOSS_TOLERANCE)
    assert_close("grad", grad_ref, grad, *tolerance(dtype))


def test_gradient_formula():
    """d/dz_j = p_j Q - [j in ids] q_j, Q = sum of the target probabilities given."""
    ids, logprobs, _ = target(5, 50, 7, 5)
    z = logits(5, 50, torch.float32, 6)
    _, grad = loss_and_grad(sparse_target_kl, ids, logprobs, z, 1.0, reduction="sum")
    q = logprobs.double().exp()
    expected = torch.softmax(z.double(), -1) * q.sum(-1, keepdim=True)
    expected.scatter_add_(1, ids, -q)
    assert_close("grad closed form", expected, grad, 1e-7, 1e-5)


def test_padding_at_minus_infinity_contributes_nothing():
    ids, logprobs, _ = target(N, V, K, 7, pad=5)
    z = logits(N, V, torch.float32, 8)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(9))
    loss_padded, grad_padded = loss_and_grad(sparse_target_kl, ids, logprobs, z, upstream, reduction="none")
    loss_short, grad_short = loss_and_grad(
        sparse_target_kl, ids[:, : K - 5], logprobs[:, : K - 5], z, upstream, reduction="none"
    )
    assert torch.isfinite(loss_padded).all() and torch.isfinite(grad_padded).all()
    assert_close("loss_N padded vs short", loss_short, loss_padded, *LOSS_TOLERANCE)
    assert_close("grad padded vs short", grad_short, grad_padded, *tolerance(torch.float32))


@pytest.mark.parametrize("path", ["logits", "fused"])
def test_whole_vocabulary_equals_kl_div(path):
    """With every id given (shuffled), the loss is KL(q || p) over the full vocabulary."""
    n, v, h = 7, 300, 16
    ids, logprobs, logq = target(n, v, v, 10)
    gen = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    # kl_div(input=log p, target=log q, log_target=True) = sum q (log q - log p): KL(q || p), q the target
    hidden_ref = hidden.clone().requires_grad_()
    ref = F.kl_div(F.log_softmax(hidden_ref @ weight.T, -1), logq, reduction="batchmean", log_target=True)
    (ref * 3.0).backward()
    hidden_got = hidden.clone().requires_grad_()
    if path == "logits":
        got = sparse_target_kl(ids, logprobs, hidden_got @ weight.T)
    else:
        got = fused_linear_sparse_target_kl(ids, logprobs, hidden_got, weight, chunk_size=3)
    (got * 3.0).backward()
    assert_close(f"{path} loss vs kl_div", ref, got, 1e-6, 1e-6)
    assert_close(f"{path} grad vs kl_div", hidden_ref.grad, hidden_got.grad, 1e-6, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    ids, logprobs, _ = target(11, V, K, 12)
    z = logits(11, V, torch.float32, 13)
    mask = torch.tensor([True, False] * 5 + [True])
    kw = dict(mask=mask, reduction=reduction)
    loss_ref, grad_ref = loss_and_grad(naive_sparse_target_kl, ids, logprobs, z, 1.7, **kw)
    loss, grad = loss_and_grad(kernels.sparse_target_kl, ids, logprobs, z, 1.7, **kw)
    assert loss.shape == loss_ref.shape == ((11,) if reduction == "none" else ())
    assert_close(f"loss {reduction}", loss_ref, loss, *LOSS_TOLERANCE)
    assert_close(f"grad {reduction}", grad_ref, grad, *tolerance(torch.float32))


H = 24


def hidden_inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / 2).to(dtype)
    mask = torch.rand(N, generator=gen) > 0.3
    return hidden, weight, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
def test_fused_linear_matches_logits_level(dtype, reduction, needs):
    """Gradients to hidden and weight through materialised logits, made chunk by chunk as the fused path does."""
    ids, logprobs, _ = target(N, V, K, 14, pad=3)
    hidden, weight, mask = hidden_inputs(dtype, 15)
    chunk = 10
    z = torch.cat([hidden[s : s + chunk] @ weight.T for s in range(0, N, chunk)]).float().requires_grad_()
    loss_ref = naive_sparse_target_kl(ids, logprobs, z, mask=mask, reduction=reduction)
    (grad_z,) = torch.autograd.grad(loss_ref * 2.5, z)
    grads_ref = (grad_z @ weight.float(), grad_z.T @ hidden.float())
    leaves = (hidden.clone().requires_grad_(needs[0]), weight.clone().requires_grad_(needs[1]))
    loss = kernels.fused_linear_sparse_target_kl(
        ids, logprobs, *leaves, mask=mask, reduction=reduction, chunk_size=chunk
    )
    (loss * 2.5).backward()
    assert_close("loss", loss_ref, loss, *LOSS_TOLERANCE)
    atol, rtol = tolerance(dtype)
    for name, need, ref, leaf in zip(("hidden", "weight"), needs, grads_ref, leaves):
        if need:
            assert leaf.grad.dtype == dtype
            # a bf16 gradient of the hidden states sums H rounded terms; compare relative to the largest entry
            assert_close(f"grad {name}", ref, leaf.grad, atol * 4, rtol)
        else:
            assert leaf.grad is None


def test_chunking_does_not_change_the_result():
    ids, logprobs, _ = target(N, V, K, 16)
    hidden, weight, mask = hidden_inputs(torch.float32, 17)
    results = []
    for chunk in (None, 1, 8):
        leaves = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
        loss = fused_linear_sparse_target_kl(ids, logprobs, *leaves, mask=mask, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    for chunk, got in zip((1, 8), results[1:]):
        for name, ref, value in zip(("loss", "grad hidden", "grad weight"), results[0], got):
            assert_close(f"{name} chunk={chunk}", ref, value, 1e-6, 1e-5)


def test_bad_arguments_are_refused():
    ids, logprobs, _ = target(4, 50, 5, 18)
    z = logits(4, 50, torch.float32, 19)
    with pytest.raises(ValueError, match="target log-probabilities require grad"):
        sparse_target_kl(ids, logprobs.clone().requires_grad_(), z)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        sparse_target_kl(ids[:3], logprobs[:3], z)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_sparse_target_kl(ids, logprobs, torch.randn(4, 8), torch.randn(50, 8), reduction="none")


@pytest.mark.parametrize("fused", [False, True])
def test_entropy_of_the_trainable_side_matches_a_full_softmax_and_changes_nothing_else(fused):
    """``return_entropy``: the mean full-vocabulary entropy of p over unmasked tokens, beside the same loss and
    gradient as without it."""
    from opcd_cli.kernels.naive import naive_entropy

    ids, logprobs, _ = target(9, 301, 5, seed=4)
    gen = torch.Generator().manual_seed(5)
    h, w = torch.randn(9, 12, generator=gen), torch.randn(301, 12, generator=gen)
    mask = torch.arange(9) % 3 != 0
    results = []
    for entropy in (False, True):
        x = h.clone().requires_grad_()
        if fused:
            out = fused_linear_sparse_target_kl(ids, logprobs, x, w, mask=mask, reduction="sum", chunk_size=4,
                                                return_entropy=entropy)
        else:
            out = sparse_target_kl(ids, logprobs, x @ w.T, mask=mask, reduction="sum", chunk_size=4,
                                   return_entropy=entropy)
        loss = out[0] if entropy else out
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert_close("entropy", naive_entropy(h @ w.T)[mask].mean(), out[1], 2e-5, 2e-5)
    assert not out[1].requires_grad
