"""`opcd plot` and the `metrics.png` every run writes."""

import json

from conftest import tree, write_jsonl


def fake_run(folder, scale):
    folder.mkdir()
    write_jsonl(folder / "metrics.jsonl", [{"step": s, "loss": scale / s, "topk_mass": 0.9, "response_tokens": 10 + s,
                                            "lr": 1e-4, "grad_norm": 0.5} for s in range(1, 6)])
    return folder


def test_plot_overlays_runs_into_one_png(cli, tmp_path):
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b.partial", 2.0)
    code, stdout, err = cli("plot", a, b, "-o", tmp_path / "both.png", "--json")
    assert code == 0, err
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(stdout)["runs"] == [{"run": str(a), "steps": 5}, {"run": str(b), "steps": 5}]
    assert "2 run(s), 10 steps drawn" in err


def test_plot_bad_input_is_one_line_and_writes_nothing(cli, tmp_path):
    a = fake_run(tmp_path / "a", 1.0)
    (tmp_path / "taken.png").write_bytes(b"mine")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    before = tree(tmp_path)
    for args, message in (([a, "-o", tmp_path / "taken.png"], "exists; pass --overwrite"),
                          ([a, "-o", tmp_path / "plot.jpg"], "give a .png file name"),
                          ([tmp_path / "nowhere", "-o", tmp_path / "x.png"], "has no readable metrics.jsonl"),
                          ([tmp_path / "broken", "-o", tmp_path / "x.png"], "metrics.jsonl:2: not a JSON line")):
        code, stdout, err = cli("plot", *args)
        assert code == 2 and stdout == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert tree(tmp_path) == before


def tiny_run(cli, tiny_student, toy_files, out, *extra):
    code, stdout, err = cli("distill", "--student", tiny_student, "--data", toy_files["train"], "--context",
                            toy_files["context"], "-o", out, "--steps", "3", "--batch-size", "2", "--topk", "8",
                            "--max-new-tokens", "4", "--show-prompts", "0", *extra)
    assert code == 0, err
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_run_draws_its_metrics(cli, tiny_student, toy_files, tmp_path):
    tiny_run(cli, tiny_student, toy_files, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_report_to_tensorboard_logs_every_step(cli, tiny_student, toy_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = tiny_run(cli, tiny_student, toy_files, tmp_path / "run", "--report-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("loss", "topk_mass", "grad_norm", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in logged] == [1, 2, 3]
        assert [v for _, v in logged] == [__import__("pytest").approx(m[key], rel=1e-6) for m in metrics]


def test_report_to_wandb_writes_an_offline_run(cli, tiny_student, toy_files, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = tiny_run(cli, tiny_student, toy_files, tmp_path / "run", "--report-to", "wandb")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")  # offline by default: nothing is uploaded
    (records,) = offline.glob("run-*.wandb")  # protobuf records, which hold each logged value as JSON text
    data = records.read_bytes()
    assert data.count(b"train/loss") >= 3
    for row in metrics:
        assert json.dumps(row["loss"]).encode() in data and json.dumps(row["grad_norm"]).encode() in data


def test_a_run_keeps_its_colour_in_a_panel_another_run_lacks(tmp_path, monkeypatch):
    """An off-policy run has no teacher entropy: the on-policy run drawn beside it keeps its colour there."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from opcd_cli.plots import plot_runs

    drawn, real = [], Axes.plot

    def spy(self, *args, **kw):
        drawn.append((kw.get("label"), kw.get("color")))
        return real(self, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    off = [{"step": s, "loss": 1.0 / s, "student_entropy": 0.5, "teacher_entropy": None} for s in (1, 2)]
    on = [{"step": s, "loss": 2.0 / s, "student_entropy": 0.4, "teacher_entropy": 0.2} for s in (1, 2)]
    plot_runs([("off", off), ("on", on)], tmp_path / "p.png")
    colours = {}
    for label, colour in drawn:
        colours.setdefault(label, set()).add(colour)
    assert colours == {"off": {"C0"}, "on": {"C1"}}
    assert drawn.count(("on", "C1")) == 3  # loss, student entropy, teacher entropy
