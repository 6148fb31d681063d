"A user trial's findings (W7) on Hugging Face families the Pruner met: each test fails on the code before"
import logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn
import torch.nn.functional as F
from fasterprune.graph import ChannelGraph, UnknownOpError
from fasterprune.pruner import Pruner, SurgeryError
from fasterprune.sparsifier import Sparsifier

T = pytest.importorskip('transformers')
T.logging.set_verbosity_error()


def _ids(seed=0):
    torch.manual_seed(seed)
    x = torch.randint(1, 120, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    return {'input_ids': x, 'attention_mask': mask}

_bert = dict(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)


# 1. a masked-LM decoder tied to the word embeddings: its input columns were cut, and the embeddings with them
def test_tied_masked_lm_prunes_the_tie_kept():
    ex = _ids()
    m = T.BertForMaskedLM(T.BertConfig(**_bert)).eval()
    emb, dec = m.bert.embeddings.word_embeddings, m.cls.predictions.decoder
    assert dec.weight is emb.weight
    g = ChannelGraph(m, ex, strict=False)
    assert 'weight shared by' in g.comp_reason[int(g.slots['cls.predictions.decoder', 'in'].comp[0])]
    Pruner(m, ex, strict=False).prune(0.3)
    assert dec.weight is emb.weight
    fct.test_eq(emb.weight.shape, (120, 64))
    assert m.bert.encoder.layer[0].intermediate.dense.out_features < 128  # the rest prunes

def test_tied_masked_lm_filter_masks_compact_the_tie_kept():
    ex = _ids()
    m = T.BertForMaskedLM(T.BertConfig(**_bert)).eval()
    sp = Sparsifier(m, 'filter', 'local', exclude='cls.predictions.decoder')
    sp.couple(ex, strict=False)
    sp.sparsify(0.3)
    Pruner(m, ex, strict=False).compact()
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    fct.test_eq(m.bert.embeddings.word_embeddings.weight.shape, (120, 64))
    assert m.bert.encoder.layer[0].intermediate.dense.out_features < 128
    out = m(**ex).logits
    fct.test_eq(out.shape, (2, 12, 120))


# 2. MoE decoders: the recorded forward lost `inv[perm] = arange(...)` (grouped_mm routing), and the labelling pass
#    indexed with an uninitialised `empty_like`: a raw IndexError whose index changed every run
def _mixtral():
    torch.manual_seed(0)
    return T.MixtralForCausalLM(T.MixtralConfig(vocab_size=120, hidden_size=64, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()

def test_moe_decoder_attention_prunes_the_experts_kept():
    from fasterprune.hf import hf_heads
    m, ex = _mixtral(), _ids()
    experts = {n: p.clone() for n, p in m.named_parameters() if 'experts' in n}
    g = ChannelGraph(m, ex, strict=False)
    # the experts' own ops keep their channels, and the message names the module they run in
    assert any('_grouped_mm' in k and "'model.layers.0.mlp.experts'" in k for k in g.unknown), list(g.unknown)
    Pruner(m, ex, strict=False, heads=hf_heads(m)).prune(0.5)
    fct.test_eq(m.model.layers[0].self_attn.q_proj.out_features, 32)
    for n, p in m.named_parameters():
        if 'experts' in n: assert torch.equal(p, experts[n]), n
    fct.test_eq(m(**ex).logits.shape, (2, 12, 120))

class _Routed(nn.Module):
    "Tokens sorted by a data-dependent order and put back with an inverse permutation written in place"
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
    def forward(self, x):
        h = F.relu(self.a(x))
        if x.sum() > 1e9: h = h * 2  # data-dependent: torch.fx cannot trace it, the forward is recorded
        perm = torch.argsort(x[:, 0])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm))
        return self.b(h[perm][inv])

def test_in_place_write_of_a_recorded_forward_is_replayed():
    torch.manual_seed(0)
    m, x = _Routed().eval(), torch.randn(32, 8)
    g = ChannelGraph(m, x)
    assert g.untraced  # recorded
    assert torch.equal(g.output, m(x))  # the labelling run computed what the model computes
    Pruner(m, x).prune(0.5)
    fct.test_eq(m.a.out_features, 8)


# 3. the callback coupled on one unpadded training item (strict=True recorded); Pruner(learn) traced a padded
#    validation batch whose mask takes another path (`new_ones`) and refused what the callback had pruned around
def _gpt2_learner():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    from fasterprune.hf import hf_heads, conv1d_to_linear
    from fit_checks import LogitsOf
    def lm_loss(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.manual_seed(0)
    ids = torch.randint(1, 120, (24, 12))
    am = torch.ones_like(ids)
    am[16::2, :3] = 0  # training items unpadded, validation ones padded
    ds = [({'input_ids': t, 'attention_mask': a}, t) for t, a in zip(ids, am)]
    dls = DataLoaders(DataLoader(ds[:16], bs=16), DataLoader(ds[16:], bs=8), device='cpu')
    cfg = T.GPT2Config(vocab_size=120, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    model = LogitsOf(conv1d_to_linear(T.GPT2LMHeadModel(cfg)))
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', heads=hf_heads(model), exclude='lm.lm_head')
    return Learner(dls, model, loss_func=lm_loss, cbs=cb)

def test_pruner_of_a_learner_keeps_an_op_its_callback_did_not_meet(caplog):
    learn = _gpt2_learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn._sparsify_strict is True
    fct.test_fail(lambda: Pruner(learn, strict=True).compact(), contains='new_ones')  # asked for: still refused
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(learn).compact()
    assert 'SparsifyCallback did not meet' in caplog.text and 'new_ones' in caplog.text
    fct.test_eq(learn.model.lm.transformer.h[0].mlp.c_fc.out_features, 64)  # half of 128 removed
    xb = learn.dls.valid.one_batch()[0]
    fct.test_eq(learn.model(xb).shape, (8, 12, 120))


# 4. Falcon's FalconLinear (an nn.Linear subclass, `input @ self.weight.T + bias`) was invisible to the graph; a
#    subclass whose forward is not F.linear of its weight is still never cut silently
class _MatmulLinear(nn.Linear):
    "FalconLinear's forward, in a model torch.fx traces"
    def forward(self, x): return x @ self.weight.T + self.bias

class _Scaled(nn.Linear):
    "Not F.linear of its weight: traced inside, its matmul keeps the channels"
    def forward(self, x): return (x @ self.weight.T) * 2 + self.bias

class _Sneaky(nn.Linear):
    "F.linear on a few rows (what a probe sees), scaled by a ramp over its width on a larger batch"
    def forward(self, x):
        y = x @ self.weight.T + self.bias
        return y if x.shape[0] <= 3 else y * torch.linspace(0.5, 1.5, y.shape[-1])

class _Net(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.a, self.b = lin(6, 16), nn.Linear(16, 3)
    def forward(self, x): return self.b(F.relu(self.a(x)))

def test_falcon_linear_layers_prune_and_verify_other_subclasses_never_cut_silently():
    torch.manual_seed(0)
    m = T.FalconForCausalLM(T.FalconConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    ex = _ids()
    p = Pruner(m, ex, strict=False)
    p.prune(0.3)
    mlp = m.transformer.h[0].mlp
    assert mlp.dense_h_to_4h.out_features < 256 and type(mlp.dense_h_to_4h).__name__ == 'FalconLinear'
    fct.test_eq(mlp.dense_4h_to_h.in_features, mlp.dense_h_to_4h.out_features)
    assert p.history[-1]['rel_error'] <= p.history[-1]['rtol']  # verified
    fct.test_eq(m(**ex).logits.shape, (2, 12, 120))
    # the same forward in a model torch.fx traces (not recorded)
    x = torch.randn(8, 6)
    m = _Net(_MatmulLinear).eval()
    Pruner(m, x).prune(0.5)
    fct.test_eq(m.a.weight.shape, (8, 6))
    # not F.linear of its weight: its channels stay
    m = _Net(_Scaled).eval()
    Pruner(m, x, strict=False).prune(0.5)
    fct.test_eq(m.a.weight.shape, (16, 6))
    # F.linear on the probe's rows only: the cut is verified and refused, the model as it was
    m = _Net(_Sneaky).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    fct.test_fail(lambda: Pruner(m, x, strict=False).prune(0.5), contains='differs')
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


# 5. GPT-NeoX's fused query_key_value is interleaved per head: verification caught the wrong cut, but the message
#    blamed `rotary_ndims`, an attribute that merely equalled the old head count
def test_interleaved_fused_qkv_refusal_names_the_layout_not_an_equal_attribute():
    from fasterprune.graph import AttentionHeads
    torch.manual_seed(0)
    m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    fct.test_eq(m.gpt_neox.layers[0].attention.rotary_ndims, 4)  # equals the head count
    heads = {'gpt_neox.layers.*.attention': AttentionHeads(num_heads=None, qkv='query_key_value', o='dense',
                                                           head_dim='head_size')}
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError) as e: Pruner(m, _ids(), strict=False, heads=heads).prune(0.5)
    assert 'differs' in str(e.value) and 'interleaved per head' in str(e.value)
    assert 'rotary_ndims' not in str(e.value)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
