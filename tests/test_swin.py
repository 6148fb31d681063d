"""Swin: torchvision's Swin V2 (`ShiftedWindowAttentionV2`: a position-bias MLP and a logit scale per head) prunes
whole heads; every class the Pruner swaps in (pruned Swin attention V1/V2, PrunedMultiheadAttention, CountedLayerNorm,
CountedRMSNorm) survives torch.save / torch.load, copy.deepcopy and fastai's Learner.export / load_learner"""
import copy, io
import pytest
import torch
import torch.nn as nn
import fastcore.test as fct
from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2
from fastai.learner import Learner, load_learner
from fasterprune.callback import SparsifyCallback
from fasterprune.data import digits_dls
from fasterprune.graph import UnknownOpError
from fasterprune.pruner import Pruner, SurgeryError, _Surgery, save_pruned, load_pruned


def _swin(v2=True, classes=5):
    "A tiny torchvision Swin (V2 by default): 2 stages of 2 blocks, 2 and 4 heads, 4x4 windows"
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=classes, **kw)


def _attns(m): return [a for a in m.modules() if hasattr(a, 'qkv') and hasattr(a, 'num_heads')]


def _random_scales(m):
    "Trained models differ per head in logit_scale (torchvision initialises all to log 10): make them differ"
    with torch.no_grad():
        for a in _attns(m): a.logit_scale.uniform_(1., 4.)


def _round_trip(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_swin_v2_prunes_whole_heads_verified():
    "swin V2 was an unknown op (`_get_relative_position_bias`); now heads go with their cpb_mlp rows and logit scales"
    torch.manual_seed(0)
    m = _swin().eval()
    _random_scales(m)
    x = torch.randn(2, 3, 32, 32)
    n0 = sum(p.numel() for p in m.parameters())
    pr = Pruner(m, x)
    pr.prune(0.5)
    h = pr.history[-1]
    fct.test_eq(h['heads_removed'], 2 * 1 + 2 * 2)  # half the heads of each block: 2 blocks of 2, 2 blocks of 4
    assert h['rel_error'] <= 1e-5 and h['channels_removed'] > 0
    for a in _attns(m):
        H = a.num_heads
        fct.test_eq((a.qkv.out_features, a.proj.in_features, a.cpb_mlp[-1].out_features, a.logit_scale.shape[0]),
                    (3 * 8 * H, 8 * H, H, H))
        fct.test_eq(type(a).__name__, 'PrunedShiftedWindowAttentionV2')
    assert sum(p.numel() for p in m.parameters()) < 0.65 * n0  # cpb_mlp's 2 -> 512 hidden units stay (inside the op)
    pr.prune(0.3)  # the pruned attention traces as one call again
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_swin_v2_compact_equals_the_masked_model():
    "Heads silenced by hand (their proj columns zero) go; the kept heads keep their own bias rows and logit scales"
    torch.manual_seed(0)
    m = _swin().eval()
    _random_scales(m)
    x = torch.randn(2, 3, 32, 36)  # 36 pads to whole windows
    a = m.features[3][1].attn  # a shifted block of 4 heads
    scale0, rows0 = a.logit_scale.detach().clone(), a.cpb_mlp[-1].weight.detach().clone()
    with torch.no_grad():
        a.proj.weight[:, 0:8] = 0  # heads 0 and 2 silent
        a.proj.weight[:, 16:24] = 0
        ref = m(x)
    Pruner(m, x).compact()
    fct.test_eq((a.num_heads, a.qkv.out_features, a.cpb_mlp[-1].out_features), (2, 48, 2))
    fct.test_eq(a.logit_scale.detach(), scale0[[1, 3]])
    fct.test_eq(a.cpb_mlp[-1].weight.detach(), rows0[[1, 3]])
    with torch.no_grad():
        fct.test_close(m(x), ref, eps=1e-5)
        fct.test_eq(m(torch.randn(1, 3, 24, 24)).shape, (1, 5))  # another size runs too


@pytest.mark.parametrize('part', ['cpb_mlp', 'logit_scale'])
def test_swin_v2_wrong_cut_caught(monkeypatch, part):
    "A cut that gives the kept heads other heads' bias rows (or scales) changes the output: refused, model restored"
    torch.manual_seed(0)
    m = _swin().eval()
    _random_scales(m)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x).detach()
    cut = _Surgery._cut_heads
    def wrong(self, a, idx):
        cut(self, a, idx)
        p = a.cpb_mlp[-1].weight if part == 'cpb_mlp' else a.logit_scale
        if len(idx) > 1: self.set(p, 'data', p.data.roll(1, 0))  # each kept head reads its neighbour's
    monkeypatch.setattr(_Surgery, '_cut_heads', wrong)
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, x).prune(0.5)
    fct.test_eq([a.num_heads for a in _attns(m)], [2, 2, 4, 4])
    fct.test_eq(type(m.features[1][0].attn).__name__, 'ShiftedWindowAttentionV2')
    with torch.no_grad(): fct.test_eq(m(x), ref)


def test_swin_v2_saved_and_loaded_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    m = _swin().eval()
    x = torch.randn(2, 3, 32, 32)
    Pruner(m, x).prune(0.5)
    save_pruned(m, tmp_path / 's.pt')
    fresh = load_pruned(_swin(), tmp_path / 's.pt').eval()
    fct.test_eq(type(fresh.features[1][0].attn).__name__, 'PrunedShiftedWindowAttentionV2')
    with torch.no_grad(): fct.test_eq(fresh(x), m(x))


@pytest.mark.parametrize('v2', [False, True])
def test_pruned_swin_pickles_and_deepcopies(v2):
    "torch.save(model) of a pruned Swin failed: the pruned class, made at run time, had no importable name"
    torch.manual_seed(0)
    m = _swin(v2).eval()
    x = torch.randn(2, 3, 32, 32)
    Pruner(m, x).prune(0.5)
    back, dup = _round_trip(m), copy.deepcopy(m)
    a = back.features[1][0].attn
    fct.test_eq((type(a), a.num_heads), (type(m.features[1][0].attn), 1))
    fct.test_eq(a.qkv.weight is m.features[1][0].attn.qkv.weight, False)
    with torch.no_grad():
        fct.test_eq(back(x), m(x))
        fct.test_eq(dup(x), m(x))
    Pruner(back, x).prune(0.3)  # the loaded model prunes on
    fct.test_eq(m.features[1][0].attn.num_heads, 1)


class _Mixed(nn.Module):
    "MultiheadAttention, a LayerNorm, an RMSNorm over pruned channels: PrunedMultiheadAttention, CountedLayerNorm, ..."
    def __init__(self, d=16):
        super().__init__()
        self.inp, self.mha = nn.Linear(6, d), nn.MultiheadAttention(d, 4, batch_first=True)
        self.fc1, self.ln, self.fc2 = nn.Linear(d, 32), nn.LayerNorm(32), nn.Linear(32, 24)
        self.rms, self.out = nn.RMSNorm(24), nn.Linear(24, 3)
    def forward(self, x):
        h = self.inp(x)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.out(self.rms(self.fc2(self.ln(self.fc1(h))))).mean(1)


def test_other_swapped_classes_pickle_and_deepcopy():
    torch.manual_seed(0)
    m, x = _Mixed().eval(), torch.randn(2, 5, 6)
    Pruner(m, x).prune(0.5)
    fct.test_eq([type(m.mha).__name__, type(m.ln).__name__, type(m.rms).__name__],
                ['PrunedMultiheadAttention', 'CountedLayerNorm', 'CountedRMSNorm'])
    for c in (_round_trip(m), copy.deepcopy(m)):
        fct.test_eq((type(c.mha), type(c.ln), type(c.rms), c.ln.full_count), (type(m.mha), type(m.ln), type(m.rms), 32))
        with torch.no_grad(): fct.test_eq(c(x), m(x))


@pytest.mark.parametrize('v2', [False, True])
def test_pruned_swin_learner_export_and_load_learner(tmp_path, v2):
    "fastai's learn.export() (cloudpickle) of a pruned Swin V1 and V2: load_learner gives it back, predicting the same"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 1), SwinTransformer([2, 2], 16, [2, 2], [2, 4], [2, 2], num_classes=10,
                        **(dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {})))
    learn = Learner(digits_dls(flat=False, bs=64), net, loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    Pruner(learn).prune(0.5)
    learn.export('pruned.pkl')
    back = load_learner(tmp_path / 'pruned.pkl')
    x = learn.dls.valid.one_batch()[0][:8]
    with torch.no_grad(): fct.test_eq(back.model.eval()(x), learn.model.eval()(x))
    fct.test_eq(back.model[1].features[1][0].attn.num_heads, 1)


def test_swin_v2_callback_heads_then_compact_removes_what_it_zeroed():
    "SparsifyCallback(granularity='filter', attention=True) zeroes whole V2 heads and MLP units; compact removes them"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 1), SwinTransformer([2, 2], 16, [2, 2], [2, 4], [2, 2], num_classes=10,
                        block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2))
    learn = Learner(digits_dls(flat=False, bs=64), net, loss_func=nn.CrossEntropyLoss())
    learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', attention=True))
    attns = _attns(net)
    def dead_heads(a):
        E = a.qkv.out_features // 3
        return int((a.qkv.weight[2 * E:].reshape(a.num_heads, -1) == 0).all(1).sum())
    heads = [(a.num_heads, dead_heads(a)) for a in attns]
    fct.test_eq([d for _, d in heads], [1, 1, 2, 2])
    mlps = [l for n, l in net.named_modules() if n.endswith('mlp.0')]
    live = [int((l.weight != 0).any(1).sum()) for l in mlps]
    x = learn.dls.valid.one_batch()[0][:8]
    with torch.no_grad(): ref = net.eval()(x)
    Pruner(learn).compact()
    fct.test_eq([a.num_heads for a in attns], [h - d for h, d in heads])
    fct.test_eq([a.cpb_mlp[-1].out_features for a in attns], [h - d for h, d in heads])
    fct.test_eq([l.out_features for l in mlps], live)
    with torch.no_grad(): fct.test_close(net.eval()(x), ref, eps=1e-5)


class _Rolled(nn.Module):
    "A channels-last block with Swin's cyclic shift (`torch.roll` over the spatial dims, as Hugging Face Swin does)"
    def __init__(self, dims=(1, 2)):
        super().__init__()
        self.dims, self.fc1, self.fc2, self.head = dims, nn.Linear(4, 16), nn.Linear(16, 8), nn.Linear(8, 3)
    def forward(self, x):  # x: B, H, W, 4
        h = torch.roll(torch.relu(self.fc1(x)), shifts=(1, 2), dims=self.dims)
        return self.head(self.fc2(h).roll(-1, 1).mean((1, 2)))


def test_roll_over_other_dims_passes_the_channels():
    "torch.roll was an unknown op (UnknownOpError without strict=False); over the spatial dims the channels pass"
    torch.manual_seed(0)
    m, x = _Rolled().eval(), torch.randn(2, 5, 6, 4)
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq((m.fc1.out_features, m.fc2.in_features, m.fc2.out_features), (8, 8, 4))
    assert pr.history[-1]['rel_error'] <= 1e-5
    rolled = _Rolled(dims=(3, 1)).eval()  # the channels rolled: still an op the graph does not know
    with pytest.raises(UnknownOpError, match='roll'): Pruner(rolled, x).prune(0.5)
    Pruner(rolled, x, strict=False).prune(0.5)  # its channels pinned
    fct.test_eq((rolled.fc1.out_features, rolled.fc2.out_features), (16, 4))
