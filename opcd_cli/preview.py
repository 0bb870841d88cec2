"""``opcd data preview``: how the first rows of a data source are read (the format recognised, the prompt or
chat, the context, the answer, the verifier), and, with ``--model``, the prompt its chat template renders."""

from __future__ import annotations

from .data import load_rows


def preview(path: str, *, rows: int, fields=None, model: str | None = None, context: str | None = None,
            context_as: str = "system", loading=None) -> dict:
    """The first ``rows`` rows of ``path`` as opcd reads them (rendered by ``model``'s chat template when one is
    given, with ``context`` or each row's own in front)."""
    read = load_rows(path, fields=fields)
    shown = [{"row": e.row, **e.to_record()} for e in read.examples[:rows]]
    if model is not None:
        from . import models
        from .prompts import ChatRenderer, with_context

        trust = loading.trust_remote_code if loading is not None else False
        renderer = ChatRenderer(models.load_tokenizer(model, trust), model,
                                loading.chat_template_kwargs if loading is not None else {})
        for record, example in zip(shown, read.examples):
            chat = with_context(example.messages, example.context or context, context_as)
            record["rendered"] = renderer.show(renderer.prompt_ids(chat))
    return {"data": str(path), "split": read.split, "format": read.form.name, "mapping": read.form.mapping, "rows": len(read.examples),
            "shown": shown}
