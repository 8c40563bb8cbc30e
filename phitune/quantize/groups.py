"""Which int4 group sizes a model allows, and the default that fits it.

A group of input channels shares one scale and zero point, so a group size must divide the
in-features of every quantized linear: hidden_size (q/k/v, gate/up), the attention output
width num_attention_heads × head_dim (o_proj) and intermediate_size (down_proj). 128, the
usual default, does not fit every model: SmolLM2-135M's hidden_size is 576 = 4.5 × 128.
"""

from __future__ import annotations


def quantized_widths(config: dict) -> dict[str, int]:
    """name → in-features width of the quantized linears, from a config.json dict."""
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = {"hidden_size": hidden, "intermediate_size": config.get("intermediate_size"),
              "num_attention_heads × head_dim": heads * head_dim if heads and head_dim else None}
    return {name: int(width) for name, width in widths.items() if width}


def misfit(config: dict, size: int) -> tuple[str, int] | None:
    """The first quantized width `size` does not divide, as (name, width); None if it fits."""
    return next(((n, w) for n, w in quantized_widths(config).items() if w % size), None)


def choose(config: dict, candidates: tuple[int, ...]) -> tuple[int | None, str]:
    """The first of `candidates` dividing every quantized width, and why the ones before it
    did not (for the summary and the manifest). (None, why) when none fits."""
    skipped = []
    for size in candidates:
        bad = misfit(config, size)
        if bad is None:
            return size, ("default" if not skipped else
                          f"default; {'; '.join(skipped)}")
        skipped.append(f"{size} does not divide {bad[0]} {bad[1]}")
    return None, "; ".join(skipped)
