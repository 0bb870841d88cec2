"""The checkpoint module: the prompt order as a pure function, the training state, and atomic model folders."""

import random
from pathlib import Path

import pytest
import torch

from opcd_cli.checkpoint import (
    STATE_DIR, STATE_FILE, STEP_FILE, WEIGHTS_FILE, load_state, save_model, save_state, state_folder, step_prompts,
)
from opcd_cli.errors import OpcdError


def generator_order(n, seed):
    """The order the trainer drew from before it became a function: a fresh shuffle each epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


@pytest.mark.parametrize("n, per_step", [(10, 3), (512, 16), (7, 7)])
def test_step_prompts_is_the_endless_shuffle_cut_into_steps(n, per_step):
    stream = generator_order(n, seed=5)
    expected = [[next(stream) for _ in range(per_step)] for _ in range(40)]
    assert [step_prompts(n, 5, step, per_step) for step in range(1, 41)] == expected
    # pure: asking again, or out of order, gives the same prompts
    assert step_prompts(n, 5, 17, per_step) == expected[16]
    assert step_prompts(n, 6, 17, per_step) != expected[16] or n == 1


def tiny_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    return model, optimizer, schedule


def train_steps(model, optimizer, schedule, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4)  # the torch RNG drives the data: a resumed run must draw the same
        loss = (model(x) ** 2).mean() + random.random()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_resumed_state_continues_exactly(tmp_path):
    random.seed(3)
    model, optimizer, schedule = tiny_training()
    first = train_steps(model, optimizer, schedule, 3)
    save_state(tmp_path, step=3, model=model, optimizer=optimizer, scheduler=schedule,
               metrics=[{"loss": v} for v in first], samplers={"student": {"calls": 5}})
    uninterrupted = train_steps(model, optimizer, schedule, 4)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    resumed_model, resumed_optimizer, resumed_schedule = tiny_training(seed=99)  # other weights, other RNG
    random.seed(11)
    state = load_state(tmp_path, model=resumed_model, optimizer=resumed_optimizer, scheduler=resumed_schedule)
    assert state["step"] == 3 and [m["loss"] for m in state["metrics"]] == first
    assert state["samplers"] == {"student": {"calls": 5}}
    assert train_steps(resumed_model, resumed_optimizer, resumed_schedule, 4) == uninterrupted
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, final[name])  # bitwise
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR]  # no temporary folders left
    assert sorted(p.name for p in (tmp_path / STATE_DIR).iterdir()) == sorted([STATE_FILE, STEP_FILE, WEIGHTS_FILE])


def test_a_second_save_replaces_the_first_and_a_kill_between_renames_leaves_the_old_one(tmp_path, monkeypatch):
    model, optimizer, schedule = tiny_training()
    save_state(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=schedule, metrics=[])
    save_state(tmp_path, step=2, model=model, optimizer=optimizer, scheduler=schedule, metrics=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR]
    assert state_folder(tmp_path) == tmp_path / STATE_DIR

    real_rename = Path.rename

    def killed_after_first_rename(self, target):  # the process dies between moving the old state and the new
        real_rename(self, target)
        if Path(target).name == f"{STATE_DIR}.old":
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path, step=3, model=model, optimizer=optimizer, scheduler=schedule, metrics=[])
    monkeypatch.undo()
    assert state_folder(tmp_path) == tmp_path / f"{STATE_DIR}.old"
    assert load_state(tmp_path, model=model, optimizer=optimizer, scheduler=schedule)["step"] == 2
    save_state(tmp_path, step=4, model=model, optimizer=optimizer, scheduler=schedule, metrics=[])  # recovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR]
    assert load_state(tmp_path, model=model, optimizer=optimizer, scheduler=schedule)["step"] == 4


def test_a_folder_without_state_cannot_be_resumed(tmp_path):
    model, optimizer, schedule = tiny_training()
    with pytest.raises(OpcdError, match="holds no training state"):
        load_state(tmp_path, model=model, optimizer=optimizer, scheduler=schedule)
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / STATE_FILE).write_bytes(b"not a state")
    (tmp_path / STATE_DIR / WEIGHTS_FILE).write_bytes(b"not weights")
    with pytest.raises(OpcdError, match="holds no training state"):  # incomplete: no step file
        load_state(tmp_path, model=model, optimizer=optimizer, scheduler=schedule)
    (tmp_path / STATE_DIR / STEP_FILE).write_text('{"step": 1}')
    with pytest.raises(OpcdError, match="cannot read the training state"):
        load_state(tmp_path, model=model, optimizer=optimizer, scheduler=schedule)


def test_a_state_of_another_model_is_refused(tmp_path):
    model, optimizer, schedule = tiny_training()
    save_state(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=schedule, metrics=[])
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(OpcdError, match="does not fit this model"):
        load_state(tmp_path, model=other, optimizer=other_optimizer,
                   scheduler=torch.optim.lr_scheduler.LambdaLR(other_optimizer, lambda s: 1.0))


def test_save_model_writes_a_loadable_folder_and_nothing_half_done(tiny_student, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    save_model(model, tokenizer, tmp_path / "ckpt", torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.dtype == torch.bfloat16 and next(reloaded.parameters()).dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt").chat_template

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tokenizer, tmp_path / "second", torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folder
