"Issue 10: the couplings of today's architectures, each on a small hand-built module; the named models are slow tests"
import copy, math, warnings
import pytest, torch
from torch import nn
import torch.nn.functional as F
import fastcore.test as fct
from fasterprune.graph import channel_groups, ChannelGraph, CountedLayerNorm
from fasterprune.pruner import Pruner, SurgeryError, relative_error, save_pruned, load_pruned
from fasterprune.sparsifier import Sparsifier

warnings.filterwarnings('ignore', category=UserWarning)

def _check(m, x, ratio=0.5, other=None):
    "Prune `m` at `ratio`; the surgery verifies, and a fresh input gives what the masked model gave"
    pr = Pruner(m, x, keep_original=False)
    pr.prune(ratio)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'], h
    return pr

class LayerScale(nn.Module):
    "ConvNeXt/CaiT layer scale: a per-channel parameter multiplies the block's output (a functional bias too)"
    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, c, 3), nn.Conv2d(c, c, 1), nn.Conv2d(c, 4, 1)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(c))
    def forward(self, x):
        y = self.gamma * self.c2(torch.relu(self.c1(x))) + self.shift.view(1, -1, 1, 1)
        return self.head(torch.relu(y)).mean((2, 3))

def test_layer_scale_and_functional_bias_are_cut_with_their_channels(tmp_path):
    torch.manual_seed(0)
    m = LayerScale()
    x = torch.randn(2, 3, 8, 8)
    _check(m, x)
    fct.test_eq((m.c2.out_channels, m.gamma.shape[0], m.shift.shape[0], m.head.in_channels), (4, 4, 4, 4))
    save_pruned(m, tmp_path / 'm.pt')  # the recipe carries the parameters' new shapes
    fresh = load_pruned(LayerScale(), tmp_path / 'm.pt')
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), m.eval()(x))

class SE(nn.Module):
    "Squeeze-excitation gate, Linear style (view to N, C, 1, 1) and conv style"
    def __init__(self, c=8, conv=False):
        super().__init__()
        self.conv = conv
        self.c1, self.bn, self.head = nn.Conv2d(3, c, 3), nn.BatchNorm2d(c), nn.Conv2d(c, 4, 1)
        self.fc1, self.fc2 = (nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)) if conv else (nn.Linear(c, 4), nn.Linear(4, c))
    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        if self.conv: s = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        else: s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))).view(x.shape[0], -1, 1, 1)
        return self.head(x * s).mean((2, 3))

@pytest.mark.parametrize('conv', [False, True])
def test_squeeze_excitation_gate_couples_without_pinning(conv):
    torch.manual_seed(0)
    m = SE(conv=conv)
    x = torch.randn(2, 3, 8, 8)
    g = [gr for gr in channel_groups(m, x) if 'c1' in gr.producers][0]
    assert not g.pinned and set(g.producers) == {'c1', 'fc2'}, g
    _check(m, x)
    fct.test_eq((m.c1.out_channels, m.fc2.weight.shape[0], m.bn.num_features, m.head.in_channels), (4, 4, 4, 4))

class ConvNeXtBlock(nn.Module):
    "dwconv -> permute -> LayerNorm -> Linear 4C -> GELU -> Linear C -> permute -> layer scale -> + x"
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, 2)
        self.dw, self.ln = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 5)
    def forward(self, x):
        x = self.stem(x)
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = (self.gamma * self.fc2(F.gelu(self.fc1(y)))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))

def test_channels_last_block_prunes_its_hidden_units_and_stream():
    "ConvNeXt: the MLP's hidden units go, and the stream under the LayerNorm too (a CountedLayerNorm keeps the count)"
    torch.manual_seed(0)
    m = ConvNeXtBlock()
    x = torch.randn(2, 3, 16, 16)
    stream = next(g for g in channel_groups(ConvNeXtBlock(), x) if 'stem' in g.producers)
    assert not stream.pinned and set(stream.producers) == {'stem', 'fc2'} and list(stream.norms) == ['ln'], stream
    _check(m, x)
    fct.test_eq((m.fc1.out_features, m.fc2.in_features), (16, 16))
    fct.test_eq((m.stem.out_channels, m.dw.out_channels, m.ln.normalized_shape, m.gamma.shape[0]), (4, 4, (4,), 4))
    assert isinstance(m.ln, CountedLayerNorm) and m.ln.full_count == 8 and m.ln.channel_dim == -1, m.ln

class LayerNorm2d(nn.LayerNorm):
    "torchvision's and timm's LayerNorm over dimension 1 of (N, C, H, W)"
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps) \
            .permute(0, 3, 1, 2)

class CNBlock(nn.Module):
    "dwconv -> permute -> LayerNorm -> fc1 -> GELU -> fc2 -> layer scale -> permute back, + x"
    def __init__(self, c):
        super().__init__()
        self.dw, self.ln = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.ln(self.dw(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)

class TinyConvNeXt(nn.Module):
    "stem conv + LayerNorm2d, 2 blocks, downsample LayerNorm2d + conv, 1 block, head LayerNorm + Linear"
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, 2), LayerNorm2d(c))
        self.b1, self.b2 = CNBlock(c), CNBlock(c)
        self.down = nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, 2 * c, 2, 2))
        self.b3 = CNBlock(2 * c)
        self.head_ln, self.head = nn.LayerNorm(2 * c), nn.Linear(2 * c, 5)
        with torch.no_grad():  # affine parameters away from 1 and 0: a wrong count or a kept bias would show
            for ln in (self.stem[1], self.b1.ln, self.b2.ln, self.down[0], self.b3.ln, self.head_ln):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_()
    def forward(self, x):
        return self.head(self.head_ln(self.b3(self.down(self.b2(self.b1(self.stem(x))))).mean((2, 3))))

def _zero_stream(m:TinyConvNeXt, chans:list, dw_bias:bool=True):
    "The masked model of a filter sparsifier: stage-1 stream channels `chans` zero at every producer and LayerNorm"
    with torch.no_grad():
        for p in (m.stem[0].weight, m.stem[0].bias, m.stem[1].weight, m.stem[1].bias, m.down[0].weight,
                  m.down[0].bias) + tuple(q for b in (m.b1, m.b2) for q in (b.fc2.weight, b.fc2.bias, b.ln.weight,
                                                                            b.ln.bias)):
            p[chans] = 0
        if dw_bias:
            for b in (m.b1, m.b2): b.dw.bias[chans] = 0

def test_convnext_stream_compacts_exactly_under_counted_layer_norms(tmp_path):
    "Zero stream channels under LayerNorm (stem, blocks, downsample) go; every norm keeps dividing by 8; exact"
    torch.manual_seed(0)
    m = TinyConvNeXt().eval()
    _zero_stream(m, [1, 4, 6])
    x, x2 = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    with torch.no_grad(): ref, ref2 = m(x), m(x2)
    Pruner(m, x, keep_original=False).compact()
    lns = (m.stem[1], m.b1.ln, m.b2.ln, m.down[0])
    fct.test_eq([(type(ln), ln.normalized_shape, ln.full_count) for ln in lns], [(CountedLayerNorm, (5,), 8)] * 4)
    fct.test_eq([ln.channel_dim for ln in lns], [1, -1, -1, 1])
    fct.test_eq((m.stem[0].out_channels, m.b1.dw.groups, m.b1.fc1.in_features, m.b2.fc2.out_features,
                 m.b1.gamma.shape[0], m.down[1].in_channels), (5, 5, 5, 5, 5, 5))
    with torch.no_grad(): out, out2 = m(x), m(x2)
    assert relative_error(ref, out) < 1e-6 and relative_error(ref2, out2) < 1e-6  # a fresh batch too
    save_pruned(m, tmp_path / 'm.pt')  # the counted norms and their counts travel in the recipe
    fresh = load_pruned(TinyConvNeXt(), tmp_path / 'm.pt').eval()
    assert isinstance(fresh.b2.ln, CountedLayerNorm) and fresh.down[0].full_count == 8
    with torch.no_grad(): assert torch.equal(fresh(x2), out2)

def test_convnext_constant_under_layer_norm_is_counted_input_dependent_stays(monkeypatch):
    "A depthwise bias left on a zero channel reaches the LayerNorm as a constant: counted (its sums kept), exact"
    torch.manual_seed(0)
    m = TinyConvNeXt().eval()
    _zero_stream(m, [1, 4, 6], dw_bias=False)
    x, x2 = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    with torch.no_grad(): ref2 = m(x2)
    pr = Pruner(copy.deepcopy(m), x, keep_original=False)
    pr.compact()
    ln = pr.model.b1.ln
    fct.test_eq((ln.normalized_shape, ln.full_count), ((5,), 8))
    fct.test_close(ln.removed_sq, float(m.b1.dw.bias.detach()[[1, 4, 6]].square().sum()), eps=1e-5)
    with torch.no_grad(): assert relative_error(ref2, pr.model(x2)) < 1e-6
    # a CountedLayerNorm that forgot the constants would be caught by the verification, the model restored
    monkeypatch.setattr(CountedLayerNorm, 'removed_sq', property(lambda self: 0., lambda self, v: None))
    pr = Pruner(m, x, keep_original=False)
    with pytest.raises(SurgeryError): pr.compact()
    fct.test_eq((type(m.b1.ln), m.b1.ln.normalized_shape, m.stem[0].out_channels), (nn.LayerNorm, (8,), 8))
    # an input-dependent value under the LayerNorm keeps its channel: the stem LayerNorm's weight left on channel 4
    m = TinyConvNeXt().eval()
    _zero_stream(m, [1, 4, 6])
    with torch.no_grad(): m.stem[1].weight[4] = 1.
    Pruner(m, x, keep_original=False).compact()
    fct.test_eq((m.stem[0].out_channels, m.b1.ln.normalized_shape, m.b1.ln.full_count), (6, (6,), 8))

def test_convnext_filter_sparsifier_and_compact_agree():
    "Training-time filter masks on ConvNeXt (stream under LayerNorms, hidden units): compact() removes them, exactly"
    torch.manual_seed(0)
    m = TinyConvNeXt()
    x = torch.randn(2, 3, 16, 16)
    Sparsifier(m, 'filter', 'local', example_input=x).sparsify(0.5)
    dead = int((m.stem[0].weight == 0).flatten(1).all(1).sum())
    assert dead >= 3 and bool((m.stem[1].weight[(m.stem[0].weight == 0).flatten(1).all(1)] == 0).all())
    with torch.no_grad(): ref = m.eval()(x)
    Pruner(m, x).compact()
    fct.test_eq((m.stem[0].out_channels, m.stem[1].full_count, m.b2.ln.normalized_shape), (8 - dead, 8, (8 - dead,)))
    with torch.no_grad(): assert relative_error(ref, m(x)) <= 1e-5

def test_convnext_prune_half_the_stream_verified_and_twice():
    "prune(0.5) on the ConvNeXt-like model: stream and hidden units halve, verified; a second prune keeps the count"
    torch.manual_seed(0)
    m = TinyConvNeXt().eval()
    n0 = sum(p.numel() for p in m.parameters())
    pr = _check(m, torch.randn(2, 3, 16, 16))
    fct.test_eq((m.stem[0].out_channels, m.b1.fc1.out_features, m.down[1].out_channels, m.b3.fc1.out_features,
                 m.head.in_features, m.head_ln.full_count), (4, 16, 8, 32, 8, 16))
    fct.test_eq(pr.history[-1]['params_after'], sum(p.numel() for p in m.parameters()))
    assert sum(p.numel() for p in m.parameters()) / n0 < 0.4  # 0.34; the stream kept whole: 0.6
    pr.prune(0.5)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'] and m.stem[1].normalized_shape == (2,) and m.stem[1].full_count == 8, h

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize('channel_dim', [-1, 1])
def test_counted_layer_norm_equals_the_full_one_on_zero_channels(dtype, channel_dim):
    torch.manual_seed(0)
    ln = nn.LayerNorm(8).to(dtype)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(4, 8, 3, 5) if channel_dim == 1 else torch.randn(4, 3, 5, 8)
    keep = torch.tensor([0, 2, 3, 7])
    x.index_fill_(channel_dim, torch.tensor([1, 4, 5, 6]), 0)
    x = x.to(dtype)
    c = CountedLayerNorm(4).to(dtype)
    c.full_count, c.channel_dim, c.eps = 8, channel_dim, ln.eps
    with torch.no_grad():
        full = ln(x.movedim(channel_dim, -1)).movedim(-1, channel_dim).index_select(channel_dim, keep)
        c.weight.copy_(ln.weight[keep])
        c.bias.copy_(ln.bias[keep])
        out = c(x.index_select(channel_dim, keep))
    fct.test_eq(out.dtype, dtype)
    tol = {torch.float16: 4e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    assert relative_error(full.double(), out.double()) < tol

class MLPBlock(nn.Module):
    "A transformer MLP on (N, T, E): LayerNorm -> fc1 -> GELU -> fc2, residual"
    def __init__(self, e=16, h=64, gated=False):
        super().__init__()
        self.gated = gated
        self.ln, self.fc1, self.fc2, self.head = nn.LayerNorm(e), nn.Linear(e, h), nn.Linear(h, e), nn.Linear(e, 3)
        self.fc3 = nn.Linear(e, h) if gated else None
    def forward(self, x):
        y = self.ln(x)
        y = F.silu(self.fc1(y)) * self.fc3(y) if self.gated else F.gelu(self.fc1(y))
        return self.head(x + self.fc2(y))

@pytest.mark.parametrize('gated', [False, True])
def test_transformer_mlp_hidden_units(gated):
    "fc1 rows (and a SwiGLU's gate rows) go with fc2's columns; the embedding width stays"
    torch.manual_seed(0)
    m = MLPBlock(gated=gated)
    x = torch.randn(2, 5, 16)
    _check(m, x)
    fct.test_eq((m.fc1.out_features, m.fc2.in_features, m.fc2.out_features), (32, 32, 16))
    if gated: fct.test_eq(m.fc3.out_features, 32)

def test_filter_sparsifier_and_compact_agree_on_transformer_mlp():
    "Training-time filter masks on the hidden units are exactly what compact() removes"
    torch.manual_seed(0)
    m = MLPBlock(gated=True)
    x = torch.randn(2, 5, 16)
    Sparsifier(m, 'filter', 'local', example_input=x).sparsify(0.5)
    dead = int((m.fc1.weight == 0).all(1).sum())
    assert dead >= 16
    with torch.no_grad(): ref = m.eval()(x)
    Pruner(m, x).compact()
    fct.test_eq(m.fc1.out_features, 64 - dead)
    with torch.no_grad(): assert relative_error(ref, m(x)) <= 1e-5

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))
    def forward(self, x): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

class LlamaBlock(nn.Module):
    "A small Llama-like decoder: RMSNorm, rotary attention, SwiGLU MLP, tied embedding head"
    def __init__(self, vocab=50, d=32, h=4, hidden=64, T=8, merge_to_width=False):
        super().__init__()
        self.h, self.hd, self.merge_to_width = h, d // h, merge_to_width
        self.emb, self.n1, self.n2, self.norm = nn.Embedding(vocab, d), RMSNorm(d), RMSNorm(d), RMSNorm(d)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w2 = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        f = torch.outer(torch.arange(T).float(), inv)
        self.register_buffer('cos', torch.cat([f, f], -1).cos()[None, None], persistent=False)
        self.register_buffer('sin', torch.cat([f, f], -1).sin()[None, None], persistent=False)
    def forward(self, tok):
        x = self.emb(tok)
        B, T, D = x.shape
        y = self.n1(x)
        q, k, v = (w(y).view(B, T, self.h, self.hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = q * self.cos + _rotate_half(q) * self.sin, k * self.cos + _rotate_half(k) * self.sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, D if self.merge_to_width else -1))
        y = self.n2(x)
        x = x + self.w2(F.silu(self.w1(y)) * self.w3(y))
        return self.head(self.norm(x))

def test_llama_like_block(tmp_path):
    "Without heads=: SwiGLU hidden units go (w1, w3 rows with w2 columns); the attention projections stay (pinned)"
    torch.manual_seed(0)
    m = LlamaBlock()
    tok = torch.randint(0, 50, (2, 8))
    wq = next(g for g in channel_groups(m, tok) if 'wq' in g.producers)
    assert wq.pinned and '4 heads of 8' in wq.reason and 'heads=' in wq.reason  # the reason says what to do
    _check(m, tok)
    fct.test_eq((m.w1.out_features, m.w3.out_features, m.w2.in_features), (32, 32, 32))
    fct.test_eq((m.wq.out_features, m.wo.in_features, m.emb.embedding_dim), (32, 32, 32))
    save_pruned(m, tmp_path / 'l.pt')
    fresh = load_pruned(LlamaBlock(), tmp_path / 'l.pt')
    assert fresh.head.weight is fresh.emb.weight
    with torch.no_grad(): assert torch.equal(fresh.eval()(tok), m.eval()(tok))

def _llama_heads():
    from fasterprune.graph import AttentionHeads
    return {'': AttentionHeads('h', 'wq', 'wk', 'wv', 'wo')}

@pytest.mark.parametrize('context', ['local', 'global'])
def test_llama_like_block_heads(tmp_path, context):
    "Named as AttentionHeads, whole heads go: the q, k, v rows of a head with its wo columns, the head count follows"
    torch.manual_seed(0)
    m = LlamaBlock()
    tok = torch.randint(0, 50, (2, 8))
    n0 = sum(p.numel() for p in m.parameters())
    pr = Pruner(m, tok, heads=_llama_heads())
    pr_groups = [g for g in ChannelGraph(m, tok, heads=_llama_heads()).groups() if not g.pinned]
    fct.test_eq(sorted(g.width for g in pr_groups), [4, 64])  # a head is one channel of its group; 64 SwiGLU units
    pr.prune(0.5, context=context)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'] and h['params_after'] < n0
    assert 1 <= m.h < 4
    fct.test_eq((m.wq.out_features, m.wk.out_features, m.wv.out_features, m.wo.in_features), (8 * m.h,) * 4)
    fct.test_eq((m.wq.in_features, m.wo.out_features, m.emb.embedding_dim), (32, 32, 32))
    if context == 'local': fct.test_eq((m.h, m.w1.out_features), (2, 32))
    with torch.no_grad(): m.eval()(torch.randint(0, 50, (3, 8)))  # a fresh batch runs through the fewer heads
    save_pruned(m, tmp_path / 'l.pt')
    fresh = load_pruned(LlamaBlock(), tmp_path / 'l.pt')
    fct.test_eq(fresh.h, m.h)
    with torch.no_grad(): assert torch.equal(fresh.eval()(tok), m.eval()(tok))
    save_pruned(fresh, tmp_path / 'l2.pt')  # the loaded model saves its head count again
    fct.test_eq(load_pruned(LlamaBlock(), tmp_path / 'l2.pt').h, m.h)

def test_llama_heads_keep_the_lowest_heads_and_verify():
    "The head whose weights are smallest goes first; a model whose forward merges heads to the full width is refused"
    from fasterprune.pruner import SurgeryError
    from fasterprune.graph import AttentionHeads
    torch.manual_seed(0)
    m = LlamaBlock()
    with torch.no_grad():
        for w in (m.wq, m.wk, m.wv): w.weight[8:16] *= 0.01  # head 1 is the weakest
    tok = torch.randint(0, 50, (2, 8))
    wv = m.wv.weight.detach().clone()
    Pruner(m, tok, heads=_llama_heads()).prune({'': 0.25})
    fct.test_eq(m.h, 3)
    assert torch.equal(m.wv.weight, torch.cat([wv[:8], wv[16:]]))
    bad = LlamaBlock(merge_to_width=True)  # `.reshape(B, T, D)`: the forward cannot run with fewer heads
    sd = {k: v.clone() for k, v in bad.state_dict().items()}
    with pytest.raises(SurgeryError, match="no longer runs"): Pruner(bad, tok, heads=_llama_heads()).prune(0.5)
    fct.test_eq((bad.h, bad.wq.out_features), (4, 32))
    assert all(torch.equal(v, bad.state_dict()[k]) for k, v in sd.items())
    wrong = LlamaBlock()  # the head width named as the head count: verification refuses, the model is restored
    with pytest.raises(SurgeryError, match="no longer runs"):
        Pruner(wrong, tok, heads={'': AttentionHeads('hd', 'wq', 'wk', 'wv', 'wo')}).prune(0.5)
    fct.test_eq((wrong.h, wrong.hd, wrong.wq.out_features), (4, 8, 32))
    for heads, err in [({'': AttentionHeads('x', 'wq', 'wk', 'wv', 'wo')}, "not a head count"),
                       ({'': AttentionHeads('h', 'wq', 'wk', 'w1', 'wo')}, "must be equal"),
                       ({'': AttentionHeads('h', 'wq', 'wk', 'n1', 'wo')}, "not an nn.Linear"),
                       ({'attn': AttentionHeads()}, "no module 'attn'")]:
        with pytest.raises(ValueError, match=err): Pruner(LlamaBlock(), tok, heads=heads).prune(0.5)

class SoftmaxAttention(nn.Module):
    "Attention written out: biased projections, `reshape`/`permute` into heads, softmax(q @ k^T) @ v, learned positions"
    def __init__(self, d=24, n_heads=3):
        super().__init__()
        self.num_heads, self.head_dim = n_heads, d // n_heads  # not D // num_heads in forward: that breaks once cut
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
    def forward(self, x):
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).reshape(B, T, self.num_heads, hd).permute(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_heads, hd).permute(0, 2, 3, 1)
        v = self.v_proj(x).view(B, T, self.num_heads, hd).transpose(1, 2)
        att = torch.softmax(q @ k / math.sqrt(hd), dim=-1)
        return self.o_proj((att @ v).permute(0, 2, 1, 3).reshape(B, T, -1))

class TwoLayerDecoder(nn.Module):
    def __init__(self, d=24, T=6):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, d))
        self.layers = nn.ModuleList(SoftmaxAttention(d) for _ in range(2))
        self.fc1, self.fc2 = nn.Linear(d, 48), nn.Linear(48, 4)
    def forward(self, x):
        x = x + self.pos
        for a in self.layers: x = x + a(x)
        return self.fc2(F.gelu(self.fc1(x)))

def test_written_attention_variants_pattern_optimizer_compact(tmp_path):
    "Every block a pattern names loses heads; the optimizer state follows; pruned twice; zeroed heads compact away"
    from fasterprune.graph import AttentionHeads
    torch.manual_seed(0)
    m = TwoLayerDecoder()
    x = torch.randn(2, 6, 24)
    opt = torch.optim.Adam(m.parameters())
    m(x).sum().backward()
    opt.step()
    pr = Pruner(m, x, opt=opt, heads={'layers.*': AttentionHeads()})
    pr.prune(0.34)
    a0, a1 = m.layers
    fct.test_eq((a0.num_heads, a1.num_heads, a0.q_proj.bias.shape[0], a1.o_proj.in_features), (2, 2, 16, 16))
    fct.test_eq(opt.state[a0.k_proj.weight]['exp_avg'].shape, (16, 24))
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()  # the optimizer steps on the cut parameters
    with torch.no_grad(): a1.o_proj.weight[:, 8:] = 0  # a1's second head is silent
    pr.compact()
    fct.test_eq((a0.num_heads, a1.num_heads, a1.v_proj.out_features), (2, 1, 8))
    assert pr.history[-1]['rel_error'] <= 1e-5
    save_pruned(m, tmp_path / 'd.pt')
    fresh = load_pruned(TwoLayerDecoder(), tmp_path / 'd.pt')
    fct.test_eq((fresh.layers[0].num_heads, fresh.layers[1].num_heads), (2, 1))
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), m.eval()(x))
    with pytest.raises(ValueError, match="matches no module"):
        Pruner(m, x, heads={'blocks.*': AttentionHeads()}).prune(0.5)

def test_head_declaration_on_unsplit_projections_is_refused():
    "AttentionHeads on projections whose channels are not split by a view: refused, since they prune one by one"
    from fasterprune.graph import AttentionHeads
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_heads = 2
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        def forward(self, x): return self.o(torch.relu(self.q(x) + self.k(x) + self.v(x)))
    x = torch.randn(2, 8)
    m = Flat()
    with pytest.raises(ValueError, match="not split into heads"):
        Pruner(m, x, heads={'': AttentionHeads('n_heads', 'q', 'k', 'v', 'o')}).prune(0.5)
    fct.test_eq((m.n_heads, m.q.out_features), (2, 8))

class ViTBlock(nn.Module):
    "nn.MultiheadAttention + MLP, ViT style"
    def __init__(self, e=16, heads=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(e, 4 * e), nn.Linear(4 * e, e), nn.Linear(e, 3)
    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x[:, 0])

@pytest.mark.parametrize('context', ['local', 'global'])
def test_multihead_attention_heads_and_mlp(tmp_path, context):
    "Whole heads go (q, k, v rows with the out-projection columns), the MLP's hidden units too; saved and loaded"
    from fasterprune.pruner import PrunedMultiheadAttention
    torch.manual_seed(0)
    m = ViTBlock()
    x = torch.randn(2, 5, 16)
    Pruner(m, x).prune(0.5, context=context)
    a = m.attn
    fct.test_eq((a.embed_dim, a.head_dim, a.in_proj_weight.shape[1], a.out_proj.weight.shape[0]), (16, 4, 16, 16))
    fct.test_eq((a.in_proj_weight.shape[0], a.out_proj.in_features), (3 * 4 * a.num_heads, 4 * a.num_heads))
    if context == 'local':
        fct.test_eq((m.fc1.out_features, m.attn.num_heads), (32, 2))
        assert type(m.attn) is PrunedMultiheadAttention
    save_pruned(m, tmp_path / 'v.pt')
    fresh = load_pruned(ViTBlock(), tmp_path / 'v.pt')
    fct.test_eq(type(fresh.attn), type(m.attn))
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), m.eval()(x))

def test_pruned_attention_matches_masked_heads_with_masks_and_weights():
    "PrunedMultiheadAttention computes what the original did with those heads zeroed: masks, padding, weights returned"
    from fasterprune.pruner import _head_index
    torch.manual_seed(0)
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        def forward(self, q, kv, am, kp):
            return self.mha(q, kv, kv, key_padding_mask=kp, attn_mask=am, need_weights=False)[0]
    model = Cross().eval()
    mha = model.mha
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    am, kp = torch.rand(5, 7) > 0.8, torch.zeros(2, 7, dtype=torch.bool)
    kp[0, -2:] = True
    pr = Pruner(model, (q, kv, am, kp))
    with torch.no_grad():
        hr, hc = _head_index(mha, torch.tensor([1, 3]))
        mha.in_proj_weight[hr] = 0
        mha.in_proj_bias[hr] = 0
        mha.out_proj.weight[:, hc] = 0
        ref = mha(q, kv, kv, key_padding_mask=kp, attn_mask=am, need_weights=False)[0]
    pr.compact()
    fct.test_eq(mha.num_heads, 2)
    with torch.no_grad():
        out = mha(q, kv, kv, key_padding_mask=kp, attn_mask=am, need_weights=False)[0]
        out2, w = mha(q, kv, kv, key_padding_mask=kp, attn_mask=am)
    assert relative_error(ref, out) <= 1e-5 and relative_error(ref, out2) <= 1e-5
    fct.test_eq(w.shape, (2, 5, 7))

def test_grouped_conv_regnet_style():
    "RegNet's bottleneck: 1x1 -> grouped 3x3 -> squeeze-excitation -> 1x1; the same positions of every group go"
    torch.manual_seed(0)
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.Conv2d(16, 4, 1)
            self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        def forward(self, x):
            y = torch.relu(self.b(torch.relu(self.a(x))))
            y = y * torch.sigmoid(self.se2(torch.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
            return self.c(y).mean((2, 3))
    m = B()
    x = torch.randn(2, 3, 8, 8)
    _check(m, x)
    fct.test_eq((m.a.out_channels, m.b.in_channels, m.b.out_channels, m.b.groups, m.se2.out_channels, m.c.in_channels),
                (8, 8, 8, 4, 8, 8))

ZOO = ['convnext_tiny', 'regnet_y_400mf', 'squeezenet1_0', 'vit_b_16', 'swin_t', 'resnext50_32x4d']

@pytest.mark.slow
@pytest.mark.parametrize('name', ZOO)
def test_zoo_models_prune_verified(name):
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)()
    with torch.no_grad():  # ViT's head starts at zero: the output would be zero and the check vacuous
        for mod in m.modules():
            if isinstance(mod, nn.Linear) and not mod.weight.any(): nn.init.normal_(mod.weight, std=0.02)
    x = torch.randn(2, 3, 224 if name in ('vit_b_16', 'swin_t') else 64, 224 if name in ('vit_b_16', 'swin_t') else 64)
    n0 = sum(p.numel() for p in m.parameters())
    _check(m, x)
    assert sum(p.numel() for p in m.parameters()) < 0.75 * n0

@pytest.mark.slow
def test_convnext_tiny_prunes_its_stream(tmp_path):
    "torchvision's convnext_tiny at 0.5: every stream under LayerNorm(2d) halves, kept params <= 0.28, saved, loaded"
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.convnext_tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    n0 = sum(p.numel() for p in m.parameters())
    _check(m, x)
    assert sum(p.numel() for p in m.parameters()) / n0 <= 0.28
    fct.test_eq((m.features[0][1].normalized_shape, m.features[0][1].full_count, m.classifier[0].full_count),
                ((48,), 96, 768))
    save_pruned(m, tmp_path / 'c.pt')
    fresh = load_pruned(torchvision.models.convnext_tiny(), tmp_path / 'c.pt').eval()
    with torch.no_grad(): assert torch.equal(fresh(x), m(x))

class HookedUNet(nn.Module):
    "What torch.fx cannot trace: a forward hook stores the skip tensor, a shape test picks the path"
    def __init__(self):
        super().__init__()
        self.enc, self.down, self.mid = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.dec, self.out = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.stored = None
        self.enc.register_forward_hook(lambda m, i, o: setattr(self, 'stored', o))
    def forward(self, x):
        h = self.mid(self.down(torch.relu(self.enc(x))))
        u = self.up(torch.relu(h))
        if u.shape[-2:] != self.stored.shape[-2:]: u = F.interpolate(u, self.stored.shape[-2:])
        return self.out(torch.relu(self.dec(torch.cat([u, torch.relu(self.stored)], 1))))

def test_untraceable_model_is_recorded_and_pruned():
    "torch.fx fails on hooks and data-dependent Python: one recorded forward pass finds the couplings instead"
    torch.manual_seed(0)
    m = HookedUNet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(AttributeError, match="no attribute 'shape'"):  # the hook-stored tensor is not there
        torch.fx.symbolic_trace(HookedUNet())
    _check(m, x)
    widths = (m.enc.out_channels, m.mid.out_channels, m.dec.in_channels, m.dec.out_channels, m.out.out_channels)
    fct.test_eq(widths, (4, 16, 12, 4, 2))  # ConvTranspose pins

class UntraceableConvNeXt(TinyConvNeXt):
    "TinyConvNeXt with data-dependent Python in its forward: torch.fx fails, the recorded forward must see LayerNorm2d"
    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 1000: x = x[..., ::2]  # never taken, but fx cannot trace the test
        return self.head(self.head_ln(self.b3(self.down(self.b2(self.b1(x)))).mean((2, 3))))

def test_untraceable_convnext_records_layer_norm2d_as_one_call():
    "The recorded forward keeps a LayerNorm2d whole (over dimension 1): its stream prunes under a CountedLayerNorm"
    torch.manual_seed(0)
    m = UntraceableConvNeXt().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(UntraceableConvNeXt())
    _check(m, torch.randn(2, 3, 16, 16))
    fct.test_eq((type(m.stem[1]), m.stem[1].channel_dim, m.stem[1].normalized_shape, m.stem[1].full_count),
                (CountedLayerNorm, 1, (4,), 8))

def test_convnext_half_precision_prunes_verified():
    "float16 on the CPU: CountedLayerNorm computes its statistics in float32; the check runs in float64 copies"
    torch.manual_seed(0)
    m = TinyConvNeXt().eval().half()
    x = torch.randn(2, 3, 16, 16).half()
    pr = _check(m, x)
    assert pr.history[-1]['checked_in'] == 'float64' and m.b1.ln.weight.dtype == torch.float16
    with torch.no_grad(): out = m(x)
    assert out.dtype == torch.float16 and bool(out.isfinite().all()) and m.b1.ln.full_count == 8

def test_fastai_dynamic_unet(tmp_path):
    "fastai's U-Net (hooks, Python control flow, TensorBase output) prunes verified, saves and loads"
    from fastai.vision.learner import create_unet_model
    from torchvision.models import resnet18
    torch.manual_seed(0)
    def net(): return create_unet_model(resnet18, 3, (32, 32), pretrained=False)
    m = net()
    x = torch.randn(2, 3, 32, 32)
    n0 = sum(p.numel() for p in m.parameters())
    _check(m, x)
    assert sum(p.numel() for p in m.parameters()) < 0.4 * n0
    save_pruned(m, tmp_path / 'u.pt')
    fresh = load_pruned(net(), tmp_path / 'u.pt')
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), m.eval()(x))

def test_swin_window_attention_heads(tmp_path):
    "Swin window attention loses whole heads (qkv rows, proj columns, bias-table columns); pruned twice, saved, loaded"
    from torchvision.models.swin_transformer import SwinTransformer
    def net(): return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=5)
    torch.manual_seed(0)
    m = net()
    x = torch.randn(2, 3, 32, 32)
    n0 = sum(p.numel() for p in m.parameters())
    pr = _check(m, x)
    attn = m.features[1][1].attn  # a shifted block
    sizes = (attn.num_heads, attn.qkv.out_features, attn.proj.in_features, attn.relative_position_bias_table.shape[1])
    fct.test_eq(sizes, (1, 3 * 8, 8, 1))
    fct.test_eq(type(attn).__name__, 'PrunedShiftedWindowAttention')
    pr.prune(0.3)  # the pruned attention traces as one call again
    assert pr.history[-1]['rel_error'] <= 1e-5 and sum(p.numel() for p in m.parameters()) < 0.6 * n0
    save_pruned(m, tmp_path / 's.pt')
    fresh = load_pruned(net(), tmp_path / 's.pt')
    with torch.no_grad(): assert torch.equal(fresh.eval()(x), m.eval()(x))
