"Property tests of schedules: monotone, in [0, 1], exactly 1 from end_pct on"
import math
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
