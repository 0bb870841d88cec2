"""Experiential knowledge extraction: a model turns its own solved and failed attempts into experience items.

    opcd extract --model Qwen/Qwen3-8B --data train.jsonl --val val.jsonl --output exp.txt --rounds 3

Each round:

1. **solve**: the model attempts every training problem ``attempts`` times, with the experience gathered so
   far in context (none in round 1); a verifier marks each attempt right or wrong;
2. **extract**: the model reads its attempts with their verdicts, a few at a time, through a prompt template
   (replaceable with ``--template``; ``{traces}`` marks where the attempts go) and writes insights as
   ``- EXPERIENCE ITEM: ...`` lines; lines are parsed and near-duplicates dropped;
3. **accumulate**: new items join the experience, which is kept within ``token_budget`` tokens by dropping
   whole items, oldest first;
4. **select**: the experience is scored on the validation split (accuracy with it in context).

The best round's experience is written to ``--output``; every round's goes to a folder beside it
(``exp.rounds/round-1.txt``, ...). Raw attempts are never used as the context: only extracted items are.

With ``--env`` the problems are games (``GameRounds``): the model plays ``train_games`` games, each
``attempts`` times, with the experience so far in context; every turn is an attempt whose prompt is the
environment's observation and whose verdict is right, except the last turn of a lost game and a turn the
environment could not read (wrong). The selection scores the success rate over ``val_games`` other games.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models, sources
from .config import ExtractConfig, SamplingOptions
from .data import load_examples, read_text, require_answers
from .errors import OpcdError
from .evaluate import score
from .games import EXTRACT_TRAIN_SEEDS, EXTRACT_VAL_SEEDS, GameScores, play
from .experience import ITEM_PREFIX, add_items, parse_items, render_items, trace_line
from .outputs import check_apart, check_output_path, replaced_folder, write_json_atomic, write_text_atomic
from .prompts import ChatRenderer, with_context
from .sampling import make_sampler
from .ui import UI, percent
from .verifiers import is_correct

DEFAULT_TEMPLATE = """Below are attempts at problems, each with its verdict.
{traces}
Write the short, general lessons that would help solve similar problems, one per line, each starting with "- EXPERIENCE ITEM: ". Write only lessons that the verdicts support."""


@dataclass(frozen=True)
class Round:
    number: int
    items: tuple[str, ...]
    new_items: int
    solve_rate: float  # share of training attempts marked right
    val_accuracy: float


def within_budget(items: list[str], tokenizer, budget: int) -> list[str]:
    """Drop whole items, oldest first, until the rendered experience fits ``budget`` tokens."""
    items = list(items)
    while items and len(tokenizer(render_items(items), add_special_tokens=False)["input_ids"]) > budget:
        items.pop(0)
    return items


def read_template(path: str | None) -> str:
    if path is None:
        return DEFAULT_TEMPLATE
    if sources.is_builtin(path):
        return sources.text(path)
    file = Path(path)
    if not file.is_file():
        raise OpcdError(f"template file {path} {'is a directory' if file.is_dir() else 'does not exist'}")
    text = read_text(file, f"template file {path}")
    if "{traces}" not in text:
        raise OpcdError(f"template file {path} has no {{traces}} placeholder: mark where the attempts go")
    return text


def read_experience(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise OpcdError(f"experience file {path} {'is a directory' if file.is_dir() else 'does not exist'}")
    items = parse_items(read_text(file, f"experience file {path}"))
    if not items:
        raise OpcdError(f"experience file {path} has no `{ITEM_PREFIX.strip()}` lines")
    return items


class Rounds:
    """One model's rounds of solve, extract, accumulate and select (``round``), and the validation score of an
    experience (``val_accuracy``)."""

    def __init__(self, cfg: ExtractConfig, sampler, renderer: ChatRenderer, template: str, train, val):
        self.cfg, self.sampler, self.renderer, self.template, self.train, self.val = (
            cfg, sampler, renderer, template, train, val)
        self.tokenizer = renderer.tokenizer

    def val_accuracy(self, items) -> float:
        greedy = SamplingOptions(temperature=0.0, max_new_tokens=self.cfg.sampling.max_new_tokens)
        return score(self.sampler, self.renderer, self.val, context=render_items(items) or None,
                     context_as=self.cfg.context_as, sampling=greedy, verifier=self.cfg.verifier).accuracy

    def solve(self, context: str | None) -> tuple[list[str], int, int]:
        """Every training problem attempted ``attempts`` times: (trace lines, attempts right, attempts)."""
        cfg = self.cfg
        prompts = [self.renderer.prompt_ids(with_context(e.messages, context, cfg.context_as)) for e in self.train]
        attempts = self.sampler.generate(prompts, dataclasses.replace(cfg.sampling, n=cfg.attempts))
        traces, right = [], 0
        for i, ids in enumerate(attempts):
            example = self.train[i // cfg.attempts]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            ok = is_correct(text, example.answer, example.verifier, cfg.verifier)
            right += ok
            traces.append(trace_line(example.prompt, text, ok))
        return traces, right, len(traces)

    def round(self, number: int, experience: list[str], advance) -> Round:
        cfg, tokenizer = self.cfg, self.tokenizer
        # 1. solve, with the experience so far in context
        traces, right, tried = self.solve(render_items(experience) or None)
        advance(1, status=f"round {number}: {right}/{tried} attempts right")
        # 2. extract items from the attempts and their verdicts, a few at a time
        chunks = [traces[i : i + cfg.traces_per_prompt] for i in range(0, len(traces), cfg.traces_per_prompt)]
        asks = [self.renderer.prompt_ids([{"role": "user", "content": self.template.replace("{traces}", "\n".join(c))}])
                for c in chunks]
        extracting = SamplingOptions(temperature=0.0, max_new_tokens=cfg.extract_max_new_tokens)
        found = [item for ids in self.sampler.generate(asks, extracting)
                 for item in parse_items(tokenizer.decode(ids, skip_special_tokens=True))]
        advance(1, status=f"round {number}: {len(found)} items written")
        # 3. accumulate within the token budget
        known = set(experience)
        experience = within_budget(add_items(experience, found), tokenizer, cfg.token_budget)
        # 4. score on validation
        accuracy = self.val_accuracy(experience)
        advance(1, status=f"round {number}: val {percent(accuracy)} with {len(experience)} items")
        return Round(number, tuple(experience), sum(item not in known for item in experience), right / tried,
                     accuracy)


class GameRounds(Rounds):
    """The rounds on games (``--env``): attempts are games played to their end, the score a success rate."""

    def __init__(self, cfg: ExtractConfig, sampler, renderer: ChatRenderer, template: str, make_env, window):
        super().__init__(cfg, sampler, renderer, template, [], [])
        self.make_env, self.window = make_env, window

    def play(self, seeds: list[int], context: str | None, sampling: SamplingOptions):
        return play(self.sampler, self.renderer, self.make_env, self.cfg.env, seeds, context=context,
                    context_as=self.cfg.context_as, sampling=sampling, max_turns=self.cfg.max_turns, window=self.window)

    def val_accuracy(self, items) -> float:
        greedy = SamplingOptions(temperature=0.0, max_new_tokens=self.cfg.sampling.max_new_tokens)
        seeds = [EXTRACT_VAL_SEEDS + i for i in range(self.cfg.val_games)]
        return GameScores.of(self.play(seeds, render_items(items) or None, greedy)).success

    def solve(self, context: str | None) -> tuple[list[str], int, int]:
        """Each training game played ``attempts`` times; a trace line per turn, and the games won."""
        cfg = self.cfg
        seeds = [EXTRACT_TRAIN_SEEDS + i for i in range(cfg.train_games) for _ in range(cfg.attempts)]
        games = self.play(seeds, context, dataclasses.replace(cfg.sampling, n=1))
        traces = [line for game in games for line in game_trace(game)]
        return traces, sum(game.won for game in games), len(games)


def game_trace(game) -> list[str]:
    """A game's turns as trace lines: the observation the reply answered, the reply, and its verdict: wrong for
    a move the environment could not read and for the last move of a lost game, right otherwise."""
    lines = []
    for t in range(game.turns):
        observation, reply = game.messages[2 * t][1], game.messages[2 * t + 1][1]
        last = t == game.turns - 1
        ok = not game.invalid_turns[t] and (game.won or not last)
        lines.append(trace_line(observation, reply, ok))
    return lines


def extract(cfg: ExtractConfig, ui: UI) -> dict:
    """Run the rounds, write the best experience to ``cfg.output``, and return the summary."""
    output = check_output_path(cfg.output, "--output")
    rounds_dir = output.with_name(output.stem + ".rounds")
    inputs = {"--model": cfg.model, "--data": cfg.data, "--val": cfg.val, "--experience": cfg.experience,
              "--template": cfg.template}
    check_apart(output, inputs, "--output")
    check_apart(rounds_dir, inputs, "the rounds folder of --output")
    if output.is_dir() or (rounds_dir.exists() and not rounds_dir.is_dir()):
        raise OpcdError(f"{output if output.is_dir() else rounds_dir} is in the way of the experience file: it "
                        "would be replaced by a file (or a folder); choose another --output")
    if (output.exists() or rounds_dir.exists()) and not cfg.overwrite:
        raise OpcdError(f"{output if output.exists() else rounds_dir} already exists; pass --overwrite to replace it")
    if cfg.model is None:
        raise OpcdError("give --model, --data and --val (or no model arguments at all, to run the toy world)")
    make_env = None
    if cfg.env is not None:
        from . import envs
        from .evaluate import config_window

        make_env = envs.environment_factory(cfg.env, cfg.env_options)  # a bad name or options: before any model
        envs.reset(make_env(), EXTRACT_TRAIN_SEEDS, cfg.env)
        window = config_window(cfg.model, cfg.loading.trust_remote_code)
    else:
        train = load_examples(cfg.data, say=ui.info, fields=cfg.fields)
        val = load_examples(cfg.val, what="validation data", say=ui.info, fields=cfg.fields, role="eval")
        require_answers(train, cfg.data)
        require_answers(val, cfg.val)
    template = read_template(cfg.template)
    experience = read_experience(cfg.experience) if cfg.experience else []

    torch.manual_seed(cfg.seed)
    with ui.status(f"loading {cfg.model}"):
        tokenizer = models.load_tokenizer(cfg.model, cfg.loading.trust_remote_code)
        sampler = make_sampler(cfg.sampler, tokenizer=tokenizer, source=cfg.model, batch_size=cfg.batch_size,
                               loading=cfg.loading, vllm_memory=cfg.vllm_memory, vllm_eager=cfg.vllm_eager,
                               seed=cfg.seed)
    renderer = ChatRenderer(tokenizer, cfg.model, cfg.loading.chat_template_kwargs)
    runner = (GameRounds(cfg, sampler, renderer, template, make_env, window) if make_env is not None
              else Rounds(cfg, sampler, renderer, template, train, val))
    rounds: list[Round] = []
    try:
        with ui.progress():
            advance = ui.task("extract", cfg.rounds * 3 + 1)
            without = runner.val_accuracy([])
            advance(1, status=f"val {percent(without)} without experience")
            for number in range(1, cfg.rounds + 1):
                rounds.append(runner.round(number, list(rounds[-1].items) if rounds else experience, advance))
    finally:
        sampler.close()
    return write_outputs(cfg, output, rounds_dir, rounds, without)


def write_outputs(cfg: ExtractConfig, output: Path, rounds_dir: Path, rounds: list[Round], without: float) -> dict:
    """The best round's experience to ``output``, every round's beside it, and the summary."""
    best = max(rounds, key=lambda r: (r.val_accuracy, -r.number))
    if not best.items:
        raise OpcdError(f"no experience items were extracted in {cfg.rounds} rounds; try more --attempts or another --template")
    summary = {
        "output": str(output),
        "rounds_dir": str(rounds_dir),
        "model": cfg.model,
        **({"env": cfg.env} if cfg.env else {}),
        "items": len(best.items),
        "best_round": best.number,
        "val_accuracy_without": without,
        "val_accuracy_best": best.val_accuracy,
        "rounds": [dataclasses.asdict(r) | {"items": len(r.items), "experience": list(r.items)} for r in rounds],
    }
    # every round's experience and the summary in a new folder that replaces the old one whole (no stale rounds)
    output.parent.mkdir(parents=True, exist_ok=True)
    with replaced_folder(rounds_dir) as fresh:
        for r in rounds:
            write_text_atomic(fresh / f"round-{r.number}.txt", render_items(r.items) + "\n")
        write_json_atomic(fresh / "summary.json", summary)
    write_text_atomic(output, render_items(best.items) + "\n")
    return summary
