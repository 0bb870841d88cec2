"""TextArena's single-player games through opcd's environment interface (``--env textarena:ID``): the paper's
FrozenLake (3x3, two holes) and Sokoban (6x6, one box) played by script to a win and to a loss, their turns'
text, invalid moves, seeds, and ``opcd eval`` and one step of ``opcd distill`` playing them with the toy model."""

from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path

import pytest

from opcd_cli import envs
from opcd_cli.errors import OpcdError

FROZENLAKE = ("textarena:FrozenLake-v0-raw", {"size": 3, "num_holes": 2, "randomize_start_goal": False})
SOKOBAN = ("textarena:Sokoban-v0-raw", {"dim_room": [6, 6], "num_boxes": 1})
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
RECIPES = Path(__file__).parent.parent / "recipes"


def game(spec):
    return envs.environment_factory(*spec)()


def lake_path(grid, start, target_cells) -> list[str]:
    """The shortest moves over safe ice from ``start`` to any of ``target_cells`` (a hole may be the last)."""
    size, queue, seen = len(grid), deque([(start, [])]), {start}
    while queue:
        (r, c), path = queue.popleft()
        for move, (dr, dc) in MOVES.items():
            cell = (r + dr, c + dc)
            if not (0 <= cell[0] < size and 0 <= cell[1] < size) or cell in seen:
                continue
            if cell in target_cells:
                return path + [move]
            if grid[cell[0]][cell[1]] != "H":
                seen.add(cell)
                queue.append((cell, path + [move]))
    raise AssertionError("no path")


def sokoban_solution(room_fixed, room_state) -> list[str]:
    """The shortest pushes that put the one box on its target (breadth-first over player and box cells)."""
    import numpy as np

    walls = {tuple(p) for p in np.argwhere(room_fixed == 0)}
    (target,) = [tuple(p) for p in np.argwhere(room_fixed == 2)]
    player = tuple(np.argwhere(room_state == 5)[0])
    box = tuple(np.argwhere((room_state == 4) | (room_state == 3))[0])
    queue, seen = deque([(player, box, [])]), {(player, box)}
    while queue:
        player, box, path = queue.popleft()
        if box == target:
            return path
        for move, (dr, dc) in MOVES.items():
            step = (player[0] + dr, player[1] + dc)
            if step in walls:
                continue
            new_box = box
            if step == box:
                new_box = (box[0] + dr, box[1] + dc)
                if new_box in walls:
                    continue
            if (step, new_box) not in seen:
                seen.add((step, new_box))
                queue.append((step, new_box, path + [move]))
    raise AssertionError("unsolvable room")


def play(g, moves: list[str]) -> list[envs.Step]:
    return [envs.step(g, f"I think so. [{move}]", "game") for move in moves]


def test_frozenlake_is_won_on_the_goal_and_lost_in_a_hole():
    g = game(FROZENLAKE)
    first = envs.reset(g, 7, "game")
    assert "Welcome to Frozen Lake!" in first and "Current Board:" in first and first.count("  H  ") == 2
    state = g.env.state.game_state
    grid, start = state["grid"], state["player_pos"]
    assert len(grid) == 3 and start == (0, 0) and grid[2][2] == "G"  # the paper's lake: 3x3, fixed start and goal
    path = lake_path(grid, start, {(2, 2)})
    steps = play(g, path)
    assert [s.done for s in steps] == [False] * (len(path) - 1) + [True]
    assert steps[-1].reward == 1.0 and sum(s.reward for s in steps) == 1.0 and not any(s.invalid for s in steps)
    assert "reached the goal" in steps[-1].observation
    assert "[" + path[0] + "]" not in steps[0].observation.split("\n")[0]  # the reply is not echoed back

    g = game(FROZENLAKE)
    envs.reset(g, 7, "game")
    holes = {(r, c) for r, row in enumerate(grid) for c, cell in enumerate(row) if cell == "H"}
    steps = play(g, lake_path(grid, (0, 0), holes))
    assert steps[-1].done and steps[-1].reward == 0.0  # TextArena's partial credit for a lost game is a loss
    assert "fell into a hole" in steps[-1].observation


def test_sokoban_is_won_by_pushing_the_box_home_and_lost_out_of_moves():
    g = game(SOKOBAN)
    first = envs.reset(g, 3, "game")
    assert "Sokoban puzzle" in first and first.count("X") + first.count("√") >= 1
    room_state = g.env.room_state
    assert room_state.shape == (6, 6) and ((room_state == 4) | (room_state == 3)).sum() == 1  # 6x6, one box
    solution = sokoban_solution(g.env.room_fixed, room_state)
    steps = play(g, solution)
    assert steps[-1].done and steps[-1].reward == 1.0 and not any(s.done for s in steps[:-1])
    assert "solved the Sokoban puzzle" in steps[-1].observation

    g = game(SOKOBAN)
    envs.reset(g, 3, "game")
    for _ in range(5):  # five moves that do not solve it: the game goes on, and opcd's turn limit ends it lost
        step = next((s for s in (play(g, [m])[0] for m in ("up", "down", "left", "right")) if not s.invalid), None)
        assert step is not None and not step.done and step.reward == 0.0


def test_invalid_moves_thinking_seeds_and_the_random_state():
    g = game(FROZENLAKE)
    envs.reset(g, 1, "game")
    step = envs.step(g, "<think>maybe [left]</think> no idea", "game")  # the move is read after the thinking
    assert step.invalid and not step.done and "invalid move" in step.observation
    assert not envs.step(g, "[down]", "game").invalid  # the next reply is read afresh
    boards = [envs.reset(game(FROZENLAKE), seed, "game") for seed in (5, 5, 6, 8, 9)]
    assert boards[0] == boards[1] and len(set(boards[1:])) > 1  # a seed is its lake
    random.seed(123)
    expected = random.random()
    random.seed(123)
    envs.reset(game(SOKOBAN), 2, "game")
    assert random.random() == expected  # TextArena's seeding leaves opcd's own draws alone


def test_bad_textarena_ids_and_options_are_one_line(monkeypatch):
    with pytest.raises(OpcdError, match=r"TextArena has no game 'FrozenLak-v0'; close single-player ids: .*FrozenLake-v0"):
        envs.environment_factory("textarena:FrozenLak-v0", {})
    with pytest.raises(OpcdError, match=r"textarena:TicTacToe-v0 is a game for several players; opcd plays"):
        envs.environment_factory("textarena:TicTacToe-v0", {})
    with pytest.raises(OpcdError, match=r"no option 'holes'; it takes size, num_holes, randomize_start_goal"):
        envs.environment_factory("textarena:FrozenLake-v0-raw", {"holes": 2})
    with pytest.raises(OpcdError, match=r"option size must be a whole number"):
        envs.environment_factory("textarena:FrozenLake-v0-raw", {"size": "3"})
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textarena" else find_spec(name, *a))
    with pytest.raises(OpcdError, match=r"^--env textarena:\.\.\. needs TextArena: pip install 'opcd\[textarena\]'$"):
        envs.environment_factory("textarena:FrozenLake-v0-raw", {})


@pytest.mark.parametrize("recipe", ["qwen3-1.7b-textarena-frozenlake", "qwen3-4b-textarena-sokoban"])
def test_the_recipes_play_the_papers_games(recipe):
    from opcd_cli.config import read_recipe

    settings = read_recipe(RECIPES / f"{recipe}.toml")
    spec = (settings["env"], settings["env_options"])
    assert spec == (FROZENLAKE if "frozenlake" in recipe else (SOKOBAN[0], {"dim_room": [6, 6], "num_boxes": 1}))
    assert settings["max_turns"] == 5 and settings["topk"] == 256 and settings["lr"] == 5e-6


def test_eval_and_distill_play_textarena_games_with_the_toy_model(cli, tmp_path):
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--env", FROZENLAKE[0], "--env-options",
                               json.dumps(FROZENLAKE[1]), "--games", "2", "--max-turns", "2", "--max-new-tokens", "4",
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["env"] == FROZENLAKE[0] and result["games"] == 2 and 0 <= result["success"] <= 1
    assert 1 <= result["mean_turns"] <= 2 and 0 <= result["invalid_rate"] <= 1

    context = tmp_path / "exp.txt"
    context.write_text("- EXPERIENCE ITEM: push the box, never pull it.\n")
    code, stdout, stderr = cli("distill", "--student", "toy:small", "--env", SOKOBAN[0], "--env-options",
                               json.dumps(SOKOBAN[1]), "--context", context, "--steps", "1", "--batch-size", "2",
                               "--max-turns", "2", "--eval-games", "0", "--topk", "4", "--max-new-tokens", "4",
                               "--show-prompts", "0", "-o", tmp_path / "run", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 1
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= step["games_won"] <= 1 and 1 <= step["turns"] <= 2 and step["response_tokens"] > 0
    assert step["loss"] >= 0 and (tmp_path / "run" / "model.safetensors").is_file()
