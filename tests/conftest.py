"""Shared fixtures: tiny untrained models in Hugging Face format, toy data files, and a CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU through the interpreter
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several pytest processes (pytest-xdist): its share of the cores,
    # for its own work and for the runs it starts (two threads each on two cores cost 1.6x in spinning threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
THREADS = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(THREADS) if THREADS.isdigit() and int(THREADS) > 0 else min(2, os.cpu_count() or 1))

from opcd_cli.models import quiet_transformers  # noqa: E402

quiet_transformers()

# The suite runs in two pytest processes (pytest-xdist, `-n auto --dist loadfile` in pyproject.toml), each taking
# whole files. The files that start toy runs, torchrun launches or vLLM engines are handed out first, longest
# first, so that the two processes end together; the rest fill in behind them, in their usual order.
LONGEST_FIRST = ("test_distributed.py", "test_game_distill.py", "test_default_run.py", "test_extract.py",
                 "test_bad_inputs.py", "test_resume.py", "test_real_tokenizers.py", "test_lora.py",
                 "test_sampling_vllm.py", "test_distill_cli.py")  # by the CPU time each took (bench/RESULTS.md)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: two processes on this project's 2-core machines, at most four elsewhere (each run a test
    starts may itself start two processes or a vLLM engine)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


def make_tiny_model(folder: Path, hidden: int = 32, layers: int = 1, vocab_rows: int = 112, seed: int = 0) -> Path:
    """An untrained Qwen3-architecture model with the toy tokenizer, saved like any checkpoint."""
    from transformers import Qwen3ForCausalLM

    from opcd_cli.toy.build import ToySize, model_config
    from opcd_cli.toy.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    size = ToySize(hidden=hidden, layers=layers, heads=2, kv_heads=1, intermediate=2 * hidden, vocab_rows=vocab_rows,
                   steps=0, batch=1, lr=0.0)
    model = Qwen3ForCausalLM(model_config(size, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-student"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A different, larger model whose output layer is padded to another size than the student's."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), hidden=48, layers=2, vocab_rows=128, seed=1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cached_dataset(cache: Path, repo_id: str, splits: dict[str, list[dict]], config: str = "default") -> str:
    """``repo_id`` (``ORG/NAME``) in a Hugging Face datasets cache at ``cache``, as ``load_dataset`` keeps a hub
    dataset it has downloaded (``ORG___NAME/CONFIG/0.0.0/HASH/NAME-SPLIT.arrow`` with its ``dataset_info.json``):
    made by ``load_dataset`` from local Parquet files, then filed under the hub's name. Returns ``hf:ORG/NAME``."""
    import shutil
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for split, rows in splits.items():
            files[split] = f"{scratch}/{split}.parquet"
            datasets.Dataset.from_list(rows).to_parquet(files[split])
        datasets.load_dataset("parquet", data_files=files, cache_dir=f"{scratch}/built")
        built = next(p for p in Path(scratch, "built", "parquet").glob("*/0.0.0/*") if p.is_dir())
        org, name = repo_id.split("/")
        name = datasets.naming.camelcase_to_snakecase(name)  # as the cache spells names
        target = cache / f"{org}___{name}" / config / "0.0.0" / "0123456789abcdef"
        shutil.copytree(built, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", f"{name}-", 1))
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps(info | {"config_name": config, "dataset_name": name}))
    return f"hf:{repo_id}"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A datasets cache of this test's own, read offline (``HF_DATASETS_OFFLINE=1``, set in this process); add
    datasets to it with ``cached_dataset``."""
    import datasets.config

    cache = tmp_path / "datasets-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


def write_small_eval(folder: Path, test: int, ood: int) -> Path:
    """``test.jsonl`` and ``ood.jsonl`` of the toy's codes task in ``folder``, few rows each, so that end-to-end
    runs spend their time training."""
    from opcd_cli.toy import world

    splits = world.splits("codes", train=64, val=4, test=test, ood_per_kind=2)
    write_jsonl(folder / "test.jsonl", splits.test)
    write_jsonl(folder / "ood.jsonl", splits.ood[:ood])
    return folder


@pytest.fixture
def toy_files(tmp_path) -> dict[str, Path]:
    """A small slice of the toy world's `shift` task as files: train prompts, test rows, OOD rows, context."""
    from opcd_cli.toy import world

    splits = world.splits("shift", train=8, val=4, test=6, ood_per_kind=1)
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "context.txt").write_text(splits.context + "\n")
    return {
        "train": write_jsonl(folder / "train.jsonl", splits.train),
        "test": write_jsonl(folder / "test.jsonl", splits.test),
        "ood": write_jsonl(folder / "ood.jsonl", splits.ood[:6]),
        "context": folder / "context.txt",
    }


@pytest.fixture
def cli(capsys):
    """Run `opcd ARGS...` in this process; returns (exit code, stdout, stderr)."""
    from opcd_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def tree(folder: Path) -> dict[str, float]:
    """Every file under ``folder`` with its modification time: to check that nothing changed on disk."""
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# --- the distill package's rooms (tests/distill/): a prepared toy run ------------------------------------

def toy_distill_config(folder, **settings):
    """The toy's default run, tiny (topk 4, 4-token responses, 2 prompts a step), writing under ``folder``."""
    from opcd_cli.config import build_distill_config, read_recipe

    return build_distill_config(read_recipe("toy-codes"), {"batch_size": 2, "steps": 2, "topk": 4,
                                                            "max_new_tokens": 4, "show_prompts": 0,
                                                            "output_dir": str(folder / "run"), **settings})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(config, the ``Run`` that ``setup.prepare`` builds, its output folder) for the toy's default run."""
    from opcd_cli.distill.setup import prepare
    from opcd_cli.outputs import RunDir
    from opcd_cli.ui import UI

    cfg = toy_distill_config(tmp_path_factory.mktemp("prepared"))
    out = RunDir(cfg.output.output_dir, overwrite=False, inputs=cfg.inputs())
    try:
        yield cfg, prepare(cfg, out, UI(quiet=True)), out
    finally:
        out.release()


@pytest.fixture
def config(tmp_path):
    """``toy_distill_config`` in this test's own folder."""
    return lambda **settings: toy_distill_config(tmp_path, **settings)
