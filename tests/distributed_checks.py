"""Run by ``torchrun`` from ``test_distributed.py``: sharded models against their unsharded twins, on each rank.

* the fused loss and its gradients on an FSDP2-sharded student (the output layer read inside the root's forward)
  equal those of the same model unsharded, on the same tokens, with and without the consistency pass, and
  through a sharded teacher;
* the weights a sampler receives from a sharded student (gathered parameter by parameter) equal the unsharded
  parameters exactly, under every name (the tied output layer too);
* the whole state dict gathered for saving equals the unsharded one.

Prints ``checks passed`` on rank 0 when every check held; any failure raises.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from opcd_cli import distributed, lora, models, sources
    from opcd_cli.loss import DistillLoss, pack

    with distributed.session() as world:
        assert world.active, "run me under torchrun with at least 2 processes"
        folder = sources.model_folder("toy:small")
        torch.manual_seed(0)
        sharded = models.load_model(folder, "float32")
        plain = models.load_model(folder, "float32")
        teacher_sharded = models.frozen(models.load_model(folder, "float32"))
        teacher_plain = models.frozen(models.load_model(folder, "float32"))
        with torch.no_grad():  # a trained-looking student: not the teacher's weights
            for p, q in zip(sharded.parameters(), plain.parameters()):
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02
                p.add_(noise)
                q.add_(noise)
        # the same ragged batch on every rank: prompts and responses of different lengths
        prompts = [[1, 5, 6, 7, 8, 9], [1, 9, 10]]
        contexts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 9, 10]]
        responses = [[11, 12, 13], [14, 15, 16, 17, 18, 19, 20]]
        vocab = models.output_rows(plain)

        def loss_and_grads(student, teacher):
            loss = DistillLoss(student, teacher, vocab, 8, False, 0.5, "torch")
            assert loss.fused, "the toy's output layer is linear: the fused path must be taken"
            parts = loss.on_policy(pack(prompts, responses, 0, "cpu"), pack(contexts, responses, 0, "cpu"),
                                   pack(contexts, responses, 0, "cpu"))
            parts.total.backward()
            grads = {n: distributed.whole(p.grad).clone() for n, p in student.named_parameters()}
            return parts.total.detach(), parts.consistency, grads

        expected = loss_and_grads(plain, teacher_plain)
        distributed.shard(sharded, torch.float32)
        distributed.shard(teacher_sharded, torch.float32)
        got = loss_and_grads(sharded, teacher_sharded)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
        assert expected[1] > 0, "the consistency pass must contribute"
        assert got[2].keys() == expected[2].keys()
        for name in expected[2]:
            torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-5, atol=1e-7, msg=name)

        # the weights a sampler receives: every name, gathered, bitwise equal
        pushed = dict(lora.plain_weights(sharded))
        reference = dict(plain.named_parameters(remove_duplicate=False))
        assert pushed.keys() == reference.keys(), sorted(set(pushed) ^ set(reference))
        for name, tensor in pushed.items():
            assert not isinstance(tensor, torch.distributed.tensor.DTensor), name
            assert torch.equal(tensor, reference[name].detach()), name

        # the state dict gathered for saving: rank 0 has it whole, the others nothing
        whole = distributed.full_state_dict(sharded)
        if world.main:
            mine = {k: v for k, v in plain.state_dict().items() if k in whole}
            assert whole.keys() == mine.keys() and "lm_head.weight" not in whole  # the tied matrix once
            for name, tensor in whole.items():
                assert torch.equal(tensor, mine[name]), name
        else:
            assert whole == {}
        distributed.barrier()
        if world.main:
            print("checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
