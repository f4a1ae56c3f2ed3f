# The README's two commands: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: bootstrap test test-unit test-lab lint demo bench fuzz clean
BENCHES := wg_core_microbench wg_throughput control_fanout derp derp_vs_direct relay_forwarding paths anchors

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

# Every benchmark in turn (long: tens of minutes); each writes its section of docs/benchmarks.md.
# One of them: `make bench-derp`, `make bench-anchors`, ...
bench: $(addprefix bench-,$(BENCHES))

bench-%: bootstrap
	@$(PY) -m pip install -q -e '.[bench]' >/dev/null
	@$(PY) bench/$*.py

clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache
