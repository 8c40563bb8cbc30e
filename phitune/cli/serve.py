"""`phitune serve`: an onnxruntime-genai model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from phitune import options


def _options() -> type:
    from phitune.serve.options import ServeOptions
    return ServeOptions


@options.command("serve", _options)
def serve(**kwargs) -> None:
    """Serve a model with OpenAI's API; the request's `model` picks the adapter.

    \b
      phitune serve -m models/phi/onnx-ao --adapter tone.onnx_adapter=tone --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tone", "messages": [{"role": "user", "content": "Hi"}]}'
    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health.
    """
    from phitune.serve.server import run

    run(options.from_kwargs(_options(), kwargs))
