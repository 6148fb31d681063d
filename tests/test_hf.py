"Hugging Face interop (fasterprune.hf): tiny transformers models built from configs, random weights, no download"
import copy, subprocess, sys
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import fastcore.test as fct

T = pytest.importorskip('transformers')
from fasterprune.hf import conv1d_to_linear, hf_heads, hf_config_after_prune
from fasterprune.graph import AttentionHeads
from fasterprune.pruner import Pruner, save_pruned, load_pruned
from fasterprune.sparsifier import prunable_layers
from fasterprune.metrics import count_flops

T.logging.set_verbosity_error()
T.utils.logging.disable_progress_bar()
_classes = T.GPT2LMHeadModel, T.LlamaForCausalLM  # their modules' first import (2 s) at collection, not in a test
V = 100
IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _tokens():
    torch.manual_seed(0)
    x = torch.randint(1, V, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    return x, mask


def _decoder(kind='llama', kv=2, **kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=kv, max_position_embeddings=64, **IDS)
    cls, ccls = {'llama': (T.LlamaForCausalLM, T.LlamaConfig), 'mistral': (T.MistralForCausalLM, T.MistralConfig),
                 'qwen2': (T.Qwen2ForCausalLM, T.Qwen2Config), 'gemma': (T.GemmaForCausalLM, T.GemmaConfig)}[kind]
    if kind == 'gemma': base['head_dim'] = 16
    torch.manual_seed(0)
    return cls(ccls(**{**base, **kw})).eval()


def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()


def _still_works(m, x, mask, causal=True):
    "The Hugging Face calls after a prune: a padded batch with labels, and (causal LMs) generate with the cache"
    with torch.no_grad():
        out = m(input_ids=x, attention_mask=mask, labels=x if causal else torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)
    if causal:
        g = m.generate(x[:, :4], attention_mask=mask[:, :4], max_new_tokens=3, do_sample=False, use_cache=True)
        fct.test_eq(g.shape, (2, 7))


def test_fasterprune_hf_imports_without_transformers():
    "transformers is a test dependency only: the module must import when it is missing"
    code = "import sys; sys.modules['transformers'] = None; import fasterprune.hf; assert 'transformers' not in " \
           "{k for k, v in sys.modules.items() if v is not None}"
    subprocess.run([sys.executable, '-c', code], check=True)


def test_conv1d_to_linear_gpt2_layers_become_visible():
    "GPT-2's Conv1D: the Sparsifier and FLOPs saw only the tied lm_head; after the swap every layer, same output"
    m, (x, _) = _gpt2(), _tokens()
    with torch.no_grad():
        m.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
        ref = m(x).logits
    fct.test_eq(list(prunable_layers(m)), ['lm_head'])
    flops0 = count_flops(m, x[:1])[0]
    assert conv1d_to_linear(m) is m
    lins = {n for n, l in m.named_modules() if isinstance(l, nn.Linear)}
    fct.test_eq(len(lins), 9)  # c_attn, c_proj, c_fc, c_proj per layer, and lm_head
    assert not any(type(l).__name__ == 'Conv1D' for l in m.modules())
    fc = m.transformer.h[1].mlp.c_fc
    fct.test_eq((fc.in_features, fc.out_features, fc.weight.requires_grad), (64, 256, False))
    assert m.transformer.h[0].attn.c_attn.weight.requires_grad
    with torch.no_grad(): torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=1e-6)
    assert count_flops(m, x[:1])[0] > 10 * flops0
    with pytest.raises(ValueError, match='no transformers Conv1D'): conv1d_to_linear(m)


def test_conv1d_to_linear_keeps_dtype_and_sharing():
    "float64 stays float64; one Conv1D used at two places stays one Linear; a tied Conv1D weight is refused, untouched"
    from transformers.pytorch_utils import Conv1D
    c = Conv1D(6, 4).double()
    m = nn.Sequential(c, nn.ReLU(), nn.Linear(6, 4).double(), c)
    x = torch.randn(3, 4, dtype=torch.float64)
    ref = m(x)
    conv1d_to_linear(m)
    assert m[0] is m[3] and isinstance(m[0], nn.Linear) and m[0].weight.dtype == torch.float64
    torch.testing.assert_close(m(x), ref)
    c2 = Conv1D(4, 4)
    tied = nn.Sequential(c2, nn.Linear(4, 4))
    tied[1].weight = c2.weight
    with pytest.raises(ValueError, match='shared with'): conv1d_to_linear(tied)
    assert tied[0] is c2
    with pytest.raises(ValueError, match='itself is a Conv1D'): conv1d_to_linear(c2)


@pytest.mark.parametrize('kind,kv', [('llama', 2), ('mistral', 2), ('qwen2', 2), ('gemma', 2), ('llama', 1)])
def test_hf_heads_llama_family_prunes_heads(kind, kv):
    "Llama-style attention (GQA 4/2, and MQA 4/1): hf_heads names it; k/v groups (MQA: query heads) really go"
    m, (x, mask) = _decoder(kind, kv), _tokens()
    heads = hf_heads(m)
    fct.test_eq(list(heads), ['model.layers.*.self_attn'])
    pr = Pruner(m, x, strict=False, heads=heads)
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5
    for l in m.model.layers:  # GQA: 1 of 2 k/v groups with its 2 query heads; MQA: 2 of 4 query heads, k/v stay
        a = l.self_attn
        fct.test_eq((a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features, a.num_key_value_groups),
                    (32, 16, 32, 2))
        fct.test_eq(l.mlp.gate_proj.out_features, 64)
    _still_works(m, x, mask)


def test_hf_heads_gpt2_needs_conv1d_to_linear_then_prunes_heads():
    m, (x, mask) = _gpt2(), _tokens()
    with pytest.raises(ValueError, match='conv1d_to_linear'): hf_heads(m)
    conv1d_to_linear(m)
    heads = hf_heads(m)
    spec = AttentionHeads('num_heads', qkv='c_attn', o='c_proj', head_dim='head_dim', width='split_size')
    fct.test_eq(heads, {'transformer.h.*.attn': spec})
    pr = Pruner(m, x, strict=False, heads=heads)
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5
    a = m.transformer.h[0].attn
    fct.test_eq((a.num_heads, a.split_size, a.c_attn.out_features, a.c_proj.in_features), (2, 32, 96, 32))
    _still_works(m, x, mask)


def test_gpt2_pruned_saves_and_loads_into_a_converted_fresh_model(tmp_path):
    m, (x, mask) = _gpt2(), _tokens()
    conv1d_to_linear(m)
    Pruner(m, x, strict=False, heads=hf_heads(m)).prune(0.5, context='global')
    save_pruned(m, tmp_path / 'g.pt')
    fresh = load_pruned(conv1d_to_linear(_gpt2()), tmp_path / 'g.pt')
    fct.test_eq([l.attn.num_heads for l in fresh.transformer.h], [l.attn.num_heads for l in m.transformer.h])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)
    _still_works(fresh, x, mask)


def test_hf_heads_distilbert():
    torch.manual_seed(0)
    m = T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=V, dim=64, hidden_dim=128, n_layers=2,
                                                                n_heads=4, max_position_embeddings=64, pad_token_id=0))
    m.eval()
    x, mask = _tokens()
    heads = hf_heads(m)
    fct.test_eq(list(heads), ['distilbert.transformer.layer.*.attention'])
    pr = Pruner(m, x, heads=heads)
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5
    a = m.distilbert.transformer.layer[0].attention
    fct.test_eq((a.n_heads, a.q_lin.out_features, a.out_lin.in_features), (2, 32, 32))
    _still_works(m, x, mask, causal=False)


def test_hf_heads_bert_roberta_vit():
    "BERT and RoBERTa (o in a sibling: dotted paths) and ViT (Llama-style, a head count it holds): heads really go"
    torch.manual_seed(0)
    x, mask = _tokens()
    y = torch.tensor([0, 1])
    for cls, ccls, kw in ((T.BertForSequenceClassification, T.BertConfig, {}),
                          (T.RobertaForSequenceClassification, T.RobertaConfig, dict(max_position_embeddings=40))):
        m = cls(ccls(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     **kw)).eval()
        heads = hf_heads(m)
        fct.test_eq(heads[f'{m.base_model_prefix}.encoder.layer.*.attention'],
                    AttentionHeads('self.num_attention_heads', q='self.query', k='self.key', v='self.value',
                                   o='output.dense', head_dim='self.attention_head_size', width='self.all_head_size'))
        pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, strict=False, heads=heads)
        pr.prune(0.5)
        assert pr.history[-1]['rel_error'] <= 1e-5
        s = m.base_model.encoder.layer[1].attention.self
        fct.test_eq((s.num_attention_heads, s.all_head_size, s.query.out_features), (2, 32, 32))
        _still_works(m, x, mask, causal=False)
    vit = T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=128, num_labels=2)).eval()
    heads = hf_heads(vit)
    fct.test_eq(heads['vit.layers.*.attention'].num_heads, 'num_attention_heads')
    img = torch.randn(2, 3, 32, 32)
    pr = Pruner(vit, img, heads=heads)
    pr.prune(0.5)
    a = vit.vit.layers[0].attention
    fct.test_eq((a.num_attention_heads, a.q_proj.out_features, a.o_proj.in_features), (2, 32, 32))
    assert pr.history[-1]['rel_error'] <= 1e-5
    with torch.no_grad(): assert torch.isfinite(vit(pixel_values=img, labels=y).loss)


def test_hf_heads_refuses_unrecognised_attention():
    "A model with attention blocks hf_heads does not know gets an error naming them, not a partial mapping"
    m = _gpt2()
    conv1d_to_linear(m)
    class Odd(nn.Module):  # one block of an unknown kind next to the GPT-2 ones
        def forward(self, x): return x
    Odd.__name__ = 'MyCrossAttention'
    m.transformer.h[1].extra = Odd()
    with pytest.raises(ValueError, match=r'transformer\.h\.1\.extra \(MyCrossAttention, cross-attention\)'): hf_heads(m)
    with pytest.raises(ValueError, match='no attention block'): hf_heads(nn.Sequential(nn.Linear(4, 4)))


def test_hf_heads_pattern_only_where_every_layer_matches():
    "One pattern for the blocks of all layers; a layer whose block needs another spec is named on its own"
    m = _decoder()
    fct.test_eq(list(hf_heads(m)), ['model.layers.*.self_attn'])
    del m.model.layers[1].self_attn.num_key_value_groups  # this block's forward would not read n_rep
    heads = hf_heads(m)
    fct.test_eq(list(heads), ['model.layers.0.self_attn', 'model.layers.1.self_attn'])
    fct.test_eq((heads['model.layers.0.self_attn'].n_rep, heads['model.layers.1.self_attn'].n_rep),
                ('num_key_value_groups', None))


def test_learner_around_hf_model_callback_heads_then_compact():
    "A fastai Learner on dict batches: a wrapper returns logits; SparsifyCallback(heads=hf_heads) then compact()"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    from fit_checks import LogitsOf
    def lm_loss(logits, ids): return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.manual_seed(0)
    ids = torch.randint(1, V, (32, 12))
    ds = [({'input_ids': t, 'attention_mask': torch.ones_like(t)}, t) for t in ids]
    dls = DataLoaders(DataLoader(ds, bs=16, shuffle=True, drop_last=True), DataLoader(ds[:16], bs=16), device='cpu')
    model = LogitsOf(_decoder(tie_word_embeddings=True).train())
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', heads=hf_heads(model), exclude='lm.lm_head')
    learn = Learner(dls, model, loss_func=lm_loss, cbs=cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    a = model.lm.model.layers[0].self_attn
    fct.test_eq(int((a.k_proj.weight.abs().sum(1) == 0).sum()), 16)  # one whole k/v group zeroed
    assert 'lm.lm_head' not in cb.sparsifier.layers  # tied to the token embeddings: no token loses its embedding
    fct.test_eq(int((model.lm.model.embed_tokens.weight.abs().sum(1) == 0).sum()), 0)
    Pruner(learn, strict=False).compact()
    fct.test_eq((a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features), (32, 16, 32))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


def test_save_pruned_load_pruned_tied_llama(tmp_path):
    m, (x, mask) = _decoder(tie_word_embeddings=True), _tokens()
    Pruner(m, x, strict=False, heads=hf_heads(m)).prune(0.5, context='global')
    save_pruned(m, tmp_path / 'p.pt')
    fresh = load_pruned(_decoder(tie_word_embeddings=True), tmp_path / 'p.pt')
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)
    _still_works(fresh, x, mask)


def test_hf_config_after_prune_round_trips_save_pretrained(tmp_path):
    m, (x, mask) = _decoder(), _tokens()
    old = m.config
    Pruner(m, x, strict=False, heads=hf_heads(m)).prune(0.5)
    with pytest.raises(Exception):  # the stale config builds the original shapes
        m.save_pretrained(tmp_path / 'stale')
        T.LlamaForCausalLM.from_pretrained(tmp_path / 'stale')
    cfg = hf_config_after_prune(m)
    assert m.config is cfg and m.model.layers[1].self_attn.config is cfg and cfg is not old
    fct.test_eq((old.num_attention_heads, old.intermediate_size), (4, 128))  # a config other models may share
    fct.test_eq((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size), (2, 1, 16, 64))
    m.save_pretrained(tmp_path / 'hf')
    back = T.LlamaForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x, attention_mask=mask).logits, m(input_ids=x, attention_mask=mask).logits)
    _still_works(back, x, mask)


def test_hf_config_after_prune_refuses_uneven_layers_and_other_models():
    m, (x, _) = _decoder(), _tokens()
    with torch.no_grad(): m.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    Pruner(m, x, strict=False, heads=hf_heads(m)).prune(0.5, context='global')
    widths = [l.mlp.gate_proj.out_features for l in m.model.layers]
    assert widths[0] != widths[1]
    cfg = m.config
    with pytest.raises(ValueError, match='different widths'): hf_config_after_prune(m)
    assert m.config is cfg and cfg.intermediate_size == 128
    g = _gpt2()
    with pytest.raises(ValueError, match='save_pruned'): hf_config_after_prune(g)
    with pytest.raises(TypeError, match='no Hugging Face `config`'): hf_config_after_prune(nn.Linear(3, 3))


@pytest.mark.parametrize('kind', ['opt', 'gptj'])
def test_hf_heads_out_proj_families_prune_heads(kind):
    "OPT and GPT-J (q/k/v_proj, out_proj, embed_dim): recognised, heads removed, verified, the HF calls still work"
    torch.manual_seed(0)
    if kind == 'opt':
        m = T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                         num_attention_heads=4, word_embed_proj_dim=64, **IDS)).eval()
        a = lambda: m.model.decoder.layers[0].self_attn
    else:
        m = T.GPTJForCausalLM(T.GPTJConfig(vocab_size=V, n_embd=64, n_layer=1, n_head=4, rotary_dim=8, n_positions=64,
                                           **IDS)).eval()
        a = lambda: m.transformer.h[0].attn
    x, mask = _tokens()
    heads = hf_heads(m)
    fct.test_eq(list(heads.values())[0].o, 'out_proj')
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, heads=heads, strict=False)
    pr.prune(0.5)
    fct.test_eq((a().q_proj.out_features, a().out_proj.in_features, a().embed_dim), (32, 32, 32))
    assert pr.history[-1]['rel_error'] <= 1e-5
    _still_works(m, x, mask)


def test_hf_heads_refuses_blocks_with_tensors_per_head_or_over_the_width():
    "OLMo2's q_norm over all heads, Cohere's per-head norms: the Pruner would not cut them; refused by name"
    torch.manual_seed(0)
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, **IDS)
    olmo = T.Olmo2ForCausalLM(T.Olmo2Config(**base))
    with pytest.raises(ValueError, match=r"Olmo2Attention: q_norm.weight \(64,\).*without heads="): hf_heads(olmo)
    cohere = T.CohereForCausalLM(T.CohereConfig(**base, use_qk_norm=True))
    with pytest.raises(ValueError, match=r"CohereAttention: q_norm.weight \(4, 16\)"): hf_heads(cohere)
    qwen3 = T.Qwen3ForCausalLM(T.Qwen3Config(**base, head_dim=24))  # q_norm over one head's width: shared, fine
    fct.test_eq(list(hf_heads(qwen3)), ['model.layers.*.self_attn'])


def test_hf_heads_falcon_multi_query_prunes_query_heads():
    "Falcon with multi-query attention (fused query_key_value, one k/v head): its query heads go, verified"
    torch.manual_seed(0)
    m = T.FalconForCausalLM(T.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                           multi_query=True, new_decoder_architecture=False, **IDS)).eval()
    x, mask = _tokens()
    pr = Pruner(m, {'input_ids': x, 'attention_mask': mask}, heads=hf_heads(m), strict=False)
    pr.prune(0.5)
    a = m.transformer.h[0].self_attention
    fct.test_eq((a.num_heads, a.query_key_value.out_features, a.dense.in_features), (2, 64, 32))
    assert pr.history[-1]['rel_error'] <= 1e-5
    _still_works(m, x, mask)
