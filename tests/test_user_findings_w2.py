"""A third new user's findings with the Pruner: each test fails on the code before the fix.
1. A layer that runs only in train mode (an auxiliary head) was not in the eval-mode trace: `prune` verified, logged
   success, and the first training forward failed with a shape error. The train-mode graph is now labelled too.
2. `Pruner(learn.model, xb)` after a fit left `learn.opt` with state of the old shapes, silently: now a WARNING says
   to use `Pruner(learn)`, `opt=`, or an optimizer created after pruning.
3. `load_pruned` resized a fresh model's output width (another `num_classes`) to the file's without a word: now a
   ValueError, the model untouched."""
import copy, logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn
from fasterprune.pruner import Pruner, save_pruned, load_pruned


def _msgs(caplog, level): return [r.getMessage() for r in caplog.records if r.levelno == level]

class AuxNet(nn.Module):
    "A body, a head, an auxiliary head that runs only in training (inception_v3 / googlenet style), an unused layer"
    def __init__(self, c=32, n_out=10, fx:bool=True):
        super().__init__()
        self.fx = fx  # False: a forward torch.fx cannot trace (the Pruner records real passes, train mode too)
        self.body = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(2 * c, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, n_out))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, n_out))
        self.unused = nn.Linear(2 * c, 3)  # defined, never called in either mode
    def forward(self, x):
        if not self.fx and x.size(0) < 0: return x  # a branch on a size: torch.fx cannot trace it
        f = self.body(x)
        return (self.head(f), self.aux(f)) if self.training else self.head(f)

def _aux_net(seed=0, fx=True):
    torch.manual_seed(seed)
    m = AuxNet(fx=fx)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults: a train-mode run would change them
        for bn in (m.body[1], m.aux[1]): bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return m.eval(), torch.randn(4, 3, 12, 12)

@pytest.mark.parametrize('fx', [True, False])
def test_train_only_branch_is_cut_with_its_producers(caplog, fx):
    m, x = _aux_net(fx=fx)
    bufs = {k: v.clone() for k, v in m.state_dict().items() if 'running' in k or 'num_batches' in k}
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(m, x).prune(0.5)
    fct.test_eq(m.body[3].out_channels, 32)
    fct.test_eq(m.aux[0].in_channels, m.body[3].out_channels)  # the training-only consumer follows its producer
    sd = m.state_dict()  # tracing in train mode changed no BatchNorm statistic (the kept positions are the old ones)
    fct.test_eq(int(sd['body.1.num_batches_tracked']), int(bufs['body.1.num_batches_tracked']))
    fct.test_eq(int(sd['aux.1.num_batches_tracked']), int(bufs['aux.1.num_batches_tracked']))
    for k in ('body.1.running_mean', 'aux.1.running_var'): assert torch.isin(sd[k], bufs[k]).all()
    out, aux = m.train()(x)  # failed before: the aux head still expected 64 channels
    fct.test_eq(tuple(aux.shape), (4, 10))
    fct.test_eq(m.unused.in_features, 64)  # never run: left as it is, with an INFO line, no refusal
    assert any("'unused'" in i and 'never run' in i for i in _msgs(caplog, logging.INFO))
    assert any("'aux.0'" in i and 'only in train mode' in i for i in _msgs(caplog, logging.INFO))
    ws = _msgs(caplog, logging.WARNING)  # untraceable: the early exit the example did not take is named, once
    fct.test_eq(len(ws), 0 if fx else 1)
    assert fx or 'could not trace AuxNet' in ws[0], ws

class OddAux(nn.Module):
    "A training-only branch the Pruner cannot follow: a forward that fails in train mode, or an unknown op"
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.aux, self.head = (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)) for _ in '12')
    def forward(self, x):
        f = self.body(x)
        if not self.training: return self.head(f)
        if self.mode == 'fails': raise RuntimeError('no train-mode forward on this input')
        return self.head(f), self.aux(torch.cumsum(f, 1))

def test_train_only_branch_not_followed_is_named(caplog):
    torch.manual_seed(0)
    m, x = OddAux('unknown').eval(), torch.randn(2, 3, 8, 8)
    sd = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"'aux.2' run only in train mode.*aux_logits = False"): Pruner(m, x).prune(0.5)
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])  # untouched
    Pruner(m, x, strict=False).prune(0.5)  # the unknown op pins the channels it reads: the aux head keeps its input
    fct.test_eq(m.aux[2].in_features, m.body[2].out_channels)
    m.train()(x)
    m = OddAux('fails').eval()  # no train-mode trace at all: dead or training-only cannot be told apart, a WARNING
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(m, x).prune(0.5)
    assert any("'aux.2' did not run" in w and 'set them aside' in w for w in _msgs(caplog, logging.WARNING))

@pytest.mark.parametrize('fx', [True, False])
def test_train_only_branch_compact_is_exact(fx):
    "Zeroed filters feeding the auxiliary head: compact removes them and folds their constant into the aux layer"
    m, x = _aux_net(1, fx)
    with torch.no_grad():
        m.body[3].weight[::2] = 0  # half the filters zero, their biases stay: relu(bias) reaches both heads
        m.body[3].bias.abs_()
        ref_aux, ref = m.aux(m.body(x)), m(x)
    pr = Pruner(m, x)
    pr.compact()
    fct.test_eq(m.aux[0].in_channels, 32)
    with torch.no_grad():  # the aux branch in eval mode computes what it did (the eval check cannot see it)
        fct.test_close(m.aux(m.body(x)), ref_aux, eps=1e-5)
        fct.test_close(m(x), ref, eps=1e-5)
    assert all(not mod.training for mod in m.modules())  # training flags as they were

def test_bare_model_after_fit_warns_about_optimizer(caplog):
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401 (learn.no_bar)
    from fasterprune.data import digits_dls, small_cnn
    learn = Learner(digits_dls(flat=False), small_cnn(c=16), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    xb = learn.dls.valid.one_batch()[0][:8]
    learn2 = copy.deepcopy(learn)
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(learn.model, xb).prune(0.5)
    w = [m for m in _msgs(caplog, logging.WARNING) if 'optimizer' in m]
    fct.test_eq(len(w), 1)  # it said nothing before, and the next fit failed deep in the optimizer
    assert 'Pruner(learn)' in w[0] and 'create_opt' in w[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(learn2).prune(0.5)  # the right call: silent
    fct.test_eq([m for m in _msgs(caplog, logging.WARNING) if 'optimizer' in m], [])
    with learn2.no_bar(), learn2.no_logging(): learn2.fit(1, 1e-3)
    caplog.clear()  # a plain torch loop with opt= given: its state is cut, no warning
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(16, 8)
    opt = torch.optim.Adam(m.parameters())
    m(x).sum().backward()
    opt.step()
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(m, x, opt=opt).prune(0.5)
    fct.test_eq([w for w in _msgs(caplog, logging.WARNING) if 'optimizer' in w], [])
    m(x).sum().backward()
    opt.step()  # the state was cut with the parameters

class Cnn(nn.Module):
    def __init__(self, c_in=3, n_out=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(c_in, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 24), nn.ReLU(),
                                        nn.Linear(24, n_out))
    def forward(self, x): return self.classifier(self.features(x))

@pytest.mark.parametrize('kw', [dict(n_out=100), dict(c_in=1)])
def test_load_pruned_refuses_other_output_or_input(tmp_path, kw):
    torch.manual_seed(0)
    m = Cnn().eval()
    Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
    save_pruned(m, tmp_path / 'p.pt')
    fresh = Cnn(**kw)
    sd = copy.deepcopy(fresh.state_dict())
    what = 'classifier.4.out_features' if 'n_out' in kw else 'features.0.in_channels'
    with pytest.raises(ValueError, match=what): load_pruned(fresh, tmp_path / 'p.pt')  # loaded silently before
    fct.test_eq(fresh.state_dict().keys(), sd.keys())  # untouched
    for k, v in fresh.state_dict().items(): fct.test_eq(v, sd[k])
    ok = load_pruned(Cnn(), tmp_path / 'p.pt').eval()  # the right architecture loads
    x = torch.randn(2, 3, 8, 8)
    fct.test_close(ok(x), m(x), eps=1e-6)
