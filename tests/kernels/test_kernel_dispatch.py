"""Which implementation the public entry points run: OPCD_KERNEL=torch/triton/auto."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

# The Triton kernels run on the CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before opcd_cli.kernels.topk_kl_triton is first imported. (No conftest.py here: it would shadow
# the suite's own conftest module.)
os.environ.setdefault("TRITON_INTERPRET", "1")

from opcd_cli import kernels  # noqa: E402
from opcd_cli.kernels import backend_for, fused_linear_topk_reverse_kl, topk_reverse_kl  # noqa: E402


def graph_names(tensor):
    """Names of every autograd node behind ``tensor`` (each node visited once; several share a name)."""
    names, seen, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def logits_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 64, generator=gen).requires_grad_(), torch.randn(4, 64, generator=gen)


def hidden_inputs():
    gen = torch.Generator().manual_seed(1)
    hs, ws = torch.randn(4, 8, generator=gen).requires_grad_(), torch.randn(64, 8, generator=gen).requires_grad_()
    return hs, ws, torch.randn(4, 6, generator=gen), torch.randn(64, 6, generator=gen)


@pytest.mark.parametrize(
    "setting, logits_node, fused_node",
    [
        (None, "_TopkKLBackward", "_FusedLinearTopkKLBackward"),
        ("auto", "_TopkKLBackward", "_FusedLinearTopkKLBackward"),
        ("torch", "_TopkKLBackward", "_FusedLinearTopkKLBackward"),
        ("TRITON", "TopkKLTritonBackward", "FusedLinearTopkKLTritonBackward"),
    ],
)
def test_cpu_tensors_run_the_chosen_backend(monkeypatch, setting, logits_node, fused_node):
    if setting is None:
        monkeypatch.delenv("OPCD_KERNEL", raising=False)
    else:
        monkeypatch.setenv("OPCD_KERNEL", setting)
    student, teacher = logits_inputs()
    assert logits_node in graph_names(topk_reverse_kl(student, teacher, k=8))
    assert fused_node in graph_names(fused_linear_topk_reverse_kl(*hidden_inputs(), k=8))
    # the general functions, here training the second argument only, dispatch the same way
    assert logits_node in graph_names(kernels.topk_kl(student.detach(), teacher.requires_grad_(), k=8))
    hs, ws, ht, wt = hidden_inputs()
    second_side_loss = kernels.fused_linear_topk_kl(hs.detach(), ws.detach(), ht.requires_grad_(), wt, k=8)
    assert fused_node in graph_names(second_side_loss)


def test_auto_picks_triton_for_cuda_tensors_only(monkeypatch):
    monkeypatch.setenv("OPCD_KERNEL", "auto")
    assert backend_for(SimpleNamespace(is_cuda=True)) == "triton"
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert backend_for(SimpleNamespace(is_cuda=True)) == "torch"
    monkeypatch.setenv("OPCD_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        backend_for(torch.zeros(1))


def test_forced_torch_wins_on_cuda_tensors(monkeypatch):
    monkeypatch.setenv("OPCD_KERNEL", "torch")
    assert backend_for(SimpleNamespace(is_cuda=True)) == "torch"


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPCD_KERNEL", "cuda")
    student, teacher = logits_inputs()
    with pytest.raises(ValueError, match=r"OPCD_KERNEL must be one of \('auto', 'torch', 'triton'\); got 'cuda'"):
        topk_reverse_kl(student, teacher, k=8)
    with pytest.raises(ValueError, match="OPCD_KERNEL must be one of"):
        fused_linear_topk_reverse_kl(*hidden_inputs(), k=8)


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_teacher_requiring_grad_is_refused(monkeypatch, setting):
    monkeypatch.setenv("OPCD_KERNEL", setting)
    student, teacher = logits_inputs()
    with pytest.raises(ValueError, match="teacher"):
        topk_reverse_kl(student, teacher.requires_grad_(), k=8)
    hs, ws, ht, wt = hidden_inputs()
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_topk_reverse_kl(hs, ws, ht.requires_grad_(), wt, k=8)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    script = textwrap.dedent(
        """
        import torch
        from opcd_cli.kernels import topk_reverse_kl
        try:
            topk_reverse_kl(torch.randn(2, 16), torch.randn(2, 16), k=4)
        except RuntimeError as err:
            print("ERROR:", err)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["OPCD_KERNEL"] = "triton"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert "ERROR:" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.parametrize("backend, logits_node, fused_node", [
    ("torch", "_TopkKLBackward", "_FusedLinearTopkKLBackward"),
    ("triton", "TopkKLTritonBackward", "FusedLinearTopkKLTritonBackward"),
])
def test_the_backend_argument_wins_over_the_environment(monkeypatch, backend, logits_node, fused_node):
    """The loss passes its backend down; OPCD_KERNEL only decides what ``auto`` means."""
    monkeypatch.setenv("OPCD_KERNEL", "triton" if backend == "torch" else "torch")
    student, teacher = logits_inputs()
    assert logits_node in graph_names(topk_reverse_kl(student, teacher, k=8, backend=backend))
    assert fused_node in graph_names(fused_linear_topk_reverse_kl(*hidden_inputs(), k=8, backend=backend))
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_reverse_kl(student, teacher, k=8, backend="cuda")


def test_distill_loss_passes_its_backend_down(monkeypatch, tiny_student):
    """`--kernel triton` reaches the kernels through the loss, with no environment variable involved."""
    from opcd_cli import models
    from opcd_cli.loss import DistillLoss
    from opcd_cli.micro_batches import pack

    monkeypatch.delenv("OPCD_KERNEL", raising=False)
    student = models.load_model(str(tiny_student)).train()
    teacher = models.frozen_copy(student)
    packed = pack([[1, 20, 21]], [[30, 31, 2]], pad_id=0, device="cpu")
    parts = DistillLoss(student, teacher, vocab=112, topk=8, renorm=False, backend="triton").on_policy(packed, packed)
    assert "FusedLinearTopkKLTritonBackward" in graph_names(parts.total)
    assert "OPCD_KERNEL" not in os.environ
