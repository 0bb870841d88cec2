"""The paper's domains as recipes over their public data: rows in the layouts the official datasets are read in
(the math splits in verl's columns, the medical and safety sets as the official code's `content` and `answer`),
cached offline under their hub names, read by ``opcd eval`` and planned by ``opcd distill --dry-run`` with the
recipes as they are (only the models swapped for the toy's)."""

from __future__ import annotations

import json

import pytest

from conftest import cached_dataset, write_jsonl


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def math_rows(n: int) -> list[dict]:
    return [{"data_source": "math_dapo", "content": chat(f"Solve: what is {i} + {i}? Put the answer in \\boxed{{}}."),
             "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
             "extra_info": {"index": str(i)}} for i in range(n)]


def medmcqa_rows(n: int) -> list[dict]:
    return [{"content": chat(f"Which vitamin is {i}?\nA. A\nB. B\nC. C\nD. D"), "answer": "ABCD"[i % 4]}
            for i in range(n)]


def safety_rows(n: int) -> list[dict]:
    return [{"content": chat(f"Is statement {i} a fact?"), "answer": ("yes", "no")[i % 2]} for i in range(n)]


DOMAINS = {  # recipe: (its datasets and their rows, the verifier, the line that says how rows read, the answers)
    "qwen3-8b-to-1.7b-experience": ({"dapo_train": math_rows(8), "dapo_test": math_rows(3)}, "math",
                                    "rows read as verl: content (messages), reward_model.ground_truth -> answer"),
    "llama-3.2-3b-medical-system-prompt": ({"sys_medmcqa_train": medmcqa_rows(8), "sys_medmcqa_test": medmcqa_rows(3)},
                                           "choice", "rows read as verl: content (messages), answer -> answer"),
    "llama-3.2-3b-safety-system-prompt": ({"sys_safety_train": safety_rows(8), "sys_safety_test": safety_rows(3)},
                                          "yesno", "rows read as verl: content (messages), answer -> answer"),
}


@pytest.mark.parametrize("recipe", DOMAINS)
def test_paper_recipe_reads_its_official_data(recipe, cli, offline_hub, tmp_path):
    datasets, verifier, said = DOMAINS[recipe]
    for name, rows in datasets.items():  # one split each, `train`, as the official tools/prepare_data.py reads them
        cached_dataset(offline_hub, f"ytz20/{name}", {"train": rows})
    context = tmp_path / "context.txt"
    context.write_text("You are careful. Answer inside <answer></answer>.\n")
    from opcd_cli.config import read_recipe

    settings = read_recipe(f"recipes/{recipe}.toml")
    assert settings["data"].startswith("hf:ytz20/") and settings["eval_data"].startswith("hf:ytz20/")
    assert settings["verifier"] == verifier

    test_set = settings["eval_data"]
    code, stdout, stderr = cli("eval", "--model", "toy:small", "--data", test_set, "--context", context,
                               "--verifier", verifier, "--max-new-tokens", "2", "--json")
    assert code == 0, stderr
    assert said in " ".join(stderr.split()) and f"{test_set}: split train (3 rows" in " ".join(stderr.split())
    scored = json.loads(stdout)
    assert scored["n"] == 3 and 0 <= scored["accuracy"] <= 1 and 0 <= scored["accuracy_with_context"] <= 1

    teacher = ["--teacher", "toy:large"] if "teacher" in settings else []
    code, stdout, stderr = cli("distill", "--recipe", f"recipes/{recipe}.toml", "--student", "toy:small", *teacher,
                               "--context", context, "--dry-run", "--json")
    assert code == 0, stderr
    plan = json.loads(stdout)
    from opcd_cli.config import build_distill_config
    from opcd_cli.memory import longest_prompt

    as_file = write_jsonl(tmp_path / "train.jsonl", next(iter(datasets.values())))  # the same rows, from a file
    same = build_distill_config(settings, {"student": "toy:small", "teacher": "toy:large" if teacher else None,
                                           "context": str(context), "data": str(as_file)})
    assert plan["longest_prompt_tokens"] == longest_prompt(same) > 10  # the training rows read and rendered
    code, stdout, stderr = cli("data", "preview", settings["data"], "--rows", "2", "--json")
    assert code == 0, stderr
    shown = json.loads(stdout)
    first = next(iter(datasets.values()))[0]
    answer = first["reward_model"]["ground_truth"] if "reward_model" in first else first["answer"]
    assert shown["format"] == "verl" and shown["shown"][0]["answer"] == answer
    assert shown["shown"][0]["prompt"] == first["content"][0]["content"]
