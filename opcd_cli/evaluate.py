"""Accuracy of a model on rows with answers, without and with their context: one function, one result type.

``evaluate_model`` scores a model through a ``Sampler`` and returns an ``EvalResult``; ``opcd eval`` (``evaluate``),
the before/after table of ``opcd distill`` and ``bench/paper_table.py`` all read that one type, under the same
names, so ``opcd eval`` on a saved run reproduces the numbers the run printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import EvalConfig, SamplingOptions
from .data import Example, has_context, load_examples, read_context, require_answers, strip_contexts
from .errors import OpcdError, first_line
from .models import load_tokenizer
from .outputs import RUN_MARKER
from .prompts import ChatRenderer, with_context
from .sampling import Sampler, make_sampler
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

    def by_source(self, examples: list[Example]) -> dict[str, float] | None:
        """Accuracy per ``data_source`` (rows without one under ``-``); None when no row has one."""
        if all(e.source is None for e in examples):
            return None
        right: dict[str, list[bool]] = {}
        for i, correct in enumerate(self.correct):
            right.setdefault(examples[i // self.n].source or "-", []).append(correct)
        return {source: sum(marks) / len(marks) for source, marks in sorted(right.items())}

    def solved(self) -> list[bool]:
        """Per example: solved by the majority of its responses (by its only response when n = 1)."""
        return [sum(self.correct[i : i + self.n]) * 2 > self.n for i in range(0, len(self.correct), self.n)]


def context_harm(without: Scores, with_context: Scores) -> float:
    """Share of examples solved without the context but failed with it."""
    pairs = list(zip(without.solved(), with_context.solved()))
    return sum(a and not b for a, b in pairs) / len(pairs)


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured; fields that were not measured are None (and left out of ``to_dict``)."""

    n: int  # examples scored
    samples_per_example: int
    accuracy: float  # without the context
    mean_response_tokens: float
    accuracy_with_context: float | None = None
    context_harm: float | None = None  # share solved without the context but failed with it
    mean_response_tokens_with_context: float | None = None
    ood_accuracy: float | None = None  # out-of-distribution rows, each with its own context
    teacher_accuracy_with_context: float | None = None  # the teacher of a distillation run, with the context
    accuracy_by_source: dict[str, float] | None = None  # rows with a data_source: accuracy per source
    accuracy_with_context_by_source: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
) -> EvalResult:
    """Accuracy and response length without the context and, when there is one (``context`` or the rows' own),
    with it, and the context harm; with ``ood``, accuracy there too (each OOD row with its own context)."""
    kw = dict(context_as=context_as, sampling=sampling, verifier=verifier, advance=advance)
    without = score(sampler, renderer, strip_contexts(examples), context=None, **kw)
    result = EvalResult(len(examples), sampling.n, without.accuracy, without.mean_response_tokens,
                        accuracy_by_source=without.by_source(examples))
    if has_context(examples, context):
        with_ctx = score(sampler, renderer, examples, context=context, **kw)
        result = dataclasses.replace(result, accuracy_with_context=with_ctx.accuracy,
                                     context_harm=context_harm(without, with_ctx),
                                     mean_response_tokens_with_context=with_ctx.mean_response_tokens,
                                     accuracy_with_context_by_source=with_ctx.by_source(examples))
    if ood:
        result = dataclasses.replace(result, ood_accuracy=score(sampler, renderer, ood, context=None, **kw).accuracy)
    return result


def passes(examples: list[Example], context: str | None, ood: list[Example] | None) -> int:
    """How many rows ``evaluate_model`` generates for (for a progress bar)."""
    return len(examples) * (2 if has_context(examples, context) else 1) + len(ood or [])


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
    """``opcd eval``: every model in ``cfg.models`` on ``cfg.data``, one result dict each (``EvalResult``'s
    fields, with the model, the data and the sampler).

    With ``cfg.best``, a run directory scores as the mean of its ``best`` best checkpoints (the paper's protocol
    for system prompts); other models score as themselves. With ``cfg.env``, the models play games instead
    (``evaluate_env``).
    """
    if cfg.env is not None:
        return evaluate_env(cfg, progress)
    say = getattr(progress, "info", None)  # which format the rows were read as, once
    examples = load_examples(cfg.data, say=say, fields=cfg.fields, role="scored")
    if cfg.limit:
        examples = examples[: cfg.limit]
    require_answers(examples, cfg.data)
    ood = load_examples(cfg.ood_data, what="OOD data", say=say, fields=cfg.fields, role="scored") if cfg.ood_data else None
    if ood:
        require_answers(ood, cfg.ood_data)
    context = read_context(cfg.context)
    results = []
    for name in cfg.models:
        run = Path(name)
        if cfg.best and (run / RUN_MARKER).is_file() and not (run / "checkpoints").is_dir():
            raise OpcdError(f"--best {cfg.best} scores a run's best checkpoints, but {name} has none (it was trained "
                            "without --save-every); drop --best to score its final model")
        targets = checkpoints_of(run) if cfg.best and (run / "checkpoints").is_dir() else [run]
        scored = []
        for target in targets:
            torch.manual_seed(cfg.seed)
            with open_sampler(target, cfg) as (sampler, tokenizer):
                renderer = ChatRenderer(tokenizer, str(target), cfg.loading.chat_template_kwargs)
                advance = progress.task(f"eval {target}", passes(examples, context, ood)) if progress else None
                result = evaluate_model(sampler, renderer, examples, context=context, context_as=cfg.context_as,
                                        sampling=cfg.sampling, verifier=cfg.verifier, ood=ood, advance=advance)
            scored.append({"model": str(target), "sampler": sampler.name} | result.to_dict())
        row = scored[0] if len(scored) == 1 else mean_of_best(scored, cfg.best) | {"model": name}
        results.append({"model": name, "data": cfg.data} | row)
    return results


def evaluate_env(cfg: EvalConfig, progress=None) -> list[dict]:
    """``opcd eval --env``: every model plays ``cfg.games`` games (seeds ``cfg.seed`` onwards) without the
    context and, with ``--context``, with it; one result dict each (``GameEvalResult``'s fields)."""
    from . import envs
    from .games import evaluate_games

    make_env = envs.environment_factory(cfg.env, cfg.env_options)  # a bad name or options: before any model
    context = read_context(cfg.context)
    seeds = list(range(cfg.seed, cfg.seed + cfg.games))
    results = []
    for name in cfg.models:
        torch.manual_seed(cfg.seed)
        with open_sampler(Path(name), cfg) as (sampler, tokenizer):
            renderer = ChatRenderer(tokenizer, name, cfg.loading.chat_template_kwargs)
            replies = cfg.games * cfg.max_turns * (2 if context else 1)
            advance = progress.task(f"play {cfg.env} ({name})", replies) if progress else None
            result = evaluate_games(sampler, renderer, make_env, cfg.env, seeds, context=context,
                                    context_as=cfg.context_as, sampling=cfg.sampling, max_turns=cfg.max_turns,
                                    window=config_window(name, cfg.loading.trust_remote_code), advance=advance)
        results.append({"model": name, "env": cfg.env, "sampler": sampler.name} | result.to_dict())
    return results


def config_window(name: str, trust_remote_code: bool) -> int | None:
    """A model's window from its config (no weights read); None when the config does not say."""
    from transformers import AutoConfig

    from . import lora, models

    adapter = lora.adapter_of(Path(name))
    source = lora.adapter_base(adapter) if adapter is not None else name
    try:
        config = AutoConfig.from_pretrained(models.resolve(str(source)), trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing, unreadable or foreign config.json
        raise OpcdError(f"cannot read the config of {name}: {first_line(e)}") from None
    config = getattr(config, "text_config", config)
    return getattr(config, "max_position_embeddings", None)


@contextlib.contextmanager
def open_sampler(target: Path, cfg: EvalConfig):
    """(sampler, tokenizer) for a model folder, a hub id, or a LoRA adapter folder (a LoRA run saved with
    ``--no-merge`` holds one in ``adapter/``): the adapter is merged into its base model, in memory for the
    Hugging Face sampler, in a temporary folder for vLLM. The sampler is closed on leaving."""
    from . import lora, models

    load = cfg.loading
    adapter = lora.adapter_of(target)
    tokenizer = load_tokenizer(str(adapter or target), load.trust_remote_code)
    model, source, scratch = None, str(target), None
    if adapter is not None:
        base = lora.adapter_base(adapter)
        model = lora.load_merged(adapter, models.load_model(base, load.dtype, load.trust_remote_code,
                                                            load.allow_bin_weights))
        if cfg.sampler == "vllm":  # the engine loads a folder
            from .checkpoint import save_model

            scratch = Path(tempfile.mkdtemp(prefix="opcd-merged-"))
            save_model(model, tokenizer, scratch / "model", models.resolve_dtype(load.dtype))
            model, source = None, str(scratch / "model")
    try:
        sampler = make_sampler(cfg.sampler, tokenizer=tokenizer, model=model, source=source,
                               batch_size=cfg.batch_size, loading=load, vllm_memory=cfg.vllm_memory,
                               vllm_eager=cfg.vllm_eager, seed=cfg.seed)
        try:
            yield sampler, tokenizer
        finally:
            sampler.close()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
