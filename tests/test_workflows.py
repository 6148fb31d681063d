"""Workflow suite (issue 13): SparsifyCallback and Pruner on the fastai paths users walk — fit → compact → fit,
lr_find → fit, fine_tune, validate, save → load → continue — on a fastai vision model (torchvision resnet18
through `vision_learner`, random weights, digits rendered as 3×16×16 `TensorImage`s) and a fastai `TabularModel`
(digits as a DataFrame with one categorical column). At each step the promises are checked: exact sparsity, masked
weights zero after every optimizer step, no weight changed by validate/lr_find, the compacted model computes what the
masked one did and is not pruned again."""
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
import pandas as pd
import torchvision
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.data.block import CategoryBlock
from fastai.metrics import accuracy
from fastai.torch_core import TensorImage, TensorCategory
from fastai.vision.learner import vision_learner
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.core import Categorify, Normalize
from fastai.tabular.learner import tabular_learner
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune, lr_find)
from fasterprune.callback import SparsifyCallback
from fit_checks import CheckZeros, CancelAt
from fasterprune.data import digits_arrays, TensorPairs
from fasterprune.pruner import Pruner
from fasterprune.schedules import agp

KINDS = ['vision', 'tabular']
LR = dict(vision=3e-3, tabular=1e-2)


class _Images(TensorPairs):
    "What fastai's image pipelines yield: TensorImage inputs, TensorCategory targets"
    def __getitem__(self, i): return TensorImage(self.x[i]), TensorCategory(self.y[i])


def _img(x): return F.interpolate(x, size=16, mode='bilinear').expand(-1, 3, -1, -1).contiguous()


def vision(cbs=None, path='.', n=256):
    torch.manual_seed(0)
    xt, yt, xv, yv = digits_arrays(flat=False)
    dls = DataLoaders(DataLoader(_Images(_img(xt[:n]), yt[:n]), bs=64, shuffle=True, drop_last=True),
                      DataLoader(_Images(_img(xv[:128]), yv[:128]), bs=128), device=torch.device('cpu'))
    learn = vision_learner(dls, torchvision.models.resnet18, pretrained=False, n_out=10,
                           loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=cbs, path=path)
    learn.remove_cbs(ProgressCallback)
    return learn


def tabular(cbs=None, path='.', n=512):
    torch.manual_seed(0)
    xt, yt, xv, yv = digits_arrays(flat=True)
    x, y = torch.cat([xt[:n], xv]), torch.cat([yt[:n], yv])
    df = pd.DataFrame(x.numpy(), columns=[f'p{i}' for i in range(64)])
    df['ink'] = pd.qcut(df.sum(1), 5, labels=list('abcde')).astype(str)  # a categorical column: an Embedding
    df['label'] = y.numpy()
    dls = TabularDataLoaders.from_df(df, path=path, procs=[Categorify, Normalize], cat_names=['ink'],
                                     cont_names=[f'p{i}' for i in range(64)], y_names='label', y_block=CategoryBlock(),
                                     valid_idx=list(range(n, len(df))), bs=64, device=torch.device('cpu'))
    learn = tabular_learner(dls, layers=[64, 32], metrics=accuracy, cbs=cbs)
    learn.remove_cbs(ProgressCallback)
    return learn


MAKE = dict(vision=vision, tabular=tabular)






def _layers(model): return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
def _sd(model): return {k: v.clone() for k, v in model.state_dict().items()}
def _same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def _n_zero(sp): return sum(int((m.weight == 0).sum()) for m in sp.layers.values())
def _n_w(sp): return sum(m.weight.numel() for m in sp.layers.values())
def _xb(learn): return tuple(learn.dls.valid.one_batch()[:getattr(learn.dls, 'n_inp', 1)])


def _out(model, xb):
    model.eval()
    with torch.no_grad(): return model(*xb)


@pytest.mark.parametrize('kind', KINDS)
def test_fit_compact_fit(kind):
    cb = SparsifyCallback(0.8, 'weight', 'global', schedule='agp')
    learn = MAKE[kind](cbs=cb)
    z = CheckZeros(cb)
    learn.fit(2, LR[kind], cbs=z)
    assert z.checked > 0
    fct.test_eq(_n_zero(cb.sparsifier), round(0.8 * _n_w(cb.sparsifier)))  # exact
    train_loss = learn.recorder.values[-1][0]
    xb = _xb(learn)
    ref = _out(learn.model, xb)
    Pruner(learn).compact()
    fct.test_close(_out(learn.model, xb), ref, eps=1e-4)  # compacted output equal
    acc = learn.validate()[1]
    zeros = [(m.weight == 0).clone() for m in _layers(learn.model)]
    z = CheckZeros(cb)
    learn.fit(1, LR[kind] / 10, cbs=z)
    fct.test_eq([(m.weight == 0) for m in _layers(learn.model)], zeros)  # the same zeros: nothing pruned again
    assert learn.recorder.values[-1][0] < 1.5 * train_loss  # training goes on from where it was, nothing re-pruned
    if kind == 'tabular': assert learn.validate()[1] > acc - 0.1  # (the 8-step resnet's BatchNorm statistics make its
                                                                  # validation accuracy too noisy to compare)


@pytest.mark.parametrize('kind', KINDS)
def test_filter_fit_compact_fit(kind):
    "Filters the callback pruned are removed by compact(); the next fit trains the smaller model, pruning nothing more"
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot')
    learn = MAKE[kind](cbs=cb)
    learn.fit(1, LR[kind])
    xb = _xb(learn)
    ref, n0 = _out(learn.model, xb), sum(p.numel() for p in learn.model.parameters())
    Pruner(learn).compact()
    n1 = sum(p.numel() for p in learn.model.parameters())
    assert n1 < 0.8 * n0, (n0, n1)
    fct.test_close(_out(learn.model, xb), ref, eps=1e-4)
    shapes = [tuple(m.weight.shape) for m in _layers(learn.model)]
    dead = [int((m.weight.flatten(1) == 0).all(1).sum()) for m in _layers(learn.model)]
    learn.fit(1, LR[kind] / 10)
    fct.test_eq([tuple(m.weight.shape) for m in _layers(learn.model)], shapes)
    fct.test_eq([int((m.weight.flatten(1) == 0).all(1).sum()) for m in _layers(learn.model)], dead)
    assert cb.fixed


@pytest.mark.parametrize('kind', KINDS)
def test_lr_find_then_fit(kind, tmp_path):
    cb = SparsifyCallback(0.8, 'weight', 'global', schedule=agp(0., 1.))
    learn = MAKE[kind](cbs=cb, path=tmp_path)
    before = _sd(learn.model)
    learn.lr_find(num_it=8, show_plot=False)
    assert _same(before, _sd(learn.model))  # weights and BatchNorm statistics as before
    assert cb.sparsifier is None and cb.history == []
    z = CheckZeros(cb)
    learn.fit(2, LR[kind], cbs=z)
    assert cb.history[0]['target'] < 0.4  # gradual from the start of this fit
    fct.test_eq(_n_zero(cb.sparsifier), round(0.8 * _n_w(cb.sparsifier)))
    assert z.checked > 0


@pytest.mark.parametrize('kind', KINDS)
def test_fine_tune(kind):
    "vision_learner's fine_tune: the frozen fit defers, the unfrozen one prunes (gradient criterion included);"
    "the tabular Learner has one parameter group, so nothing is frozen and the first fit prunes"
    cb = SparsifyCallback(0.7, 'weight', 'global', 'gradient_magnitude', 'agp')
    learn = MAKE[kind]()
    seen = []
    class AtEnd(Callback):
        order = 60
        def after_fit(self): seen.append((cb.sparsifier.sparsity(), len(cb.history)))
    z = CheckZeros(cb)
    learn.fine_tune(1, LR[kind], freeze_epochs=1, cbs=[cb, AtEnd(), z])
    target = round(0.7 * _n_w(cb.sparsifier))
    if kind == 'vision': fct.test_eq(seen[0], (0., 0))  # the frozen fit kept the (no) masks
    else: fct.test_eq(seen[0][1], seen[1][1])  # the schedule completed in the first fit; the second keeps its masks
    fct.test_eq(_n_zero(cb.sparsifier), target)
    assert z.checked > 0


@pytest.mark.parametrize('kind', KINDS)
def test_validate_and_get_preds_change_nothing(kind):
    cb = SparsifyCallback(0.9, 'weight', 'global', schedule='one_shot')
    learn = MAKE[kind](cbs=cb)
    before = _sd(learn.model)
    res = learn.validate()
    learn.get_preds()
    assert _same(before, _sd(learn.model))
    assert cb.sparsifier is None and cb.history == []
    fct.test_eq(len(res), 3)  # loss, accuracy, sparsity (measured, 0)
    learn.fit(1, LR[kind])
    fct.test_eq(_n_zero(cb.sparsifier), round(0.9 * _n_w(cb.sparsifier)))
    pruned = _sd(learn.model)
    learn.validate()
    learn.get_preds()
    assert _same(pruned, _sd(learn.model))


@pytest.mark.parametrize('kind', KINDS)
def test_save_load_continue(kind, tmp_path):
    "An interrupted AGP fit saved with learn.save, loaded into a new Learner with a new callback: the saved zeros are"
    "the masks, the schedule reaches the exact target, masked weights stay zero"
    mk = lambda: SparsifyCallback(0.8, 'weight', 'global', schedule=agp(0., 1.))
    cb = mk()
    learn = MAKE[kind](cbs=cb, path=tmp_path)
    n = len(learn.dls.train)
    learn.fit(2, LR[kind], cbs=CancelAt(n + n // 2))  # three quarters through the schedule
    assert cb.history and not cb.completed
    learn.save('mid', with_opt=True)
    saved = {k: v.clone() for k, v in cb.sparsifier.masks.items()}
    cb2 = mk()
    learn2 = MAKE[kind](cbs=cb2, path=tmp_path)
    learn2.load('mid', with_opt=True)
    z = CheckZeros(cb2)
    learn2.fit(2, LR[kind], cbs=z)
    for k, v in saved.items(): assert not (cb2.sparsifier.masks[k] & ~v).any(), k  # the saved zeros stayed pruned
    fct.test_eq(_n_zero(cb2.sparsifier), round(0.8 * _n_w(cb2.sparsifier)))
    assert z.checked > 0


def test_compacted_vision_model_save_load(tmp_path):
    "After compact() on a fastai vision model (TensorImage batches), learn.save/learn.load round-trip (issue 13 item 6)"
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot')
    learn = vision(cbs=cb, path=tmp_path)
    learn.fit(1, LR['vision'])
    Pruner(learn).compact()
    for p in learn.model.parameters(): assert type(p.data) is torch.Tensor, type(p.data)  # no TensorImage leaked in
    xb = _xb(learn)
    ref = _out(learn.model, xb)
    learn.save('small')
    with torch.no_grad():
        for p in learn.model.parameters(): p.zero_()
    learn.load('small')
    fct.test_close(_out(learn.model, xb), ref, eps=1e-6)
