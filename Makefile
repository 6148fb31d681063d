# The two set-up commands are `make demo` and `make test`; both create or reuse .venv.
SHELL := /bin/bash
PY    := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test venv export check-sync check-clean nbtest pytest bench docs clean-venv

venv: $(VENV_STAMP)

# Rebuilt only when the pinned stack or the project metadata change.
# A new venv takes about 6 GB (torch's wheel is a CUDA build): say so before pip runs out of space half-way.
$(VENV_STAMP): requirements-dev.txt pyproject.toml
	@if [ ! -x $(PY) ]; then free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt 7 ]; then echo "WARNING: $$free GB free here; the new .venv needs about 6 GB"; fi; fi
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

# Notebooks are committed clean: no execution counts or run metadata, stable ids (outputs are kept: see `docs`).
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

# The notebooks are the rendered docs, so they are committed executed. `make docs` re-executes them in place (the
# same runner and flags as `nbtest`: `#| slow` and `#| cuda` cells are skipped), each in a fresh process so that no
# notebook's state (an open figure, a setting) shows up in another's outputs, two at a time; it keeps the outputs,
# turns progress bars into what a terminal would show, replaces this checkout's paths in outputs, then cleans the
# metadata. `make docs NB=nbs/00_schedules.ipynb` re-executes one notebook.
NB ?= nbs
# Third-party noise, not the docs' business: torch's deprecation of torch.jit.script, hit when fastai is imported.
DOCS_WARNINGS := ignore:`torch.jit.script` is deprecated:FutureWarning
docs: venv
	@if [ -d $(NB) ]; then ls $(NB)/*.ipynb; else echo $(NB); fi | OMP_NUM_THREADS=1 PYTHONWARNINGS='$(DOCS_WARNINGS)' \
	  xargs -P 2 -I{} .venv/bin/nbdev-test {} --save; status=$$?; \
	$(PY) -c "$$SCRUB_OUTPUTS" $(NB); scrubbed=$$?; \
	.venv/bin/nbdev-clean --fname $(NB) || exit 1; \
	if [ $$status -ne 0 ]; then echo "ERROR: some notebooks failed (see above); the others were re-executed"; exit 1; fi; \
	if [ $$scrubbed -ne 0 ]; then exit 1; fi; \
	echo "notebooks re-executed with their outputs: review with git diff, then commit"

# Scrubs the outputs of the notebooks under argv[1]: progress bars written with carriage returns keep only what a
# terminal shows, whitespace-only streams go, paths of this checkout, the venv and the interpreter become short relative
# ones, and temporary folders (tempfile.mkdtemp's random names) become <tmp>. Fails, naming the cell, when an output
# still holds a machine path (the temporary folder, home, this checkout).
define SCRUB_OUTPUTS
import json, re, sys, sysconfig, tempfile
from pathlib import Path
arg = Path(sys.argv[1])
def hidden(p): return any(q[0] in '._' for q in p.relative_to(arg).parts)  # checkpoints, like nbdev's globs
nbs = [arg] if arg.is_file() else [p for p in sorted(arg.rglob('*.ipynb')) if not hidden(p)]
def both(p): return dict.fromkeys([str(p) + '/', str(Path(p).resolve()) + '/'])  # as given and without symlinks
sp, lib = sysconfig.get_paths()['purelib'], sysconfig.get_paths()['stdlib']
subs = [(a, 'site-packages/') for a in both(sp)] + [(a, 'lib/') for a in both(lib)]
subs += [(a, '') for a in both(Path.cwd())]
bad = [*both(Path.cwd()), *both(sys.prefix), tempfile.gettempdir() + '/', str(Path.home()) + '/']
def terminal(text):
    out = []
    for line in text.split('\n'):
        shown = ''
        for part in line.split('\r'): shown = part + shown[len(part):]
        out.append(shown.rstrip())
    return '\n'.join(out)
tmp = re.compile(re.escape(tempfile.gettempdir()) + r'/tmp\w+')
def scrub(text):
    for a, b in subs: text = text.replace(a, b)
    return tmp.sub('<tmp>', text)
def lines(text): return text.splitlines(keepends=True)
problems = []
for nb in nbs:
    d = json.loads(nb.read_text())
    for c in d['cells']:
        outs = []
        for o in c.get('outputs', []):
            if o['output_type'] == 'stream':
                t = scrub(terminal(''.join(o['text'])))
                if not t.strip(): continue
                o['text'] = lines(t.strip('\n') + '\n')
            for k, v in o.get('data', {}).items():
                if not (k.startswith('text/') or k.endswith('json')): continue  # images are base64: no paths
                o['data'][k] = lines(scrub(''.join(v))) if isinstance(v, list) else scrub(v)
            if 'traceback' in o: o['traceback'] = [scrub(t) for t in o['traceback']]
            outs.append(o)
            txt = json.dumps(o)
            problems += [f"{nb}: cell {c.get('id')}: an output holds the machine path {b!r}" for b in bad if b in txt]
        if c['cell_type'] == 'code': c['outputs'] = outs
    nb.write_text(json.dumps(d, sort_keys=True, indent=1, ensure_ascii=False) + '\n')
if problems: sys.exit('ERROR: ' + '\n'.join(problems) + '\n(print a relative path, or hide the cell from the docs)')
endef
export SCRUB_OUTPUTS

clean-venv:
	rm -rf .venv
