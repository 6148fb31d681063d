"""hf_heads for Phi-3 (one fused qkv_proj, grouped-query, a forward that reads the shared config's head count) and T5
(q, k, v, o; one relative position bias per stack, computed by its first layer from a table with a column per head),
Swin and Donut-Swin (a relative position table, a column per head, in each block): tiny transformers models built
from configs, random weights, no download"""
import copy, dataclasses, io
import pytest
import torch
import torch.nn as nn
import fastcore.test as fct

T = pytest.importorskip('transformers')
from fasterprune.hf import hf_heads, own_head_counts, hf_config_after_prune
from fasterprune.graph import AttentionHeads, ChannelGraph
from fasterprune.pruner import Pruner, SurgeryError, save_pruned, load_pruned

T.logging.set_verbosity_error()
T.utils.logging.disable_progress_bar()
_classes = T.Phi3ForCausalLM, T.T5ForConditionalGeneration  # their modules' first import at collection, not in a test
V = 100


def _tokens():
    torch.manual_seed(0)
    x = torch.randint(2, V, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    return x, mask


def _phi3(H=4, Hkv=2, own=True):
    torch.manual_seed(0)
    cfg = T.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=H,
                       num_key_value_heads=Hkv, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)
    m = T.Phi3ForCausalLM(cfg).eval()
    return own_head_counts(m) if own else m


def _t5(layers=2, **kw):
    torch.manual_seed(0)
    cfg = T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                     num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)
    return T.T5ForConditionalGeneration(cfg).eval()


def _t5_example():
    x, mask = _tokens()
    return dict(input_ids=x, attention_mask=mask, decoder_input_ids=x[:, :6])


def _kept_heads(o0:torch.Tensor, o1:torch.Tensor, hd:int) -> list:
    "The original heads whose output-projection columns the pruned o1 holds (matched column by column in o0)"
    cols = [int((o0 == o1[:, [j]]).all(0).nonzero()[0]) for j in range(o1.shape[1])]
    return sorted({c // hd for c in cols})


def _mask_like(dense, pruned, blocks, o_name, hd):
    "`dense` with the o columns of the heads `pruned` removed zeroed: the masked model the pruned one must equal"
    d, p = dict(dense.named_modules()), dict(pruned.named_modules())
    kept = {}
    with torch.no_grad():
        for n in blocks:
            o0, o1 = getattr(d[n], o_name).weight, getattr(p[n], o_name).weight
            kept[n] = _kept_heads(o0, o1, hd)
            gone = [h for h in range(o0.shape[1] // hd) if h not in kept[n]]
            for h in gone: o0[:, h * hd:(h + 1) * hd] = 0
    return kept


# ---------------------------------------------------------------- Phi-3

def test_phi3_refused_until_it_holds_its_own_head_counts():
    "Phi-3's forward reads `self.config.num_attention_heads`, one value for all layers: refused, naming the fix"
    m = _phi3(own=False)
    with pytest.raises(ValueError, match=r"Phi3Attention reads its head count .*own_head_counts\(model\)"): hf_heads(m)
    own_head_counts(m)
    a = m.model.layers[1].self_attn
    fct.test_eq((a.num_heads, a.config.num_attention_heads, a.config.hidden_size), (4, 4, 64))
    fct.test_eq(a.config._cfg is m.config, True)  # a view of the one shared config, not a copy
    with pytest.raises(ValueError, match='already given its own'): own_head_counts(m)
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match='no attention block'): own_head_counts(llama)


def test_phi3_heads_pruned_equal_the_masked_model_and_generate():
    "Half the k/v groups of each Phi-3 layer go with their query heads; the logits are those of the masked model"
    x, mask = _tokens()
    m = _phi3()
    dense = copy.deepcopy(m)
    heads = hf_heads(m)
    fct.test_eq(list(heads), ['model.layers.*.self_attn'])
    fct.test_eq((heads['model.layers.*.self_attn'].qkv, heads['model.layers.*.self_attn'].n_rep),
                ('qkv_proj', 'num_key_value_groups'))
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=heads)
    pr.prune(0.5)
    h = pr.history[-1]
    assert h['rel_error'] <= 1e-5 and h['heads_removed'] == 4, h  # 2 query heads (1 k/v group) of 4, in 2 layers
    for l in m.model.layers:
        a = l.self_attn
        fct.test_eq((a.num_heads, a.config.num_attention_heads, a.num_key_value_heads, a.num_key_value_groups),
                    (2, 2, 1, 2))
        fct.test_eq((a.qkv_proj.out_features, a.o_proj.in_features), ((2 + 2 * 1) * 16, 32))
    fct.test_eq(m.config.num_attention_heads, 4)  # the model's config is left alone (hf_config_after_prune sets it)
    kept = _mask_like(dense, m, [f'model.layers.{i}.self_attn' for i in range(2)], 'o_proj', 16)
    assert all(len(k) == 2 for k in kept.values()), kept
    mlps = [f'model.layers.{i}.mlp' for i in range(2)]  # the fused gate_up_proj loses whole units too (two rows each)
    I = dense.model.layers[0].mlp.down_proj.in_features
    for n in mlps:
        fct.test_eq((m.get_submodule(n).gate_up_proj.out_features, m.get_submodule(n).down_proj.in_features), (I, I // 2))
    _mask_like(dense, m, mlps, 'down_proj', 1)
    with torch.no_grad():
        fct.test_close(m(input_ids=x, attention_mask=mask).logits, dense(input_ids=x, attention_mask=mask).logits,
                       eps=1e-5)
    gen = dict(attention_mask=mask[:, :4], max_new_tokens=4, do_sample=False)
    fct.test_eq(m.generate(x[:, :4], **gen), dense.generate(x[:, :4], **gen))


def test_phi3_layers_keep_different_head_counts():
    "Each block reads its own count: a prune of one layer, then a global ranking, leave the layers unlike and exact"
    x, mask = _tokens()
    m = _phi3(H=8, Hkv=4)
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(m))
    pr.prune({'model.layers.0.self_attn': 0.5})
    fct.test_eq([(l.self_attn.num_heads, l.self_attn.num_key_value_heads) for l in m.model.layers], [(4, 2), (8, 4)])
    assert pr.history[-1]['rel_error'] <= 1e-5
    with torch.no_grad(): assert torch.isfinite(m(input_ids=x, attention_mask=mask, labels=x).loss)
    with pytest.raises(ValueError, match='different widths'): hf_config_after_prune(m)
    fct.test_eq(m.config.num_attention_heads, 8)


def test_phi3_wrong_layout_caught_by_the_check():
    "A fused qkv_proj named with the per-head layout cuts rows of other heads: the Pruner's check refuses, restores"
    x, mask = _tokens()
    m = _phi3()
    wrong = {k: dataclasses.replace(s, layout='per_head') for k, s in hf_heads(m).items()}
    with pytest.raises(SurgeryError, match='restored'):
        Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=wrong).prune(0.5)
    a = m.model.layers[0].self_attn
    fct.test_eq((a.qkv_proj.out_features, a.num_heads, a.num_key_value_groups), (128, 4, 2))


def test_phi3_saved_loaded_and_config_after_prune(tmp_path):
    "save_pruned / load_pruned into a fresh Phi-3 given its own counts; a plain fresh one is refused by name"
    x, mask = _tokens()
    m = _phi3()
    Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(m)).prune(0.5)
    save_pruned(m, tmp_path / 'phi3.pt')
    fresh = load_pruned(own_head_counts(T.Phi3ForCausalLM(m.config).eval()), tmp_path / 'phi3.pt')
    with torch.no_grad():
        fct.test_eq(fresh(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="(?s)sets 'num_heads', which Phi3Attention does not have.*own_head_counts"):
        load_pruned(T.Phi3ForCausalLM(m.config).eval(), tmp_path / 'phi3.pt')
    with pytest.raises(ValueError, match='call own_head_counts'): hf_config_after_prune(T.Phi3ForCausalLM(m.config))
    old = m.config
    new = hf_config_after_prune(m)
    fct.test_eq((new.num_attention_heads, new.num_key_value_heads, new.head_dim, old.num_attention_heads), (2, 1, 16, 4))
    fct.test_eq(m.model.layers[0].self_attn.config._cfg is new, True)  # the blocks' views follow the new config
    m.save_pretrained(tmp_path / 'hf')
    back = T.Phi3ForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    with torch.no_grad():
        fct.test_eq(back(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)


def test_phi3_own_counts_survive_deepcopy_and_pickle():
    "A copy's blocks read their own counts (not the original's): pruning the copy leaves the original whole"
    x, mask = _tokens()
    m = _phi3()
    c = copy.deepcopy(m)
    fct.test_eq(c.model.layers[0].self_attn.config._block is c.model.layers[0].self_attn, True)
    Pruner(c, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(c)).prune(0.5)
    fct.test_eq((m.model.layers[0].self_attn.config.num_attention_heads, c.model.layers[0].self_attn.num_heads), (4, 2))
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    p = torch.load(buf, weights_only=False)
    with torch.no_grad():
        fct.test_eq(p(input_ids=x, attention_mask=mask).logits, c(input_ids=x, attention_mask=mask).logits)


# ---------------------------------------------------------------- T5

def test_t5_heads_named_with_the_bias_table_and_shared_heads():
    "The first layer of each stack names its relative_attention_bias; every other block keeps that block's heads"
    m = _t5()
    heads = hf_heads(m)
    blocks = [n for n, mod in m.named_modules() if type(mod).__name__ == 'T5Attention']
    fct.test_eq(sorted(heads), sorted(blocks))
    e0, d0, x0 = 'encoder.block.0.layer.0.SelfAttention', 'decoder.block.0.layer.0.SelfAttention', \
        'decoder.block.0.layer.1.EncDecAttention'
    fct.test_eq((heads[e0].table, heads[d0].table, heads[x0].table), ('relative_attention_bias',) * 2 + (None,))
    fct.test_eq([heads[n].same_heads_as for n in (e0, d0, x0)], [None] * 3)
    fct.test_eq(heads['encoder.block.1.layer.0.SelfAttention'].same_heads_as, e0)
    fct.test_eq(heads['decoder.block.1.layer.0.SelfAttention'].same_heads_as, d0)
    fct.test_eq(heads['decoder.block.1.layer.1.EncDecAttention'].same_heads_as, x0)
    fct.test_eq((heads[e0].num_heads, heads[e0].head_dim, heads[e0].width), ('n_heads', 'key_value_proj_dim', 'inner_dim'))


def test_t5_heads_pruned_equal_the_masked_model_and_generate():
    "Encoder, decoder and cross-attention lose half their heads, the same ones in every layer of a stack; exact"
    ex = _t5_example()
    m = _t5()
    dense = copy.deepcopy(m)
    pr = Pruner(m, ex, strict=False, heads=hf_heads(m))
    pr.prune(0.5)
    h = pr.history[-1]
    assert h['rel_error'] <= 1e-5 and h['heads_removed'] == 12, h  # 2 of 4 heads in 6 blocks
    blocks = [n for n, mod in m.named_modules() if type(mod).__name__ == 'T5Attention']
    for n in blocks:
        a = m.get_submodule(n)
        fct.test_eq((a.n_heads, a.inner_dim, a.q.out_features, a.k.out_features, a.v.out_features, a.o.in_features),
                    (2, 16, 16, 16, 16, 16))
    for s in (m.encoder, m.decoder):
        t = s.block[0].layer[0].SelfAttention.relative_attention_bias
        fct.test_eq(t.weight.shape, (32, 2))
        fct.test_eq((t.num_embeddings, t.embedding_dim), (32, 2))  # the module says so too (its repr, a copy)
    mlps = [n for n, mod in m.named_modules() if type(mod).__name__ == 'T5DenseActDense']
    fct.test_eq(m.get_submodule(mlps[0]).wo.in_features, 32)  # the MLP units go too: masked in the reference
    _mask_like(dense, m, mlps, 'wo', 1)
    kept = _mask_like(dense, m, blocks, 'o', 8)
    for stack in ('encoder.block.*.layer.0', 'decoder.block.*.layer.0', 'decoder.block.*.layer.1'):
        same = {tuple(k) for n, k in kept.items() if n.startswith(stack.split('*')[0]) and stack.split('*')[1] in n}
        assert len(same) == 1, (stack, kept)  # every layer of the stack kept the heads of its first layer
    t0 = dense.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    k0 = kept['encoder.block.0.layer.0.SelfAttention']
    fct.test_eq(m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach(), t0.detach()[:, k0])
    with torch.no_grad(): fct.test_close(m(**ex).logits, dense(**ex).logits, eps=1e-5)
    x, mask = ex['input_ids'], ex['attention_mask']
    gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    fct.test_eq(m.generate(x, **gen), dense.generate(x, **gen))


def test_t5_wrong_spec_caught_by_the_check():
    "Blocks that choose their heads alone read other heads' bias columns (or the old count): refused, restored"
    ex = _t5_example()
    m = _t5()
    with torch.no_grad():  # layer 0 of the encoder prefers heads 0, 1; layer 1 heads 2, 3
        for i, b in enumerate(m.encoder.block):
            a = b.layer[0].SelfAttention
            for h in range(4):
                s = 10. if (h < 2) == (i == 0) else 0.1
                for l in (a.q, a.k, a.v): l.weight[h * 8:(h + 1) * 8] *= s
                a.o.weight[:, h * 8:(h + 1) * 8] *= s
    heads = hf_heads(m)
    alone = {k: dataclasses.replace(s, same_heads_as=None) for k, s in heads.items()}
    with pytest.raises(SurgeryError, match='differs from the masked'): Pruner(m, ex, strict=False, heads=alone).prune(0.5)
    no_table = {k: dataclasses.replace(s, table=None) for k, s in heads.items()}
    with pytest.raises(SurgeryError, match='no longer runs'): Pruner(m, ex, strict=False, heads=no_table).prune(0.5)
    a = m.encoder.block[0].layer[0].SelfAttention
    fct.test_eq((a.n_heads, a.q.out_features, a.relative_attention_bias.weight.shape[1]), (4, 32, 4))  # restored
    pr = Pruner(m, ex, strict=False, heads=heads)
    pr.prune(0.5)
    fct.test_eq(m.encoder.block[1].layer[0].SelfAttention.n_heads, 2)
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_t5_spec_errors_name_the_problem():
    "A table without a column per head, or same_heads_as naming no block of heads=, is a ValueError before any cut"
    ex = _t5_example()
    m = _t5()
    heads = hf_heads(m)
    e0, e1 = 'encoder.block.0.layer.0.SelfAttention', 'encoder.block.1.layer.0.SelfAttention'
    bad = dict(heads, **{e0: dataclasses.replace(heads[e0], table='q')})
    with pytest.raises(ValueError, match=r"table='q' must name .* one column per head"):
        ChannelGraph(m, ex, strict=False, heads=bad)
    bad = dict(heads, **{e1: dataclasses.replace(heads[e1], same_heads_as='encoder.block.0')})
    with pytest.raises(ValueError, match=r"same_heads_as='encoder.block.0' is not an attention block named in heads="):
        ChannelGraph(m, ex, strict=False, heads=bad)
    with pytest.raises(ValueError, match='one column per head'):
        Pruner(m, ex, strict=False, heads={e0: dataclasses.replace(heads[e0], table='o')}).prune(0.5)
    fct.test_eq(m.encoder.block[0].layer[0].SelfAttention.n_heads, 4)


@pytest.mark.parametrize('ff', ['relu', 'gated-gelu'])  # T5; T5 v1.1 and Flan-T5 (wi_0, wi_1, wo; untied lm_head)
def test_t5_saved_loaded_and_config_after_prune(tmp_path, ff):
    "A pruned T5 loads into a fresh one (save_pruned), and, all blocks alike, through save_pretrained/from_pretrained"
    ex = _t5_example()
    m = _t5(feed_forward_proj=ff, tie_word_embeddings=ff == 'relu')
    Pruner(m, ex, strict=False, heads=hf_heads(m)).prune(0.5)
    save_pruned(m, tmp_path / 't5.pt')
    fresh = load_pruned(T.T5ForConditionalGeneration(m.config).eval(), tmp_path / 't5.pt')
    with torch.no_grad(): fct.test_eq(fresh(**ex).logits, m(**ex).logits)
    new = hf_config_after_prune(m)
    fct.test_eq((new.num_heads, new.d_kv, new.d_ff), (2, 8, 32))
    m.save_pretrained(tmp_path / 'hf')
    back = T.T5ForConditionalGeneration.from_pretrained(tmp_path / 'hf').eval()
    with torch.no_grad(): fct.test_eq(back(**ex).logits, m(**ex).logits)


def test_t5_encoder_model_and_global_ranking():
    "T5EncoderModel too; a global ranking keeps every stack's layers alike (one unit per head index of the stack)"
    torch.manual_seed(0)
    enc = T.T5EncoderModel(T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)).eval()
    x, mask = _tokens()
    pr = Pruner(enc, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(enc))
    pr.prune(0.5, context='global')
    fct.test_eq(len({b.layer[0].SelfAttention.n_heads for b in enc.encoder.block}), 1)
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_t5_learner_callback_zeroes_one_head_choice_per_stack_then_compact():
    "SparsifyCallback(heads=hf_heads) in a fastai fit zeroes the same heads in every layer of a stack; compact cuts them"
    import torch.nn as nn, torch.nn.functional as F
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    from fit_checks import LogitsOf
    def loss(logits, ids): return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.manual_seed(0)
    ids = torch.randint(2, V, (32, 10))
    ds = [({'input_ids': t, 'decoder_input_ids': t[:6]}, t[1:7]) for t in ids]
    dls = DataLoaders(DataLoader(ds, bs=16, shuffle=True, drop_last=True), DataLoader(ds[:16], bs=16), device='cpu')
    model = LogitsOf(_t5(layers=3).train())
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', heads=hf_heads(model), exclude='lm.lm_head')
    learn = Learner(dls, model, loss_func=loss, cbs=cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    def zeroed(a): return tuple((a.q.weight.abs().sum(1).reshape(4, 8).sum(1) == 0).tolist())
    enc = {zeroed(b.layer[0].SelfAttention) for b in model.lm.encoder.block}
    assert len(enc) == 1 and sum(next(iter(enc))) == 2, enc  # two heads, the same in the 3 layers
    Pruner(learn, strict=False).compact()
    fct.test_eq({b.layer[0].SelfAttention.n_heads for b in model.lm.encoder.block}, {2})
    fct.test_eq(model.lm.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape, (32, 2))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


def test_t5_towers_of_one_model_choose_their_heads_apart_and_udop_is_refused():
    "R13: the stack, not every layer index, decides which blocks share their heads; tables outside the blocks refuse"
    def enc(H, seed):
        torch.manual_seed(seed)
        cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=H)
        return T.T5EncoderModel(cfg).eval()
    class Dual(nn.Module):  # two encoders in one ModuleList (a dual encoder)
        def __init__(self, a, b): super().__init__(); self.towers = nn.ModuleList([a, b])
        def forward(self, input_ids): return torch.cat([t(input_ids=input_ids).last_hidden_state for t in self.towers], -1)
    m = Dual(enc(4, 0), enc(2, 1))
    h = hf_heads(m)
    b = 'towers.{}.encoder.block.{}.layer.0.SelfAttention'
    fct.test_eq((h[b.format(1, 0)].same_heads_as, h[b.format(1, 1)].same_heads_as, h[b.format(0, 1)].same_heads_as),
                (None, b.format(1, 0), b.format(0, 0)))
    x = torch.randint(2, 100, (2, 12))
    Pruner(m, x, strict=False, heads=h).prune(0.5)
    fct.test_eq([t.encoder.block[1].layer[0].SelfAttention.n_heads for t in m.towers], [2, 1])
    cfg = T.UdopConfig(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, image_size=32, patch_size=16)
    with pytest.raises(ValueError, match='outside the attention blocks'): hf_heads(T.UdopForConditionalGeneration(cfg))


# ---------------------------------------------------------------- Swin (a position table with a column per head)

def _swin_cfg(**kw):
    return dict(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                window_size=4, **kw)


def _hf_swin():
    "A tiny Swin classifier; its position tables random (transformers starts them at zero, a trained model's differ)"
    torch.manual_seed(0)
    m = T.SwinForImageClassification(T.SwinConfig(**_swin_cfg(num_labels=5))).eval()
    with torch.no_grad():
        for a in _swin_blocks(m): a.relative_position_bias.relative_position_bias_table.normal_()
    return m


def _swin_x(): return {'pixel_values': torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _swin_blocks(m): return [b.attention for st in m.swin.encoder.layers for b in st.blocks]


def test_hf_swin_heads_pruned_with_their_table_columns():
    "hf_heads refused Swin (its relative position table); it names the table now, and heads go with their columns"
    m, x = _hf_swin(), _swin_x()
    h = hf_heads(m)
    fct.test_eq(list(h), ['swin.encoder.layers.*.blocks.*.attention'])
    fct.test_eq(h['swin.encoder.layers.*.blocks.*.attention'].table,
                'relative_position_bias.relative_position_bias_table')
    fct.test_eq(list(hf_heads(T.SwinModel(m.config))), ['encoder.layers.*.blocks.*.attention'])
    pr = Pruner(m, x, strict=False, heads=h)
    pr.prune(0.5)
    fct.test_eq(pr.history[-1]['heads_removed'], 2 * 1 + 2 * 2)
    assert pr.history[-1]['rel_error'] <= 1e-5
    for a in _swin_blocks(m):
        H = a.num_attention_heads
        t = a.relative_position_bias.relative_position_bias_table
        fct.test_eq((a.q_proj.out_features, a.o_proj.in_features, t.shape[1]), (8 * H, 8 * H, H))
    fct.test_eq([a.num_attention_heads for a in _swin_blocks(m)], [1, 1, 2, 2])
    with torch.no_grad(): fct.test_eq(m(**x).logits.shape, (2, 5))


def test_hf_swin_compact_equals_the_masked_model_and_round_trips(tmp_path):
    "Heads silenced by hand (o_proj columns zero) go; kept heads keep their own table columns; saved, pickled, copied"
    m, x = _hf_swin(), _swin_x()
    a = _swin_blocks(m)[3]  # a shifted block of 4 heads
    t0 = a.relative_position_bias.relative_position_bias_table.detach().clone()
    with torch.no_grad():
        a.o_proj.weight[:, 8:16] = 0  # heads 1 and 3
        a.o_proj.weight[:, 24:32] = 0
        ref = m(**x).logits
    Pruner(m, x, strict=False, heads=hf_heads(m)).compact()
    fct.test_eq((a.num_attention_heads, a.q_proj.out_features, a.v_proj.out_features), (2, 16, 16))
    fct.test_eq(a.relative_position_bias.relative_position_bias_table.detach(), t0[:, [0, 2]])
    with torch.no_grad(): fct.test_close(m(**x).logits, ref, eps=1e-5)
    save_pruned(m, tmp_path / 'swin.pt')
    fresh = load_pruned(_hf_swin(), tmp_path / 'swin.pt')
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for c in (fresh, torch.load(buf, weights_only=False), copy.deepcopy(m)):
        with torch.no_grad(): fct.test_eq(c(**x).logits, m(**x).logits)
    with pytest.raises(ValueError, match='save_pruned'): hf_config_after_prune(m)  # SwinConfig: num_heads per stage


def test_hf_swin_wrong_cut_caught(monkeypatch):
    "Kept heads given their neighbours' table columns, or the table left whole: the check refuses, the model restored"
    from fasterprune.pruner import _Surgery
    m, x = _hf_swin(), _swin_x()
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    cut = _Surgery.cut_param
    def wrong(self, p, dim, idx):
        cut(self, p, dim, idx)
        if p is not None and p.dim() == 2 and p.shape[0] == 49 and len(idx) > 1: self.set(p, 'data', p.data.roll(1, 1))
    with monkeypatch.context() as mp:
        mp.setattr(_Surgery, 'cut_param', wrong)
        with pytest.raises(SurgeryError, match='restored'): Pruner(m, x, strict=False, heads=hf_heads(m)).prune(0.5)
    no_table = {k: dataclasses.replace(s, table=None) for k, s in hf_heads(m).items()}
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, x, strict=False, heads=no_table).prune(0.5)
    fct.test_eq([a.num_attention_heads for a in _swin_blocks(m)], [2, 2, 4, 4])
    sd = m.state_dict()
    fct.test_eq(all(torch.equal(sd[k], v) for k, v in sd0.items()) and set(sd) == set(sd0), True)


def test_hf_swin_table_spec_errors_name_the_problem():
    m, x = _hf_swin(), _swin_x()
    (k, s), = hf_heads(m).items()
    for table, msg in (('relative_position_bias.relative_position_index', 'last dimension is the 2 heads'),
                       ('relative_position_bias.nothing', r"has no \['relative_position_bias.nothing'\]")):
        with pytest.raises(ValueError, match=msg):
            Pruner(m, x, strict=False, heads={k: dataclasses.replace(s, table=table)}).prune(0.5)


def test_hf_swin_sparsifier_zeroes_heads_then_compact_removes_them():
    "Filter masks coupled with hf_heads zero whole Swin heads; compact() removes them with their table columns"
    from fasterprune.sparsifier import Sparsifier
    m, x = _hf_swin(), _swin_x()
    Sparsifier(m, 'filter', 'local', exclude='classifier').couple(x, strict=False, heads=hf_heads(m)).sparsify(0.5)
    dead = [int((a.v_proj.weight.reshape(a.num_attention_heads, -1) == 0).all(1).sum()) for a in _swin_blocks(m)]
    fct.test_eq(dead, [1, 1, 2, 2])
    with torch.no_grad(): ref = m(**x).logits
    Pruner(m, x, strict=False, heads=hf_heads(m)).compact()
    fct.test_eq([(a.num_attention_heads, a.relative_position_bias.relative_position_bias_table.shape[1])
                 for a in _swin_blocks(m)], [(1, 1), (1, 1), (2, 2), (2, 2)])
    with torch.no_grad(): fct.test_close(m(**x).logits, ref, eps=1e-5)


def test_donut_swin_bert_layout_heads_pruned():
    "Donut-Swin keeps the older Swin layout (BERT's `self.query`, `output.dense`, the table in `self`): named, verified"
    torch.manual_seed(0)
    m, x = T.DonutSwinModel(T.DonutSwinConfig(**_swin_cfg())).eval(), _swin_x()
    h = hf_heads(m)
    fct.test_eq(h['encoder.layers.*.blocks.*.attention'].table, 'self.relative_position_bias_table')
    pr = Pruner(m, x, strict=False, heads=h)
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5
    a = m.encoder.layers[1].blocks[1].attention
    fct.test_eq((a.self.num_attention_heads, a.self.all_head_size, a.self.relative_position_bias_table.shape[1],
                 a.output.dense.in_features), (2, 16, 2, 16))


def test_hf_swin_v2_and_per_head_tensors_stay_refused():
    "Swin V2 (a logit scale per head, a position-bias MLP) is still refused by name, naming the tensor"
    torch.manual_seed(0)
    m = T.Swinv2Model(T.Swinv2Config(**_swin_cfg()))
    with pytest.raises(ValueError, match=r"Swinv2Attention: self.logit_scale \(2, 1, 1\).*without heads="): hf_heads(m)


# ---------------------------------------------------------------- GPT-OSS (one learned attention sink per query head)

def _gpt_oss():
    torch.manual_seed(0)
    cfg = T.GptOssConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    m = T.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for l in m.model.layers: l.self_attn.sinks.normal_(0., 2.)  # one sink per head, unlike one another
    return m


def test_gpt_oss_sinks_go_with_their_heads(tmp_path):
    "GPT-OSS was refused for its sinks (H,); `table='sinks'` cuts them with their k/v group's query heads"
    x, mask = _tokens()
    m = _gpt_oss()
    dense = copy.deepcopy(m)
    h = hf_heads(m)
    fct.test_eq(h['model.layers.*.self_attn'].table, 'sinks')
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=h)
    pr.prune(0.5)
    fct.test_eq(pr.history[-1]['heads_removed'], 4)  # one k/v group of two in each layer, with its two query heads
    assert pr.history[-1]['rel_error'] <= 1e-5
    for a, d in zip((l.self_attn for l in m.model.layers), (l.self_attn for l in dense.model.layers)):
        kept = _kept_heads(d.o_proj.weight, a.o_proj.weight, 16)
        fct.test_eq((a.q_proj.out_features, a.k_proj.out_features, a.sinks.shape[0], len(kept)), (32, 16, 2, 2))
        fct.test_eq(a.sinks.detach(), d.sinks.detach()[kept])  # each kept head keeps its own sink
    m.generate(x[:, :4], attention_mask=mask[:, :4], max_new_tokens=3, do_sample=False)
    hf_config_after_prune(m)
    m.save_pretrained(tmp_path / 'oss')
    back = T.GptOssForCausalLM.from_pretrained(tmp_path / 'oss').eval()
    with torch.no_grad():
        fct.test_eq(back(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)


def test_gpt_oss_wrong_sinks_caught(monkeypatch):
    "Kept heads given each other's sinks: the Pruner's check refuses the cut and restores the model"
    from fasterprune.pruner import _Surgery
    x, mask = _tokens()
    m = _gpt_oss()
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    cut = _Surgery.cut_param
    def wrong(self, p, dim, idx):
        cut(self, p, dim, idx)
        if p is not None and p.dim() == 1 and p.shape[0] == 2 and len(idx) == 2 and p.requires_grad and \
                any(p is l.self_attn.sinks for l in m.model.layers):
            self.set(p, 'data', p.data.flip(0))
    monkeypatch.setattr(_Surgery, 'cut_param', wrong)
    with pytest.raises(SurgeryError, match='restored'):
        Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=hf_heads(m)).prune(0.5)
    sd = m.state_dict()
    fct.test_eq(all(torch.equal(sd[k], v) for k, v in sd0.items()), True)
