"""The benchmarks, one module per question, each run as ``python -m benchmarks.<name>`` from the
repository root. ``benchmarks/results/README.md`` is the index: each experiment's question, command,
current result and status. Run trees (audio, labels, checkpoints) go under ``outputs/benchmarks/``
by default; only tables and figures are committed, under ``benchmarks/results/``."""
