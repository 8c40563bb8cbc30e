"""LoRA / QLoRA fine-tuning on a float or AWQ base."""
