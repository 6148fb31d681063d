"Lottery tickets: rewind exactness, masks through every fit, controls, tickets on disk, resume, bad input"
import json, math
from functools import partial
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelStepException
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.metrics import accuracy
from fastai.optimizer import SGD, Adam
from fastai.torch_core import set_seed
from fasterprune.data import digits_arrays, TensorPairs, mlp, small_cnn, lenet_300_100
from fasterprune.lottery import (RewindCallback, MaskCallback, LotteryTicket, imp_masks, random_masks, apply_masks,
                                 weights_remaining, model_state, save_ticket, load_ticket, lottery_experiment,
                                 lottery_table, check_rate,
                                 plot_lottery)
from fasterprune.rewind import Rewinder
from fasterprune.cli import main


def _dls(flat=True, n=384, bs=64):
    xt, yt, xv, yv = digits_arrays(flat)
    return DataLoaders(DataLoader(TensorPairs(xt[:n], yt[:n]), bs=bs, shuffle=True, drop_last=True),
                       DataLoader(TensorPairs(xv, yv), bs=360), device=torch.device('cpu'))


def _learn(model=None, flat=True, opt=partial(SGD, mom=0.9), wd=None):
    learn = Learner(_dls(flat), model if model is not None else mlp(64, 32, 16, 10), loss_func=nn.CrossEntropyLoss(),
                    metrics=accuracy, opt_func=opt, wd=wd)
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    return learn


def _quiet_fit(learn, *args, **kw):
    with learn.no_logging(): learn.fit(*args, **kw)


class ZeroCheck(Callback):
    "Asserts after every optimizer step (after MaskCallback) that every masked weight is exactly zero"
    order, run_valid = 45, False
    def __init__(self, lt): self.lt, self.steps = lt, 0
    def after_step(self):
        mods = dict(self.learn.model.named_modules())
        for n, mk in self.lt.masks.items(): assert (mods[n].weight.detach()[~mk] == 0).all(), n
        self.steps += 1


# ---------------------------------------------------------------- rewinding

@pytest.mark.parametrize('k', [0, 3])
def test_rewind_exact_with_batchnorm(k):
    set_seed(0)
    learn = _learn(small_cnn(c=8), flat=False)
    keys = list(learn.model.state_dict())
    init = model_state(learn.model)
    lt = LotteryTicket(learn, rate=0.4, rewind_iter=k)
    _quiet_fit(learn, 1, 1e-2)
    rp = lt.rewind_point
    fct.test_eq(list(learn.model.state_dict()), keys)            # the rewind point is not in the model's state_dict
    fct.test_eq(int(rp['1.num_batches_tracked']), k)
    if k == 0: fct.test_eq(all(torch.equal(rp[n], init[n]) for n in init), True)
    else: fct.test_eq(torch.equal(rp['1.running_mean'], init['1.running_mean']), False)
    for _ in range(2):
        lt.next_round()
        sd = learn.model.state_dict()
        for n, v in rp.items():
            layer = n.rsplit('.', 1)[0]
            if n.endswith('.weight') and layer in lt.masks:
                mk = lt.masks[layer]
                fct.test_eq(torch.equal(sd[n][mk], v[mk]), True)        # survivors: bit for bit
                fct.test_eq(bool((sd[n][~mk] == 0).all()), True)
            else: fct.test_eq(torch.equal(sd[n], v), True)             # biases, BN affine and running statistics
        fct.test_eq(learn.opt, None)                                   # a fresh optimizer for the next fit
        _quiet_fit(learn, 1, 1e-2)
    fct.test_eq(lt.rewind_point is rp, True)                           # later fits never re-record


def test_rewind_iteration_beyond_first_fit():
    set_seed(0)
    learn = _learn()
    w0 = model_state(learn.model)
    LotteryTicket(learn, rewind_iter=6 * 2 + 1)  # 384 // 64 = 6 batches an epoch
    with pytest.raises(ValueError, match="beyond the fit's length of 12"): _quiet_fit(learn, 2, 1e-2)
    fct.test_eq(all(torch.equal(w0[n], v) for n, v in learn.model.state_dict().items()), True)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match='whole number of optimizer steps'): RewindCallback(bad)


class _Overflow(Callback):
    "Cancels the optimizer step of the first `n` batches the way fp16 MixedPrecision skips an overflowed step"
    order = 10  # MixedPrecision's
    def __init__(self, n=2): self.n = n
    def before_step(self):
        if self.train_iter < self.n: raise CancelStepException()


class _Steps(Callback):
    "The model's state after every optimizer step that really happened"
    order, run_valid = 50, False
    def before_fit(self): self.states, self._cancelled = [], False
    def after_cancel_step(self): self._cancelled = True
    def after_step(self):
        if not self._cancelled: self.states.append(model_state(self.learn.model))
        self._cancelled = False


def test_rewind_point_counts_steps_not_cancelled_ones():
    "fp16 skips an overflowed step (CancelStepException); RewindCallback(3) is the state after 3 real steps"
    set_seed(0)
    learn, cb, spy = _learn(), RewindCallback(3), _Steps()
    _quiet_fit(learn, 1, 1e-2, cbs=[_Overflow(2), cb, spy])
    fct.test_eq(len(spy.states), 6 - 2)
    fct.test_eq(all(torch.equal(v, spy.states[2][n]) for n, v in cb.state.items()), True)  # was after 1 real step


def test_rewind_iteration_counts_gradient_accumulation_steps():
    "With GradientAccumulation a fit has fewer steps than batches: a k it cannot reach is refused before training"
    set_seed(0)
    learn = _learn()
    w0 = model_state(learn.model)
    # 6 batches of 64 an epoch, a step per 256 samples carried over epochs: 1 step in epoch 1, 2 in epoch 2
    with pytest.raises(ValueError, match="beyond the fit's length of 3 optimizer steps"):
        _quiet_fit(learn, 2, 1e-2, cbs=[GradientAccumulation(256), RewindCallback(4)])  # (raised after both epochs)
    fct.test_eq(all(torch.equal(w0[n], v) for n, v in learn.model.state_dict().items()), True)
    cb, spy = RewindCallback(3), _Steps()
    _quiet_fit(learn, 2, 1e-2, cbs=[GradientAccumulation(256), cb, spy])  # the last step is reachable
    fct.test_eq(len(spy.states), 3)
    fct.test_eq(all(torch.equal(v, spy.states[2][n]) for n, v in cb.state.items()), True)


def test_rewind_iteration_counts_the_epochs_a_resumed_fit_trains():
    set_seed(0)
    learn = _learn()
    w0 = model_state(learn.model)
    with pytest.raises(ValueError, match="beyond the fit's length of 6"):  # 1 epoch of 6 batches, not 3
        _quiet_fit(learn, 3, 1e-2, start_epoch=2, cbs=RewindCallback(7))
    fct.test_eq(all(torch.equal(w0[n], v) for n, v in learn.model.state_dict().items()), True)


def test_runner_counts_gradient_accumulation_steps(tmp_path):
    "The runner's probe refuses a rewind iteration the first fit cannot reach before anything trains"
    def make(): return Learner(_dls(), mlp(64, 8, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                               cbs=GradientAccumulation(256))
    with pytest.raises(ValueError, match=r'beyond the first fit.*1 optimizer steps'):  # 6 batches, 1 step
        lottery_experiment(make, rounds=1, epochs=1, rewind_iter=2, json_path=tmp_path/'r.json', progress=False)
    fct.test_eq(list(tmp_path.iterdir()), [])


# ---------------------------------------------------------------- masks through every fit

@pytest.mark.parametrize('opt,wd,fresh', [(partial(SGD, mom=0.9), 1e-2, True), (Adam, 0.1, True),
                                          (partial(SGD, mom=0.9), None, False)])
def test_masks_stay_zero_after_every_step(opt, wd, fresh):
    set_seed(0)
    learn = _learn(opt=opt, wd=wd)
    lt = LotteryTicket(learn, rate=0.5, fresh_opt=fresh)
    chk = ZeroCheck(lt)
    _quiet_fit(learn, 1, 1e-2)
    prev = None
    for r in range(3):
        lt.next_round()
        if not fresh: fct.test_ne(learn.opt, None)
        _quiet_fit(learn, 2, 1e-2, cbs=chk)
        fct.test_close(lt.remaining(), 0.5 ** (r + 1), eps=2e-3)
        if prev is not None:  # masks only shrink
            for n in prev: fct.test_eq(bool((lt.masks[n] & ~prev[n]).any()), False)
        prev = {n: m.clone() for n, m in lt.masks.items()}
    fct.test_eq(chk.steps, 3 * 2 * 6)


def test_imp_masks_counts_and_contexts():
    set_seed(0)
    net = mlp(64, 48, 32, 10)
    m = None
    for r in range(4):
        kept = {n: (int(m[n].sum()) if m else net[int(n)].weight.numel()) for n in ('0', '2', '4')}
        new = imp_masks(net, m, 0.2, 'local', {'4': 0.1})
        fct.test_eq({n: int(v.sum()) for n, v in new.items()},
                    {n: max(1, math.floor(kept[n] * (0.9 if n == '4' else 0.8) + 0.5)) for n in kept})
        Rewinder(net).set_masks(new)
        m = new
    g = imp_masks(net, m, 0.3, 'global', {'4': 0.1})
    rest = int(m['0'].sum()) + int(m['2'].sum())
    fct.test_eq(int(g['0'].sum()) + int(g['2'].sum()), math.floor(rest * 0.7 + 0.5))
    fct.test_eq(int(g['4'].sum()), math.floor(int(m['4'].sum()) * 0.9 + 0.5))
    # global ranking: every kept weight of layers 0 and 2 is at least as large as every newly pruned one
    w = torch.cat([net[0].weight.detach().abs().flatten(), net[2].weight.detach().abs().flatten()])
    gk, mk = torch.cat([g['0'].flatten(), g['2'].flatten()]), torch.cat([m['0'].flatten(), m['2'].flatten()])
    fct.test_eq(bool(w[gk].min() >= w[mk & ~gk].max()), True)


def test_random_masks_same_counts_nested():
    set_seed(0)
    net = mlp(64, 48, 10)
    m1 = imp_masks(net, None, 0.5)
    Rewinder(net).set_masks(m1)
    m2 = imp_masks(net, m1, 0.5)
    r1, r2 = random_masks(m1, seed=3), random_masks(m2, seed=3)
    for n in m1:
        fct.test_eq(int(r1[n].sum()), int(m1[n].sum()))
        fct.test_eq(int(r2[n].sum()), int(m2[n].sum()))
        fct.test_eq(bool((r2[n] & ~r1[n]).any()), False)   # nested for a fixed seed
        fct.test_ne(r2[n], m2[n])
    fct.test_eq(random_masks(m2, seed=3)['0'], r2['0'])
    fct.test_ne(random_masks(m2, seed=4)['0'], r2['0'])


# ---------------------------------------------------------------- tickets on disk

def test_ticket_roundtrip_and_foreign_ticket(tmp_path):
    set_seed(0)
    learn = _learn(small_cnn(c=8), flat=False)
    lt = LotteryTicket(learn, rate=0.5, rewind_iter=2)
    _quiet_fit(learn, 1, 1e-2)
    lt.next_round()
    _quiet_fit(learn, 1, 1e-2)
    p = save_ticket(lt.ticket(), tmp_path/'t.pt')
    raw = torch.load(p, weights_only=True)                       # plain tensors only
    fct.test_eq(set(raw), {'round', 'rewind_iter', 'masks', 'bias_masks', 'norm_masks', 'rewind', 'weights'})
    for which, ref in (('weights', learn.model.state_dict()), ('rewind', None)):
        fresh = small_cnn(c=8)
        load_ticket(p, fresh, which)
        def masked(k, v): return v * lt.masks[k[:-7]] if k[:-7] in lt.masks and k.endswith('.weight') else v
        ref = ref if ref is not None else {k: masked(k, v) for k, v in lt.rewind_point.items()}
        fct.test_eq(all(torch.equal(fresh.state_dict()[k], v) for k, v in ref.items()), True)
    for other in (lenet_300_100(), small_cnn(c=16)):
        before = model_state(other)
        with pytest.raises(ValueError, match='another architecture'): load_ticket(p, other)
        fct.test_eq(all(torch.equal(before[k], v) for k, v in other.state_dict().items()), True)
    with pytest.raises(ValueError, match='which'): load_ticket(p, small_cnn(c=8), 'final')


# ---------------------------------------------------------------- the runner

def _make():
    return Learner(_dls(), mlp(64, 32, 16, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                   opt_func=partial(SGD, mom=0.9))

KW = dict(rate=0.5, epochs=1, lr=0.05, seeds=2, layer_rates={'4': 0.25}, progress=False)


def test_controls_same_schedule():
    seen = []
    def fit(learn, epochs, lr, cbs):
        mcb = [c for c in cbs if isinstance(c, MaskCallback)]
        seen.append(dict(masks=mcb[0].masks if mcb else None, init=model_state(learn.model)))
        learn.fit(epochs, lr, cbs=cbs)
    res = lottery_experiment(_make, rounds=2, fit=fit, **KW)
    fct.test_eq(len(seen), 2 + 2 * 2 * 3)                          # round 0: one fit a seed; then 3 arms a seed
    rewind = {0: seen[0]['init'], 1: seen[1]['init']}
    fct.test_ne(torch.equal(rewind[0]['0.weight'], rewind[1]['0.weight']), True)  # seeds differ
    for r in (1, 2):
        for i, s in enumerate((0, 1)):
            t, ri, ra = seen[2 + (r - 1) * 6 + 3 * i: 2 + (r - 1) * 6 + 3 * i + 3]
            fct.test_eq(_same(t['init'], _masked(rewind[s], t['masks'])), True)               # ticket: rewound, masked
            fct.test_eq(all(torch.equal(ri['masks'][n], t['masks'][n]) for n in t['masks']), True)  # reinit: same masks
            fct.test_eq(torch.equal(ri['init']['0.weight'], rewind[s]['0.weight']), False)           # ... fresh init
            fct.test_eq({n: int(m.sum()) for n, m in ra['masks'].items()},
                        {n: int(m.sum()) for n, m in t['masks'].items()})
            fct.test_eq(torch.equal(ra['masks']['0'], t['masks']['0']), False)  # random: other masks
            fct.test_eq(_same(ra['init'], _masked(rewind[s], ra['masks'])), True)            # ... same init
    rows = res['rows']
    fct.test_eq([r['round'] for r in rows], [0, 1, 2])
    fct.test_close([r['pct_remaining'] for r in rows], [100, remaining_pct(1), remaining_pct(2)], eps=1e-9)
    fct.test_eq(rows[0]['reinit_accs'], rows[0]['ticket_accs'])
    tbl = lottery_table(res)
    fct.test_eq(list(tbl.columns)[:3], ['round', 'pct_remaining', 'compression'])
    fct.test_eq(bool((tbl.compression.diff().dropna() > 0).all()), True)


def _masked(state, masks):
    "`state` with the weights of the masked layers zeroed where `masks` say so"
    return {k: v * masks[k[:-7]] if k.endswith('.weight') and k[:-7] in masks else v for k, v in state.items()}


def _same(a, b): return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def remaining_pct(r):
    "% kept by the runner's mlp(64, 32, 16, 10) after r rounds at 0.5 (output layer 0.25)"
    ks = [64 * 32, 32 * 16, 16 * 10]
    n = sum(ks)
    for _ in range(r): ks = [math.floor(k * f + 0.5) for k, f in zip(ks, (0.5, 0.5, 0.75))]
    return 100 * sum(ks) / n


KILL = dict(at=None, n=0)
def _fit_or_die(learn, epochs, lr, cbs):
    "A plain fit that raises KeyboardInterrupt at call number KILL['at'] (a killed process)"
    KILL['n'] += 1
    if KILL['n'] == KILL['at']: raise KeyboardInterrupt
    learn.fit(epochs, lr, cbs=cbs)


def test_resume_after_kill(tmp_path):
    kw = {**KW, 'fit': _fit_or_die}
    KILL.update(at=None, n=0)
    full = lottery_experiment(_make, rounds=3, **kw)
    js, st = tmp_path/'run.json', tmp_path/'run.state.pt'
    KILL.update(at=2 + 6 + 4, n=0)                               # killed in the middle of round 2
    with pytest.raises(KeyboardInterrupt): lottery_experiment(_make, rounds=3, json_path=js, **kw)
    fct.test_eq(len(torch.load(st, weights_only=True)['rows']), 2)   # rounds 0 and 1 finished
    fct.test_eq([r['round'] for r in json.loads(js.read_text())['rows']], [0, 1])
    KILL.update(at=None, n=0)
    res = lottery_experiment(_make, rounds=3, json_path=js, **kw)
    fct.test_eq(KILL['n'], 12)                                   # only rounds 2 and 3 ran
    fct.test_eq(res['rows'], full['rows'])                       # identical to the unbroken run
    fct.test_eq(json.loads(js.read_text())['rows'], json.loads(json.dumps(full['rows'])))
    # a finished run extended with more rounds continues after its last round
    js2 = tmp_path/'b.json'
    part = lottery_experiment(_make, rounds=1, json_path=js2, **kw)
    fct.test_eq(part['rows'], full['rows'][:2])
    KILL.update(n=0)
    more = lottery_experiment(_make, rounds=3, json_path=js2, **kw)
    fct.test_eq(KILL['n'], 12)
    fct.test_eq(more['rows'], full['rows'])
    KILL.update(n=0)
    fct.test_eq(lottery_experiment(_make, rounds=2, json_path=js2, **kw)['rows'], full['rows'][:3])
    fct.test_eq(KILL['n'], 0)                                    # nothing left to run


def test_bad_input_overwrites_nothing(tmp_path):
    js = tmp_path/'run.json'
    lottery_experiment(_make, rounds=1, json_path=js, **KW)
    st = tmp_path/'run.state.pt'
    before = (js.read_bytes(), st.read_bytes())
    kw = {**KW, 'json_path': js}
    for bad in (0, 1, 1.0, -0.2, 20, float('nan')):
        with pytest.raises(ValueError, match='rate'): lottery_experiment(_make, rounds=2, **{**kw, 'rate': bad})
    with pytest.raises(TypeError, match='rate must be a number'):
        lottery_experiment(_make, rounds=2, **{**kw, 'rate': '0.2'})
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match='rounds'): lottery_experiment(_make, rounds=bad, **kw)
    with pytest.raises(ValueError, match='beyond the first fit'):
        lottery_experiment(_make, rounds=2, rewind_iter=7, **kw)
    with pytest.raises(ValueError, match='other settings'): lottery_experiment(_make, rounds=2, **{**kw, 'epochs': 2})
    with pytest.raises(ValueError, match='unknown control'):
        lottery_experiment(_make, rounds=2, controls='shuffle', **{k: v for k, v in kw.items()})
    with pytest.raises(ValueError, match='matches no pruned layer'):
        lottery_experiment(_make, rounds=2, **{**kw, 'layer_rates': {'head': 0.1}})
    def foreign(): return Learner(_dls(), mlp(64, 40, 16, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with pytest.raises(ValueError, match='another architecture'):
        lottery_experiment(foreign, rounds=2, **{**kw, 'name': '_make'})
    fct.test_eq((js.read_bytes(), st.read_bytes()), before)
    with pytest.raises(ValueError, match='does not exist'):
        lottery_experiment(_make, rounds=1, **{**KW, 'json_path': tmp_path/'no'/'x.json'})
    def no_metric(): return Learner(_dls(), mlp(64, 8, 10), loss_func=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match='no metric'): lottery_experiment(no_metric, rounds=1, progress=False)
    fct.test_eq(check_rate(0.2), 0.2)


def test_cli_lth(tmp_path, capsys):
    js, png = tmp_path/'lth.json', tmp_path/'lth.png'
    fct.test_eq(main(['lth', '--rounds', '1', '--rate', '0.5', '--epochs', '1', '--controls', 'random',
                      '--json', str(js), '--plot', str(png)]), 0)
    out = capsys.readouterr().out
    assert 'ticket' in out and 'random' in out and png.stat().st_size > 0
    rows = json.loads(js.read_text())['rows']
    fct.test_eq(len(rows), 2)
    kept = round(0.5 * 64 * 300) + round(0.5 * 300 * 100) + round(0.75 * 1000)
    fct.test_close(rows[1]['pct_remaining'], 100 * kept / (64 * 300 + 300 * 100 + 1000), eps=1e-9)
    before = js.read_bytes()
    for args in (['--rate', '1.5'], ['--rate', '20'], ['--rounds', '0'], ['--rewind-iter', '100000'],
                 ['--controls', 'nope']):
        fct.test_eq(main(['lth', '--epochs', '1', '--json', str(js), *args]), 2)
        assert 'error' in capsys.readouterr().err
    fct.test_eq(js.read_bytes(), before)


def test_plot_lottery_leaves_no_pyplot_figure_open(tmp_path):
    "The CLI saves the plot: no figure may stay open in pyplot (it would show up in a later notebook cell)"
    import matplotlib.pyplot as plt
    rows = [dict(round=r, pct_remaining=100 * 0.5 ** r, compression=2. ** r, ticket_mean=0.9, ticket_std=0.01,
                 random_mean=0.8, random_std=0.02) for r in range(3)]
    res = dict(config=dict(name='mlp', rate=0.5, seeds=[0, 1], rewind_iter=0, arms=['ticket', 'random']), rows=rows)
    before = plt.get_fignums()
    fig = plot_lottery(res, tmp_path/'lth.png')
    fct.test_eq(plt.get_fignums(), before)
    assert (tmp_path/'lth.png').stat().st_size > 0
    ax = fig.axes[0]
    fct.test_eq([t.get_text() for t in ax.get_legend().get_texts()],
                ['ticket (rewind to iteration 0)', 'random pruning'])
    fct.test_eq(ax.get_xscale(), 'log')
