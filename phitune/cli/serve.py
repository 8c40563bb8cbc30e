"""`phitune serve`: an onnxruntime-genai model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import click

from phitune.cli.options import dual_option as _opt
from phitune.cli.options import model_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option("onnxruntime-genai model: a phitune auto-opt output D, D/model, or any dir with "
              "genai_config.json.")
@click.option("--adapter", multiple=True, metavar="PATH[=NAME]",
              help="A .onnx_adapter file served as model id NAME (repeatable; NAME defaults to "
                   "the file stem). Default: the model dir's adapter_weights.onnx_adapter when "
                   "present.")
@click.option("--no-adapter", "--no_adapter", "no_adapter", is_flag=True,
              help="Serve the base model only (ignore the model dir's own adapter).")
@_opt("model_name", metavar="ID",
      help="The base model's id in /v1/models (default: the model directory's name).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@_opt("api_key", metavar="KEY", envvar="PHITUNE_API_KEY", show_envvar=True,
      help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests decoding at once, interleaved a token at a time.")
@_opt("max_queue", type=click.IntRange(min=0), default=16, show_default=True,
      help="Requests that may wait for a decoding slot; beyond that: HTTP 429.")
@_opt("max_tokens", type=click.IntRange(min=1), default=512, show_default=True,
      help="Answer length when a request sets no max_tokens.")
@_opt("max_body_kb", type=click.IntRange(min=1), default=1024, show_default=True,
      help="Largest request body; beyond that: HTTP 413.")
@_opt("shutdown_timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
      help="Seconds running answers may take to finish after SIGTERM/Ctrl-C before they are "
           "cancelled.")
def serve(**kwargs) -> None:
    """Serve a model with OpenAI's API; the request's `model` picks the adapter.

    \b
      phitune serve -m models/phi/onnx-ao --adapter tone.onnx_adapter=tone --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tone", "messages": [{"role": "user", "content": "Hi"}]}'
    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health.
    """
    from phitune.serve.server import ServeOptions, run

    run(ServeOptions(**kwargs))
