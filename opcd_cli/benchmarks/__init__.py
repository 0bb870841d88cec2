"""The benchmarks ``opcd bench`` runs: the loss providers and their float64 references (``loss_providers.py``),
``opcd bench loss`` (``loss_bench.py``, CPU peak memory in ``cpu_memory.py``), ``opcd bench step``
(``step_bench.py``), ``opcd bench run`` (``run_bench.py``), the machine's facts, timing statistics and peak
memory (``machine.py``), and baselines with the gate (``gate.py``)."""
