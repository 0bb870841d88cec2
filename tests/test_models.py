import pytest
import torch

from opcd_cli import models
from opcd_cli.errors import OpcdError
from opcd_cli.toy.tokenizer import build_tokenizer


def test_loads_a_local_checkpoint(tiny_student):
    model = models.load_model(str(tiny_student))
    tok = models.load_tokenizer(str(tiny_student))
    assert model.config.model_type == "qwen3" and not model.training
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "a/b/c"])
def test_unknown_local_paths_fail_fast(name):
    with pytest.raises(OpcdError, match="does not exist"):
        models.load_model(name)


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(OpcdError, match="is a file"):
        models.load_tokenizer(str(tmp_path / "weights.bin"))


def test_padded_output_layers_share_the_smaller_size(tiny_student, tiny_teacher):
    student, teacher = models.load_model(str(tiny_student)), models.load_model(str(tiny_teacher))
    tok = models.load_tokenizer(str(tiny_student))
    assert (models.output_rows(student), models.output_rows(teacher)) == (112, 128)
    assert models.shared_vocab_size(student, teacher, tok, "s", "t") == 112


def test_different_vocabularies_are_refused():
    a, b = build_tokenizer(), build_tokenizer()
    models.check_same_vocabulary(a, b, "a", "b")
    b.add_tokens(["<|extra|>"])
    with pytest.raises(OpcdError, match=r"vocabularies of a and b differ in 1 tokens"):
        models.check_same_vocabulary(a, b, "a", "b")


def test_frozen_copy_is_independent(tiny_student):
    student = models.load_model(str(tiny_student))
    teacher = models.frozen_copy(student)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


def test_pickled_weights_load_only_when_allowed(tiny_student, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin-model"
    folder.mkdir()
    torch.save(load_file(tiny_student / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "config.json").write_bytes((tiny_student / "config.json").read_bytes())
    with pytest.raises(OpcdError, match="has only pickled weights"):
        models.load_model(str(folder))
    loaded = models.load_model(str(folder), allow_bin_weights=True)
    reference = models.load_model(str(tiny_student))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
