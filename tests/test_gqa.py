"""Grouped-query attention and a Llama-style model in the Pruner: whole k/v groups (one k/v head with its query heads)
prune, verified, for the three ways a forward shares k/v heads; RMSNorm, rotary embedding and SwiGLU trace around them"""
import copy
import pytest, torch
import fastcore.test as fct
import torch.nn as nn, torch.nn.functional as F
from fasterprune.graph import AttentionHeads, ChannelGraph, channel_groups, _WrittenHeads
from fasterprune.pruner import Pruner, SurgeryError, relative_error, save_pruned, load_pruned


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)

def repeat_kv(x, n_rep:int):
    "Llama's: (B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd), k/v head j serving query heads j*n_rep ... (j+1)*n_rep - 1"
    b, n_kv, s, d = x.shape
    if n_rep == 1: return x
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)

class RMSNorm(nn.Module):
    "Hand-written: x * rsqrt(mean(x²) + eps) * w"
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))
    def forward(self, x): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

class GQAttention(nn.Module):
    """Llama-style attention with `num_kv_heads` k/v heads shared by `num_heads` query heads, rotary embedding on q, k.
    `form`: 'interleave' (`k.repeat_interleave(n_rep, dim=1)`), 'repeat_kv' (Llama's expand + reshape), 'sdpa'
    (`scaled_dot_product_attention(..., enable_gqa=True)`), 'tile' (`k.repeat(1, n_rep, 1, 1)`: query head h uses k/v
    head h mod num_kv_heads, which is not a group of consecutive heads)"""
    def __init__(self, d=64, n_heads=8, n_kv_heads=4, form='interleave', max_T=32, bias=False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.form = n_heads, n_kv_heads, d // n_heads, form
        self.n_rep = n_heads // n_kv_heads
        hd = self.head_dim
        self.q_proj, self.o_proj = nn.Linear(d, n_heads * hd, bias=bias), nn.Linear(n_heads * hd, d, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(d, n_kv_heads * hd, bias=bias) for _ in range(2))
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(max_T).float(), inv)
        self.register_buffer('cos', torch.cat([f, f], -1).cos(), persistent=False)
        self.register_buffer('sin', torch.cat([f, f], -1).sin(), persistent=False)
    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.form == 'sdpa': o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.form == 'interleave': k, v = (t.repeat_interleave(self.n_rep, dim=1) for t in (k, v))
            elif self.form == 'repeat_kv': k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            elif self.form == 'tile': k, v = (t.repeat(1, self.n_rep, 1, 1) for t in (k, v))
            else: raise ValueError(self.form)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

class SwiGLU(nn.Module):
    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
    def forward(self, x): return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, d, n_heads, n_kv_heads, hidden, form, norm, max_T):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norm(d), norm(d)
        self.self_attn, self.mlp = GQAttention(d, n_heads, n_kv_heads, form, max_T), SwiGLU(d, hidden)
    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))

class Llama(nn.Module):
    "A small Llama: embedding, blocks of (RMSNorm, rotary GQA, RMSNorm, SwiGLU) with residuals, final norm, lm head"
    def __init__(self, vocab=100, d=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden=128, form='repeat_kv', tied=True,
                 norm='torch', max_T=32):
        super().__init__()
        norm = nn.RMSNorm if norm == 'torch' else RMSNorm
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, n_heads, n_kv_heads, hidden, form, norm, max_T) for _ in range(n_layers))
        self.norm, self.lm_head = norm(d), nn.Linear(d, vocab, bias=False)
        if tied: self.lm_head.weight = self.embed_tokens.weight
    def forward(self, tok):
        x = self.embed_tokens(tok)
        for l in self.layers: x = l(x)
        return self.lm_head(self.norm(x))

GQA_HEADS = AttentionHeads(num_kv_heads='num_kv_heads')  # q_proj, k_proj, v_proj, o_proj, num_heads: the defaults
LLAMA_HEADS = {'layers.*.self_attn': GQA_HEADS}

class Net(nn.Module):
    "One GQA block with a residual and a classifier"
    def __init__(self, form='interleave', **kw):
        super().__init__()
        self.attn, self.fc = GQAttention(form=form, **kw), nn.Linear(64, 5)
    def forward(self, x): return self.fc(x + self.attn(x))

def _weaken_groups(a:GQAttention, scale:dict):
    "Scale every weight of k/v group g (its q, k, v rows and o columns) by scale[g]: a known ranking of the groups"
    hd, r = a.head_dim, a.n_rep
    with torch.no_grad():
        for g, s in scale.items():
            a.q_proj.weight[g * r * hd:(g + 1) * r * hd] *= s
            a.o_proj.weight[:, g * r * hd:(g + 1) * r * hd] *= s
            for p in (a.k_proj, a.v_proj): p.weight[g * hd:(g + 1) * hd] *= s

def _masked(a:GQAttention, drop:list):
    "Zero the rows and columns of the k/v groups `drop` (what the pruned model must equal)"
    hd, r = a.head_dim, a.n_rep
    with torch.no_grad():
        for g in drop:
            a.q_proj.weight[g * r * hd:(g + 1) * r * hd] = 0
            a.o_proj.weight[:, g * r * hd:(g + 1) * r * hd] = 0
            for p in (a.k_proj, a.v_proj): p.weight[g * hd:(g + 1) * hd] = 0

def _rows(w, groups, size): return torch.cat([w[g * size:(g + 1) * size] for g in groups])

def _state(m): return {k: v.clone() for k, v in m.state_dict().items()}

def _same_state(m, sd): return set(sd) == set(m.state_dict()) and all(torch.equal(v, m.state_dict()[k])
                                                                      for k, v in sd.items())


@pytest.mark.parametrize('form', ['interleave', 'repeat_kv', 'sdpa'])
def test_gqa_forms_prune_whole_kv_groups(form, tmp_path):
    "Each way of sharing k/v heads: prune(0.5) removes the 2 weakest of 4 k/v groups with their query heads, verified"
    torch.manual_seed(0)
    m, x = Net(form, bias=True).eval(), torch.randn(2, 16, 64)
    _weaken_groups(m.attn, {1: 0.1, 3: 0.2})  # groups 1 and 3 score lowest
    masked = copy.deepcopy(m)
    _masked(masked.attn, [1, 3])
    a, w0 = m.attn, {n: p.detach().clone() for n, p in m.attn.named_parameters()}
    pr = Pruner(m, x, heads={'attn': GQA_HEADS})
    pr.prune(0.5)
    fct.test_eq((a.num_heads, a.num_kv_heads, a.n_rep, a.head_dim), (4, 2, 2, 8))
    fct.test_eq((a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features),
                (32, 16, 16, 32))
    assert torch.equal(a.q_proj.weight, _rows(w0['q_proj.weight'], [0, 2], 16))  # the kept groups' query heads
    assert torch.equal(a.q_proj.bias, _rows(w0['q_proj.bias'], [0, 2], 16))
    assert torch.equal(a.k_proj.weight, _rows(w0['k_proj.weight'], [0, 2], 8))
    assert torch.equal(a.v_proj.bias, _rows(w0['v_proj.bias'], [0, 2], 8))
    assert torch.equal(a.o_proj.weight, _rows(w0['o_proj.weight'].T, [0, 2], 16).T)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'], h
    x2 = torch.randn(3, 11, 64)  # another batch and length: the pruned forward equals the masked model's
    with torch.no_grad(): assert relative_error(masked(x2), m(x2)) <= 1e-5
    save_pruned(m, tmp_path / 'gqa.pt')
    fresh = load_pruned(Net(form, bias=True).eval(), tmp_path / 'gqa.pt')
    fct.test_eq((fresh.attn.num_heads, fresh.attn.num_kv_heads), (4, 2))
    with torch.no_grad(): assert torch.equal(fresh(x2), m(x2))


def test_gqa_prunes_again_and_compacts_silent_group():
    "A second prune starts from the cut block; a k/v group whose value rows are zero is removed by compact"
    torch.manual_seed(0)
    m, x = Net('repeat_kv', n_kv_heads=4).eval(), torch.randn(2, 16, 64)
    pr = Pruner(m, x, heads={'attn': GQA_HEADS})
    pr.prune(0.25)
    fct.test_eq((m.attn.num_heads, m.attn.num_kv_heads), (6, 3))
    with torch.no_grad(): m.attn.v_proj.weight[8:16] = 0  # the second kept group is silent
    with torch.no_grad(): ref = m(x)
    pr.compact()
    fct.test_eq((m.attn.num_heads, m.attn.num_kv_heads, m.attn.q_proj.out_features), (4, 2, 32))
    with torch.no_grad(): assert relative_error(ref, m(x)) <= 1e-5


def test_llama_prunes_heads_and_swiglu_units(tmp_path):
    "A 2-block Llama (nn.RMSNorm, rotary, GQA 8/2, SwiGLU, tied lm head): k/v groups and hidden units go, verified"
    torch.manual_seed(0)
    m, tok = Llama().eval(), torch.randint(0, 100, (2, 16))
    n0 = sum(p.numel() for p in m.parameters())
    groups = [g for g in ChannelGraph(m, tok, heads=LLAMA_HEADS).groups() if not g.pinned]
    fct.test_eq(sorted(g.width for g in groups), [2, 2, 128, 128])  # 2 k/v groups per block; 128 SwiGLU units
    pr = Pruner(m, tok, heads=LLAMA_HEADS)
    pr.prune(0.5)
    for l in m.layers:
        a = l.self_attn
        fct.test_eq((a.num_heads, a.num_kv_heads, a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features),
                    (4, 1, 32, 8, 32))
        fct.test_eq((l.mlp.gate_proj.out_features, l.mlp.up_proj.out_features, l.mlp.down_proj.in_features),
                    (64, 64, 64))
    assert m.lm_head.weight is m.embed_tokens.weight and m.embed_tokens.embedding_dim == 64  # the stream stays
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol'] and h['params_after'] < n0
    with torch.no_grad(): m(torch.randint(0, 100, (3, 20)))  # another length runs through the fewer heads
    save_pruned(m, tmp_path / 'llama.pt')
    fresh = load_pruned(Llama().eval(), tmp_path / 'llama.pt')
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    fct.test_eq([(l.self_attn.num_heads, l.self_attn.num_kv_heads) for l in fresh.layers], [(4, 1), (4, 1)])
    with torch.no_grad(): assert torch.equal(fresh(tok), m(tok))


def test_llama_hand_written_rmsnorm_untied_global():
    "Hand-written RMSNorm, untied head, the 'interleave' form, global ranking: still verified, head counts consistent"
    torch.manual_seed(0)
    m, tok = Llama(form='interleave', tied=False, norm='hand', n_kv_heads=4).eval(), torch.randint(0, 100, (2, 16))
    pr = Pruner(m, tok, heads=LLAMA_HEADS)
    pr.prune(0.5, context='global')
    for l in m.layers:
        a = l.self_attn
        fct.test_eq((a.num_heads, a.q_proj.out_features, a.k_proj.out_features), (2 * a.num_kv_heads,
                    16 * a.num_kv_heads, 8 * a.num_kv_heads))
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_llama_without_heads_keeps_attention_prunes_mlp():
    "Without heads= the GQA projections are pinned (split into heads), the SwiGLU units still prune"
    torch.manual_seed(0)
    m, tok = Llama(), torch.randint(0, 100, (2, 16))
    Pruner(m, tok).prune(0.5)
    a = m.layers[0].self_attn
    fct.test_eq((a.num_heads, a.num_kv_heads, a.q_proj.out_features, a.k_proj.out_features), (8, 2, 64, 16))
    fct.test_eq(m.layers[0].mlp.gate_proj.out_features, 64)


def test_planted_wrong_group_surgery_is_caught(monkeypatch):
    "q rows taken from the next k/v group (a wrong surgery): verification refuses, the model is restored"
    torch.manual_seed(0)
    m, x = Net('repeat_kv').eval(), torch.randn(2, 16, 64)
    sd = _state(m)
    right = _WrittenHeads.unit_rows
    def wrong(self, units):
        rows = right(self, units)
        q = self.names[0][0]
        rows[q] = (rows[q] + self.n_rep * self.head_dim) % self.qkv[0].out_features  # the next group's query heads
        return rows
    monkeypatch.setattr(_WrittenHeads, 'unit_rows', wrong)
    with pytest.raises(SurgeryError, match="differs from the masked model"):
        Pruner(m, x, heads={'attn': GQA_HEADS}).prune(0.5)
    fct.test_eq((m.attn.num_heads, m.attn.num_kv_heads, m.attn.q_proj.out_features), (8, 4, 64))
    assert _same_state(m, sd)


def test_gqa_other_sharing_rule_is_refused_by_verification():
    "`k.repeat(1, n_rep, 1, 1)` (head h uses k/v head h mod n_kv): groups are not consecutive heads; SurgeryError"
    torch.manual_seed(0)
    m, x = Net('tile').eval(), torch.randn(2, 16, 64)
    sd = _state(m)
    with pytest.raises(SurgeryError): Pruner(m, x, heads={'attn': GQA_HEADS}).prune(0.5)
    fct.test_eq((m.attn.num_heads, m.attn.num_kv_heads), (8, 4))
    assert _same_state(m, sd)


def test_bad_gqa_specs_clear_errors_model_untouched():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    for spec, err in [(AttentionHeads(), "num_kv_heads"),  # MHA spec on a GQA block: says what to name
                      (AttentionHeads(num_kv_heads='n_rep_missing'), "not a head count"),
                      (AttentionHeads(num_kv_heads='head_dim'), "do not fit"),  # 8 k/v heads of 8 != k's 32 rows
                      (AttentionHeads(num_kv_heads='form'), "not a head count")]:
        m = Net('interleave').eval()
        sd = _state(m)
        with pytest.raises(ValueError, match=err): Pruner(m, x, heads={'attn': spec}).prune(0.5)
        fct.test_eq((m.attn.num_heads, m.attn.num_kv_heads), (8, 4))
        assert _same_state(m, sd)
    with pytest.raises(ValueError, match="matches no module"):  # a pattern whose modules lack the k/v head count
        Pruner(Llama(), torch.randint(0, 100, (2, 8)),
               heads={'layers.*.self_attn': AttentionHeads(num_kv_heads='n_kv')}).prune(0.5)


class HFStyleAttention(nn.Module):
    "Like Hugging Face's LlamaAttention: no head-count attribute; `view(..., -1, head_dim)`, `repeat_kv` by n_rep"
    def __init__(self, d=64, n_heads=8, n_kv_heads=4):
        super().__init__()
        self.head_dim, self.num_key_value_groups = d // n_heads, n_heads // n_kv_heads
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=True), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(d, n_kv_heads * self.head_dim, bias=True) for _ in range(2))
    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(*x.shape[:-1], -1).contiguous())


def test_counts_from_widths_hf_style(tmp_path):
    "num_heads=None, head_dim=: the counts follow the projections' widths (nothing to set), k/v groups prune, verified"
    class HFNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = HFStyleAttention(), nn.Linear(64, 5)
        def forward(self, x): return self.fc(x + self.attn(x))
    torch.manual_seed(0)
    m, x = HFNet().eval(), torch.randn(2, 16, 64)
    spec = {'attn': AttentionHeads(num_heads=None, head_dim='head_dim')}
    g = ChannelGraph(m, x, heads=spec)
    fct.test_eq((g.heads['attn'].num_heads, g.heads['attn'].num_kv_heads, g.heads['attn'].n_rep), (8, 4, 2))
    pr = Pruner(m, x, heads=spec)
    pr.prune(0.5)
    a = m.attn
    fct.test_eq((a.q_proj.out_features, a.q_proj.bias.shape[0], a.k_proj.out_features, a.o_proj.in_features),
                (32, 32, 16, 32))
    fct.test_eq((a.head_dim, a.num_key_value_groups), (8, 2))
    assert pr.history[-1]['rel_error'] <= 1e-5
    save_pruned(m, tmp_path / 'hf.pt')
    fresh = load_pruned(HFNet().eval(), tmp_path / 'hf.pt')
    with torch.no_grad(): assert torch.equal(fresh(x), m(x))
    with pytest.raises(ValueError, match="needs head_dim="):
        Pruner(HFNet(), x, heads={'attn': AttentionHeads(num_heads=None)}).prune(0.5)


def test_transformers_llama_prunes_kv_groups():
    "Hugging Face's LlamaForCausalLM (random weights, GQA 8/2): k/v groups and SwiGLU units go, verified"
    transformers = pytest.importorskip('transformers')
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
        def forward(self, tok): return self.lm(tok, use_cache=False).logits
    m, tok = Logits(lm), torch.randint(0, 100, (2, 16))
    pr = Pruner(m, tok, strict=False,  # the causal mask's position arithmetic (diff, cumsum) is pinned
                heads={'lm.model.layers.*.self_attn': AttentionHeads(num_heads=None, head_dim='head_dim')})
    pr.prune(0.5)
    for l in lm.model.layers:
        fct.test_eq((l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.mlp.gate_proj.out_features),
                    (32, 8, 64))
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_mqa_prunes_query_heads():
    "One k/v head for all query heads (multi-query attention): the query heads are the units, k and v stay"
    torch.manual_seed(0)
    m, x = Net('interleave', n_kv_heads=1).eval(), torch.randn(2, 16, 64)
    a = m.attn
    with torch.no_grad():
        for h, s in ((2, 0.1), (5, 0.2), (6, 0.3), (7, 0.15)):  # the 4 weakest query heads
            a.q_proj.weight[h * 8:(h + 1) * 8] *= s
            a.o_proj.weight[:, h * 8:(h + 1) * 8] *= s
    q0, k0 = a.q_proj.weight.detach().clone(), a.k_proj.weight.detach().clone()
    pr = Pruner(m, x, heads={'attn': AttentionHeads(num_kv_heads='num_kv_heads', n_rep='n_rep')})  # forward reads n_rep
    pr.prune(0.5)
    fct.test_eq((a.num_heads, a.num_kv_heads, a.n_rep, a.q_proj.out_features, a.k_proj.out_features,
                 a.o_proj.in_features), (4, 1, 4, 32, 8, 32))
    assert torch.equal(a.q_proj.weight, _rows(q0, [0, 1, 3, 4], 8)) and torch.equal(a.k_proj.weight, k0)
    assert pr.history[-1]['rel_error'] <= 1e-5
    with torch.no_grad(): a.o_proj.weight[:, 8:16] = 0  # the second kept query head is silent
    pr.compact()
    fct.test_eq((a.num_heads, a.n_rep, a.q_proj.out_features), (3, 3, 24))


def test_mqa_hf_style_n_rep_follows(tmp_path):
    "An HF-style MQA block whose forward reads its stored n_rep: named with n_rep=, it follows; unnamed: refused"
    class HFNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = HFStyleAttention(n_kv_heads=1), nn.Linear(64, 5)
        def forward(self, x): return self.fc(x + self.attn(x))
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    m = HFNet().eval()
    sd = _state(m)
    with pytest.raises(ValueError, match="n_rep='num_key_value_groups'"):  # refused before any change
        Pruner(m, x, heads={'attn': AttentionHeads(num_heads=None, head_dim='head_dim')}).prune(0.5)
    assert _same_state(m, sd) and m.attn.num_key_value_groups == 8
    spec = {'attn': AttentionHeads(num_heads=None, head_dim='head_dim', n_rep='num_key_value_groups')}
    pr = Pruner(m, x, heads=spec)
    pr.prune(0.5)
    fct.test_eq((m.attn.num_key_value_groups, m.attn.q_proj.out_features, m.attn.k_proj.out_features), (4, 32, 8))
    assert pr.history[-1]['rel_error'] <= 1e-5
    save_pruned(m, tmp_path / 'mqa.pt')
    fresh = load_pruned(HFNet().eval(), tmp_path / 'mqa.pt')
    fct.test_eq(fresh.attn.num_key_value_groups, 4)
    with torch.no_grad(): assert torch.equal(fresh(x), m(x))
    with pytest.raises(ValueError, match="n_rep='head_dim' is 8, not 4"):
        Pruner(m, x, heads={'attn': AttentionHeads(num_heads=None, head_dim='head_dim', n_rep='head_dim')}).prune(0.5)


def test_repeat_interleave_passes_other_dims_pins_channels():
    "repeat_interleave was an unknown op: along another dimension the channels pass, along the channels they are pinned"
    class Rep(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim, self.c1, self.c2 = dim, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16 if dim == 1 else 8, 4, 1)
        def forward(self, x): return self.c2(F.relu(self.c1(x)).repeat_interleave(2, dim=self.dim))
    x = torch.randn(2, 3, 8, 8)
    spatial = next(g for g in channel_groups(Rep(2), x) if 'c1' in g.producers)
    assert not spatial.pinned
    chan = next(g for g in channel_groups(Rep(1), x) if 'c1' in g.producers)
    assert chan.pinned and 'repeat_interleave' in chan.reason
    torch.manual_seed(0)
    m = Rep(2).eval()
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq((m.c1.out_channels, m.c2.in_channels), (4, 4))
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_sparsifier_filter_masks_follow_kv_groups():
    "Sparsifier.couple(heads=) zeroes whole k/v groups; compact then keeps exactly what Pruner.prune keeps"
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    m, tok = Llama(n_kv_heads=4).eval(), torch.randint(0, 100, (2, 16))
    for l, sc in zip(m.layers, ({1: 0.1, 2: 0.3}, {0: 0.2, 3: 0.1})): _weaken_groups(l.self_attn, sc)
    twin = copy.deepcopy(m)
    Sparsifier(m, 'filter', 'local').couple(tok, heads=LLAMA_HEADS).sparsify(0.5)
    for l, drop in zip(m.layers, ([1, 2], [0, 3])):
        a = l.self_attn
        dead = {n: (p.weight == 0).all(1) for n, p in (('q', a.q_proj), ('k', a.k_proj), ('v', a.v_proj))}
        fct.test_eq(dead['q'].reshape(4, 16).all(1).nonzero().squeeze(1).tolist(), drop)  # whole groups of q rows
        fct.test_eq(dead['k'].reshape(4, 8).all(1).nonzero().squeeze(1).tolist(), drop)
        fct.test_eq(dead['v'], dead['k'])
        fct.test_eq(int(dead['q'].sum()), 32)  # nothing else in q
    Pruner(m, tok, heads=LLAMA_HEADS).compact()
    Pruner(twin, tok, heads=LLAMA_HEADS).prune(0.5)
    for l, t in zip(m.layers, twin.layers):
        fct.test_eq((l.self_attn.num_heads, l.self_attn.num_kv_heads), (t.self_attn.num_heads, t.self_attn.num_kv_heads))
        for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):  # the same kept rows: equal weights
            assert torch.equal(getattr(l.self_attn, n).weight, getattr(t.self_attn, n).weight), n


def test_callback_heads_on_gqa_llama_then_compact():
    "SparsifyCallback(0.5, 'filter', heads=) during a fit zeroes whole k/v groups; Pruner(learn).compact() removes them"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    torch.manual_seed(0)
    m = Llama(n_kv_heads=4)
    g = torch.Generator().manual_seed(0)
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous())
               for t in (torch.randint(0, 100, (8, 17), generator=g) for _ in range(6))]
    dls = DataLoaders(DataLoader(batches, bs=None), DataLoader(batches[:1], bs=None))
    learn = Learner(dls, m, loss_func=lambda out, y: F.cross_entropy(out.reshape(-1, 100), y.reshape(-1)))
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', heads=LLAMA_HEADS))
    for l in m.layers:
        a = l.self_attn
        q_dead, k_dead = (a.q_proj.weight == 0).all(1).reshape(4, 16), (a.k_proj.weight == 0).all(1).reshape(4, 8)
        fct.test_eq(q_dead.all(1), k_dead.all(1))  # the query heads of a zeroed k/v group, and nothing else
        fct.test_eq(int(q_dead.sum()), 16 * int(k_dead.all(1).sum()))
        fct.test_eq(int(k_dead.all(1).sum()), 2)
    tok = batches[0][0]
    with torch.no_grad(): ref = m.eval()(tok)
    Pruner(learn).compact()  # heads= from the callback
    fct.test_eq([(l.self_attn.num_heads, l.self_attn.num_kv_heads) for l in m.layers], [(4, 2), (4, 2)])
    with torch.no_grad(): assert relative_error(ref, m(tok)) <= 1e-5


def test_sparsifier_on_mqa_keeps_query_heads_and_says_so(caplog):
    "Multi-query attention in the Sparsifier: zeroed q rows would not silence a head, so its heads stay, with a warning"
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    class WithMLP(nn.Module):  # something else to prune: the MLP's hidden units
        def __init__(self):
            super().__init__()
            self.net, self.up, self.down = Net('interleave', n_kv_heads=1), nn.Linear(64, 32), nn.Linear(32, 64)
        def forward(self, x): return self.net(x + self.down(F.relu(self.up(x))))
    w = WithMLP().eval()
    m, x = w.net, torch.randn(2, 16, 64)
    q0 = m.attn.q_proj.weight.detach().clone()
    with caplog.at_level('WARNING', logger='fasterprune.sparsifier'):
        sp = Sparsifier(w, 'filter', 'local').couple(x, heads={'net.attn': AttentionHeads(num_kv_heads='num_kv_heads',
                                                                                             n_rep='n_rep')})
        sp.sparsify(0.5)
    assert 'multi-query attention' in caplog.text and 'Pruner.prune' in caplog.text
    assert torch.equal(m.attn.q_proj.weight, q0)  # no q row zeroed
    fct.test_eq(int((w.up.weight == 0).all(1).sum()), 16)  # the MLP's units still prune
