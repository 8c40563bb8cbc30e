"""Where LoRA can attach: the graph's projection MatMuls ("slots") and the Hugging Face
modules whose output rows they compute.

The model builder packs and splits projections its own way (q/k/v fused into `qkv_proj`,
Phi-3's `gate_up_proj` split into `gate_proj` and `up_proj`), while a PEFT adapter is keyed
by the Hugging Face module names. Both sides are described as runs of named row *pieces*
(q, k, v, o, gate, up, down); a slot's LoRA weights are then the adapter's pieces placed
at the right rows, whatever the packing on either side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from phitune.architectures import family, family_of_config, piece_offsets, piece_sizes

__all__ = ["GRAPH_SLOT_PIECES", "HF_MODULE_PIECES", "PIECE_INPUT", "Slot", "graph_slots",
           "piece_offsets", "piece_sizes", "predicted_layout"]

# Graph slot (as the builder names it, relative to a layer) → the pieces of its output rows.
GRAPH_SLOT_PIECES = {
    "attn.qkv_proj": ("q", "k", "v"),
    "attn.q_proj": ("q",), "attn.k_proj": ("k",), "attn.v_proj": ("v",),
    "attn.o_proj": ("o",),
    "mlp.gate_up_proj": ("gate", "up"),
    "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",),
    "mlp.down_proj": ("down",),
}

# Hugging Face module (relative to a decoder layer) → the pieces of its output rows.
HF_MODULE_PIECES = {
    "self_attn.qkv_proj": ("q", "k", "v"),
    "self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",), "self_attn.v_proj": ("v",),
    "self_attn.o_proj": ("o",),
    "mlp.gate_up_proj": ("gate", "up"),
    "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",),
    "mlp.down_proj": ("down",),
}

# Which input each piece reads, so a slot's pieces always share one input.
PIECE_INPUT = {"q": "hidden", "k": "hidden", "v": "hidden", "o": "attn",
               "gate": "hidden", "up": "hidden", "down": "mlp"}

_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/(MatMul|MatMulNBits)$")


@dataclass(frozen=True)
class Slot:
    """One projection MatMul of one layer that can carry a LoRA branch."""

    layer: int
    name: str          # e.g. "attn.qkv_proj"
    node: str          # the graph node's name
    in_features: int
    out_features: int

    @classmethod
    def of(cls, layer: int, name: str, sizes: dict, node: str = "") -> "Slot":
        """The slot `name` of `layer` with its shape from the piece sizes."""
        pieces = GRAPH_SLOT_PIECES[name]
        return cls(layer, name, node, sizes[pieces[0]][1], sum(sizes[p][0] for p in pieces))

    @property
    def input_a(self) -> str:
        return f"model.layers.{self.layer}.{self.name}.lora_A"

    @property
    def input_b(self) -> str:
        return f"model.layers.{self.layer}.{self.name}.lora_B"

    @property
    def rank_dim(self) -> str:
        # One symbolic rank per slot: a shared one breaks adapters on a subset of modules.
        return f"lora_r_{self.layer}_{self.name.replace('.', '_')}"

    @property
    def pieces(self) -> tuple[str, ...]:
        return GRAPH_SLOT_PIECES[self.name]


def graph_slots(nodes, sizes: dict) -> list[Slot]:
    """The LoRA-capable projections among `nodes` (onnx NodeProtos) of a builder graph."""
    slots = []
    for node in nodes:
        match = _NODE.match(node.name)
        if not match or f"{match[2]}.{match[3]}" not in GRAPH_SLOT_PIECES:
            continue
        slots.append(Slot.of(int(match[1]), f"{match[2]}.{match[3]}", sizes, node.name))
    return slots


def predicted_layout(config: dict) -> tuple[list[Slot], dict, str]:
    """The slots, piece sizes and dtype `add_lora_inputs` will give the graph of `config`."""
    sizes = piece_sizes(config)
    # The projections the builder writes for this family (architectures.py: q/k/v packed,
    # gate/up split), to check an adapter before spending a build on it.
    record = family_of_config(config) or family((config.get("architectures") or [None])[0])
    names = record.builder_slots
    slots = [Slot.of(layer, name, sizes) for layer in range(config["num_hidden_layers"])
             for name in names]
    return slots, sizes, "float"
