"Rewinding: a rewind point at any iteration k (BatchNorm buffers too), one mask mechanism, tickets that fail loudly"
import subprocess, sys
from functools import partial
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
import fastai.callback.schedule  # Learner.lr_find
from fasterprune.data import digits_arrays, TensorPairs, mlp, small_cnn
from fasterprune.sparsifier import Sparsifier
from fasterprune.rewind import Rewinder, model_state
from fasterprune.lottery import LotteryTicket, MaskCallback, apply_masks, save_ticket, load_ticket, lottery_experiment
from fasterprune.distributed import CheckpointError


def _dls(flat=False, n=384, bs=64):
    xt, yt, xv, yv = digits_arrays(flat)
    return DataLoaders(DataLoader(TensorPairs(xt[:n], yt[:n]), bs=bs, shuffle=True, drop_last=True),
                       DataLoader(TensorPairs(xv, yv), bs=360), device=torch.device('cpu'))


def _learn(model=None, flat=False):
    learn = Learner(_dls(flat), model if model is not None else small_cnn(c=8), loss_func=nn.CrossEntropyLoss(),
                    metrics=accuracy, opt_func=partial(SGD, mom=0.9), wd=1e-2)
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    return learn


class Snapshots(Callback):
    "The model's full state after every optimizer step (after the masks are applied: order 45 > 40)"
    order, run_valid = 45, False
    def before_fit(self): self.states = {0: model_state(self.learn.model)}
    def after_step(self): self.states[len(self.states)] = model_state(self.learn.model)


def _check_rewound(model, point, masks):
    "Survivors (and every other tensor, BatchNorm buffers included) equal `point` bit for bit; pruned weights are zero"
    sd = model.state_dict()
    fct.test_eq(set(sd), set(point))
    for k, v in point.items():
        layer = k.rpartition('.')[0]
        if k.endswith('.weight') and layer in masks:
            mk = masks[layer]
            fct.test_eq(torch.equal(sd[k][mk], v[mk]), True)
            fct.test_eq(bool((sd[k][~mk] == 0).all()), True)
        else: fct.test_eq(torch.equal(sd[k], v), True)


# ---------------------------------------------------------------- rewinding to any iteration k

@pytest.mark.parametrize('k', [0, 1, 4, 9])
def test_rewind_to_iteration_k_learner(k):
    "Rewinder attached to a Learner: the rewind point is exactly the state after optimizer step k, BN buffers too"
    set_seed(0)
    learn = _learn()
    rw = Rewinder(learn.model).attach(learn)
    rw.keep_rewind_point(k)
    snap = Snapshots()
    with learn.no_logging(): learn.fit(2, 1e-2, cbs=snap)                     # 12 steps
    want = snap.states[k]
    fct.test_eq(set(rw.rewind_point), set(want))
    fct.test_eq(all(torch.equal(rw.rewind_point[n], v) for n, v in want.items()), True)
    fct.test_eq(int(rw.rewind_point['1.num_batches_tracked']), k)
    if k: fct.test_eq(torch.equal(rw.rewind_point['1.running_var'], snap.states[0]['1.running_var']), False)
    trained = model_state(learn.model)
    masks = rw.prune_weights(0.5, 'global')
    for n, mk in masks.items():  # pruning keeps the trained values of the survivors
        w = learn.model.state_dict()[f'{n}.weight']
        fct.test_eq(torch.equal(w[mk], trained[f'{n}.weight'][mk]), True)
    rw.rewind()
    _check_rewound(learn.model, want, masks)
    fct.test_eq(learn.opt, None)                                             # a fresh optimizer for the next fit
    with learn.no_logging(): learn.fit(1, 1e-2)
    for n, mk in masks.items():                                              # momentum and weight decay: still zero
        fct.test_eq(bool((dict(learn.model.named_modules())[n].weight[~mk] == 0).all()), True)
    fct.test_eq(all(torch.equal(rw.rewind_point[n], v) for n, v in want.items()), True)  # later fits never re-record


def test_rewind_to_iteration_k_plain_pytorch():
    "Rewinder on a torch optimizer (a step hook): iteration k of a plain loop, two IMP rounds, masks nested"
    torch.manual_seed(0)
    xt, yt, _, _ = digits_arrays(flat=False)
    model = small_cnn(c=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    rw = Rewinder(model).attach(opt, iteration=5)
    seen = {}
    def train(steps, record=False):
        model.train()
        for i in range(steps):
            nn.functional.cross_entropy(model(xt[32 * i:32 * i + 32]), yt[32 * i:32 * i + 32]).backward()
            opt.step()
            opt.zero_grad()
            if record: seen[i + 1] = model_state(model)
    train(8, record=True)
    fct.test_eq(all(torch.equal(rw.rewind_point[n], v) for n, v in seen[5].items()), True)
    prev = None
    for r in range(2):
        rw.next_round(0.4)
        _check_rewound(model, seen[5], rw.masks)
        fct.test_eq(len(opt.state), 0)                                        # Adam's moments dropped
        if prev is not None:
            for n in prev: fct.test_eq(bool((rw.masks[n] & ~prev[n]).any()), False)  # masks only shrink
        prev = {n: m.clone() for n, m in rw.masks.items()}
        train(4)
        for n, mk in rw.masks.items(): fct.test_eq(bool((model.get_submodule(n).weight[~mk] == 0).all()), True)
    fct.test_eq(rw.round, 2)
    fct.test_close(rw.remaining(), 0.6 ** 2, eps=0.01)


def test_lr_find_and_validate_do_not_move_the_rewind_point():
    "lr_find trains on weights it throws away, validate trains nothing: iteration k counts steps of the real fit only"
    set_seed(0)
    learn = _learn()
    lt = LotteryTicket(learn, rate=0.5, rewind_iter=3)
    with learn.no_logging():
        learn.validate()
        learn.lr_find(num_it=8, show_plot=False)
    fct.test_eq(lt.rewind_point, None)
    snap = Snapshots()
    with learn.no_logging(): learn.fit(1, 1e-2, cbs=snap)
    fct.test_eq(all(torch.equal(lt.rewind_point[n], v) for n, v in snap.states[3].items()), True)


def test_bad_rewind_requests_change_nothing():
    set_seed(0)
    learn = _learn()
    w0 = model_state(learn.model)
    rw = Rewinder(learn.model).attach(learn)
    rw.keep_rewind_point(13)                                                  # 6 batches an epoch: 2 epochs = 12
    with learn.no_logging(), pytest.raises(ValueError, match="beyond the fit's length of 12"): learn.fit(2, 1e-2)
    fct.test_eq(all(torch.equal(w0[n], v) for n, v in learn.model.state_dict().items()), True)
    with pytest.raises(RuntimeError, match='not kept yet'): rw.rewind()
    with pytest.raises(RuntimeError, match='not kept yet'): rw.next_round(0.2)
    for bad in (-1, 1.5, True, '3'):
        with pytest.raises(ValueError, match='whole number'): rw.keep_rewind_point(bad)
    with pytest.raises(TypeError, match='Learner or a torch.optim'): Rewinder(learn.model).attach(object())
    with pytest.raises(ValueError, match='not a pruned layer'): rw.set_masks({'1': torch.ones(8, dtype=torch.bool)})
    fct.test_eq(all(torch.equal(w0[n], v) for n, v in learn.model.state_dict().items()), True)


def test_rewind_after_surgery():
    "A surgery that changes shapes: refused with the model untouched; with follow_cuts the survivors rewind"
    torch.manual_seed(0)
    net = mlp(8, 6, 3)
    rw = Rewinder(net).keep_rewind_point()
    pt = {k: v.clone() for k, v in rw.rewind_point.items()}
    rw.prune_weights(0.3)
    keep = torch.tensor([0, 2, 3, 5])
    cuts = {net[0].weight: [(0, keep)], net[0].bias: [(0, keep)], net[2].weight: [(1, keep)]}
    for p, ops in cuts.items(): p.data = p.data.index_select(*ops[0])
    before = model_state(net)
    with pytest.raises(ValueError, match='does not fit'): rw.rewind()
    fct.test_eq(all(torch.equal(before[k], v) for k, v in net.state_dict().items()), True)
    with pytest.raises(ValueError, match='follow_cuts'): rw.prune_weights(0.2)
    rw.follow_cuts({p: (None, ops) for p, ops in cuts.items()})              # the Pruner's (shape, ops) form works too
    rw.rewind()
    fct.test_eq(torch.equal(net[0].weight[rw.masks['0']], pt['0.weight'][keep][rw.masks['0']]), True)
    fct.test_eq(torch.equal(net[2].weight[rw.masks['2']], pt['2.weight'][:, keep][rw.masks['2']]), True)
    fct.test_eq(bool((net[2].weight[~rw.masks['2']] == 0).all()), True)


# ---------------------------------------------------------------- one mask mechanism

def test_masks_applied_by_the_sparsifier(monkeypatch):
    "MaskCallback, LotteryTicket and apply_masks zero weights through Sparsifier.apply_masks, never another way"
    calls = []
    orig = Sparsifier.apply_masks
    def counted(self, *a, **kw):
        calls.append(self)
        return orig(self, *a, **kw)
    monkeypatch.setattr(Sparsifier, 'apply_masks', counted)
    set_seed(0)
    learn = _learn(mlp(64, 32, 10), flat=True)
    masks = {'0': torch.rand(32, 64) > 0.5}
    with learn.no_logging(): learn.fit(1, 1e-2, cbs=MaskCallback(masks))
    fct.test_eq(len(calls), 1 + 6 + 1)                             # before the first batch, every step, the end
    fct.test_eq(bool((learn.model[0].weight[~masks['0']] == 0).all()), True)
    calls.clear()
    net = mlp(64, 32, 10)
    with pytest.warns(DeprecationWarning, match='Rewinder'): apply_masks(net, masks)
    fct.test_eq(len(calls), 1)
    fct.test_eq(bool((net[0].weight[~masks['0']] == 0).all()), True)
    fct.test_eq(bool((net[0].weight[masks['0']] != 0).all()), True)


def test_rewind_module_needs_no_fastai():
    code = ("import sys, fasterprune.rewind; bad = [m for m in sys.modules if m.split('.')[0] == 'fastai']; "
            "assert not bad, bad")
    fct.test_eq(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).returncode, 0)


# ---------------------------------------------------------------- tickets and runner state that fail loudly

def test_load_ticket_empty_or_truncated(tmp_path):
    set_seed(0)
    learn = _learn()
    lt = LotteryTicket(learn, rate=0.5)
    with learn.no_logging(): learn.fit(1, 1e-2)
    lt.next_round()
    good = save_ticket(lt.ticket(), tmp_path/'t.pt').read_bytes()
    (tmp_path/'empty.pt').write_bytes(b'')
    (tmp_path/'cut.pt').write_bytes(good[:len(good) // 2])
    fresh = small_cnn(c=8)
    before = model_state(fresh)
    for f, why in (('empty.pt', 'empty'), ('cut.pt', 'truncated')):
        with pytest.raises(CheckpointError, match=why): load_ticket(tmp_path/f, fresh)
        fct.test_eq(all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()), True)
    with pytest.raises(FileNotFoundError, match='no checkpoint at'): load_ticket(tmp_path/'missing.pt', fresh)


def _make():
    return Learner(_dls(flat=True), mlp(64, 16, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)


def test_runner_state_truncated(tmp_path):
    js = tmp_path/'run.json'
    kw = dict(rounds=1, rate=0.5, epochs=1, controls='random', progress=False, json_path=js)
    lottery_experiment(_make, **kw)
    st = tmp_path/'run.state.pt'
    st.write_bytes(st.read_bytes()[:100])
    before = js.read_bytes()
    with pytest.raises(CheckpointError, match='truncated'): lottery_experiment(_make, **{**kw, 'rounds': 2})
    fct.test_eq(js.read_bytes(), before)


def test_fit_after_surgery_without_follow_cuts():
    "A Learner fit after a surgery the Rewinder did not follow: a clear error before the first batch, weights untouched"
    set_seed(0)
    learn = _learn(mlp(64, 32, 10), flat=True)
    rw = Rewinder(learn.model).attach(learn).keep_rewind_point()
    rw.prune_weights(0.5)
    keep = torch.arange(16)
    m0, m2 = learn.model[0], learn.model[2]
    m0.weight.data, m0.bias.data, m2.weight.data = m0.weight.data[keep], m0.bias.data[keep], m2.weight.data[:, keep]
    learn.opt = None
    before = model_state(learn.model)
    with learn.no_logging(), pytest.raises(ValueError, match='follow_cuts'): learn.fit(1, 1e-2)
    fct.test_eq(all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items()), True)
    rw.follow_cuts({m0.weight: [(0, keep)], m0.bias: [(0, keep)], m2.weight: [(1, keep)]})
    with learn.no_logging(): learn.fit(1, 1e-2)
    fct.test_eq(bool((m0.weight[~rw.masks['0']] == 0).all()), True)
    rw.rewind()
    fct.test_eq(torch.equal(m2.bias, rw.rewind_point['2.bias']), True)


def test_follow_cuts_batchnorm():
    "Channel surgery through conv -> BatchNorm -> conv: parameter cuts only (as the Pruner records them); the BN "
    "running statistics of the rewind point follow, and the survivors (BN buffers included) rewind exactly"
    set_seed(0)
    learn = _learn()
    model = learn.model
    rw = Rewinder(model).attach(learn, iteration=2)
    with learn.no_logging(): learn.fit(1, 1e-2)
    pt = {k: v.clone() for k, v in rw.rewind_point.items()}
    rw.prune_weights(0.3)
    keep = torch.tensor([0, 1, 3, 4, 6, 7])                                 # remove channels 2 and 5 of 8
    c0, bn, c1 = model[0], model[1], model[3]
    cuts = {c0.weight: [(0, keep)], c0.bias: [(0, keep)], bn.weight: [(0, keep)], bn.bias: [(0, keep)],
            c1.weight: [(1, keep)]}
    for p, ops in cuts.items(): p.data, p.grad = p.data.index_select(*ops[0]), None
    bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
    rw.follow_cuts(cuts)
    rw.rewind()
    sd = model.state_dict()
    for k in ('1.running_mean', '1.running_var', '1.weight', '1.bias', '0.bias'):
        fct.test_eq(torch.equal(sd[k], pt[k][keep]), True)
    mk = rw.masks['3']
    fct.test_eq(torch.equal(sd['3.weight'][mk], pt['3.weight'][:, keep][mk]), True)
    fct.test_eq(bool((sd['3.weight'][~mk] == 0).all()), True)
    with learn.no_logging(): learn.fit(1, 1e-2)                              # the smaller model trains, masks hold
    fct.test_eq(bool((model[3].weight[~mk] == 0).all()), True)
