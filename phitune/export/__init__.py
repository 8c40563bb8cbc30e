"""ONNX export for onnxruntime-genai: builder, int4 input, multi-LoRA graph, adapters."""
