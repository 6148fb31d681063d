"""Gated MLPs stored as ONE Linear (Phi-3's `gate_up_proj`, GEGLU/SwiGLU with `chunk(2, -1)`, `F.glu`, `split`): a
unit is rows j and I + j of the fused Linear with column j of the next one; pieces that do not meet again stay pinned"""
import copy
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
import fasterprune.graph as fg
from fasterprune.graph import ChannelGraph, UnknownOpError
from fasterprune.pruner import Pruner, SurgeryError


class GatedMLP(nn.Module):
    "in -> fused up Linear (2·I rows) -> gate · up -> down -> residual -> head; `form` says how the halves are cut"
    def __init__(self, d=16, I=24, form='chunk', bias=True, c_in=8, n_out=4):
        super().__init__()
        self.form, self.I = form, I
        self.inp, self.up, self.down, self.head = (nn.Linear(c_in, d), nn.Linear(d, 2 * I, bias=bias),
                                                   nn.Linear(I, d, bias=bias), nn.Linear(d, n_out))
        self.glu = nn.GLU(-1)
    def forward(self, x):
        x = self.inp(x)
        h = self.up(x)
        f = self.form
        if f == 'chunk': g, u = h.chunk(2, dim=-1)
        elif f == 'torch_chunk': g, u = torch.chunk(h, 2, -1)
        elif f == 'split_shape':  # sizes read from the tensor: they follow a cut
            I = h.shape[-1] // 2
            g, u = h.split([I, I], -1)
        elif f == 'split_int': g, u = torch.split(h, h.shape[-1] // 2, dim=-1)
        elif f == 'split_number': g, u = h.split([self.I, self.I], -1)  # numbers: a cut would not change them
        if f == 'F.glu': y = F.glu(h, dim=-1)
        elif f == 'nn.GLU': y = self.glu(h)
        else: y = F.silu(g) * u
        return self.head(x + self.down(y))


def _same(a, b): assert torch.equal(a.detach(), b.detach()), (a, b)


def _x(): return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))


def _units_kept(dense:GatedMLP, pruned:GatedMLP) -> list:
    "The units j of `dense` whose rows j and I + j (and column j of down) `pruned` holds, checked pair by pair"
    I, k = dense.I, pruned.down.in_features
    W0, W1 = dense.up.weight, pruned.up.weight
    fct.test_eq(W1.shape[0], 2 * k)
    js = [int((W0[:I] == W1[i]).all(1).nonzero()[0]) for i in range(k)]
    for i, j in enumerate(js):  # the second half keeps the same units, in the same order
        _same(W1[k + i], W0[I + j])
        _same(pruned.down.weight[:, i], dense.down.weight[:, j])
    return js


def _masked(dense:GatedMLP, kept:list) -> GatedMLP:
    "`dense` with the removed units silenced: their down columns zeroed (what the pruned model must compute)"
    m = copy.deepcopy(dense)
    gone = [j for j in range(dense.I) if j not in kept]
    with torch.no_grad(): m.down.weight[:, gone] = 0
    return m


@pytest.mark.parametrize('form', ['chunk', 'torch_chunk', 'F.glu', 'nn.GLU', 'split_shape', 'split_int'])
@pytest.mark.parametrize('bias', [True, False])
def test_fused_gate_up_prunes_whole_units(form, bias):
    "prune(0.5) removes half the units of the fused Linear: rows j and I + j with column j of down; equals the masked"
    torch.manual_seed(0)
    m, x = GatedMLP(form=form, bias=bias).eval(), _x()
    g = ChannelGraph(m, x)
    up = next(gr for gr in g.groups() if list(gr.producers) == ['up'])
    assert not up.pinned, up
    fct.test_eq((up.width, len(up.units.unique())), (48, 24))  # 24 units of two rows
    dense = copy.deepcopy(m)
    pr = Pruner(m, x)
    pr.prune({'up': 0.5})  # the MLP's units only (the residual width stays: down's rows are compared below)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'], h
    fct.test_eq((m.up.out_features, m.down.in_features, m.down.out_features), (24, 12, 16))
    kept = _units_kept(dense, m)
    if bias:
        _same(m.up.bias, torch.cat([dense.up.bias[kept], dense.up.bias[[24 + j for j in kept]]]))
    with torch.no_grad(): fct.test_close(m(x), _masked(dense, kept)(x), eps=1e-5)
    with torch.no_grad(): m(torch.randn(2, 7, 8))  # another shape: the chunk and split still cut equal halves


def test_split_by_numbers_in_the_forward_stays_pinned():
    "`split([self.I, self.I], -1)`: sizes that a cut would not change keep the fused Linear whole, saying why"
    torch.manual_seed(0)
    m, x = GatedMLP(form='split_number').eval(), _x()
    up = next(gr for gr in ChannelGraph(m, x).groups() if list(gr.producers) == ['up'])
    assert up.pinned and 'numbers' in up.reason, up
    Pruner(m, x).prune(0.5)
    fct.test_eq((m.up.out_features, m.down.in_features), (48, 24))
    fct.test_eq(m.inp.out_features, 8)  # the rest of the model prunes


class Pieces(nn.Module):
    "One fused Linear whose pieces do not meet elementwise again: each goes its own way"
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.up, self.a, self.b = nn.Linear(8, 24), nn.Linear(8, 4), nn.Linear(16, 4)
        self.a2, self.a3 = nn.Linear(12, 4), nn.Linear(12, 4)
        self.up2, self.b2 = nn.Linear(8, 12), nn.Linear(8, 12)
    def forward(self, x):
        h = self.up(x)
        if self.form == 'two':  # the halves made by two layers: a unit would span two channel groups
            g, u = torch.cat([self.up2(x), self.b2(x)], -1).chunk(2, -1)
            return self.a2(F.silu(g) * u) + h[..., :4]
        if self.form == 'unequal':  # computed sizes, unequal pieces
            p, q = h.split([h.shape[-1] // 3, 2 * h.shape[-1] // 3], -1)
            return self.a(p) + self.b(q)
        if self.form == 'apart':  # equal pieces that go to two layers
            p, q = h.chunk(2, -1)
            return self.a2(p) + self.a3(q)
        if self.form == 'output':  # equal pieces, one returned
            p, q = h.chunk(2, -1)
            return self.a2(F.silu(p) * q), q
        if self.form == 'time':  # along the time dimension, then multiplied
            p, q = h.chunk(2, 1)
            return self.a(torch.cat([p * q, p], -1)[..., :8])
        if self.form == 'batch':
            p, q = h.chunk(2, 0)
            return self.a2((p * q)[..., :12])


@pytest.mark.parametrize('form', ['unequal', 'apart', 'output', 'time', 'batch', 'two'])
def test_pieces_that_do_not_meet_stay_pinned(form):
    "Unequal pieces, pieces that go apart or reach the output, a chunk along time or batch, halves of two layers: stay"
    torch.manual_seed(0)
    m, x = Pieces(form).eval(), torch.randn(4, 6, 8)
    name = 'up2' if form == 'two' else 'up'
    g = ChannelGraph(m, x)
    up = next(gr for gr in g.groups() if name in gr.producers)
    assert up.pinned, up
    w = m.get_submodule(name).weight.clone()
    Pruner(m, x, strict=False).prune(0.5)
    _same(m.get_submodule(name).weight, w)


def test_planted_wrong_coupling_is_caught_by_the_check(monkeypatch):
    "A graph that pairs row j with row I + j + 1: the Pruner's check sees the pruned model differ, and restores it"
    torch.manual_seed(0)
    m, x = GatedMLP(form='chunk', bias=False).eval(), _x()
    right = fg._piece_index
    monkeypatch.setattr(fg, '_piece_index', lambda sizes: [i if p == 0 else i.roll(1) for p, i in
                                                           enumerate(right(sizes))])
    w = m.up.weight.clone()
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, x).prune(0.5)
    _same(m.up.weight, w)
    monkeypatch.setattr(fg, '_piece_index', right)
    Pruner(m, x).prune(0.5)
    fct.test_eq(m.up.out_features, 24)


def test_glu_along_another_dimension_is_not_an_unknown_op():
    "F.glu over the time dimension no longer stops a strict graph; its channels stay"
    class TimeGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)
        def forward(self, x): return self.down(F.glu(self.up(x), dim=1))
    m, x = TimeGLU().eval(), torch.randn(2, 6, 8)
    up = next(gr for gr in ChannelGraph(m, x).groups() if 'up' in gr.producers)
    assert up.pinned, up


# ---------------------------------------------------------------- Phi-3 (transformers)

def _phi3():
    T = pytest.importorskip('transformers')
    from fasterprune.hf import own_head_counts
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.Phi3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0)
    return own_head_counts(T.Phi3ForCausalLM(cfg).eval())


def test_phi3_mlp_loses_units_equal_to_the_masked_model_and_generates():
    "Phi-3's fused gate_up_proj: half its units go with their down_proj columns; logits equal the masked model's"
    from fasterprune.hf import hf_heads, hf_config_after_prune
    m = _phi3()
    torch.manual_seed(0)
    x = torch.randint(2, 100, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    dense = copy.deepcopy(m)
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(m))
    pr.prune(0.5)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'] and h['heads_removed'] == 4, h
    masked = copy.deepcopy(dense)
    for l0, l1, lm in zip(dense.model.layers, m.model.layers, masked.model.layers):
        g0, g1 = l0.mlp.gate_up_proj.weight, l1.mlp.gate_up_proj.weight
        fct.test_eq((g1.shape[0], l1.mlp.down_proj.in_features), (128, 64))  # 64 of 128 units, 2 rows each
        js = [int((g0[:128] == g1[i]).all(1).nonzero()[0]) for i in range(64)]
        _same(g1[64:], g0[128:][js])  # the up rows of the same units, in the same order
        _same(l1.mlp.down_proj.weight, l0.mlp.down_proj.weight[:, js])
        a0, a1, hd = l0.self_attn.o_proj.weight, l1.self_attn.o_proj.weight, 16
        heads = sorted({int((a0 == a1[:, [c]]).all(0).nonzero()[0]) // hd for c in range(a1.shape[1])})
        with torch.no_grad():  # the masked model: removed units' down columns and removed heads' o columns zeroed
            lm.mlp.down_proj.weight[:, [j for j in range(128) if j not in js]] = 0
            for hh in range(4):
                if hh not in heads: lm.self_attn.o_proj.weight[:, hh * hd:(hh + 1) * hd] = 0
    with torch.no_grad():
        fct.test_close(m(input_ids=x, attention_mask=mask).logits, masked(input_ids=x, attention_mask=mask).logits,
                       eps=1e-5)
    gen = dict(attention_mask=mask[:, :4], max_new_tokens=4, do_sample=False)
    fct.test_eq(m.generate(x[:, :4], **gen), masked.generate(x[:, :4], **gen))
    fct.test_eq(hf_config_after_prune(m).intermediate_size, 64)


# ---------------------------------------------------------------- fastai: SparsifyCallback, then compact

class DigitsGLU(nn.Module):
    "Flattened digits -> Linear -> SwiGLU with one fused Linear (chunk) -> residual -> classes"
    def __init__(self, d=32, I=32):
        super().__init__()
        self.inp, self.up, self.down, self.head = nn.Linear(64, d), nn.Linear(d, 2 * I), nn.Linear(I, d), \
            nn.Linear(d, 10)
    def forward(self, x):
        x = self.inp(x)
        g, u = self.up(x).chunk(2, -1)
        return self.head(x + self.down(F.silu(g) * u))


def test_sparsify_callback_zeroes_whole_units_compact_removes_what_prune_would():
    "SparsifyCallback('filter', coupled=True) zeroes rows j and I + j together; compact keeps what prune would"
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import digits_dls
    torch.manual_seed(0)
    dls = digits_dls(bs=64)
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', coupled=True)
    learn = Learner(dls, DigitsGLU(), loss_func=nn.CrossEntropyLoss(), cbs=cb)
    learn.fit(1, 1e-2)
    m = learn.model.eval()
    dead = (m.up.weight == 0).all(1)
    _same(dead[:32], dead[32:])  # whole units: the gate row and the up row of each
    fct.test_eq(int(dead[:32].sum()), 16)
    x = dls.valid.one_batch()[0][:16]
    twin = copy.deepcopy(m)
    with torch.no_grad(): ref = m(x)
    Pruner(learn).compact()
    fct.test_eq((m.up.out_features, m.down.in_features), (32, 16))
    with torch.no_grad(): fct.test_close(m(x), ref, eps=1e-4)
    Pruner(twin, x).prune(0.5)  # magnitude: the zeroed units (and residual channels) score lowest
    for a, b in zip(m.state_dict().values(), twin.state_dict().values()): _same(a, b)


class SizedElsewhere(nn.Module):
    "A split whose sizes come from another tensor (`x.shape[-1]`), or a chunk count computed in the forward"
    def __init__(self, d=16, count=False):
        super().__init__()
        self.count = count
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.stem, self.head = nn.Conv1d(5, 12, 1), nn.Conv1d(12, 5, 1)  # an independent group
    def forward(self, x):
        h = self.up(x)
        g, u = h.chunk(h.shape[-1] // x.shape[-1], -1) if self.count else h.split(x.shape[-1], dim=-1)
        return x + self.down(F.silu(g) * u) + self.head(F.relu(self.stem(x)))


@pytest.mark.parametrize('count', [False, True])
def test_sizes_from_another_tensor_stay_pinned_and_the_rest_prunes(count):
    "R14: sizes read from another tensor's shape were tied, the cut left them behind and the whole prune was refused"
    torch.manual_seed(0)
    m, x = SizedElsewhere(count=count).eval(), torch.randn(3, 5, 16)
    Pruner(m, x).prune(0.5)
    fct.test_eq((m.stem.out_channels, m.up.out_features), (6, 32))


@pytest.mark.parametrize('pieces,ratio,round_to', [(2, 0.4, 8), (2, 0.3, 8), (3, 0.4, 8), (3, 0.4, 4)])
def test_round_to_rounds_the_units_kept(pieces, ratio, round_to):
    "R14: round_to rounded the fused layer's rows, so the next layer's width (the hidden units) missed the multiple"
    class Multi(nn.Module):
        def __init__(self, d=16, I=40):
            super().__init__()
            self.up, self.down = nn.Linear(d, pieces * I), nn.Linear(I, d)
        def forward(self, x):
            ps = self.up(x).chunk(pieces, -1)
            y = ps[0]
            for p in ps[1:]: y = y * p
            return x + self.down(y)
    torch.manual_seed(0)
    m = Multi().eval()
    Pruner(m, torch.randn(3, 16)).prune(ratio, round_to=round_to)
    k = m.down.in_features
    fct.test_eq((k % round_to, m.up.out_features), (0, pieces * k))
    assert k < 40, k
