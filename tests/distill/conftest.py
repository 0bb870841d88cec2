"""A prepared toy run, shared by the tests of the distill package's rooms (tiny: topk 4, 4-token responses)."""

from __future__ import annotations

import pytest


def toy_config(folder, **settings):
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

    cfg = toy_config(tmp_path_factory.mktemp("prepared"))
    out = RunDir(cfg.output_dir, overwrite=False, inputs=cfg.inputs())
    try:
        yield cfg, prepare(cfg, out, UI(quiet=True)), out
    finally:
        out.release()


@pytest.fixture
def config(tmp_path):
    """``toy_config`` in this test's own folder."""
    return lambda **settings: toy_config(tmp_path, **settings)
