"Model-zoo surgery tests for fasterprune.graph and fasterprune.pruner"
import copy, os, warnings
import pytest, torch
from torch import nn
import torchvision
import fastcore.test as fct
from torch.utils.flop_counter import FlopCounterMode
from fasterprune.graph import channel_groups, ChannelGraph, UnknownOpError
from fasterprune.pruner import Pruner, SurgeryError, save_pruned, load_pruned, relative_error, _Surgery
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
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)

def _macs(model, x):
    "Conv/Linear multiply-accumulates, counted by torch's own FlopCounterMode (2 FLOPs per MAC)"
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model.eval()(x)
    return fc.get_total_flops() // 2

@pytest.mark.parametrize('ratio', [0.3, 0.5])
@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_prune(name, ratio):
    torch.manual_seed(0)
    f, size = ZOO[name]
    model = f()
    _randomize_bn(model)
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
    "Zero 40 % of every group (all producers and the group's BatchNorms) as filter masks would; compact removes them"
    torch.manual_seed(0)
    f, size = ZOO[name]
    model = f()
    _randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    groups = [g for g in channel_groups(model, x) if not g.pinned]
    mods = dict(model.named_modules())
    expect = {}
    with torch.no_grad():
        for g in groups:
            k = int(0.4 * g.width)
            if not k: continue
            for n, idx in list(g.producers.items()) + list(g.norms.items()):
                m = mods[n]
                m.weight[idx[:k]] = 0
                if m.bias is not None: m.bias[idx[:k]] = 0
            for n, idx in g.producers.items(): expect[n] = mods[n].weight.shape[0] - k
    ref_model = copy.deepcopy(model).eval()
    Pruner(model, x, keep_original=False).compact()
    for n, c in expect.items(): fct.test_eq(mods[n].weight.shape[0], c)
    with torch.no_grad(): assert relative_error(ref_model(x), model.eval()(x)) <= 1e-5

def test_compact_requires_all_producers_zero():
    "A residual group goes only where every producer's filter is zero"
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.conv1.weight[:4] = 0
        model.layer1[0].conv2.weight[:4] = 0  # layer1[1].conv2 still alive
        model.layer1[0].conv1.weight[:3] = 0
        model.layer1[0].bn1.weight[:3] = 0
        model.layer1[0].bn1.bias[:3] = 0
    Pruner(model, x).compact()
    fct.test_eq((model.conv1.out_channels, model.layer1[0].conv1.out_channels), (64, 61))

def test_bn_constant_folded_into_linear():
    "Zeroed filters whose BatchNorm still emits β: the constant goes into the Linear's bias, output unchanged"
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model[0].weight[:4] = 0
        model[1].bias[:4] = torch.tensor([0.5, -0.5, 1.0, 2.0])
        model[1].running_mean.normal_()
    ref = model.eval()(x).detach()
    Pruner(model, x).compact()
    fct.test_eq(model[5].in_features, 4)
    fct.test_close(model(x).detach(), ref, eps=1e-5)

def test_padded_constant_is_kept():
    "A nonzero constant entering a zero-padded conv cannot become a bias: the channel stays"
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[0].bias[0] = 1.
        model[0].bias[1] = -1.
    Pruner(model, torch.randn(1, 3, 8, 8)).compact()
    fct.test_eq(model[0].out_channels, 3)  # channel 1 (relu(-1) = 0) went, channel 0 (constant 1) stayed

def test_bias_created_when_missing():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight[:1] = 0
        model[0].bias[0] = 3.
    x = torch.randn(1, 3, 5, 5)
    ref = model(x).detach()
    Pruner(model, x).compact()
    assert model[1].bias is not None
    fct.test_close(model(x).detach(), ref, eps=1e-5)

def test_failed_check_restores_the_model():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match='restored'): Pruner(model, x, rtol=-1.).prune(0.5)
    for k, v in model.state_dict().items(): assert torch.equal(v, sd[k]), k
    fct.test_eq(model.layer1[0].conv1.out_channels, 64)

def test_unknown_op_is_named():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        def forward(self, x): return self.b(torch.roll(self.a(x), 1, 1))
    with pytest.raises(UnknownOpError, match='roll'): Pruner(M(), torch.randn(1, 3, 4, 4)).prune(0.5)
    m = M()
    Pruner(m, torch.randn(1, 3, 4, 4), strict=False).prune(0.5)
    fct.test_eq(m.a.out_channels, 4)

def test_grouped_conv_prunes_the_same_positions_in_every_group():
    "A grouped conv (RegNet, ResNeXt) loses the same positions of every group, on its inputs and its outputs; verified"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, groups=2), nn.ReLU(), nn.Conv2d(12, 4, 1))
    pr = Pruner(m, torch.randn(2, 3, 6, 6))
    pr.prune(0.5)
    fct.test_eq([m[0].out_channels, m[2].in_channels, m[2].out_channels, m[2].groups, m[4].in_channels],
                [4, 4, 6, 2, 6])
    fct.test_eq(m[2].weight.shape, (6, 2, 3, 3))
    assert pr.history[-1]['rel_error'] <= 1e-5

def test_optimizer_state_follows():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(x).sum().backward()
    opt.step()
    w = model.layer1[0].conv1.weight
    pr = Pruner(model, x, opt=opt)
    pr.prune(0.5)
    fct.test_eq(opt.state[w]['exp_avg'].shape, w.shape)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()  # training goes on

def test_save_load_roundtrip(tmp_path):
    model = torchvision.models.mobilenet_v2()
    x = torch.randn(1, 3, 64, 64)
    Pruner(model, x).prune(0.5)
    p = os.path.join(tmp_path, 'm.pt')
    save_pruned(model, p)
    fresh = load_pruned(torchvision.models.mobilenet_v2(), p)
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), model.eval()(x))

def test_repeated_prune_and_gradient_criterion():
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 32, 32)
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
    "Any widths, ratio, context, rounding: the surgery verifies, channel counts match the weights, a group keeps >= 1"
    torch.manual_seed(0)
    m = _TinyRes(c1, c2, k)
    _randomize_bn(m)
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
    def net():
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    m = net()
    Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
    save_pruned(m, tmp_path / 'p.pt')
    d = torch.load(tmp_path / 'p.pt', weights_only=True)
    d['state_dict'] = {('x' + k): v for k, v in d['state_dict'].items()}  # keys that do not fit
    torch.save(d, tmp_path / 'bad.pt')
    dst = net()
    ref = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match='Missing key'): load_pruned(dst, tmp_path / 'bad.pt')
    fct.test_eq(dst[0].weight.shape, (16, 3, 3, 3))
    for k, v in dst.state_dict().items(): assert torch.equal(v, ref[k])
    ok = load_pruned(net(), tmp_path / 'p.pt')
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    ok.eval()
    fct.test_close(ok(x), m(x))


# ---- issue 13: the Pruner's promises on real workflows ----

def _digits_image_learner(model):
    "A fastai Learner on digits whose batches are fastai `TensorImage`s, as a vision DataBlock yields them"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.torch_core import TensorImage
    from fasterprune.data import TensorPairs, digits_arrays
    xt, yt, xv, yv = digits_arrays(flat=False)
    tfm = lambda b: (TensorImage(b[0]), b[1])
    dls = DataLoaders(DataLoader(TensorPairs(xt, yt), bs=64, shuffle=True, drop_last=True, after_batch=tfm),
                      DataLoader(TensorPairs(xv, yv), bs=128, after_batch=tfm))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss())

def test_compact_vision_learner_writes_plain_tensors(tmp_path):
    "Folded biases must not be TensorImages, or save_pruned/load_pruned (weights_only) and learn.save/load refuse"
    from fastai.vision.learner import create_head
    from fasterprune.callback import SparsifyCallback
    torch.manual_seed(0)
    def net(): return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), create_head(16, 10))
    learn = _digits_image_learner(net())
    learn.path = tmp_path
    learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot'))
    xb = learn.dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(xb).as_subclass(torch.Tensor)
    Pruner(learn).compact()
    fct.test_eq(learn.model[0].out_channels, 8)
    for n, t in list(learn.model.named_parameters()) + list(learn.model.named_buffers()):
        assert type(t) in (torch.Tensor, nn.Parameter), (n, type(t))
    save_pruned(learn.model, tmp_path / 'p.pt')
    fresh = load_pruned(net(), tmp_path / 'p.pt')
    learn.save('m')
    learn.load('m')
    with torch.no_grad():
        assert relative_error(ref, fresh.eval()(xb.as_subclass(torch.Tensor))) <= 1e-5
        assert relative_error(ref, learn.model.eval()(xb).as_subclass(torch.Tensor)) <= 1e-5

class _PerSample(nn.Module):
    "A channel into which a per-sample value is added: constant on one example, not on others"
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
    def forward(self, x): return self.b(torch.relu(self.a(x)) + x.mean((1, 2, 3), keepdim=True)).mean((2, 3))

def test_fold_needs_a_structural_constant():
    "Item 8: a zeroed channel carrying a per-sample value is not folded, though it looks constant on a batch of one"
    torch.manual_seed(0)
    m = _PerSample()
    with torch.no_grad():
        m.a.weight[:4] = 0
        m.a.bias[:4] = -1.  # relu(-1) = 0 everywhere: only the per-sample mean remains
    x, other = torch.randn(1, 3, 8, 8), torch.randn(16, 3, 8, 8)
    with torch.no_grad(): ref = m.eval()(other)
    Pruner(m, x).compact()
    fct.test_eq(m.a.out_channels, 8)  # the channels stay
    with torch.no_grad(): assert relative_error(ref, m(other)) <= 1e-5

def test_fold_of_a_true_constant_still_happens():
    "Item 8: BatchNorm shift of a zeroed filter, pooled into a Linear, is constant by structure: it folds"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 4))
    with torch.no_grad():
        m[0].weight[:4] = 0
        m[1].bias[:4] = 0.7
    other = torch.randn(16, 3, 8, 8)
    with torch.no_grad(): ref = m.eval()(other)
    Pruner(m, torch.randn(1, 3, 8, 8)).compact()
    fct.test_eq(m[5].in_features, 4)
    with torch.no_grad(): assert relative_error(ref, m(other)) <= 1e-5

class _DictOut(nn.Module):
    "torchvision segmentation style: {'out': ..., 'aux': ...}, plus nested tuple/list outputs"
    def __init__(self, nested=False):
        super().__init__()
        self.nested = nested
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.cls, self.aux = nn.Conv2d(16, 5, 1), nn.Conv2d(16, 3, 1)
    def forward(self, x):
        h = self.body(x)
        if self.nested: return (x.mean(), [self.cls(h), {'a': self.aux(h)}])
        return {'out': self.cls(h), 'aux': self.aux(h)}

@pytest.mark.parametrize('nested', [False, True])
def test_dict_and_nested_outputs_are_pinned(nested):
    "Item 9: a model returning a dict (or nested tuples/lists) keeps its output channels and prunes verified"
    torch.manual_seed(0)
    m = _DictOut(nested)
    x = torch.randn(2, 3, 8, 8)
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq((m.cls.out_channels, m.aux.out_channels, m.body[0].out_channels), (5, 3, 8))
    assert pr.history[-1]['rel_error'] <= 1e-5

class _Mixed(nn.Module):
    "Conv + PReLU + LayerNorm + Embedding, with the head tied to the embedding"
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.PReLU()
        self.conv2, self.ln, self.emb = nn.Conv2d(16, 8, 3), nn.LayerNorm(8), nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
    def forward(self, x, tok):
        return self.head(self.ln(self.conv2(self.act(self.bn(self.conv(x)))).mean((2, 3)) + self.emb(tok)))

def test_save_load_keeps_every_parameter_and_ties(tmp_path):
    "Item 11: LayerNorm, PReLU and Embedding values survive save_pruned/load_pruned, and tied weights stay tied"
    torch.manual_seed(0)
    m = _Mixed()
    with torch.no_grad():
        for p in (m.ln.weight, m.ln.bias, m.act.weight): p.uniform_(-2, 2)
    x, tok = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    Pruner(m, (x, tok), strict=False).prune(0.5)
    fct.test_eq(m.conv.out_channels, 8)
    save_pruned(m, tmp_path / 'm.pt')
    fresh = load_pruned(_Mixed(), tmp_path / 'm.pt')
    assert fresh.head.weight is fresh.emb.weight
    with torch.no_grad(): assert torch.equal(fresh.eval()(x, tok), m.eval()(x, tok))
    for k, v in m.state_dict().items(): assert torch.equal(fresh.state_dict()[k], v), k

def test_load_pruned_old_recipe_format(tmp_path):
    "Files written with the Conv/Linear/BatchNorm-only recipe still load"
    torch.manual_seed(0)
    m = seq_cnn()
    x = torch.randn(2, 3, 16, 16)
    Pruner(m, x).prune(0.5)
    old = {}
    for n, mm in m.named_modules():
        if isinstance(mm, nn.Conv2d):
            old[n] = dict(in_channels=mm.in_channels, out_channels=mm.out_channels, groups=mm.groups,
                          bias=mm.bias is not None)
        elif isinstance(mm, nn.Linear):
            old[n] = dict(in_features=mm.in_features, out_features=mm.out_features, bias=mm.bias is not None)
        elif isinstance(mm, nn.BatchNorm2d): old[n] = dict(num_features=mm.num_features)
    torch.save(dict(recipe=old, state_dict=m.state_dict()), tmp_path / 'old.pt')
    fresh = load_pruned(seq_cnn(), tmp_path / 'old.pt')
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), m.eval()(x))

def _reparam_cases():
    from torch.nn.utils import parametrizations, prune as tprune
    def wn(m): parametrizations.weight_norm(m[2])
    def sn(m): parametrizations.spectral_norm(m[2])
    def old_wn(m):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.nn.utils.weight_norm(m[2])
    def pr(m): tprune.l1_unstructured(m[2], 'weight', 0.3)
    return dict(weight_norm=wn, spectral_norm=sn, old_weight_norm=old_wn, prune=pr)

@pytest.mark.parametrize('case', list(_reparam_cases()))
def test_reparametrized_layers_refused_up_front(case):
    "Item 12: a reparametrized layer is refused with its name and the fix; the model is untouched"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    _reparam_cases()[case](m)
    x = torch.randn(2, 3, 8, 8)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad(): ref = m.eval()(x)
    with pytest.raises(ValueError, match="'2'.*remove"): Pruner(m, x).prune(0.5)
    for k, v in m.state_dict().items(): assert torch.equal(v, sd[k]), k
    with torch.no_grad(): assert torch.equal(m(x), ref)

def test_channel_permutation_is_pinned():
    "Item 14: x[:, perm] reorders channels: those channels stay, the rest prunes verified (no raw IndexError)"
    class Perm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.register_buffer('perm', torch.randperm(8))
        def forward(self, x): return self.c(torch.relu(self.b(torch.relu(self.a(x))[:, self.perm])))
    torch.manual_seed(0)
    m = Perm()
    pr = Pruner(m, torch.randn(2, 3, 8, 8))
    pr.prune(0.5)
    fct.test_eq((m.a.out_channels, m.b.out_channels), (8, 4))
    assert pr.history[-1]['rel_error'] <= 1e-5

def test_prelu_per_channel_is_cut_with_its_channels():
    "Item 14: PReLU(C) slopes are cut with their channels"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 4, 1))
    with torch.no_grad(): m[2].weight.uniform_(-1, 1)
    pr = Pruner(m, torch.randn(2, 3, 8, 8))
    pr.prune(0.5)
    fct.test_eq((m[0].out_channels, m[2].num_parameters, m[2].weight.shape[0], m[3].in_channels), (4, 4, 4, 4))
    assert pr.history[-1]['rel_error'] <= 1e-5

@pytest.mark.parametrize('what', ['empty', 'truncated'])
def test_load_pruned_broken_file_explains(tmp_path, what):
    "Item 14: an empty or truncated file gives an error that says so, and the model is untouched"
    m = seq_cnn()
    Pruner(m, torch.randn(2, 3, 16, 16)).prune(0.5)
    save_pruned(m, tmp_path / 'p.pt')
    data = (tmp_path / 'p.pt').read_bytes()
    (tmp_path / 'bad.pt').write_bytes(b'' if what == 'empty' else data[:len(data) // 2])
    dst = seq_cnn()
    sd = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=what): load_pruned(dst, tmp_path / 'bad.pt')
    for k, v in dst.state_dict().items(): assert torch.equal(v, sd[k])


# ---- issue 9 item 2: precision ----

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_prune_and_compact(dtype):
    "fp16/bf16 models prune and compact with their guarantee checked (in float64 copies)"
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    _randomize_bn(m)
    m = m.to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    pr = Pruner(m, x, keep_original=False)
    pr.prune(0.5)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'] and h['checked_in'] == 'float64', h
    fct.test_eq(m.layer1[0].conv1.out_channels, 32)
    with torch.no_grad():
        m.layer2[0].conv1.weight[:8] = 0
        m.layer2[0].bn1.weight[:8] = 0
        m.layer2[0].bn1.bias[:8] = 0
    pr.compact()
    fct.test_eq(m.layer2[0].conv1.out_channels, 56)
    assert m.layer2[0].conv1.weight.dtype == dtype

def test_fp16_example_batch_larger_than_the_half_range():
    "The second, perturbed input of an fp16 model stays finite when the sum of |x| exceeds fp16's range (65504)"
    torch.manual_seed(0)
    m = seq_cnn().half().eval()
    x = torch.randn(128, 3, 16, 16).half()  # 98,304 values: their |x| sum to about 78,000, past fp16's 65504
    assert torch.isinf(x.abs().sum()), "the case needs an overflowing half-precision sum"
    pr = Pruner(m, x, keep_original=False)
    assert bool(torch.isfinite(pr.second_inputs).all())
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= pr.history[-1]['rtol']

@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('op', ['prune', 'compact'])
def test_planted_wrong_channel_is_caught(monkeypatch, dtype, op):
    "A surgery that keeps a wrong input channel (off by one) raises SurgeryError in every precision; model restored"
    torch.manual_seed(0)
    m = seq_cnn()
    _randomize_bn(m)
    m = m.to(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    if op == 'compact':
        with torch.no_grad():
            m[4].weight[:16] = 0
            m[5].weight[:16] = 0
            m[5].bias[:16] = 0
    orig = _Surgery.cut_param
    def planted(self, p, dim, idx):
        if dim == 1 and p is (m[4] if op == 'prune' else m[8]).weight:
            idx = (idx + 1) % p.shape[1]  # every kept input off by one position
        return orig(self, p, dim, idx)
    monkeypatch.setattr(_Surgery, 'cut_param', planted)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError, match='restored'):
        pr = Pruner(m, x)
        pr.prune({'0': 0.5}) if op == 'prune' else pr.compact()
    for k, v in m.state_dict().items(): assert torch.equal(v, sd[k]), k

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_default_tf32_prune_passes_and_flags_restored():
    "Under PyTorch's default CUDA settings (TF32 convolutions) the surgery verifies; the global flags are restored"
    torch.manual_seed(0)
    def tf32_flags():
        b = torch.backends
        return b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    flags = tf32_flags()
    m = torchvision.models.resnet18().cuda()
    x = torch.randn(4, 3, 64, 64, device='cuda')
    pr = Pruner(m, x, keep_original=False)
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5
    fct.test_eq(tf32_flags(), flags)
    for dtype in (torch.float16, torch.bfloat16):
        mh = torchvision.models.resnet18().cuda().to(dtype)
        pr = Pruner(mh, x.to(dtype), keep_original=False)
        pr.prune(0.5)
        assert pr.history[-1]['rel_error'] <= pr.history[-1]['rtol']


# ---- issue 10: the Pruner rewinds (thin methods over fasterprune.rewind.Rewinder) ----

def test_pruner_rewinds_between_fits_with_a_learner():
    "keep_rewind_point -> fit -> prune_weights -> rewind -> fit: survivors restart from the point, pruned ones stay 0"
    from fastai.learner import Learner
    from fasterprune.data import digits_dls, small_cnn
    torch.manual_seed(0)
    learn = Learner(digits_dls(flat=False), small_cnn(c=8), loss_func=nn.CrossEntropyLoss())
    pr = Pruner(learn).keep_rewind_point()
    init = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1, 1e-2)
    masks = pr.prune_weights(0.5)
    pr.rewind()
    for k, v in learn.model.state_dict().items():
        name = k.rpartition('.')[0]
        if k.endswith('weight') and name in masks: assert torch.equal(v, init[k] * masks[name]), k
        else: assert torch.equal(v, init[k]), k  # BatchNorm buffers rewound too
    learn.fit(1, 1e-2)
    for name, mk in masks.items(): fct.test_eq(int((learn.model.get_submodule(name).weight[~mk] != 0).sum()), 0)

def test_pruner_rewind_point_follows_a_surgery():
    "A channel surgery between rounds cuts the rewind point too: rewind() fits the smaller model"
    torch.manual_seed(0)
    net = seq_cnn()
    x = torch.randn(8, 3, 16, 16)
    opt = torch.optim.SGD(net.parameters(), 0.05)
    pr = Pruner(net, x[:4], opt=opt).keep_rewind_point()
    w0 = net[4].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    pr.prune_weights(0.3)
    pr.prune(0.5)
    trained = net[4].weight.detach().clone()
    pr.rewind()
    fct.test_eq(net[4].weight.shape, (16, 8, 3, 3))
    w = net[4].weight.detach()
    assert not torch.isin(trained[trained != 0], w0).all()  # training moved the weights away from the point
    assert torch.isin(w[w != 0], w0).all()  # the rewound survivors are the point's values, cut like the model
    assert (w != 0).sum() >= 0.5 * w.numel()

def test_zero_output_warns_that_the_check_proves_nothing(caplog):
    "A zero-initialised head makes every output zero: the surgery still runs, with a warning that the check is vacuous"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():
        m[3].weight.zero_()
        m[3].bias.zero_()
    with caplog.at_level('WARNING', logger='fasterprune'): Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
    assert 'proves nothing' in caplog.text or 'cannot tell' in caplog.text

def test_second_input_keeps_categorical_ids_valid():
    "Tabular models: the perturbed second input shifts samples, not columns, so each category column keeps valid ids"
    class Tab(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.e2 = nn.Embedding(10, 4), nn.Embedding(3, 4)
            self.fc1, self.fc2 = nn.Linear(4 + 4 + 5, 16), nn.Linear(16, 2)
        def forward(self, cat, cont):
            return self.fc2(torch.relu(self.fc1(torch.cat([self.e1(cat[:, 0]), self.e2(cat[:, 1]), cont], 1))))
    torch.manual_seed(0)
    m = Tab()
    cat = torch.stack([torch.randint(0, 10, (8,)), torch.randint(0, 3, (8,))], 1)
    cat[0] = torch.tensor([9, 0])
    pr = Pruner(m, (cat, torch.randn(8, 5)))
    pr.prune(0.5)
    fct.test_eq(m.fc1.out_features, 8)
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_layers_sharing_a_weight_keep_their_channels_the_rest_prunes():
    "Two Linear layers with one weight Parameter: its rows and columns stay (they are channels of both); others go"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    m[4].weight = m[2].weight
    x = torch.randn(4, 8)
    pr = Pruner(m, x)
    pr.prune(0.5)  # was an IndexError or a SurgeryError, the model restored
    assert m[4].weight is m[2].weight and tuple(m[2].weight.shape) == (16, 16)
    fct.test_eq((m[6].out_features, m[8].in_features), (16, 16))  # the free 32-wide layer lost half its units
    assert pr.history[-1]['rel_error'] <= 1e-5
    g = next(g for g in channel_groups(m, x) if '2' in g.producers)
    assert g.pinned and 'weight shared by 2, 4' in g.reason


def test_prune_that_rounds_to_nothing_warns(caplog):
    "A ratio too small for a group's whole units removes nothing, and says so (it was an INFO line)"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with caplog.at_level('WARNING', logger='fasterprune.pruner'):
        Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.25)
    assert 'nothing to remove at ratio 0.25' in caplog.text and m[2].out_channels == 4


@pytest.mark.parametrize('kind', ['linear', 'conv'])
def test_compact_of_an_emptied_layer_keeps_one_channel(kind, caplog):
    "Every filter of a layer zero (a global ranking emptied it): compact keeps one, and the model still runs"
    torch.manual_seed(0)
    if kind == 'linear':
        m, x = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(4, 8)
    else:
        m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
        x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(): m[0].weight.zero_(); m[0].bias.zero_()
    ref = m(x)
    with caplog.at_level('WARNING', logger='fasterprune'):
        Pruner(m, x).compact()  # was a zero-width layer (Linear) or a refused surgery (Conv2d)
    assert 'every channel of 0 is zero' in caplog.text
    fct.test_eq(m[0].weight.shape[0], 1)
    fct.test_close(m(x), ref, eps=1e-5)
    Pruner(m, x).prune(0.5)  # and it prunes on (a zero-width layer broke this)
