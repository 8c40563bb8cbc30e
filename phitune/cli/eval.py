"""`phitune eval`: held-out loss / perplexity and latency of any artifact, on the same data."""

from __future__ import annotations

from phitune import options, registry


@options.command("eval", registry.step("eval").options)
def eval_(**kwargs) -> None:
    """Measure a model: eval loss / perplexity on held-out data, and latency. Writes nothing.

    \b
      phitune eval -m models/tiny/awq                     # ppl on the shipped held-out text
      phitune eval -m models/phi/ft --data_files data/travel.jsonl --data_name json \\
        --text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>" \\
        --eval_split 0.1 --max_seq_len 256               # finetune's eval loss, same records
      phitune --json eval -m models/phi/onnx --max_ppl 20 --max_latency_ms 50
    """
    from phitune import ui
    from phitune.errors import ConstraintError
    from phitune.eval.step import run

    title = f"eval {kwargs['model']}"
    try:
        metrics = run(registry.step("eval").make(kwargs))
    except ConstraintError as exc:
        ui.summary(title, exc.metrics)
        raise
    ui.summary(title, metrics)


command = eval_  # the name phitune.cli.main looks up for a registered step
