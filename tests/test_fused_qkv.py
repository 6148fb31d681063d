"""Fused q/k/v projections (timm's `qkv`, nanoGPT's `c_attn`, Phi-3's `qkv_proj`) named with
`AttentionHeads(..., qkv=...)`: whole heads (k/v groups) prune from the three row segments q | k | v, verified;
training-time coupled filter masks follow the same units"""
import copy
import pytest, torch
import fastcore.test as fct
import torch.nn as nn, torch.nn.functional as F
from torch import Tensor
from fasterprune.graph import AttentionHeads, ChannelGraph, _WrittenHeads
from fasterprune.pruner import Pruner, SurgeryError, relative_error, save_pruned, load_pruned


class TimmAttention(nn.Module):
    "timm's Attention: one `qkv` Linear, `reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`, `unbind(0)` (or indexing)"
    def __init__(self, d=32, h=4, form='unbind', bias=True):
        super().__init__()
        self.num_heads, self.head_dim, self.form = h, d // h, form
        self.attn_dim = h * self.head_dim
        self.qkv, self.proj = nn.Linear(d, 3 * self.attn_dim, bias=bias), nn.Linear(self.attn_dim, d)
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.form == 'unbind' else (qkv[0], qkv[1], qkv[2])
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, self.attn_dim))

class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: `c_attn(x).split(self.n_embd, dim=2)`, `.view(B, T, n_head, C // n_head)`.
    `verbatim`: C is the input's width (`B, T, C = x.size()`), as nanoGPT writes it; else C is `self.n_embd`"""
    def __init__(self, n_embd=32, n_head=4, bias=True, verbatim=False):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd, bias=bias), nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd, self.verbatim = n_head, n_embd, verbatim
    def forward(self, x):
        B, T, C = x.size()
        if not self.verbatim: C = self.n_embd  # the attention width: follows the heads (width='n_embd')
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

class Phi3Attention(nn.Module):
    "Phi-3: one `qkv_proj` of (H + 2 H_kv) · D rows, `split([H*D, Hkv*D, Hkv*D], dim=-1)` (or slices), shared k/v"
    def __init__(self, d=32, h=8, h_kv=4, form='split', bias=True):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim, self.form = h, h_kv, d // h, form
        self.qkv_proj = nn.Linear(d, (h + 2 * h_kv) * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)
    def forward(self, x):
        B, T, _ = x.shape
        qkv, hd = self.qkv_proj(x), self.head_dim
        Q, K = self.num_heads * hd, self.num_key_value_heads * hd
        if self.form == 'split': q, k, v = qkv.split([Q, K, K], dim=-1)
        else: q, k, v = qkv[..., :Q], qkv[..., Q:Q + K], qkv[..., Q + K:]
        q = q.view(B, T, -1, hd).transpose(1, 2)
        k, v = (t.view(B, T, self.num_key_value_heads, hd).transpose(1, 2) for t in (k, v))
        n_rep = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

ATTN = {'timm': TimmAttention, 'timm_index': lambda: TimmAttention(form='index'), 'nanogpt': NanoGPTAttention,
        'phi3': Phi3Attention, 'phi3_slice': lambda: Phi3Attention(form='slice')}
SPEC = {'timm': AttentionHeads('num_heads', qkv='qkv', o='proj', head_dim='head_dim', width='attn_dim'),
        'nanogpt': AttentionHeads('n_head', qkv='c_attn', o='c_proj', width='n_embd'),
        'phi3': AttentionHeads('num_heads', qkv='qkv_proj', num_kv_heads='num_key_value_heads', head_dim='head_dim')}
def _spec(form): return SPEC[form.split('_')[0]]

class Block(nn.Module):
    def __init__(self, attn, d=32):
        super().__init__()
        self.n1, self.attn, self.n2 = nn.LayerNorm(d), attn, nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)
    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))

class Net(nn.Module):
    "Linear embedding, two blocks, mean over tokens, classifier"
    def __init__(self, form='timm', d=32):
        super().__init__()
        self.emb, self.head = nn.Linear(5, d), nn.Linear(d, 3)
        self.blocks = nn.ModuleList(Block(ATTN[form]()) for _ in range(2))
    def forward(self, x):
        x = self.emb(x)
        for b in self.blocks: x = b(x)
        return self.head(x.mean(1))

HEADS = lambda form: {'blocks.*.attn': _spec(form)}

def _layout(a) -> tuple[nn.Linear, nn.Linear, int, int, int]:
    "(fused projection, o, num_heads, num_kv_heads, head_dim) of an attention above"
    if isinstance(a, TimmAttention): return a.qkv, a.proj, a.num_heads, a.num_heads, a.head_dim
    if isinstance(a, NanoGPTAttention): return a.c_attn, a.c_proj, a.n_head, a.n_head, a.n_embd // a.n_head
    return a.qkv_proj, a.o_proj, a.num_heads, a.num_key_value_heads, a.head_dim

def _unit_rows(a, units:list) -> tuple[Tensor, Tensor]:
    "(rows of the fused projection, columns of o) of the k/v groups `units`, written out segment by segment"
    _, _, H, Hkv, hd = _layout(a)
    r = H // Hkv
    q = [i for u in units for i in range(u * r * hd, (u + 1) * r * hd)]
    kv = [i for u in units for i in range(u * hd, (u + 1) * hd)]
    rows = q + [H * hd + i for i in kv] + [(H + Hkv) * hd + i for i in kv]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(q, dtype=torch.long)


def _scale_units(a, scale:dict):
    "Multiply every weight of unit u (its q, k, v rows, biases and o columns) by scale[u]: a known ranking (0: mask)"
    qkv, o, *_ = _layout(a)
    with torch.no_grad():
        for u, s in scale.items():
            rows, cols = _unit_rows(a, [u])
            qkv.weight[rows] *= s
            if qkv.bias is not None: qkv.bias[rows] *= s
            o.weight[:, cols] *= s

def _state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def _same_state(m, sd): return set(sd) == set(m.state_dict()) and all(torch.equal(v, m.state_dict()[k])
                                                                      for k, v in sd.items())

FORMS = ['timm', 'timm_index', 'nanogpt', 'phi3', 'phi3_slice']


@pytest.mark.parametrize('form', FORMS)
def test_fused_forms_prune_whole_heads_exactly(form, tmp_path):
    "Each fused form: the 2 weakest of 4 units go from q, k and v rows (and biases), o columns; counts follow; exact"
    torch.manual_seed(0)
    m, x = Net(form).eval(), torch.randn(2, 8, 5)
    weak = {0: [1, 3], 1: [0, 2]}  # block -> its units that score lowest
    for i, b in enumerate(m.blocks): _scale_units(b.attn, {weak[i][0]: 0.1, weak[i][1]: 0.2})
    masked = copy.deepcopy(m)
    for i, b in enumerate(masked.blocks): _scale_units(b.attn, {u: 0. for u in weak[i]})
    w0 = [(b.attn, {n: p.detach().clone() for n, p in b.attn.named_parameters()}) for b in m.blocks]
    keep = [[u for u in range(4) if u not in weak[i]] for i in range(2)]
    kept = [_unit_rows(a, k) for (a, _), k in zip(w0, keep)]  # rows and columns, in the layout before the cut
    pr = Pruner(m, x, heads=HEADS(form))
    pr.prune({'blocks.*.attn': 0.5})  # the heads only: the masked model is the reference
    for (a, w), (rows, cols) in zip(w0, kept):
        qkv, o, H, Hkv, hd = _layout(a)
        qn, on = [n for n, mod in a.named_modules() if mod is qkv][0], [n for n, mod in a.named_modules() if mod is o][0]
        fct.test_eq((H, Hkv, hd), (4, 2, 4) if form.startswith('phi3') else (2, 2, 8))
        fct.test_eq((qkv.out_features, qkv.weight.shape[0], qkv.bias.shape[0], o.in_features, o.weight.shape[1]),
                    (len(rows),) * 3 + (len(cols),) * 2)
        assert torch.equal(qkv.weight, w[f'{qn}.weight'][rows])  # q | k | v of the kept units, in order
        assert torch.equal(qkv.bias, w[f'{qn}.bias'][rows])
        assert torch.equal(o.weight, w[f'{on}.weight'][:, cols])
    if form.startswith('timm'): fct.test_eq([b.attn.attn_dim for b in m.blocks], [16, 16])
    if form == 'nanogpt': fct.test_eq([b.attn.n_embd for b in m.blocks], [16, 16])
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'] and h['heads_removed'] == (8 if form.startswith('phi3') else 4), h
    x2 = torch.randn(3, 6, 5)  # another batch and length: equal to the masked model
    with torch.no_grad(): assert relative_error(masked(x2), m(x2)) <= 1e-5
    save_pruned(m, tmp_path / 'fused.pt')
    fresh = load_pruned(Net(form).eval(), tmp_path / 'fused.pt')
    fct.test_eq([_layout(b.attn)[2:] for b in fresh.blocks], [_layout(b.attn)[2:] for b in m.blocks])
    with torch.no_grad(): assert torch.equal(fresh(x2), m(x2))


@pytest.mark.parametrize('form', ['timm', 'nanogpt', 'phi3'])
def test_fused_heads_and_mlp_prune_together(form):
    "prune(0.5) with heads=: half the units and half the MLP hidden units go, verified; without heads= qkv stays"
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5)
    plain = Net(form).eval()
    n0 = sum(p.numel() for p in plain.parameters())
    Pruner(plain, x).prune(0.5)
    fct.test_eq([_layout(b.attn)[0].out_features for b in plain.blocks], [_layout(b.attn)[0].out_features
                                                                          for b in Net(form).blocks])  # not named: dense
    m = Net(form).eval()
    pr = Pruner(m, x, heads=HEADS(form))
    pr.prune(0.5)
    w0 = 64 if form == 'phi3' else 96  # (8 + 2·4) heads of 4 rows; 3 · 4 heads of 8
    fct.test_eq([(_layout(b.attn)[0].out_features, b.fc1.out_features) for b in m.blocks], [(w0 // 2, 32)] * 2)
    assert pr.history[-1]['rel_error'] <= 1e-5
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in plain.parameters()) < n0


def _timm_learner():
    "A fastai Learner on a timm-style ViT and four random batches"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    torch.manual_seed(0)
    m = Net('timm')
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    dls = DataLoaders(DataLoader(batches, bs=None), DataLoader(batches[:1], bs=None))
    learn = Learner(dls, m, loss_func=F.cross_entropy)
    return learn, m


def test_fit_after_surgery_and_prune_again():
    "A fastai Learner trains the pruned timm-style model (optimizer state follows the cut); a second prune works"
    learn, m = _timm_learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    pr = Pruner(learn, heads=HEADS('timm'))
    pr.prune(0.5)
    fct.test_eq([b.attn.num_heads for b in m.blocks], [2, 2])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    pr.prune(0.5)
    fct.test_eq([(b.attn.num_heads, b.attn.qkv.out_features, b.attn.attn_dim) for b in m.blocks], [(1, 24, 8)] * 2)


def test_verbatim_nanogpt_forward_is_refused_with_a_hint():
    "nanoGPT as written reads the head width from its input (`C // n_head`): the cut cannot run; restored, hint given"
    torch.manual_seed(0)
    class GPT(Net):
        def __init__(self):
            super().__init__('nanogpt')
            for b in self.blocks: b.attn.verbatim = True
    m, x = GPT().eval(), torch.randn(2, 8, 5)
    sd = _state(m)
    with pytest.raises(SurgeryError, match=r"no longer runs.*n_embd // self.n_head"):
        Pruner(m, x, heads=HEADS('nanogpt')).prune({'blocks.*.attn': 0.5})
    # (prune(0.5) also halves the residual width: then C // n_head is the head width again, and it verifies)
    assert _same_state(m, sd) and [(b.attn.n_head, b.attn.n_embd) for b in m.blocks] == [(4, 32), (4, 32)]
    m = Net('nanogpt').eval()  # C = self.n_embd, but n_embd not named: the split still cuts 32 wide
    sd = _state(m)
    with pytest.raises(SurgeryError, match=r"NanoGPTAttention.n_embd = 32 kept the attention width.*width='<attr>'"):
        Pruner(m, x, heads={'blocks.*.attn': AttentionHeads('n_head', qkv='c_attn', o='c_proj')}).prune(0.5)
    assert _same_state(m, sd)


def test_planted_wrong_segment_is_caught(monkeypatch):
    "k rows taken from the v segment (a wrong surgery): verification refuses, the model is restored"
    torch.manual_seed(0)
    m, x = Net('timm').eval(), torch.randn(2, 8, 5)
    sd = _state(m)
    right = _WrittenHeads.unit_rows
    def wrong(self, units):
        rows = right(self, units)
        n = self.names[0][0]
        r, q = rows[n], self.n_rep * self.head_dim
        rows[n] = torch.cat([r[:, :q], r[:, q + self.head_dim:], r[:, q + self.head_dim:]], 1)  # k := v rows
        return rows
    monkeypatch.setattr(_WrittenHeads, 'unit_rows', wrong)
    with pytest.raises(SurgeryError, match="differs from the masked model|no longer runs"):
        Pruner(m, x, heads=HEADS('timm')).prune({'blocks.*.attn': 0.5})
    assert _same_state(m, sd) and [b.attn.num_heads for b in m.blocks] == [4, 4]
    assert [b.attn.qkv.out_features for b in m.blocks] == [96, 96]


class KVAttention(nn.Module):
    "Cross-attention style: q separate, one `kv` Linear of 2 · H · D rows (not q | k | v)"
    def __init__(self, d=32, h=4):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize('spec, err, msg', [
    (dict(num_heads='heads', qkv='qkv', o='proj'), ValueError, "num_heads='heads' names TimmAttention.heads = None"),
    (dict(qkv='qkv_proj', o='proj'), ValueError, "qkv='qkv_proj'"),
    (dict(qkv='qkv', o='o_proj'), ValueError, "o='o_proj'"),
    (dict(qkv='qkv', o='proj', width='head_dim'), ValueError, "width='head_dim' is 8, not num_heads · head_dim"),
    (dict(qkv='qkv', o='proj', num_heads='head_dim', head_dim='head_dim'), ValueError, "are not 3 × 8 heads of 8"),
    (dict(qkv='qkv', o='proj', num_heads='head_dim', head_dim='num_heads', width='attn_dim'), SurgeryError,
     "the model was restored"),  # 8 heads of 4: the widths fit, the forward does not: verification refuses
])
def test_bad_fused_specs_clear_errors_model_untouched(spec, err, msg):
    torch.manual_seed(0)
    m, x = Net('timm').eval(), torch.randn(2, 8, 5)
    sd = _state(m)
    with pytest.raises(err, match=msg.replace('|', r'\|').replace('(', r'\(')):
        Pruner(m, x, heads={'blocks.0.attn': AttentionHeads(**spec)}).prune(0.5)
    assert _same_state(m, sd)


def test_qkv_with_q_k_v_and_width_misfits_are_refused():
    "qkv= with q=/k=/v= is refused when the spec is made; a qkv whose width is not 3 heads' rows, and a fused GQA "
    "projection named without num_kv_heads, are refused before anything changes"
    with pytest.raises(ValueError, match="do not also name q='q_proj'"): AttentionHeads(qkv='qkv', q='q_proj')
    with pytest.raises(ValueError, match="k='key'"): AttentionHeads('num_heads', None, 'key', qkv='qkv')
    torch.manual_seed(0)
    m, x = nn.Sequential(KVAttention(), nn.Linear(32, 3)).eval(), torch.randn(2, 8, 32)
    sd = _state(m)
    with pytest.raises(ValueError, match=r"the fused 'kv' width 64 and o's input 32 are not 3 × 4 heads of 8"):
        Pruner(m, x, heads={'0': AttentionHeads(qkv='kv', o='proj')}).prune(0.5)
    assert _same_state(m, sd)
    g = Net('phi3').eval()
    sd = _state(g)
    with pytest.raises(ValueError, match="num_kv_heads="):
        Pruner(g, torch.randn(2, 8, 5), heads={'blocks.*.attn': AttentionHeads(qkv='qkv_proj')}).prune(0.5)
    assert _same_state(g, sd)


def test_separate_and_fused_specs_agree():
    "Old calls keep working: AttentionHeads() defaults to q_proj, k_proj, v_proj; the unit rows of a fused block"
    s = AttentionHeads()
    fct.test_eq((s.q, s.k, s.v, s.o, s.qkv, s.parts), ('q_proj', 'k_proj', 'v_proj', 'o_proj', None,
                                                      ('q_proj', 'k_proj', 'v_proj', 'o_proj')))
    m, x = Net('phi3').eval(), torch.randn(1, 8, 5)
    w = ChannelGraph(m, x, heads=HEADS('phi3')).heads['blocks.0.attn']
    fct.test_eq((w.num_heads, w.num_kv_heads, w.n_rep, w.head_dim, w.n_units, w.offsets()), (8, 4, 2, 4, 4, (0, 32, 48)))
    rows = w.unit_rows(torch.tensor([1]))['blocks.0.attn.qkv_proj'][0]  # k/v group 1: query heads 2, 3; k/v head 1
    fct.test_eq(rows.tolist(), list(range(8, 16)) + list(range(36, 40)) + list(range(52, 56)))
    fct.test_eq(w.o_cols(torch.tensor([1])).tolist(), list(range(8, 16)))


def test_sparsifier_filter_masks_follow_fused_units():
    "Sparsifier.couple(heads=) zeroes whole units in the three segments; compact keeps exactly what prune keeps"
    "(the fused projections only: the MLP and residual widths would be ranked differently by the two)"
    from fasterprune.sparsifier import Sparsifier
    for form in ('timm', 'phi3'):
        torch.manual_seed(0)
        m, x = Net(form).eval(), torch.randn(2, 8, 5)
        weak = ([1, 2], [0, 3])
        for b, (u, v) in zip(m.blocks, weak): _scale_units(b.attn, {u: 0.1, v: 0.3})
        twin = copy.deepcopy(m)
        Sparsifier(m, 'filter', 'local', layers='blocks.*.attn.qkv*').couple(x, heads=HEADS(form)).sparsify(0.5)
        for b, drop in zip(m.blocks, weak):
            qkv = _layout(b.attn)[0]
            dead = (qkv.weight == 0).all(1)
            rows, _ = _unit_rows(b.attn, drop)
            fct.test_eq(dead.nonzero().squeeze(1).tolist(), sorted(rows.tolist()))  # those rows, nothing else
            fct.test_eq(qkv.bias[rows].abs().sum().item(), 0.)
        Pruner(m, x, heads=HEADS(form)).compact()
        Pruner(twin, x, heads=HEADS(form)).prune({'blocks.*.attn': 0.5})
        for b, t in zip(m.blocks, twin.blocks):
            fct.test_eq(_layout(b.attn)[2:], _layout(t.attn)[2:])
            for p, q in zip(_layout(b.attn)[:2], _layout(t.attn)[:2]):  # the same kept rows: equal weights
                assert torch.equal(p.weight, q.weight) and (p.bias is None or torch.equal(p.bias, q.bias))


def test_callback_fused_heads_then_compact():
    "SparsifyCallback(0.5, 'filter', heads=) on a timm-style ViT during a fit; Pruner(learn).compact() removes them"
    from fasterprune.callback import SparsifyCallback
    learn, m = _timm_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', heads=HEADS('timm')))
    for b in m.blocks:
        dead = (b.attn.qkv.weight == 0).all(1).reshape(3, 4, 8).all(2)  # (segment, head)
        fct.test_eq(dead[0], dead[1])
        fct.test_eq(dead[0], dead[2])
        fct.test_eq(int(dead[0].sum()), 2)
    x = learn.dls.train.one_batch()[0]
    with torch.no_grad(): ref = m.eval()(x)
    Pruner(learn).compact()  # heads= from the callback
    fct.test_eq([(b.attn.num_heads, b.attn.attn_dim, b.attn.qkv.out_features) for b in m.blocks], [(2, 16, 48)] * 2)
    with torch.no_grad(): assert relative_error(ref, m(x)) <= 1e-5


def test_fused_mqa_prunes_query_heads_keeps_the_shared_kv_rows():
    "One k/v head (Falcon-style fused multi-query): query heads go; the shared k and v rows of the projection stay"
    torch.manual_seed(0)
    class MQANet(Net):
        def __init__(self):
            super().__init__('phi3')
            for b in self.blocks: b.attn = Phi3Attention(h=8, h_kv=1)
    m, x = MQANet().eval(), torch.randn(2, 8, 5)
    a = m.blocks[0].attn
    w0 = a.qkv_proj.weight.detach().clone()
    pr = Pruner(m, x, heads=HEADS('phi3'))
    pr.prune({'blocks.*.attn': 0.5})
    fct.test_eq((a.num_heads, a.num_key_value_heads, a.qkv_proj.out_features, a.o_proj.in_features), (4, 1, 24, 16))
    assert torch.equal(a.qkv_proj.weight[16:], w0[32:])  # k and v of the one k/v head, whole
    assert pr.history[-1]['rel_error'] <= 1e-5
