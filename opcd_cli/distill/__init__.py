"""Context distillation, one module per phase of a run.

    opcd distill --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --context exp.txt --data train.jsonl

Each step (on-policy, the default): the student answers a batch of prompts WITHOUT the context; the frozen
teacher scores the same tokens WITH the context in front; the student descends the mean over response tokens
of the top-k reverse KL(student || teacher), plus, with ``--consistency-weight``, the context-removability
term and, with ``--anchor-weight``, the in-context anchor; the sampler follows the new weights. The step's
top-k mass is watched (``escape.py``). Off-policy (the paper's baseline), the responses are the teacher's
own, written once with the context, and the loss a forward KL over the teacher's saved top-k (or the tokens'
cross-entropy).

The rooms, in the order a run passes through them:

- ``run.py``: ``distill()``, the one entry point, and the lifecycle read top to bottom
- ``setup.py``: loading and every check that runs before anything is written; builds the ``Run``
- ``samplers.py``: which engine serves which model, decided once
- ``teacher_work.py``: a separate teacher's evaluation and the off-policy rollouts
- ``step.py``: one training step (sequences, passes, loss and gradient, the optimiser step)
- ``passes.py``: how sequences become passes (the teacher's cached prefix, packing, micro-batches)
- ``evals.py``: the evaluations before and after
- ``state.py``: saving the student and the training state, checking and restoring them on ``--resume``
- ``report.py``: the prompts shown, the metrics a step, the summary
- ``signals.py``: SIGINT and SIGTERM during a run
- ``records.py``: the records the phases hand on (``Models``, ``Run``, ``Training``)
"""

from .run import distill

__all__ = ["distill"]
