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


class _Stateful(nn.Module):
    "A forward that reads and writes a state tensor (`self.h`): torch.fx takes it as a constant when it traces"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.h = nn.Linear(8, 5), None
    def forward(self, x):
        s = self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))
        if self.h is not None: s = s + 0.5 * self.h
        self.h = s.detach().mean(0)
        return s


def test_pruning_a_stateful_traced_model_leaves_no_fx_constants_on_it(tmp_path):
    "Each Pruner call used to leave one more `_tensor_constant<N>` (holding old state) on the model (F5 #4b, F6 #2)"
    from fasterprune.pruner import Pruner, save_pruned, load_pruned
    def consts(m): return sorted(k for k in vars(m) if k.startswith('_tensor_constant'))
    x = torch.randn(4, 3, 8, 8)
    m = _Stateful().eval()
    with torch.no_grad(): m(x)
    h = m.h
    for _ in range(2): Pruner(m, x).prune(0.2)
    pr = Pruner(m, x)
    pr.compact()
    pr.prune(0.1)
    fct.test_eq(consts(m), [])
    assert m.h is h  # the forward's state as it was
    n = m.c1.out_channels
    assert n < 8
    save_pruned(m, tmp_path / 'm.pt')
    fresh = _Stateful().eval()
    with torch.no_grad(): fresh(x)
    load_pruned(fresh, tmp_path / 'm.pt')
    fct.test_eq(consts(fresh), [])
    fct.test_eq(fresh.c1.out_channels, n)
