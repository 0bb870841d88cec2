"""The top-k reverse-KL loss with its output layers' matmuls, forward and backward, by each implementation a
benchmark compares (``opcd bench loss``, ``bench/bench_topk_kl.py``), and the naive reference each is checked
against.

Inputs (``make_inputs``): the student's hidden states h_s [N, H] and output weight W_s [V, H], which get
gradients, and the teacher's h_t [N, M] and W_t [V, M]. The loss: the mean over tokens of
sum_{i in top-k of z} p_i (log p_i - log q_i), p = softmax(h_s W_s^T), q = softmax(h_t W_t^T).

Providers (``PROVIDERS``; each ``step(hs, ws, ht, wt, k)`` runs forward and backward and returns the loss):

* ``triton``: opcd's Triton path (``fused_linear_topk_kl_triton``; on a GPU, or in Triton's interpreter on a
  CPU when asked for by name at a tiny shape);
* ``torch_chunked``: opcd's chunked PyTorch path (``fused_linear_topk_kl_torch``);
* ``eager``: plain PyTorch over the full vocabulary (both [N, V] logits, float32 log-softmaxes, topk, gather);
* ``liger_jsd``: Liger-Kernel's ``LigerFusedLinearJSD`` with beta 1, the full-vocabulary reverse KL (its
  Triton kernels: a GPU; the ``bench`` extra);
* ``opcd_jsd``: opcd's own PyTorch fused linear JSD (``kernels/jsd.py``, what ``--objective jsd`` runs off the
  Triton backend) with beta 1, the same full-vocabulary reverse KL as ``liger_jsd``: ours beside Liger's;
* ``trl_topk``: TRL's top-k self-distillation loss (``compute_topk_self_distillation_loss``, alpha 1: the
  reverse KL, with its tail bucket) on full logits, when TRL is installed;
* ``matmul_floor``: the four matmuls alone (z = h_s W_s^T, t = h_t W_t^T, dh_s = g W_s, dW_s += g^T h_s),
  chunk by chunk: what no implementation can beat.

Each provider computes one of the losses in ``REFERENCES`` (Liger's the full-vocabulary KL, TRL's the top-k KL
with a tail bucket), and is checked against that loss written naively in float64.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels.naive import topk_ids
from ..kernels.torch_chunked import TORCH_CHUNK_BYTES, fused_linear_topk_kl_torch


def make_inputs(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """(h_s, W_s, h_t, W_t) for ``shape`` (``N``, ``V``, ``H``, ``M``), seeded; the student's two need grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    N, V, H, M = shape["N"], shape["V"], shape["H"], shape["M"]

    def randn(*size, scale=1.0):
        out = torch.empty(size, device=device, dtype=dtype)
        return out.normal_(0.0, scale, generator=gen)  # in place: no float32 temporary for low-precision inputs

    return randn(N, H).requires_grad_(), randn(V, H, scale=H**-0.5).requires_grad_(), randn(N, M), \
        randn(V, M, scale=M**-0.5)


def eager(hs, ws, ht, wt, k):
    z = hs @ ws.T
    with torch.no_grad():
        t = ht @ wt.T
    logp, logq = F.log_softmax(z.float(), dim=-1), F.log_softmax(t.float(), dim=-1)
    ids = torch.topk(z.detach(), k, dim=-1).indices
    lp, lq = logp.gather(1, ids), logq.gather(1, ids)
    loss = (lp.exp() * (lp - lq)).sum(-1).mean()
    loss.backward()
    return loss


def torch_chunked(hs, ws, ht, wt, k):
    loss = fused_linear_topk_kl_torch(hs, ws, ht, wt, k=k)
    loss.backward()
    return loss


def triton(hs, ws, ht, wt, k):
    from ..kernels.fused_linear_triton import fused_linear_topk_kl_triton

    loss = fused_linear_topk_kl_triton(hs, ws, ht, wt, k=k)
    loss.backward()
    return loss


def liger_jsd(hs, ws, ht, wt, k):
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=1.0)(hs, ws, ht, wt, None)
    loss.backward()
    return loss


def opcd_jsd(hs, ws, ht, wt, k):
    from ..kernels.jsd import fused_linear_jsd

    loss = fused_linear_jsd(hs, ws, ht, wt, 1.0)[0] / hs.shape[0]
    loss.backward()
    return loss


def trl_topk(hs, ws, ht, wt, k):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdpo.loss_utils import compute_topk_self_distillation_loss

    z = (hs @ ws.T).float()
    with torch.no_grad():
        t = (ht @ wt.T).float()
    loss = compute_topk_self_distillation_loss(z, t, distillation_topk=k, distillation_alpha=1.0,
                                               distillation_add_tail=True).mean()
    loss.backward()
    return loss


def matmul_floor(hs, ws, ht, wt, k):
    """The four matmuls in the chunks the fused paths use, with nothing in between (no loss: returns None)."""
    if hs.is_cuda:  # the Triton path's chunks and float32 weight-gradient accumulation
        from ..kernels.fused_linear_triton import chunk_rows
        from ..kernels.linear import accumulate_weight_grad

        rows = chunk_rows(ws.shape[0], k, hs.dtype, ht.dtype)
    else:  # the torch path's chunks
        rows = max(1, TORCH_CHUNK_BYTES // (5 * 4 * ws.shape[0]))

        def accumulate_weight_grad(grad, g, h):
            grad.addmm_(g.T, h)
    with torch.no_grad():
        grad_h = torch.empty_like(hs)
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device)
        for s in range(0, hs.shape[0], rows):
            g = hs[s : s + rows] @ ws.T
            ht[s : s + rows] @ wt.T
            torch.mm(g, ws, out=grad_h[s : s + rows])
            accumulate_weight_grad(grad_w, g, hs[s : s + rows])
        hs.grad, ws.grad = grad_h, grad_w.to(ws.dtype)
    return None


def full_reverse_kl(z, t, k):
    """KL(p || q) over the whole vocabulary, mean over tokens, in the logits' own precision."""
    logp, logq = F.log_softmax(z, dim=-1), F.log_softmax(t, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def topk_reverse_kl(z, t, k, tail=False):
    """The top-k KL of ``kernels/naive.py`` (the student's top-k ids S, full-vocabulary softmaxes; with
    ``tail`` the mass outside S as one more bucket), in the logits' own precision (float64 for the checks)."""
    logp, logq = F.log_softmax(z, dim=-1), F.log_softmax(t, dim=-1)
    ids = topk_ids(z.detach(), k)
    lp, lq = logp.gather(1, ids), logq.gather(1, ids)
    loss = (lp.exp() * (lp - lq)).sum(-1)
    if tail:
        pt, qt = 1 - lp.exp().sum(-1), 1 - lq.exp().sum(-1)
        loss = loss + pt * (pt.log() - qt.log())
    return loss.mean()


REFERENCES: dict[str, Callable] = {  # the loss a provider computes, on full float64 logits
    "topk": topk_reverse_kl,
    "topk_tail": lambda z, t, k: topk_reverse_kl(z, t, k, tail=True),
    "full": full_reverse_kl,
}


@dataclass(frozen=True)
class Provider:
    name: str
    step: Callable
    reference: str | None  # which of REFERENCES it computes (None: no loss, the floor)
    package: str | None = None  # the optional package it needs
    gpu_only: bool = False
    interpreted_on_cpu: bool = False  # runs on a CPU only in Triton's interpreter (asked for by name)

    def unavailable(self, device: str) -> str | None:
        """Why it cannot run here, or None."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed"
        if device == "cpu" and self.gpu_only:
            return "needs a GPU"
        if device == "cpu" and self.interpreted_on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs a GPU (or TRITON_INTERPRET=1 at a tiny shape)"
        return None


PROVIDERS = {p.name: p for p in (
    Provider("triton", triton, "topk", package="triton", interpreted_on_cpu=True),
    Provider("torch_chunked", torch_chunked, "topk"),
    Provider("eager", eager, "topk"),
    Provider("liger_jsd", liger_jsd, "full", package="liger_kernel", gpu_only=True),
    Provider("opcd_jsd", opcd_jsd, "full"),
    Provider("trl_topk", trl_topk, "topk_tail", package="trl"),
    Provider("matmul_floor", matmul_floor, None),
)}


def opcd_provider(device: str) -> str:
    """opcd's own path on this device: Triton on a GPU, the chunked PyTorch path elsewhere."""
    return "triton" if device == "cuda" else "torch_chunked"


def rel_err(ref: torch.Tensor, got: torch.Tensor | None) -> float:
    """||got - ref|| / ||ref|| in float64 (a missing or non-finite result never passes)."""
    if got is None:
        return float("inf")
    ref, got = ref.detach().double(), got.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


CHECK_LIMITS = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # ||out - ref|| / ||ref||


def check(provider: Provider, shape: dict, device: str, dtype: torch.dtype, rows: int = 256) -> dict:
    """The provider's loss and gradients against its naive reference in float64, on the first ``rows`` tokens
    of the shape's inputs (every token when there are fewer)."""
    hs, ws, ht, wt = make_inputs(shape, device, dtype)
    n = min(rows, shape["N"])
    hs = hs[:n].detach().requires_grad_()
    ht = ht[:n]
    ws.grad = None
    loss = provider.step(hs, ws, ht, wt, shape["k"])
    h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    ref = REFERENCES[provider.reference](h64 @ w64.T, ht.double() @ wt.double().T, shape["k"])
    ref.backward()
    errors = {"loss_err": rel_err(ref, loss), "grad_h_err": rel_err(h64.grad, hs.grad),
              "grad_w_err": rel_err(w64.grad, ws.grad)}
    limit = CHECK_LIMITS.get(dtype, 3e-2)
    return errors | {"checked_tokens": n, "ok": all(v <= limit for v in errors.values())}
