# The two commands a newcomer runs (README.md): `make demo` and `make test`.
PY := .venv/bin/python
PHITUNE := .venv/bin/phitune

.PHONY: install install-dev demo test bench

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh dev

# The lab chain on the embedded model, offline: quantize → finetune → auto-opt → infer.
demo: install
	$(PHITUNE) quantize -m tiny-phi3 --algorithm awq -o models/tiny/awq
	$(PHITUNE) finetune --method lora -m models/tiny/awq --data_files data/travel.jsonl \
		--data_name json --text_template "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>" \
		--max_steps 30 --max_seq_len 512 --eval_split 0.1 -o models/tiny/ft
	$(PHITUNE) auto-opt -m models/tiny/ft/model --adapter_path models/tiny/ft/adapter \
		--device cpu --provider CPUExecutionProvider --use_ort_genai -o models/tiny/onnx-ao
	$(PHITUNE) infer -m models/tiny/onnx-ao/model --stats --max_new_tokens 48 \
		--prompt "what is the best thing to see in chicago"

test: install-dev
	$(PY) -m pytest -q

bench: install-dev
	$(PY) scripts/bench.py quantize
