"""`scripts/bench.py`'s benchmarks, one module per benchmarked step behind one harness
(`harness.py`: subprocess runs with --json summaries, peak memory, spawned children, interleaved
rounds) and one set of bench models (`shapes.py`). A new benchmark is a module with a
`register(subparsers)` that adds its parser with `set_defaults(func=...)`, listed in `STEPS`."""

STEPS = ("quantize", "eval", "finetune", "auto_opt", "infer", "chat", "serve", "sequence_start",
         "chain")
