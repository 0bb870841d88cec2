"""Accuracy of a model on rows with answers, without and with their context.

``score`` works on a model already in memory (the trainer uses it before and after distillation);
``evaluate`` loads models by name for ``opcd eval``. Both render prompts with ``prompts.py`` and generate with
a ``Sampler``, so ``opcd eval`` on a saved run reproduces the numbers the run printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import EvalConfig, SamplingOptions
from .data import Example, load_examples, read_context
from .errors import OpcdError
from .models import load_tokenizer
from .prompts import ChatRenderer, with_context
from .sampling import Sampler, open_sampler
from .verifiers import is_correct


@dataclass(frozen=True)
class Scores:
    """Per-response verdicts and lengths (``n`` responses per example, example-major)."""

    correct: tuple[bool, ...]
    response_tokens: tuple[int, ...]
    n: int

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_response_tokens(self) -> float:
        return sum(self.response_tokens) / len(self.response_tokens)

    def solved(self) -> list[bool]:
        """Per example: solved by the majority of its responses (by its only response when n = 1)."""
        return [sum(self.correct[i : i + self.n]) * 2 > self.n for i in range(0, len(self.correct), self.n)]


def context_harm(without: Scores, with_context: Scores) -> float:
    """Share of examples solved without the context but failed with it."""
    pairs = list(zip(without.solved(), with_context.solved()))
    return sum(a and not b for a, b in pairs) / len(pairs)


def require_answers(examples: list[Example], path: str) -> None:
    missing = next((e for e in examples if e.answer is None), None)
    if missing is not None:
        raise OpcdError(f"{path} row {missing.row} has no `answer`; evaluation needs an answer for every row")


def has_context(examples: list[Example], context: str | None) -> bool:
    return context is not None or any(e.context for e in examples)


def score(
    sampler: Sampler,
    renderer: ChatRenderer,
    examples: list[Example],
    *,
    context: str | None,
    context_as: str,
    sampling: SamplingOptions,
    verifier: str = "auto",
    advance: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> Scores:
    """Generate for every example (with its context, or ``context``, when one is given) and verify."""
    prompts = [renderer.prompt_ids(with_context(e.messages, e.context or context, context_as)) for e in examples]
    correct, lengths = [], []
    for start in range(0, len(examples), chunk):
        responses = sampler.generate(prompts[start : start + chunk], sampling)
        for i, ids in enumerate(responses):
            example = examples[start + i // sampling.n]
            text = renderer.tokenizer.decode(ids, skip_special_tokens=True)
            correct.append(is_correct(text, example.answer, example.verifier, verifier))
            lengths.append(len(ids))
        if advance:
            advance(min(chunk, len(examples) - start))
    return Scores(tuple(correct), tuple(lengths), sampling.n)


def strip_contexts(examples: list[Example]) -> list[Example]:
    from dataclasses import replace

    return [replace(e, context=None) for e in examples]


def evaluate_model(
    sampler: Sampler,
    renderer: ChatRenderer,
    examples: list[Example],
    *,
    context: str | None,
    context_as: str,
    sampling: SamplingOptions,
    verifier: str = "auto",
    ood: list[Example] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Accuracy and response length without the context and, when there is one, with it, and the context harm;
    with ``ood``, accuracy there too (each OOD row with its own context)."""
    without = score(sampler, renderer, strip_contexts(examples), context=None, context_as=context_as,
                    sampling=sampling, verifier=verifier, advance=advance)
    result = {
        "n": len(examples),
        "samples_per_example": sampling.n,
        "accuracy": without.accuracy,
        "mean_response_tokens": without.mean_response_tokens,
    }
    if has_context(examples, context):
        with_ctx = score(sampler, renderer, examples, context=context, context_as=context_as,
                         sampling=sampling, verifier=verifier, advance=advance)
        result |= {
            "accuracy_with_context": with_ctx.accuracy,
            "context_harm": context_harm(without, with_ctx),
            "mean_response_tokens_with_context": with_ctx.mean_response_tokens,
        }
    if ood:
        result["ood_accuracy"] = score(sampler, renderer, ood, context=None, context_as=context_as, sampling=sampling,
                                       verifier=verifier, advance=advance).accuracy
    return result


def checkpoints_of(run_dir: Path) -> list[Path]:
    """A run's saved checkpoints (``--save-every``) and its final model, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step-*")) + [run_dir]


def mean_of_best(results: list[dict], best: int) -> dict:
    """The mean of every numeric field over the ``best`` results with the highest no-context accuracy."""
    top = sorted(results, key=lambda r: r["accuracy"], reverse=True)[:best]
    numeric = [k for k, v in top[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "samples_per_example")]
    return top[0] | {k: sum(r[k] for r in top) / len(top) for k in numeric} | {"checkpoints": [r["model"] for r in top]}


def evaluate(cfg: EvalConfig, progress=None) -> list[dict]:
    """``opcd eval``: every model in ``cfg.models`` on ``cfg.data``, one result dict each.

    With ``cfg.best``, a run directory scores as the mean of its ``best`` best checkpoints (the paper's protocol
    for system prompts); other models score as themselves.
    """
    examples = load_examples(cfg.data)
    if cfg.limit:
        examples = examples[: cfg.limit]
    require_answers(examples, cfg.data)
    ood = load_examples(cfg.ood_data, what="OOD data") if cfg.ood_data else None
    if ood:
        require_answers(ood, cfg.ood_data)
    context = read_context(cfg.context)
    passes = len(examples) * (2 if has_context(examples, context) else 1) + len(ood or [])
    results = []
    for name in cfg.models:
        run = Path(name)
        targets = checkpoints_of(run) if cfg.best and (run / "checkpoints").is_dir() else [run]
        scored = []
        for target in targets:
            torch.manual_seed(cfg.seed)
            tokenizer = load_tokenizer(str(target), cfg.loading.trust_remote_code)
            renderer = ChatRenderer(tokenizer, str(target), cfg.loading.chat_template_kwargs)
            sampler = open_sampler(cfg.sampler, str(target), tokenizer, batch_size=cfg.batch_size, dtype=cfg.loading.dtype,
                                   trust_remote_code=cfg.loading.trust_remote_code, vllm_memory=cfg.vllm_memory,
                                   seed=cfg.seed)
            advance = progress.task(f"eval {target}", passes) if progress else None
            try:
                result = evaluate_model(sampler, renderer, examples, context=context, context_as=cfg.context_as,
                                        sampling=cfg.sampling, verifier=cfg.verifier, ood=ood, advance=advance)
            finally:
                sampler.close()
            scored.append({"model": str(target), "sampler": sampler.name} | result)
        row = scored[0] if len(scored) == 1 else mean_of_best(scored, cfg.best) | {"model": name}
        results.append({"model": name, "data": cfg.data} | row)
    return results
