"""`phitune serve`'s options, declared once (see phitune/options.py).

Apart from the server so that `phitune serve --help` imports no server module.
"""

from __future__ import annotations

from dataclasses import dataclass

from phitune import options as O
from phitune.infer.options import MODEL_HELP


@dataclass
class ServeOptions:
    model: str = O.model(MODEL_HELP)
    adapter: tuple[str, ...] = O.option(
        (), "A .onnx_adapter file served as model id NAME (repeatable; NAME defaults to the file "
        "stem). Default: the model dir's adapter_weights.onnx_adapter when present.",
        multiple=True, metavar="PATH[=NAME]")
    no_adapter: bool = O.option(False, "Serve the base model only (ignore the model dir's own "
                                "adapter).", flag=True, spellings=("--no-adapter", "--no_adapter"))
    model_name: str | None = O.option(None, "The base model's id in /v1/models (default: the "
                                      "model directory's name).", metavar="ID", type=str)
    host: str = O.option("127.0.0.1", "Address to listen on; 0.0.0.0 exposes the server to the "
                         "network.")
    port: int = O.option(8000, min=1, max=65535, ranged=True)
    api_key: str | None = O.option(None, "Require 'Authorization: Bearer KEY' on every endpoint "
                                   "but /health.", metavar="KEY", type=str,
                                   envvar="PHITUNE_API_KEY")
    parallel: int = O.option(4, "Requests decoding at once, as one batch (each with its own adapter).",
                             min=1, ranged=True)
    max_queue: int = O.option(16, "Requests that may wait for a decoding slot; beyond that: "
                              "HTTP 429.", min=0, ranged=True)
    max_tokens: int = O.option(512, "Answer length when a request sets no max_tokens.", min=1,
                               ranged=True)
    max_body_kb: int = O.option(1024, "Largest request body; beyond that: HTTP 413.", min=1,
                                ranged=True)
    shutdown_timeout: float = O.option(
        10.0, "Seconds running answers may take to finish after SIGTERM/Ctrl-C before they are "
        "cancelled.", min=0, ranged=True)
