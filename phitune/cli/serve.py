"""`phitune serve`: an onnxruntime-genai model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import click

from phitune.options import CONTEXT, click_options
from phitune.serve.server import ServeOptions


@click.command(context_settings=CONTEXT)
@click_options(ServeOptions)
def serve(**kwargs) -> None:
    """Serve a model with OpenAI's API; the request's `model` picks the adapter.

    \b
      phitune serve -m models/phi/onnx-ao --adapter tone.onnx_adapter=tone --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tone", "messages": [{"role": "user", "content": "Hi"}]}'
    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health.
    """
    from phitune.serve.server import run

    run(ServeOptions(**kwargs))
