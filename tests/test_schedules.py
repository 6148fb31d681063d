"Property tests of schedules: monotone, in [0, 1], exactly 1 from end_pct on"
import json, math
from pathlib import Path
from hypothesis import given, settings, strategies as st
import fastcore.test as fct
from fasterprune.schedules import one_shot, iterative, agp, linear, cos, get_schedule, Schedule

pcts = st.floats(0, 1, allow_nan=False)


def _window(a, b): return (min(a, b), max(a, b))


@st.composite
def schedules(draw):
    s, e = _window(draw(pcts), draw(pcts))
    kind = draw(st.sampled_from(['one_shot', 'iterative', 'agp', 'linear', 'cos']))
    if kind == 'one_shot': return one_shot(e)
    if kind == 'iterative': return iterative(draw(st.integers(1, 20)), s, e)
    return dict(agp=agp, linear=linear, cos=cos)[kind](s, e)


@settings(max_examples=300, deadline=None)
@given(schedules(), st.lists(pcts, min_size=2, max_size=50))
def test_monotone_bounded_exact(sched, ps):
    ps = sorted(ps)
    vals = [sched(p) for p in ps]
    assert all(0 <= v <= 1 for v in vals)
    assert all(a <= b for a, b in zip(vals, vals[1:])), (sched, ps, vals)
    fct.test_eq(sched(sched.end_pct), 1.)
    fct.test_eq(sched(1.), 1.)
    if sched.start_pct > 0: fct.test_eq(sched(sched.start_pct / 2), 0.)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), pcts)
def test_iterative_has_n_levels(n, p):
    v = iterative(n)(p)
    assert math.isclose(v * n, round(v * n)), v


def test_agp_formula():
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with s_i = 0, s_f = 1
    s = agp(0.2, 0.6)
    for p in (0.25, 0.3, 0.45, 0.59):
        t = (p - 0.2) / 0.4
        fct.test_close(s(p), 1 + (0 - 1) * (1 - t) ** 3)


def test_values_not_singletons():
    a, b = get_schedule('agp'), get_schedule('agp')
    assert a == b and a is not b


def test_custom_callable_validated():
    fct.test_eq(get_schedule(lambda p: p / 2)(0.5), 0.25)
    fct.test_fail(lambda: get_schedule(lambda p: -0.1)(0.3), contains='[0, 1]')
    fct.test_fail(lambda: get_schedule(3), contains='schedule must be')


BENCH = Path(__file__).parents[1] / 'benchmarks'
IMAGE = 100 / 360  # one validation image of digits, in accuracy points


def _losses(*names):
    "{(window, model, epochs, sparsity): {seed: accuracy points vs the same seed's dense run}} from benchmark files"
    runs = [r for n in names for r in json.loads((BENCH / f'{n}.json').read_text())['runs']]
    dense = {(r['model'], r['epochs'], r['seed']): r['acc'] for r in runs if r['sparsity'] is None}
    cells = {}
    for r in runs:
        if r['sparsity'] is None: continue
        key = (tuple(r['window']), r['model'], r['epochs'], r['sparsity'])
        cells.setdefault(key, {})[r['seed']] = 100 * (r['acc'] - dense[(r['model'], r['epochs'], r['seed'])])
    return cells


def _worst(cells, windows, budget=None):
    "{window: the largest mean loss over models and sparsities (at `budget`, or at any budget)}"
    return {w: min(sum(v.values()) / len(v) for k, v in cells.items() if k[0] == w and budget in (None, k[2]))
            for w in windows}


def test_default_window_loses_least_at_every_budget():
    "The default window is, at every budget of benchmarks/budgets*.json, within one validation image of the best"
    grid = _losses('budgets')  # 3 seeds, every window
    default = (agp().start_pct, agp().end_pct)
    pooled = _losses('budgets', 'budgets_check')  # the finalists again, with 7 more seeds
    n_seeds = {w: min(len(v) for k, v in pooled.items() if k[0] == w) for w in {k[0] for k in pooled}}
    finalists = [w for w, n in n_seeds.items() if n == max(n_seeds.values())]
    assert default in finalists and max(n_seeds.values()) >= 10, (default, n_seeds)
    worst3 = _worst(grid, {k[0] for k in grid})
    top = sorted(worst3, key=worst3.get, reverse=True)[:len(finalists)]
    fct.test_eq(set(top), set(finalists))  # the finalists are the best windows of the full grid
    for b in sorted({k[2] for k in pooled}):
        worst = _worst(pooled, finalists, b)
        best = max(worst, key=worst.get)
        assert worst[default] >= worst[best] - IMAGE, f"{b} epochs: {best} loses at most {-worst[best]:.2f} points, " \
                                                      f"the default {default} {-worst[default]:.2f}"


def test_gradual_schedules_share_the_default_window():
    for s in (agp(), linear(), cos(), iterative(), get_schedule('agp'), get_schedule('iterative')):
        fct.test_eq((s.start_pct, s.end_pct), (agp().start_pct, agp().end_pct))
