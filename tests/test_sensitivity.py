"Per-layer sensitivity scans and the targets derived from them, as a user runs them (a Learner, a plain model)"
import math
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
import fastcore.test as fct
from fasterprune.callback import SparsifyCallback
from fasterprune.data import digits_arrays, digits_dls, mlp, small_cnn
from fasterprune.sensitivity import sensitivity, targets_from_sensitivity, SensitivityScan


def _state(model): return {k: v.clone() for k, v in model.state_dict().items()}

def _same(model, before):
    now = model.state_dict()
    fct.test_eq(set(now), set(before))
    for k, v in now.items(): assert torch.equal(v, before[k]), f"{k} changed"


@pytest.fixture(scope='module')
def digits():
    return digits_arrays()


def _learner(sizes=(64, 48, 24, 10), epochs=2, seed=0, **kw):
    torch.manual_seed(seed)
    learn = Learner(digits_dls(), mlp(*sizes), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, **kw)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 3e-3)
    return learn


def _val_accuracy(xv, yv):
    def val_accuracy(model): return (model(xv).argmax(1) == yv).float().mean()
    return val_accuracy


def test_scan_leaves_learner_bit_identical():
    "After the scan: the same weights bit for bit, train mode, the Recorder's history, pct_train"
    learn = _learner()
    learn.model.train()
    fresh = Learner(learn.dls, mlp(64, 48, 24, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    sensitivity(fresh, ratios=(0.5,), show_progress=False)
    assert 'final_record' not in fresh.__dict__  # a Learner that never ran: nothing of validate's stays behind
    before, values, pct, bar = _state(learn.model), list(learn.recorder.values), learn.pct_train, learn.progress
    scan = sensitivity(learn, ratios=(0.5, 0.9), show_progress=False)
    _same(learn.model, before)
    assert learn.progress is bar and bar in learn.cbs  # fastai's progress bar is off during the scan only
    assert all(m.training for m in learn.model.modules())
    fct.test_eq(learn.recorder.values, values)  # validate() alone would have emptied it
    fct.test_eq(learn.pct_train, pct)
    fct.test_eq(len(scan), 3 * 2)
    fct.test_eq(list(scan.columns), ['layer', 'ratio', 'metric', 'delta', 'drop', 'params', 'group_size'])
    fct.test_eq(scan.attrs['metric'], 'accuracy')
    assert isinstance(scan, SensitivityScan)
    # the scan really pruned: at 90 % of a layer the accuracy moves for at least one layer
    assert (scan['delta'] != 0).any()


def test_scan_restores_when_the_metric_raises(digits):
    "An evaluation that fails in the middle of the scan: the error reaches the caller, the pruned layer comes back"
    xt, yt, xv, yv = digits
    torch.manual_seed(0)
    model = mlp(64, 32, 10)
    before, calls = _state(model), []
    acc = _val_accuracy(xv, yv)
    def flaky(m):
        calls.append(float((m[0].weight == 0).float().mean()))  # the first layer's zeros at this evaluation
        if len(calls) == 3: raise RuntimeError("device lost")
        return acc(m)
    with pytest.raises(RuntimeError, match='device lost'): sensitivity(model, ratios=(0.25, 0.5), metric=flaky,
                                                                       show_progress=False)
    fct.test_eq(calls, [0., 0.25, 0.5])  # it raised while the first layer was half pruned
    _same(model, before)


def test_reparametrized_weights_come_back(digits):
    "weight_norm (parametrization) and torch.nn.utils.prune layers: the tensors behind the weight are restored"
    xt, yt, xv, yv = digits
    torch.manual_seed(0)
    model = mlp(64, 32, 16, 10)
    torch.nn.utils.parametrizations.weight_norm(model[0])
    torch.nn.utils.prune.l1_unstructured(model[2], 'weight', 0.2)
    before, w2 = _state(model), model[2].weight.clone()  # prune's weight: an attribute its hook recomputes
    out = model(xv)
    scan = sensitivity(model, ratios=(0.5, 0.9), metric=_val_accuracy(xv, yv), show_progress=False)
    _same(model, before)
    fct.test_eq(scan['layer'].unique().tolist(), ['0', '2', '4'])
    sensitivity(model, ratios=(0.5,), layers=['2'], metric=_val_accuracy(xv, yv), show_progress=False)
    _same(model, before)
    assert torch.equal(model[2].weight, w2)  # the last forward ran on it pruned: the attribute is put back too
    assert torch.equal(model(xv), out)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)
    def forward(self, x): return self.fc(self.att(x, x, x)[0].mean(1))


def test_attention_projections_scanned_and_restored():
    "attention=True scans MultiheadAttention's in_proj_weight under the Sparsifier's name, and puts it back"
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(4, 5, 16)
    before, out = _state(model), model(x)
    zeros = []
    def metric(m):
        zeros.append(float((m.att.in_proj_weight == 0).float().mean()))
        return m(x).abs().mean()
    scan = sensitivity(model, ratios=(0.5,), metric=metric, attention=True, show_progress=False)
    fct.test_eq(scan['layer'].tolist(), ['att.in_proj_weight', 'att.out_proj', 'fc'])
    fct.test_eq(zeros, [0., 0.5, 0., 0.])
    _same(model, before)
    assert torch.equal(model(x), out)


class _Fragile(nn.Module):
    "fc1's small weights read the live inputs, its large ones inputs that are always 0: magnitude pruning hurts it most"
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32)  # 512 weights each
        with torch.no_grad():
            for l in (self.fc1, self.fc2, self.fc3):
                l.weight.copy_(torch.randn(l.weight.shape, generator=g) / math.sqrt(l.in_features))
                l.bias.zero_()
            self.fc1.weight[:, :8] *= 0.01  # live inputs, small weights
            self.fc1.weight[:, 8:] *= 10    # dead inputs, large weights
    def forward(self, x): return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x) * 100))))


def test_fragile_layer_ranks_most_sensitive():
    "The layer made fragile has the largest drops, and the budget gives it the smallest target (layers of one size)"
    model = _Fragile()
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    x[:, 8:] = 0
    with torch.no_grad(): y = model(x).argmax(1)
    def agreement(m): return (m(x).argmax(1) == y).float().mean()
    scan = sensitivity(model, ratios=(0.25, 0.5, 0.75), metric=agreement, show_progress=False)
    mean_drop = scan.groupby('layer')['drop'].mean()
    fct.test_eq(mean_drop.idxmax(), 'fc1')
    at_half = scan[scan.ratio == 0.5].set_index('layer')['drop']
    assert at_half['fc1'] > 0.3 and at_half['fc1'] > 3 * max(at_half['fc2'], at_half['fc3']), at_half
    t = targets_from_sensitivity(scan, budget=0.5)
    fct.test_eq(min(t, key=t.get), 'fc1')


def test_targets_meet_the_budget_in_the_callback():
    "targets_from_sensitivity(budget=) fed to SparsifyCallback(context='local'): the zeros add up to the budget exactly"
    learn = _learner(sizes=(64, 33, 17, 10))  # 2112 + 561 + 170 weights: no round numbers
    scan = sensitivity(learn, ratios=(0.5, 0.8, 0.95, 0.99), show_progress=False)
    n_w = scan.groupby('layer', sort=False)['params'].first()
    for budget in (0.85, 0.613):
        t = targets_from_sensitivity(scan, budget=budget)
        fct.test_eq(list(t), ['0', '2', '4'])
        learn2 = Learner(learn.dls, mlp(64, 33, 17, 10), loss_func=nn.CrossEntropyLoss())
        learn2.model.load_state_dict(learn.model.state_dict())
        cb = SparsifyCallback(sparsity=t, context='local', schedule='one_shot', show_sparsity=False)
        with learn2.no_bar(), learn2.no_logging(): learn2.fit(1, 1e-3, cbs=cb)
        zeros = {n: int((m.weight == 0).sum()) for n, m in learn2.model.named_children() if isinstance(m, nn.Linear)}
        fct.test_eq(sum(zeros.values()), round(budget * n_w.sum() + 1e-9))
        for n, z in zeros.items(): fct.test_eq(z, round(t[n] * n_w[n]))  # each layer at its own target


def test_budget_follows_the_curves():
    "Equal drop: a flat curve takes more than a steep one; a budget the scanned ratios cannot reach is refused"
    rows = []
    for layer, drops in (('flat', (0., 0.01, 0.02)), ('steep', (0.05, 0.3, 0.6))):
        for r, d in zip((0.5, 0.8, 0.95), drops):
            rows.append(dict(layer=layer, ratio=r, metric=0.9 - d, delta=-d, drop=d, params=1000, group_size=1))
    scan = pd.DataFrame(rows)
    t = targets_from_sensitivity(scan, budget=0.6)
    fct.test_eq(round(t['flat'] * 1000) + round(t['steep'] * 1000), 1200)
    fct.test_eq(t['flat'], 0.95)  # its whole curve stays under the steep layer's first drop
    fct.test_eq(t['steep'], 0.25)
    with pytest.raises(ValueError, match=r'out of reach.*0\.95'): targets_from_sensitivity(scan, budget=0.96)


def test_budget_spares_a_small_fragile_layer():
    "The least total drop: a big layer that falls slowly per weight takes the budget, a small fragile one stays dense"
    rows = []
    for layer, n, drops in (('big', 10_000, (0.1, 0.5, 0.7)), ('small', 100, (0.05, 0.3, 0.4))):
        for r, d in zip((0.5, 0.9, 0.95), drops):
            rows.append(dict(layer=layer, ratio=r, metric=0.9 - d, delta=-d, drop=d, params=n, group_size=1))
    t = targets_from_sensitivity(pd.DataFrame(rows), budget=0.9)  # 9,090 of 10,100 weights
    fct.test_eq(t, {'big': 0.909, 'small': 0.})  # an equal drop of ~0.5 would have taken 'small' to 0.9 too


def test_max_drop_respects_the_scan():
    "max_drop: each layer's largest ratio whose drop, and every smaller ratio's, is within it"
    learn = _learner()
    scan = sensitivity(learn, ratios=(0.3, 0.6, 0.8, 0.9, 0.97), show_progress=False)
    for md in (0., 0.01, 0.05):
        t = targets_from_sensitivity(scan, max_drop=md)
        for n, rows in scan.groupby('layer'):
            ok = rows[rows.ratio <= t[n]]
            assert (ok['drop'] <= md).all(), (n, md)
            nxt = rows[rows.ratio > t[n]]
            if len(nxt): assert nxt['drop'].iloc[0] > md, (n, md)
    # a curve that fails at 0.5 and recovers at 0.75 (noise) stops at 0.25
    noisy = pd.DataFrame(dict(layer=['a'] * 3, ratio=[0.25, 0.5, 0.75], metric=[0.9, 0.7, 0.9], delta=[0., -0.2, 0.],
                              drop=[0., 0.2, 0.], params=100, group_size=1))
    fct.test_eq(targets_from_sensitivity(noisy, max_drop=0.1), {'a': 0.25})


def test_learner_and_plain_model_agree(digits):
    "The same model scanned through learn.validate and through a metric function on the validation set"
    xt, yt, xv, yv = digits
    learn = _learner()
    a = sensitivity(learn, ratios=(0.5, 0.9), show_progress=False)
    b = sensitivity(learn.model, ratios=(0.5, 0.9), metric=_val_accuracy(xv, yv), show_progress=False)
    fct.test_close(a.attrs['dense'], b.attrs['dense'], eps=1e-6)
    fct.test_close(a['metric'].to_numpy(), b['metric'].to_numpy(), eps=1e-6)
    same = sensitivity(learn, ratios=(0.5, 0.9), metric=accuracy, show_progress=False)  # fastai's own function
    fct.test_eq(same['metric'].tolist(), a['metric'].tolist())
    # a loss: lower is better, so drop = delta
    c = sensitivity(learn, ratios=(0.9,), metric='valid_loss', show_progress=False)
    assert not c.attrs['higher_is_better']
    fct.test_eq(c['drop'].tolist(), c['delta'].tolist())


def test_attached_sparsify_callback_is_left_alone():
    "A Learner with a SparsifyCallback: its masks, history and metrics survive a scan, and the next fit keeps them"
    torch.manual_seed(0)
    cb = SparsifyCallback(0.5, schedule='one_shot')
    learn = Learner(digits_dls(), mlp(64, 48, 24, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3)
    masks = {n: m.clone() for n, m in cb.sparsifier.masks.items()}
    hist, sp, metrics = list(cb.history), cb.sparsifier, list(learn.metrics)
    before = _state(learn.model)
    scan = sensitivity(learn, ratios=(0.75,), show_progress=False)
    _same(learn.model, before)
    assert cb.sparsifier is sp and cb.completed
    fct.test_eq(cb.history, hist)
    for n, m in masks.items(): assert torch.equal(cb.sparsifier.masks[n], m)
    fct.test_eq(learn.metrics, metrics)
    fct.test_eq(scan.attrs['metric'], 'accuracy')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3)
    fct.test_close(cb.sparsifier.sparsity(), 0.5, eps=1e-3)


def test_filters_on_a_cnn(digits):
    "granularity='filter': each evaluation sees whole filters of one layer zeroed; the targets prune whole filters"
    xt, yt, xv, yv = digits
    torch.manual_seed(0)
    model = small_cnn(c=8)
    xv = xv.reshape(-1, 1, 8, 8)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    seen = []
    def metric(m):
        seen.append({n: int((c.weight.flatten(1).abs().sum(1) == 0).sum()) for n, c in convs.items()})
        return (m(xv).argmax(1) == yv).float().mean()
    scan = sensitivity(model, ratios=(0.25, 0.5), granularity='filter', layers=[nn.Conv2d], metric=metric,
                       show_progress=False)
    fct.test_eq(seen, [{'0': 0, '3': 0}, {'0': 2, '3': 0}, {'0': 4, '3': 0}, {'0': 0, '3': 4}, {'0': 0, '3': 8}])
    fct.test_eq(scan['group_size'].tolist(), [9, 9, 72, 72])
    t = targets_from_sensitivity(scan, budget=0.4)
    n_w = 8 * 9 + 16 * 72
    learn = Learner(digits_dls(flat=False), model, loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(sparsity=t, granularity='filter', coupled=False, layers=list(t), context='local',
                          schedule='one_shot', show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    dead = {n: int((c.weight.flatten(1).abs().sum(1) == 0).sum()) for n, c in convs.items()}
    for n in dead: fct.test_eq(dead[n], round(t[n] * convs[n].out_channels))
    pruned = dead['0'] * 9 + dead['3'] * 72
    assert round(0.4 * n_w) - 72 < pruned <= round(0.4 * n_w), pruned  # whole filters: within one group, not above


def test_bad_input_is_refused_clearly(digits):
    xt, yt, xv, yv = digits
    learn = _learner(epochs=1)
    before = _state(learn.model)
    with pytest.raises(ValueError, match='metric=f'): sensitivity(learn.model, show_progress=False)
    with pytest.raises(ValueError, match='valid_loss, accuracy'): sensitivity(learn, metric='f1', show_progress=False)
    with pytest.raises(ValueError, match='matches no'): sensitivity(learn, layers=['fc9'], show_progress=False)
    with pytest.raises(ValueError, match='no curve'): sensitivity(learn, granularity='2:4', show_progress=False)
    with pytest.raises(ValueError, match='dl= is for a fastai Learner'):
        sensitivity(learn.model, metric=_val_accuracy(xv, yv), dl=learn.dls.valid, show_progress=False)
    with pytest.raises(TypeError, match='must return a number'):
        sensitivity(learn.model, metric=lambda m: 'good', show_progress=False)
    with pytest.raises(ValueError, match="dense model's <lambda> is nan"):
        sensitivity(learn.model, metric=lambda m: float('nan'), show_progress=False)
    _same(learn.model, before)
    scan = sensitivity(learn, ratios=(0.5, 0.9), show_progress=False)
    with pytest.raises(ValueError, match='neither'): targets_from_sensitivity(scan)
    with pytest.raises(ValueError, match='both'): targets_from_sensitivity(scan, budget=0.5, max_drop=0.1)
    with pytest.raises(ValueError, match="'fc9' matches no scanned layer"):
        targets_from_sensitivity(scan, budget=0.5, layers=['fc9'])
    with pytest.raises(ValueError, match='out of reach'): targets_from_sensitivity(scan, budget=0.95)
    with pytest.raises(ValueError, match='missing columns: group_size'):
        targets_from_sensitivity(scan.drop(columns='group_size'), budget=0.5)
    fct.test_eq(set(targets_from_sensitivity(scan, budget=0.5, layers=['0', '2'])), {'0', '2'})


def test_plot_draws_one_line_per_layer():
    learn = _learner(epochs=1)
    scan = sensitivity(learn, ratios=(0.5, 0.9), show_progress=False)
    fig = scan.plot()
    lines = fig.axes[0].lines
    fct.test_eq(len(lines), 3 + 1)  # three layers and the dense line
    fct.test_eq(list(lines[0].get_xdata()), [0., 0.5, 0.9])
    fct.test_eq(len(scan[scan.layer == '0'].plot(y='drop').axes[0].lines), 1)  # a filtered scan keeps its plot


def _regression_learner(metrics):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.losses import MSELossFlat
    from fastai.torch_core import set_seed
    from fasterprune.data import TensorPairs
    set_seed(0)  # torch, and Python's random: fastai's DataLoader draws its shuffling seed from it
    X = torch.randn(1024, 16)
    Y = (X[:, :4] ** 2).sum(1, keepdim=True) + X[:, 4:5]
    dls = DataLoaders(DataLoader(TensorPairs(X[:768], Y[:768]), bs=64, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(X[768:], Y[768:]), bs=256))
    learn = Learner(dls, nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)),
                    loss_func=MSELossFlat(), metrics=metrics)
    with learn.no_bar(), learn.no_logging(): learn.fit(6, 3e-3)
    return learn


def test_fastai_error_metrics_are_lower_is_better(caplog):
    "fastai's rmse (named '_rmse'), mae, mse... are errors: pruning makes them worse, so every drop is positive"
    from fastai.metrics import rmse, mae
    learn = _regression_learner([rmse, mae])
    for metric in (None, 'mae'):  # None: the first metric, '_rmse'
        scan = sensitivity(learn, ratios=(0.5, 0.9), metric=metric, show_progress=False)
        fct.test_eq(scan.attrs['higher_is_better'], False)
        fct.test_eq(scan['drop'].tolist(), scan['delta'].tolist())  # worse = larger
        last = scan[scan.ratio == 0.9]['drop']
        assert (last > 0).sum() * 2 > len(last), scan  # most layers lose at 90 %
    # a lower-is-better metric with a name that says neither: the scan warns and names the fix
    def distance(model): return float(learn.validate()[0]) ** 0.5
    with caplog.at_level('WARNING', logger='fasterprune'):
        scan = sensitivity(learn, ratios=(0.5, 0.9), metric=distance, show_progress=False)
    assert 'higher_is_better=False' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='fasterprune'):
        scan = sensitivity(learn, ratios=(0.5, 0.9), metric=distance, higher_is_better=False, show_progress=False)
    assert 'higher_is_better' not in caplog.text  # the user said: no guess to warn about
    fct.test_eq(scan['drop'].tolist(), scan['delta'].tolist())


def test_filter_scan_leaves_the_classifier_out(digits, caplog):
    "Filters of a Learner's model: the classifier (its filters are the classes) is not scanned, as the callback does"
    torch.manual_seed(0)
    learn = Learner(digits_dls(flat=False), small_cnn(c=8), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    scan = sensitivity(learn, ratios=(0.5, 0.9), granularity='filter', show_progress=False)
    fct.test_eq(list(dict.fromkeys(scan.layer)), ['0', '3'])
    t = targets_from_sensitivity(scan, budget=0.6)
    cb = SparsifyCallback(sparsity=t, granularity='filter', coupled=False, context='local', schedule='one_shot',
                          show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)  # the targets fit the callback's layers
    fct.test_eq(int((learn.model[8].weight.abs().sum(1) == 0).sum()), 0)  # no class removed
    named = sensitivity(learn, ratios=(0.5,), granularity='filter', layers=['0', '8'], show_progress=False)
    fct.test_eq(named.layer.tolist(), ['0', '8'])  # layers= naming it: the user's choice stands
    xt, yt, xv, yv = digits
    xv = xv.reshape(-1, 1, 8, 8)
    with caplog.at_level('WARNING', logger='fasterprune'):
        sensitivity(small_cnn(c=8), ratios=(0.5,), granularity='filter', metric=_val_accuracy(xv, yv),
                    show_progress=False)
    assert 'exclude=' in caplog.text  # a plain model: no input to find the output layers on, the log says so


def test_scan_leaves_metrics_recorder_and_rng():
    "What the user reads after the scan (learn.metrics, the Recorder's log and loss, torch's RNG) is as before it"
    import random
    learn = _learner(epochs=1)
    before = dict(value=float(learn.metrics[0].value), loss=float(learn.recorder.loss.value),
                  log=list(learn.recorder.log), dl=learn.dl)
    torch.manual_seed(123)
    s0 = torch.random.get_rng_state().clone()
    sensitivity(learn, ratios=(0.9,), criteria='random', show_progress=False)
    assert torch.equal(s0, torch.random.get_rng_state())
    after = dict(value=float(learn.metrics[0].value), loss=float(learn.recorder.loss.value),
                 log=list(learn.recorder.log), dl=learn.dl)
    fct.test_eq(after, before)


def test_scan_read_back_from_csv(tmp_path):
    "A scan saved to CSV and read back (a Sequential's layer names come back as ints) gives the same targets"
    learn = _learner(sizes=(64, 32, 10), epochs=1)
    scan = sensitivity(learn, ratios=(0.5, 0.9), show_progress=False)
    assert (scan['layer'].map(type) == str).all()
    scan.to_csv(tmp_path / 'scan.csv', index=False)
    back = pd.read_csv(tmp_path / 'scan.csv')
    fct.test_eq(targets_from_sensitivity(back, budget=0.5), targets_from_sensitivity(scan, budget=0.5))
    fct.test_eq(targets_from_sensitivity(back, max_drop=0.05), targets_from_sensitivity(scan, max_drop=0.05))
    fct.test_eq(set(targets_from_sensitivity(back, budget=0.5, layers='0')), {'0'})
    t = targets_from_sensitivity(back, budget=0.5)
    cb = SparsifyCallback(sparsity=t, context='local', schedule='one_shot', show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    # names like '0.10' read back as the float 0.1 are lost: a clear error, with the way to read them
    with pytest.raises(ValueError, match="dtype=\\{'layer': str\\}"):
        targets_from_sensitivity(back.assign(layer=back['layer'] + 0.1), budget=0.5)


def test_fastai_metric_not_among_the_learners():
    "metric=accuracy on a Learner trained with error_rate: an error that says to add it, or what else to pass"
    from fastai.metrics import error_rate
    learn = _learner(epochs=1, seed=1)
    learn.metrics = [error_rate]
    before = _state(learn.model)
    with pytest.raises(ValueError, match=r'not one of this Learner.s metrics \(valid_loss, error_rate\).*metrics=\['):
        sensitivity(learn, metric=accuracy, show_progress=False)
    with pytest.raises(ValueError, match='f\\(model\\) -> float'):
        sensitivity(learn.model, metric=accuracy, show_progress=False)
    _same(learn.model, before)
    fct.test_eq(sensitivity(learn, metric=error_rate, ratios=(0.5,), show_progress=False).attrs['metric'],
                'error_rate')
