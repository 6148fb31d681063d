"Filter pruning of grouped-conv units and attention heads (Sparsifier, SparsifyCallback): compact removes the zeroes"
import copy
import pytest
import torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.pruner import Pruner
from fasterprune.data import digits_dls


def n_params(m): return sum(p.numel() for p in m.parameters())
def _dead(w): return (w.reshape(w.shape[0], -1) == 0).all(1)


def _random_norms(model):
    "BatchNorm with nonzero affine parameters and statistics: a pruned channel is silent only if its shift is zeroed"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def grouped_block(c=16, groups=4):
    "Conv -> BN -> ReLU -> grouped Conv -> BN -> ReLU -> 1x1 Conv -> pooled Linear head"
    return _random_norms(nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=groups), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))).eval()


def _whole_units(dead, groups=4):
    "Channel `g * width + j` of a grouped conv: a unit is one position `j` in every group, all dead or all alive"
    d = dead.reshape(groups, -1)
    return bool((d.all(0) | ~d.any(0)).all())


@pytest.mark.parametrize('context', ['local', 'global'])
def test_grouped_conv_prunes_whole_units_that_compact_removes(context):
    torch.manual_seed(0)
    m = grouped_block()
    x = torch.randn(4, 3, 8, 8)
    sp = Sparsifier(m, 'filter', context).couple(x[:1]).sparsify(0.5)
    d0, d3, d6 = _dead(m[0].weight), _dead(m[3].weight), _dead(m[6].weight)
    assert _whole_units(d0) and _whole_units(d3), (d0, d3)
    assert d0.any() and d3.any()
    if context == 'local':  # round(0.5 * 16) = 8 channels = 2 units of 4 in each grouped group
        fct.test_eq((int(d0.sum()), int(d3.sum()), int(d6.sum())), (8, 8, 4))
    for bn, d in ((m[1], d0), (m[4], d3)): fct.test_eq(bn.bias[d].abs().sum().item(), 0.)  # aux follows the units
    masked, n_masked = copy.deepcopy(m), n_params(m)
    Pruner(m, x[:1]).compact()  # verifies the output itself (raises otherwise)
    fct.test_eq((m[0].out_channels, m[3].out_channels, m[3].groups, m[6].out_channels),
                (16 - int(d0.sum()), 16 - int(d3.sum()), 4, 8 - int(d6.sum())))
    c0, c3, c6 = 16 - int(d0.sum()), 16 - int(d3.sum()), 8 - int(d6.sum())
    fct.test_eq(n_params(m), 3 * 9 * c0 + c0 + 2 * c0 + c3 * c0 // 4 * 9 + c3 + 2 * c3 + c6 * c3 + c6 + 3 * c6 + 3)
    assert n_params(m) < n_masked
    with torch.no_grad(): fct.test_close(m(x), masked(x), eps=1e-5)
    assert sp.sparsity() == 0  # nothing left to remove: every zeroed filter went


def test_units_never_revive_and_grow_whole():
    torch.manual_seed(1)
    m = grouped_block()
    x = torch.randn(1, 3, 8, 8)
    sp = Sparsifier(m, 'filter', 'local').couple(x).sparsify(0.25)
    d1 = _dead(m[3].weight)
    fct.test_eq(int(d1.sum()), 4)  # round(0.25 * 16) = 4 = one unit
    sp.sparsify(0.75)
    d2 = _dead(m[3].weight)
    fct.test_eq(int(d2.sum()), 12)  # all but one unit
    assert bool((d2 | ~d1).all()) and _whole_units(d2)
    fct.test_fail(lambda: sp.sparsify(0.5), contains='masks never shrink')
    fct.test_eq(_dead(m[3].weight), d2)  # the refused call left the model as it was
    fct.test_fail(lambda: sp.sparsify({'3': 0.5}), contains='per-layer targets')


def test_high_target_keeps_one_unit_per_group():
    "A target that rounds to every channel still leaves one unit per group (the Pruner's rule)"
    torch.manual_seed(2)
    m = grouped_block()
    Sparsifier(m, 'filter', 'local').couple(torch.randn(1, 3, 8, 8)).sparsify(0.99)
    fct.test_eq((int(_dead(m[0].weight).sum()), int(_dead(m[3].weight).sum())), (12, 12))


class AttnBlock(nn.Module):
    "Linear embedding -> MultiheadAttention (residual) -> LayerNorm -> MLP (residual) -> mean -> head"
    def __init__(self, d=16, h=4):
        super().__init__()
        self.emb, self.mha, self.ln = nn.Linear(5, d), nn.MultiheadAttention(d, h, batch_first=True), nn.LayerNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, 3)
        with torch.no_grad(): self.mha.in_proj_bias.uniform_(-0.5, 0.5)  # zero at init: a pruned head must zero it
    def forward(self, x):
        h = self.emb(x)
        h = self.ln(h + self.mha(h, h, h, need_weights=False)[0])
        return self.head((h + self.fc2(torch.relu(self.fc1(h)))).mean(1))


def _dead_heads(mha):
    w = mha.in_proj_weight.detach().reshape(3, mha.num_heads, -1)
    return (w == 0).all(2).all(0)


def test_attention_heads_zeroed_whole_and_removed():
    torch.manual_seed(0)
    m, x = AttnBlock().eval(), torch.randn(2, 6, 5)
    sp = Sparsifier(m, 'filter', 'local', attention=True).couple(x[:1]).sparsify(0.5)
    dh = _dead_heads(m.mha)
    fct.test_eq(int(dh.sum()), 2)  # round(0.5 * 4) heads
    rows = m.mha.in_proj_weight.detach().reshape(3, 4, -1)
    fct.test_eq(bool((rows[:, ~dh] != 0).all()), True)  # the other heads are whole
    fct.test_eq(m.mha.in_proj_bias.detach().reshape(3, 4, -1)[:, dh].abs().sum().item(), 0.)
    assert int(_dead(m.fc1.weight).sum()) == 16  # the MLP's hidden units still prune
    masked, n0 = copy.deepcopy(m), n_params(m)
    Pruner(m, x[:1]).compact()
    fct.test_eq(m.mha.num_heads, 2)
    fct.test_eq(m.mha.embed_dim, 16)  # the embedding width stays
    hd = 16 // 4  # 2 heads: their q, k, v rows and biases, out_proj columns; 16 hidden units: fc1 rows, fc2 columns
    fct.test_eq(n0 - n_params(m), 2 * hd * (3 * (16 + 1) + 16) + 16 * (16 + 1 + 16))
    with torch.no_grad(): fct.test_close(m(x), masked(x), eps=1e-5)
    assert sp.sparsity() == 0


def test_attention_false_leaves_heads():
    torch.manual_seed(0)
    m, x = AttnBlock().eval(), torch.randn(1, 6, 5)
    sp = Sparsifier(m, 'filter', 'local').couple(x).sparsify(0.5)
    assert not any('mha' in n for n in sp.masks)
    fct.test_eq(int(_dead_heads(m.mha).sum()), 0)
    fct.test_eq(int(_dead(m.fc1.weight).sum()), 16)


def test_swin_window_attention_heads():
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    class Win(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Linear(3, 16), nn.Linear(16, 2)
            self.attn = ShiftedWindowAttention(16, [4, 4], [0, 0], 4)
        def forward(self, x):  # x: B, H, W, 3
            h = self.emb(x)
            return self.head((h + self.attn(h)).mean((1, 2)))
    torch.manual_seed(0)
    m, x = Win().eval(), torch.randn(2, 8, 8, 3)
    Sparsifier(m, 'filter', 'local').couple(x[:1]).sparsify(0.5)  # qkv is an ordinary Linear: its heads prune
    dh = (m.attn.qkv.weight.detach().reshape(3, 4, -1) == 0).all(2).all(0)
    fct.test_eq(int(dh.sum()), 2)
    masked = copy.deepcopy(m)
    Pruner(m, x[:1]).compact()
    fct.test_eq(m.attn.num_heads, 2)
    with torch.no_grad(): fct.test_close(m(x), masked(x), eps=1e-5)


class DigitsGroupedAttn(nn.Module):
    "1x8x8 digits: Conv -> grouped Conv -> 1x1 Conv -> 64 tokens -> MultiheadAttention -> pooled head"
    def __init__(self, c=16):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1, groups=4), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 1))
        self.mha, self.head = nn.MultiheadAttention(c, 4, batch_first=True), nn.Linear(c, 10)
    def forward(self, x):
        h = self.convs(x).flatten(2).transpose(1, 2)
        return self.head((h + self.mha(h, h, h, need_weights=False)[0]).mean(1))


def test_callback_filter_units_and_heads_then_compact():
    torch.manual_seed(0)
    dls = digits_dls(flat=False, bs=64)
    learn = Learner(dls, DigitsGroupedAttn(), loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='agp', attention=True)
    learn.fit(1, 1e-2, cbs=cb)
    model = learn.model.eval()
    x = dls.valid.one_batch()[0][:16]
    masked, n0 = copy.deepcopy(model), n_params(model)
    d0, d3, dh = _dead(model.convs[0].weight), _dead(model.convs[3].weight), _dead_heads(model.mha)
    assert _whole_units(d0) and _whole_units(d3)
    fct.test_eq((int(d0.sum()), int(d3.sum()), int(dh.sum())), (8, 8, 2))
    Pruner(model, x[:1]).compact()
    fct.test_eq((model.convs[0].out_channels, model.convs[3].out_channels, model.mha.num_heads), (8, 8, 2))
    assert n_params(model) < 0.8 * n0
    with torch.no_grad(): fct.test_close(model(x), masked(x), eps=1e-4)


def _calibrated(model, x):
    "BatchNorm statistics of a random batch (random init: activations vanish with depth otherwise)"
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm): m.reset_running_stats(), setattr(m, 'momentum', None)
    model.train()
    with torch.no_grad(): model(x.expand(4, *x.shape[1:]) + torch.randn(4, *x.shape[1:]))
    return model.eval()


def test_regnet_filter_masks_compact_like_the_pruner():
    from torchvision.models import regnet_y_400mf
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    m = _calibrated(regnet_y_400mf(), x)
    twin, n0 = copy.deepcopy(m), n_params(m)
    Sparsifier(m, 'filter', 'local').couple(x).sparsify(0.5)
    Pruner(m, x, keep_original=False).compact()
    Pruner(twin, x, keep_original=False).prune(0.5)
    assert n_params(m) / n0 < 0.3, n_params(m) / n0  # was 0.53: channels zeroed one by one could not go
    fct.test_close(n_params(m) / n0, n_params(twin) / n0, eps=0.02)


def test_tiny_vit_heads_compact():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(32, 8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    with torch.no_grad(): nn.init.normal_(m.heads.head.weight, std=0.02)  # zero at init
    x = torch.randn(1, 3, 32, 32)
    Sparsifier(m, 'filter', 'local', attention=True).couple(x).sparsify(0.5)
    Pruner(m, x, keep_original=False).compact()
    fct.test_eq([l.self_attention.num_heads for l in m.encoder.layers], [2, 2])
    fct.test_eq([l.mlp[0].out_features for l in m.encoder.layers], [32, 32])


def _llama():
    from test_zoo import LlamaBlock
    from fasterprune.graph import AttentionHeads
    torch.manual_seed(0)
    return LlamaBlock(), {'': AttentionHeads('h', 'wq', 'wk', 'wv', 'wo')}


@pytest.mark.parametrize('context', ['local', 'global'])
def test_hand_written_heads_named_zeroed_whole_and_removed(context):
    "Named with AttentionHeads, a Llama-style block's heads are pruned whole (q, k, v rows) and compact removes them"
    m, heads = _llama()
    tok = torch.randint(0, 50, (2, 8))
    sp = Sparsifier(m, 'filter', context).couple(tok, heads=heads).sparsify(0.5)
    dead = [_dead(w.weight).reshape(4, 8) for w in (m.wq, m.wk, m.wv)]
    for d in dead: assert (d.all(1) | ~d.any(1)).all()  # whole heads only
    fct.test_eq(dead[0].all(1), dead[2].all(1))  # the same heads in q, k and v
    n_dead = int(dead[0].all(1).sum())
    assert 1 <= n_dead <= 3 and sp.sparsity() > 0
    with torch.no_grad(): ref = m.eval()(tok)
    Pruner(m, tok, heads=heads).compact()
    fct.test_eq(m.h, 4 - n_dead)
    fct.test_eq((m.wq.out_features, m.wo.in_features), (8 * m.h, 8 * m.h))
    with torch.no_grad(): fct.test_close(m(tok), ref, eps=1e-5)


def test_hand_written_heads_unnamed_stay_dense():
    "Without heads= the projections split into heads are pinned: not pruned one row at a time"
    m, _ = _llama()
    tok = torch.randint(0, 50, (2, 8))
    Sparsifier(m, 'filter', 'local').couple(tok).sparsify(0.5)
    for w in (m.wq, m.wk, m.wv): fct.test_eq(int((w.weight == 0).sum()), 0)
    assert _dead(m.w1.weight).any()  # the SwiGLU units still prune


def test_callback_heads_on_a_language_model_then_compact():
    "SparsifyCallback(heads=) on a tiny Llama-style LM: whole heads zeroed during fit, compact removes them"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    import torch.nn.functional as F
    m, heads = _llama()
    g = torch.Generator().manual_seed(0)
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous())
               for t in (torch.randint(0, 50, (8, 9), generator=g) for _ in range(6))]
    dls = DataLoaders(DataLoader(batches, bs=None), DataLoader(batches[:1], bs=None))
    learn = Learner(dls, m, loss_func=lambda out, y: F.cross_entropy(out.reshape(-1, 50), y.reshape(-1)))
    cb = SparsifyCallback(0.5, 'filter', 'local', heads=heads)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=cb)
    n_dead = int(_dead(m.wv.weight).reshape(4, 8).all(1).sum())
    assert n_dead >= 1
    tok = batches[0][0]
    with torch.no_grad(): ref = m.eval()(tok)
    Pruner(m, tok, heads=heads).compact()
    fct.test_eq(m.h, 4 - n_dead)
    with torch.no_grad(): fct.test_close(m(tok), ref, eps=1e-5)


def test_callback_heads_needs_coupled_filters():
    _, heads = _llama()
    fct.test_fail(lambda: SparsifyCallback(0.5, 'weight', heads=heads), contains="granularity='filter'")
    fct.test_fail(lambda: SparsifyCallback(0.5, 'filter', coupled=False, heads=heads), contains="coupled")
    fct.test_fail(lambda: SparsifyCallback(0.5, 'filter', heads=['wq']), contains="must be a dict")
