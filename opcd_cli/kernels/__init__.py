"""Top-k KL losses for OPCD, and a KL from a sparse fixed target.

Public entry points (first argument's top-k support, gradient to whichever arguments require grad):

* ``topk_kl(first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean",
  return_topk_mass=False)``: KL_S(p || q) with p = softmax(first), q = softmax(second) and S the top-k ids
  of the first;
* ``fused_linear_topk_kl(first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None,
  renorm=False, chunk_size=None, reduction="mean", return_topk_mass=False)``: the same on
  ``hidden @ weight.T`` logits, computed chunk by chunk;
* ``topk_reverse_kl`` and ``fused_linear_topk_reverse_kl``, the OPCD loss: the same functions with the student
  first and the teacher second, the teacher refused if it requires grad;
* ``sparse_target_kl(target_ids_Nk, target_logprobs_Nk, logits_NV, mask=None, reduction="mean")`` and
  ``fused_linear_sparse_target_kl(target_ids_Nk, target_logprobs_Nk, hidden_NH, weight_VH, mask=None,
  reduction="mean", chunk_size=None)``: sum over saved target ids of q_i (log q_i - log p_i) (torch only).

``reference.py`` holds the maths and the plain-PyTorch implementation, which is what runs on a CPU;
``topk_kl_triton.py`` (logits) and ``fused_linear.py`` (hidden states) hold the Triton implementation;
``sparse_target.py`` the sparse-target KL.

Which top-k implementation runs (``backend_for``, on the first argument): the environment variable
``OPCD_KERNEL`` if set to ``torch`` or ``triton``; otherwise (``auto``, the default) Triton for CUDA tensors when
triton is importable, and torch elsewhere. ``OPCD_KERNEL=triton`` with CPU tensors runs the kernels in Triton's
interpreter, which needs ``TRITON_INTERPRET=1`` in the environment when the kernels are defined; the Triton
modules are imported on first use only, so the variable can still be set after this package is imported, up to
the first Triton call. An unknown ``OPCD_KERNEL`` value is a ``ValueError``.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from .reference import (
    fused_linear_topk_kl_torch,
    naive_topk_kl,
    naive_topk_reverse_kl,
    refuse_teacher_grad,
    topk_ids,
    topk_kl_torch,
)
from .sparse_target import fused_linear_sparse_target_kl, naive_sparse_target_kl, sparse_target_kl

BACKENDS = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the triton package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def backend_for(tensor) -> str:
    """Which implementation runs for ``tensor``: ``OPCD_KERNEL`` if set, else Triton on CUDA and torch elsewhere."""
    choice = os.environ.get("OPCD_KERNEL", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"OPCD_KERNEL must be one of {BACKENDS}; got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("OPCD_KERNEL=triton but the triton package is not installed")
    return choice


def topk_kl(first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", return_topk_mass=False):
    """Top-k KL_S(p || q) from logits [N, V]; differentiable with respect to whichever argument requires grad."""
    kw = dict(k=k, mask=mask, renorm=renorm, reduction=reduction, return_topk_mass=return_topk_mass)
    if backend_for(first_logits) == "triton":
        from .topk_kl_triton import topk_kl_triton

        return topk_kl_triton(first_logits, second_logits, **kw)
    return topk_kl_torch(first_logits, second_logits, **kw)


def fused_linear_topk_kl(
    first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None, renorm=False,
    chunk_size=None, reduction="mean", return_topk_mass=False,
):
    """Top-k KL of ``hidden @ weight.T`` logits, computed chunk by chunk over tokens; gradients reach whichever
    of the four tensors require grad."""
    args = (first_hidden, first_weight, second_hidden, second_weight)
    kw = dict(
        k=k, mask=mask, renorm=renorm, reduction=reduction, chunk_size=chunk_size, return_topk_mass=return_topk_mass
    )
    if backend_for(first_hidden) == "triton":
        from .fused_linear import fused_linear_topk_kl_triton

        return fused_linear_topk_kl_triton(*args, **kw)
    return fused_linear_topk_kl_torch(*args, **kw)


def topk_reverse_kl(
    student_logits, teacher_logits, k=256, mask=None, renorm=False, reduction="mean", return_topk_mass=False
):
    """Top-k reverse KL from logits [N, V]; differentiable with respect to ``student_logits`` only (a teacher
    that requires grad is a ``ValueError``)."""
    refuse_teacher_grad(teacher_logits)
    return topk_kl(
        student_logits, teacher_logits, k=k, mask=mask, renorm=renorm, reduction=reduction,
        return_topk_mass=return_topk_mass,
    )


def fused_linear_topk_reverse_kl(
    student_hidden, student_weight, teacher_hidden, teacher_weight, k=256, mask=None, renorm=False,
    chunk_size=None, reduction="mean", return_topk_mass=False,
):
    """Top-k reverse KL of ``hidden @ weight.T`` logits, computed chunk by chunk over tokens (a teacher tensor
    that requires grad is a ``ValueError``)."""
    refuse_teacher_grad(teacher_hidden, teacher_weight)
    return fused_linear_topk_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, k=k, mask=mask, renorm=renorm,
        chunk_size=chunk_size, reduction=reduction, return_topk_mass=return_topk_mass,
    )


__all__ = [
    "BACKENDS",
    "backend_for",
    "fused_linear_sparse_target_kl",
    "fused_linear_topk_kl",
    "fused_linear_topk_reverse_kl",
    "naive_sparse_target_kl",
    "naive_topk_kl",
    "naive_topk_reverse_kl",
    "sparse_target_kl",
    "topk_ids",
    "topk_kl",
    "topk_reverse_kl",
    "triton_available",
]
