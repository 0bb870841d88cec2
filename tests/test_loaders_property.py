"""Property-based tests of the loaders a user's files reach first: whatever the bytes, JSON values or TOML, the
data and recipe loaders return checked rows and settings or raise ``OpcdError`` with one line, never anything
else."""

import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opcd_cli.config import ExtractConfig, build_distill_config, read_recipe
from opcd_cli.data import Example, load_examples, read_context
from opcd_cli.errors import OpcdError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
rows = st.dictionaries(
    st.sampled_from(["prompt", "messages", "context", "answer", "verifier", "other"]),
    json_values | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                                  "content": st.text(max_size=10)}), max_size=3),
    max_size=4,
)


def loads_cleanly(load):
    """Call ``load``: a result, or an ``OpcdError`` with a one-line message."""
    try:
        return load()
    except OpcdError as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return None


def with_file(name: str, data: bytes, load):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        return loads_cleanly(lambda: load(str(path)))


@FAST
@given(st.binary(max_size=300), st.sampled_from(["d.jsonl", "d.json"]))
def test_data_files_of_random_bytes(data, name):
    result = with_file(name, data, load_examples)
    assert result is None or all(isinstance(e, Example) for e in result)


@FAST
@given(st.lists(rows, max_size=5), st.booleans())
def test_data_files_of_random_rows(records, as_jsonl):
    text = "".join(json.dumps(r) + "\n" for r in records) if as_jsonl else json.dumps(records)
    examples = with_file("d.jsonl" if as_jsonl else "d.json", text.encode(), load_examples)
    for example in examples or []:  # whatever loads is a well-formed chat ending with the user's turn
        assert example.messages and example.messages[-1][0] == "user"
        assert all(role in ("system", "user", "assistant") for role, _ in example.messages)
        assert all(isinstance(content, str) for _, content in example.messages)


@FAST
@given(st.binary(max_size=200))
def test_context_files_of_random_bytes(data):
    context = with_file("c.txt", data, read_context)
    assert context is None or (isinstance(context, str) and context.strip())


toml_keys = st.sampled_from(["student", "data", "steps", "lr", "topk", "temperature", "trust_remote_code", "unknown",
                             "sampling", "loading", "model", "rounds"])
toml_scalars = (st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(string.ascii_letters + "./-", max_size=12))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@FAST
@given(st.dictionaries(toml_keys, toml_scalars, max_size=5), st.binary(max_size=40), st.booleans())
def test_recipes_of_random_toml(table, noise, extract):
    text = "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items()).encode() + noise
    cls = ExtractConfig if extract else None
    settings_ = with_file("r.toml", text, lambda path: read_recipe(path, cls))
    if settings_ is not None and not extract:  # settings that read are typed well enough to build or fail cleanly
        loads_cleanly(lambda: build_distill_config(settings_))
