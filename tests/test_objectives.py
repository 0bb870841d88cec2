"""``--objective``, ``--samples-per-prompt`` and ``--reward-weight`` on tiny models: each objective's terms on both
paths (fused with the output layer, and from logits) against its formula on the models' own logits; the
reward's advantages within groups; what a step records."""

from __future__ import annotations

import pytest
import torch

from opcd_cli import models
from opcd_cli.kernels.naive import naive_entropy, naive_jsd, naive_sparse_target_kl, naive_topk_kl
from opcd_cli.loss import DistillLoss
from opcd_cli.micro_batches import pack
from test_loss import PROMPTS_S, PROMPTS_T, RESPONSES, response_logits

IDS = torch.tensor([t for r in RESPONSES for t in r])
ADVANTAGES = torch.tensor([0.5, 0.5, 0.5, -1.5])  # the first response's three tokens, then the second's one


def formula(objective: str, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """The distillation term's value, written out on full logits [N, 112]."""
    logp, logq = torch.log_softmax(z_s.float(), -1), torch.log_softmax(z_t.float(), -1)
    if objective == "sampled-token":  # the k1 estimate of KL(student || teacher) on the sampled tokens
        return (logp.gather(1, IDS[:, None]) - logq.gather(1, IDS[:, None])).sum()
    if objective == "topk-forward-kl":  # KL(teacher || student) over the teacher's top-k
        top = logq.topk(8)
        return naive_sparse_target_kl(top.indices, top.values, z_s, reduction="sum")
    if objective == "jsd":
        return naive_jsd(z_s, z_t, 0.3)
    return naive_topk_kl(z_s, z_t, k=8, reduction="sum")


def surrogate(objective: str, z_s: torch.Tensor, z_t: torch.Tensor, reward_weight: float) -> torch.Tensor:
    """What is differentiated, with autograd to the student's logits: the policy-gradient surrogates' coefficients
    held without gradient."""
    logp = torch.log_softmax(z_s.float(), -1).gather(1, IDS[:, None])[:, 0]
    total = -(reward_weight * ADVANTAGES * logp).sum() if reward_weight else 0.0
    if objective == "sampled-token":
        logq = torch.log_softmax(z_t.float(), -1).gather(1, IDS[:, None])[:, 0]
        return total + ((logp - logq).detach() * logp).sum()
    return total + formula(objective, z_s, z_t)


@pytest.mark.parametrize("objective,reward_weight", [("sampled-token", 0.0), ("topk-forward-kl", 0.0), ("jsd", 0.0),
                                                     ("topk-reverse-kl", 0.5), ("sampled-token", 0.5)])
def test_each_objective_is_its_formula_on_both_paths(tiny_student, tiny_teacher, objective, reward_weight):
    student = models.load_model(str(tiny_student)).train()
    teacher = models.frozen(models.load_model(str(tiny_teacher)))
    s_in, t_in = pack(PROMPTS_S, RESPONSES, 0, "cpu"), pack(PROMPTS_T, RESPONSES, 0, "cpu")
    loss_fn = DistillLoss(student, teacher, vocab=112, topk=8, renorm=False, objective=objective, jsd_beta=0.3,
                          reward_weight=reward_weight)
    advantages = ADVANTAGES if reward_weight else None
    got, grads = [], []
    for fused in (True, False):
        loss_fn.fused = fused
        parts = loss_fn.on_policy(s_in, t_in, ids_N=IDS, advantages_N=advantages)
        student.zero_grad()
        parts.total.backward()
        got.append(parts)
        grads.append(student.get_output_embeddings().weight.grad.clone())

    z_s = response_logits(student, s_in)[:, :112]  # with autograd, for the reference gradient
    with torch.no_grad():
        z_t = response_logits(teacher, t_in)[:, :112]
    student.zero_grad()
    surrogate(objective, z_s, z_t, reward_weight).backward()
    expected_grad = student.get_output_embeddings().weight.grad
    z_s = z_s.detach()
    logp = torch.log_softmax(z_s, -1).gather(1, IDS[:, None])[:, 0]
    for parts, grad in zip(got, grads):
        torch.testing.assert_close(parts.distill, formula(objective, z_s, z_t), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(parts.entropies[0], naive_entropy(z_s).mean(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.entropies[1], naive_entropy(z_t).mean(), rtol=1e-4, atol=1e-5)
        expected_reward = -(reward_weight * ADVANTAGES * logp).sum() if reward_weight else torch.tensor(0.0)
        torch.testing.assert_close(parts.reward, expected_reward, rtol=1e-4, atol=1e-6)
        if objective == "topk-forward-kl":  # the teacher's mass inside its own top-k, which the loss reads
            mass = torch.softmax(z_t, -1).topk(8).values.sum(-1).mean()
            torch.testing.assert_close(parts.topk_mass, mass, rtol=1e-5, atol=1e-6)
        elif objective in ("sampled-token", "jsd"):
            assert parts.topk_mass is None
    assert float(grads[0].abs().sum()) > 0


def test_advantages_are_rewards_less_their_groups_mean_and_over_its_spread_with_reward_std(prepared):
    from dataclasses import replace

    from opcd_cli.distill.step import Sequences, rewards_and_advantages

    cfg, run, _ = prepared
    row = run.examples[0]
    right = run.tokenizer.encode(row.answer, add_special_tokens=False)
    wrong = run.tokenizer.encode("nothing like it", add_special_tokens=False)
    seqs = Sequences([run.views[0]] * 6, [right, wrong, wrong, right, right, right], rows=[0] * 6)
    for reward_std, expected in ((False, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]),
                                 (True, [0.5 / 0.7072, -0.5 / 0.7072, -0.5 / 0.7072, 0.5 / 0.7072, 0.0, 0.0])):
        settings = replace(cfg, loss=replace(cfg.loss, reward_weight=1.0, reward_std=reward_std),
                           optim=replace(cfg.optim, samples_per_prompt=2))
        rewards, advantages = rewards_and_advantages(replace(run, cfg=settings), seqs)
        assert rewards == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # the verifier's, on each response
        assert advantages == pytest.approx(expected, abs=1e-4)  # groups of two: (1, 0), (0, 1), (1, 1)


def run_toy(folder, recipe: str = "toy-codes", **settings) -> tuple[dict, list[dict]]:
    """A short toy run in this process: (its summary, its metrics per step)."""
    import json
    from pathlib import Path

    from opcd_cli.config import build_distill_config, read_recipe
    from opcd_cli.distill import distill
    from opcd_cli.ui import UI

    cfg = build_distill_config(read_recipe(recipe), {"batch_size": 2, "steps": 2, "topk": 4, "max_new_tokens": 4,
                                                     "show_prompts": 0, "eval_before": False, **settings})
    summary = distill(cfg, UI(quiet=True))
    lines = Path(summary["output_dir"], "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines]


def test_samples_per_prompt_samples_each_prompt_in_a_group(prepared):
    from dataclasses import replace

    from opcd_cli.distill.samplers import new_sampler
    from opcd_cli.distill.step import step_counts, step_sequences

    cfg, run, _ = prepared
    grouped = replace(run, cfg=replace(cfg, optim=replace(cfg.optim, samples_per_prompt=3)))
    torch.manual_seed(0)
    seqs = step_sequences(grouped, new_sampler(run, "student", cfg.per_step * 3), None, 1)
    assert len(seqs.responses) == len(seqs.views) == 3 * cfg.per_step == 6
    assert seqs.rows[:3] == [seqs.rows[0]] * 3 and seqs.rows[3:] == [seqs.rows[3]] * 3 != seqs.rows[:3]
    assert all(v is seqs.views[0] for v in seqs.views[:3])  # a group: one prompt, three samples of it
    assert step_counts(grouped, seqs).responses == 6


def test_every_objective_trains_and_logs_what_it_means(tmp_path):
    """Two steps each on the toy: every objective descends and records its terms; the top-k mass where the
    objective has one; the reward and its term with --reward-weight."""
    runs = {name: run_toy(tmp_path / name, output_dir=str(tmp_path / name), **settings) for name, settings in (
        ("sampled-token", {"objective": "sampled-token"}),
        ("topk-forward-kl", {"objective": "topk-forward-kl"}),
        ("jsd", {"objective": "jsd", "jsd_beta": 0.25}),
        ("reward", {"samples_per_prompt": 2, "reward_weight": 1.0, "reward_std": True}))}
    for name, (summary, steps) in runs.items():
        assert len(steps) == 2, name
        for m in steps:
            assert m["grad_norm"] > 0 and m["distill_loss"] == m["distill_loss"], name
            assert m["student_entropy"] > 0 and m["teacher_entropy"] >= 0, name
            assert (m["topk_mass"] is None) == (name in ("sampled-token", "jsd")), name
            assert ("reward" in m) == (name == "reward"), name
        assert summary["objective"] == ("topk-reverse-kl" if name == "reward" else name)
    assert runs["jsd"][0]["jsd_beta"] == 0.25 and runs["sampled-token"][0]["jsd_beta"] is None
    assert 0 < runs["topk-forward-kl"][1][0]["topk_mass"] <= 1  # the teacher's mass inside its top-k
    summary, steps = runs["reward"]
    assert summary["samples_per_prompt"] == 2 and summary["reward_weight"] == 1.0
    for m in steps:
        assert 0 <= m["reward"] <= 1 and m["loss"] == pytest.approx(m["distill_loss"] + m["reward_loss"], abs=1e-6)
    assert summary["final_reward"] == steps[-1]["reward"]


@pytest.mark.slow  # seven short toy runs (about 45 s)
def test_the_objectives_run_with_packing_the_prefix_cache_lora_and_games(tmp_path):
    """The sampled-token objective with the reward: packed micro-batches and the teacher without its cached
    prefix give the padded run's numbers; a LoRA student trains on the JSD; games train on the forward KL with a
    reward that is the game's."""
    common = {"objective": "sampled-token", "samples_per_prompt": 2, "reward_weight": 0.5}  # the same samples at step 1
    padded, padded_steps = run_toy(tmp_path, output_dir=str(tmp_path / "padded"), **common)
    assert padded["teacher_prefix_tokens"] > 0  # the teacher read the context once, from its cache
    packed, packed_steps = run_toy(tmp_path, output_dir=str(tmp_path / "packed"), micro_batch_tokens=400, **common)
    uncached, uncached_steps = run_toy(tmp_path, output_dir=str(tmp_path / "uncached"), teacher_prefix_cache=False,
                                       **common)
    assert uncached["teacher_prefix_tokens"] == 0
    for steps in (packed_steps, uncached_steps):
        for key in ("loss", "distill_loss", "reward_loss", "grad_norm", "student_entropy", "teacher_entropy"):
            assert steps[0][key] == pytest.approx(padded_steps[0][key], rel=1e-3, abs=1e-5), key
    assert packed_steps[0]["padding_share"] == 0

    lora, lora_steps = run_toy(tmp_path, "toy-codes-lora", output_dir=str(tmp_path / "lora"), objective="jsd")
    assert lora["lora"]["merged"] and lora["trainable_parameters"] < padded["trainable_parameters"]
    assert all(m["grad_norm"] > 0 and m["topk_mass"] is None for m in lora_steps)

    games, game_steps = run_toy(tmp_path, "toy-game", output_dir=str(tmp_path / "games"), max_new_tokens=8,
                                eval_games=4, objective="topk-forward-kl", samples_per_prompt=2, reward_weight=1.0)
    for m in game_steps:
        assert m["games_won"] == pytest.approx(m["reward"]) and 0 < m["topk_mass"] <= 1 and m["turns"] >= 1


@pytest.mark.slow  # three short toy runs
def test_groups_and_the_reward_resume_to_the_uninterrupted_result(tmp_path, capsys):
    """Four steps in one go, and two steps then two more with --resume: every number and every weight equal (the
    groups' samples come from the saved random state)."""
    import json

    from opcd_cli.cli import main
    from test_resume import weights

    common = ["--objective", "sampled-token", "--samples-per-prompt", "2", "--reward-weight", "1", "--reward-std",
              "--batch-size", "2", "--topk", "4", "--max-new-tokens", "4", "--no-eval-before", "--save-every", "2",
              "--show-prompts", "0"]
    assert main(["distill", "-o", str(tmp_path / "whole"), *common, "--steps", "4"]) == 0
    assert main(["distill", "-o", str(tmp_path / "half"), *common, "--steps", "2"]) == 0
    assert main(["distill", "--resume", str(tmp_path / "half"), "--steps", "4"]) == 0
    capsys.readouterr()

    def numbers(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["distill_loss"], r["reward"], r["reward_loss"], r["response_tokens"],
                 r["grad_norm"]) for r in rows]

    assert len(numbers("whole")) == 4 and numbers("half") == numbers("whole")
    whole = weights(tmp_path / "whole")
    for key, value in weights(tmp_path / "half").items():
        assert torch.equal(value, whole[key]), key
