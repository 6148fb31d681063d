"""A second read of the fourth session's change (R3): each test fails on the code before its fix.
1. fit -> compact -> fit with fastai's `OptimWrapper` (a torch optimizer): the state lives in the torch optimizer, and
   compact cut the wrapper's own empty one; the next step failed on the old shapes.
2. `Pruner(learn)`'s rewinding on a `torch.compile`d Learner: the callbacks compared the compiled wrapper with the module.
3. The sparsity column of a compiled model with `exclude=` by name was NaN (layer names of the wrapper)."""
import sys, tempfile, warnings
from functools import partial
import pytest, torch
import torch.nn as nn
import fastcore.test as fct
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from torch.utils.data import TensorDataset, DataLoader
from fasterprune.pruner import Pruner
from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import one_shot
from test_callback import _learn


@pytest.mark.parametrize('fold', [True, False])
def test_compact_cuts_the_state_of_a_wrapped_torch_optimizer(fold):
    "OptimWrapper(AdamW): compact cuts the torch optimizer's state, a fold's new bias joins its group, the fit goes on"
    torch.manual_seed(0)
    X, y = torch.randn(128, 3, 8, 8), torch.randint(0, 4, (128,))
    dls = DataLoaders(DataLoader(TensorDataset(X[:96], y[:96]), batch_size=16, shuffle=True, drop_last=True),
                      DataLoader(TensorDataset(X[96:], y[96:]), batch_size=32))
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1, bias=not fold), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    learn = Learner(dls, m, nn.CrossEntropyLoss(), opt_func=partial(OptimWrapper, opt=torch.optim.AdamW),
                    path=tempfile.mkdtemp())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    with torch.no_grad():
        m[0].weight[:5] = 0
        m[0].bias[:5] = 0.5 if fold else 0.  # 5 constant channels: folded into the next conv's (new) bias
    Pruner(learn).compact()
    fct.test_eq(m[0].out_channels, 11)
    st = learn.opt.opt.state
    fct.test_eq(tuple(st[m[0].weight]['exp_avg'].shape), (11, 3, 3, 3))
    b0 = m[2].bias.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)  # the step used to fail on the old shapes
    assert not torch.equal(b0, m[2].bias.detach())  # the bias (new with a fold) trains


def test_rewinding_a_compiled_learner():
    "keep_rewind_point -> fit -> prune_weights -> rewind -> fit on Learner(dls, torch.compile(model))"
    learn = _learn()
    learn.model = torch.compile(learn.model, backend='eager')
    pr = Pruner(learn)
    pr.keep_rewind_point(0)
    learn.fit(1, 1e-2)
    pr.prune_weights(0.5)
    pr.rewind()
    learn.fit(1, 1e-2)
    inner = learn.model._orig_mod
    fct.test_close(float((inner[0].weight == 0).float().mean()), 0.5, eps=0.01)


def test_sparsity_column_of_a_compiled_model_with_exclude():
    learn = _learn()
    learn.model = torch.compile(learn.model, backend='eager')
    cb = SparsifyCallback(0.5, schedule=one_shot(), exclude=['0'])
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(list(cb.sparsifier.layers), ['2', '4'])
    fct.test_close(learn.recorder.values[-1][-1], 0.5, eps=1e-3)
