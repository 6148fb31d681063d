# The two set-up commands are `make demo` and `make test`; both create or reuse .venv.
SHELL := /bin/bash
PY    := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test venv export check-sync check-clean nbtest pytest bench clean-venv

venv: $(VENV_STAMP)

# Rebuilt only when the pinned stack or the project metadata change.
$(VENV_STAMP): requirements-dev.txt pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(VENV_STAMP)

demo: venv
	.venv/bin/fasterprune demo

test: venv check-sync check-clean nbtest pytest

export: venv
	.venv/bin/nbdev-export

# The package is generated from nbs/: fail when exporting changes it.
check-sync: venv
	@tmp=$$(mktemp -d) && cp -r fasterprune $$tmp/ && .venv/bin/nbdev-export && \
	if ! diff -r -x __pycache__ $$tmp/fasterprune fasterprune; then \
	  echo "ERROR: fasterprune/ was out of sync with nbs/ (nbdev-export changed it, see the diff above)"; rm -rf $$tmp; exit 1; fi; \
	rm -rf $$tmp; echo "fasterprune/ matches nbs/"

# Notebooks are committed clean (no outputs, no execution counts, stable ids).
check-clean: venv
	@tmp=$$(mktemp -d) && cp -r nbs $$tmp/ && .venv/bin/nbdev-clean && \
	if ! diff -r -x .ipynb_checkpoints $$tmp/nbs nbs >/dev/null; then \
	  diff -rq -x .ipynb_checkpoints $$tmp/nbs nbs; \
	  echo "ERROR: notebooks were not clean (nbdev-clean changed the files listed above)"; rm -rf $$tmp; exit 1; fi; \
	rm -rf $$tmp; echo "notebooks are clean"

# One torch thread per worker: two workers on two cores (oversubscription makes fits several times slower).
nbtest: venv
	OMP_NUM_THREADS=1 .venv/bin/nbdev-test --n-workers 2

pytest: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

bench: venv
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_global_mask.py
	$(PY) benchmarks/bench_accuracy.py

clean-venv:
	rm -rf .venv
