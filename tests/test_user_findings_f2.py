"F2 (a graph fuzzer's findings) and a compiled model in a Learner: silent wrong results the Pruner must not give"
import copy, logging
import pytest, torch
from torch import nn
import torch.nn.functional as F
import fastcore.test as fct
from fasterprune.pruner import Pruner, SurgeryError, relative_error

class SizeNet(nn.Module):
    "conv -> BN -> act -> a pooling `how` whose result for a constant channel may depend on the input size -> fc"
    def __init__(self, how='sum', act=None):
        super().__init__()
        self.how, self.act = how, act or nn.ReLU()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        with torch.no_grad(): self.bn.bias.uniform_(0.5, 1.0)  # a positive shift: relu(beta) is a nonzero constant
    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        if self.how == 'sum': x = x.sum((2, 3))
        elif self.how == 'avgpad': x = F.avg_pool2d(x, 3, 1, 1).mean((2, 3))
        elif self.how == 'zeropad': x = F.pad(x, (1, 1, 1, 1)).mean((2, 3))
        elif self.how == 'zeropad_module': x = nn.functional.adaptive_avg_pool2d(nn.ZeroPad2d(2)(x), 1).flatten(1)
        elif self.how == 'times_width': x = x.mean((2, 3)) * x.shape[-1]
        elif self.how == 'mean': x = x.mean((2, 3))
        elif self.how == 'max_interp': x = F.interpolate(F.max_pool2d(x, 2), scale_factor=2).amax((2, 3))
        return self.fc(x)

def _zero_filters(m):
    with torch.no_grad():
        m.conv.weight[:4] = 0
        m.conv.bias[:4] = 0

def _masked(cls, *args):
    "(model, a copy of it): a `cls(*args)` in eval mode with its first 4 filters zeroed, seeded"
    torch.manual_seed(0)
    m = cls(*args).eval()
    _zero_filters(m)
    return m, copy.deepcopy(m)

def _same_at_sizes(masked, m, sizes=(8, 16, 5)):
    with torch.no_grad():
        for hw in sizes:
            xi = torch.randn(2, 3, hw, hw)
            fct.test_close(m(xi), masked(xi), eps=1e-4 * float(masked(xi).abs().max()))

def _compacted(how):
    "(masked, compacted) SizeNet(how) with half its filters zeroed"
    m, masked = _masked(SizeNet, how)
    Pruner(m, torch.randn(4, 3, 8, 8)).compact()
    return masked, m

@pytest.mark.parametrize('how', ['sum', 'avgpad', 'zeropad', 'zeropad_module', 'times_width'])
def test_compact_does_not_fold_a_constant_that_depends_on_the_input_size(how):
    "compact() after filter masks: a BN shift through a sum / zero padding is c·H·W, not a constant: not folded"
    _same_at_sizes(*_compacted(how))

@pytest.mark.parametrize('how', ['mean', 'max_interp'])
def test_compact_still_folds_a_constant_the_size_does_not_change(how):
    "mean, max, interpolate keep a constant the same constant: the channels go, the fold is right at every size"
    masked, m = _compacted(how)
    fct.test_eq(m.conv.out_channels, 4)
    _same_at_sizes(masked, m)

class DwNet(nn.Module):
    "A constant channel through a zero-padded depthwise conv (uneven at the border), then a ReLU that makes it 0"
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2, self.fc = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.bias.uniform_(0.5, 1.0)
            self.bn2.bias[:4] = -100.  # the removed channels come out of the ReLU as 0 at every position
    def forward(self, x): return self.fc(F.relu(self.bn2(self.dw(F.relu(self.bn(self.conv(x)))))).mean((2, 3)))

def test_an_uneven_constant_that_a_relu_makes_zero_is_still_removed():
    "Uneven from position to position is not dynamic: elementwise ops keep each position's value, 0 folds everywhere"
    m, masked = _masked(DwNet)
    Pruner(m, torch.randn(4, 3, 8, 8)).compact()
    fct.test_eq((m.conv.out_channels, m.dw.out_channels, m.fc.in_features), (4, 4, 4))
    _same_at_sizes(masked, m)

def test_prune_with_sigmoid_and_sum_pooling_is_right_at_other_sizes():
    "prune(): Sigmoid(0) = 0.5 is a constant; summed over the positions it is not, so those channels stay zeroed"
    torch.manual_seed(0)
    m = SizeNet('sum', nn.Sigmoid()).eval()
    twins = []
    pr = Pruner(m, torch.randn(4, 3, 8, 8))
    orig = pr._surgery
    pr._surgery = lambda *a: (twins.append(copy.deepcopy(pr.model)), orig(*a))[1]
    pr.prune(0.5)
    _same_at_sizes(twins[-1].eval(), m)

class EarlyExit(nn.Module):
    "Data-dependent control flow: big inputs get one more layer, small ones another layer (or none: an early exit)"
    def __init__(self, other_layer):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)
        self.b = nn.Conv2d(8, 8, 1) if other_layer else None
        self.unused = nn.Linear(8, 2)  # defined, never called: not a branch
    def forward(self, x):
        f = F.relu(self.bn(self.c1(x)))
        if x.shape[-1] >= 16: y = self.a(f)
        else: y = self.b(f) if self.b is not None else f
        return self.fc(y.mean((2, 3)))

def _warnings(caplog): return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

def test_untraced_branch_with_a_layer_is_refused_under_strict(caplog):
    "The layer on the branch the example did not take would stay uncut (a crash on small inputs): refused, untouched"
    torch.manual_seed(0)
    m = EarlyExit(True).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"'b' did not run on the example.*strict=False"):
        Pruner(m, torch.randn(4, 3, 16, 16)).prune(0.5)
    for k, v in m.state_dict().items(): assert torch.equal(v, sd[k]), k
    with caplog.at_level(logging.WARNING, logger='fasterprune'):
        Pruner(m, torch.randn(4, 3, 16, 16), strict=False).prune(0.5)  # the user's choice: pruned, with a warning
    fct.test_eq(m.c1.out_channels, 4)
    ws = _warnings(caplog)
    assert len(ws) == 1 and 'not verified' in ws[0] and "'b'" in ws[0] and "'unused'" not in ws[0], ws

def test_untraced_early_exit_is_warned(caplog):
    "An early exit hands on channels without a layer: nothing to refuse, but the untaken branch is named unverified"
    torch.manual_seed(0)
    m = EarlyExit(False).eval()
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(m, torch.randn(4, 3, 16, 16)).prune(0.5)
    ws = _warnings(caplog)
    assert len(ws) == 1 and 'could not trace EarlyExit' in ws[0] and 'early exit' in ws[0], ws

class ShiftNet(nn.Module):
    "A BatchNorm shift folded into a 1x1 conv, whose large sum a second BatchNorm takes away: float32 rounding ~1e-5"
    def __init__(self, shift=100.):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pw, self.bn2, self.fc = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.bias.fill_(shift)
            self.pw.weight.abs_()
            self.bn2.running_mean.copy_(self.pw.weight.sum((1, 2, 3)) * shift)
    def forward(self, x): return self.fc(F.relu(self.bn2(self.pw(F.relu(self.bn(self.conv(x)))))).mean((2, 3)))

def _shift_net():
    torch.manual_seed(0)
    m = ShiftNet().eval()
    with torch.no_grad():
        m.conv.weight[:4] = 0
        m.conv.bias[:4] = 0
    return m, torch.randn(8, 3, 8, 8)

def test_correct_float32_surgery_of_a_noisy_model_is_accepted():
    "The model's own float32 rounding (vs float64) is above 1e-5: float64 copies of both models are compared instead"
    m, x = _shift_net()
    masked = copy.deepcopy(m).double()
    pr = Pruner(m, x)
    pr.compact()
    h = pr.history[-1]
    assert h['rel_error'] <= 1e-5 and h['rtol'] == 1e-5 and h['checked_in'].startswith('float64'), h
    fct.test_eq((m.conv.out_channels, m.bn.num_features, m.pw.in_channels), (4, 4, 4))  # the cut, redone after the look
    # in float64 the two agree to the float32 rounding of the folded bias, far below a wrong channel's error
    with torch.no_grad(): assert relative_error(masked(x.double()), copy.deepcopy(m).double()(x.double())) < 1e-5

class _Amp(nn.Module):  # float32 loses digits here: y + 3e3 - 3e3
    def forward(self, x): return (x + 3e3) - 3e3

@pytest.mark.parametrize('rel', [2e-5, 2e-4, 6e-4])
def test_an_error_of_the_size_of_the_float32_noise_is_still_caught(monkeypatch, rel):
    "A planted error under the model's own float32 noise (6e-4 here) stands out in float64: refused, model restored"
    from fasterprune.pruner import _Surgery
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), _Amp())
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad(): scale = float(m(x).abs().max())
    orig = _Surgery.cut
    def planted(self, g, remove):
        orig(self, g, remove)
        self.set(m[6].bias, 'data', m[6].bias.data + rel * scale)
    monkeypatch.setattr(_Surgery, 'cut', planted)
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, x).prune(0.25)
    fct.test_eq(m[0].out_channels, 16)

def test_a_nan_on_any_checked_input_is_refused(monkeypatch):
    "A pruned model that outputs NaN only on the item at twice the size (not first in the list of errors): refused"
    import math
    from fasterprune.pruner import _Surgery
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    orig = _Surgery.cut
    def planted(self, g, remove):
        orig(self, g, remove)
        if not m[6]._forward_hooks: m[6].register_forward_hook(lambda mod, a, y: y * math.nan if y.shape[0] == 1 else None)
    monkeypatch.setattr(_Surgery, 'cut', planted)
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, torch.randn(16, 3, 8, 8)).prune(0.25)
    fct.test_eq(relative_error((torch.ones(3), torch.ones(3)), (torch.ones(3), torch.full((3,), math.nan))), math.inf)

def test_off_by_one_channel_is_still_caught_in_a_noisy_model(monkeypatch):
    "The raised bound is the model's rounding noise, far below what a wrong kept channel does"
    from fasterprune.pruner import _Surgery
    m, x = _shift_net()
    orig = _Surgery.cut_param
    def planted(self, p, dim, idx):
        if dim == 1 and p is m.pw.weight: idx = (idx + 1) % p.shape[1]
        return orig(self, p, dim, idx)
    monkeypatch.setattr(_Surgery, 'cut_param', planted)
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, x).compact()
    fct.test_eq(m.conv.out_channels, 8)

def test_relative_error_is_per_output():
    "A small output is measured on its own scale, not on the largest output's"
    ref = (torch.tensor([1000., -1000.]), torch.tensor([1e-3, 2e-3]))
    out = (ref[0].clone(), torch.tensor([2e-3, 2e-3]))
    fct.test_close(relative_error(ref, out), 0.5)
    fct.test_eq(relative_error((torch.zeros(2), torch.ones(2)), (torch.zeros(2), torch.ones(2))), 0.)
    fct.test_close(relative_error((torch.zeros(2), torch.ones(2)), (torch.full((2,), 0.5), torch.ones(2))), 0.5)

def test_pruner_of_a_compiled_model_in_a_learner():
    "Learner(dls, torch.compile(m)): Pruner(learn).compact() cuts the compiled module; learn.model runs the smaller one"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    dls = DataLoaders.from_dsets(TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:]), bs=8)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        m[0].weight[:8] = 0
        m[0].bias[:8] = 0
    masked = copy.deepcopy(m)
    learn = Learner(dls, torch.compile(m, backend='eager'), loss_func=nn.CrossEntropyLoss())
    Pruner(learn).compact()
    fct.test_eq(m[0].out_channels, 8)
    assert learn.model._orig_mod is m
    with torch.no_grad(): fct.test_close(learn.model.eval()(x), masked(x), eps=1e-5)

def _rewind_net(bias):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=bias),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

@pytest.mark.parametrize('bias,k', [(True, 3), (False, 0), (False, 3)])
def test_rewind_after_a_folding_compact_is_the_masked_model_at_the_rewind_point(bias, k):
    "compact() folds a trained BN shift; rewind() must give the masked model at the rewind point, with its own fold"
    torch.manual_seed(0)
    m = _rewind_net(bias)
    opt = torch.optim.SGD(m.parameters(), 0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    pr = Pruner(m, x[:4], opt=opt)
    pr.keep_rewind_point(k)
    for _ in range(6):
        m.train()
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        m[0].weight[:4] = 0  # filters zeroed, as a filter SparsifyCallback leaves them
        m[0].bias[:4] = 0
    at_point = _rewind_net(bias)
    at_point.load_state_dict(pr._rw().rewind_point)
    with torch.no_grad():
        at_point[0].weight[:4] = 0
        at_point[0].bias[:4] = 0
    pr.compact()
    fct.test_eq(m[0].out_channels, 4)
    pr.rewind()
    with torch.no_grad(): fct.test_close(m(x), at_point.eval()(x), eps=1e-6)
    m.train()  # and it trains on: the optimizer holds the bias a fold made
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()

class ScaledByWidth(nn.Module):
    "A forward torch.fx cannot trace (a branch on a value): recorded, `x.shape[-1]` is a number in the graph"
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        with torch.no_grad(): self.bn.bias.uniform_(0.5, 1.0)
    def forward(self, x):
        if x.abs().sum() < 0: return None
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)) * x.shape[-1])

def test_a_fold_wrong_at_another_size_is_refused_by_the_check_at_twice_the_size():
    "The recorded graph cannot see the size in `x * x.shape[-1]`; the check at twice the size refuses the fold"
    m, masked = _masked(ScaledByWidth)
    with pytest.raises(SurgeryError, match='twice the size'): Pruner(m, torch.randn(4, 3, 8, 8), strict=False).compact()
    _same_at_sizes(masked, m)  # restored
