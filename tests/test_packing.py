"""Micro-batches by token budget, sequences packed end to end in rows: the loss and its gradients are those of
padded rows, the packing keeps to the budget, and a model that would let packed sequences see each other is
refused."""

from __future__ import annotations

import random

import pytest
import torch

from opcd_cli import models, sources
from opcd_cli.config import DistillConfig
from opcd_cli.data import load_examples, read_context
from opcd_cli.errors import OpcdError
from opcd_cli.forward import TeacherPrefix, common_prefix, packing_is_exact
from opcd_cli.loss import DistillLoss
from opcd_cli.micro_batches import pack, pack_rows
from opcd_cli.micro_batches import Packer, by_prompts, by_token_budget, into_rows, split_to
from opcd_cli.prompts import ChatRenderer, build_views

TOLERANCE = 1e-5
RESPONSES = [[20, 21, 22], [23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33], [29], [30, 31]]  # ragged: padding when padded
ROWS = [3, 1]  # packed: three sequences in the first row, one in the second (which ends in padding)


@pytest.fixture(scope="module")
def toy():
    folder = sources.model_folder("toy:small")
    student = models.load_model(folder, "float32")
    with torch.no_grad():  # a student that differs from its teacher, as after some training
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    teacher = models.frozen(models.load_model(folder, "float32"))
    renderer = ChatRenderer(models.load_tokenizer("toy:small"), "toy:small", {})
    views = build_views(load_examples("toy:codes/train")[:4], read_context("toy:codes/context"), "system", renderer,
                        renderer)
    return student, teacher, views


def on_policy(student, teacher, views, packer: Packer, prefix, fused: bool):
    """The mean loss over response tokens (distillation and consistency terms) and the student's gradients."""
    loss = DistillLoss(student, teacher, models.output_rows(student), 8, False, 0.5, "torch")
    loss.fused = fused and loss.fused
    student.zero_grad(set_to_none=True)
    parts = loss.on_policy(packer([v.student_ids for v in views], RESPONSES, ROWS),
                           packer([v.teacher_ids for v in views], RESPONSES, ROWS, prefix),
                           packer([v.student_context_ids for v in views], RESPONSES, ROWS))
    mean = parts.total / sum(map(len, RESPONSES))
    mean.backward()
    assert parts.consistency > 0
    return mean.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=TOLERANCE, atol=TOLERANCE)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


@pytest.mark.parametrize("cached_prefix", [False, True], ids=["whole-prompts", "prefix-cache"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "logits"])
def test_packed_rows_give_the_loss_and_gradients_of_padded_rows(toy, fused, cached_prefix):
    student, teacher, views = toy
    padded, flat = Packer(0, torch.device("cpu")), Packer(0, torch.device("cpu"), True, cached_prefix)
    prefix = TeacherPrefix(common_prefix([v.teacher_ids for v in views])) if cached_prefix else None
    expected = on_policy(student, teacher, views, padded, prefix, fused)
    got = on_policy(student, teacher, views, flat, prefix, fused)
    assert_same(got, expected)
    assert got[0] > 0 and any(g.abs().sum() > 0 for g in got[1].values())


def test_off_policy_targets_line_up_with_the_packed_row(toy):
    student, _, views = toy
    loss = DistillLoss(student, None, models.output_rows(student), 8, False)
    ids = torch.tensor([t for r in RESPONSES for t in r])[:, None]
    results = []
    for packer in (Packer(0, torch.device("cpu")), Packer(0, torch.device("cpu"), True)):
        student.zero_grad(set_to_none=True)
        parts = loss.off_policy(packer([v.student_ids for v in views], RESPONSES, ROWS), ids, torch.zeros(ids.shape))
        mean = parts.total / ids.shape[0]
        mean.backward()
        results.append((mean.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    assert_same(results[1], results[0])


def test_packed_rows_pad_only_their_ends_and_restart_positions():
    prompts, responses = [[1, 2, 3], [4, 5], [6, 7]], [[6], [7, 8, 9], [1]]
    packed, padded = pack_rows(prompts, responses, [2, 1], 0, "cpu"), pack(prompts, responses, 0, "cpu")
    assert packed.input_ids_BT.tolist() == [[1, 2, 3, 6, 4, 5, 7, 8, 9], [6, 7, 1, 0, 0, 0, 0, 0, 0]]
    assert packed.position_ids_BT.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert packed.rows_N.tolist() == [0, 0, 0, 0, 1] and packed.cols_N.tolist() == [2, 5, 6, 7, 1]
    assert packed.padding == 6 and packed.positions == 18
    assert padded.padding == 15 - 12 and padded.positions == 15
    after = pack_rows([[9, 9, 1, 2, 3], [9, 9, 4, 5]], responses[:2], [2], 0, "cpu", TeacherPrefix([9, 9]))
    assert after.position_ids_BT.tolist() == [[2, 3, 4, 5, 2, 3, 4, 5, 6]] and after.cols_N.tolist() == [2, 5, 6, 7]
    with pytest.raises(ValueError):
        pack_rows(prompts, responses, [2, 2], 0, "cpu")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sdpa_and_eager_attention_keep_packed_sequences_apart(attention):
    model = models.load_model(sources.model_folder("toy:small"), "float32")
    model.set_attn_implementation(attention)
    assert packing_is_exact(model) and packing_is_exact(model, after_prefix=True)


class IgnoresPositions(torch.nn.Module):
    """A model whose forward drops the position ids, so packed sequences attend to each other."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, position_ids=None, **kwargs):
        return self.model(**kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()


def test_a_model_that_lets_packed_sequences_meet_is_refused(toy):
    from opcd_cli.distill.passes import make_packer

    _, teacher, views = toy
    leaky = IgnoresPositions(teacher)
    assert not packing_is_exact(leaky)
    cfg = DistillConfig(student="toy:small", data="toy:codes/train", micro_batch_tokens=4096)
    with pytest.raises(OpcdError, match="does not keep them apart there; leave out --micro-batch-tokens"):
        make_packer(cfg, views, leaky, teacher, "toy:small", None, 0)
    packer = make_packer(cfg, views, teacher, teacher, "toy:small", TeacherPrefix([1] * 16), 0)
    assert packer.packed and packer.packed_after_prefix
    small = DistillConfig(student="toy:small", data="toy:codes/train", micro_batch_tokens=8)
    with pytest.raises(OpcdError, match="--micro-batch-tokens 8 cannot hold the longest sequence"):
        make_packer(small, views, teacher, teacher, "toy:small", None, 0)


def test_micro_batches_keep_to_the_budget_and_split_to_a_common_count():
    rng = random.Random(0)
    for trial in range(200):
        costs = [rng.choice([rng.randint(16, 64), rng.randint(16, 512)]) for _ in range(rng.randint(1, 24))]
        budget = rng.randint(max(costs), 2048)
        batches = by_token_budget(costs, budget)
        assert all(len(batch) == 1 for batch in batches)  # one row each
        assert sorted(i for batch in batches for row in batch for i in row) == list(range(len(costs)))
        assert all(sum(costs[i] for i in batch[0]) <= budget for batch in batches)
        assert len(batches) <= 2 * sum(costs) / budget + 1  # first fit: no two rows could be merged
        assert batches == by_token_budget(list(costs), budget)  # the costs alone decide
        count = rng.randint(len(batches), len(costs))
        split = split_to(batches, count, costs)
        assert len(split) == count and all(batch and all(batch) for batch in split)
        assert sorted(i for batch in split for row in batch for i in row) == list(range(len(costs)))
    assert by_prompts(3, 2) == [[[0], [1]], [[2]]]
    assert into_rows([300, 100, 250, 100], 400) == [[0, 1], [2, 3]]
    assert split_to([[[0, 1]]], 2, [5, 5]) == [[[0]], [[1]]]  # one row of two: its sequences part
    assert split_to([[[0], [1, 2]]], 2, [5, 3, 3]) == [[[0]], [[1, 2]]]  # several rows: the rows part
    with pytest.raises(ValueError):
        split_to([[[0, 1]]], 3, [5, 5])


def test_the_packing_benchmark_runs_and_its_setups_agree(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "packing.json"
    assert bench.main(["--out", str(out), "--sequences", "6", "--prompt", "8", "--context", "16",
                       "--max-response", "40", "--repeats", "1", "--budgets", "48,96"]) == 0
    padded, *packed = json.loads(out.read_text())["results"]
    assert padded["padding_share"] > 0 and all(r["padding_share"] == 0 for r in packed)
    for row in packed:
        assert row["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
