"""Build the toy models: tiny Qwen3-architecture models pretrained from scratch on synthetic chats.

    python -m opcd_cli.toy.build --size small --out opcd_cli/toy/assets/small

The shipped models in ``opcd_cli/toy/assets/`` were made by this module (the command above, with the
default budgets in ``SIZES``); ``manifest.json`` beside them records the settings and what they scored.

Pretraining teaches general skills, never the toy world's hidden facts:

* follow any of the word rules when its system prompt is in context, and copy the word when there is none;
* look a word's code up in experience items given in context (with random laws, never the world's law),
  and guess a digit when the items do not say;
* turn attempts and verdicts into experience items.

It runs in two stages (``CURRICULUM``). Looking a value up by its key is the skill tiny models are slowest
to find: trained on everything at once they sit at chance on it for thousands of steps. A first stage of
short recall drills ("Codes: K7 M1 R2 / Recall: M R" -> "M1 R2") makes that skill appear within a few
hundred cheap steps; the second stage then learns the code lookup on top of it in under a thousand steps
(the word rules take most of the stage: see the probes in each ``manifest.json``).

A third stage (``GAMES``, its own warm-up and decay) teaches playing turn by turn: games of doors (each door's
code question answered in a chat that goes on, with random laws' items in context or none), mixed with the
earlier kinds so that none is forgotten. ``--from FOLDER`` starts it from a model that finished the first two
stages: the shipped ``small`` model got it that way (``--from`` its earlier self, the default settings);
the shipped ``large`` model, the cross-size teacher of the ``codes`` task, has the first two stages only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from . import tasks
from .tokenizer import build_tokenizer


@dataclass(frozen=True)
class ToySize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_rows: int  # embedding rows, padded past the tokenizer like real checkpoints
    steps: int  # over both stages of the curriculum
    batch: int
    lr: float


SIZES: dict[str, ToySize] = {
    "small": ToySize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab_rows=128, steps=4500, batch=32, lr=1e-3),
    "large": ToySize(hidden=160, layers=5, heads=5, kv_heads=1, intermediate=448, vocab_rows=160, steps=3000, batch=32, lr=1e-3),
}

# (share of the steps, shares of each kind of chat) for each stage, in order.
CURRICULUM = (
    (1 / 3, {"recall": 1.0}),
    (2 / 3, {"rule": 0.30, "copy": 0.05, "recall": 0.10, "code_known": 0.20, "code_guess": 0.10, "extract": 0.25}),
)
# the third stage: (steps for each size, the mixture), run after the curriculum with its own schedule
GAMES = ({"small": 500, "large": 400}, {"game_known": 0.22, "game_guess": 0.08, "rule": 0.22, "copy": 0.06,
                                        "recall": 0.04, "code_known": 0.12, "code_guess": 0.06, "extract": 0.10,
                                        "extract_games": 0.10})
GAMES_LR = 0.25  # of the size's learning rate: low enough that the earlier skills stay
KINDS = tuple(GAMES[1])


def stage_mixture(step: int, steps: int) -> dict[str, float]:
    """The mixture of the curriculum stage that ``step`` (0-based) of ``steps`` falls in."""
    end = 0.0
    for share, mixture in CURRICULUM:
        end += share
        if step < round(end * steps):
            return mixture
    return CURRICULUM[-1][1]


def sample_chat(rng: random.Random, kind: str) -> tuple[str | None, list[tuple[str, str]]]:
    """One pretraining chat as (system context or None, its (user, assistant) turns)."""
    if kind.startswith("game"):
        return sample_game(rng, known=kind == "game_known")
    context, prompt, answer = sample_turn(rng, kind)
    return context, [(prompt, answer)]


def sample_game(rng: random.Random, known: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """A game of 1 to 4 doors on a random law: ``known``, items in context cover every door (a right code each
    turn); else the doors' letters are not in the items, if there are any (a guess each turn, and the game ends
    at the first wrong one)."""
    law = tasks.make_law(rng)
    letters = rng.sample(tasks.CONSONANTS, rng.randint(1, 8))
    if known:
        door_letters, items = letters, letters
    else:
        door_letters = [c for c in tasks.CONSONANTS if c not in letters]
        items = letters if rng.random() < 0.5 else []
    words = [tasks.word_starting_with(rng, rng.choice(door_letters)) for _ in range(rng.randint(1, 4))]
    turns = tasks.doors_chat(rng, law, words, set(items))
    return tasks.code_context(law, items) or None, turns


def sample_turn(rng: random.Random, kind: str) -> tuple[str | None, str, str]:
    """One single-turn chat as (system context or None, user prompt, assistant answer)."""
    if kind == "rule":
        rule = rng.choice(list(tasks.RULES))
        word = tasks.random_word(rng)
        return tasks.rule_context(rule), word, tasks.RULES[rule].apply(word)
    if kind == "copy":
        word = tasks.random_word(rng)
        return None, word, word
    if kind == "recall":
        keys = rng.sample(tasks.CAPITALS, rng.randint(3, 10))
        codes = {key: rng.randrange(10) for key in keys}
        asked = rng.sample(keys, rng.randint(2, min(5, len(keys))))
        return None, tasks.recall_prompt(codes, asked), tasks.recall_answer(codes, asked)
    if kind in ("code_known", "code_guess"):
        letters = rng.sample(tasks.CONSONANTS, rng.randint(1, 8))
        law = {letter: rng.randrange(10) for letter in letters}
        if kind == "code_known":
            letter = rng.choice(letters)
            digit = law[letter]
        else:  # the items, if any, say nothing about this word: guess
            letter = rng.choice([c for c in tasks.CONSONANTS if c not in law])
            digit = rng.randrange(10)
            if rng.random() < 0.5:
                law = {}
        context = tasks.code_context(law, letters=[c for c in letters if c in law]) or None
        return context, tasks.code_question(tasks.word_starting_with(rng, letter)), tasks.code_claim(letter, digit)
    if kind == "extract":
        attempts = []
        for _ in range(rng.randint(2, 6)):
            word = tasks.word_starting_with(rng, rng.choice(tasks.CONSONANTS))
            attempts.append((tasks.code_question(word), tasks.code_claim(word[0], rng.randrange(10)), rng.random() < 0.3))
        traces = "\n".join(tasks.trace_line(*attempt) for attempt in attempts)
        return None, tasks.extraction_prompt(traces), tasks.extraction_answer(attempts)
    if kind == "extract_games":  # the turns of doors games as `opcd extract --env` shows them
        attempts = []
        for _ in range(rng.randint(2, 6)):
            word = tasks.word_starting_with(rng, rng.choice(tasks.CONSONANTS))
            seen = rng.choice([tasks.doors_first(rng.randint(1, 4), word), tasks.doors_next(word)])
            attempts.append((seen, tasks.code_claim(word[0], rng.randrange(10)), rng.random() < 0.5))
        traces = "\n".join(tasks.trace_line(*attempt) for attempt in attempts)
        return None, tasks.extraction_prompt(traces), tasks.extraction_answer(attempts)
    raise ValueError(kind)


def encode_chat(tokenizer: PreTrainedTokenizerFast, context: str | None,
                turns: list[tuple[str, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole chat and the (start, end) of each assistant answer in them."""
    messages = [{"role": "system", "content": context}] if context else []
    ids: list[int] = []
    spans = []
    for prompt, answer in turns:
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prompt_ids[: len(ids)] == ids, "the toy chat template renders each turn after the last"
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
        ids = prompt_ids + answer_ids
        messages.append({"role": "assistant", "content": answer})
        ids += tokenizer("\n", add_special_tokens=False)["input_ids"]  # the template's line after <|im_end|>
    return ids[:-1], spans


def make_batch(tokenizer, rng: random.Random, batch: int, mixture: dict[str, float]):
    """A batch of one kind of chat, drawn from ``mixture`` (kinds differ a lot in length, so mixing them within
    a batch would waste padding). Returns token ids, the attention mask, and a mask of the answer tokens."""
    kinds, weights = zip(*mixture.items())
    kind = rng.choices(kinds, weights)[0]
    rows = [encode_chat(tokenizer, *sample_chat(rng, kind)) for _ in range(batch)]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch, T), tokenizer.pad_token_id)
    attention = torch.zeros((batch, T), dtype=torch.long)
    answer = torch.zeros((batch, T), dtype=torch.bool)
    for b, (ids, spans) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        for start, end in spans:
            answer[b, start:end] = True
    return input_ids, attention, answer


def pretraining_loss(model, input_ids, attention, answer) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss on every token of the chat plus, again, on the answer's tokens.

    Modelling the whole chat (the system prompt and the user's word too, not only the answer) makes the tiny
    models learn to read their context several times faster than a loss on answers alone.
    """
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    every, answers = attention[:, 1:].float(), answer[:, 1:].float()
    answer_loss = (ce * answers).sum() / answers.sum()
    return (ce * every).sum() / every.sum() + answer_loss, answer_loss.detach()


@torch.no_grad()
def probe(model, tokenizer, seed: int = 1234, n: int = 64) -> dict[str, float]:
    """Greedy accuracy on fresh chats of each kind, on the last answer of each (the extraction kind scores
    exact item lists; a game's last answer follows the earlier turns as written)."""
    rng = random.Random(seed)
    scores = {}
    for kind in KINDS:
        chats = [sample_chat(rng, kind) for _ in range(n)]
        answers = [turns[-1][1] for _, turns in chats]
        rows = [encode_chat(tokenizer, context, turns) for context, turns in chats]
        prompts = [ids[: spans[-1][0]] for ids, spans in rows]
        T = max(map(len, prompts))
        input_ids = torch.full((n, T), tokenizer.pad_token_id)
        attention = torch.zeros((n, T), dtype=torch.long)
        for b, ids in enumerate(prompts):  # left padding
            input_ids[b, T - len(ids) :] = torch.tensor(ids)
            attention[b, T - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max(map(len, answers)) + 2,
            do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
        scores[kind] = sum(t.strip() == a for t, a in zip(texts, answers)) / n
    return scores


def model_config(size: ToySize, tokenizer) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=size.vocab_rows,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_phase(model, tokenizer, rng: random.Random, steps: int, lr: float, batch: int, mixture_at, log,
                probe_every: int = 0, name: str = "") -> list[float]:
    """``steps`` of AdamW on chats drawn from ``mixture_at(step)``, with a warm-up and a cosine decay of their
    own; returns the answer losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start, losses = time.time(), []
    model.train()
    for step in range(steps):
        loss, answer_loss = pretraining_loss(model, *make_batch(tokenizer, rng, batch, mixture_at(step)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(answer_loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name}step {step + 1}/{steps} answer loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"{time.time() - start:.0f}s")
        if probe_every and (step + 1) % probe_every == 0:
            model.eval()
            log(f"probe {probe(model, tokenizer, n=32)}")
            model.train()
    model.eval()
    return losses


def pretrain(
    size_name: str, out: Path, seed: int = 0, steps: int | None = None, probe_every: int = 0, probe_n: int = 64,
    log=print, start_from: Path | None = None, games_steps: int | None = None,
) -> dict:
    """Pretrain one toy model from scratch (or, with ``start_from``, continue one that finished the curriculum)
    and save it (model, tokenizer, manifest) to ``out``."""
    size = SIZES[size_name]
    steps = size.steps if steps is None else steps
    games_steps = GAMES[0][size_name] if games_steps is None else games_steps
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    started = time.time()
    if start_from is None:
        model = Qwen3ForCausalLM(model_config(size, tokenizer))
        losses = train_phase(model, tokenizer, rng, steps, size.lr, size.batch, lambda s: stage_mixture(s, steps), log,
                             probe_every, "curriculum ")
        first = {"settings": asdict(size) | {"steps": steps}, "seed": seed,
                 "curriculum": [[share, mixture] for share, mixture in CURRICULUM],
                 "final_answer_loss": sum(losses[-100:]) / len(losses[-100:]),
                 "seconds": round(time.time() - started, 1)}
    else:
        model = Qwen3ForCausalLM.from_pretrained(start_from)
        earlier = json.loads((Path(start_from) / "manifest.json").read_text())
        first = earlier.get("curriculum_phase") or {key: earlier[key] for key in
                                                    ("settings", "seed", "curriculum", "final_answer_loss", "seconds")}
        rng = random.Random(seed + 1)
    games_started = time.time()
    torch.manual_seed(seed + 1)
    losses = train_phase(model, tokenizer, rng, games_steps, GAMES_LR * size.lr, size.batch, lambda s: GAMES[1], log,
                         probe_every, "games ")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "size": size_name,
        "curriculum_phase": first,
        "games_phase": {"steps": games_steps, "lr": GAMES_LR * size.lr, "mixture": GAMES[1], "continued_from_saved": start_from is not None,
                        "final_answer_loss": sum(losses[-100:]) / len(losses[-100:]),
                        "seconds": round(time.time() - games_started, 1)},
        "probe_greedy_accuracy": probe(model, tokenizer, n=probe_n),
        "torch": torch.__version__,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--games-steps", type=int, default=None)
    parser.add_argument("--from", dest="start_from", type=Path, default=None,
                        help="a model that finished the curriculum: run the games stage only")
    parser.add_argument("--probe-every", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(pretrain(args.size, args.out, seed=args.seed, steps=args.steps, probe_every=args.probe_every,
                              start_from=args.start_from, games_steps=args.games_steps), indent=2))


if __name__ == "__main__":
    main()
