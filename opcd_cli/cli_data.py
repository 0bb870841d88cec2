"""``opcd data``: how a data source is read, before anything trains on it.

    opcd data preview train.parquet --rows 3 --model Qwen/Qwen3-1.7B   # the format, each row, its rendered prompt
"""

from __future__ import annotations

from typing import Optional

import typer

from . import cli_options as o
from .cli_options import DATA, MODELS, flag
from .cli_tables import show_preview
from .config import parse_json_object
from .errors import OpcdError
from .ui import UI, print_json


data_app = typer.Typer(name="data", help="Look at data as opcd reads it.", no_args_is_help=True,
                       rich_markup_mode="rich")


@data_app.command("preview")
def data_preview(
    data: str = typer.Argument(..., help="Rows: JSONL, JSON, CSV, Parquet, a saved dataset folder, hf:ORG/NAME[:CONFIG] or a built-in name."),
    split: o.Split = None,
    rows: int = flag(5, help="How many rows to show.", panel=DATA),
    model: Optional[str] = flag(None, help="Also render each prompt through this model's chat template.", panel=MODELS),
    context: o.Context = None,
    context_as: o.ContextAs = None,
    prompt_field: o.PromptField = None,
    messages_field: o.MessagesField = None,
    context_field: o.ContextField = None,
    answer_field: o.AnswerField = None,
    prompt_template: o.PromptTemplate = None,
    answer_template: o.AnswerTemplate = None,
    trust_remote_code: o.TrustRemoteCode = None,
    chat_template_kwargs: o.ChatTemplateKwargs = None,
    json_output: o.JsonOutput = False,
) -> None:
    """How the first rows of a data source are read: the format recognised, each row's prompt or chat, context,
    answer and verifier (with --model, the prompt its chat template renders)."""
    from .config import CONTEXT_AS, FieldOptions, ModelOptions, build_config
    from .config.checks import choice
    from .data import read_context

    if rows < 1:
        raise OpcdError(f"--rows must be at least 1; got {rows}")
    if context_as is not None:
        choice("context_as", context_as, CONTEXT_AS)
    fields = build_config(FieldOptions, {"prompt_field": prompt_field, "messages_field": messages_field,
                                         "context_field": context_field, "answer_field": answer_field,
                                         "prompt_template": prompt_template, "answer_template": answer_template,
                                         "split": split})
    fields.check_splits({"split": {"DATA": data}})
    loading = ModelOptions(trust_remote_code=bool(trust_remote_code),
                           chat_template_kwargs=parse_json_object(chat_template_kwargs) or {})
    from .preview import preview

    result = preview(data, rows=rows, fields=fields, model=model, context=read_context(context),
                     context_as=context_as or "system", loading=loading)
    show_preview(UI(), result)
    if json_output:
        print_json(result)
