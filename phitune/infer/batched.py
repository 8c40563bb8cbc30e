"""Decode several answers in one batch, each row with its own LoRA adapter or none, on
onnxruntime directly.

Why not onnxruntime-genai: its batched `og.Generator` runs every row with one adapter, rows
cannot join a running batch, and `og.Engine` takes no adapter at all. The decoder graph itself
can do it: an auto-opt graph adds `(x @ lora_A) @ lora_B` beside every projection with A and B
as inputs, and ONNX MatMul broadcasts `[B, S, in] @ [B, in, r]`, so A/B with a leading row
dimension give every row its own adapter. `per_row_graph` makes that dimension (in memory, on
the graph proto only: weights stay in the external data file, and a graph exported before this
existed gets it the same way); each batch feeds A/B stacked per row, ranks zero-padded to the
largest, zeros for a row on the base model (zero terms add exactly 0, so a row computes what it
would alone up to the batched kernels' summation order).

The KV cache is ours: a row prefills alone (batch 1, its adapter), then joins the batch's cache
(rows right-padded to the longest; `GroupQueryAttention` reads each row's own length from the
attention mask, so padding is never attended). A finished row leaves at once, so a request
that arrives mid-batch waits one decode step plus its own prefill, never the batch's end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from phitune import genai_config
from phitune.errors import InputError, first_line

LORA_SUFFIXES = (".lora_A", ".lora_B")
ROWS_DIM = "lora_rows"
PICK = "phitune_logits_positions"  # the positions (flattened) whose logits a run returns
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


class Unbatchable(Exception):
    """A graph whose KV cache this module cannot manage (serve then runs a generator each)."""


def per_row_graph(model_file: Path) -> bytes:
    """The decoder graph with a leading per-row dimension on every LoRA input (and its empty
    default, now [1, in, 0]); the rest of the graph as it is."""
    import onnx
    model = onnx.load(str(model_file), load_external_data=False)
    for node in model.graph.node:
        # Gemma3's local layers keep a rolling window-sized cache that only og manages
        if node.op_type == "GroupQueryAttention" and any(
                a.name == "sliding_window_cache" and a.i for a in node.attribute):
            raise Unbatchable(f"{node.name} keeps a sliding-window KV cache")
    for value in model.graph.input:
        if value.name.endswith(LORA_SUFFIXES):
            dims = value.type.tensor_type.shape.dim
            old = [(d.dim_value, d.dim_param) for d in dims]
            del dims[:]
            dims.add().dim_param = ROWS_DIM
            for dim_value, dim_param in old:
                if dim_param:
                    dims.add().dim_param = dim_param
                else:
                    dims.add().dim_value = dim_value
    for init in model.graph.initializer:
        if init.name.endswith(LORA_SUFFIXES) and len(init.dims) == 2:
            init.dims.insert(0, 1)
    _head_at_picked_positions(model)
    return model.SerializeToString()


def _head_at_picked_positions(model) -> None:
    """The LM head on one position per row (input PICK: indices into the flattened
    [rows x positions] hidden states), not on every position: a prefill needs its last
    token's logits only, and the head is a fifth of a small model's work per token (a
    Phi-3-mini-shaped 4-layer model, SmolLM2). A graph whose logits do not come straight
    from a MatMul keeps its head on every position (no PICK input)."""
    from onnx import TensorProto, helper
    graph = model.graph
    logits = graph.output[0].name
    head = next((n for n in graph.node if logits in n.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return
    hidden = head.input[0]
    flat, picked = f"{hidden}/flat_for_pick", f"{hidden}/picked"
    axes = "/pick/axes"
    at = list(graph.node).index(head)
    graph.node.insert(at, helper.make_node("Unsqueeze", [f"{picked}/rows", axes], [picked],
                                           name="/pick/Unsqueeze"))
    graph.node.insert(at, helper.make_node("Gather", [flat, PICK], [f"{picked}/rows"], axis=0,
                                           name="/pick/Gather"))
    graph.node.insert(at, helper.make_node("Flatten", [hidden], [flat], axis=2,
                                           name="/pick/Flatten"))
    graph.node.insert(at, helper.make_node("Constant", [], [axes], name="/pick/axes",
                                           value=helper.make_tensor(axes, TensorProto.INT64,
                                                                    [1], [1])))
    head.input[0] = picked
    graph.input.append(helper.make_tensor_value_info(PICK, TensorProto.INT64, [ROWS_DIM]))
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 3:  # one position per row now, whatever the input's length
        dims[1].Clear()
        dims[1].dim_value = 1


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    """An .onnx_adapter's parameters as numpy arrays. Copied while the file's object lives:
    `get_parameters()`'s arrays point into it and read freed memory (NaN logits) after."""
    import onnxruntime as ort
    adapter = ort.AdapterFormat.read_adapter(str(path))
    params = {name: np.array(value.numpy(), copy=True)
              for name, value in adapter.get_parameters().items()}
    del adapter
    return params


@dataclass(eq=False)  # rows are told apart by identity, never by value
class Row:
    """One answer: its prompt, adapter, own KV cache until it joins a batch, tokens so far."""

    prompt: list[int]
    adapter: str | None
    fed: int = 0  # prompt tokens in the KV cache
    kv: dict | None = None  # this row's own cache while it prefills (batch of 1)
    new: list[int] = field(default_factory=list)  # generated tokens; the last not yet fed

    @property
    def prefilled(self) -> bool:
        return self.fed >= len(self.prompt)

    @property
    def cached(self) -> int:
        """Tokens in the KV cache: the prompt and every generated token but the last."""
        return self.fed + max(len(self.new) - 1, 0)


class BatchModel:
    """The decoder graph with per-row LoRA inputs, and the loaded adapters' weights."""

    def __init__(self, model_dir: Path, adapter_files: dict[str, Path],
                 threads: int | None = None):
        import onnxruntime as ort
        self.model_dir = Path(model_dir)
        config = genai_config.decoder(self.model_dir)
        names = {**config.get("inputs", {}), **config.get("outputs", {})}
        self.layers = int(config["num_hidden_layers"])
        self.past = [(names.get("past_key_names", "past_key_values.%d.key") % i,
                      names.get("past_value_names", "past_key_values.%d.value") % i)
                     for i in range(self.layers)]
        self.present = [(names.get("present_key_names", "present.%d.key") % i,
                         names.get("present_value_names", "present.%d.value") % i)
                        for i in range(self.layers)]
        self.input_ids = names.get("input_ids", "input_ids")
        self.mask = names.get("attention_mask", "attention_mask")
        self.logits = names.get("logits", "logits")
        options = ort.SessionOptions()
        # as infer.Session: every core, unless the model dir sets a count
        options.intra_op_num_threads = int(threads or config.get("session_options", {}).get(
            "intra_op_num_threads") or len(os.sched_getaffinity(0)))
        # the LoRA defaults are overridable initializers: onnxruntime warns about each
        options.log_severity_level = 3
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.model_dir.resolve()))
        self.session = _load(self.model_dir, options)
        self.types = {i.name: (_NP.get(i.type), i.shape) for i in self.session.get_inputs()}
        self._check_inputs()
        self.kv_dtype = self.types[self.past[0][0]][0]
        self.kv_heads = int(config["num_key_value_heads"])
        self.head_size = int(config["head_size"])
        self.adapters = {name: read_adapter(path) for name, path in adapter_files.items()}
        self.outputs = [self.logits] + [name for pair in self.present for name in pair]
        self._lora_cache: dict[tuple, dict] = {}

    def _check_inputs(self) -> None:
        known = {self.input_ids, self.mask, "position_ids", PICK,
                 *(n for p in self.past for n in p)}
        unknown = sorted(set(self.types) - known)
        if unknown:
            raise InputError(f"the decoder graph takes inputs batched serving does not feed "
                             f"({', '.join(unknown[:3])})", str(self.model_dir),
                             "re-export the model with phitune auto-opt")

    # ------------------------------------------------------------ feeds

    def lora_feed(self, adapters: tuple) -> dict[str, np.ndarray]:
        """Stacked A/B for rows under `adapters` (None: the base): [rows, in, r] and
        [rows, r, out], each slot's rank padded to its largest; slots no row adapts keep
        their empty defaults. One row's are views of its adapter (no copy); a batch's are
        copies (rows x the adapters' bytes), kept while the batch's rows stay the same."""
        if len(adapters) == 1:
            params = self.adapters[adapters[0]] if adapters[0] else {}
            return {name: value[None] for name, value in params.items()}
        if adapters in self._lora_cache:
            return self._lora_cache[adapters]
        params = [self.adapters[name] if name else {} for name in adapters]
        feed = {}
        for name in sorted({n for p in params for n in p if n.endswith(".lora_A")}):
            b_name = name[:-len("lora_A")] + "lora_B"
            ranks = [p[name].shape[1] if name in p else 0 for p in params]
            first = next(p for p in params if name in p)
            a = np.zeros((len(params), first[name].shape[0], max(ranks)), first[name].dtype)
            b = np.zeros((len(params), max(ranks), first[b_name].shape[1]), first[b_name].dtype)
            for row, (p, rank) in enumerate(zip(params, ranks)):
                if rank:
                    a[row, :, :rank], b[row, :rank] = p[name], p[b_name]
            feed[name], feed[b_name] = a, b
        self._lora_cache = {adapters: feed}  # the old set's copies are freed
        return feed

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None,
             past: dict, adapters: tuple, last: Sequence[int]) -> tuple[np.ndarray, dict]:
        """Logits [rows, vocab] at each row's position `last[row]` of `ids`, and the cache."""
        feed = {self.input_ids: ids.astype(self.types[self.input_ids][0]),
                self.mask: mask.astype(self.types[self.mask][0]), **past,
                **self.lora_feed(adapters)}
        if "position_ids" in self.types:
            feed["position_ids"] = positions.astype(self.types["position_ids"][0])
        rows, width = ids.shape
        if PICK in self.types:
            feed[PICK] = np.arange(rows, dtype=np.int64) * width + np.asarray(last, np.int64)
        out = self.session.run(self.outputs, feed)
        present = {}
        for (key, value), k, v in zip(self.past, out[1::2], out[2::2]):
            present[key], present[value] = k, v
        logits = out[0][:, 0] if PICK in self.types else out[0][np.arange(rows), last]
        return logits, present

    def empty_past(self, rows: int) -> dict:
        shape = (rows, self.kv_heads, 0, self.head_size)
        return {name: np.zeros(shape, self.kv_dtype) for pair in self.past for name in pair}

    # ------------------------------------------------------------ steps

    def prefill(self, row: Row, chunk: int | None = None) -> np.ndarray | None:
        """Feed `row`'s next `chunk` prompt tokens (all by default) alone; the last prompt
        token's logits once the prompt is in, else None."""
        end = len(row.prompt) if chunk is None else min(len(row.prompt), row.fed + chunk)
        ids = np.array([row.prompt[row.fed:end]])
        past = row.kv if row.kv is not None else self.empty_past(1)
        logits, row.kv = self._run(ids, np.ones((1, end), np.int64),
                                   np.arange(row.fed, end)[None], past, (row.adapter,),
                                   [end - row.fed - 1])
        row.fed = end
        return logits[0] if row.prefilled else None

    def prefill_together(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """Fresh rows' whole prompts in one run, each with its adapter, right-padded to the
        longest: a prompt's causal attention never reaches the padding after it, and each
        row keeps its own cache (its real positions only). Each row's last prompt token's
        logits. Several prompts in one run cost less than one after another (the weights
        are unpacked once per matmul), and none of them waits for the others' first token."""
        if len(rows) == 1:
            return [self.prefill(rows[0])]
        width = max(len(row.prompt) for row in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row.prompt)], mask[i, :len(row.prompt)] = row.prompt, 1
        positions = np.broadcast_to(np.arange(width), (len(rows), width))
        logits, present = self._run(ids, mask, positions, self.empty_past(len(rows)),
                                    tuple(row.adapter for row in rows),
                                    [len(row.prompt) - 1 for row in rows])
        out = []
        for i, row in enumerate(rows):
            row.fed = len(row.prompt)
            row.kv = {name: np.ascontiguousarray(value[i:i + 1, :, :row.fed])
                      for name, value in present.items()}
            out.append(logits[i])
        return out


class Batch:
    """The rows decoding together and their KV cache, [rows, heads, longest, head_size]."""

    def __init__(self, model: BatchModel):
        self.model = model
        self.rows: list[Row] = []
        self.past: dict = model.empty_past(0)

    def join(self, row: Row) -> None:
        """Add a prefilled row (its first token chosen): its cache joins the batch's."""
        width = max(self.width, row.kv[self.model.past[0][0]].shape[2])
        self.past = {name: np.concatenate([_pad(self.past[name], width),
                                           _pad(row.kv[name], width)]) for name in self.past}
        row.kv = None
        self.rows.append(row)

    def drop(self, rows: Sequence[Row]) -> None:
        """Remove finished rows; the cache shrinks to the longest row left."""
        keep = [i for i, row in enumerate(self.rows) if row not in rows]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        width = max((row.cached for row in self.rows), default=0)
        self.past = {name: np.ascontiguousarray(value[keep, :, :width])
                     for name, value in self.past.items()}

    @property
    def width(self) -> int:
        return self.past[self.model.past[0][0]].shape[2]

    def step(self) -> np.ndarray:
        """Feed every row its last token; logits [rows, vocab] for each row's next one."""
        lengths = [row.cached for row in self.rows]
        mask = np.zeros((len(self.rows), self.width + 1), np.int64)
        for i, length in enumerate(lengths):
            mask[i, :length + 1] = 1
        ids = np.array([[row.new[-1]] for row in self.rows])
        logits, self.past = self.model._run(ids, mask, np.array(lengths)[:, None], self.past,
                                            tuple(row.adapter for row in self.rows),
                                            [0] * len(self.rows))
        return logits


def _load(model_dir: Path, options):
    """The per-row graph's onnxruntime session; a file that does not load is one InputError."""
    import onnxruntime as ort
    from google.protobuf.message import DecodeError
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    try:
        graph = per_row_graph(model_dir / genai_config.decoder_file(model_dir))
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except (DecodeError, OSError, state.Fail, state.InvalidProtobuf, state.InvalidGraph,
            state.NoSuchFile, state.RuntimeException) as exc:
        raise InputError(f"onnxruntime cannot load the decoder graph ({first_line(exc)})",
                         str(model_dir), "re-export it with phitune auto-opt") from None


def _pad(value: np.ndarray, width: int) -> np.ndarray:
    """A cache padded on the right along its sequence axis to `width` (never attended)."""
    extra = width - value.shape[2]
    return value if extra == 0 else np.pad(value, ((0, 0), (0, 0), (0, extra), (0, 0)))


def next_token(logits: np.ndarray, sampling, rng: np.random.Generator | None) -> int:
    """The next token from one row's logits: the argmax when greedy, else a draw at the
    temperature from the top-k, then top-p, tokens (`rng` seeded per answer by --seed)."""
    if not sampling.sample:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / (sampling.temperature or 1.0)
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k is not None:
        order = order[:sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if sampling.top_p is not None:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
