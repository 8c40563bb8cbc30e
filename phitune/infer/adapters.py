"""LoRA adapter files for onnxruntime-genai: naming them, and checking that one fits a model.

onnxruntime-genai loads any `.onnx_adapter` file without looking inside; a parameter the graph
has no input for, or of the wrong shape, only fails at the first token with an onnxruntime
shape error. `check_fits` reads both files and refuses such an adapter up front, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phitune import genai_config, inputfiles
from phitune.errors import InputError, OptionError, first_line

SUFFIX = ".onnx_adapter"
_FIX = "use an adapter exported for this model (phitune auto-opt writes both together)"


@dataclass(frozen=True)
class Adapter:
    path: Path
    name: str


def parse(spec: str) -> Adapter:
    """`PATH[=NAME]`; NAME defaults to the file stem. A path that exists is never split."""
    path, name = spec, None
    if "=" in spec and not Path(spec).expanduser().exists():
        path, _, name = spec.rpartition("=")
        if not name.strip() or not path:
            raise OptionError(f"--adapter '{spec}' has an empty path or name", "--adapter",
                              "write --adapter PATH or --adapter PATH=NAME")
    file = Path(path).expanduser()
    return Adapter(file, name.strip() if name else _stem(file))


def _stem(file: Path) -> str:
    return file.name[:-len(SUFFIX)] if file.name.endswith(SUFFIX) else file.stem


def plan(model_dir: Path, specs: tuple[str, ...], active: str | None,
         no_adapter: bool) -> tuple[list[Adapter], str | None]:
    """Which adapters to load and which one starts active (None: the base model).

    Without --adapter the model dir's own `adapter_weights.onnx_adapter` is used when present;
    the active one defaults to the first; --no-adapter starts on the base.
    """
    adapters = [parse(s) for s in specs]
    own = model_dir / genai_config.ADAPTER_FILE
    if not adapters and not no_adapter and own.is_file():
        adapters = [Adapter(own, _stem(own))]
    seen: dict[str, Path] = {}
    for adapter in adapters:
        if adapter.name in seen:
            raise OptionError(f"two adapters are named '{adapter.name}' ({seen[adapter.name]}, "
                              f"{adapter.path})", "--adapter",
                              "name them apart with --adapter PATH=NAME")
        if adapter.name.lower() == "none":
            raise OptionError("an adapter cannot be named 'none' (that name means the base model)",
                              "--adapter", "pick another name with --adapter PATH=NAME")
        seen[adapter.name] = adapter.path
    if no_adapter:
        if active:
            raise OptionError("--adapter_name and --no-adapter contradict each other",
                              "phitune infer", "pass one of them")
        return adapters, None
    if active is None:
        return adapters, adapters[0].name if adapters else None
    if active not in seen:
        raise InputError(f"no adapter named '{active}' is loaded ({describe(list(seen))})",
                         "--adapter_name", "pick a loaded name, or load it with --adapter PATH=NAME")
    return adapters, active


def describe(names: list[str]) -> str:
    return "loaded: " + ", ".join(names) if names else "none are loaded"


def check_fits(model_dir: Path, adapter_file: Path) -> None:
    """Refuse (InputError) an adapter whose parameters the model's graph cannot take.

    Every parameter needs a graph input of the same name, element type and rank, equal static
    dims, and one value per symbolic dim (the LoRA rank may be anything, but A and B of one
    module must agree on it). Graph inputs the adapter leaves out keep their empty defaults.
    """
    adapter_file = Path(adapter_file)
    params = _read_parameters(adapter_file)
    inputs = graph_inputs(Path(model_dir))
    where = str(adapter_file)
    missing = sorted(name for name in params if name not in inputs)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"adapter {adapter_file.name} does not fit the model in {model_dir}: the "
                         f"model has no input {missing[0]}{more}", where, _FIX)
    bound: dict[str, tuple[int, str]] = {}
    for name, (dtype, shape) in sorted(params.items()):
        want_dtype, want_dims = inputs[name]
        if dtype != want_dtype:
            raise InputError(f"adapter {adapter_file.name} does not fit the model in {model_dir}: "
                             f"{name} is {dtype}, the model takes {want_dtype}", where, _FIX)
        ok = len(shape) == len(want_dims) and all(
            isinstance(want, str) or want is None or got == want for got, want in zip(shape, want_dims))
        if not ok:
            raise InputError(f"adapter {adapter_file.name} does not fit the model in {model_dir}: "
                             f"{name} has shape {list(shape)}, the model takes "
                             f"[{', '.join(str(d) for d in want_dims)}]", where, _FIX)
        for got, want in zip(shape, want_dims):
            if isinstance(want, str):
                if want in bound and bound[want][0] != got:
                    raise InputError(
                        f"adapter {adapter_file.name} does not fit the model in {model_dir}: "
                        f"dim '{want}' is {bound[want][0]} in {bound[want][1]} but {got} in {name}",
                        where, _FIX)
                bound[want] = (got, name)


def _read_parameters(adapter_file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (element type, shape) of each parameter in an onnxruntime adapter file."""
    inputfiles.check_regular(adapter_file, "--adapter")
    if not adapter_file.is_file():
        raise InputError("no such adapter file", str(adapter_file),
                         f"pass a {SUFFIX} file (phitune auto-opt writes "
                         f"D/model/{genai_config.ADAPTER_FILE})")
    import onnxruntime as ort
    try:
        params = ort.AdapterFormat.read_adapter(str(adapter_file)).get_parameters()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split(") ", 1)[-1][:120]
        raise InputError(f"not an onnxruntime adapter file ({reason})", str(adapter_file),
                         f"pass a {SUFFIX} file written by phitune auto-opt or "
                         "onnxruntime.AdapterFormat") from None
    if not params:
        raise InputError("the adapter holds no parameters", str(adapter_file), _FIX)
    out = {}
    for name, value in params.items():
        dtype = value.data_type()  # 'tensor(float)'
        out[name] = (dtype[len("tensor("):-1] if dtype.startswith("tensor(") else dtype,
                     tuple(int(d) for d in value.shape()))
    return out


def graph_inputs(model_dir: Path) -> dict[str, tuple[str, tuple[int | str | None, ...]]]:
    """name -> (element type, dims) of the decoder graph's inputs; a dim is an int (static),
    a str (symbolic) or None (unknown). Reads the graph only, never the weights."""
    import onnx
    filename = genai_config.decoder_file(model_dir)
    try:
        graph = onnx.load(str(model_dir / filename), load_external_data=False).graph
    except Exception as exc:  # missing or corrupt protobuf: user-fixable
        reason = first_line(exc, 120)
        raise InputError(f"cannot read the model graph {model_dir / filename} ({reason})", "-m",
                         "re-export the model with phitune auto-opt") from None
    out = {}
    for value in graph.input:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None
                     for d in tensor.shape.dim)
        out[value.name] = (onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), dims)
    return out
