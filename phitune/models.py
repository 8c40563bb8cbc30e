"""Loading checkpoints and tokenizers; device and dtype choice.

torch and transformers are imported inside functions so that the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path

from phitune import inputfiles
from phitune.architectures import SUPPORTED_CLASSES, family, family_of_config
from phitune.errors import DeviceError, InputError, first_line

# Architectures phitune supports: the table's class names (phitune/architectures.py).
SUPPORTED_ARCHITECTURES = SUPPORTED_CLASSES


def resolve_device(choice: str = "auto") -> str:
    import torch
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible", "--device",
                          "use --device cpu or auto, or install a CUDA build of torch")
    return choice


def architecture(config: dict, path: Path | str) -> str:
    """config.architectures[0] if the table has it; else one line naming the supported ones."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    family(arch, f"{path}/config.json")
    return arch


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _record(config):
    """The family record of a config; Llama's (the common layout) when the table lacks it."""
    return (family_of_config(config) if config is not None else None) or family("LlamaForCausalLM")


def _path(model, attr: str):
    """The module at the model's family record path `attr` (Llama's layout when unknown)."""
    base = _base(model)
    try:
        return base.get_submodule(getattr(_record(getattr(base, "config", None)), attr))
    except AttributeError:
        return None


def decoder_layers(model):
    """The repeated blocks (an nn.ModuleList) of a Hugging Face causal LM, PEFT-wrapped or not;
    None when the model keeps them elsewhere."""
    import torch
    layers = _path(model, "layers")
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def embedding(model):
    """The token embedding module of a causal LM."""
    return _path(model, "embedding")


def load_causal_lm(path: Path | str, dtype=None, device: str = "cpu"):
    """A float causal LM in eval mode, with SDPA attention (causal without an explicit mask)."""
    import torch
    from transformers import AutoModelForCausalLM
    check_weight_files(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype or torch.float32, attn_implementation="sdpa",
            low_cpu_mem_usage=True, output_loading_info=True)
    except (OSError, ValueError, _safetensor_error()) as exc:
        raise InputError(f"cannot load the model ({first_line(exc)})", str(path),
                         "check that the directory holds a complete checkpoint") from None
    from phitune.checkpoint import check_loading_info
    check_loading_info(info, len(model.state_dict()), path)  # nothing left at random init
    return model.to(device).eval()


def quiet_gptqmodel() -> None:
    """Import gptqmodel, when installed, with its output silenced and its environment edits
    undone. peft imports it whenever it is installed (lora/awq.py's dispatcher checks every
    layer), and its import prints a ~12-line banner and sets PYTORCH_ALLOC_CONF and
    CUDA_DEVICE_ORDER; phitune never needs it (AWQ bases are read as float), so a later
    import by peft finds it loaded and prints nothing."""
    import importlib.util
    import os
    import sys
    if "gptqmodel" in sys.modules or importlib.util.find_spec("gptqmodel") is None:
        return
    env = dict(os.environ)
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                import gptqmodel  # noqa: F401
            except Exception:  # a broken optional install: peft then fails or skips it alone
                pass
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)


def _safetensor_error() -> type:
    """safetensors' own error ("header too small", "file not fully covered")."""
    try:
        from safetensors import SafetensorError
        return SafetensorError
    except ImportError:
        return OSError


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint dir, sharded (index) or not."""
    import json
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise corrupt(index, "not a valid safetensors index (no weight_map)") from None
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


_REDO = "re-download it, or re-run the phitune step that wrote it"


def corrupt(file: Path | str, what: str) -> InputError:
    """The one error for a weights or graph file that cannot be what it claims to be."""
    return InputError(f"the file is damaged: {what}", str(file), _REDO)


def check_safetensors(file: Path | str) -> tuple[int, dict]:
    """(header length, header) of a .safetensors file, refusing a file whose header is not
    valid or whose tensors do not exactly cover the data that follows it: a truncated or
    zero-byte file is an error here, never zeros later. Reads the header only."""
    import json
    import struct
    file = inputfiles.check_regular(file, str(file))
    size = file.stat().st_size
    if size < 8:
        raise corrupt(file, f"{size} bytes, too short for a safetensors header")
    with open(file, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        if header_len > size - 8 or header_len > 100 * 2**20:
            raise corrupt(file, f"the header claims {header_len} bytes, the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt(file, f"its header is not valid JSON ({str(exc)[:80]})") from None
    header.pop("__metadata__", None)
    data = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES:
                raise corrupt(file, f"tensor {name} has unknown dtype {info['dtype']}")
        except (TypeError, KeyError, ValueError):
            raise corrupt(file, f"tensor {name} has no valid data_offsets/dtype") from None
        if not 0 <= begin <= end or end > data:
            raise corrupt(file, f"tensor {name} ends at byte {end} of a {data}-byte data section "
                                "(the file is truncated)")
        end_max = max(end_max, end)
    if end_max != data:
        raise corrupt(file, f"the tensors cover {end_max} of its {data} data bytes")
    return header_len, header


def check_weight_files(directory: Path | str) -> None:
    """Check every .safetensors file of a checkpoint or adapter dir (headers only: cheap)."""
    directory = Path(directory)
    for file in safetensors_files(directory):
        inputfiles.check_regular(file, str(directory))  # a FIFO or /dev/zero: not "missing"
        if not file.is_file():
            raise InputError(f"the checkpoint index names {file.name}, which is missing",
                             str(directory), _REDO)
        check_safetensors(file)


def read_safetensors(file: Path):
    """Yield (name, tensor) from a .safetensors file with plain reads instead of mmap: pages of
    a mapped file count as this process's memory while it is open, which doubles a load's peak
    (file pages + the model's own copy). The header is checked against the file's size and
    every read's count against the tensor's, so a damaged file is an error, never zeros."""
    import torch
    header_len, header = check_safetensors(file)
    with open(file, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
            if end == begin:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            f.seek(8 + header_len + begin)
            buffer = bytearray(end - begin)
            got = f.readinto(buffer)
            if got != end - begin:
                raise corrupt(file, f"tensor {name}: read {got} of {end - begin} bytes "
                                    "(the file changed or is truncated)")
            try:
                yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])
            except RuntimeError as exc:
                raise corrupt(file, f"tensor {name}: {str(exc)[:100]}") from None


def check_onnx_graph(model_file: Path | str) -> None:
    """Refuse a zero-byte or unparsable ONNX graph, and external weights the data file does not
    hold (truncated model.onnx.data). Reads the graph proto only, never the weights."""
    model_file = Path(model_file)
    if not model_file.is_file():
        return  # a missing graph is reported where the graph is needed
    if model_file.stat().st_size == 0:
        raise corrupt(model_file, "the ONNX graph is an empty file")
    import onnx
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # protobuf DecodeError and friends: a damaged file
        reason = first_line(exc, 100)
        raise corrupt(model_file, f"not a readable ONNX graph ({reason})") from None
    sizes: dict[str, int] = {}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location")
        if not location:
            continue
        data_file = model_file.parent / location
        if location not in sizes:
            sizes[location] = data_file.stat().st_size if data_file.is_file() else -1
        if sizes[location] < 0:
            raise corrupt(model_file, f"its weights file {location} is missing")
        end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
        if end > sizes[location]:
            raise corrupt(data_file, f"tensor {tensor.name} ends at byte {end}, the file has "
                                     f"{sizes[location]} (truncated)")


def model_from_state(config, state: dict, dtype, where: str, prepare=None):
    """A causal LM built on the meta device and given `state`'s tensors (no second copy).
    `prepare(model)` may first swap in modules that bring their own tensors (packed int4)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters on the meta device, buffers real: the constructors compute the non-persistent
    # ones (rotary inv_freq, Gemma's embed_scale) that no checkpoint holds.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state[f"{_record(config).embedding}.weight"]
    if prepare is not None:
        prepare(model)  # modules swapped in bring their own tensors: only meta ones are owed
    from phitune.checkpoint import refuse
    expected = {k: v for k, v in model.state_dict().items() if prepare is None or v.is_meta}
    refuse([f"{name} (missing)" if name not in state else
            f"{name} ({'×'.join(map(str, state[name].shape))}, the model has "
            f"{'×'.join(map(str, t.shape))})"
            for name, t in expected.items()
            if name not in state or tuple(state[name].shape) != tuple(t.shape)],
           len(expected), where)
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    return model.eval()


def load_causal_lm_lean(path: Path | str, dtype):
    """Like `load_causal_lm` for training bases: peak memory ≈ the model in `dtype`, read tensor
    by tensor without mapping the files."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model ({first_line(exc)})", str(path),
                         "check that the directory holds a complete checkpoint") from None
    state = {}
    for file in safetensors_files(Path(path)):
        for name, tensor in read_safetensors(file):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if not state:
        return load_causal_lm(path, dtype)  # .bin checkpoints: transformers' own loader
    return model_from_state(config, state, dtype, str(path))


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer ({first_line(exc)})",
                         str(path), "the model directory needs its tokenizer files") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer and generation files travel with every model artifact."""
    import shutil
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def header_shapes(directory: Path | str) -> dict[str, tuple]:
    """name → shape of every tensor in the checkpoint's safetensors headers (checked whole)."""
    check_weight_files(directory)
    shapes: dict[str, tuple] = {}
    for file in safetensors_files(Path(directory)):
        _, header = check_safetensors(file)
        shapes.update({name: tuple(info.get("shape", ())) for name, info in header.items()})
    return shapes
