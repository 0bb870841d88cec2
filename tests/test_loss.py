"""Packing, the heads read from a model's forward, and the distillation losses on tiny models."""

import pytest
import torch

from opcd_cli import models
from opcd_cli.kernels.naive import naive_entropy, naive_topk_kl, topk_ids
from opcd_cli.forward import logits_are_linear, with_head
from opcd_cli.loss import DistillLoss
from opcd_cli.micro_batches import pack


def final_hidden(model, packed):
    return with_head(model, packed, True, lambda head: head.hidden_NH)


def response_logits(model, packed):
    return with_head(model, packed, False, lambda head: head.logits_NV)


def test_pack_points_at_the_positions_that_predict_each_response_token():
    packed = pack([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0, device="cpu")
    assert packed.input_ids_BT.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert packed.attention_BT.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # token 9 is predicted at position 2 (after 7), token 11 at position 0 (after 8)
    assert list(zip(packed.rows_N.tolist(), packed.cols_N.tolist())) == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    ids = packed.input_ids_BT[packed.rows_N, packed.cols_N + 1]
    assert ids.tolist() == [9, 10, 11, 12, 13]


def test_hidden_states_times_the_output_layer_are_the_logits(tiny_student):
    model = models.load_model(str(tiny_student))
    packed = pack([[1, 20, 21], [1, 22]], [[30, 31, 2], [32]], pad_id=0, device="cpu")
    hidden = final_hidden(model, packed)
    logits = response_logits(model, packed)
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits, rtol=1e-4, atol=1e-4)
    # and they match a plain forward pass, one sequence at a time
    full = model(input_ids=torch.tensor([[1, 20, 21, 30, 31, 2]])).logits[0, 2:5]
    torch.testing.assert_close(logits[:3], full, rtol=1e-4, atol=1e-4)
    assert logits_are_linear(model)


def test_the_fused_head_is_read_inside_the_output_layers_forward(tiny_student):
    """The loss sees the output layer's weight while the layer's own forward runs (where a sharded model's
    hooks have gathered it), and the layer is itself again afterwards."""
    model = models.load_model(str(tiny_student))
    layer = model.get_output_embeddings()
    events = []
    pre = layer.register_forward_pre_hook(lambda module, args: events.append("layer forward begins"))
    post = layer.register_forward_hook(lambda module, args, out: events.append("layer forward ends"))
    packed = pack([[1, 20, 21]], [[30, 31]], pad_id=0, device="cpu")

    def use(head):
        events.append("loss")
        assert head.weight_VH is layer.weight and head.hidden_NH.shape == (2, layer.weight.shape[1])
        return head.hidden_NH.sum()

    with_head(model, packed, True, use)
    assert events == ["layer forward begins", "loss", "layer forward ends"]
    pre.remove(), post.remove()
    assert "forward" not in vars(layer)  # the replacement was for that call only
    logits = model(input_ids=torch.tensor([[1, 20, 21]])).logits
    assert logits.shape == (1, 3, layer.weight.shape[0])


def _models(tiny_student, tiny_teacher):
    student = models.load_model(str(tiny_student)).train()
    teacher = models.frozen(models.load_model(str(tiny_teacher)))
    return student, teacher


PROMPTS_S, PROMPTS_T = [[1, 20, 21], [1, 22]], [[1, 40, 41, 42, 20, 21], [1, 40, 22]]
RESPONSES = [[30, 31, 2], [32]]


def _grads_of(student, loss):
    student.zero_grad()
    loss.backward()
    return student.get_output_embeddings().weight.grad.clone()


def test_fused_and_logits_paths_agree_with_the_naive_loss(tiny_student, tiny_teacher):
    student, teacher = _models(tiny_student, tiny_teacher)
    s_in, t_in = pack(PROMPTS_S, RESPONSES, 0, "cpu"), pack(PROMPTS_T, RESPONSES, 0, "cpu")
    loss_fn = DistillLoss(student, teacher, vocab=112, topk=8, renorm=False)
    assert loss_fn.fused
    fused = loss_fn.on_policy(s_in, t_in)
    fused_grad = _grads_of(student, fused.total)
    loss_fn.fused = False
    logits = loss_fn.on_policy(s_in, t_in)
    torch.testing.assert_close(fused.total, logits.total, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_grad, _grads_of(student, logits.total), rtol=1e-3, atol=1e-5)

    with torch.no_grad():
        z_s, z_t = response_logits(student, s_in)[:, :112], response_logits(teacher, t_in)[:, :112]
        expected = naive_topk_kl(z_s, z_t, k=8, reduction="sum")
    torch.testing.assert_close(fused.distill, expected, rtol=1e-4, atol=1e-5)
    assert 0 < float(fused.topk_mass) <= 1 and float(fused.consistency) == 0
    # the entropies the trainer logs: the student's and the teacher's over the shared vocabulary, mean per token
    for parts in (fused, logits):
        torch.testing.assert_close(parts.entropies[0], naive_entropy(z_s).mean(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.entropies[1], naive_entropy(z_t).mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", ["tail", "union"])
def test_a_loss_option_reaches_the_loss_on_both_paths(tiny_student, tiny_teacher, option):
    """``tail`` (the mass outside the top-k one more bucket) and ``union`` (the student's and the teacher's top-k
    ids): the distillation term is the naive top-k KL with that option, fused and from logits alike, and differs
    from the loss without it."""
    student, teacher = _models(tiny_student, tiny_teacher)
    s_in, t_in = pack(PROMPTS_S, RESPONSES, 0, "cpu"), pack(PROMPTS_T, RESPONSES, 0, "cpu")
    loss_fn = DistillLoss(student, teacher, vocab=112, topk=8, renorm=False, **{option: True})
    fused = loss_fn.on_policy(s_in, t_in)
    fused_grad = _grads_of(student, fused.total)
    loss_fn.fused = False
    logits = loss_fn.on_policy(s_in, t_in)
    torch.testing.assert_close(fused_grad, _grads_of(student, logits.total), rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        z_s, z_t = response_logits(student, s_in)[:, :112], response_logits(teacher, t_in)[:, :112]
        expected = naive_topk_kl(z_s, z_t, k=8, reduction="sum", **{option: True})
        without = naive_topk_kl(z_s, z_t, k=8, reduction="sum")
    for parts in (fused, logits):
        torch.testing.assert_close(parts.distill, expected, rtol=1e-4, atol=1e-5)
    assert abs(float(expected - without)) > 1e-3


def test_consistency_term_is_kl_from_the_frozen_no_context_student_to_the_with_context_one(tiny_student, tiny_teacher):
    student, teacher = _models(tiny_student, tiny_teacher)
    s_in, t_in = pack(PROMPTS_S, RESPONSES, 0, "cpu"), pack(PROMPTS_T, RESPONSES, 0, "cpu")
    c_in = pack(PROMPTS_T, RESPONSES, 0, "cpu")  # the student's own view with the context
    weight = 0.5
    parts = DistillLoss(student, teacher, vocab=112, topk=8, renorm=False, consistency_weight=weight).on_policy(s_in, t_in, c_in)
    got = _grads_of(student, parts.total)

    # independently: the naive top-k KL with the no-context logits held fixed, autograd through the rest
    z_s = response_logits(student, s_in)[:, :112]
    z_t = response_logits(teacher, t_in)[:, :112].detach()
    z_c = response_logits(student, c_in)[:, :112]
    p = torch.log_softmax(z_s.detach(), -1)
    ids = topk_ids(z_s.detach(), 8)
    consistency = (p.gather(1, ids).exp() * (p.gather(1, ids) - torch.log_softmax(z_c, -1).gather(1, ids))).sum()
    expected = naive_topk_kl(z_s, z_t, k=8, reduction="sum") + weight * consistency
    torch.testing.assert_close(parts.total, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts.consistency, weight * consistency.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, _grads_of(student, expected), rtol=1e-3, atol=1e-5)


def test_anchor_term_is_the_reverse_kl_from_the_with_context_student_to_the_teacher(tiny_student, tiny_teacher):
    """``anchor_weight``: plus that weight times the top-k reverse KL(student with the context || teacher), the
    teacher fixed; with the regulariser on too, both terms ride on the one with-context pass."""
    student, teacher = _models(tiny_student, tiny_teacher)
    s_in, t_in = pack(PROMPTS_S, RESPONSES, 0, "cpu"), pack(PROMPTS_T, RESPONSES, 0, "cpu")
    c_in = pack(PROMPTS_T, RESPONSES, 0, "cpu")
    for consistency in (0.0, 0.5):
        loss_fn = DistillLoss(student, teacher, vocab=112, topk=8, renorm=False, consistency_weight=consistency,
                              anchor_weight=2.0)
        parts = loss_fn.on_policy(s_in, t_in, c_in)
        got = _grads_of(student, parts.total)
        z_s = response_logits(student, s_in)[:, :112]
        z_t = response_logits(teacher, t_in)[:, :112].detach()
        z_c = response_logits(student, c_in)[:, :112]
        anchor = naive_topk_kl(z_c, z_t, k=8, reduction="sum")
        regulariser = naive_topk_kl(z_s.detach(), z_c, k=8, reduction="sum")
        expected = naive_topk_kl(z_s, z_t, k=8, reduction="sum") + 2.0 * anchor + consistency * regulariser
        torch.testing.assert_close(parts.total, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.anchor, 2.0 * anchor.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parts.consistency, consistency * regulariser.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, _grads_of(student, expected), rtol=1e-3, atol=1e-5)
        assert float(parts.anchor) > 0


def test_off_policy_sft_target_is_the_token_cross_entropy(tiny_student):
    student = models.load_model(str(tiny_student)).train()
    loss_fn = DistillLoss(student, None, vocab=112, topk=8, renorm=False)
    s_in = pack(PROMPTS_S, RESPONSES, 0, "cpu")
    targets = torch.tensor([t for r in RESPONSES for t in r])
    parts = loss_fn.off_policy(s_in, targets[:, None], torch.zeros(len(targets), 1))
    logits = response_logits(student, s_in)[:, :112]
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(parts.total, expected, rtol=1e-4, atol=1e-5)
