"Sixth session: behaviours found by the coordinator and this session's trials, tested as users hit them"
import torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback
from fasterprune.callback import SparsifyCallback
from fasterprune.data import mlp
from fasterprune.schedules import agp
from test_callback import _dls


def _make(tmp_path):
    torch.manual_seed(0)
    learn = Learner(_dls(shuffle=False), mlp(64, 48, 10), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    return learn


class _ZerosAtEveryStep(Callback):
    "After each optimizer step (after SparsifyCallback's), the weights zero in the checkpoint are still zero"
    order = 41
    def __init__(self, zeros): self.zeros, self.bad = zeros, []
    def after_step(self):
        for n, (m, z) in self.zeros.items():
            if (m.weight[z] != 0).any(): self.bad.append((self.train_iter, n))


def test_resume_with_keep_zeros_false_keeps_the_checkpoints_pruned_weights_at_zero(tmp_path):
    "save mid-schedule → load → fit(start_epoch=) with keep_zeros=False: the pruned weights never train (R3 #9)"
    class SaveAt(Callback):
        def after_epoch(self):
            if self.epoch == 1: self.learn.save('mid')
    a = _make(tmp_path)
    a.fit(4, 1e-2, cbs=[SparsifyCallback(0.8, schedule=agp(0., 1.), update_every=4), SaveAt()])
    b = _make(tmp_path)
    b.load('mid')
    lin = {n: m for n, m in b.model.named_modules() if isinstance(m, nn.Linear)}
    zeros = {n: (m, m.weight.detach() == 0) for n, m in lin.items()}
    n0 = sum(int(z.sum()) for _, z in zeros.values())
    assert n0 > 0
    cb = SparsifyCallback(0.8, schedule=agp(0., 1.), keep_zeros=False, update_every=4)
    watch = _ZerosAtEveryStep(zeros)
    b.fit(4, 1e-2, start_epoch=2, cbs=[cb, watch])
    fct.test_eq(watch.bad, [])
    # the resumed fit pruned at once, at the schedule's level at its first batch, then followed the schedule
    fct.test_close(cb.history[0]['pos'], 0.5, eps=1e-9)
    fct.test_eq(cb.history[-1]['target'], 0.8)
    fct.test_eq(sum(int((~k).sum()) for k in cb.sparsifier.masks.values()), round(0.8 * sum(m.weight.numel() for m in lin.values())))
