"""Run by ``torchrun`` from ``test_distributed.py``: sharded models against their unsharded twins, on each rank.

* the fused loss and its gradients on an FSDP2-sharded student (the output layer read inside the root's forward)
  equal those of the same model unsharded, on the same tokens, with and without the consistency pass, and
  through a sharded teacher;
* the weights a sampler receives from a sharded student (gathered parameter by parameter) equal the unsharded
  parameters exactly, under every name (the tied output layer too);
* the whole state dict gathered for saving equals the unsharded one;
* micro-batches by token budget: sequences packed in one row through the sharded models give the padded
  unsharded loss and gradients, and ranks that group their sequences into different numbers of micro-batches
  split to the same number (their sharded passes gather together).

Prints ``checks passed`` on rank 0 when every check held; any failure raises.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from opcd_cli import distributed, lora, models, sources
    from opcd_cli.loss import DistillLoss
    from opcd_cli.micro_batches import pack, pack_rows

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

        # the losses are made before sharding, as training makes them: FSDP2 (torch 2.13) keeps adding a root's
        # earlier gradients into later ones when the first forward after sharding runs without gradients
        plain_loss = DistillLoss(plain, teacher_plain, vocab, 8, False, 0.5, "torch")
        sharded_loss = DistillLoss(sharded, teacher_sharded, vocab, 8, False, 0.5, "torch")
        assert plain_loss.fused and sharded_loss.fused, "the toy's output layer is linear: the fused path must be taken"

        def loss_and_grads(loss, packed=lambda p, r: pack(p, r, 0, "cpu")):
            student = loss.student
            student.zero_grad(set_to_none=True)
            parts = loss.on_policy(packed(prompts, responses), packed(contexts, responses), packed(contexts, responses))
            parts.total.backward()
            grads = {n: distributed.whole(p.grad).clone() for n, p in student.named_parameters()}
            return parts.total.detach(), parts.consistency, grads

        expected = loss_and_grads(plain_loss)
        distributed.shard(sharded, torch.float32)
        distributed.shard(teacher_sharded, torch.float32)
        got = loss_and_grads(sharded_loss)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
        assert expected[1] > 0, "the consistency pass must contribute"
        assert got[2].keys() == expected[2].keys()
        for name in expected[2]:
            torch.testing.assert_close(got[2][name], expected[2][name], rtol=1e-5, atol=1e-7, msg=name)
        # packed in a row: the sums in another order, so compared as training uses them, per response token
        flat = loss_and_grads(sharded_loss, lambda p, r: pack_rows(p, r, [len(p)], 0, "cpu"))
        tokens = sum(map(len, responses))
        torch.testing.assert_close(flat[0] / tokens, expected[0] / tokens, rtol=1e-5, atol=1e-5)
        for name in expected[2]:
            torch.testing.assert_close(flat[2][name] / tokens, expected[2][name] / tokens, rtol=1e-5, atol=1e-5,
                                       msg=name)
        check_micro_batch_counts(world)

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


def check_micro_batch_counts(world) -> None:
    """Rank 0's four short sequences fit one micro-batch's row and rank 1's four long ones need a row each: both
    run four micro-batches."""
    from types import SimpleNamespace

    from opcd_cli.config import DistillConfig
    from opcd_cli.distill.passes import micro_batches

    cfg = DistillConfig(student="toy:small", data="toy:codes/train", micro_batch_tokens=200)
    run = SimpleNamespace(cfg=cfg, teacher_prefix=None, packer=SimpleNamespace(packed=True), games=None)
    length = 20 if world.rank == 0 else 90
    views = [SimpleNamespace(student_ids=[1] * length, teacher_ids=[1] * length)] * 4
    batches = micro_batches(run, views, [[2] * (length // 2)] * 4)
    assert len(batches) == 4 and all(weight == 1 for _, weight in batches), batches
    assert sorted(i for b, _ in batches for row in b for i in row) == [0, 1, 2, 3], batches
    # games: rank 0 has one reply to train on and rank 1 four long ones; rank 0 runs three weightless passes
    games = SimpleNamespace(cfg=DistillConfig(student="toy:small", env="doors", batch_size=1), teacher_prefix=None,
                            packer=SimpleNamespace(packed=False), games=object())
    n = 1 if world.rank == 0 else 4
    batches = micro_batches(games, views[:n], [[2] * 10] * n)
    assert [w for _, w in batches] == ([1, 0, 0, 0] if n == 1 else [1] * 4), batches


class Countdown:
    """A game that lasts ``seed % 3 + 1`` turns whatever the replies, won at its end: games of known, different
    lengths (``--env distributed_checks:Countdown``)."""

    def reset(self, seed: int) -> str:
        self.left = seed % 3 + 1
        return f"Turns left: {self.left}"

    def step(self, reply: str):
        self.left -= 1
        return f"Turns left: {self.left}", float(self.left == 0), self.left == 0


if __name__ == "__main__":
    sys.exit(main())
