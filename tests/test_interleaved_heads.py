"Fused q|k|v projections interleaved per head (GPT-NeoX/Pythia, Falcon) or per k/v group: `AttentionHeads(layout=)`"
import copy, dataclasses
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import fastcore.test as fct

T = pytest.importorskip('transformers')
from fasterprune.graph import AttentionHeads, ChannelGraph
from fasterprune.hf import hf_heads, conv1d_to_linear
from fasterprune.pruner import Pruner, SurgeryError, save_pruned, load_pruned

T.logging.set_verbosity_error()
T.utils.logging.disable_progress_bar()
_classes = T.GPTNeoXForCausalLM, T.FalconForCausalLM, T.BloomForCausalLM  # first imports at collection, not in a test
V, H, HD = 100, 4, 16
IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
NEOX = 'gpt_neox.layers.*.attention'


def _tokens():
    torch.manual_seed(1)
    x = torch.randint(1, V, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    return x, mask


def _neox(layers=2, **kw):
    torch.manual_seed(0)
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=V, hidden_size=H * HD, intermediate_size=128,
                                                num_hidden_layers=layers, num_attention_heads=H,
                                                max_position_embeddings=64, **IDS, **kw)).eval()


def _falcon(**kw):
    torch.manual_seed(0)
    return T.FalconForCausalLM(T.FalconConfig(vocab_size=V, hidden_size=H * HD, num_hidden_layers=2,
                                              num_attention_heads=H, **IDS, **kw)).eval()


def _state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def _same(m, sd): return all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def _kept_heads(orig:nn.Module, cut:nn.Module, rows_per_head:int) -> list[int]:
    "The heads of `orig`'s fused projection whose whole blocks of `rows_per_head` rows are the rows `cut` kept"
    w0, w1 = orig.weight.detach(), cut.weight.detach()
    assert w1.shape[0] % rows_per_head == 0, f"{w1.shape[0]} rows are not whole heads of {rows_per_head}"
    blocks0, kept = w0.reshape(-1, rows_per_head, w0.shape[1]), []
    for b in w1.reshape(-1, rows_per_head, w1.shape[1]):
        h = [i for i, b0 in enumerate(blocks0) if torch.equal(b, b0)]
        assert len(h) == 1, "a kept block of rows is not one whole head of the original"
        kept.append(h[0])
    return kept


def test_neox_hf_heads_prunes_whole_heads_equal_to_the_masked_model_and_generates():
    "Pythia's [q k v] per head: hf_heads names the layout; the cut keeps whole heads and computes the masked model"
    m, (x, mask) = _neox(), _tokens()
    orig = copy.deepcopy(m)
    heads = hf_heads(m)
    fct.test_eq(heads[NEOX].layout, 'per_head')
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=heads)
    pr.prune({NEOX: 0.5})  # the heads only: the MLP stays, so the masked reference below is the heads' alone
    assert pr.history[-1]['rel_error'] <= 1e-5  # the Pruner's own check passed
    ref = copy.deepcopy(orig)  # the original with the removed heads zeroed in NeoX's own layout
    for a0, a1, r in zip([l.attention for l in orig.gpt_neox.layers], [l.attention for l in m.gpt_neox.layers],
                         [l.attention for l in ref.gpt_neox.layers]):
        kept = _kept_heads(a0.query_key_value, a1.query_key_value, 3 * HD)
        fct.test_eq(len(kept), H // 2)  # half the heads, each whole: its q, k and v rows
        fct.test_eq((a1.query_key_value.out_features, a1.dense.in_features), (3 * HD * H // 2, HD * H // 2))
        fct.test_eq(a1.head_size, HD)
        cols = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in kept])
        fct.test_eq(a1.dense.weight.detach(), a0.dense.weight.detach()[:, cols])  # o's columns of the same heads
        with torch.no_grad():
            for h in set(range(H)) - set(kept):
                r.query_key_value.weight[h * 3 * HD:(h + 1) * 3 * HD] = 0
                r.query_key_value.bias[h * 3 * HD:(h + 1) * 3 * HD] = 0
                r.dense.weight[:, h * HD:(h + 1) * HD] = 0
    with torch.no_grad():
        got, want = m(input_ids=x, attention_mask=mask).logits, ref(input_ids=x, attention_mask=mask).logits
    fct.test_close(got, want, eps=1e-5)
    gen = dict(attention_mask=mask[:, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    g = m.generate(x[:, :4], **gen)
    fct.test_eq(g.shape, (2, 8))
    fct.test_eq(g, ref.generate(x[:, :4], **gen))


def test_neox_wrong_layout_is_caught_by_verification_and_the_model_restored():
    "Pythia's rows taken as q | k | v (the default layout): the cut is wrong, the Pruner's check refuses it"
    m, (x, mask) = _neox(layers=1), _tokens()
    wrong = {NEOX: dataclasses.replace(hf_heads(m)[NEOX], layout='qkv')}
    sd = _state(m)
    with pytest.raises(SurgeryError, match='differs') as e:
        Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=wrong).prune({NEOX: 0.5})
    assert "layout='per_head'" in str(e.value)  # the hint names the fix
    assert _same(m, sd)
    fct.test_eq(m.gpt_neox.layers[0].attention.query_key_value.out_features, 3 * H * HD)


def test_per_head_layout_on_a_q_k_v_model_is_caught():
    "GPT-2's c_attn is q | k | v: named per_head, the cut takes the wrong rows and verification refuses it"
    torch.manual_seed(0)
    m = conv1d_to_linear(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=H * HD, n_layer=1, n_head=H,
                                                        n_positions=64, **IDS)).eval())
    x, mask = _tokens()
    spec = hf_heads(m)
    fct.test_eq(list(spec.values())[0].layout, 'qkv')
    wrong = {k: dataclasses.replace(s, layout='per_head') for k, s in spec.items()}
    sd = _state(m)
    with pytest.raises(SurgeryError, match='differs') as e:
        Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=wrong).prune(
            {k: 0.5 for k in wrong})
    assert "layout='qkv'" in str(e.value)  # the hint names the fix
    assert _same(m, sd)


@pytest.mark.parametrize('kw, after', [
    (dict(multi_query=False, new_decoder_architecture=False), (2, 2)),  # [q k v] per head
    (dict(new_decoder_architecture=True, num_kv_heads=2), (2, 1)),      # [q q k v] per k/v group: a group goes
    (dict(new_decoder_architecture=True, num_kv_heads=1), (2, 1))])     # one group: query heads go, k and v stay
def test_falcon_interleaved_layouts_prune_verified_and_generate(kw, after):
    "Falcon's other layouts: per head (the first Falcon) and per k/v group (Falcon-40B's new_decoder_architecture)"
    m, (x, mask) = _falcon(**kw), _tokens()
    heads = hf_heads(m)
    fct.test_eq(list(heads.values())[0].layout, 'per_head')
    a = m.transformer.h[0].self_attention
    Hkv0 = a.num_kv_heads
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=heads)
    pr.prune({k: 0.5 for k in heads})
    assert pr.history[-1]['rel_error'] <= 1e-5
    fct.test_eq((a.num_heads, a.num_kv_heads), after)
    fct.test_eq(a.query_key_value.out_features, (a.num_heads + 2 * a.num_kv_heads) * HD)
    if Hkv0 > 1:  # whole groups: their rows in the original are one block each
        fct.test_eq(len(_kept_heads(_falcon(**kw).transformer.h[0].self_attention.query_key_value,
                                    a.query_key_value, (H // Hkv0 + 2) * HD)), a.num_kv_heads)
    g = m.generate(x[:, :4], attention_mask=mask[:, :4], max_new_tokens=3, do_sample=False, use_cache=True)
    fct.test_eq(g.shape, (2, 7))


def test_alibi_blocks_refused_by_name_and_a_hand_named_cut_is_caught():
    "Bloom's ALiBi slopes are built for all layers from the config's head count: hf_heads refuses, the check too"
    torch.manual_seed(0)
    m = T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=H * HD, n_layer=1, n_head=H, **IDS)).eval()
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.self_attention \(BloomAttention\).*ALiBi"): hf_heads(m)
    with pytest.raises(ValueError, match='ALiBi'): hf_heads(_falcon(alibi=True))
    x, mask = _tokens()
    spec = {'transformer.h.*.self_attention': AttentionHeads('num_heads', qkv='query_key_value', o='dense',
                                                             head_dim='head_dim', layout='per_head')}
    sd = _state(m)
    with pytest.raises(SurgeryError):
        Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=spec).prune({k: 0.5 for k in spec})
    assert _same(m, sd)


def test_layout_is_validated():
    with pytest.raises(ValueError, match="layout='interleaved'.*'qkv', 'per_head'"):
        AttentionHeads(qkv='qkv', layout='interleaved')
    with pytest.raises(ValueError, match='qkv='): AttentionHeads(layout='per_head')  # separate q, k, v: no layout


class _PerGroup(nn.Module):
    "A hand-written attention whose fused rows are [the n_rep q heads, k, v] of each k/v group (Falcon-40B's)"
    def __init__(self, d=32, n_heads=4, n_kv_heads=2):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.qkv = nn.Linear(d, (n_heads + 2 * n_kv_heads) * self.head_dim)
        self.o = nn.Linear(n_heads * self.head_dim, d)
    def forward(self, x):
        B, L, _ = x.shape
        r = self.num_heads // self.num_kv_heads
        t = self.qkv(x).view(B, L, self.num_kv_heads, r + 2, self.head_dim)
        q = t[:, :, :, :r].reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (t[:, :, :, i].transpose(1, 2) for i in (r, r + 1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o(o.transpose(1, 2).reshape(B, L, -1))


def test_per_group_rows_and_a_verified_cut_of_a_hand_written_block():
    "The row maps of the per-k/v-group layout, and a prune that the Pruner's check accepts (and refuses as q | k | v)"
    torch.manual_seed(0)
    m, x = _PerGroup(), torch.randn(2, 6, 32)
    spec = AttentionHeads('num_heads', qkv='qkv', o='o', head_dim='head_dim', num_kv_heads='num_kv_heads',
                          layout='per_head')
    w = ChannelGraph(m, x, heads={'': spec}).heads['']
    fct.test_eq(w.unit_rows(torch.tensor([1]))['qkv'].tolist(), [list(range(32, 64))])  # group 1: rows 32-63
    fct.test_eq(w.v_rows()[1].tolist(), [list(range(24, 32)), list(range(56, 64))])
    fct.test_eq(w.o_cols(torch.tensor([1])).tolist(), list(range(16, 32)))  # its 2 query heads' outputs
    sd = _state(m)
    with pytest.raises(SurgeryError):
        Pruner(m, x, heads={'': dataclasses.replace(spec, layout='qkv')}).prune(0.5)
    assert _same(m, sd)
    with torch.no_grad():
        m.qkv.weight[:32] = 0  # group 0 is silent: its rows zeroed in this layout
        m.qkv.bias[:32] = 0
        want = m(x)
    Pruner(m, x, heads={'': spec}).compact()
    fct.test_eq((m.num_heads, m.num_kv_heads, m.qkv.out_features, m.o.in_features), (2, 1, 32, 16))
    with torch.no_grad(): fct.test_close(m(x), want, eps=1e-5)


def test_pruned_neox_saves_and_loads(tmp_path):
    m, (x, mask) = _neox(), _tokens()
    Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(m)).prune(0.5)
    save_pruned(m, tmp_path / 'p.pt')
    fresh = load_pruned(_neox(), tmp_path / 'p.pt')
    with torch.no_grad():
        fct.test_eq(fresh(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)


def test_neox_heads_masked_during_training_are_whole_blocks_then_compacted():
    "SparsifyCallback's path (Sparsifier.couple with heads=): its masks zero [q k v] blocks of whole heads"
    from fasterprune.sparsifier import Sparsifier
    m, (x, mask) = _neox(), _tokens()
    batch = {'input_ids': x, 'attention_mask': mask}
    sp = Sparsifier(m, 'filter', 'local', exclude='lm_head')
    sp.couple(batch, heads=hf_heads(m), strict=False)
    sp.sparsify(0.5)
    for l in m.gpt_neox.layers:
        a = l.attention
        blocks = a.query_key_value.weight.detach().reshape(H, 3 * HD, -1)
        zero = (blocks == 0).all(2)  # (heads, rows of a head): a zeroed head has all its q, k, v rows at zero
        fct.test_eq(zero.all(1).sum().item(), H // 2)
        fct.test_eq((zero.any(1) == zero.all(1)).all().item(), True)  # no head partly zeroed
    with torch.no_grad(): want = m(**batch).logits
    Pruner(m, batch, strict=False, heads=hf_heads(m)).compact()
    fct.test_eq(m.gpt_neox.layers[0].attention.dense.in_features, HD * H // 2)
    with torch.no_grad(): fct.test_close(m(**batch).logits, want, eps=1e-5)
