"""Environments played turn by turn: the interface and its loading, FrozenLake as text, games played and scored
(`opcd eval --env`)."""

from __future__ import annotations

import json

import pytest

from opcd_cli import envs
from opcd_cli.cli import main
from opcd_cli.config import SamplingOptions
from opcd_cli.envs.frozenlake import FrozenLake, read_move
from opcd_cli.errors import OpcdError
from opcd_cli.games import GameScores, evaluate_games, play


class Corridor:
    """A scripted game: seed s needs s % 3 + 1 replies of "go"; "stop" ends it lost; anything else is invalid."""

    def __init__(self, bonus: float = 1.0):
        self.bonus = bonus

    def reset(self, seed):
        self.left = seed % 3 + 1
        return f"steps left: {self.left}"

    def step(self, reply):
        if "stop" in reply:
            return "stopped", 0.0, True
        if "go" not in reply:
            return "say go", 0.0, False, {"invalid": True}
        self.left -= 1
        return f"steps left: {self.left}", (self.bonus if self.left == 0 else 0.0), self.left == 0


class Exploding(Corridor):
    def step(self, reply):
        raise RuntimeError("the lake melted")


class TextDone(Corridor):
    """A game that says whether it is over in words."""

    def step(self, reply):
        observation, reward, done, *info = super().step(reply)
        return observation, reward, "yes" if done else "no", *info


class TextReward(Corridor):
    """A game whose step gives its reward as text."""

    def step(self, reply):
        observation, reward, done, *info = super().step(reply)
        return observation, str(reward), done, *info


class Scripted:
    """A sampler that answers from the prompt's text: "stop" when it holds the word STOP (the context), "hm"
    on a game's first turn when the seed asks for it, else "go". It keeps every prompt it was given."""

    name = "scripted"

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, prompts, options):
        replies = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            reply = "stop" if "STOP" in text else ("hm" if "steps left: 2" in text and "hm" not in text else "go")
            replies.append(self.tokenizer.encode(reply, add_special_tokens=False))
        return replies


@pytest.fixture(scope="module")
def renderer():
    from opcd_cli import models
    from opcd_cli.prompts import ChatRenderer

    return ChatRenderer(models.load_tokenizer("toy:small"), "toy:small", {})


def test_a_scripted_game_gives_the_success_rate_turns_and_invalid_moves_it_should(renderer):
    sampler, seeds = Scripted(renderer.tokenizer), list(range(6))  # seeds need 1, 2, 3, 1, 2, 3 replies of "go"
    result = evaluate_games(sampler, renderer, Corridor, "corridor", seeds, context="STOP", context_as="system",
                            sampling=SamplingOptions(temperature=0.0, max_new_tokens=4), max_turns=3)
    # without the context: 0 and 3 win in one turn; 1 and 4 answer "hm" at 2 left (invalid), then win in three;
    # 2 and 5 go to 2 left, answer "hm" there, and run out of turns at 1 left
    assert result.success == pytest.approx(4 / 6)
    assert result.mean_turns == pytest.approx((1 + 3 + 3 + 1 + 3 + 3) / 6)
    assert result.invalid_rate == pytest.approx(4 / 14)
    assert result.success_with_context == 0 and result.mean_turns_with_context == 1  # STOP: every game stops
    assert result.context_harm == pytest.approx(4 / 6)
    without = [p for p in sampler.prompts if "STOP" not in p]
    assert len(without) == 14 and len(sampler.prompts) == 20  # 14 replies without the context, 6 with it
    # seed 2's last prompt: the observations as user turns and the replies as assistant turns, in order
    last = max((p for p in without if "steps left: 3" in p), key=len)
    assert last.index("steps left: 3") < last.index("steps left: 2") < last.index("hm") < last.index("say go")


def test_games_end_when_the_next_prompt_would_not_fit_the_window(renderer):
    first = renderer.prompt_ids([{"role": "user", "content": "steps left: 3"}])
    games = play(Scripted(renderer.tokenizer), renderer, Corridor, "corridor", [2], context=None, context_as="system",
                 sampling=SamplingOptions(temperature=0.0, max_new_tokens=4), max_turns=5, window=len(first) + 4)
    assert games[0].turns == 1 and games[0].out_of_window and not games[0].won
    steps = []
    play(Scripted(renderer.tokenizer), renderer, Corridor, "corridor", [0, 2], context=None, context_as="system",
         sampling=SamplingOptions(temperature=0.0, max_new_tokens=4), max_turns=5, advance=steps.append)
    assert sum(steps) == 2 * 5  # the progress bar ends full although the games end early
    assert GameScores.of(games).success == 0


def test_read_move_takes_the_last_move_word_after_the_thinking():
    assert read_move("I go Left") == 0 and read_move("DOWN") == 1 and read_move("right, no: up") == 3
    assert read_move("<think>left? up?</think>Right") == 2
    assert read_move("leftover upward") is None and read_move("") is None


def test_frozenlake_as_text_plays_gymnasiums_fixed_map_to_the_goal():
    env = FrozenLake(size=4, random_map=False)  # SFFF / FHFH / FFFH / HFFG, not slippery
    first = env.reset(0)
    assert first.endswith("P F F F\nF H F H\nF F F H\nH F F G") and "Left, Down, Right or Up" in first
    observation, reward, done, info = env.step("hmm")
    assert info["invalid"] and not done and reward == 0 and observation.endswith("P F F F\nF H F H\nF F F H\nH F F G")
    for move in ("Down", "down", "Right", "right", "Down"):
        observation, reward, done, info = env.step(move)
        assert reward == 0 and not done and not info["invalid"]
    observation, reward, done, _ = env.step("Right")
    assert reward == 1 and done and "You reached the goal." in observation and observation.endswith("H F F P")
    env.reset(0)
    assert env.step("Up")[0].endswith("P F F F\nF H F H\nF F F H\nH F F G")  # the edge: it stays
    assert env.step("Right")[0].splitlines()[-4] == "F P F F"
    assert env.step("Left")[0].splitlines()[-4] == "P F F F"


def test_frozenlake_falls_into_a_hole_and_random_maps_follow_the_seed():
    env = FrozenLake(size=4, random_map=False)
    env.reset(0)
    env.step("Right")
    observation, reward, done, _ = env.step("Down")  # (1, 1) is a hole
    assert done and reward == 0 and "You fell into a hole." in observation
    a, b, c = FrozenLake(size=6), FrozenLake(size=6), FrozenLake(size=6)
    assert a.reset(3) == b.reset(3) and a.reset(3) != c.reset(4)
    assert len(a.reset(3).split("\n\n")[-1].splitlines()) == 6


def test_environments_load_by_name_or_class_and_bad_ones_are_refused():
    assert isinstance(envs.environment_factory("frozenlake", {"size": 5})(), FrozenLake)
    assert isinstance(envs.environment_factory("FrozenLake")(), FrozenLake)
    assert envs.environment_factory("test_games:Corridor", {"bonus": 2.0})().bonus == 2.0
    for spec, options, message in (
        ("chess", {}, r"no such environment; give one of doors, frozenlake, textarena:ID \(a TextArena single-player game\) or "
                    "package.module:Class"),
        ("no_such_module_here:Game", {}, "cannot import no_such_module_here"),
        ("collections:OrderedDict", {}, "OrderedDict does not implement the environment interface"),
        ("frozenlake", {"size": 1}, "size must be a whole number of at least 2"),
        ("frozenlake", {"colour": "blue"}, "no option 'colour'; it takes size, slippery, random_map"),
        ("frozenlake", {"slippery": "false"}, "option slippery must be true or false .* got 'false'"),
        ("frozenlake", {"size": "4"}, "option size must be a whole number"),
    ):
        with pytest.raises(OpcdError, match=message):
            envs.environment_factory(spec, options)
    with pytest.raises(OpcdError, match="failed at step: RuntimeError: the lake melted"):
        envs.step(Exploding(), "go", "test_games:Exploding")
    with pytest.raises(OpcdError, match="must return \\(observation text, reward, done\\)"):
        envs.step(type("Bad", (), {"step": lambda self, reply: 3})(), "go", "bad")
    with pytest.raises(OpcdError, match="returned the reward '0.0'; a reward must be a number"):
        envs.step(TextReward(), "hm", "test_games:TextReward")


class Verbose(Corridor):
    """A corridor whose first observation is longer than the toy model's window."""

    def reset(self, seed):
        return super().reset(seed) + " (the corridor is long)" * 100


def test_games_that_outgrow_the_window_are_counted_and_said(capsys):
    """A game whose next prompt and reply cannot fit the model's window ends as a loss: `opcd eval --env` counts
    those games and says so in one line, instead of reporting losses with no word."""
    code = main(["eval", "--model", "toy:small", "--env", "test_games:Verbose", "--games", "3", "--max-turns", "2",
                 "--max-new-tokens", "6", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["success"] == 0 and result["out_of_window"] == 3
    assert "warning: 3 game(s) of toy:small ended when their next prompt and a reply could not fit" in " ".join(err.split())


def test_opcd_eval_plays_frozenlake_with_the_toy_model_and_prints_one_json_object(capsys):
    code = main(["eval", "--model", "toy:small", "--env", "frozenlake", "--env-options", '{"size": 3}', "--games", "3",
                 "--max-turns", "2", "--max-new-tokens", "6", "--context", "toy:codes/context", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["env"] == "frozenlake" and result["games"] == 3 and result["max_turns"] == 2
    assert 0 <= result["success"] <= 1 and 1 <= result["mean_turns"] <= 2 and 0 <= result["invalid_rate"] <= 1
    assert {"success_with_context", "context_harm", "invalid_rate_with_context"} <= result.keys()


@pytest.mark.parametrize("args, message", [
    (["--env", "frozenlake", "--data", "x.jsonl"], "give --data (rows with answers) or --env (a game to play), one of"),
    (["--env", "frozenlake", "--max-turns", "0"], "max_turns must be a number of at least 1; got 0"),
    (["--env", "frozenlake", "--games", "-2"], "games must be a number of at least 1; got -2"),
    (["--env", "frozenlake", "--env-options", "[4]"], "--env-options must be a JSON object"),
    (["--env", "test_games:Exploding", "--games", "1", "--max-new-tokens", "2"],
     "the environment test_games:Exploding failed at step: RuntimeError: the lake melted"),
])
def test_bad_game_settings_are_one_line_errors(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "toy:small", *args]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # a failure mid-game follows the progress bar's last line
    assert last.startswith("opcd: error: ") and message in last and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
