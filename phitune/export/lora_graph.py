"""Multi-LoRA inputs for a model-builder graph: one base model that serves any adapter.

Beside every projection (MatMul or the int4 MatMulNBits the builder wrote) we add
`y = base(x) + (x @ lora_A) @ lora_B`, where lora_A / lora_B are graph inputs whose default
values are empty ([in, 0] and [0, out]): with no adapter fed the branch adds zeros and the
graph *is* the base model; an adapter of any rank on any subset of modules is fed at run
time. The branch is plain float MatMuls, so the adapter runs on exactly the int4 weights
the base holds (AWQ's, when the input was an AWQ checkpoint).

Only the graph proto is rewritten: weights stay in the external data file untouched, so
this costs megabytes of memory whatever the model size.
"""

from __future__ import annotations

import json
from pathlib import Path

from phitune import genai_config
from phitune.errors import InputError
from phitune.export.slots import Slot, graph_slots, piece_sizes

META_SLOTS = "phitune.lora_slots"
META_PIECES = "phitune.lora_pieces"


def _float_type(graph) -> int:
    for output in graph.output:
        if output.name == "logits":
            return output.type.tensor_type.elem_type
    raise InputError("the exported graph has no 'logits' output", "auto-opt",
                     "report this: the model builder's output changed shape")


def add_lora_inputs(model_file: Path, hf_config: dict) -> list[Slot]:
    """Rewrite `model_file` in place with a LoRA branch on every projection; returns the slots."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    sizes = piece_sizes(hf_config)
    slots = {slot.node: slot for slot in graph_slots(graph.node, sizes)}
    if not slots:
        raise InputError("found no projection MatMuls to attach LoRA to", str(model_file),
                         "this architecture's graph is not supported for adapters; use --no-multi_lora")
    elem = _float_type(graph)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        slot = slots.get(node.name)
        if slot is None:
            continue
        x, y = node.input[0], node.output[0]
        base = f"{node.name}/base_output"
        node.output[0] = base
        a_out, b_out = f"{node.name}/lora_A/output_0", f"{node.name}/lora_B/output_0"
        nodes += [helper.make_node("MatMul", [x, slot.input_a], [a_out], name=f"{node.name}/lora_A"),
                  helper.make_node("MatMul", [a_out, slot.input_b], [b_out], name=f"{node.name}/lora_B"),
                  helper.make_node("Add", [base, b_out], [y], name=f"{node.name}/lora_Add")]
        graph.input.extend([
            helper.make_tensor_value_info(slot.input_a, elem, [slot.in_features, slot.rank_dim]),
            helper.make_tensor_value_info(slot.input_b, elem, [slot.rank_dim, slot.out_features])])
        graph.initializer.extend([
            helper.make_tensor(slot.input_a, elem, [slot.in_features, 0], vals=[]),
            helper.make_tensor(slot.input_b, elem, [0, slot.out_features], vals=[])])
    del graph.node[:]
    graph.node.extend(nodes)
    ordered = sorted(slots.values(), key=lambda s: (s.layer, s.name))
    _set_meta(model, META_SLOTS, [[s.layer, s.name, s.in_features, s.out_features] for s in ordered])
    _set_meta(model, META_PIECES, {k: list(v) for k, v in sizes.items()})
    _set_meta(model, "phitune.lora_dtype", TensorProto.DataType.Name(elem).lower())
    onnx.save_model(model, str(model_file))  # external weights stay where they are
    return ordered


def _set_meta(model, key: str, value) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = json.dumps(value)
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)


def read_lora_layout(model_dir: Path) -> tuple[list[Slot], dict, str] | None:
    """The slots, piece sizes and float dtype an auto-opt graph was given, or None for a
    graph without LoRA inputs. Reads only the graph proto, not the weights."""
    import onnx
    model = onnx.load(str(model_dir / genai_config.decoder_file(model_dir)), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if META_SLOTS not in meta:
        return None
    slots = [Slot(layer, name, "", k, n) for layer, name, k, n in json.loads(meta[META_SLOTS])]
    pieces = {k: tuple(v) for k, v in json.loads(meta[META_PIECES]).items()}
    return slots, pieces, json.loads(meta.get("phitune.lora_dtype", '"float"'))

