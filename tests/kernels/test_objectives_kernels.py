"""The objectives beside the top-k reverse KL, each against its formula written with autograd on full tensors
(``naive.py``): the sampled-token surrogate and the generalised JSD, from logits and fused with the output layer,
PyTorch and (the JSD) Liger-Kernel's fused kernel in Triton's interpreter; odd shapes, masks, fp32 and bf16."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Liger's kernels are first imported

import pytest
import torch

from _testing import assert_close, tolerance
from opcd_cli.kernels.jsd import fused_linear_jsd, jsd
from opcd_cli.kernels.naive import naive_entropy, naive_jsd, naive_sampled_token_loss, naive_sparse_target_kl
from opcd_cli.kernels.sampled_token import sampled_token_loss, token_logprobs

N, H, V = 13, 8, 37  # odd on purpose: chunks of 4 and 5 leave a short last chunk


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.7).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.7).to(dtype).requires_grad_()
    ht = (torch.randn(N, H, generator=g) * 0.7).to(dtype)
    wt = (torch.randn(V, H, generator=g) * 0.7).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    return h, w, ht, wt, ids, mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("terms", ["teacher", "advantage", "both"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_sampled_token_surrogate_matches_its_formula_fused_and_from_logits(dtype, terms, masked):
    h, w, ht, wt, ids, mask = inputs(dtype)
    teacher_logp, _ = token_logprobs(ids, hidden_NH=ht, weight_VH=wt)
    advantages = torch.randn(N, generator=torch.Generator().manual_seed(1))
    kw = {"teacher": dict(teacher_logprobs_N=teacher_logp), "advantage": dict(advantages_N=advantages),
          "both": dict(teacher_logprobs_N=teacher_logp, advantages_N=advantages)}[terms]
    kw["mask_N"] = mask if masked else None
    # the reference on the same float32 logits the kernels make (bf16 operands, float32 math after the matmul)
    ref = naive_sampled_token_loss(ids, (h @ w.T).float(), **kw)
    ref_grads = grads(ref, h, w)
    atol, rtol = tolerance(dtype)
    for name, run in (("fused", lambda: sampled_token_loss(ids, hidden_NH=h, weight_VH=w, chunk_size=4, **kw)),
                      ("logits", lambda: sampled_token_loss(ids, logits_NV=h @ w.T, chunk_size=5, **kw))):
        total, logp, entropy = run()
        assert_close(f"{name} loss", ref, total, 1e-4, 1e-4)
        for label, a, b in zip(("hidden", "weight"), ref_grads, grads(total, h, w)):
            assert_close(f"{name} {label} grad", a, b, atol * 10, rtol * 2)
        z = (h @ w.T).detach().float()
        assert_close(f"{name} log p", torch.log_softmax(z, -1).gather(1, ids[:, None])[:, 0], logp, 1e-5, 1e-5)
        assert_close(f"{name} entropy", naive_entropy(z), entropy, 1e-5, 1e-5)
        assert not logp.requires_grad and not entropy.requires_grad


def test_the_sampled_token_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Summed over every token y with weight p(y), the surrogate's gradient is that of KL(p || q) over the full
    vocabulary: the estimator is unbiased (the expectation computed exactly, not sampled)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 11, generator=g, dtype=torch.float64).requires_grad_()
    logq = torch.log_softmax(torch.randn(1, 11, generator=g, dtype=torch.float64), -1)[0]
    kl = (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - logq)).sum()
    expected = torch.autograd.grad(kl, z)[0]
    p = torch.softmax(z, -1)[0].detach()

    def gradient(y):  # of the surrogate when the student sampled token y
        return torch.autograd.grad(sampled_token_loss(torch.tensor([y]), logits_NV=z, teacher_logprobs_N=logq[y:y + 1])[0], z)[0]

    per_token = [gradient(y) for y in range(11)]
    torch.testing.assert_close(sum(p[y] * per_token[y] for y in range(11)), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(sum(per_token) / 11, expected, rtol=1e-2)  # drawn uniformly it would not be


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_the_jsd_matches_its_formula_fused_and_from_logits(dtype, beta):
    h, w, ht, wt, ids, mask = inputs(dtype, seed=2)
    zt = (ht @ wt.T).float()
    atol, rtol = tolerance(dtype)
    for masked in (None, mask):
        ref = naive_jsd((h @ w.T).float(), zt, beta, masked)
        ref_grads = grads(ref, h, w)
        for name, run in (("fused", lambda: fused_linear_jsd(h, w, ht, wt, beta, mask=masked, chunk_size=4)),
                          ("logits", lambda: jsd(h @ w.T, zt, beta, mask=masked, chunk_size=5))):
            total, stats = run()
            assert_close(f"{name} jsd", ref, total, 1e-5, 1e-4)
            for label, a, b in zip(("hidden", "weight"), ref_grads, grads(total, h, w)):
                assert_close(f"{name} {label} grad", a, b, atol * 10, rtol * 2)
            assert_close(f"{name} entropies", torch.stack([naive_entropy(h @ w.T), naive_entropy(zt)], 1), stats,
                         1e-4, 1e-4)


def test_the_jsd_endpoints_are_the_two_kls_and_the_mixture_is_trls():
    """beta 0 is the forward KL over the whole vocabulary (the sparse-target KL with every id), beta 1 the reverse
    KL, and in between the value TRL's GKD trainer computes for the same logits."""
    h, w, ht, wt, _, _ = inputs(torch.float32, seed=4)
    z, zt = (h @ w.T).detach(), (ht @ wt.T)
    logq = torch.log_softmax(zt, -1)
    every = torch.arange(V).expand(N, V)
    forward = naive_sparse_target_kl(every, logq, z, reduction="sum")
    torch.testing.assert_close(jsd(z, zt, 0.0)[0], forward, rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(jsd(z, zt, 1.0)[0], (logp.exp() * (logp - logq)).sum(), rtol=1e-5, atol=1e-5)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        trl = GKDTrainer.generalized_jsd_loss(z[None], zt[None], beta=beta, reduction="sum")
        torch.testing.assert_close(jsd(z, zt, beta)[0], trl.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_ligers_fused_linear_jsd_is_the_same_loss(beta):
    """The Triton path of ``--objective jsd`` (Liger-Kernel's kernel, here in Triton's interpreter): the same sum,
    gradients and entropies as the formula, with a mask."""
    h, w, ht, wt, _, mask = inputs(torch.float32, seed=5)
    ref = naive_jsd(h @ w.T, ht @ wt.T, beta, mask)
    ref_grads = grads(ref, h, w)
    total, stats = fused_linear_jsd(h, w, ht, wt, beta, mask=mask, backend="triton")
    assert_close("liger jsd", ref, total, 1e-5, 1e-4)
    for label, a, b in zip(("hidden", "weight"), ref_grads, grads(total, h, w)):
        assert_close(f"liger {label} grad", a, b, 1e-5, 1e-4)
    assert_close("liger entropies", torch.stack([naive_entropy(h @ w.T), naive_entropy(ht @ wt.T)], 1), stats,
                 1e-4, 1e-4)


def test_bad_arguments_are_refused():
    h, w, ht, wt, ids, _ = inputs(torch.float32)
    with pytest.raises(ValueError, match="beta"):
        jsd(h @ w.T, (ht @ wt.T).detach(), 1.5)
    with pytest.raises(ValueError, match="teacher requires grad"):
        fused_linear_jsd(h, w, ht.requires_grad_(), wt, 0.5)
    with pytest.raises(ValueError, match=r"\[N\]"):
        sampled_token_loss(ids[:3], logits_NV=h @ w.T)
    with pytest.raises(ValueError, match="without gradient"):
        sampled_token_loss(ids, logits_NV=h @ w.T, advantages_N=torch.ones(N, requires_grad=True))
