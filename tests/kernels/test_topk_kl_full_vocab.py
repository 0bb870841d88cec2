"""With k = V the loss is the full-vocabulary reverse KL(student || teacher), computed here independently."""

import os

import pytest
import torch
import torch.nn.functional as F

# The Triton kernels run on the CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before opcd_cli.kernels.topk_kl_triton is first imported. (No conftest.py here: it would shadow
# the suite's own conftest module.)
os.environ.setdefault("TRITON_INTERPRET", "1")

from opcd_cli.kernels.torch_chunked import topk_kl_torch  # noqa: E402
from opcd_cli.kernels.topk_kl_triton import topk_kl_triton  # noqa: E402

from _testing import assert_close  # noqa: E402

N, V = 7, 300
IMPLEMENTATIONS = {"torch": topk_kl_torch, "triton": topk_kl_triton}


def logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=gen) * 2, torch.randn(N, V, generator=gen) * 2


def with_grad(loss_fn, student):
    z = student.clone().requires_grad_()
    loss = loss_fn(z)
    (grad,) = torch.autograd.grad(loss * 3.0, z)
    return loss.detach(), grad


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_equals_kl_div(impl):
    student, teacher = logits()
    # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q): KL(p || q), p the student
    ref = with_grad(
        lambda z: F.kl_div(F.log_softmax(teacher, -1), F.log_softmax(z, -1), reduction="batchmean", log_target=True),
        student,
    )
    got = with_grad(lambda z: IMPLEMENTATIONS[impl](z, teacher, k=V), student)
    assert_close(f"{impl} loss vs kl_div", ref[0], got[0], 1e-6, 1e-6)
    assert_close(f"{impl} grad vs kl_div", ref[1], got[1], 1e-7, 1e-5)
    # renormalising within S changes nothing when S is the whole vocabulary
    renormed = with_grad(lambda z: IMPLEMENTATIONS[impl](z, teacher, k=V, renorm=True), student)
    assert_close(f"{impl} renorm loss vs kl_div", ref[0], renormed[0], 1e-6, 1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # from Liger's kernel, in numpy
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_equals_liger_jsd_with_beta_one(impl):
    """Liger-Kernel's generalised JSD at beta = 1 is KL(input || target) of log-probabilities (its Triton
    kernel runs here through the same interpreter)."""
    liger_jsd = pytest.importorskip("liger_kernel.transformers.functional").liger_jsd
    student, teacher = logits()
    ref = with_grad(lambda z: liger_jsd(F.log_softmax(z, -1), F.log_softmax(teacher, -1), beta=1.0), student)
    got = with_grad(lambda z: IMPLEMENTATIONS[impl](z, teacher, k=V), student)
    assert_close(f"{impl} loss vs liger jsd", ref[0], got[0], 1e-6, 1e-6)
    assert_close(f"{impl} grad vs liger jsd", ref[1], got[1], 1e-7, 1e-5)
