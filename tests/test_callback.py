"SparsifyCallback invariants: exact targets, zeros after every optimizer step, resume, bad input"
import copy, math, warnings
import numpy as np
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.optimizer import SGD, Adam
import fastai.callback.schedule, fastai.callback.fp16  # noqa: F401  (fit_one_cycle, fine_tune, to_fp16, to_bf16)
from fasterprune.callback import SparsifyCallback
from fit_checks import CheckZeros, CancelAt, device_path, count_syncs, Rolled
from fasterprune.sparsifier import NMRoundingWarning
from fasterprune.schedules import agp, iterative, one_shot
from fasterprune.data import digits_arrays, digits_dls, TensorPairs, lenet_300_100, small_cnn, mlp


def _dls(flat=True, shuffle=True, bs=64, n=512):
    xt, yt, xv, yv = digits_arrays(flat)
    return DataLoaders(DataLoader(TensorPairs(xt[:n], yt[:n]), bs=bs, shuffle=shuffle, drop_last=True),
                       DataLoader(TensorPairs(xv, yv), bs=256), device=torch.device('cpu'))


def _learn(model=None, flat=True, **kw):
    torch.manual_seed(0)
    learn = Learner(_dls(flat, **{k: kw.pop(k) for k in ('shuffle', 'n') if k in kw}), model or mlp(64, 64, 32, 10),
                    loss_func=nn.CrossEntropyLoss(), **kw)
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    return learn




def _n_zero(sp): return sum(int((m.weight == 0).sum()) for m in sp.layers.values())
def _n_w(sp): return sum(m.weight.numel() for m in sp.layers.values())


@pytest.mark.parametrize('opt,wd', [(SGD, 0.01), (Adam, 0.1)])
def test_zeros_after_every_step(opt, wd):
    learn = _learn(opt_func=opt, wd=wd)
    cb = SparsifyCallback(0.8, 'weight', 'global', 'magnitude', 'agp', update_every=2)
    chk = CheckZeros(cb)
    learn.fit(2, 1e-2, cbs=[cb, chk])
    assert chk.checked >= 10
    fct.test_eq(_n_zero(cb.sparsifier), round(0.8 * _n_w(cb.sparsifier)))


def test_sgd_momentum_pushes_weights_but_masks_hold():
    "With momentum, a freshly pruned weight would move again without the per-step mask"
    learn = _learn(opt_func=SGD, moms=(0.9, 0.9, 0.9), wd=0.)
    cb = SparsifyCallback(0.5, schedule=one_shot(0.25))
    chk = CheckZeros(cb)
    learn.fit(1, 0.1, cbs=[cb, chk])
    assert chk.checked > 0
    fct.test_eq(_n_zero(cb.sparsifier), round(0.5 * _n_w(cb.sparsifier)))


@pytest.mark.parametrize('prec', ['to_fp16', 'to_bf16'])
def test_mixed_precision(prec):
    "The callback works beside fastai's MixedPrecision. On CPU fastai disables its CUDA autocast and GradScaler, so the"
    "fp16/bf16 arithmetic itself is checked by benchmarks/gpu_checks.py on a GPU."
    learn = getattr(_learn(), prec)()
    cb = SparsifyCallback(0.7, 'weight', 'local', 'gradient_magnitude', 'linear')
    chk = CheckZeros(cb)
    learn.fit(1, 1e-2, cbs=[cb, chk])
    for n, m in cb.sparsifier.layers.items(): fct.test_eq(int((m.weight == 0).sum()), round(0.7 * m.weight.numel()))


def test_gradient_accumulation():
    learn = _learn()
    cb = SparsifyCallback(0.6, 'filter', 'local', 'gradient_magnitude', 'agp')
    chk = CheckZeros(cb)
    learn.fit(2, 1e-2, cbs=[GradientAccumulation(n_acc=128), cb, chk])
    dead = {n: int((m.weight == 0).all(1).sum()) for n, m in cb.sparsifier.layers.items()}
    # coupled channels: the classifier keeps its outputs
    fct.test_eq(dead, {'0': round(0.6 * 64), '2': round(0.6 * 32), '4': 0})


def test_filter_uncoupled_prunes_every_layer():
    learn = _learn()
    cb = SparsifyCallback(0.5, 'filter', 'local', coupled=False)
    learn.fit(1, 1e-2, cbs=cb)
    assert cb.sparsifier.groups is None
    for n, m in cb.sparsifier.layers.items():
        fct.test_eq(int((m.weight == 0).all(1).sum()), round(0.5 * m.weight.shape[0]))


@pytest.mark.parametrize('how', ['fit', 'fit_one_cycle', 'fine_tune'])
def test_fit_variants_reach_target(how):
    learn = _learn(model=small_cnn(c=8), flat=False)
    cb = SparsifyCallback(0.75, 'kernel', 'global', 'magnitude', 'agp')
    if how == 'fine_tune': learn.fine_tune(1, 1e-2, freeze_epochs=1, cbs=cb)
    else: getattr(learn, how)(2, 1e-2, cbs=cb)
    sp = cb.sparsifier
    # kernels are groups of 9 (3x3) or 1 (Linear): within one group of the exact count, never over
    assert round(0.75 * _n_w(sp)) - 9 < _n_zero(sp) <= round(0.75 * _n_w(sp))


def test_sparsity_column_and_history():
    learn = _learn()
    cb = SparsifyCallback(0.9, schedule=agp(0., 0.5), update_every=3)
    seen = {}
    class Peek(Callback):
        order = 55
        def after_epoch(self): seen['names'] = list(self.recorder.metric_names)
    learn.fit(2, 1e-2, cbs=[cb, Peek()])
    assert 'sparsity' in seen['names']
    col = seen['names'].index('sparsity') - 1
    vals = [v[col] for v in learn.recorder.values]
    fct.test_close(vals[-1], 0.9, eps=1e-3)
    fct.test_close(vals[0], 0.9, eps=1e-3)  # end_pct=0.5 is the end of epoch 1
    # the target is reached exactly at end_pct, on the step that crosses it
    first_full = next(h for h in cb.history if h['target'] == pytest.approx(0.9))
    fct.test_close(first_full['pos'], 0.5, eps=1e-9)
    fct.test_close(first_full['sparsity'], 0.9, eps=1e-3)
    targets = [h['target'] for h in cb.history]
    assert targets == sorted(targets) and len(targets) == 3  # 16 steps, window of 8, every 3: steps 3, 6 and 8


def test_iterative_updates_at_jumps():
    learn = _learn()
    cb = SparsifyCallback(0.6, schedule=iterative(3, 0., 0.9))
    learn.fit(3, 1e-2, cbs=cb)
    fct.test_eq([round(h['target'], 6) for h in cb.history], [0.2, 0.4, 0.6])
    assert cb.history[0]['pos'] == 0.  # before the first batch (magnitude needs no gradients)


def test_per_layer_dict():
    learn = _learn()
    cb = SparsifyCallback({'0': 0.5, '4': 0.25}, schedule='linear')
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(cb.sparsifier.layer_sparsity()['0'], 0.5)
    fct.test_eq(cb.sparsifier.layer_sparsity()['4'], 0.25)
    fct.test_eq(cb.sparsifier.layer_sparsity()['2'], 0.)


def test_nm_callback():
    learn = _learn()
    cb = SparsifyCallback(None, '2:4', schedule='agp')
    with warnings.catch_warnings():
        warnings.simplefilter('error', NMRoundingWarning)  # intermediate targets move in reachable steps: no warning
        learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(sorted({h['target'] for h in cb.history}), [0.25, 0.5])
    for n, m in cb.sparsifier.layers.items():
        fct.test_eq((m.weight.reshape(-1, 4) != 0).sum(1).max().item() <= 2, True)
        fct.test_eq(int((m.weight == 0).sum()), m.weight.numel() // 2)


def test_resume_mid_schedule(tmp_path):
    "learn.save() mid-schedule, a fresh Learner + callback, learn.load(): same masks, same target, same result"
    class SaveAt(Callback):
        order = 60
        def after_epoch(self):
            if self.epoch == 1:
                self.learn.save('mid')
                self.masks = {k: v.clone() for k, v in self.learn.sparsify.sparsifier.masks.items()}
    def make():
        torch.manual_seed(0)
        learn = Learner(_dls(shuffle=False), mlp(64, 48, 10), loss_func=nn.CrossEntropyLoss(), opt_func=Adam,
                        path=tmp_path)
        return learn
    a = make()
    saver = SaveAt()
    cb_a = SparsifyCallback(0.9, schedule=agp(0., 1.), update_every=4)
    a.fit(4, 1e-2, cbs=[cb_a, saver])
    b = make()
    b.load('mid')
    cb_b = SparsifyCallback(0.9, schedule=agp(0., 1.), update_every=4)
    class Grab(Callback):
        order = 50  # after SparsifyCallback sets up, at the first training epoch of the fit
        def before_train(self):
            if not hasattr(self, 'masks'): self.masks = {k: v.clone() for k, v in cb_b.sparsifier.masks.items()}
    grab = Grab()
    b.fit(4, 1e-2, start_epoch=2, cbs=[cb_b, grab])
    fct.test_eq(set(grab.masks), set(saver.masks))
    for k, v in saver.masks.items(): fct.test_eq(grab.masks[k], v)
    # masks adopted at resume are the saved masks
    first_after = cb_b.history[0]
    assert first_after['pos'] > 0.5
    for k in cb_a.sparsifier.masks: fct.test_eq(cb_b.sparsifier.masks[k], cb_a.sparsifier.masks[k])
    for pa, pb in zip(a.model.parameters(), b.model.parameters()): fct.test_close(pa, pb, eps=1e-6)


def test_resume_adopts_saved_masks(tmp_path):
    torch.manual_seed(0)
    learn = Learner(_dls(), mlp(64, 32, 10), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    cb = SparsifyCallback(0.5, schedule='one_shot')
    learn.fit(1, 1e-2, cbs=cb)
    learn.save('m')
    fresh = Learner(_dls(), mlp(64, 32, 10), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    fresh.load('m')
    cb2 = SparsifyCallback(0.5, schedule='one_shot')
    chk = CheckZeros(cb2)
    fresh.fit(1, 1e-2, cbs=[cb2, chk])
    for k, v in cb.sparsifier.masks.items(): fct.test_eq(cb2.sparsifier.masks[k], v)


def test_state_dict_loads_into_fresh_architecture():
    "The pruned model's state_dict is a plain one (no mask buffers) that carries the zeros into a fresh model"
    learn = _learn(model=small_cnn(c=8), flat=False)
    cb = SparsifyCallback(0.8)
    learn.fit(1, 1e-2, cbs=cb)
    fresh = small_cnn(c=8)
    fresh.load_state_dict(learn.model.state_dict(), strict=True)
    fresh_sp = {n: m for n, m in fresh.named_modules() if n in cb.sparsifier.layers}
    fct.test_eq(sum(int((m.weight == 0).sum()) for m in fresh_sp.values()), round(0.8 * _n_w(cb.sparsifier)))
    for n, mk in cb.sparsifier.masks.items(): assert (fresh_sp[n].weight[~mk] == 0).all(), n
    x = torch.randn(3, 1, 8, 8)
    learn.model.eval()
    fresh.eval()
    fct.test_close(fresh(x), learn.model(x))


def test_bad_input_errors_and_untouched():
    fct.test_fail(lambda: SparsifyCallback(90), contains='e.g. 0.9')
    fct.test_fail(lambda: SparsifyCallback(0.5, update_every=0), contains='update_every')
    fct.test_fail(lambda: SparsifyCallback(0.5, context='world'), contains='valid names')
    fct.test_fail(lambda: SparsifyCallback(None), contains='N:M')
    fct.test_fail(lambda: SparsifyCallback(0.5, layers=[]), contains='layers=[] selects no layer')
    learn = _learn()
    with torch.no_grad(): learn.model[2].weight[1, 1] = float('nan')
    ref = copy.deepcopy(learn.model.state_dict())
    fct.test_fail(lambda: learn.fit(1, cbs=SparsifyCallback(0.5, schedule='one_shot')), contains="layer '2' has NaN")
    for k, v in learn.model.state_dict().items(): assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(ref[k]))
    fct.test_eq(len(learn.metrics), 0)


def test_callback_reused_on_a_new_learner_starts_over():
    "On a new Learner's model the schedule runs again from its start: a fresh history, not the old one continued"
    cb = SparsifyCallback(0.7, schedule='linear')
    hists = []
    for i in range(2):
        learn = _learn()
        learn.fit(1, 1e-2, cbs=cb)
        fct.test_close(cb.sparsifier.sparsity(), 0.7, eps=1e-3)
        assert cb.sparsifier.model is learn.model
        hists.append([(h['pos'], h['target']) for h in cb.history])
    fct.test_eq(hists[1], hists[0])  # the same updates again, from the first (gradual) one
    assert len(hists[0]) >= 2 and hists[0][0][1] < 0.7 / 2


def test_zero_initialized_head_still_trains():
    learn = _learn()
    with torch.no_grad(): learn.model[4].weight.zero_()
    cb = SparsifyCallback(0.5, context='local')  # (globally, an untrained zero head is the smallest and goes first)
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(int(torch.count_nonzero(learn.model[4].weight)), 160)  # not frozen at zero: half of it trained and kept


def test_gradient_criteria_refuse_frozen_layers_before_training():
    learn = _learn()
    learn.model[0].weight.requires_grad_(False)
    ref = copy.deepcopy(learn.model.state_dict())
    fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, criteria='gradient_magnitude')),
                  contains="frozen: 0")
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, ref[k])
    fct.test_eq(len(learn.metrics), 0)


def test_fine_tune_with_frozen_body_magnitude():
    from fastai.torch_core import params
    learn = _learn(splitter=lambda m: [params(m[0]), params(m[2:])])
    cb = SparsifyCallback(0.6)
    learn.fine_tune(1, 1e-2, freeze_epochs=1, cbs=cb)
    fct.test_close(cb.sparsifier.sparsity(), 0.6, eps=1e-3)


def test_filter_dict_targets_refused_before_training():
    learn = _learn()
    ref = copy.deepcopy(learn.model.state_dict())
    fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=SparsifyCallback({'0': 0.5}, 'filter')), contains='coupled')
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, ref[k])
    fct.test_eq(len(learn.metrics), 0)


# --- fastai workflows (issue 13): what a Learner does around fit must not prune, re-prune or combine callbacks ---

def _sd(model): return {k: v.clone() for k, v in model.state_dict().items()}
def _same_sd(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_masks(a, b):
    fct.test_eq(set(a), set(b))
    for k in a: assert torch.equal(a[k], b[k]), k


def _acc(learn):
    learn.model.eval()
    xv, yv = learn.dls.valid.dataset.x, learn.dls.valid.dataset.y
    with torch.no_grad(): return float((learn.model(xv).argmax(1) == yv).float().mean())


def test_fit_compact_fit_does_not_prune_the_compacted_model_again():
    "The README path with the callback in Learner(cbs=): fit, Pruner(learn).compact(), fit again"
    from fasterprune.pruner import Pruner
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot')
    learn = _learn(model=small_cnn(c=16), flat=False, cbs=cb)
    learn.fit(2, 1e-2)
    acc0 = _acc(learn)
    Pruner(learn).compact()
    widths = [m.weight.shape for m in learn.model if isinstance(m, (nn.Conv2d, nn.Linear))]
    fct.test_eq([w[0] for w in widths], [8, 16, 10])
    chk = CheckZeros(cb)
    learn.fit(1, 1e-3, cbs=chk)
    fct.test_eq([m.weight.shape for m in learn.model if isinstance(m, (nn.Conv2d, nn.Linear))], widths)
    for m in learn.model:
        if isinstance(m, nn.Conv2d): fct.test_eq(int((m.weight.flatten(1) == 0).all(1).sum()), 0)  # none pruned again
    assert cb.fixed and cb.sparsifier.masks == {}  # every zeroed filter was removed: nothing left to mask
    assert _acc(learn) > acc0 - 0.05  # not destroyed (before the fix: half of what was left was pruned again)


def test_after_surgery_weight_zeros_stay_fixed_and_restart_prunes_again():
    from fasterprune.pruner import Pruner
    cb = SparsifyCallback(0.9, 'weight', 'global', schedule='agp')
    learn = _learn(model=small_cnn(c=8), flat=False, cbs=cb)
    learn.fit(2, 1e-2)
    Pruner(learn).compact()
    zeros = [(m.weight == 0).clone() for m in learn.model if isinstance(m, (nn.Conv2d, nn.Linear))]
    n_hist = len(cb.history)
    learn.fit(1, 1e-3)
    fct.test_eq([(m.weight == 0) for m in learn.model if isinstance(m, (nn.Conv2d, nn.Linear))], zeros)  # kept as is
    fct.test_eq(len(cb.history), n_hist)
    learn.sparsify.restart(0.95)  # pruning again is explicit
    learn.fit(1, 1e-3)
    fct.test_eq(_n_zero(cb.sparsifier), round(0.95 * _n_w(cb.sparsifier)))
    for z, m in zip(zeros, [m for m in learn.model if isinstance(m, (nn.Conv2d, nn.Linear))]):
        assert (m.weight[z] == 0).all()  # the adopted zeros stay pruned


@pytest.mark.parametrize('how', ['validate', 'get_preds', 'context'])
def test_validation_only_passes_never_prune(how):
    cb = SparsifyCallback(0.9, schedule='one_shot')
    learn = _learn(cbs=cb)
    before = _sd(learn.model)
    if how == 'validate': res = learn.validate()
    elif how == 'get_preds': learn.get_preds()
    else:
        with learn: pass
    assert _same_sd(before, learn.model.state_dict())
    assert cb.sparsifier is None and cb.history == [] and cb.report is None
    fct.test_eq(len(learn.metrics), 0)
    if how == 'validate': fct.test_eq(res[-1], 0.)  # the measured sparsity column, read-only
    learn.fit(1, 1e-2)  # the training fit prunes, one-shot, before its first batch
    fct.test_eq(cb.history[0]['pos'], 0.)
    pruned = _sd(learn.model)
    learn.validate()  # and validating the pruned model changes nothing either
    assert _same_sd(pruned, learn.model.state_dict())


@pytest.mark.parametrize('mid', [False, True])
def test_lr_find_leaves_model_and_callback_untouched(tmp_path, mid):
    cb = SparsifyCallback(0.9, schedule=agp(0., 1.))
    learn = _learn(cbs=cb, path=tmp_path)
    if mid: learn.fit(2, 1e-2, cbs=CancelAt(8))  # half-way through an AGP schedule
    before, hist = _sd(learn.model), list(cb.history)
    masks = {k: v.clone() for k, v in (cb.sparsifier.masks if mid else {}).items()}
    chk = CheckZeros(cb) if mid else []
    with learn.added_cbs(chk): learn.lr_find(num_it=12, show_plot=False)
    assert _same_sd(before, learn.model.state_dict())
    fct.test_eq(cb.history, hist)
    if mid:
        _same_masks(cb.sparsifier.masks, masks)
        assert chk.checked >= 6  # masked weights stayed zero during lr_find too
    else: assert cb.sparsifier is None
    learn.fit(2, 1e-2)
    assert cb.history[0]['target'] < 0.5  # still gradual: lr_find did not run the schedule
    fct.test_eq(_n_zero(cb.sparsifier), round(0.9 * _n_w(cb.sparsifier)))




@pytest.mark.parametrize('criteria', ['magnitude', 'gradient_magnitude', 'movement', 'random'])
def test_fine_tune_prunes_during_the_unfrozen_fit(criteria):
    from fastai.torch_core import params
    learn = _learn(splitter=lambda m: [params(m[0]), params(m[2:])])
    cb = SparsifyCallback(0.6, criteria=criteria, schedule='agp')
    seen = []
    class AtEnd(Callback):
        order = 60
        def after_fit(self): seen.append(cb.sparsifier.sparsity())
    chk = CheckZeros(cb)
    learn.fine_tune(1, 1e-2, freeze_epochs=1, cbs=[cb, AtEnd(), chk])
    fct.test_eq(seen[0], 0.)  # the frozen fit deferred
    fct.test_eq(_n_zero(cb.sparsifier), round(0.6 * _n_w(cb.sparsifier)))
    assert len(cb.history) >= 2 and chk.checked > 0


def test_frozen_fit_keeps_existing_masks():
    "A frozen fit after a pruning fit keeps the masks on (the trainable head's masked weights stay zero)"
    from fastai.torch_core import params
    learn = _learn(splitter=lambda m: [params(m[0]), params(m[2:])])
    cb = SparsifyCallback(0.5, schedule=agp(0., 1.))
    learn.fit(1, 1e-2, cbs=[cb, CancelAt(4)])  # part-way
    s = cb.sparsifier.sparsity()
    n = len(cb.history)
    learn.freeze()
    chk = CheckZeros(cb)
    learn.fit(1, 1e-2, cbs=[cb, chk])
    fct.test_eq(cb.sparsifier.sparsity(), s)
    fct.test_eq(len(cb.history), n)
    assert chk.checked > 0


def test_two_callbacks_refused_before_any_change():
    cb1 = SparsifyCallback(0.5)
    learn = _learn(cbs=cb1)
    before = _sd(learn.model)
    cb2 = SparsifyCallback(0.8, schedule='one_shot')
    fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=cb2), contains='SparsifyCallbacks in one fit')
    assert _same_sd(before, learn.model.state_dict())
    assert learn.sparsify is cb1 and cb1 in learn.cbs and cb2 not in learn.cbs
    fct.test_eq(len(learn.metrics), 0)
    assert cb1.sparsifier is None and cb2.sparsifier is None
    fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=cb1), contains='already attached')
    assert learn.sparsify is cb1 and list(learn.cbs).count(cb1) == 1
    seen = {}
    class Peek(Callback):
        order = 55
        def after_epoch(self): seen['names'] = list(self.recorder.metric_names)
    learn.fit(1, 1e-2, cbs=Peek())  # the attached one alone works, one column
    fct.test_eq(seen['names'].count('sparsity'), 1)
    fct.test_close(cb1.sparsifier.sparsity(), 0.5, eps=1e-3)


def test_save_load_continue_same_learner(tmp_path):
    "learn.save/learn.load between fits with the callback attached: masks kept, no new pruning, zeros after every step"
    cb = SparsifyCallback(0.8, schedule='agp')
    learn = _learn(cbs=cb, path=tmp_path, opt_func=Adam)
    learn.fit(2, 1e-2)
    learn.save('m', with_opt=True)
    masks, n = {k: v.clone() for k, v in cb.sparsifier.masks.items()}, len(cb.history)
    learn.fit(1, 1e-2)  # train on, then go back to the checkpoint
    learn.load('m', with_opt=True)
    chk = CheckZeros(cb)
    learn.fit(1, 1e-2, cbs=chk)
    _same_masks(cb.sparsifier.masks, masks)
    fct.test_eq(len(cb.history), n)
    fct.test_eq(_n_zero(cb.sparsifier), round(0.8 * _n_w(cb.sparsifier)))
    assert chk.checked > 0


def test_nm_unreachable_target_warns_once_at_creation():
    with pytest.warns(NMRoundingWarning, match='0, 0.25, 0.5: the target 0.3 will be 0.25'):
        cb = SparsifyCallback(0.3, '2:4')
    learn = _learn()
    with warnings.catch_warnings():
        warnings.simplefilter('error', NMRoundingWarning)
        learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(cb.sparsifier.sparsity(), 0.25)


@pytest.mark.parametrize('param', ['weight_norm', 'spectral_norm'])
def test_parametrized_layer_masked_weights_stay_zero(param):
    "A weight computed by a parametrization: the masks follow the tensors it is computed from, after every step"
    from torch.nn.utils import parametrizations
    model = mlp(64, 64, 32, 10)
    getattr(parametrizations, param)(model[2])
    learn = _learn(model=model, opt_func=SGD, moms=(0.9, 0.9, 0.9))
    cb = SparsifyCallback(0.8, schedule='agp', update_every=1)
    class Zeros(Callback):
        order, run_valid, checked = 41, False, 0
        def after_step(self):
            sp = cb.sparsifier
            for n, mk in sp.masks.items(): assert (sp.weight(n)[~mk] == 0).all(), n
            self.checked += bool(sp.masks)
    chk = Zeros()
    learn.fit(1, 0.05, cbs=[cb, chk])
    assert chk.checked > 0
    sp = cb.sparsifier
    fct.test_eq(sum(int((sp.weight(n) == 0).sum()) for n in sp.layers), round(0.8 * _n_w(sp)))


def test_frozen_fit_prunes_the_trainable_layers_named_in_layers():
    from fastai.torch_core import params
    learn = _learn(splitter=lambda m: [params(m[0]), params(m[2:])])
    learn.freeze()
    cb = SparsifyCallback(0.5, layers=['2', '4'], criteria='gradient_magnitude')
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(_n_zero(cb.sparsifier), round(0.5 * _n_w(cb.sparsifier)))
    fct.test_eq(int((learn.model[0].weight == 0).sum()), 0)


class _Attn(nn.Module):
    "Digits as 8 tokens of 8 features through nn.MultiheadAttention, then a Linear head"
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(64, 10)
    def forward(self, x):
        t = x.view(-1, 8, 8)
        return self.head(self.attn(t, t, t, need_weights=False)[0].flatten(1))


def test_attention_in_projections_pruned_when_asked():
    "attention=True reaches the Sparsifier: MultiheadAttention's in_proj_weight is pruned, masked after every step"
    learn = _learn(model=_Attn())
    cb = SparsifyCallback(0.5, context='local', schedule='one_shot', attention=True)
    chk = CheckZeros(cb)
    learn.fit(1, 1e-2, cbs=[cb, chk])
    w = learn.model.attn.in_proj_weight
    assert 'attn.in_proj_weight' in cb.sparsifier.layers and chk.checked > 0
    fct.test_eq(int((w == 0).sum()), w.numel() // 2)
    n_hist, masks = len(cb.history), {k: v.clone() for k, v in cb.sparsifier.masks.items()}
    learn.fit(1, 1e-2, cbs=[cb, chk])  # the same model: the projection is recognised, not taken for a surgery
    assert not cb.fixed and cb.completed and len(cb.history) == n_hist
    _same_masks(cb.sparsifier.masks, masks)
    dense = _learn(model=_Attn())
    cb2 = SparsifyCallback(0.5, context='local', schedule='one_shot')  # default: attention=False
    dense.fit(1, 1e-2, cbs=cb2)
    assert 'attn.in_proj_weight' not in cb2.sparsifier.layers
    fct.test_eq(int((dense.model.attn.in_proj_weight == 0).sum()), 0)


def test_subclass_events_still_called_and_unhandled_events_skipped():
    "SparsifyCallback answers events it has no method for at once; a subclass's own event methods still run"
    class Counting(SparsifyCallback):
        n_batches = 0
        def after_batch(self): self.n_batches += 1
    learn = _learn()
    cb = Counting(0.5, 'weight', 'global', 'magnitude', 'agp')
    learn.fit(1, 1e-3, cbs=[cb])
    fct.test_eq(cb.n_batches, len(learn.dls.train))  # run_valid=False: training batches only
    fct.test_eq(_n_zero(cb.sparsifier), round(0.5 * _n_w(cb.sparsifier)))
    from fastcore.basics import GetAttr
    looked_up, orig = [], GetAttr.__getattr__
    def spy(self, k):
        looked_up.append(k)
        return orig(self, k)
    GetAttr.__getattr__ = spy
    try: res = cb('after_pred')  # an event without a method: answered without fastai's Learner look-ups
    finally: GetAttr.__getattr__ = orig
    assert res is None and cb.run and looked_up == [], looked_up


@pytest.mark.parametrize('model', ['mlp', 'weight_norm', 'filter'])
def test_layer_by_layer_masker_above_the_fused_limit(monkeypatch, model):
    "Above `_FUSED_MASKS_MAX` the per-step masking keeps only the bool masks (no dtype copies) and still holds"
    from fasterprune import sparsifier as S
    monkeypatch.setattr(S, '_FUSED_MASKS_MAX', 100)  # every model here is above it
    net = mlp(64, 64, 32, 10)
    if model == 'weight_norm':
        from torch.nn.utils import parametrizations
        parametrizations.weight_norm(net[2])
    learn = _learn(model=net, opt_func=Adam, wd=0.1)
    gran = 'filter' if model == 'filter' else 'weight'
    cb = SparsifyCallback(0.5 if gran == 'filter' else 0.8, gran, 'global', 'magnitude', 'agp', update_every=2)
    chk = CheckZeros(cb)
    learn.fit(2, 1e-2, cbs=[cb, chk])
    assert chk.checked >= 10
    sp = cb.sparsifier
    m = sp.masker()
    assert not m.fused and all(k.dtype == torch.bool for _, k in m.pairs)
    fct.test_eq(sum(int((sp.weight(n) == 0).sum()) for n in sp.layers),
                sum(int((~mk).sum()) for mk in sp.masks.values()))
    if model == 'mlp': fct.test_eq(_n_zero(sp), round(0.8 * _n_w(sp)))
    if gran == 'filter':  # the biases of pruned filters: the small float masks, multiplied too
        dead = {n: ~mk.reshape(mk.shape[0], -1).any(1) for n, mk in sp.masks.items()}
        assert sum(int(d.sum()) for d in dead.values()) > 0
        for n, d in dead.items(): assert (sp.layers[n].bias[d] == 0).all(), n


@pytest.mark.parametrize('sched', ['agp_to_end', 'linear_to_end', 'callable'])
def test_gradient_accumulation_schedule_ending_at_the_last_batch_is_exact(sched):
    "The last batches take no optimizer step (GradientAccumulation): a schedule ending at pos 1 still meets its target"
    from fasterprune.schedules import linear
    s = {'agp_to_end': agp(0, 1.), 'linear_to_end': linear(0, 1.), 'callable': lambda pos: pos}[sched]
    learn = _learn()  # 8 batches of 64; a step every 3 batches: none after the 6th
    cb = SparsifyCallback(0.9, 'weight', 'global', 'magnitude', s)
    chk = CheckZeros(cb)
    learn.fit(1, 1e-2, cbs=[GradientAccumulation(n_acc=64 * 3), cb, chk])
    assert cb.completed and cb.history[-1]['pos'] == 1.
    fct.test_eq(_n_zero(cb.sparsifier), round(0.9 * _n_w(cb.sparsifier)))


def test_gradient_accumulation_updates_at_the_first_step_after_each_interval():
    "update_every counts batches: with a step every 3 batches, an update every 2 batches comes at each step"
    from fasterprune.schedules import linear
    learn = _learn()
    cb = SparsifyCallback(0.8, 'weight', 'global', 'magnitude', linear(0, 1.), update_every=2)
    learn.fit(2, 1e-2, cbs=[GradientAccumulation(n_acc=64 * 3), cb])
    fct.test_eq([round(h['pos'] * 16) for h in cb.history], [3, 6, 9, 12, 15, 16])  # 16 batches, steps at 3, 6, ...
    fct.test_eq(_n_zero(cb.sparsifier), round(0.8 * _n_w(cb.sparsifier)))


def test_filter_target_short_of_measured_sparsity_is_explained(caplog):
    "Coupled filters on a transformer: the measured sparsity sits under the target, and the end of the schedule says why"
    from test_zoo import LlamaBlock, _llama_heads
    torch.manual_seed(0)
    tok = torch.randint(0, 50, (64, 8))
    dls = DataLoaders(DataLoader(TensorPairs(tok, tok), bs=16, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(tok[:16], tok[:16]), bs=16), device=torch.device('cpu'))
    def lm_loss(out, y): return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    learn = Learner(dls, LlamaBlock(), loss_func=lm_loss)
    cb = SparsifyCallback(0.5, 'filter', 'global', schedule='one_shot', heads=_llama_heads())
    with caplog.at_level('WARNING', logger='fasterprune.callback'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    s = cb.sparsifier.sparsity()
    assert s < 0.48
    assert f'measured sparsity is {s:.3f}' in caplog.text and 'wo, w2' in caplog.text and 'compact()' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='fasterprune.callback'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)  # schedule done: said once
    assert 'measured sparsity' not in caplog.text


def test_layers_frozen_by_hand_are_pruned_with_a_warning(caplog):
    learn = _learn()
    learn.model[0].weight.requires_grad_(False)
    cb = SparsifyCallback(0.5, 'weight', 'local', schedule='one_shot')
    with caplog.at_level('WARNING', logger='fasterprune.callback'):
        learn.fit(1, 1e-3, cbs=cb)
    assert "0 is frozen (requires_grad=False) but pruned" in caplog.text
    fct.test_eq(int((learn.model[0].weight == 0).sum()), round(0.5 * learn.model[0].weight.numel()))
    caplog.clear()
    learn2 = _learn()
    learn2.model[0].weight.requires_grad_(False)
    with caplog.at_level('WARNING', logger='fasterprune.callback'):
        learn2.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'weight', 'local', schedule='one_shot', exclude='0'))
    assert 'frozen' not in caplog.text and int((learn2.model[0].weight == 0).sum()) == 0


def test_filter_note_when_the_best_unit_keeps_the_target_out_of_reach(caplog):
    "The note does not claim the target was met, and names no kept layer when there is none"
    learn = _learn(model=mlp(64, 8, 10))
    cb = SparsifyCallback(0.99, 'filter', 'local', schedule='one_shot', layers=['0'])
    with caplog.at_level('WARNING', logger='fasterprune.callback'):
        learn.fit(1, 1e-3, cbs=cb)
    assert 'layers with removable filters reach 0.875' in caplog.text and 'keeps its best unit' in caplog.text
    assert 'met' not in caplog.text and 'stay' not in caplog.text


def test_nm_fit_then_surgery_that_breaks_the_groups_then_fit_keeps_the_zeros():
    "2:4 training, then Pruner(learn).prune cuts a width to 6: the next fit keeps the zeros as weight masks"
    from fasterprune.pruner import Pruner
    learn = _learn(model=mlp(64, 8, 8, 10))
    cb = SparsifyCallback(None, '2:4', schedule='one_shot')
    learn.fit(1, 1e-3, cbs=cb)
    Pruner(learn).prune(0.25)
    assert learn.model[2].out_features == 6  # 6 weights a row: no longer groups of 4
    zeros = {n: (p == 0) for n, p in learn.model.named_parameters() if n.endswith('weight')}
    learn.fit(1, 1e-3, cbs=cb)  # was: "rows of 6 weights cannot be split in groups of 4" at the fit's start
    assert cb.fixed and cb.sparsifier.granularity.name == 'weight'
    for n, p in learn.model.named_parameters():
        if n in zeros: assert (p[zeros[n]] == 0).all(), n  # the surgered model's zeros held through the fit


@pytest.mark.parametrize('crit,gran', [('magnitude', 'weight'), ('gradient_magnitude', 'weight'),
                                       ('magnitude', 'filter')])
def test_steps_between_updates_read_nothing_back(crit, gran):
    "On a GPU a host read stalls the queue: between mask updates the callback reads nothing, in no event"
    class Counted(SparsifyCallback):
        def __call__(self, ev):
            with count_syncs() as c: r = super().__call__(ev)
            self.reads.append((ev, len(self.history), sum(c.values())))
            return r
    learn = _learn(model=small_cnn() if gran == 'filter' else None, flat=gran != 'filter')
    cb = Counted(0.8, gran, 'global', crit, 'agp', update_every=4)
    cb.reads = []
    with device_path(): learn.fit(2, 1e-2, cbs=cb)
    per_batch = ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step',
                 'after_step', 'after_cancel_batch', 'after_batch')
    prev, quiet, updates = 0, 0, 0
    for ev, n_hist, n in cb.reads:
        if ev in per_batch and n_hist == prev: quiet += 1; fct.test_eq((ev, n), (ev, 0))
        elif ev == 'after_step':  # an update: reads bounded by the layers, whatever their size
            updates += 1
            assert n <= 12 * len(cb.sparsifier.layers) + 8, (ev, n)
        prev = n_hist
    assert quiet > 100 and updates >= 2, (quiet, updates)
    fct.test_eq(len(cb.history), updates)


@pytest.mark.parametrize('sched,at', [(one_shot(0.5), [7]), (iterative(4, 0., 0.8), [0, 14, 28, 42])])
def test_jumps_land_on_their_batch_with_seven_batches_an_epoch(sched, at):
    "fastai's pct_train is a running float sum: with 7 batches an epoch a jump must not slip one batch late"
    learn = _learn(n=448)  # 7 batches of 64
    n_epoch = 2 if at == [7] else 10
    cb = SparsifyCallback(0.8, 'weight', 'global', schedule=sched)
    learn.fit(n_epoch, 1e-2, cbs=cb)
    n_steps = 7 * n_epoch
    fct.test_eq([round(h['pos'] * n_steps, 9) for h in cb.history], at)
    fct.test_close(cb.history[-1]['sparsity'], 0.8, eps=1e-4)


def test_a_new_callback_resuming_a_fit_does_not_prune_as_at_its_start():
    "fit(start_epoch=4) with a new callback on a dense model: no update at position 0 (iterative's first level); it "
    "prunes at once to the level of batch 28, where it resumes, and follows from there"
    learn = _learn(n=448)
    cb = SparsifyCallback(0.8, 'weight', 'global', schedule=iterative(4, 0., 0.8))
    learn.fit(10, 1e-2, cbs=cb, start_epoch=4)
    fct.test_eq([round(h['pos'] * 70, 9) for h in cb.history], [28, 42])  # the resumed fit's start, the jump
    fct.test_close([h['target'] for h in cb.history], [0.6, 0.8], eps=1e-9)


def test_nm_with_gradients_stops_accumulating_at_its_last_level():
    "2:4 reaches its last level before the schedule's end: the callback is done there and frees the gradients it kept"
    learn = _learn()
    cb = SparsifyCallback(None, '2:4', criteria='gradient_magnitude', schedule='agp', update_every=2)
    learn.fit(2, 1e-3, cbs=cb)
    assert cb.completed and cb.history[-1]['pos'] < 0.5, cb.history[-1]
    fct.test_eq((cb.sparsifier.criterion.acc, cb.sparsifier.criterion.n_steps), ({}, 0))
    fct.test_eq(cb.history[-1]['sparsity'], 0.5)


class _DictModel(nn.Module):
    "A forward that takes one dict of tensors, as Hugging Face-style models do"
    def __init__(self): super().__init__(); self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
    def forward(self, batch): return self.fc2(torch.relu(self.fc1(batch['x'])))


@pytest.mark.parametrize('gran', ['weight', 'filter'])
def test_dict_batches_get_a_report_with_flops(gran):
    "Batches of (dict, target): the callback traces and reports on one item of a dict (it used to fail the fit's end)"
    xt, yt, _, _ = digits_arrays(True)
    ds = [({'x': xt[i]}, yt[i]) for i in range(256)]
    dls = DataLoaders(DataLoader(ds, bs=32, shuffle=True, drop_last=True), DataLoader(ds[:64], bs=64),
                      device=torch.device('cpu'))
    learn = Learner(dls, _DictModel(), loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.5, gran, 'local', schedule=one_shot())
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=cb)
    tot = cb.report.set_index('layer').loc['total']
    fct.test_eq(tot.flops, 64 * 32 + 32 * 10)
    assert tot.nonzero_flops < tot.flops


def test_report_without_flops_when_one_item_cannot_run(caplog):
    "A model that cannot run on one item: the fit ends normally, the report has its parameters and says why no FLOPs"
    class Pairs(nn.Module):  # needs an even batch
        def __init__(self): super().__init__(); self.fc = nn.Linear(128, 10)
        def forward(self, x): return self.fc(x.reshape(-1, 128)).repeat_interleave(2, 0)
    learn = _learn(model=Pairs())
    cb = SparsifyCallback(0.5, schedule=one_shot())
    with caplog.at_level('WARNING', logger='fasterprune.callback'): learn.fit(1, 1e-3, cbs=cb)
    assert 'counts no FLOPs' in caplog.text, caplog.text
    tot = cb.report.set_index('layer').loc['total']
    assert math.isnan(tot.flops)
    fct.test_eq(tot.params - tot.nonzero, 640)


@pytest.mark.parametrize('tracker', ['save', 'early'])
def test_trackers_keep_a_pruned_epoch(tmp_path, tracker):
    "SaveModelCallback/EarlyStoppingCallback compare only pruned epochs: the fit ends at the target, not an early epoch"
    from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback
    learn = _learn(path=tmp_path)
    # monitoring the sparsity column with np.less, the least pruned epoch is the best: the worst case for a tracker
    trk = (SaveModelCallback(monitor='sparsity', comp=np.less, fname='best') if tracker == 'save'
           else EarlyStoppingCallback(monitor='sparsity', comp=np.less, patience=1))
    cb = SparsifyCallback(0.7, 'weight', 'global', schedule=agp(0., 0.75))
    learn.fit(4, 1e-2, cbs=[cb, trk])
    assert cb.completed
    fct.test_eq(_n_zero(cb.sparsifier), round(0.7 * _n_w(cb.sparsifier)))  # the weights the fit ends with
    fct.test_close(cb.report.set_index('layer').loc['total'].sparsity,
                   _n_zero(cb.sparsifier) / sum(p.numel() for p in learn.model.parameters()), eps=1e-12)
    fct.test_eq(len(learn.recorder.values), 4)  # no early stop while pruning


def test_a_stopped_schedule_says_so(caplog):
    "A fit cancelled before its schedule's end: a warning with where it stopped"
    learn = _learn()
    cb = SparsifyCallback(0.8, schedule='agp')
    with caplog.at_level('WARNING', logger='fasterprune.callback'): learn.fit(2, 1e-2, cbs=[cb, CancelAt(5)])
    assert not cb.completed and 'before the schedule reached its target' in caplog.text, caplog.text


def test_zeros_of_an_init_warn_and_keep_zeros_false_trains_them(caplog):
    "An identity init is 98 % zeros: kept as pruned by default (with a warning), ranked like any weight with keep_zeros=False"
    def model():
        torch.manual_seed(0)
        m = mlp(64, 64, 64, 10)
        nn.init.eye_(m[2].weight)
        return m
    learn = _learn(model=model())
    with caplog.at_level('WARNING', logger='fasterprune.callback'):
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'weight', 'local', schedule=one_shot()))
    assert 'keep_zeros=False' in caplog.text and '2 98.4%' in caplog.text, caplog.text
    assert 'the schedule ended above its target (2 98.4%)' in caplog.text, caplog.text
    fct.test_close(float((learn.model[2].weight == 0).float().mean()), 63 / 64, eps=1e-9)
    learn = _learn(model=model())
    cb = SparsifyCallback(0.5, 'weight', 'local', schedule=one_shot(), keep_zeros=False)
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(int((~cb.sparsifier.masks['2']).sum()), 64 * 64 // 2)  # half of the layer, no more
    assert int((learn.model[2].weight == 0).sum()) < 64 * 64 * 0.6  # the other zeros of the init trained


class _TextLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.LSTM(16, 64, batch_first=True), nn.Linear(64, 10)
    def forward(self, x): return self.fc(self.rnn(self.emb(x))[0][:, -1])


def _text_learner():
    torch.manual_seed(0)
    x, y = torch.randint(0, 50, (256, 8)), torch.randint(0, 10, (256,))
    dls = DataLoaders(DataLoader(TensorPairs(x, y), bs=64, drop_last=True), DataLoader(TensorPairs(x, y), bs=64),
                      device=torch.device('cpu'))
    return Learner(dls, _TextLSTM(), loss_func=nn.CrossEntropyLoss())


def test_rnn_model_says_the_column_is_the_pruned_layers(caplog):
    "An LSTM holds most parameters: pruned by default (no warning, its FLOPs counted); left out, the callback says so"
    learn = _text_learner()
    cb = SparsifyCallback(0.9, schedule=one_shot())
    with caplog.at_level('WARNING', logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=cb)
    assert 'of the model' not in caplog.text and 'not counted' not in caplog.text, caplog.text
    fct.test_eq(list(cb.sparsifier.layers), ['rnn.weight_ih_l0', 'rnn.weight_hh_l0', 'fc'])
    rows = cb.report.set_index('layer')
    assert rows.loc['rnn.weight_hh_l0', 'flops'] > 0 and rows.loc['rnn.weight_hh_l0', 'sparsity'] > 0.5
    learn, cb = _text_learner(), SparsifyCallback(0.9, schedule=one_shot(), exclude=nn.LSTM)
    with caplog.at_level('WARNING', logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=cb)
    assert 'hold 2.9% of the model' in caplog.text and 'rnn (20,992)' in caplog.text, caplog.text


def test_torch_compiled_model_prunes_by_its_layer_names():
    "torch.compile wraps the model: the callback prunes the module it compiled, with the same layer names"
    learn = _learn()
    learn.model = torch.compile(learn.model, backend='eager')
    cb = SparsifyCallback(0.5, schedule=one_shot())
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(list(cb.sparsifier.layers), ['0', '2', '4'])
    fct.test_eq(_n_zero(cb.sparsifier), round(0.5 * _n_w(cb.sparsifier)))


def test_lazy_layers_get_their_shapes_before_pruning():
    "LazyLinear has no shape until its first forward: the callback runs one on a training item first"
    learn = _learn(model=nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 10)))
    cb = SparsifyCallback(0.5, schedule=one_shot())
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(tuple(learn.model[0].weight.shape), (32, 64))
    fct.test_eq(_n_zero(cb.sparsifier), round(0.5 * _n_w(cb.sparsifier)))


def test_filters_of_a_model_whose_only_layer_is_its_output_are_refused_clearly(caplog):
    "Embedding -> LSTM -> Linear: the LSTM stays dense under filters (said), the Linear makes the output: say so"
    learn = _text_learner()
    w0 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with caplog.at_level('WARNING', logger='fasterprune'), learn.no_bar(), learn.no_logging():
        fct.test_fail(lambda: learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'filter')),
                      contains="the only layers it could prune (fc) produce the model's output, whose width must stay")
    assert 'filter granularity leaves the recurrent weights rnn.weight_ih_l0, rnn.weight_hh_l0 dense' in caplog.text
    for k, v in learn.model.state_dict().items(): fct.test_eq(v, w0[k])


def test_compact_follows_the_callbacks_strict_false():
    "An op the graph does not know: the callback couples the rest (strict=False); Pruner(learn) then does the same"
    from fasterprune.pruner import Pruner
    learn = _learn(model=Rolled(), flat=False)
    learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot()))
    assert learn._sparsify_strict is False
    n0 = sum(p.numel() for p in learn.model.parameters())
    Pruner(learn).compact()  # would raise UnknownOpError with the default strict=True
    assert sum(p.numel() for p in learn.model.parameters()) < n0
    learn.fit(1, 1e-3)


def test_a_pruned_checkpoint_below_the_target_resumes_quietly(caplog):
    "Zeros of a pruned checkpoint under the new target: kept, no warning about them, the target reached exactly"
    from fasterprune.sparsifier import Sparsifier
    learn = _learn()
    Sparsifier(learn.model, 'weight', 'local').sparsify(0.5)
    cb = SparsifyCallback(0.8, 'weight', 'local', schedule='agp')
    with caplog.at_level('WARNING', logger='fasterprune'): learn.fit(1, 1e-2, cbs=cb)
    assert 'keep_zeros' not in caplog.text and 'above its target' not in caplog.text, caplog.text
    fct.test_eq(_n_zero(cb.sparsifier), sum(round(0.8 * m.weight.numel()) for m in cb.sparsifier.layers.values()))


def test_dict_batches_compact_and_rewind_with_the_pruner():
    "Batches of (dict, target): Pruner(learn) takes one item of a dict as its example; compact and rewinding work"
    from fasterprune.pruner import Pruner
    from fasterprune.rewind import model_state
    xt, yt, _, _ = digits_arrays(True)
    ds = [({'x': xt[i]}, yt[i]) for i in range(256)]
    dls = DataLoaders(DataLoader(ds, bs=32, shuffle=True, drop_last=True), DataLoader(ds[:64], bs=64),
                      device=torch.device('cpu'))
    torch.manual_seed(0)
    learn = Learner(dls, _DictModel(), loss_func=nn.CrossEntropyLoss())
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'filter', 'local',
                                                                                       schedule=one_shot()))
    x = {'x': xt[:8]}
    with torch.no_grad(): ref = learn.model.eval()(x)
    pr = Pruner(learn)
    pr.compact()
    fct.test_eq(learn.model.fc1.out_features, 16)
    with torch.no_grad(): fct.test_close(learn.model.eval()(x), ref, eps=1e-5)
    pr.keep_rewind_point()
    w0 = model_state(learn.model)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    pr.rewind()
    for k, v in model_state(learn.model).items(): fct.test_eq(v, w0[k])


def test_a_layer_whose_second_call_makes_the_output_is_an_output_layer():
    "A layer called twice (weight sharing in the forward): its second call's output is the model's output"
    from fasterprune.callback import _output_layers
    from fasterprune.sparsifier import Sparsifier
    class Twice(nn.Module):
        def __init__(s): super().__init__(); s.a, s.l = nn.Linear(4, 8), nn.Linear(8, 8)
        def forward(s, x): return s.l(torch.relu(s.l(torch.relu(s.a(x)))))
    fct.test_eq(_output_layers(Sparsifier(Twice(), 'filter'), torch.randn(3, 4)), ['l'])
