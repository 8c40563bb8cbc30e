# The two commands a newcomer runs (README.md): `make demo` and `make test`.
PY := .venv/bin/python
PHITUNE := .venv/bin/phitune

.PHONY: install install-dev demo test bench

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh dev

# The lab chain on the embedded model, offline (as far as it is built: quantize).
demo: install
	$(PHITUNE) quantize -m tiny-phi3 --algorithm awq -o models/tiny/awq

test: install-dev
	$(PY) -m pytest -q

bench: install-dev
	$(PY) scripts/bench.py quantize
