"Sixth session, workflow fuzzer F7 (sequences of what users do to one Learner): each finding as the user hits it"
import threading
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelFitException
from fasterprune.data import digits_dls, mlp
from fasterprune.callback import SparsifyCallback
from fasterprune.lottery import LotteryTicket
from fasterprune.pruner import Pruner


def _learn(cbs=None):
    torch.manual_seed(0)
    learn = Learner(digits_dls(bs=64), mlp(64, 32, 16, 10), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    learn.logger = lambda *a: None
    return learn


def _unannounced_cut(m):
    "A surgery by hand that no ticket is told about (a `Pruner` on the Learner tells its ticket): half the first units"
    keep = torch.arange(0, 32, 2)
    with torch.no_grad():
        m[0].weight.data, m[0].bias.data = m[0].weight.data[keep], m[0].bias.data[keep]
        m[2].weight.data = m[2].weight.data[:, keep]


def _state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def _same(m, sd): return all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def _finishes(f, secs=20) -> bool:
    "Does `f()` return (or raise) within `secs`? (a Learner left locked by fastai waits forever)"
    t = threading.Thread(target=lambda: _swallow(f), daemon=True)
    t.start()
    t.join(secs)
    return not t.is_alive()


def _swallow(f):
    try: f()
    except Exception: pass


def test_validation_passes_do_not_lock_the_learner_with_an_unfit_ticket():
    "F7 #1: a RewindCallback refusing in a validation pass's before_fit left fastai's lock held: later passes hung"
    learn = _learn()
    lt = LotteryTicket(learn, rate=0.2)
    learn.fit(1, 1e-3)
    lt.next_round()
    _unannounced_cut(learn.model)
    learn.get_preds()  # a validation pass checks nothing: it runs
    assert not learn.lock.locked()
    assert _finishes(learn.validate)
    with pytest.raises(ValueError, match='masks no longer fit'): learn.fit(1, 1e-3)  # a fit says so


def test_validation_passes_do_not_lock_the_learner_with_two_sparsify_callbacks():
    "F7 #1: two SparsifyCallbacks refused in a validation pass's before_fit left fastai's lock held"
    learn = _learn(cbs=SparsifyCallback(0.5))
    learn.add_cb(SparsifyCallback(0.8))
    learn.validate()  # nothing is pruned in a validation pass: it runs
    assert not learn.lock.locked()
    with pytest.raises(ValueError, match='2 SparsifyCallbacks'): learn.fit(1, 1e-3)
    learn.remove_cb(learn.sparsify2)
    assert _finishes(learn.validate)


def test_the_rewind_point_is_kept_at_the_first_fit_not_at_a_validation_before_it():
    "F7 #2: LotteryTicket(rewind_iter=0) kept its point at a validate() before the first fit (weights loaded after lost)"
    learn = _learn()
    lt = LotteryTicket(learn, rate=0.2)
    learn.validate()
    with torch.no_grad(): learn.model[0].weight.mul_(3.)  # stands for learn.load('pretrained')
    start = _state(learn.model)
    learn.fit(1, 1e-3)
    assert all(torch.equal(lt.rewind_point[k], v) for k, v in start.items())


def test_a_fit_the_rewind_callback_refuses_prunes_nothing():
    "F7 #3: the fit refused for a rewind iteration beyond its length still let an earlier SparsifyCallback prune"
    cb = SparsifyCallback(0.3, schedule='one_shot')
    learn = _learn(cbs=cb)
    LotteryTicket(learn, rewind_iter=100)  # longer than the fit's 22 steps
    sd = _state(learn.model)
    with pytest.raises(ValueError, match='beyond the fit'): learn.fit(1, 1e-3)
    assert _same(learn.model, sd)
    fct.test_eq((cb.sparsifier, cb.history), (None, []))


def test_next_round_after_an_unannounced_surgery_changes_nothing():
    "F7 #4: next_round() pruned first, then refused with 'the model was not changed'"
    learn = _learn()
    lt = LotteryTicket(learn, rate=0.2)
    learn.fit(1, 1e-3)
    _unannounced_cut(learn.model)
    sd = _state(learn.model)
    with pytest.raises(ValueError, match='rewind point does not fit'): lt.next_round()
    assert _same(learn.model, sd)
    fct.test_eq((lt.round, lt.masks), (0, {}))


class _Interrupt(Callback):
    def after_batch(self):
        if self.training and self.train_iter == 3: raise KeyboardInterrupt


def test_removing_the_callback_after_a_fit_that_died_leaves_validation_working():
    "F7 #5: the callback's sparsity column stayed in learn.metrics and broke validate/get_preds once it was removed"
    learn = _learn(cbs=SparsifyCallback(0.5))
    with pytest.raises(KeyboardInterrupt): learn.fit(2, 1e-3, cbs=_Interrupt())
    learn.remove_cb(learn.sparsify)
    fct.test_eq(len(learn.metrics), 0)
    learn.validate()
    learn.get_preds()


class _CancelAt(Callback):
    order = 90
    def after_batch(self):
        if self.training and self.train_iter >= 3: raise CancelFitException()


def test_a_rewind_error_from_after_fit_leaves_no_stale_sparsity_column():
    "F7 #5: RewindCallback's after_fit error skipped SparsifyCallback's: removing it then broke validate()"
    learn = _learn()
    LotteryTicket(learn, rewind_iter=10)
    cb = SparsifyCallback(0.5)
    learn.add_cb(cb)
    with pytest.raises(RuntimeError, match='before the rewind iteration'): learn.fit(2, 1e-3, cbs=_CancelAt())
    learn.remove_cb(cb)
    learn.validate()


@pytest.mark.parametrize('attached', [True, False])
def test_rewinding_keeps_the_weights_a_sparsify_callback_pruned(attached):
    "F7 #6: rewind() brought back the weights the callback pruned; with fit(cbs=cb) they stayed dense for good"
    cb = SparsifyCallback(0.5, schedule='one_shot')
    learn = _learn(cbs=cb if attached else None)
    pruner = Pruner(learn).keep_rewind_point(0)
    learn.fit(1, 1e-3, cbs=None if attached else cb)
    pruned = {n: m.weight == 0 for n, m in cb.sparsifier.layers.items()}
    pruner.prune_weights(0.2)  # 20 % of the survivors
    pruner.rewind()
    for n, z in pruned.items(): assert (cb.sparsifier.layers[n].weight[z] == 0).all(), n
    n_w = sum(z.numel() for z in pruned.values())
    zeros = sum(int((m.weight == 0).sum()) for m in cb.sparsifier.layers.values())
    assert abs(zeros / n_w - 0.6) < 0.01, zeros / n_w
    learn.fit(1, 1e-3)
    fct.test_eq(sum(int((m.weight == 0).sum()) for m in cb.sparsifier.layers.values()), zeros)


def test_a_refused_rewind_adds_no_callback_and_pruners_share_one_rewinder():
    "F7 #7: each refused Pruner(learn).rewind() added one more RewindCallback"
    learn = _learn()
    n = len(learn.cbs)
    for _ in range(2):
        with pytest.raises(RuntimeError, match='no rewind point'): Pruner(learn).rewind()
    fct.test_eq(len(learn.cbs), n)
    a = Pruner(learn).keep_rewind_point(0)
    b = Pruner(learn)
    b.prune_weights(0.2)
    fct.test_eq(len(learn.cbs), n + 1)  # one RewindCallback, one Rewinder
    assert b._rw() is a._rw()
