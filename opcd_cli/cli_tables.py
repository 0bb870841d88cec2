"""What the commands print: the before/after table of a run, the rounds of an extraction, the evaluation of
models (a row each)."""

from __future__ import annotations

from .ui import UI, percent


DISTILL_ROWS = [  # (label, EvalResult field)
    ("student, no context", "accuracy"),
    ("student, with context", "accuracy_with_context"),
    ("teacher, with context", "teacher_accuracy_with_context"),
    ("context harm", "context_harm"),
    ("student, OOD (own contexts)", "ood_accuracy"),
]
DISTILL_GAME_ROWS = [  # (label, GameEvalResult field): --env
    ("games won, no context", "success"),
    ("games won, with context", "success_with_context"),
    ("teacher games won, with context", "teacher_success_with_context"),
    ("context harm", "context_harm"),
    ("games won, OOD (own context)", "ood_success"),
    ("invalid moves, no context", "invalid_rate"),
]


def show_distill_summary(ui: UI, summary: dict) -> None:
    """The before/after table: one row per measured field of the two ``EvalResult``s."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    games = "success" in before or "success" in after
    rows = [[label, percent(before[key]) if key in before else "", percent(after[key]) if key in after else ""]
            for label, key in (DISTILL_GAME_ROWS if games else DISTILL_ROWS) if key in before or key in after]
    if rows:
        ui.table("games" if games else "accuracy", ["", "before", "after"], rows)
    phases = summary.get("time_by_phase") or {}
    if phases:
        ui.table(f"time per step ({phases['step_seconds']:.2f} s)", ["", "seconds", "share"],
                 [[name.replace("_", " "), f"{seconds:.3f}", percent(phases["shares"][name])]
                  for name, seconds in phases["seconds"].items()])
    for when, result in (("before", before), ("after", after)):
        if result.get("out_of_window"):
            from .games import window_warning

            ui.info(window_warning(result["out_of_window"], f"of the evaluation {when} training"))
    escape = summary.get("topk_mass_escape")
    if escape:
        from .escape import Escape

        ui.info(f"[yellow]warning:[/] {Escape(**escape).message()}")
    ui.info(f"{summary['steps']} steps in {summary['seconds']:.0f} s; student saved to {summary['output_dir']}")


def show_extract_summary(ui: UI, summary: dict) -> None:
    """The rounds' table and the round kept."""
    games = "env" in summary
    ui.table("experience by round", ["round", "items", "new", "games won" if games else "attempts right",
                                     "val games won" if games else "val accuracy"], [
        ["none", "0", "", "", percent(summary["val_accuracy_without"])]
    ] + [
        [str(r["number"]), str(r["items"]), str(r["new_items"]), percent(r["solve_rate"]), percent(r["val_accuracy"])]
        for r in summary["rounds"]
    ])
    best = percent(summary["val_accuracy_best"])
    ui.info(f"best: round {summary['best_round']} ({summary['items']} items, val {best}) "
            f"written to {summary['output']}")


def tokens(x: float) -> str:
    return f"{x:.1f}"


def turns(x: float) -> str:
    return f"{x:.2f}"


# (header, result key, format): the columns of `opcd eval`, on rows and with --env on games
EVAL_COLUMNS = [("n", "n", str), ("no context", "accuracy", percent),
                ("with context", "accuracy_with_context", percent), ("context harm", "context_harm", percent),
                ("OOD", "ood_accuracy", percent),
                ("tokens", "mean_response_tokens", tokens),
                ("tokens with context", "mean_response_tokens_with_context", tokens)]
GAME_COLUMNS = [("games", "games", str), ("success", "success", percent),
                ("with context", "success_with_context", percent), ("context harm", "context_harm", percent),
                ("turns", "mean_turns", turns), ("turns with context", "mean_turns_with_context", turns),
                ("invalid moves", "invalid_rate", percent),
                ("invalid with context", "invalid_rate_with_context", percent)]


def show_eval_table(ui: UI, results: list[dict], title: str = "evaluation", all_columns=EVAL_COLUMNS) -> None:
    """One row per model; columns only for what was measured."""
    columns = [c for c in all_columns if any(c[1] in r for r in results)]
    rows = [[r["model"]] + [fmt(r[key]) if key in r else "-" for _, key, fmt in columns] for r in results]
    ui.table(title, ["model"] + [header for header, _, _ in columns], rows)
    by_source = [[r["model"], source, percent(accuracy),
                  percent(r["accuracy_with_context_by_source"][source]) if "accuracy_with_context_by_source" in r else "-"]
                 for r in results for source, accuracy in r.get("accuracy_by_source", {}).items()]
    if by_source:  # rows with a data_source (verl, the official code)
        ui.table("accuracy by data_source", ["model", "data_source", "no context", "with context"], by_source)


def show_preview(ui: UI, result: dict) -> None:
    """``opcd data preview``: a row per row shown, a column per field read."""
    read_as = result["format"] + (f" ({result['mapping']})" if result["mapping"] else "")
    columns = ["row", "prompt or chat", "context", "answer", "verifier"] + (
        ["rendered"] if any("rendered" in r for r in result["shown"]) else [])
    rows = [[str(r["row"]), r.get("prompt") or chat_text(r.get("messages", [])), r.get("context") or "",
             r.get("answer") or "", r.get("verifier") or ""] + ([r["rendered"]] if "rendered" in r else [])
            for r in result["shown"]]
    split = f" (split {result['split']})" if result.get("split") else ""
    ui.table(f"{result['data']}{split}: {result['rows']} rows, read as {read_as}", columns, rows)


def chat_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

