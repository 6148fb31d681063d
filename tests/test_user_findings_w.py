"""A new user's findings with hand-written attention in the Pruner (`heads=`): each fails on the code before the fix.
1. `compact()` with `heads=` warned that the zeroed rows of a head it removed "stay" and logged "0 filters removed".
2. A multi-head block that keeps a k/v head count of its own (`n_kv_heads == n_heads`, as Hugging Face configs do),
   named with `AttentionHeads('n_heads')` alone, failed in the surgery; now a ValueError names the attribute first."""
import copy, logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn, torch.nn.functional as F
from fasterprune.graph import AttentionHeads
from fasterprune.pruner import Pruner, SurgeryError


class Attn(nn.Module):
    "Llama-style attention written for GQA: k and v are split with `n_kv_heads` (equal to `n_heads` for plain MHA)"
    def __init__(self, d, n_heads, n_kv_heads=None, kv_name='n_kv_heads'):
        super().__init__()
        self.kv_name = kv_name
        self.n_heads, self.hd = n_heads, d // n_heads
        setattr(self, kv_name, n_kv_heads or n_heads)
        nkv = getattr(self, kv_name)
        self.q_proj, self.o_proj = (nn.Linear(d, n_heads * self.hd, bias=False),
                                    nn.Linear(n_heads * self.hd, d, bias=False))
        self.k_proj, self.v_proj = (nn.Linear(d, nkv * self.hd, bias=False) for _ in range(2))
    def forward(self, x):
        B, T, _ = x.shape
        nkv = getattr(self, self.kv_name)
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, nkv, self.hd).transpose(1, 2)
        if nkv != self.n_heads:
            r = self.n_heads // nkv
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

class Block(nn.Module):
    def __init__(self, d, n_heads, n_kv_heads=None, kv_name='n_kv_heads'):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = Attn(d, n_heads, n_kv_heads, kv_name)
        self.up, self.gate, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), \
            nn.Linear(2 * d, d, bias=False)
    def forward(self, x):
        x = x + self.attn(self.n1(x))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))

class GPT(nn.Module):
    def __init__(self, vocab=64, d=32, n_heads=4, n_kv_heads=None, n_layers=2, ctx=16, kv_name='n_kv_heads'):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.layers = nn.ModuleList([Block(d, n_heads, n_kv_heads, kv_name) for _ in range(n_layers)])
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.layers: x = b(x)
        return self.head(self.norm(x))

def _tok(): return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

def _zero_rows(a:Attn, q_rows, kv_rows=None):
    with torch.no_grad():
        a.q_proj.weight[q_rows] = 0
        if kv_rows is not None:
            a.k_proj.weight[kv_rows] = 0
            a.v_proj.weight[kv_rows] = 0

def _msgs(caplog, level): return [r.getMessage() for r in caplog.records if r.levelno == level]


# 1. compact() with heads=: no warning about the rows of a removed head, and the log counts the head
def test_compact_removed_head_no_false_warning(caplog):
    torch.manual_seed(0)
    m = GPT(n_heads=4).eval()
    a = m.layers[0].attn
    _zero_rows(a, slice(0, 8), slice(0, 8))  # head 0 of block 0: its q, k, v rows
    pr = Pruner(m, _tok(), heads={'layers.*.attn': AttentionHeads('n_heads', num_kv_heads='n_kv_heads')})
    with caplog.at_level(logging.INFO, logger='fasterprune'): pr.compact()
    fct.test_eq((a.n_heads, a.n_kv_heads, a.q_proj.out_features, a.o_proj.in_features), (3, 3, 24, 24))
    fct.test_eq([w for w in _msgs(caplog, logging.WARNING) if 'zeroed filters stay' in w], [])
    info = [i for i in _msgs(caplog, logging.INFO) if i.startswith('Pruner.compact:')]
    assert len(info) == 1 and '0 filters and 1 attention head removed' in info[0], info
    fct.test_eq((pr.history[-1]['channels_removed'], pr.history[-1]['heads_removed']), (0, 1))


def test_compact_zeroed_rows_of_a_kept_head_still_warn(caplog):
    "q rows zeroed in a head whose values are not zero: the head stays, so do they, and the warning says why"
    torch.manual_seed(0)
    m = GPT(n_heads=4).eval()
    _zero_rows(m.layers[0].attn, slice(0, 8), slice(0, 8))  # head 0 of block 0 goes
    _zero_rows(m.layers[1].attn, slice(8, 16))               # only the q rows of head 1 of block 1: it stays
    pr = Pruner(m, _tok(), heads={'layers.*.attn': AttentionHeads('n_heads', num_kv_heads='n_kv_heads')})
    with caplog.at_level(logging.INFO, logger='fasterprune'): pr.compact()
    fct.test_eq((m.layers[0].attn.n_heads, m.layers[1].attn.n_heads), (3, 4))
    warns = [w for w in _msgs(caplog, logging.WARNING) if 'zeroed filters stay' in w]
    assert len(warns) == 1, warns
    assert "'layers.1.attn.q_proj' (8: rows of heads of 'layers.1.attn' that stay" in warns[0], warns[0]
    assert 'layers.0.attn' not in warns[0] and 'name it in heads=' not in warns[0], warns[0]


def test_compact_gqa_group_counts(caplog):
    "A k/v group (2 query heads sharing one k/v head) zeroed: removed without a warning, counted as heads and a group"
    torch.manual_seed(0)
    m = GPT(n_heads=4, n_kv_heads=2).eval()
    a = m.layers[1].attn
    _zero_rows(a, slice(0, 16), slice(0, 8))  # k/v group 0: query heads 0 and 1
    pr = Pruner(m, _tok(), heads={'layers.*.attn': AttentionHeads('n_heads', num_kv_heads='n_kv_heads')})
    with caplog.at_level(logging.INFO, logger='fasterprune'): pr.compact()
    fct.test_eq((a.n_heads, a.n_kv_heads, a.q_proj.out_features, a.k_proj.out_features), (2, 1, 16, 8))
    fct.test_eq([w for w in _msgs(caplog, logging.WARNING) if 'zeroed filters stay' in w], [])
    info = [i for i in _msgs(caplog, logging.INFO) if i.startswith('Pruner.compact:')]
    assert '0 filters and 2 attention heads (1 k/v group) removed' in info[0], info
    fct.test_eq(pr.history[-1]['heads_removed'], 2)


def test_prune_counts_heads_and_filters(caplog):
    "prune(0.5) with heads=: the log and history count the heads next to the MLP filters"
    torch.manual_seed(0)
    m = GPT(n_heads=4).eval()
    pr = Pruner(m, _tok(), heads={'layers.*.attn': AttentionHeads('n_heads', num_kv_heads='n_kv_heads')})
    with caplog.at_level(logging.INFO, logger='fasterprune'): pr.prune(0.5)
    fct.test_eq([b.attn.n_heads for b in m.layers], [2, 2])
    filters = sum(64 - b.up.out_features for b in m.layers)  # SwiGLU units: a filter of up and one of gate each
    fct.test_eq((pr.history[-1]['channels_removed'], pr.history[-1]['heads_removed']), (2 * filters, 4))
    info = [i for i in _msgs(caplog, logging.INFO) if i.startswith('Pruner.prune:')]
    assert f'{2 * filters} filters and 4 attention heads removed' in info[0], info


# 2. a multi-head block that splits k and v with its own k/v head count
@pytest.mark.parametrize('kv_name', ['n_kv_heads', 'num_key_value_heads'])
def test_mha_kv_attr_unnamed_is_a_clear_error_before_any_change(kv_name):
    torch.manual_seed(0)
    m = GPT(n_heads=4, kv_name=kv_name).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    pr = Pruner(m, _tok(), heads={'layers.*.attn': AttentionHeads('n_heads')})
    with pytest.raises(ValueError) as e: pr.prune(0.5)
    msg = str(e.value)
    assert f"{kv_name} = 4" in msg and f"AttentionHeads(..., num_kv_heads='{kv_name}')" in msg, msg
    fct.test_eq(m.layers[0].attn.n_heads, 4)
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])
    with pytest.raises(ValueError, match=f"num_kv_heads='{kv_name}'"): pr.compact()


def test_mha_kv_attr_named_prunes():
    "Named with num_kv_heads= (n_kv == n_heads, n_rep 1): every head is its own k/v group; both counts follow"
    torch.manual_seed(0)
    m = GPT(n_heads=4).eval()
    x = _tok()
    pr = Pruner(m, x, heads={'layers.*.attn': AttentionHeads('n_heads', num_kv_heads='n_kv_heads')})
    pr.prune(0.5)
    for b in m.layers:
        a = b.attn
        fct.test_eq((a.n_heads, a.n_kv_heads, a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features,
                     a.o_proj.in_features), (2, 2, 16, 16, 16, 16))
    assert pr.history[-1]['rel_error'] <= 1e-5
    fct.test_eq(pr.history[-1]['heads_removed'], 4)
    fct.test_eq(m(x).shape, (2, 16, 64))


def test_mha_kv_attr_callback_fit_fails_at_start_then_named_compacts():
    "With a SparsifyCallback the unnamed k/v count stops the fit before any step (not at compact() after training)"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, TensorDataset
    from fasterprune.callback import SparsifyCallback
    torch.manual_seed(0)
    seq = (torch.randint(0, 64, (64, 1)) + torch.arange(17)) % 64
    ds = TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
    dls = DataLoaders(DataLoader(ds, 16, shuffle=True), DataLoader(ds, 16))
    loss = lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    m = GPT(n_heads=4)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    learn = Learner(dls, m, loss_func=loss)
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot',
                          heads={'layers.*.attn': AttentionHeads('n_heads')})
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match="num_kv_heads='n_kv_heads'"):
        learn.fit(1, 1e-3, cbs=cb)
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])  # no step was taken
    spec = AttentionHeads('n_heads', num_kv_heads='n_kv_heads')
    learn = Learner(dls, m, loss_func=loss)
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', heads={'layers.*.attn': spec})
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    pr = Pruner(learn, heads={'layers.*.attn': spec})
    pr.compact()
    fct.test_eq([(b.attn.n_heads, b.attn.n_kv_heads) for b in m.layers], [(2, 2), (2, 2)])
    assert pr.history[-1]['rel_error'] <= 1e-5


class _OddKV(Attn):
    "k and v split with `self.groups_k` (no 'kv' in the name): the check cannot know it, the surgery error names it"
    def __init__(self, d=32, n_heads=4):
        super().__init__(d, n_heads, kv_name='groups_k')


def test_surgery_error_names_a_stale_count():
    torch.manual_seed(0)
    m, x = _OddKV().eval(), torch.randn(2, 8, 32)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError) as e: Pruner(m, x, heads={'': AttentionHeads('n_heads')}).prune(0.5)
    msg = str(e.value)
    assert "_OddKV.groups_k = 4 kept the count" in msg and "num_kv_heads='<attr>'" in msg, msg
    assert msg.endswith('the model was restored'), msg
    fct.test_eq((m.n_heads, m.groups_k), (4, 4))
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])
    Pruner(m, x, heads={'': AttentionHeads('n_heads', num_kv_heads='groups_k')}).prune(0.5)
    fct.test_eq((m.n_heads, m.groups_k, m.k_proj.out_features), (2, 2, 16))


def test_head_width_attribute_named_kv_is_not_taken_for_a_kv_count():
    "Megatron's `kv_channels` is a head width: equal to the head count here, it is not a k/v head count to refuse"
    class Attn(nn.Module):
        def __init__(self, d=64, h=8):
            super().__init__()
            self.num_heads, self.kv_channels = h, d // h  # 8 heads of 8 channels
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (p(x).view(B, T, self.num_heads, self.kv_channels).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
    torch.manual_seed(0)
    m, x = Attn(), torch.randn(2, 5, 64)
    pr = Pruner(m, x, heads={'': AttentionHeads()})
    pr.prune(0.5)
    fct.test_eq((m.num_heads, m.q_proj.out_features), (4, 32))
    assert pr.history[-1]['rel_error'] <= 1e-5
