"""`phitune serve`: an onnxruntime-genai model (int4 base + .onnx_adapter files) behind OpenAI's
HTTP API, the adapter chosen per request by its `model`.

- `schemas.py`: the request bodies in OpenAI's shapes (strict) and its error JSON;
- `scheduler.py`: one thread that decodes every request on its own generator, a token each
  in turn;
- `app.py`: the routes (Starlette), streaming, and the gate: API key, body size, one log line
  per request;
- `server.py`: load once, serve with uvicorn, shut down cleanly on SIGTERM/Ctrl-C.
"""
