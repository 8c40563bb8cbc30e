# The two commands a newcomer runs (README.md): `make demo` and `make test`.
PY := .venv/bin/python
PHITUNE := .venv/bin/phitune

.PHONY: install install-dev demo test bench

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh dev

# The lab chain on the embedded model, offline (as far as it is built: quantize, finetune).
demo: install
	$(PHITUNE) quantize -m tiny-phi3 --algorithm awq -o models/tiny/awq
	$(PHITUNE) finetune --method lora -m models/tiny/awq --data_files data/travel.jsonl \
		--data_name json --text_template "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>" \
		--max_steps 30 --max_seq_len 512 --eval_split 0.1 -o models/tiny/ft

test: install-dev
	$(PY) -m pytest -q

bench: install-dev
	$(PY) scripts/bench.py quantize
