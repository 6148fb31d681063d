"""fasterprune against fasterai, measured in one run: the same data, models, seeds and schedules for both libraries.

    OMP_NUM_THREADS=1 nice -n 10 env PYTHONPATH=/tmp/fai .venv/bin/python benchmarks/bench_vs_fasterai.py \
        [--quick] [--seeds 3] [--pairs 5] [--json benchmarks/vs_fasterai.json]

fasterai is not a dependency of fasterprune. Install it outside the project's venv, e.g.
`.venv/bin/python -m pip install --target /tmp/fai --no-deps fasterai==0.4.1 einops torch-pruning==1.6.1`, and put
that folder on PYTHONPATH. Without it the script measures fasterprune alone and says so.

Rows (each library's own API; a failure of either is recorded as the row's result with the error's first line):
1 honest    LeNet-300-100 on digits, each callback asked for 90 % with its defaults: fasterprune SparsifyCallback(0.9);
            fasterai needs granularity, context, criteria and schedule ('weight', 'global', large_final, its AGP
            window 20 -> 100 %) and keeps its default layer_type=nn.Conv2d. The sparsity it reports (fasterai: its
            printed 'Final Sparsity') vs the zeros counted in every Linear weight.
2 exact     each library's sparsifier (the engine its callback drives) on an MLP and a small CNN, weight granularity,
            local and global, 50/90/97 % of the Conv/Linear weights (fasterai given layer_type=(Conv2d, Linear), so
            both prune the same layers): zeros counted minus the exact target (local: sum of round(s * n_layer);
            global: round(s * n)).
3 accuracy  dense, then the same AGP window (0 -> 50 % of training), epochs, lr and fit_one_cycle with each callback to
            90 % and 97 % (weight, global, magnitude): validation accuracy (mean of the seeds) and the zeros left, at a
            short and a longer budget (4 and 12 epochs). "fasterprune/1" is fasterprune with update_every=1 (a mask
            update at every step, as fasterai does; its default: callback.default_update_every).
            fasterai gets layer_type=(Conv2d, Linear) here (with its default it would leave the MLP dense).
4 overhead  bench_overhead.py's MLP fit (64-1024-1024-10, digits x4, bs 64, 3 epochs) dense and with each callback
            (90 %, weight, global, AGP: each its own AGP window, fasterprune 0 -> 50 %, fasterai 20 -> 100 %;
            fasterai with layer_type=nn.Linear), interleaved, median ratio of wall times.
5 filters   a small CNN trained with each callback at filter granularity to 50 % (local), then each library's way to
            make it smaller (fasterprune: Pruner(learn).compact(); fasterai: its torch-pruning Pruner at the same
            ratio): params, MACs, measured latency ratio vs dense, max |smaller - masked| output, accuracy.
            Latencies (rows 5 and 7): every model of the row in the same interleaved rounds, 1 thread: the median of
            the per-round ratios, and best-of (min / min), the steadier one on a loaded machine.
6 rewind    rewinding to iteration k (fasterprune: Pruner.keep_rewind_point(k); fasterai: SparsifyCallback(lth=True,
            rewind_epoch=e), whole epochs only): max |state after the rewind - (state at k) * mask| over every
            parameter and buffer (BatchNorm statistics included), the small CNN (c=16) on digits. fasterai is read
            right after its first rewind (one-shot prune at 50 % of a 3-epoch fit, rewind_epoch=1 = iteration 22).
7 sparse    the MLP 64-1024-1024-10 (batch 64) and the small CNN with c=64 (batch 256) at 95 % unstructured (local,
            each library's sparsifier on every Conv/Linear), then each library's way to run it faster on the CPU
            (fasterprune: to_sparse_inference; fasterai: misc.optimize_for_cpu, its CPU path; its ONNX export needs
            onnx/onnxruntime, not installed): measured speedup vs the masked model, 1 thread.
Timings are ratios measured in the same process, never absolute times. Nothing here is a test.
"""
import argparse, contextlib, copy, io, json, platform, statistics, sys, time, traceback, warnings
import numpy as np, torch, torch.nn as nn
import fastai
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
import fastai.callback.progress  # Learner.no_bar
import fastai.callback.schedule  # Learner.fit_one_cycle
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed
from fasterprune.callback import SparsifyCallback as FPCallback
from fasterprune.sparsifier import Sparsifier as FPSparsifier
from fasterprune.schedules import agp as fp_agp
from fasterprune.pruner import Pruner as FPPruner
from fasterprune.metrics import count_params, count_flops
from fasterprune.data import TensorPairs, digits_arrays, mlp, lenet_300_100, small_cnn

warnings.filterwarnings('ignore')
LAYERS = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------- fasterai, when found
def load_fasterai():
    "fasterai's modules as a dict, or (None, why)"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import fasterai
            from fasterai.sparse.sparsify_callback import SparsifyCallback
            from fasterai.sparse.sparsifier import Sparsifier
            from fasterai.core import criteria, schedule
        fa = dict(version=getattr(fasterai, '__version__', '?'), SparsifyCallback=SparsifyCallback,
                  Sparsifier=Sparsifier, large_final=criteria.large_final, Schedule=schedule.Schedule,
                  sched_agp=schedule.sched_agp, sched_oneshot=schedule.sched_oneshot)
        try:
            from fasterai.prune.pruner import Pruner
            fa['Pruner'] = Pruner
        except Exception as e: fa['Pruner_error'] = first_line(e)
        return fa, None
    except Exception as e: return None, first_line(e)


def first_line(e) -> str:
    s = f"{type(e).__name__}: {e}"
    return s.strip().splitlines()[0][:200]


@contextlib.contextmanager
def captured():
    "fasterai prints its reports; keep them (and ours) out of the table but readable"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): yield buf


def guarded(f, *args, **kw):
    "f's result, or {'error': first line} (the row keeps the failure as its result)"
    try: return f(*args, **kw)
    except Exception as e:
        if '--trace' in sys.argv: traceback.print_exc()
        return {'error': first_line(e)}


# ---------------------------------------------------------------- data and models
def dls_digits(seed, flat=True, bs=64, repeat=1):
    set_seed(seed, reproducible=True)
    xt, yt, xv, yv = digits_arrays(flat=flat, repeat=repeat)
    return DataLoaders(DataLoader(TensorPairs(xt, yt), bs=bs, shuffle=True, drop_last=True),
                       DataLoader(TensorPairs(xv, yv), bs=bs * 2), device=torch.device('cpu'))


def learner(model_fn, seed, flat=True, **kw):
    dls = dls_digits(seed, flat, **kw)
    set_seed(seed, reproducible=True)
    return Learner(dls, model_fn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)


def cnn(c=32): return lambda: small_cnn(c=c)


def weight_zeros(model, types=LAYERS):
    "(zeros, total) over the weights of every layer of `types`"
    ws = [m.weight for m in model.modules() if isinstance(m, types)]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def fit(learn, epochs, lr, cbs, one_cycle=True):
    with learn.no_bar(), learn.no_logging(), captured() as out:
        (learn.fit_one_cycle if one_cycle else learn.fit)(epochs, lr, cbs=cbs)
    return out.getvalue()


def valid_acc(learn):
    with learn.no_bar(), learn.no_logging(), captured(): return float(learn.validate()[1])


def fa_sched(fa, start=0., end=0.5, fn='sched_agp'):
    "a fresh fasterai Schedule (its module-level ones are shared, mutable singletons)"
    return fa['Schedule'](fa[fn], start_pct=start, end_pct=end)


def fa_cb(fa, sparsity, granularity='weight', context='global', schedule=None, **kw):
    return fa['SparsifyCallback'](sparsity, granularity, context, fa['large_final'], schedule or fa_sched(fa), **kw)


# ---------------------------------------------------------------- 1 honest reporting
def honest(lib, fa, epochs):
    learn = learner(lenet_300_100, 0)
    if lib == 'fasterprune':
        cb = FPCallback(0.9)  # every default
        fit(learn, epochs, 1e-2, cb)
        reported, how = cb.sparsifier.sparsity(), 'sparsifier.sparsity() (and the progress table)'
    else:
        cb = fa['SparsifyCallback'](0.9, 'weight', 'global', fa['large_final'], fa_sched(fa, 0.2, 1.))  # its agp window
        out = fit(learn, epochs, 1e-2, cb)
        lines = [l for l in out.splitlines() if l.startswith('Final Sparsity:')]
        if not lines: raise RuntimeError("no 'Final Sparsity:' line printed")
        reported, how = float(lines[-1].split(':')[1].strip().rstrip('%')) / 100, "its printed 'Final Sparsity'"
    z, n = weight_zeros(learn.model, nn.Linear)
    return dict(reported=reported, counted=z / n, zeros=z, weights=n, reported_by=how, acc=valid_acc(learn))


# ---------------------------------------------------------------- 2 exact sparsity
def target_zeros(model, s, context):
    ns = [m.weight.numel() for m in model.modules() if isinstance(m, LAYERS)]
    return sum(round(s * n) for n in ns) if context == 'local' else round(s * sum(ns))


def exact(lib, fa, model_fn, s, context):
    set_seed(0, reproducible=True)
    model = model_fn()
    with captured():
        if lib == 'fasterprune': FPSparsifier(model, 'weight', context).sparsify(s)
        else: fa['Sparsifier'](model, 'weight', context, fa['large_final'], layer_type=LAYERS).sparsify_model(s)
    z, n = weight_zeros(model)
    t = target_zeros(model, s, context)
    return dict(zeros=z, target=t, diff=z - t, weights=n)


# ---------------------------------------------------------------- 3 accuracy
def accuracy_run(lib, fa, model_fn, flat, s, seed, epochs, lr):
    learn = learner(model_fn, seed, flat)
    if lib == 'dense': cbs = []
    elif lib == 'fasterprune': cbs = FPCallback(s, 'weight', 'global', 'magnitude', fp_agp(0., 0.5))
    elif lib == 'fasterprune/1':  # a mask update at every step, as fasterai does (default: default_update_every)
        cbs = FPCallback(s, 'weight', 'global', 'magnitude', fp_agp(0., 0.5), update_every=1)
    else: cbs = fa_cb(fa, s, layer_type=LAYERS)  # both prune every Conv and Linear
    fit(learn, epochs, lr, cbs)
    z, n = weight_zeros(learn.model)
    return dict(acc=valid_acc(learn), sparsity=z / n, diff=z - (round(s * n) if lib != 'dense' else 0))


# ---------------------------------------------------------------- 4 overhead (bench_overhead.py's MLP set-up)
def overhead_learner():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = np.tile(x / 16., (4, 1)).astype(np.float32), np.tile(y, 4)
    x, y = torch.tensor(x), torch.tensor(y)
    set_seed(0, reproducible=True)
    dls = DataLoaders(DataLoader(TensorPairs(x[:6400], y[:6400]), bs=64, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(x[6400:], y[6400:]), bs=128), device=torch.device('cpu'))
    return Learner(dls, mlp(64, 1024, 1024, 10), loss_func=nn.CrossEntropyLoss())


def timed_fit(lib, fa, epochs):
    learn = overhead_learner()
    if lib == 'dense': cbs = []
    elif lib == 'fasterprune': cbs = [FPCallback(0.9, 'weight', 'global', 'magnitude', 'agp')]
    else: cbs = [fa_cb(fa, 0.9, layer_type=nn.Linear, schedule=fa_sched(fa, 0.2, 1.))]  # its own agp window
    with learn.no_bar(), learn.no_logging(), captured():
        t = time.perf_counter()
        learn.fit(epochs, 1e-3, cbs=cbs)
        dt = time.perf_counter() - t
    return dt, weight_zeros(learn.model)[0] / weight_zeros(learn.model)[1]


def overhead(libs, fa, pairs, epochs):
    timed_fit('dense', fa, 1)  # warm-up
    ratios = {l: [] for l in libs}
    errors = {}
    for i in range(pairs):
        order = ['dense'] + libs if i % 2 == 0 else libs[::-1] + ['dense']
        times = {}
        for l in order:
            if l in errors: continue
            try: times[l] = timed_fit(l, fa, epochs)
            except Exception as e: errors[l] = first_line(e)
        for l in libs:
            if l in times: ratios[l].append(times[l][0] / times['dense'][0])
        print(f"  overhead pair {i}: " + ", ".join(f"{l} {times[l][0]:.2f}s" for l in times), flush=True)
    res = {}
    for l in libs:
        if l in errors: res[l] = {'error': errors[l]}
        else: res[l] = dict(ratio=statistics.median(ratios[l]), ratios=ratios[l])
    return res


# ---------------------------------------------------------------- 5 filter pruning to a smaller model
def filters(lib, fa, epochs, c, bs_lat):
    learn = learner(cnn(c), 0, flat=False)
    dense = copy.deepcopy(learn.model).eval()
    if lib == 'fasterprune': cb = FPCallback(0.5, 'filter', 'local', 'magnitude', fp_agp(0., 0.5))
    else: cb = fa_cb(fa, 0.5, 'filter', 'local')  # its default layer_type is Conv2d: the convs, as ours
    fit(learn, epochs, 1e-2, cb)
    masked = copy.deepcopy(learn.model).eval()
    acc_masked = valid_acc(learn)
    xv = learn.dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    res = dict(acc_masked=acc_masked)
    try:
        with captured():
            if lib == 'fasterprune': FPPruner(learn).compact()
            else:
                if 'Pruner' not in fa: raise ImportError(fa['Pruner_error'])
                pr = fa['Pruner'](learn.model, 0.5, 'local', fa['large_final'], example_inputs=xv[:16])
                pr.prune_model()
    except Exception as e:
        res['error'] = first_line(e)
        return res
    small = learn.model.eval()
    with torch.no_grad(): diff = float((small(xv) - masked(xv)).abs().max())
    x = torch.randn(bs_lat, 1, 8, 8)
    p_d, p_s = count_params(dense)[0], count_params(small)[0]
    m_d, m_s = count_flops(dense, x[:1])[0], count_flops(small, x[:1])[0]
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    zero_filters = sum(int((m.weight.flatten(1) == 0).all(1).sum()) for m in convs)
    zeroed = [int((m.weight.flatten(1) == 0).all(1).sum()) for m in masked.modules() if isinstance(m, nn.Conv2d)]
    removed = [d.out_channels - m.out_channels for d, m in zip([m for m in dense.modules() if isinstance(m, nn.Conv2d)],
                                                               convs)]
    res.update(zeroed_filters=zeroed, removed_filters=removed,
               live_filters_removed=sum(max(r - z, 0) for r, z in zip(removed, zeroed)))
    res.update(zero_filters_left=zero_filters, params=p_s, params_frac=p_s / p_d, macs=m_s, macs_frac=m_s / m_d,
               max_abs_diff=diff, _models=dict(dense=dense, small=small, x=x),
               acc_small=valid_acc(learn),
               widths=[m.out_channels for m in convs])
    return res


# ---------------------------------------------------------------- 6 rewinding to an iteration
def state_copy(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rewind_diff(model, snap, masks):
    "max |state - snap * mask| over the Conv/Linear parameters, and over the norm layers' parameters and buffers"
    kinds = {n: ('layers' if isinstance(m, LAYERS) else 'norms') for n, m in model.named_modules()}
    worst = dict(layers=0., norms=0., worst_key=None)
    top = -1.
    for k, v in model.state_dict().items():
        # a library's own `_` buffers (masks, saved weights) are not the model's state
        if not v.is_floating_point() or k.rsplit('.', 1)[-1].startswith('_'): continue
        ref = snap[k] * masks[k] if k in masks else snap[k]
        d = float((v - ref).abs().max())
        kind = kinds[k.rsplit('.', 1)[0]]
        worst[kind] = max(worst[kind], d)
        if d > max(top, 0.): top, worst['worst_key'] = d, k  # None when the state matches exactly
    worst['max_abs_diff'] = max(worst['layers'], worst['norms'])
    return worst


class Snap(Callback):
    "keep the model's state after optimizer step `k` of the fit"
    order = 99
    def __init__(self, k): self.k, self.n, self.state = k, 0, None
    def after_step(self):
        self.n += 1
        if self.n == self.k: self.state = state_copy(self.learn.model)


def rewind_fp(k, epochs):
    learn = learner(cnn(16), 0, flat=False)
    pruner = FPPruner(learn).keep_rewind_point(k)
    snap = Snap(k)
    fit(learn, epochs, 1e-2, snap, one_cycle=False)
    with captured():
        pruner.prune_weights(0.5)
        pruner.rewind()
    masks = {f'{n}.weight': (m.weight != 0).float() for n, m in learn.model.named_modules() if isinstance(m, LAYERS)}
    z, n = weight_zeros(learn.model)
    return dict(iteration=k, pruned=z / n, **rewind_diff(learn.model, snap.state, masks))


class FaProbe(Callback):
    "state at the start of fasterai's rewind epoch, and the model right after its first rewind"
    order = 99
    def __init__(self, cb, epoch): self.cb, self.epoch, self.snap, self.due, self.diff = cb, epoch, None, False, None
    def before_epoch(self):
        if self.epoch == self.learn.epoch: self.snap = state_copy(self.learn.model)
    def before_batch(self): self.due = self.training and self.cb.schedule.changed
    def after_step(self):
        if self.due and self.diff is None and self.snap is not None:
            m = self.learn.model
            masks = {f'{n}.weight': m_._mask.float() for n, m_ in m.named_modules() if hasattr(m_, '_mask')}
            self.diff = rewind_diff(m, self.snap, masks)


def rewind_fa(fa, epoch, epochs, steps_per_epoch):
    learn = learner(cnn(16), 0, flat=False)
    cb = fa_cb(fa, 0.5, 'weight', 'local', schedule=fa_sched(fa, 0.5, 0.5, 'sched_oneshot'), lth=True,
               rewind_epoch=epoch)
    probe = FaProbe(cb, epoch)
    fit(learn, epochs, 1e-2, [cb, probe], one_cycle=False)
    if probe.diff is None: raise RuntimeError("fasterai never rewound during the fit")
    return dict(iteration=epoch * steps_per_epoch, **probe.diff)


# ---------------------------------------------------------------- 7 unstructured zeros made faster
def sparse_speed(lib, fa, kind, s, bs):
    "each library's path from a masked model to a faster one at inference: speedup vs the masked model, output error"
    set_seed(0, reproducible=True)
    model = (mlp(64, 1024, 1024, 10) if kind == 'mlp' else small_cnn(c=64)).eval()
    x = torch.randn(bs, 64) if kind == 'mlp' else torch.randn(bs, 1, 8, 8)
    with captured():
        if lib == 'fasterprune':
            from fasterprune.inference import to_sparse_inference
            FPSparsifier(model, 'weight', 'local').sparsify(s)
            fast, how = to_sparse_inference(model, x, threads=1), 'to_sparse_inference (sparse kernels where faster)'
        else:
            from fasterai.misc.cpu_optimizer import optimize_for_cpu
            fa['Sparsifier'](model, 'weight', 'local', fa['large_final'], layer_type=LAYERS).sparsify_model(s)
            fast, how = optimize_for_cpu(model, x, backend='trace'), 'misc.optimize_for_cpu (torch.jit.trace)'
    with torch.no_grad(): diff = float((fast(x) - model(x)).abs().max())
    return dict(_models=dict(masked=model, fast=fast, x=x), max_abs_diff=diff, how=how,
                sparsity=weight_zeros(model)[0] / weight_zeros(model)[1])


# ---------------------------------------------------------------- latency, every model of a row in the same rounds
def joint_speedups(x, pairs, n_runs=50, reps=3):
    """{name: {median: median over rounds of t(reference) / t(model), best: min t(reference) / min t(model)}}, every
    model timed in the same interleaved rounds (the order rotates each round), so that load on a shared machine hits
    them alike. `pairs` is {name: (reference module, module)}; `x` the input; reps passes per timing; 1 CPU thread."""
    mods = {}
    for name, (ref, m) in pairs.items(): mods[f'{name}/ref'], mods[name] = ref, m
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {k: [] for k in mods}
    try:
        with torch.no_grad():
            for m in mods.values():
                for _ in range(5): m(x)
            keys = list(mods)
            for r in range(n_runs):
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                    t = time.perf_counter()
                    for _ in range(reps): mods[k](x)
                    times[k].append(time.perf_counter() - t)
    finally: torch.set_num_threads(threads)
    return {name: dict(median=statistics.median(a / b for a, b in zip(times[f'{name}/ref'], times[name])),
                       best=min(times[f'{name}/ref']) / min(times[name])) for name in pairs}


def add_speedups(by_lib, ref_key, new_key):
    "measure the row's libraries together and store `speedup` in each; the models are dropped from the results"
    ok = {l: r.pop('_models') for l, r in by_lib.items() if '_models' in r}
    if not ok: return
    x = next(iter(ok.values()))['x']
    sp = guarded(joint_speedups, x, {l: (m[ref_key], m[new_key]) for l, m in ok.items()})
    for l in ok:
        if 'error' in sp: by_lib[l]['error'] = 'timing: ' + sp['error']
        else: by_lib[l].update(speedup=sp[l]['median'], speedup_best=sp[l]['best'])


# ---------------------------------------------------------------- the table
def fmt(r, f):
    if r is None: return 'not run'
    if isinstance(r, dict) and 'error' in r: return 'ERROR ' + r['error']
    try: return f(r)
    except Exception as e: return f'? {first_line(e)}'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='fewer epochs, 1 seed, 1 overhead pair (< 2 min)')
    p.add_argument('--seeds', type=int, default=None, help='seeds of the accuracy row (default 3, quick 1)')
    p.add_argument('--pairs', type=int, default=None, help='interleaved overhead pairs (default 5, quick 1)')
    p.add_argument('--json', default=None, help='write every figure to this JSON file')
    p.add_argument('--trace', action='store_true', help='print the tracebacks of failures')
    a = p.parse_args()
    q = a.quick
    seeds = a.seeds or (1 if q else 3)
    pairs = a.pairs or (1 if q else 5)
    ep_acc, ep_hon, ep_ovh, ep_fil = ((4,), 2, 1, 4) if q else ((4, 12), 4, 3, 12)
    fa, why = load_fasterai()
    libs = ['fasterprune'] + (['fasterai'] if fa else [])
    meta = dict(torch=torch.__version__, fastai=fastai.__version__, fasterai=fa['version'] if fa else None,
                threads=torch.get_num_threads(), python=platform.python_version(), quick=q, seeds=seeds,
                pairs=pairs, epochs=dict(accuracy=ep_acc, honest=ep_hon, overhead=ep_ovh, filters=ep_fil))
    print(f"torch {meta['torch']}, fastai {meta['fastai']}, fasterai {meta['fasterai']}, {meta['threads']} threads")
    if not fa: print(f"fasterai not found ({why}): measuring fasterprune alone (PYTHONPATH=/tmp/fai to compare)")
    R = dict(meta=meta)
    t0 = time.perf_counter()

    def stage(name):
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}", flush=True)

    stage('1 honest reporting')
    R['honest'] = {l: guarded(honest, l, fa, ep_hon) for l in libs}

    stage('2 exact sparsity')
    R['exact'] = {}
    for mname, mfn in (('mlp', lenet_300_100), ('cnn', cnn(32))):
        for ctx in ('local', 'global'):
            for s in (0.5, 0.9, 0.97):
                R['exact'][f'{mname} {ctx} {s}'] = {l: guarded(exact, l, fa, mfn, s, ctx) for l in libs}

    stage('3 accuracy')
    R['accuracy'] = {}
    variants = ['fasterprune', 'fasterprune/1'] + libs[1:]
    for ep in ep_acc:
        for mname, mfn, flat in (('mlp', lenet_300_100, True), ('cnn', cnn(32), False)):
            runs = {'dense': [guarded(accuracy_run, 'dense', fa, mfn, flat, 0, sd, ep, 1e-2) for sd in range(seeds)]}
            for sp in (0.9, 0.97):
                for v in variants:
                    runs[f'{v} {sp}'] = [guarded(accuracy_run, v, fa, mfn, flat, sp, sd, ep, 1e-2)
                                         for sd in range(seeds)]
            for k, rs in runs.items():
                ok = [r for r in rs if 'error' not in r]
                R['accuracy'][f'{mname} {ep} {k}'] = (dict(acc=statistics.mean(r['acc'] for r in ok),
                                                           acc_std=statistics.pstdev(r['acc'] for r in ok),
                                                           sparsity=statistics.mean(r['sparsity'] for r in ok),
                                                           diff=[r['diff'] for r in ok], accs=[r['acc'] for r in ok])
                                                      if ok else rs[0])

    stage('4 per-fit overhead')
    R['overhead'] = overhead(libs, fa, pairs, ep_ovh)

    stage('5 filter pruning to a smaller model')
    R['filters'] = {l: guarded(filters, l, fa, ep_fil, 64, 256) for l in libs}
    add_speedups(R['filters'], 'dense', 'small')

    stage('6 rewinding to an iteration')
    spe = len(dls_digits(0, flat=False).train)
    R['rewind'] = {'fasterprune': guarded(rewind_fp, spe, 3), 'fasterprune any k': guarded(rewind_fp, 7, 3)}
    if fa:
        R['rewind']['fasterai'] = guarded(rewind_fa, fa, 1, 3, spe)
        R['rewind']['fasterai any k'] = {'error': 'no API: SparsifyCallback takes rewind_epoch, a whole epoch '
                                                  f'(k = e * {spe} steps here); iteration 7 cannot be asked for'}
    stage('7 unstructured zeros made faster')
    R['sparse'] = {k: {l: guarded(sparse_speed, l, fa, k, 0.95, bs) for l in libs}
                   for k, bs in (('mlp', 64), ('cnn', 256))}
    for by in R['sparse'].values(): add_speedups(by, 'masked', 'fast')
    meta['seconds'] = time.perf_counter() - t0
    stage('done')

    # ------------------------------------------------------------ print one table
    rows = []
    def add(case, lib, value): rows.append((case, lib, value))
    for l, r in R['honest'].items():
        add('1 honest: MLP, defaults, 90 %', l,
            fmt(r, lambda r: f"reports {r['reported']:.2%}, Linear weights hold {r['counted']:.2%} zeros "
                             f"({r['zeros']:,}/{r['weights']:,}); acc {r['acc']:.3f}"))
    for case, by in R['exact'].items():
        for l, r in by.items():
            add(f'2 exact: {case}', l, fmt(r, lambda r: f"zeros - target = {r['diff']:+d} ({r['zeros']:,} / "
                                                        f"{r['target']:,}, {r['zeros'] / r['weights']:.4%})"))
    for case, r in R['accuracy'].items():
        mname, ep, lib, *s = case.split(' ')
        add(f"3 accuracy: {mname}, {ep} epochs, {s[0] if s else 'dense'}", lib,
            fmt(r, lambda r: f"acc {r['acc']:.4f} ± {r['acc_std']:.4f} (n={len(r['accs'])}), "
                             f"zeros {r['sparsity']:.4%}, zeros - target {r['diff']}"))
    for l, r in R['overhead'].items():
        add('4 overhead: fit / dense fit', l,
            fmt(r, lambda r: f"median {r['ratio']:.3f}x  ({', '.join(f'{x:.3f}' for x in r['ratios'])})"))
    for l, r in R['filters'].items():
        add('5 filters 50 % -> smaller CNN', l,
            fmt(r, lambda r: (f"ERROR {r['error']} (masked acc {r['acc_masked']:.3f})" if 'error' in r else
                              f"params {r['params_frac']:.3f}, MACs {r['macs_frac']:.3f} of dense, "
                              f"{r['speedup']:.2f}x faster (best-of {r['speedup_best']:.2f}x), "
                              f"max|small - masked| {r['max_abs_diff']:.2e}, "
                              f"acc masked {r['acc_masked']:.3f} -> small {r['acc_small']:.3f}, "
                              f"filters zeroed {r['zeroed_filters']} removed {r['removed_filters']} (live ones "
                              f"removed {r['live_filters_removed']}, zero ones left {r['zero_filters_left']})")))
    for l, r in R['rewind'].items():
        add('6 rewind to iteration k', l,
            fmt(r, lambda r: f"k={r['iteration']}: max|state - state_k*mask| {r['max_abs_diff']:.2e} (Conv/Linear "
                             f"{r['layers']:.2e}, BatchNorm {r['norms']:.2e}; worst {r['worst_key']})"))
    for (k, by), case in zip(R['sparse'].items(), ('MLP 64-1024-1024-10, bs 64', 'small CNN c=64, bs 256')):
        for l, r in by.items():
            add(f'7 95 % unstructured: {case}', l,
                fmt(r, lambda r: f"{r['speedup']:.2f}x (best-of {r['speedup_best']:.2f}x) vs the masked model, "
                                 f"max|fast - masked| {r['max_abs_diff']:.2e}; {r['how']}"))
    w0 = max(len(c) for c, _, _ in rows)
    w1 = max(len(l) for _, l, _ in rows)
    print(f"\n{'case':<{w0}}  {'library':<{w1}}  result")
    prev = None
    for c, l, v in rows:
        print(f"{c if c != prev else '':<{w0}}  {l:<{w1}}  {v}")
        prev = c
    print(f"\n{meta['seconds']:.0f} s in all")
    if a.json:
        with open(a.json, 'w') as f: json.dump(R, f, indent=1, default=str)
        print(f"wrote {a.json}")


if __name__ == '__main__': main()
