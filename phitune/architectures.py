"""The model families phitune supports, one record each: everything a step needs to know
about an architecture lives here, so adding a family is one record (plus a norm kind when its
normalisation differs) and its tests.

Module names are relative to one decoder layer unless said otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phitune.errors import UnsupportedModelError

# How a norm applies its weight, which decides how AWQ folds a scale s into it:
#   "rms":          y = w · x / rms(x)        → w' = w / s
#   "rms_one_plus": y = (1 + w) · x / rms(x)  → w' = (1 + w) / s − 1   (Gemma)
NORM_KINDS = ("rms", "rms_one_plus")


@dataclass(frozen=True)
class ScaleGroupSpec:
    """Where AWQ may move a scale: `prev` produces the channels `linears` read."""

    name: str
    prev: str                    # a norm, or a linear whose output rows are scaled by 1/s
    linears: tuple[str, ...]     # consumers whose input columns are scaled by s
    inspect: str                 # module whose output error the search minimises
    prev_piece: str | None = None  # `prev` is fused: only the rows of this piece (see piece_sizes)
    per_kv_head: bool = False    # prev produces value heads, each read by several query heads


def _llama_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[ScaleGroupSpec, ...]:
    return (
        ScaleGroupSpec("attn_in", "input_layernorm",
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroupSpec("attn_out", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj",
                       per_kv_head=True),
        ScaleGroupSpec("mlp_in", mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroupSpec("mlp_out", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )


_SEPARATE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The projections onnxruntime-genai's builder writes (q/k/v packed, gate/up split), as graph slots.
_BUILDER_SLOTS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class BuilderConfig:
    """What onnxruntime-genai's model builder needs added to the transformers config it loads,
    because it reads some settings in transformers 4's layout. Paths are dotted, into that
    config as transformers 5 loads it (so a checkpoint saved in either layout resolves the same);
    phitune sets the attributes in the builder's process only (export/builder_child.py), on the
    config it builds the graph from; the checkpoint and the weights it loads are untouched."""

    attrs: tuple[tuple[str, str], ...]          # builder's config attribute ← path
    agree: tuple[tuple[str, str], ...] = ()     # paths that must hold equal values ...
    refusal: str = ""                           # ... because of this, said when they differ


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]          # config.architectures[0] values
    model_type: str                   # config.model_type
    scale_groups: tuple[ScaleGroupSpec, ...]
    lora_targets: tuple[str, ...]     # default --target_modules (leaf names)
    norm: str = "rms"                 # one of NORM_KINDS, for every norm a scale folds into
    builder_slots: tuple[str, ...] = _BUILDER_SLOTS
    layers: str = "model.layers"      # paths from the causal LM
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    builder_config: BuilderConfig | None = None   # None: the builder reads the config as is
    notes: str = field(default="", compare=False)


# onnxruntime-genai 0.18's Gemma 3 builder reads one flat rope_parameters (its rope_type, and
# any scaling factor), rope_theta for the global layers and rope_local_base_freq for the
# sliding-window ones; transformers 5 nests rope_parameters per layer type. It builds the local
# cos/sin cache with the global layers' scaling factor too, so both must agree (Gemma 3 1B and
# 270M scale neither; the larger ones scale global RoPE linearly, which it would build wrongly).
_GEMMA3_BUILDER = BuilderConfig(
    attrs=(("rope_parameters", "rope_parameters.full_attention"),
           ("rope_theta", "rope_parameters.full_attention.rope_theta"),
           ("rope_local_base_freq", "rope_parameters.sliding_attention.rope_theta")),
    agree=(("rope_parameters.full_attention.rope_type", "rope_parameters.sliding_attention.rope_type"),
           ("rope_parameters.full_attention.factor", "rope_parameters.sliding_attention.factor")),
    refusal="onnxruntime-genai 0.18's builder gives the sliding-window layers the global "
            "layers' RoPE scaling, which would build a wrong model")

FAMILIES: tuple[Family, ...] = (
    Family("phi3", ("Phi3ForCausalLM",), "phi3", (
        ScaleGroupSpec("attn_in", "input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroupSpec("attn_out", "self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj",
                       prev_piece="v", per_kv_head=True),
        ScaleGroupSpec("mlp_in", "post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ScaleGroupSpec("mlp_out", "mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj",
                       prev_piece="up"),
    ), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused: four cover every projection
        notes="q/k/v and gate/up fused"),
    Family("llama", ("LlamaForCausalLM",), "llama", _llama_groups(), _SEPARATE),
    # Measured (og 0.18, window 64): the builder writes genai_config sliding_window.layers []
    # for Mistral, so past `sliding_window` tokens the graph attends to every token while
    # PyTorch keeps to the window (log-probs 0.27 apart at 100 tokens; equal below 64).
    # Qwen2 with use_sliding_window and Gemma 3 get windowed layers, and then their KV cache
    # must hold at least the window (genai_config.min_kv_tokens).
    Family("mistral", ("MistralForCausalLM",), "mistral", _llama_groups(), _SEPARATE,
           notes="graph has no sliding window (builder drops it)"),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", _llama_groups(), _SEPARATE,
           notes="q/k/v biases"),
    Family("qwen3", ("Qwen3ForCausalLM",), "qwen3", _llama_groups(), _SEPARATE,
           notes="per-head q_norm/k_norm after q/k_proj (outputs; no scale folds into them)"),
    # Gemma 3: every norm is (1 + w); the attention and MLP outputs have their own post-norms,
    # so the MLP reads pre_feedforward_layernorm, not post_attention_layernorm.
    Family("gemma3", ("Gemma3ForCausalLM",), "gemma3_text",
           _llama_groups(mlp_norm="pre_feedforward_layernorm"), _SEPARATE, norm="rms_one_plus",
           builder_config=_GEMMA3_BUILDER,
           notes="embeddings × √hidden, tied, sliding-window layers"),
)

BY_CLASS = {cls: family for family in FAMILIES for cls in family.classes}
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}
SUPPORTED_CLASSES = tuple(BY_CLASS)


def family(arch: str | None, where: str = "config.json") -> Family:
    """The record of a config's architectures[0]; an unknown one is refused in one line."""
    if arch not in BY_CLASS:
        raise UnsupportedModelError(f"architecture {arch or 'unknown'} is not supported", where,
                                    f"supported: {', '.join(SUPPORTED_CLASSES)}")
    return BY_CLASS[arch]


def family_of_config(config) -> Family | None:
    """The record of a transformers config (or config.json dict), None when unknown."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    archs = get("architectures") or []
    if archs and archs[0] in BY_CLASS:
        return BY_CLASS[archs[0]]
    return BY_MODEL_TYPE.get(get("model_type"))


# A fused projection's output rows, in order, as pieces.
FUSED_PIECES = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}


def piece_sizes(config: dict) -> dict[str, tuple[int, int]]:
    """(out rows, in features) of each projection piece (q, k, v, o, gate, up, down)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config["intermediate_size"]
    return {"q": (heads * head_dim, hidden), "k": (kv * head_dim, hidden),
            "v": (kv * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


def piece_offsets(pieces: tuple[str, ...], sizes: dict) -> dict[str, tuple[int, int]]:
    """piece → (first row, rows) inside a module made of `pieces`."""
    offsets, row = {}, 0
    for piece in pieces:
        offsets[piece] = (row, sizes[piece][0])
        row += sizes[piece][0]
    return offsets
