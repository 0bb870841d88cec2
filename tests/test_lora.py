"""LoRA students: the adapters-off teacher is the base model exactly, the merged weights are the trained model,
the run's adapter and merged folders load without opcd, and a LoRA run resumes exactly."""

import json

import pytest
import torch

from conftest import tree

FAST = ["--steps", "3", "--batch-size", "2", "--topk", "8", "--lr", "5e-2", "--max-new-tokens", "4",
        "--eval-max-new-tokens", "4"]


def lora_args(student, files, out, *extra, rank="4"):
    return ["distill", "--student", student, "--data", files["train"], "--context", files["context"],
            "--eval-data", files["test"], "-o", out, *FAST, *(["--lora-rank", rank] if rank else []), *extra]


def load_plain(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def trained_adapters(tiny_student, dropout=0.0, seed=0):
    """A LoRA model on the tiny student whose adapters are non-zero (B starts at zero: perturb it)."""
    from opcd_cli import lora

    model = lora.add_adapters(load_plain(tiny_student), 4, None, dropout, "all-linear")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


IDS = [1, 5, 9, 14, 3, 7, 22, 40]


def test_adapters_off_teacher_is_exactly_the_base_model(tiny_student):
    from opcd_cli import lora

    base = load_plain(tiny_student)
    student = trained_adapters(tiny_student, dropout=0.5)
    student.train()  # the student's mode (LoRA dropout on) must not reach the teacher
    teacher = lora.AdaptersOff(student)
    assert torch.equal(logits(teacher, IDS), logits(base, IDS))  # bitwise
    assert (logits(student.eval(), IDS) - logits(base, IDS)).abs().max() > 1e-2  # the adapters do change it
    student.train()
    teacher(input_ids=torch.tensor([IDS]))
    assert student.training  # the student's own mode is restored
    assert list(teacher.parameters()) == []  # no second copy of the weights
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not student.get_output_embeddings().weight.requires_grad  # the output layer stays frozen


def test_plain_weights_are_the_merged_model(tiny_student):
    from opcd_cli import lora

    student = trained_adapters(tiny_student).eval()
    plain = load_plain(tiny_student)
    weights = dict(lora.plain_weights(student))
    assert set(weights) == {n for n, _ in plain.named_parameters(remove_duplicate=False)}
    plain.load_state_dict(weights, strict=False)
    torch.testing.assert_close(logits(plain, IDS), logits(student, IDS), rtol=0, atol=1e-5)
    before = {n: p.clone() for n, p in student.named_parameters()}
    list(lora.plain_weights(student))
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())  # the live model is untouched


def test_targets_that_match_nothing_are_a_one_line_error(tiny_student):
    from opcd_cli import lora
    from opcd_cli.errors import OpcdError

    with pytest.raises(OpcdError, match="--lora-targets nope_proj: .*linear layers are .*q_proj"):
        lora.add_adapters(load_plain(tiny_student), 4, None, 0.0, "nope_proj")


def test_lora_run_saves_an_adapter_and_a_merged_model_that_load_without_opcd(cli, tiny_student, toy_files, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "run"
    code, stdout, err = cli(*lora_args(tiny_student, toy_files, out, "--save-every", "1", "--json"))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["teacher"].endswith("with the adapters off") and summary["lora"]["rank"] == 4
    # the merged folder is a plain model; the adapter folder loads onto the base with PEFT: the same model
    merged = load_plain(out)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_student.resolve()) and adapter["r"] == 4
    peft_model = PeftModel.from_pretrained(load_plain(adapter["base_model_name_or_path"]), out / "adapter").eval()
    torch.testing.assert_close(logits(merged, IDS), logits(peft_model, IDS), rtol=0, atol=1e-5)
    base = load_plain(tiny_student)
    assert (logits(merged, IDS) - logits(base, IDS)).abs().max() > 1e-3  # training changed it
    # only adapted matrices changed: the embeddings and norms are the base model's, bit for bit
    saved, original = load_file(out / "model.safetensors"), load_file(tiny_student / "model.safetensors")
    assert saved.keys() == original.keys()
    for name in saved:
        if "proj" not in name:
            assert torch.equal(saved[name], original[name]), name
    assert any(not torch.equal(saved[n], original[n]) for n in saved if "proj" in n)
    # checkpoints are adapters; opcd eval scores an adapter folder as the merged model
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    scores = {}
    for target in (out, out / "adapter"):
        code, stdout, err = cli("eval", "--model", target, "--data", toy_files["test"], "--context",
                                toy_files["context"], "--max-new-tokens", "4", "--json")
        assert code == 0, err
        scores[target.name] = json.loads(stdout)
    assert scores["run"]["accuracy"] == scores["adapter"]["accuracy"] == summary["after"]["accuracy"]
    assert scores["run"]["accuracy_with_context"] == scores["adapter"]["accuracy_with_context"]
    code, stdout, err = cli("eval", "--model", out, "--best", "2", "--data", toy_files["test"],
                            "--max-new-tokens", "4", "--json")
    assert code == 0 and len(json.loads(stdout)["checkpoints"]) == 2, err


def test_no_merge_keeps_the_adapter_only_and_eval_still_reads_the_run(cli, tiny_student, toy_files, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(*lora_args(tiny_student, toy_files, out, "--no-merge", "--json"))
    assert code == 0, err
    assert not (out / "model.safetensors").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    code, evaluated, err = cli("eval", "--model", out, "--data", toy_files["test"], "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(evaluated)["accuracy"] == json.loads(stdout)["after"]["accuracy"]


def test_a_lora_run_resumes_exactly(cli, tiny_student, toy_files, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli(*lora_args(tiny_student, toy_files, whole, "--save-every", "1"))[0] == 0
    short = lora_args(tiny_student, toy_files, part, "--save-every", "1")
    short[short.index("--steps") + 1] = "2"
    assert cli(*short)[0] == 0
    state = part / "state"
    assert {p.name for p in state.iterdir()} >= {"trainable.safetensors"}
    from safetensors.torch import load_file

    assert all(".lora_" in name for name in load_file(state / "trainable.safetensors"))  # adapters only: small
    code, _, err = cli("distill", "--resume", part, "--steps", "3")
    assert code == 0, err

    def rows(run):
        return [{k: r[k] for k in ("step", "loss", "topk_mass", "response_tokens", "grad_norm")}
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert rows(part) == rows(whole)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(whole / name), load_file(part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_works_with_the_consistency_regulariser_and_off_policy(cli, tiny_student, toy_files, tmp_path):
    code, stdout, err = cli(*lora_args(tiny_student, toy_files, tmp_path / "c", "--consistency-weight", "0.5",
                                       "--json"))
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:  # the term is on (a top-k KL without renormalising can be below 0) and is in the loss
        assert m["consistency_loss"] != 0 and m["loss"] == pytest.approx(m["distill_loss"] + m["consistency_loss"])
    code, stdout, err = cli(*lora_args(tiny_student, toy_files, tmp_path / "o", "--mode", "off-policy", "--json"))
    assert code == 0, err
    assert json.loads(stdout)["rollouts"] == "teacher"


def test_bad_lora_settings_change_nothing(cli, tiny_student, toy_files, tmp_path):
    before = tree(tmp_path)
    for extra, message in ((["--lora-rank", "0"], "lora_rank must be at least 1"),
                           (["--lora-rank", "-3"], "lora_rank must be at least 1"),
                           (["--lora-alpha", "8"], "lora_alpha sets up a LoRA student; give lora_rank too"),
                           (["--lora-rank", "4", "--lora-dropout", "1.5"], "lora_dropout must be in [0, 1)"),
                           (["--lora-rank", "4", "--lora-targets", "nope_proj"], "--lora-targets nope_proj")):
        args = lora_args(tiny_student, toy_files, tmp_path / "run", *extra, rank=None)
        code, stdout, err = cli(*args)
        assert code == 2 and stdout == "" and message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before


@pytest.mark.slow  # a 60-step toy run, scored on a quarter of the test split
def test_the_toy_lora_recipe_internalises_the_context(cli, tmp_path):
    from conftest import write_jsonl
    from opcd_cli import sources

    test = write_jsonl(tmp_path / "test.jsonl", sources.rows("toy:codes/test")[:64])
    ood = write_jsonl(tmp_path / "ood.jsonl", sources.rows("toy:codes/ood")[:16])
    code, stdout, err = cli("distill", "--recipe", "toy-codes-lora", "--eval-data", test, "--ood-data", ood,
                            "-o", tmp_path / "run", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    before, after = summary["before"], summary["after"]
    assert before["accuracy"] < 0.3  # the student does not know the codes without the items
    assert after["accuracy"] >= before["teacher_accuracy_with_context"] - 0.10  # ... and then it does
    assert summary["teacher"] == "toy:small with the adapters off"
    plain = load_plain(tmp_path / "run")
    total = sum(p.numel() for p in plain.parameters())
    # only the adapters train: rank x (in + out) for every linear layer but the output layer (rank 16 here)
    adapted = [m for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert summary["trainable_parameters"] == 16 * sum(m.in_features + m.out_features for m in adapted) < 0.2 * total


def test_an_adapter_on_a_tied_output_layer_is_refused_and_on_an_untied_one_merges_exactly(tiny_student):
    """A tied output layer is the input embeddings too: an adapter on it would be merged into both, so it is
    refused. On a model whose output layer is its own matrix, the merged model gives the adapted model's logits.
    A rank above a layer's smaller side is refused too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from opcd_cli import lora
    from opcd_cli.errors import OpcdError

    with pytest.raises(OpcdError, match=r"output layer is its input embeddings \(tied weights\)"):
        lora.add_adapters(load_plain(tiny_student), 4, None, 0.0, "lm_head,q_proj")
    with pytest.raises(OpcdError, match=r"--lora-rank 64 is above the width of k_proj \(16\)"):
        lora.add_adapters(load_plain(tiny_student), 64, None, 0.0, "all-linear")
    config = AutoConfig.from_pretrained(tiny_student)
    config.tie_word_embeddings = False
    torch.manual_seed(3)
    untied = AutoModelForCausalLM.from_config(config).eval()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    model = lora.add_adapters(untied, 4, None, 0.0, "lm_head,q_proj")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    adapted = logits(model, IDS)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, IDS), adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)  # the input side untouched
