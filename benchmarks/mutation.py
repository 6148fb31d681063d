"""Mutation testing for fasterprune: do the tests fail when behaviour breaks?

A small, reproducible AST mutator (mutmut / cosmic-ray are too slow for these suites on 2 shared cores).
For each module it enumerates every mutant the operators below allow, samples `--n` of them with `--seed`,
and for each one: writes the mutant into a private copy of the package, runs that module's test files
(`pytest -x`, one process, timeout per mutant) and records killed / survived / timeout.
The tree under test is never modified: each worker copies `fasterprune/` and `tests/` into a temporary folder.

Operators (standard ones):
  cmp     comparison flip: < <=, > >=, == !=, is / is not, in / not in
  arith   + -, * /, // /, and the same on augmented assignments (+= -=, ...)
  const   integer or float constant +1 and -1 (bools excluded)
  bool    True <-> False
  logic   and <-> or
  not     `not x` -> `x`
  return  `return <expr>` -> `return None`
  delete  a statement that is only a call -> `pass`
Docstrings, f-strings (messages), annotations, `__all__` and the arguments of `raise` / logging calls are not mutated.

Equivalent mutants (no behaviour change) are listed by hand in `--equivalent` (JSON: signature -> one-line reason),
and left out of the score: score = killed / (total - equivalent). A signature is `module:line text:operator:new text`,
so it survives unrelated edits elsewhere in the file, but not a rewrite of that line.

Recorded runs (benchmarks/mutation_before.json, mutation_after.json; equivalents in mutation_equivalent.json):
  before: a worktree at 432b67e, without tests/test_mutants.py, all four modules in one run with --jobs 2;
  after:  a worktree at 1ae74e8 / 6a4e0ad (schedules, sparsifier, callback identical in both) with
          tests/test_mutants.py, two runs side by side (--modules schedules sparsifier callback; --modules pruner),
          merged with --table. Mutant indices and lines differ between the two: the files were refactored.

Usage (from the repository root; test files per module are in `TESTS`):
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/mutation.py --root . --n 45 --seed 0 --jobs 2 \
        --out benchmarks/mutation_before.json
    python benchmarks/mutation.py --table benchmarks/mutation_before.json   # the table again, equivalents marked
"""
from __future__ import annotations
import argparse, ast, hashlib, json, os, random, shutil, signal, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict
from pathlib import Path

MODULES = ('schedules', 'sparsifier', 'callback', 'pruner')
# Which test files exercise which module (pytest -x runs them in this order; the extra tests/test_mutants.py is
# appended to every module when it exists). vgg16_bn zoo cases are deselected for the pruner: 13 s of a 40 s file,
# and the same code paths are covered by the other zoo models.
TESTS = {
    'schedules':  ['tests/test_schedules.py'],
    'sparsifier': ['tests/test_sparsifier.py', 'tests/test_engine.py'],
    'callback':   ['tests/test_callback.py'],
    'pruner':     ['tests/test_pruner.py'],
}
PYTEST_ARGS = {'pruner': ['-k', 'not vgg16_bn']}
EXTRA_TESTS = 'tests/test_mutants.py'
ONLY_TESTS = None  # --tests: check given mutants against these files only (e.g. that new tests kill them)

CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
       ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div}
LOG_NAMES = {'debug', 'info', 'warning', 'warn', 'error', 'exception', 'critical', 'print'}


@dataclass
class Mutant:
    module: str
    idx: int       # position in the full enumeration (stable for a given file)
    op: str
    line: int
    old: str       # source text of the line, stripped
    new: str       # replacement text for the mutated node
    status: str = ''
    secs: float = 0.
    detail: str = ''

    @property
    def signature(self): return f"{self.module}:{self.old}:{self.op}:{self.new}"


def _skip_nodes(tree):
    "ids of nodes whose subtrees are not mutated: docstrings, f-strings, annotations, __all__, raise/log arguments"
    skip = set()
    def add(n):
        if n is not None: skip.update(id(x) for x in ast.walk(n))
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body:
            b = n.body[0]
            if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str): add(b)
        if isinstance(n, ast.JoinedStr): add(n)
        if isinstance(n, ast.arg): add(n.annotation)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)): add(n.returns)
        if isinstance(n, ast.AnnAssign): add(n.annotation)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == '__all__' for t in n.targets): add(n)
        if isinstance(n, ast.Raise): add(n.exc)
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', '')
            if name in LOG_NAMES: add(n)
        if isinstance(n, ast.Assert): add(n.msg)
    return skip


def _candidates(tree):
    "Yield (node, op, replacement node) for every mutation the operators allow"
    skip = _skip_nodes(tree)
    for n in ast.walk(tree):
        if id(n) in skip: continue
        if isinstance(n, ast.Compare):
            for i, o in enumerate(n.ops):
                if type(o) in CMP:
                    ops = list(n.ops)
                    ops[i] = CMP[type(o)]()
                    yield n, 'cmp', ast.Compare(n.left, ops, n.comparators)
        elif isinstance(n, ast.BinOp) and type(n.op) in ARITH:
            yield n, 'arith', ast.BinOp(n.left, ARITH[type(n.op)](), n.right)
        elif isinstance(n, ast.AugAssign) and type(n.op) in ARITH:
            yield n, 'arith', ast.AugAssign(n.target, ARITH[type(n.op)](), n.value)
        elif isinstance(n, ast.Constant) and type(n.value) in (int, float):
            for d in (1, -1):
                yield n, 'const', ast.Constant(n.value + d)
        elif isinstance(n, ast.Constant) and type(n.value) is bool:
            yield n, 'bool', ast.Constant(not n.value)
        elif isinstance(n, ast.BoolOp):
            yield n, 'logic', ast.BoolOp(ast.Or() if isinstance(n.op, ast.And) else ast.And(), n.values)
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            yield n, 'not', n.operand
        elif isinstance(n, ast.Return) and n.value is not None:
            if not (isinstance(n.value, ast.Constant) and n.value.value is None):
                yield n, 'return', ast.Return(ast.Constant(None))
        elif isinstance(n, ast.Expr) and isinstance(n.value, ast.Call):
            yield n, 'delete', ast.Pass()


def _offsets(src):
    "character offset of the start of each line (1-based line numbers)"
    offs, pos = [0, 0], 0
    for l in src.splitlines(keepends=True):
        pos += len(l)
        offs.append(pos)
    return offs


def enumerate_mutants(module, src):
    "All mutants of a module's source, as (Mutant, mutated source) pairs, in a deterministic order"
    tree = ast.parse(src)
    lines = src.splitlines()
    offs = _offsets(src)
    cands = sorted(_candidates(tree), key=lambda c: (c[0].lineno, c[0].col_offset, c[1], ast.unparse(c[2])))
    out = []
    for node, op, rep in cands:
        a = offs[node.lineno] + node.col_offset
        b = offs[node.end_lineno] + node.end_col_offset
        new = ast.unparse(rep)
        text = new if isinstance(node, ast.stmt) or isinstance(rep, ast.Constant) else f"({new})"
        mutated = src[:a] + text + src[b:]
        try: compile(mutated, module, 'exec')
        except SyntaxError: continue
        out.append((Mutant(module, len(out), op, node.lineno, lines[node.lineno - 1].strip(), new), mutated))
    return out


def _run(cmd, cwd, env, timeout):
    "Run a command in its own process group; kill the whole group on timeout"
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return None, ''


class Worker:
    "A private copy of the package and tests in which one mutant at a time is written"
    def __init__(self, root):
        self.dir = Path(tempfile.mkdtemp(prefix='fp_mut_'))
        for d in ('fasterprune', 'tests', 'benchmarks'):  # some tests read benchmark results
            shutil.copytree(Path(root) / d, self.dir / d, ignore=shutil.ignore_patterns('__pycache__'))
        shutil.copy(Path(root) / 'pyproject.toml', self.dir)  # pytest settings (markers)
        self.env = dict(os.environ, PYTHONPATH=str(self.dir), PYTHONDONTWRITEBYTECODE='1', OMP_NUM_THREADS='1',
                        PYTHONHASHSEED='0')

    def pytest(self, module, timeout):
        files = [f for f in TESTS[module] + [EXTRA_TESTS] if (self.dir / f).exists()]
        if ONLY_TESTS: files = ONLY_TESTS
        cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-p', 'no:randomly',
               *PYTEST_ARGS.get(module, []), *files]
        return _run(cmd, self.dir, self.env, timeout)

    def test_mutant(self, m, mutated, orig, timeout):
        path = self.dir / 'fasterprune' / f'{m.module}.py'
        path.write_text(mutated)
        t0 = time.time()
        try: rc, out = self.pytest(m.module, timeout)
        finally: path.write_text(orig)
        m.secs = round(time.time() - t0, 1)
        if rc is None: m.status = 'timeout'
        elif rc == 0: m.status = 'survived'
        else:
            m.status = 'killed'
            failed = [l for l in out.splitlines() if l.startswith(('FAILED', 'ERROR'))]
            m.detail = failed[0][:200] if failed else out.strip().splitlines()[-1][:200] if out.strip() else f'rc={rc}'
        return m

    def close(self): shutil.rmtree(self.dir, ignore_errors=True)


def run_module(module, root, n, seed, jobs, equivalent, only=None):
    src = (Path(root) / 'fasterprune' / f'{module}.py').read_text()
    allm = enumerate_mutants(module, src)
    rng = random.Random(f'{seed}:{module}')
    picked = sorted(rng.sample(range(len(allm)), min(n, len(allm))))
    if only is not None: picked = [i for i in picked if i in only]
    workers = [Worker(root) for _ in range(jobs)]
    t0 = time.time()
    rc, out = workers[0].pytest(module, 600)
    base = time.time() - t0
    if rc != 0:
        for w in workers: w.close()
        raise RuntimeError(f"{module}: tests fail on the unmutated code:\n{out[-3000:]}")
    timeout = max(30., 3 * base + 10)
    print(f"{module}: {len(allm)} mutants, testing {len(picked)}; clean run {base:.1f}s, timeout {timeout:.0f}s",
          flush=True)
    free = list(workers)
    def one(i):
        w = free.pop()
        try:
            m = w.test_mutant(allm[i][0], allm[i][1], src, timeout)
        finally: free.append(w)
        if m.signature in equivalent: m.status, m.detail = 'equivalent', equivalent[m.signature]
        print(f"  {module}#{m.idx:<4} L{m.line:<4} {m.op:<6} {m.status:<10} {m.secs:5.1f}s  {m.old[:60]!r} -> {m.new[:40]!r}",
              flush=True)
        return m
    try:
        with ThreadPoolExecutor(jobs) as ex: res = list(ex.map(one, picked))
    finally:
        for w in workers: w.close()
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True).stdout.strip()
    return dict(module=module, commit=commit, file_sha1=hashlib.sha1(src.encode()).hexdigest(), total_mutants=len(allm),
                clean_secs=round(base, 1), timeout_secs=round(timeout), tests=TESTS[module] + [EXTRA_TESTS],
                mutants=[asdict(m) | dict(signature=m.signature) for m in res])


def summarize(mod):
    ms = mod['mutants']
    c = {s: sum(m['status'] == s for m in ms) for s in ('killed', 'survived', 'timeout', 'equivalent')}
    scored = len(ms) - c['equivalent']
    killed = c['killed'] + c['timeout']  # a mutant that hangs the tests is detected
    return dict(sampled=len(ms), **c, score=round(killed / scored, 3) if scored else None)


def table(res):
    rows = [f"{'module':<11} {'sampled':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'equiv':>5} {'score':>6}"]
    for mod in res['modules']:
        s = summarize(mod)
        rows.append(f"{mod['module']:<11} {s['sampled']:>7} {s['killed']:>6} {s['timeout']:>7} {s['survived']:>8} "
                    f"{s['equivalent']:>5} {s['score']:>6.1%}")
    surv = [m for mod in res['modules'] for m in mod['mutants'] if m['status'] == 'survived']
    if surv:
        rows.append('\nsurvivors:')
        rows += [f"  {m['module']}#{m['idx']} L{m['line']} {m['op']}: {m['old'][:70]!r} -> {m['new'][:50]!r}"
                 for m in surv]
    eq = [m for mod in res['modules'] for m in mod['mutants'] if m['status'] == 'equivalent']
    if eq:
        rows.append('\nequivalent (excluded):')
        rows += [f"  {m['module']}#{m['idx']} L{m['line']} {m['op']}: {m['old'][:60]!r} -> {m['new'][:40]!r}: "
                 f"{m['detail']}" for m in eq]
    return '\n'.join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default='.', help='repository root whose fasterprune/ and tests/ are mutated (copied)')
    p.add_argument('--modules', nargs='+', default=list(MODULES), choices=MODULES)
    p.add_argument('--n', type=int, default=45, help='mutants sampled per module')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--jobs', type=int, default=1, help='mutants tested at once (each in its own copy)')
    p.add_argument('--equivalent', default=str(Path(__file__).with_name('mutation_equivalent.json')))
    p.add_argument('--only', type=int, nargs='*', help='rerun only these mutant indices (one module)')
    p.add_argument('--tests', nargs='+', help='run only these test files (to check that new tests kill --only ones)')
    p.add_argument('--out', help='JSON to write')
    p.add_argument('--table', nargs='+', help='print the table of existing JSON results (merged, equivalents marked)')
    p.add_argument('--list', action='store_true', help='list the sampled mutants without running them')
    p.add_argument('--show', type=int, nargs='+', help='print the diff of these mutant indices (one module) and exit')
    a = p.parse_args()
    global ONLY_TESTS
    ONLY_TESTS = a.tests
    eq_path = Path(a.equivalent)
    equivalent = json.loads(eq_path.read_text()) if eq_path.exists() else {}
    if a.table:  # merge results (e.g. modules run separately), mark the listed equivalent mutants, print the table
        runs = [json.loads(Path(t).read_text()) for t in a.table]
        res = dict(runs[0], modules=[mod for r in runs for mod in r['modules']], secs=sum(r['secs'] for r in runs))
        for m in (m for mod in res['modules'] for m in mod['mutants']):
            if m['status'] == 'survived' and m['signature'] in equivalent:
                m['status'], m['detail'] = 'equivalent', equivalent[m['signature']]
        res['summary'] = {mod['module']: summarize(mod) for mod in res['modules']}
        print(table(res))
        if a.out: Path(a.out).write_text(json.dumps(res, indent=1) + '\n')
        return
    if a.show:
        import difflib
        src = (Path(a.root) / 'fasterprune' / f'{a.modules[0]}.py').read_text()
        allm = enumerate_mutants(a.modules[0], src)
        for i in a.show:
            d = difflib.unified_diff(src.splitlines(), allm[i][1].splitlines(), n=0, lineterm='')
            print(f"#{i} {allm[i][0].op}:", *[l[:160] for l in list(d)[3:]], sep='\n  ')
        return
    if a.list:
        for mod in a.modules:
            allm = enumerate_mutants(mod, (Path(a.root) / 'fasterprune' / f'{mod}.py').read_text())
            rng = random.Random(f'{a.seed}:{mod}')
            for i in sorted(rng.sample(range(len(allm)), min(a.n, len(allm)))):
                m = allm[i][0]
                print(f"{mod}#{i} L{m.line} {m.op}: {m.old[:80]!r} -> {m.new[:50]!r}")
        return
    t0 = time.time()
    mods = [run_module(m, a.root, a.n, a.seed, a.jobs, equivalent, set(a.only) if a.only is not None else None)
            for m in a.modules]
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=a.root, capture_output=True, text=True).stdout.strip()
    res = dict(commit=head, n=a.n, seed=a.seed, jobs=a.jobs, secs=round(time.time() - t0), modules=mods,
               summary={m['module']: summarize(m) for m in mods})
    print(table(res))
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1) + '\n')


if __name__ == '__main__': main()
