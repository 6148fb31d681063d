"Filter masks of coupled channels: what SparsifyCallback zeroes is exactly what Pruner.compact() removes"
import copy
import torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.pruner import Pruner
from fasterprune.data import digits_dls


class TinyRes(nn.Module):
    "stem -> residual block (add) -> pooled Linear head"
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.b1(x)))


def _dead(w): return (w.reshape(w.shape[0], -1) == 0).all(1)


def test_coupled_groups_share_indices():
    torch.manual_seed(0)
    m = TinyRes()
    sp = Sparsifier(m, 'filter', 'local', example_input=torch.randn(1, 1, 8, 8)).sparsify(0.5)
    prods = sorted(tuple(sorted(g.producers)) for g in sp.groups)
    fct.test_eq(prods, [('b1.0',), ('b1.3', 'stem.0')])
    fct.test_eq(_dead(m.stem[0].weight), _dead(m.b1[3].weight))  # same channels on both sides of the add
    fct.test_eq(int(_dead(m.stem[0].weight).sum()), 4)
    fct.test_eq(int(_dead(m.b1[0].weight).sum()), 4)
    fct.test_eq(int(_dead(m.head[2].weight).sum()), 0)  # classifier outputs are pinned
    # biases and BatchNorm affine parameters of pruned channels are zero too
    d = _dead(m.stem[0].weight)
    for t in (m.stem[0].bias, m.stem[1].weight, m.stem[1].bias, m.b1[4].weight, m.b1[4].bias):
        fct.test_eq(t[d].abs().sum().item(), 0.)


def test_callback_then_compact_removes_exactly_the_pruned_channels():
    torch.manual_seed(0)
    dls = digits_dls(flat=False, bs=64)
    learn = Learner(dls, TinyRes(), loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.5, 'filter', 'global', schedule='agp')
    learn.fit(2, 1e-2, cbs=cb)
    model = learn.model.eval()
    x = dls.valid.one_batch()[0][:16]
    masked = copy.deepcopy(model)
    n_dead = int(_dead(model.stem[0].weight).sum()), int(_dead(model.b1[0].weight).sum())
    assert sum(n_dead) > 0
    Pruner(model, x).compact()  # verifies equivalence itself (raises otherwise)
    fct.test_eq(model.stem[0].out_channels, 8 - n_dead[0])
    fct.test_eq(model.b1[3].out_channels, 8 - n_dead[0])
    fct.test_eq(model.b1[0].out_channels, 8 - n_dead[1])
    with torch.no_grad(): fct.test_close(model(x), masked(x), eps=1e-4)


import pytest, torchvision


@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet_v2'])
@pytest.mark.parametrize('context', ['local', 'global'])
def test_zoo_sparsify_then_compact(arch, context):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    sp = Sparsifier(model, 'filter', context, example_input=x[:1]).sparsify(0.4)
    masked = copy.deepcopy(model)
    n_before = sum(p.numel() for p in model.parameters())
    Pruner(model, x).compact()
    n_after = sum(p.numel() for p in model.parameters())
    assert n_after < 0.75 * n_before, (n_before, n_after)
    with torch.no_grad(): fct.test_close(model(x), masked(x), eps=1e-4)


def test_refit_after_compact_with_attached_callback():
    "A callback attached to the Learner keeps the compacted model as it is; restart() prunes the smaller model again"
    torch.manual_seed(0)
    dls = digits_dls(flat=False, bs=64)
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot')
    learn = Learner(dls, TinyRes(), loss_func=nn.CrossEntropyLoss(), cbs=cb)
    learn.fit(1, 1e-2)
    Pruner(learn).compact()
    fct.test_eq(learn.model.stem[0].out_channels, 4)
    learn.fit(1, 1e-2)  # a completed schedule does not start over on the compacted model (issue 13 item 1)
    fct.test_eq(int(_dead(learn.model.stem[0].weight).sum()), 0)
    cb.restart()
    learn.fit(1, 1e-2)  # asked to: it rebuilds its Sparsifier for the new shapes, prunes half of what is left
    fct.test_eq(int(_dead(learn.model.stem[0].weight).sum()), 2)
