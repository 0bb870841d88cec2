"""Top-k KL losses for OPCD, and a KL from a sparse fixed target.

Public entry points (first argument's top-k support; gradients to whichever arguments require grad):

* ``topk_kl(first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean",
  return_topk_mass=False, backend="auto", tail=False)``: KL_S(p || q) with p = softmax(first), q =
  softmax(second) and S the top-k ids of the first (``renorm``: both renormalised on S; ``tail``: the mass
  outside S as one more bucket of both, ``naive.py``);
* ``fused_linear_topk_kl(first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None,
  renorm=False, reduction="mean", return_topk_mass=False, chunk_size=None, backend="auto", tail=False,
  return_entropy=False, union=False)``: the same on
  ``hidden @ weight.T`` logits, computed chunk by chunk (no [N, V] tensor);
* ``topk_reverse_kl`` and ``fused_linear_topk_reverse_kl``, the OPCD loss: the same with the student first and
  the teacher second, the teacher refused if it requires grad;
* ``sparse_target_kl`` and ``fused_linear_sparse_target_kl``: sum over saved target ids of
  q_i (log q_i - log p_i), for off-policy distillation (PyTorch only).

Files: ``naive.py`` (the maths, for tests and benchmarks), ``torch_chunked.py`` (PyTorch, chunked: the CPU
path), ``topk_kl_triton.py`` and ``fused_linear_triton.py`` (the Triton kernels and their autograd functions),
``linear.py`` (the output layer's matmuls around both), ``sparse_target.py``, ``arguments.py`` (checks and
reductions). Each backend has its own chunk budget: ``TORCH_CHUNK_BYTES`` of float32 temporaries,
``TRITON_CHUNK_BYTES`` of logits.

Which implementation runs (``backend_for``): the ``backend`` argument when it is ``torch`` or ``triton``;
for ``auto``, the environment variable ``OPCD_KERNEL`` if set (an override for a whole process), else Triton
for CUDA tensors when triton is importable and PyTorch elsewhere. Triton with CPU tensors runs the kernels in
Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before the kernels are first
imported (they are imported on first use).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from ..config import KERNELS as BACKENDS
from .arguments import refuse_teacher_grad
from .sparse_target import fused_linear_sparse_target_kl, sparse_target_kl
from .torch_chunked import fused_linear_topk_kl_torch, topk_kl_torch


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the triton package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def backend_for(tensor, backend: str = "auto") -> str:
    """``torch`` or ``triton``: the one asked for, else ``OPCD_KERNEL``, else Triton on CUDA and PyTorch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("OPCD_KERNEL", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"OPCD_KERNEL must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("the triton backend was asked for but the triton package is not installed")
    return backend


def topk_kl(first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", return_topk_mass=False,
            backend="auto", tail=False, return_entropy=False, union=False):
    """Top-k KL_S(p || q) from logits [N, V]; differentiable with respect to whichever argument requires grad."""
    kw = dict(k=k, mask=mask, renorm=renorm, reduction=reduction, return_topk_mass=return_topk_mass, tail=tail,
              return_entropy=return_entropy, union=union)
    if backend_for(first_logits, backend) == "triton":
        from .topk_kl_triton import topk_kl_triton

        return topk_kl_triton(first_logits, second_logits, **kw)
    return topk_kl_torch(first_logits, second_logits, **kw)


def fused_linear_topk_kl(first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None, renorm=False,
                         reduction="mean", return_topk_mass=False, chunk_size=None, backend="auto", tail=False,
                         return_entropy=False, union=False):
    """Top-k KL of ``hidden @ weight.T`` logits, computed chunk by chunk over tokens; gradients reach whichever
    of the four tensors require grad (weights' accumulated in float32). ``reduction``: "mean" or "sum"."""
    args = (first_hidden, first_weight, second_hidden, second_weight)
    kw = dict(k=k, mask=mask, renorm=renorm, reduction=reduction, chunk_size=chunk_size,
              return_topk_mass=return_topk_mass, tail=tail, return_entropy=return_entropy, union=union)
    if backend_for(first_hidden, backend) == "triton":
        from .fused_linear_triton import fused_linear_topk_kl_triton

        return fused_linear_topk_kl_triton(*args, **kw)
    return fused_linear_topk_kl_torch(*args, **kw)


def topk_reverse_kl(student_logits, teacher_logits, k=256, mask=None, renorm=False, reduction="mean",
                    return_topk_mass=False, backend="auto", tail=False, return_entropy=False, union=False):
    """The OPCD loss from logits [N, V]: ``topk_kl`` with the student first; a teacher that requires grad is a
    ``ValueError``."""
    refuse_teacher_grad(teacher_logits)
    return topk_kl(student_logits, teacher_logits, k=k, mask=mask, renorm=renorm, reduction=reduction,
                   return_topk_mass=return_topk_mass, backend=backend, tail=tail, return_entropy=return_entropy,
                   union=union)


def fused_linear_topk_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, k=256, mask=None,
                                 renorm=False, reduction="mean", return_topk_mass=False, chunk_size=None,
                                 backend="auto", tail=False, return_entropy=False, union=False):
    """The OPCD loss from hidden states and output weights: ``fused_linear_topk_kl`` with the student first; a
    teacher tensor that requires grad is a ``ValueError``."""
    refuse_teacher_grad(teacher_hidden, teacher_weight)
    return fused_linear_topk_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, k=k, mask=mask,
                                renorm=renorm, reduction=reduction, return_topk_mass=return_topk_mass,
                                chunk_size=chunk_size, backend=backend, tail=tail, return_entropy=return_entropy,
                                union=union)


__all__ = [
    "BACKENDS",
    "backend_for",
    "fused_linear_sparse_target_kl",
    "fused_linear_topk_kl",
    "fused_linear_topk_reverse_kl",
    "sparse_target_kl",
    "topk_kl",
    "topk_reverse_kl",
    "triton_available",
]
