"""`phitune infer`: chat with an onnxruntime-genai model, LoRA adapters switchable by name.

- `adapters.py` reads `--adapter` specs and checks, before any generation, that an adapter file
  fits the model's graph (onnxruntime-genai itself only fails at the first token);
- `session.py` loads the model, tokenizer and adapters once and generates with streaming and
  timings;
- `chat.py` turns a prompt or a conversation into tokens and runs the one-shot, stdin and REPL
  modes.
"""
