"""The teacher's prefix cache: the context every teacher prompt starts with is read once, and the loss and its
gradients are those of reading it every time."""

from __future__ import annotations

import pytest
import torch

from opcd_cli import models, sources
from opcd_cli.data import load_examples, read_context
from opcd_cli.forward import TeacherPrefix, can_reuse_prefix, common_prefix
from opcd_cli.loss import DistillLoss
from opcd_cli.micro_batches import pack
from opcd_cli.prompts import ChatRenderer, build_views

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def toy():
    folder = sources.model_folder("toy:small")
    torch.manual_seed(0)
    student = models.load_model(folder, "float32")
    with torch.no_grad():  # a student that differs from its teacher, as after some training
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    teacher = models.frozen(models.load_model(folder, "float32"))
    return student, teacher, models.load_tokenizer("toy:small")


def loss_and_grads(student, teacher, views, responses, prefix, fused: bool):
    loss = DistillLoss(student, teacher, models.output_rows(student), 8, False, 0.5, "torch")
    loss.fused = fused and loss.fused
    student.zero_grad(set_to_none=True)
    parts = loss.on_policy(pack([v.student_ids for v in views], responses, 0, "cpu"),
                           pack([v.teacher_ids for v in views], responses, 0, "cpu", prefix),
                           pack([v.student_context_ids for v in views], responses, 0, "cpu"))
    mean = parts.total / sum(map(len, responses))  # what training differentiates: the mean over response tokens
    mean.backward()
    return mean.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("context_as", ["system", "user-prefix"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "logits"])
def test_the_cached_prefix_gives_the_loss_and_gradients_of_the_whole_prompt(toy, context_as, fused):
    student, teacher, tokenizer = toy
    renderer = ChatRenderer(tokenizer, "toy:small", {})
    examples = load_examples("toy:codes/train")[:4]
    views = build_views(examples, read_context("toy:codes/context"), context_as, renderer, renderer)
    responses = [[20, 21, 22], [23, 24, 25, 26, 27, 28], [29], [30, 31]]  # ragged: padding after the prefix
    shared = common_prefix([v.teacher_ids for v in views])
    assert len(shared) > 100  # the rendered context (and, as a user prefix, what comes before it)
    assert all(list(v.teacher_ids[: len(shared)]) == shared for v in views)
    expected = loss_and_grads(student, teacher, views, responses, None, fused)
    prefix = TeacherPrefix(shared)
    for _ in range(2):  # the second micro-batch reuses the keys and values of the first
        got = loss_and_grads(student, teacher, views, responses, prefix, fused)
        torch.testing.assert_close(got[0], expected[0], rtol=TOLERANCE, atol=TOLERANCE)
        for name, grad in expected[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    assert prefix._kv is not None and prefix._kv[0][0].shape[0] == 1  # kept once, for one row


def test_common_prefix_leaves_every_prompt_its_last_token_and_differing_contexts_share_little():
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # [1, 2, 3] keeps its 3: it predicts the response
    assert common_prefix([[1, 2, 3, 4], [1, 2, 9, 4]]) == [1, 2]
    assert common_prefix([[5], [5, 6]]) == []
    from opcd_cli.distill.passes import MIN_PREFIX_TOKENS, teacher_prefix
    from opcd_cli.config import DistillConfig

    class View:
        def __init__(self, ids):
            self.teacher_ids = ids

    cfg = DistillConfig(student="toy:small", data="toy:codes/train")
    teacher = models.frozen(models.load_model(sources.model_folder("toy:small"), "float32"))
    shared = list(range(100, 100 + MIN_PREFIX_TOKENS))
    assert len(teacher_prefix(cfg, [View(shared + [1, 2]), View(shared + [3])], teacher)) == MIN_PREFIX_TOKENS
    assert teacher_prefix(cfg, [View([7] + shared + [1]), View([8] + shared + [1])], teacher) is None  # per-row contexts
    from dataclasses import replace

    assert teacher_prefix(replace(cfg, teacher_prefix_cache=False), [View(shared + [1])] * 2, teacher) is None


def test_a_teacher_with_sliding_windows_reads_its_whole_prompts():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert not can_reuse_prefix(Qwen3ForCausalLM(config))
    assert can_reuse_prefix(Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         num_key_value_heads=1, head_dim=8)))
