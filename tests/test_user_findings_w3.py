"""A fourth user's findings (W3), the Pruner's graph on real-world models: each test fails on the code before the fix.
1. A BatchNorm subclass whose forward calls `F.batch_norm` (timm's `BatchNormAct2d`) and a Linear subclass that calls
   `F.linear` on its own weight (timm's `Linear`) were unknown ops: timm's efficientnet_b0, mobilenetv3_small_100 and
   regnetx_002 raised UnknownOpError. `F.batch_norm`/`F.instance_norm` are per-channel ops whose weight, bias and
   running statistics are cut with the channels; `F.linear`/`F.conv*d` on a layer's own weight are that layer's call;
   `F.pixel_shuffle` pins its channels like `nn.PixelShuffle`.
2. strict=False pinned only the first input of an unknown module with several inputs (nn.Bilinear,
   nn.CosineSimilarity): the surgery failed, and coupled filter masks zeroed channels compact could not remove.
3. `Pruner(learn).compact()` made a new optimizer for the biases a fold creates: per-group lr and wd were reset.
4. `Pruner.prune` that could remove nothing (every group pinned) said so at INFO with a wrong reason.
5. UnknownOpError messages carried torch.fx's "While executing ... tlparse" text.
6. `Pruner.prune` cut frozen (requires_grad=False) layers without a word."""
import logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn
import torch.nn.functional as F
from fasterprune.graph import UnknownOpError
from fasterprune.pruner import Pruner
from fasterprune.sparsifier import Sparsifier


def _msgs(caplog, level): return [r.getMessage() for r in caplog.records if r.levelno == level]
def _n(m): return sum(p.numel() for p in m.parameters())

class BNAct(nn.BatchNorm2d):
    "timm's BatchNormAct2d in short: a BatchNorm2d whose forward calls F.batch_norm, then an activation"
    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return F.silu(x)

class FLinear(nn.Linear):
    "timm's Linear: F.linear on its own weight and bias"
    def forward(self, x): return F.linear(x, self.weight, self.bias)

def _stats(m):
    with torch.no_grad():  # running statistics that are not the defaults
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d): b.running_mean.uniform_(-1, 1), b.running_var.uniform_(0.5, 2)
    return m.eval()

def test_batchnorm_subclass_with_f_batch_norm_prunes():
    torch.manual_seed(0)
    m = _stats(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), BNAct(16), nn.Conv2d(16, 16, 3, padding=1), BNAct(16),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), FLinear(16, 12), nn.ReLU(), FLinear(12, 3)))
    x = torch.randn(4, 3, 8, 8)
    rm = m[1].running_mean.clone()
    n0 = _n(m)
    Pruner(m, x).prune(0.5)  # an UnknownOpError (batch_norm, then linear) before; verified against the masked model
    fct.test_eq([m[0].out_channels, m[2].out_channels, m[6].out_features], [8, 8, 6])
    for bn in (m[1], m[3]):  # the BatchNorm subclass is cut like a BatchNorm: parameters, statistics, num_features
        fct.test_eq([bn.num_features, len(bn.weight), len(bn.bias), len(bn.running_mean), len(bn.running_var)], [8] * 5)
    assert torch.isin(m[1].running_mean, rm).all()  # the kept channels' statistics
    fct.test_eq([m[2].in_channels, m[6].in_features, m[8].in_features], [8, 8, 6])
    assert _n(m) < n0 / 2
    fct.test_eq(m(torch.randn(2, 3, 8, 8)).shape, (2, 3))

class FuncNorm(nn.Module):
    "A per-channel norm written with F.batch_norm / F.instance_norm on the block's own tensors (not a norm module)"
    def __init__(self, c, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, c, 3, padding=1), fn
        self.gamma, self.beta = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.register_buffer('mu', torch.randn(c))
        self.register_buffer('var', torch.rand(c) + 0.5)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    def forward(self, x):
        y = self.conv(x)
        if self.fn == 'batch_norm': y = F.batch_norm(y, self.mu, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        else: y = F.instance_norm(y, weight=self.gamma, bias=self.beta)
        return self.head(y)

@pytest.mark.parametrize('fn', ['batch_norm', 'instance_norm'])
def test_functional_norm_on_a_blocks_own_tensors(fn):
    torch.manual_seed(0)
    m, x = FuncNorm(16, fn).eval(), torch.randn(4, 3, 8, 8)
    Pruner(m, x).prune(0.25)
    fct.test_eq([m.conv.out_channels, len(m.gamma), len(m.beta), m.head[1].in_channels], [12] * 4)
    if fn == 'batch_norm': fct.test_eq([len(m.mu), len(m.var)], [12, 12])  # the statistics follow the channels
    m(x)

class Shuffle(nn.Module):
    "A sub-pixel upsampler written with F.pixel_shuffle (nn.PixelShuffle's channels are pinned)"
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 12, 3, padding=1), nn.Conv2d(3, 2, 1)
    def forward(self, x): return self.head(F.pixel_shuffle(self.b(F.relu(self.a(x))), 2))

def test_f_pixel_shuffle_pins_its_channels():
    torch.manual_seed(0)
    m, x = Shuffle().eval(), torch.randn(2, 3, 8, 8)
    Pruner(m, x).prune(0.5)  # an UnknownOpError before
    fct.test_eq([m.a.out_channels, m.b.out_channels], [8, 12])  # the shuffled channels stay; the others prune

class Siamese(nn.Module):
    "Two branches into one unknown module with two inputs"
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        branch = lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.a, self.b = branch(), branch()
        self.join = nn.CosineSimilarity(dim=1) if kind == 'cos' else nn.Bilinear(16, 16, 4)
    def forward(self, x): return self.join(self.a(x), self.b(x))

@pytest.mark.parametrize('kind', ['cos', 'bilinear'])
def test_strict_false_pins_every_input_of_an_unknown_module(kind):
    torch.manual_seed(0)
    m, x = Siamese(kind).eval(), torch.randn(2, 3, 10, 10)
    with torch.no_grad(): ref = m(x)
    Pruner(m, x, strict=False).prune(0.5)  # a SurgeryError before: the second input lost channels
    fct.test_eq([m.a[0].out_channels, m.b[0].out_channels], [8, 8])  # the first convs prune
    fct.test_eq([m.a[2].out_channels, m.b[2].out_channels], [16, 16])  # both inputs of the unknown module stay
    with torch.no_grad(): assert m(x).shape == ref.shape
    # coupled filter masks (what SparsifyCallback('filter') uses) leave both inputs dense: compact removes every zero
    torch.manual_seed(0)
    m = Siamese(kind).eval()
    Sparsifier(m, 'filter', 'local').couple(x, strict=False).sparsify(0.5)
    fct.test_eq([int((l.weight.flatten(1) == 0).all(1).sum()) for l in (m.a[2], m.b[2])], [0, 0])
    Pruner(m, x, strict=False).compact()
    fct.test_eq([m.a[0].out_channels, m.b[0].out_channels], [8, 8])
    assert all(bool((l.weight.flatten(1) != 0).any(1).all()) for l in m.modules() if isinstance(l, nn.Conv2d))

def _fold_learner():
    "A Learner with three parameter groups (discriminative lrs and wds, as vision_learner's), after one fit"
    from fastai.learner import Learner
    from fastai.torch_core import params
    import fastai.callback.progress  # noqa: F401 (learn.no_bar)
    from fasterprune.data import digits_dls
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1, bias=False), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    learn = Learner(digits_dls(flat=False), m, loss_func=nn.CrossEntropyLoss(),
                    splitter=lambda m: [params(m[0]), params(m[2]), params(m[6])])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, slice(1e-5, 1e-3), wd=[0.1, 0.2, 0.3])
    return learn

def test_compact_keeps_the_optimizers_groups():
    learn = _fold_learner()
    m, opt = learn.model, learn.opt
    with torch.no_grad():  # filters zeroed with their bias left: channels that carry a constant, folded into m[2]
        m[0].weight[:6] = 0
        m[0].bias[:6] = 0.5
    hypers = [dict(h) for h in opt.hypers]
    n_state = sum(1 for p in m.parameters() if opt.state[p])
    Pruner(learn).compact()
    fct.test_eq(m[0].out_channels, 10)
    assert m[2].bias is not None  # the fold created a bias
    assert learn.opt is opt  # the same optimizer (create_opt before: every group at the default lr and wd)
    fct.test_eq([dict(h) for h in learn.opt.hypers], hypers)
    fct.test_eq([h['wd'] for h in learn.opt.hypers], [0.1, 0.2, 0.3])
    assert any(p is m[2].bias for p in opt.param_lists[1])  # the new bias trains with its weight's group
    fct.test_eq(sum(1 for p in m.parameters() if opt.state[p]), n_state)  # the other parameters' state kept
    b0 = m[2].bias.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert not torch.equal(m[2].bias.detach(), b0)

def test_prune_that_can_remove_nothing_warns_with_the_reason(caplog):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                      nn.GroupNorm(8, 32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)).eval()
    n0 = _n(m)
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.3)
    fct.test_eq(_n(m), n0)
    w = _msgs(caplog, logging.WARNING)
    fct.test_eq(len(w), 1)  # an INFO line before, which blamed rounding
    assert 'pinned' in w[0] and 'GroupNorm' in w[0] and "'0', '3'" in w[0] and 'model output' in w[0]
    assert 'rounds' not in w[0]

class StdConv(nn.Conv2d):
    "A weight-standardized conv (timm's StdConv2d, ScaledStdConv2d): F.conv2d on a weight computed in the forward"
    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)

def test_prune_behind_unknown_ops_says_which(caplog):
    torch.manual_seed(0)
    m = nn.Sequential(StdConv(3, 8, 3), nn.ReLU(), StdConv(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 3)).eval()
    with caplog.at_level(logging.INFO, logger='fasterprune'):
        Pruner(m, torch.randn(2, 3, 8, 8), strict=False).prune(0.5)
    w = _msgs(caplog, logging.WARNING)
    fct.test_eq(len(w), 1)  # only the output Linear is a producer the graph sees: all it said was an INFO line
    assert "'6' by model output" in w[0] and 'does not know' in w[0] and "conv2d in module '0' (StdConv" in w[0]

def test_compact_says_which_zeroed_filters_stay_behind_unknown_ops(caplog):
    "Filters zeroed layer by layer (the callback's fallback) in a layer the graph cannot cut: compact says so"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), StdConv(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad(): m[2].weight[:3] = 0
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(m, torch.randn(2, 3, 8, 8), strict=False).compact()
    w = [s for s in _msgs(caplog, logging.WARNING) if 'cannot cut' in s]
    fct.test_eq(len(w), 1)  # an INFO "no zeroed channel component to remove" before
    assert "'2' (3)" in w[0] and "conv2d in module '2' (StdConv" in w[0]

class Roll(nn.Module):
    def forward(self, x): return torch.roll(x, 1, 1)  # a roll over the channels: an op the graph does not know

def test_unknown_op_error_names_op_and_module_without_fx_text():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.ReLU(), Roll()), nn.Conv2d(8, 4, 1))
    with pytest.raises(UnknownOpError) as e: Pruner(m, torch.randn(1, 3, 6, 6)).prune(0.5)
    s = str(e.value)
    assert s.startswith('roll') and "in module '1.1' (Roll" in s and 'strict=False' in s
    fct.test_eq(e.value.op, "roll in module '1.1' (Roll, fx node 'roll')")  # for callers that word their own message
    assert 'While executing' not in s and 'tlparse' not in s and 'Original traceback' not in s

def test_pruner_of_a_learner_whose_callback_kept_unknown_ops():
    "The callback met an unknown op and coupled the rest (strict=False); Pruner(learn) follows, or says how"
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401 (learn.no_bar)
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import digits_dls
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Roll(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, 10))
    learn = Learner(digits_dls(flat=False), m, loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot'))
    fct.test_eq(int((m[3].weight.flatten(1) == 0).all(1).sum()), 8)
    fct.test_eq(learn._sparsify_strict, False)  # what the callback did, left for the Pruner
    del learn._sparsify_strict  # a Learner that does not say: the error says how to do what the callback did
    with pytest.raises(UnknownOpError) as e: Pruner(learn).compact()
    assert 'Pruner(learn, strict=False)' in str(e.value) and 'tlparse' not in str(e.value)
    learn._sparsify_strict = False
    Pruner(learn).compact()  # follows the callback
    fct.test_eq([m[0].out_channels, m[3].out_channels], [8, 8])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)

def test_prune_warns_about_frozen_layers(caplog):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(16, 3))
    m[0].requires_grad_(False)  # a frozen (pretrained) body
    with caplog.at_level(logging.INFO, logger='fasterprune'): Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
    w = [s for s in _msgs(caplog, logging.WARNING) if 'requires_grad=False' in s]
    fct.test_eq(len(w), 1)
    assert "'0'" in w[0] and "'2'" not in w[0]
    caplog.clear()  # layers named in a dict ratio are the user's choice, frozen or not: no warning
    with caplog.at_level(logging.INFO, logger='fasterprune'):
        Pruner(m, torch.randn(2, 3, 8, 8)).prune({'0': 0.5, '2': 0.5})
    fct.test_eq(m[0].out_channels, 4)
    fct.test_eq([s for s in _msgs(caplog, logging.WARNING) if 'requires_grad=False' in s], [])
