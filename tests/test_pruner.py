"Model-zoo surgery tests for fasterprune.graph and fasterprune.pruner"
import copy, os, warnings
import pytest, torch
from torch import nn
import torchvision
import fastcore.test as fct
from torch.utils.flop_counter import FlopCounterMode
from fasterprune.graph import channel_groups, ChannelGraph, UnknownOpError
from fasterprune.pruner import Pruner, SurgeryError, save_pruned, load_pruned, relative_error
from fasterprune.metrics import count_params, count_flops

warnings.filterwarnings('ignore', category=UserWarning)

def seq_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64),
                         nn.ReLU(), nn.Linear(64, 10))

def xresnet18():
    from fastai.vision.models.xresnet import xresnet18 as f
    return f()

ZOO = dict(resnet18=(torchvision.models.resnet18, 64), resnet50=(torchvision.models.resnet50, 64),
           mobilenet_v2=(torchvision.models.mobilenet_v2, 64), vgg16_bn=(torchvision.models.vgg16_bn, 32),
           densenet121=(torchvision.models.densenet121, 64), efficientnet_b0=(torchvision.models.efficientnet_b0, 64),
           xresnet18=(xresnet18, 64), seq_cnn=(seq_cnn, 16))

def _randomize_bn(model):
    "Random BatchNorm statistics and affine parameters, so constants and scales are not trivial"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5); m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1); m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)

def _macs(model, x):
    "Conv/Linear multiply-accumulates, counted by torch's own FlopCounterMode (2 FLOPs per MAC)"
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model.eval()(x)
    return fc.get_total_flops() // 2

@pytest.mark.parametrize('ratio', [0.3, 0.5])
@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_prune(name, ratio):
    torch.manual_seed(0)
    f, size = ZOO[name]
    model = f(); _randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    n0 = sum(p.numel() for p in model.parameters())
    pr = Pruner(model, x, keep_original=False)
    out = pr.prune(ratio)
    assert out is model
    h = pr.history[-1]
    assert h['rel_error'] is not None and h['rel_error'] <= 1e-5
    n1 = sum(p.numel() for p in model.parameters())
    fct.test_eq(h['params_after'], n1)
    fct.test_eq(count_params(model)[0], n1)
    assert n1 < n0 * (1 - ratio) ** 2 * 1.6, (n0, n1)
    fct.test_eq(count_flops(model, x[:1])[0], _macs(model, x[:1]))
    with torch.no_grad(): y = model.eval()(x)
    fct.test_eq(y.shape[1], 1000 if name not in ('seq_cnn',) else 10)  # the classifier keeps its outputs

@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2', 'densenet121', 'efficientnet_b0', 'xresnet18', 'seq_cnn'])
def test_zoo_compact_from_group_masks(name):
    "Zero 40 % of every group (all producers, and the group's BatchNorms) as filter masks would; compact removes exactly them"
    torch.manual_seed(0)
    f, size = ZOO[name]
    model = f(); _randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    groups = [g for g in channel_groups(model, x) if not g.pinned]
    mods = dict(model.named_modules())
    expect = {}
    with torch.no_grad():
        for g in groups:
            k = int(0.4 * g.width)
            if not k: continue
            for n, idx in list(g.producers.items()) + list(g.norms.items()):
                m = mods[n]; m.weight[idx[:k]] = 0
                if m.bias is not None: m.bias[idx[:k]] = 0
            for n, idx in g.producers.items(): expect[n] = mods[n].weight.shape[0] - k
    ref_model = copy.deepcopy(model).eval()
    Pruner(model, x, keep_original=False).compact()
    for n, c in expect.items(): fct.test_eq(mods[n].weight.shape[0], c)
    with torch.no_grad(): assert relative_error(ref_model(x), model.eval()(x)) <= 1e-5

def test_compact_requires_all_producers_zero():
    "A residual group goes only where every producer's filter is zero"
    model = torchvision.models.resnet18(); x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.conv1.weight[:4] = 0; model.layer1[0].conv2.weight[:4] = 0  # layer1[1].conv2 still alive
        model.layer1[0].conv1.weight[:3] = 0; model.layer1[0].bn1.weight[:3] = 0; model.layer1[0].bn1.bias[:3] = 0
    Pruner(model, x).compact()
    fct.test_eq((model.conv1.out_channels, model.layer1[0].conv1.out_channels), (64, 61))

def test_bn_constant_folded_into_linear():
    "Zeroed filters whose BatchNorm still emits β: the constant goes into the Linear's bias, output unchanged"
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model[0].weight[:4] = 0; model[1].bias[:4] = torch.tensor([0.5, -0.5, 1.0, 2.0]); model[1].running_mean.normal_()
    ref = model.eval()(x).detach()
    Pruner(model, x).compact()
    fct.test_eq(model[5].in_features, 4)
    fct.test_close(model(x).detach(), ref, eps=1e-5)

def test_padded_constant_is_kept():
    "A nonzero constant entering a zero-padded conv cannot become a bias: the channel stays"
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    with torch.no_grad(): model[0].weight[:2] = 0; model[0].bias[0] = 1.; model[0].bias[1] = -1.
    Pruner(model, torch.randn(1, 3, 8, 8)).compact()
    fct.test_eq(model[0].out_channels, 3)  # channel 1 (relu(-1) = 0) went, channel 0 (constant 1) stayed

def test_bias_created_when_missing():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad(): model[0].weight[:1] = 0; model[0].bias[0] = 3.
    x = torch.randn(1, 3, 5, 5); ref = model(x).detach()
    Pruner(model, x).compact()
    assert model[1].bias is not None
    fct.test_close(model(x).detach(), ref, eps=1e-5)

def test_failed_check_restores_the_model():
    model = torchvision.models.resnet18(); x = torch.randn(1, 3, 32, 32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match='restored'): Pruner(model, x, rtol=-1.).prune(0.5)
    for k, v in model.state_dict().items(): assert torch.equal(v, sd[k]), k
    fct.test_eq(model.layer1[0].conv1.out_channels, 64)

def test_unknown_op_is_named():
    class M(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        def forward(self, x): return self.b(torch.roll(self.a(x), 1, 1))
    with pytest.raises(UnknownOpError, match='roll'): Pruner(M(), torch.randn(1, 3, 4, 4)).prune(0.5)
    m = M(); Pruner(m, torch.randn(1, 3, 4, 4), strict=False).prune(0.5)
    fct.test_eq(m.a.out_channels, 4)

def test_grouped_conv_channels_pinned():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1))
    Pruner(m, torch.randn(1, 3, 6, 6)).prune(0.5)
    fct.test_eq([m[0].out_channels, m[1].out_channels], [8, 8])

def test_optimizer_state_follows():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(); x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(x).sum().backward(); opt.step()
    w = model.layer1[0].conv1.weight
    pr = Pruner(model, x, opt=opt)
    pr.prune(0.5)
    fct.test_eq(opt.state[w]['exp_avg'].shape, w.shape)
    opt.zero_grad(); model(x).sum().backward(); opt.step()  # training goes on

def test_save_load_roundtrip(tmp_path):
    model = torchvision.models.mobilenet_v2(); x = torch.randn(1, 3, 64, 64)
    Pruner(model, x).prune(0.5)
    p = os.path.join(tmp_path, 'm.pt'); save_pruned(model, p)
    fresh = load_pruned(torchvision.models.mobilenet_v2(), p)
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), model.eval()(x))

def test_repeated_prune_and_gradient_criterion():
    model = torchvision.models.resnet18(); x = torch.randn(2, 3, 32, 32)
    pr = Pruner(model, x)
    pr.prune(0.3, context='global')
    model(x).sum().backward()
    pr.prune(0.3, criteria='gradient_magnitude', round_to=4)
    assert all(m.out_channels % 4 == 0 for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    fct.test_eq(len(pr.history), 2)

from hypothesis import given, settings, strategies as st

class _TinyRes(nn.Module):
    def __init__(self, c1, c2, k):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.a, self.bna, self.b = nn.Conv2d(c1, c2, k, padding=k // 2), nn.BatchNorm2d(c2), nn.Conv2d(c2, c1, 1)
        self.head = nn.Linear(2 * c1 * 4, 5)
    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.bna(self.a(x))))
        x = torch.cat([x, torch.sigmoid(x)], 1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))

@settings(max_examples=15, deadline=None)
@given(c1=st.integers(2, 12), c2=st.integers(2, 12), k=st.sampled_from([1, 3]), ratio=st.floats(0, 0.9),
       context=st.sampled_from(['local', 'global']), round_to=st.sampled_from([None, 2, 4]))
def test_prune_property(c1, c2, k, ratio, context, round_to):
    "Any widths, ratio, context and rounding: the surgery verifies, channel counts match the weights, a group keeps >= 1 channel"
    torch.manual_seed(0)
    m = _TinyRes(c1, c2, k); _randomize_bn(m)
    x = torch.randn(2, 3, 8, 8)
    Pruner(m, x, keep_original=False).prune(ratio, context=context, round_to=round_to)
    fct.test_eq(m.stem.out_channels, m.b.out_channels)
    fct.test_eq(m.head.in_features, 2 * m.stem.out_channels * 4)
    assert m.stem.out_channels >= 1 and m.a.out_channels >= 1
    for mod in (m.stem, m.a, m.b): fct.test_eq(mod.weight.shape[:2], (mod.out_channels, mod.in_channels))
    with torch.no_grad(): fct.test_eq(m.eval()(x).shape, (2, 5))


def test_load_pruned_bad_file_leaves_model_untouched(tmp_path):
    import torch, torch.nn as nn, copy
    from fasterprune.pruner import Pruner, save_pruned, load_pruned
    torch.manual_seed(0)
    def net(): return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    m = net(); Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
    save_pruned(m, tmp_path / 'p.pt')
    d = torch.load(tmp_path / 'p.pt', weights_only=True)
    d['state_dict'] = {('x' + k): v for k, v in d['state_dict'].items()}  # keys that do not fit
    torch.save(d, tmp_path / 'bad.pt')
    dst = net(); ref = copy.deepcopy(dst.state_dict())
    with pytest.raises(RuntimeError): load_pruned(dst, tmp_path / 'bad.pt')
    fct.test_eq(dst[0].weight.shape, (16, 3, 3, 3))
    for k, v in dst.state_dict().items(): assert torch.equal(v, ref[k])
    ok = load_pruned(net(), tmp_path / 'p.pt')
    x = torch.randn(2, 3, 8, 8)
    m.eval(); ok.eval()
    fct.test_close(ok(x), m(x))
