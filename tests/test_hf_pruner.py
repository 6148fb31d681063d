"""The Pruner on real (tiny, random-weight) Hugging Face transformers models, as a user meets them: Llama with grouped
and multi-query attention and its default KV cache, BERT's heads named with dotted paths, dict batches of keyword
arguments, GPT-2's Conv1D, and `report()`."""
import copy, logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn, torch.nn.functional as F
from fasterprune.graph import AttentionHeads, UnknownOpError
from fasterprune.pruner import Pruner, save_pruned, load_pruned

T = pytest.importorskip('transformers')
V = 100


def _llama(kv:int, **kw):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=kv, **kw)
    return T.LlamaForCausalLM(cfg).eval()

def _ids(b=2, t=8):
    torch.manual_seed(1)
    x = torch.randint(0, V, (b, t))
    am = torch.ones_like(x)
    am[0, :3] = 0  # a left-padded row: the path that builds a mask and reads n_rep
    return x, am

def _state(m): return {k: v.clone() for k, v in m.state_dict().items()}

def _same(m, sd): return all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())

LLAMA = 'model.layers.*.self_attn'


def test_mqa_llama_refuses_an_unnamed_n_rep_then_prunes_with_it():
    "MQA (1 k/v head): query heads go; an unnamed `num_key_value_groups` would go stale (eager, padded): refused first"
    m = _llama(1, use_cache=False)
    x, am = _ids()
    sd = _state(m)
    with pytest.raises(ValueError, match="n_rep='num_key_value_groups'"):
        Pruner(m, x, strict=False, heads={LLAMA: AttentionHeads(num_heads=None, head_dim='head_dim')}).prune(0.5)
    assert _same(m, sd) and m.model.layers[0].self_attn.num_key_value_groups == 4
    spec = AttentionHeads(num_heads=None, head_dim='head_dim', n_rep='num_key_value_groups')
    pr = Pruner(m, x, strict=False, heads={LLAMA: spec})
    pr.prune(0.5)
    a = m.model.layers[0].self_attn
    fct.test_eq((a.q_proj.out_features, a.k_proj.out_features, a.o_proj.in_features, a.num_key_value_groups),
                (16, 8, 16, 2))
    assert pr.history[-1]['rel_error'] <= 1e-5
    with torch.no_grad():
        sdpa = m(input_ids=x, attention_mask=am).logits  # crashed on the stale count before
        m.set_attn_implementation('eager')
        eager = m(input_ids=x, attention_mask=am).logits
    keep = am.bool()  # a fully masked padding position differs between the two kernels
    fct.test_close(eager[keep], sdpa[keep], eps=1e-4)


def test_heads_none_refuses_a_head_count_it_would_leave_stale():
    "num_heads=None infers the counts from the widths; a `num_heads` attribute of the block would keep the old count"
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = 4, 8
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))
        def forward(self, x):
            q, k, v = (p(x).view(*x.shape[:2], self.num_heads, -1).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(*x.shape[:2], -1))
    m, x = nn.Sequential(Attn(), nn.Linear(32, 3)).eval(), torch.randn(2, 5, 32)
    sd = _state(m)
    with pytest.raises(ValueError, match="num_heads='num_heads'"):
        Pruner(m, x, heads={'0': AttentionHeads(num_heads=None, head_dim='head_dim')}).prune(0.5)
    assert _same(m, sd)
    Pruner(m, x, heads={'0': AttentionHeads(num_heads='num_heads', head_dim='head_dim')}).prune(0.5)
    fct.test_eq((m[0].num_heads, m[0].q_proj.out_features), (2, 16))


def test_heads_none_refuses_a_kv_head_count_it_would_leave_stale():
    "Grouped-query attention named by its widths: a `num_key_value_heads` the forward splits k, v with must be named"
    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim, self.num_key_value_heads = 8, 2
            self.q_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32)
            self.k_proj, self.v_proj = nn.Linear(32, 16), nn.Linear(32, 16)
        def forward(self, x):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
            k, v = (p(x).view(B, T, self.num_key_value_heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    m, x = nn.Sequential(GQA(), nn.Linear(32, 3)).eval(), torch.randn(2, 5, 32)
    sd = _state(m)
    with pytest.raises(ValueError, match="num_kv_heads='num_key_value_heads'"):
        Pruner(m, x, heads={'0': AttentionHeads(num_heads=None, head_dim='head_dim')}).prune(0.5)
    assert _same(m, sd)
    spec = AttentionHeads(num_heads=None, head_dim='head_dim', num_kv_heads='num_key_value_heads')
    pr = Pruner(m, x, heads={'0': spec})
    pr.prune(0.5)
    fct.test_eq((m[0].num_key_value_heads, m[0].q_proj.out_features, m[0].k_proj.out_features), (1, 16, 8))
    assert pr.history[-1]['rel_error'] <= 1e-5


@pytest.mark.parametrize('heads', [True, False])
def test_llama_default_config_with_its_kv_cache_prunes_and_generates(heads):
    "use_cache=True (HF's default): DynamicCache's torch.cat of an empty (0,) tensor used to be a bare IndexError"
    m = _llama(2)
    assert m.config.use_cache
    x, am = _ids()
    spec = {LLAMA: AttentionHeads(num_heads=None, head_dim='head_dim')} if heads else None
    pr = Pruner(m, x, strict=False, heads=spec)
    pr.prune(0.5)
    a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    fct.test_eq((a.q_proj.out_features, a.k_proj.out_features, mlp.up_proj.out_features), (16, 8, 32) if heads
                else (32, 16, 32))
    assert pr.history[-1]['rel_error'] <= 1e-5
    with torch.no_grad():
        fct.test_eq(m(input_ids=x, attention_mask=am).logits.shape, (2, 8, V))
        out = m.generate(x[:1], attention_mask=am[1:], max_new_tokens=3, do_sample=False)
    fct.test_eq(out.shape, (1, 11))


class _Wrap(nn.Module):
    "fastai calls `model(*xb)`: the batch dict goes in whole, the logits come out"
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, batch): return self.m(**batch).logits


def test_dict_example_is_keyword_arguments_and_report_runs():
    "A top-level dict is keyword arguments (as the metrics take it); `(batch,)` passes the dict itself; report() runs"
    m = _llama(2, use_cache=False)
    x, am = _ids()
    batch = {'input_ids': x, 'attention_mask': am}
    pr = Pruner(m, batch, strict=False, heads={LLAMA: AttentionHeads(num_heads=None, head_dim='head_dim')})
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5 and m.model.layers[0].self_attn.k_proj.out_features == 8
    r = pr.report(batch_sizes=(2,), n_runs=1)
    fct.test_eq(list(r.index), ['original', 'pruned'])
    assert r.loc['pruned', 'flops'] < r.loc['original', 'flops'] and r.loc['pruned', 'compression_ratio'] > 1
    w = _Wrap(_llama(2, use_cache=False))
    with pytest.raises(RuntimeError, match=r"pass `\(batch,\)`"): Pruner(w, batch, strict=False).prune(0.5)
    pw = Pruner(w, (batch,), strict=False)
    pw.prune(0.5)
    fct.test_eq(w.m.model.layers[0].mlp.up_proj.out_features, 32)
    fct.test_eq(pw.report(batch_sizes=()).loc['pruned', 'params'], sum(p.numel() for p in w.parameters()))


def test_pruner_of_a_learner_on_dict_batches_calls_the_model_as_fastai_does():
    "Pruner(learn) on (dict, target) batches: `model(*xb)` (the dict whole), verified; report() ran into the dict keys"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    torch.manual_seed(0)
    ids = torch.randint(0, V, (32, 8))
    ds = [({'input_ids': ids[i], 'attention_mask': torch.ones(8, dtype=torch.long)}, ids[i]) for i in range(32)]
    dls = DataLoaders(DataLoader(ds, bs=16), DataLoader(ds[:16], bs=16), device=torch.device('cpu'))
    loss = lambda out, y: F.cross_entropy(out.reshape(-1, V), y.reshape(-1))
    learn = Learner(dls, _Wrap(_llama(2, use_cache=False)), loss_func=loss)
    pr = Pruner(learn, strict=False)
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5
    fct.test_eq(learn.model.m.model.layers[0].mlp.up_proj.out_features, 32)
    fct.test_eq(pr.report(batch_sizes=()).loc['pruned', 'params'], sum(p.numel() for p in learn.model.parameters()))


def _bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    return T.BertForSequenceClassification(cfg).eval()

BERT = 'bert.encoder.layer.*.attention'
PROJ = dict(q='self.query', k='self.key', v='self.value', o='output.dense')


def test_bert_heads_named_with_dotted_paths(tmp_path, caplog):
    "BERT: o in a sibling (`output.dense`), the counts in a child (`self.*`): dotted paths read and set them there"
    x, am = _ids()
    batch = {'input_ids': x, 'attention_mask': am}
    m = _bert()
    spec = AttentionHeads(num_heads=None, head_dim='self.attention_head_size', **PROJ)
    with caplog.at_level(logging.WARNING, logger='fasterprune'):
        pr = Pruner(m, batch, strict=False, heads={BERT: spec})
        pr.prune(0.5)
    a = m.bert.encoder.layer[0].attention
    fct.test_eq((a.self.query.out_features, a.self.value.out_features, a.output.dense.in_features), (16, 16, 16))
    assert pr.history[-1]['rel_error'] <= 1e-5 and pr.history[-1]['heads_removed'] == 2
    assert 'self.num_attention_heads = 4' in caplog.text and 'self.all_head_size = 32' in caplog.text, caplog.text
    m = _bert()
    spec = AttentionHeads(num_heads='self.num_attention_heads', head_dim='self.attention_head_size',
                          width='self.all_head_size', **PROJ)
    Pruner(m, batch, strict=False, heads={BERT: spec}).prune(0.5)
    s = m.bert.encoder.layer[0].attention.self
    fct.test_eq((s.num_attention_heads, s.all_head_size, s.attention_head_size), (2, 16, 8))
    save_pruned(m, tmp_path / 'bert.pt')
    fresh = load_pruned(_bert(), tmp_path / 'bert.pt')
    fct.test_eq(fresh.bert.encoder.layer[0].attention.self.all_head_size, 16)
    with torch.no_grad(): assert torch.equal(fresh(**batch).logits, m(**batch).logits)


def test_mistral_kv_count_that_names_nothing_says_what_to_name():
    "Mistral 5.x blocks hold no head counts: naming them says to use num_heads=None, head_dim='head_dim'"
    torch.manual_seed(0)
    m = T.MistralForCausalLM(T.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
    x, _ = _ids()
    bad = AttentionHeads('num_heads', num_kv_heads='num_key_value_heads')
    for key in (LLAMA, 'model.layers.0.self_attn'):
        with pytest.raises(ValueError, match=r"num_heads=None, head_dim='head_dim'"):
            Pruner(m, x, strict=False, heads={key: bad}).prune(0.5)
    pr = Pruner(m, x, strict=False, heads={LLAMA: AttentionHeads(num_heads=None, head_dim='head_dim')})
    pr.prune(0.5)
    assert pr.history[-1]['rel_error'] <= 1e-5 and m.model.layers[0].self_attn.k_proj.out_features == 8
    with torch.no_grad(): fct.test_eq(m.generate(x[:1], max_new_tokens=2, do_sample=False).shape, (1, 10))


def test_gpt2_conv1d_says_why_and_what_to_do(caplog):
    "GPT-2's Conv1D (weight (in, out)) is no layer the Pruner cuts: the messages name it and conv1d_to_linear"
    torch.manual_seed(0)
    m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    x, _ = _ids()
    with pytest.raises(UnknownOpError, match='conv1d_to_linear'): Pruner(m, x).prune(0.5)
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(m, x, strict=False).prune(0.5)
    assert 'nothing to remove' in caplog.text and 'Conv1D' in caplog.text and 'conv1d_to_linear(model)' in caplog.text


def test_inputs_the_example_does_not_give_trace_at_their_defaults():
    "`forward(x, mask=None)`: torch.fx traced `mask` as a value (the `is not None` branch), then ran with None"
    class Masked(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        def forward(self, x, mask=None):
            out = self.b(torch.relu(self.a(x)))
            if mask is not None: out = out * mask
            return out
    torch.manual_seed(0)
    x, mask = torch.randn(4, 6), torch.tensor([[1.], [0.], [1.], [1.]])
    for example in (x, {'x': x}, {'x': x, 'mask': mask}, (x, mask)):
        m = Masked().eval()
        pr = Pruner(m, example)
        pr.prune(0.5)
        fct.test_eq(m.a.out_features, 4)
        assert pr.history[-1]['rel_error'] <= 1e-5, example
