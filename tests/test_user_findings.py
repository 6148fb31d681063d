"What a new user hit on the first try (callback, Sparsifier, data helpers): each test fails on the code before the fix"
import logging
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from torch.utils.data import DataLoader as TorchDL, TensorDataset
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.data import digits_dls, small_cnn


def _plain_dls(flat=False):
    "fastai DataLoaders over plain torch DataLoaders (no one_batch, no n_inp)"
    dls = digits_dls(flat=flat)
    tr, va = dls.train.dataset, dls.valid.dataset
    return DataLoaders(TorchDL(TensorDataset(tr.x, tr.y), batch_size=32, shuffle=True),
                       TorchDL(TensorDataset(va.x, va.y), batch_size=64))


def test_filter_callback_with_plain_torch_dataloaders():
    "Filter granularity couples channels from the first batch of a plain torch DataLoader"
    torch.manual_seed(0)
    learn = Learner(_plain_dls(), small_cnn(), loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    assert cb.sparsifier.groups, "coupled groups"
    assert 0.3 < cb.sparsifier.sparsity() < 0.6


class Gray2RGB(nn.Module):
    "An adapter a grey-image user puts in front of an RGB model: its `expand` may be an op the graph does not know"
    def forward(self, x): return x.expand(-1, 3, -1, -1)


class Untraceable(nn.Module):
    "Data-dependent Python control flow: torch.fx cannot trace it, the per-layer fallback runs"
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16, 10)
    def forward(self, x):
        y = F.relu(self.conv(x))
        if float(y.mean()) > -1: y = y + 0  # a branch on a value: untraceable
        return self.head(y.mean((2, 3)))


def _filter_fit(make_model, caplog):
    "One epoch of one-shot local filter pruning at 0.5 on the digits images, warnings captured: (learner, callback)"
    torch.manual_seed(0)
    learn = Learner(digits_dls(flat=False), make_model(), loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot')
    with caplog.at_level(logging.WARNING, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=cb)
    return learn, cb


def test_filter_fallback_keeps_the_output_layer_dense(caplog):
    "When the channels cannot be traced, filters are pruned layer by layer but the classifier keeps its classes"
    learn, cb = _filter_fit(Untraceable, caplog)
    fct.test_eq(list(cb.sparsifier.layers), ['conv'])
    fct.test_eq(int((learn.model.head.weight == 0).all(1).sum()), 0)  # no class row zeroed
    fct.test_eq(int((learn.model.conv.weight == 0).reshape(16, -1).all(1).sum()), 8)
    assert 'stay dense: head' in caplog.text


def test_exclude_typo_is_refused():
    m = small_cnn()
    before = [p.clone() for p in m.parameters()]
    fct.test_fail(lambda: Sparsifier(m, exclude=['nolayer']), contains="exclude: 'nolayer' matches no Conv/Linear")
    fct.test_fail(lambda: SparsifyCallback(0.5, exclude='nolayer') and Sparsifier(m, exclude='nolayer'),
                  contains='leaves nothing out')
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    seq = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    fct.test_fail(lambda: Sparsifier(seq, exclude='0'), contains="'0.*' leaves its layers out")
    fct.test_eq(list(Sparsifier(seq, exclude='0.*').layers), ['1'])
    fct.test_eq(list(Sparsifier(seq, exclude=nn.Conv2d).layers), ['0.0', '1'])  # a type may fit no layer


def test_heads_with_coupled_false_says_what_to_drop():
    from fasterprune.graph import AttentionHeads
    fct.test_fail(lambda: SparsifyCallback(0.5, 'filter', coupled=False, heads={'': AttentionHeads()}),
                  contains='drop coupled=False')


def test_digits_dls_work_with_vision_learner_and_export(tmp_path):
    "digits_dls says its class count (vision_learner reads dls.c) and a Learner on it exports"
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18
    from fasterprune.data import mlp
    dls = digits_dls(flat=False)
    fct.test_eq(dls.c, 10)
    learn = vision_learner(dls, resnet18, pretrained=False, n_in=1, loss_func=nn.CrossEntropyLoss())
    fct.test_eq(learn.model[-1][-1].out_features, 10)
    flat = Learner(digits_dls(), mlp(64, 32, 10), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    flat.export('digits.pkl')
    assert (tmp_path / 'digits.pkl').stat().st_size > 0


class Flipped(nn.Module):
    "torch.flip over the channels: an op the channel graph does not know"
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 10)
    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c3(torch.flip(self.c2(x), [1])))
        return self.head(x.mean((2, 3)))


def test_unknown_op_keeps_its_channels_and_the_rest_couples(caplog):
    "An unknown op pins the channels around it (as strict=False would), the other groups prune coupled, the head stays"
    learn, cb = _filter_fit(Flipped, caplog)
    assert 'the channels around it stay dense' in caplog.text
    sp = cb.sparsifier
    dead = {n: int((m.weight == 0).reshape(m.weight.shape[0], -1).all(1).sum()) for n, m in sp.layers.items()}
    fct.test_eq((dead['c1'], dead['c2'], dead['c3'], dead['head']), (4, 0, 4, 0))
