"""Distillation on games played turn by turn (`opcd distill --env`): every reply a training row, the toy world's
doors game, on-policy and off-policy."""

from __future__ import annotations

import json
import re

import pytest

from opcd_cli.config import SamplingOptions
from opcd_cli.envs.doors import Doors, read_code
from opcd_cli.games import play, turn_views
from opcd_cli.micro_batches import pack
from opcd_cli.toy import tasks, world
from test_games import Corridor, Scripted, renderer  # noqa: F401  (a fixture)


def test_each_reply_is_a_row_whose_response_is_the_reply_and_never_the_environments_text(renderer):  # noqa: F811
    games = play(Scripted(renderer.tokenizer), renderer, Corridor, "corridor", [1, 2], context=None,
                 context_as="system", sampling=SamplingOptions(temperature=0.0, max_new_tokens=4), max_turns=4)
    assert [g.turns for g in games] == [3, 4]  # seed 1: go, hm (invalid), go; seed 2: go, hm, go, go
    tokenizer, context = renderer.tokenizer, "Say STOP never."
    for game in games:
        views = turn_views(game, context, "system", renderer, renderer)
        assert len(views) == game.turns
        for t, (view, (prompt_ids, reply_ids)) in enumerate(zip(views, game.replies)):
            assert list(view.student_ids) == prompt_ids  # the prompt the student sampled the reply from
            student, teacher = tokenizer.decode(view.student_ids), tokenizer.decode(view.teacher_ids)
            assert context not in student and teacher.startswith(f"<|im_start|>system\n{context}")
            assert teacher.endswith(student.split("<|im_start|>user", 1)[1])  # the same chat after it
            assert student.count("<|im_start|>user") == t + 1  # every observation so far is a user turn
            if t + 1 < game.turns:  # the next turn's prompt continues this one: reply, then the environment
                following = list(views[t + 1].student_ids)
                assert following[: len(prompt_ids) + len(reply_ids)] == prompt_ids + reply_ids
        # the loss reads exactly the replies' tokens, at the positions that predict them
        responses = [reply for _, reply in game.replies]
        packed = pack([v.student_ids for v in views], responses, 0, "cpu")
        read = packed.input_ids_BT[packed.rows_N, packed.cols_N + 1].tolist()
        assert read == [t for r in responses for t in r]
        assert {tokenizer.decode(r) for r in responses} <= {"go", "hm"}


def test_the_doors_game_opens_on_right_codes_springs_the_trap_and_asks_again_on_no_code():
    env, law = Doors(doors=2), world.world_law()
    first = env.reset(5)
    word = env.words[0]
    assert first == tasks.doors_first(2, word) == f"2 locked doors. Code of {word}?"
    assert env.step("no idea") == (tasks.doors_again(word), 0.0, False, {"invalid": True})
    right = tasks.code_claim(word[0], law[word[0]])
    observation, reward, done, _ = env.step(right)
    assert observation == tasks.doors_next(env.words[1]) and reward == 0 and not done
    second = env.words[1]
    observation, reward, done, _ = env.step(tasks.code_claim(second[0], law[second[0]]))
    assert (observation, reward, done) == (tasks.DOORS_OUT, 1.0, True)
    env.reset(5)
    wrong = tasks.code_claim(word[0], (law[word[0]] + 1) % 10)
    assert env.step(wrong)[:3] == (tasks.DOORS_TRAP, 0.0, True)
    assert read_code("b-words have code B3") == ("b", 3) and read_code("K1 then M2.") == ("m", 2)
    assert read_code("code 7") is None
    assert Doors().reset(9) == Doors().reset(9) != Doors().reset(10)
    ood = Doors(**world.GAME_OOD)
    ood.reset(1)
    assert all(w[0] in world.GAME_OOD["letters"] for w in ood.words)
    with pytest.raises(ValueError, match="doors must be a whole number of at least 1"):
        Doors(doors=0)


def distill_games(cli, out, *extra):
    code, stdout, err = cli("distill", "--toy-task", "game", "--steps", "1", "--batch-size", "2", "--eval-games", "2",
                            "--max-turns", "2", "--output-dir", out, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout.strip().splitlines()[-1])


def test_distill_plays_games_on_policy_and_scores_them_before_and_after(cli, tmp_path):
    summary = distill_games(cli, tmp_path / "run", "--show-prompts", "0")
    before, after = summary["before"], summary["after"]
    for result in (before, after):
        assert {"success", "success_with_context", "context_harm", "ood_success", "mean_turns", "invalid_rate"} <= result.keys()
        assert result["games"] == 2 and 1 <= result["mean_turns"] <= 2
    assert before["teacher_success_with_context"] == before["success_with_context"]  # the default teacher
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= step["games_won"] <= 1 and 1 <= step["turns"] <= 2  # turns: replies per game
    assert step["response_tokens"] > 0 and step["loss"] >= 0 and step["topk_mass"] > 0
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "data" / "context.txt").is_file()


def test_off_policy_the_teacher_plays_with_the_context_and_the_student_learns_its_replies(cli, tmp_path):
    summary = distill_games(cli, tmp_path / "run", "--mode", "off-policy", "--eval-games", "0", "--max-turns", "3")
    assert summary["mode"] == "off-policy" and summary["before"] is None and summary["after"] is None
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the teacher reads the items that state the law: it opens the three doors, where the student would guess
    assert step["games_won"] == 1.0 and step["turns"] == 3
    assert step["loss"] > 0 and step["topk_mass"] > 0.9  # its top-k holds nearly all its probability


@pytest.mark.slow  # the toy game's recipe as it ships, 32 evaluation games instead of 64 (about 2.5 min)
def test_the_toy_game_is_learned_no_context_success_reaches_the_teachers(cli, tmp_path):
    """The shipped toy student plays the doors game without the items at chance (three doors: one game in a
    thousand); after the built-in run it wins within 10 points of the teacher with them (bench/RESULTS.md has
    the full run)."""
    code, stdout, err = cli("distill", "--toy-task", "game", "--eval-games", "32", "--show-prompts", "0",
                            "--output-dir", tmp_path / "run", "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    before, after = summary["before"], summary["after"]
    teacher = before["teacher_success_with_context"]
    assert before["success"] <= 0.1 and teacher >= 0.9
    assert after["success"] >= teacher - 0.10
    assert after["success_with_context"] >= teacher - 0.10 and after["ood_success"] >= 0.8


def test_game_traces_mark_the_last_move_of_a_lost_game_and_unreadable_moves_wrong():
    from opcd_cli.extract import game_trace
    from opcd_cli.games import Game

    chat = [("user", "Code of kip?"), ("assistant", "k-words have code K1"), ("user", "No code read. Code of kip?"),
            ("assistant", "hm"), ("user", "Open. Code of bo?"), ("assistant", "b-words have code B2"), ("user", "end")]
    won = Game(1, messages=chat, reward=1.0, turns=3, invalid_turns=[False, True, False])
    assert game_trace(won) == ["[right] Code of kip? -> k-words have code K1",
                               "[wrong] No code read. Code of kip? -> hm", "[right] Open. Code of bo? -> b-words have code B2"]
    lost = Game(2, messages=chat, reward=0.0, turns=3, invalid_turns=[False, False, False])
    assert [line[:7] for line in game_trace(lost)] == ["[right]", "[right]", "[wrong]"]


def test_a_turn_whose_views_do_not_line_up_is_named(renderer):  # noqa: F811
    import copy

    from opcd_cli.errors import OpcdError
    from opcd_cli.prompts import ChatRenderer

    games = play(Scripted(renderer.tokenizer), renderer, Corridor, "corridor", [1], context=None,
                 context_as="system", sampling=SamplingOptions(temperature=0.0, max_new_tokens=4), max_turns=4)
    shouting = copy.deepcopy(renderer.tokenizer)  # a teacher template that writes answers in capitals
    shouting.chat_template = shouting.chat_template.replace("{{ message['content'] }}",
                                                            "{{ message['content'] | upper }}")
    with pytest.raises(OpcdError, match="game 1, turn 1: the answer 'hm' becomes different tokens"):
        turn_views(games[0], "ctx", "system", renderer, ChatRenderer(shouting, "shouting", {}))


def test_extraction_rounds_on_games_play_every_game_per_attempt_and_trace_every_turn(renderer):  # noqa: F811
    from opcd_cli.config import ExtractConfig
    from opcd_cli.extract import GameRounds

    cfg = ExtractConfig(model="toy:small", env="corridor", attempts=2, train_games=3, val_games=3, max_turns=2,
                        sampling=SamplingOptions(temperature=0.0, max_new_tokens=4))
    sampler = Scripted(renderer.tokenizer)
    rounds = GameRounds(cfg, sampler, renderer, "{traces}", Corridor, None)
    traces, won, games = rounds.solve(None)
    # seeds 3,000,000 + (0, 1, 2) need 1, 2 and 3 "go"s (seed % 3 + 1); each played twice, at most 2 turns:
    # the first wins at once; the second says "hm" at 2 left (invalid) and runs out of turns; so does the third
    assert games == 6 and won == 2 and len(traces) == 2 * (1 + 2 + 2)
    assert traces[:3] == ["[right] steps left: 1 -> go", "[right] steps left: 1 -> go", "[wrong] steps left: 2 -> hm"]
    # validation seeds 2,000,000 + (0, 1, 2) need 3, 1 and 2 "go"s: one won in two turns; with STOP in the items none
    assert rounds.val_accuracy([]) == pytest.approx(1 / 3) and rounds.val_accuracy(["STOP"]) == 0
    assert all(p.count("<|im_start|>user") <= 2 for p in sampler.prompts)


def test_opcd_extract_on_the_toy_game_writes_items_from_its_game_traces(cli, tmp_path):
    code, stdout, err = cli("extract", "--recipe", "toy-game-extract", "--rounds", "2", "--val-games", "8",
                            "-o", tmp_path / "exp.txt", "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["env"] == "doors" and [r["number"] for r in summary["rounds"]] == [1, 2]
    assert all(0 <= r["solve_rate"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in summary["rounds"])
    items = (tmp_path / "exp.txt").read_text().splitlines()
    assert items and all(re.fullmatch(r"- EXPERIENCE ITEM: [a-z]-words have code [A-Z]\d", item) for item in items)
    assert {p.name for p in (tmp_path / "exp.rounds").iterdir()} == {"round-1.txt", "round-2.txt", "summary.json"}
