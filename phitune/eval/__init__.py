"""`phitune eval`: held-out loss / perplexity and latency of any step's output, split as
`infer/` is: `options.py` (the options, light for `--help`), `step.py` (`run`, the bounds),
`inputs.py` (what is scored), and one module per runtime: `torch_model.py`, `onnx_model.py`."""
