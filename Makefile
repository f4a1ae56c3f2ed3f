# The README's two commands: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: bootstrap test test-unit test-lab lint demo bench fuzz clean

bootstrap:
	@bash scripts/bootstrap.sh

test: bootstrap
	@$(PY) -m ruff check src tests bench
	@$(PY) -m mypy
	@$(PY) -m pytest -q tests

test-unit: bootstrap
	@$(PY) -m pytest -q tests/unit

test-lab: bootstrap
	@$(PY) -m pytest -q tests/lab

lint: bootstrap
	@$(PY) -m ruff check src tests bench
	@$(PY) -m mypy

demo: bootstrap
	@$(PY) -m relaymesh.demo

fuzz: bootstrap
	@RELAYMESH_FUZZ_EXAMPLES=200000 $(PY) -m pytest -q tests/unit -k fuzz

bench: bootstrap
	@$(PY) bench/wg_throughput.py

clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache
