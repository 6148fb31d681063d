"A new user's findings in the Pruner and the channel graph: each test fails on the code before the fix"
import copy, logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn, torch.nn.functional as F
from fasterprune.graph import AttentionHeads, channel_groups
from fasterprune.pruner import Pruner
from fasterprune.core import model_device


def _net(): return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def _plain_dls(X, Y):
    from torch.utils.data import TensorDataset, DataLoader
    from fastai.data.core import DataLoaders
    return DataLoaders(DataLoader(TensorDataset(X, Y), batch_size=16), DataLoader(TensorDataset(X, Y), batch_size=16))


# 1. Pruner(learn) with fastai DataLoaders made of plain torch DataLoaders (no `one_batch`)
def test_pruner_learner_plain_dataloaders():
    from fastai.learner import Learner
    torch.manual_seed(0)
    X, Y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    learn = Learner(_plain_dls(X, Y), _net(), loss_func=nn.CrossEntropyLoss())
    pr = Pruner(learn)
    fct.test_eq(pr.example_inputs.shape, (16, 3, 8, 8))
    fct.test_eq(pr.example_inputs, X[:16])
    pr.prune(0.5)
    fct.test_eq(learn.model[0].out_channels, 4)


# 5. a ratio dict whose patterns name only pinned layers: an error that says why, the model untouched
def test_ratio_dict_pinned_only_raises():
    torch.manual_seed(0)
    m, x = _net(), torch.randn(2, 3, 8, 8)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError) as e: Pruner(m, x).prune({'4': 0.5})
    msg = str(e.value)
    assert 'pinned' in msg and 'model output' in msg, msg
    assert 'Prunable layers: 0' in msg, msg
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])
    with pytest.raises(ValueError, match='match no layer'): Pruner(m, x).prune({'nothing*': 0.5})
    with pytest.raises(ValueError, match="'4' names only pinned"): Pruner(m, x).prune({'0': 0.5, '4': 0.5})
    fct.test_eq(m[0].out_channels, 8)
    Pruner(m, x).prune({'*': 0.5})  # a pattern that also names prunable layers: those prune
    fct.test_eq(m[0].out_channels, 4)


# 6. Pruner(learn) takes heads= from the Learner's SparsifyCallback
class _Attn(nn.Module):
    def __init__(self, d=16, h=4):
        super().__init__()
        self.n_heads, self.hd = h, d // h
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.hd).transpose(1, 2) for p in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.out = nn.Embedding(20, 16), _Attn(), nn.Linear(16, 20)
    def forward(self, t):
        x = self.emb(t)
        return self.out(x + self.attn(x)).mean(1)

def _lm_setup():
    "A tiny language model on random tokens, its fastai DataLoaders, its heads= and a filter SparsifyCallback"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from torch.utils.data import TensorDataset
    from fasterprune.callback import SparsifyCallback
    torch.manual_seed(0)
    X, Y = torch.randint(0, 20, (64, 6)), torch.randint(0, 20, (64,))
    dls = DataLoaders(DataLoader(TensorDataset(X[:32], Y[:32]), bs=16),
                      DataLoader(TensorDataset(X[32:], Y[32:]), bs=16))
    spec = {'attn': AttentionHeads('n_heads', 'wq', 'wk', 'wv', 'wo')}
    return X, dls, _LM(), spec, SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', heads=spec)

def test_pruner_learner_takes_callback_heads(caplog):
    from fastai.learner import Learner
    X, dls, model, spec, cb = _lm_setup()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=cb)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    zero_rows = int((model.attn.wq.weight.abs().sum(1) == 0).sum())
    assert zero_rows > 0
    with caplog.at_level(logging.INFO, logger='fasterprune'): pr = Pruner(learn)
    assert 'SparsifyCallback' in caplog.text
    fct.test_eq(pr.heads, spec)
    pr.compact()
    fct.test_eq(model.attn.n_heads * model.attn.hd, 16 - zero_rows)
    fct.test_eq(model.attn.wq.weight.shape[0], 16 - zero_rows)


# 2. PyTorch's nn.RMSNorm over the channels: cut, its mean square counted like CountedLayerNorm's statistics
def _rms_net(): return nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

def test_rmsnorm_over_channels_prunes_counted(tmp_path):
    from fasterprune.graph import CountedRMSNorm
    from fasterprune.pruner import save_pruned, load_pruned
    torch.manual_seed(0)
    m, x = _rms_net(), torch.randn(2, 5, 8)
    g0 = next(g for g in channel_groups(m, x) if '0' in g.producers)
    assert not g0.pinned and '1' in g0.norms, g0
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq((m[0].out_features, m[1].weight.shape[0], m[2].in_features, m[2].out_features), (8, 8, 8, 16))
    assert isinstance(m[1], CountedRMSNorm) and m[1].full_count == 16
    assert pr.history[-1]['rel_error'] <= 1e-5
    y = m(x).detach()
    save_pruned(m, tmp_path / 'rms.pt')
    m2 = load_pruned(_rms_net(), tmp_path / 'rms.pt')
    assert isinstance(m2[1], CountedRMSNorm)
    fct.test_close(m2(x), y, eps=1e-6)

def test_rmsnorm_compact_and_constants():
    from fasterprune.graph import CountedRMSNorm
    torch.manual_seed(0)
    m, x = _rms_net(), torch.randn(2, 5, 8)
    with torch.no_grad(): m[0].weight[:6] = 0; m[0].bias[:6] = 0
    ref = m(x).detach()
    Pruner(m, x).compact()
    fct.test_eq((m[0].out_features, m[1].weight.shape[0]), (10, 10))
    fct.test_close(m(x), ref, eps=1e-5)
    # removed channels that held constants c: the mean square adds sum(c^2)
    full, keep = nn.RMSNorm(6, eps=1e-6), torch.tensor([0, 2, 3, 5])
    with torch.no_grad(): full.weight.uniform_(0.5, 1.5)
    xs = torch.randn(3, 4, 6)
    xs[..., 1], xs[..., 4] = 0.7, -1.2
    c = CountedRMSNorm(4, eps=1e-6)
    with torch.no_grad(): c.weight.copy_(full.weight[keep])
    c.full_count, c.removed_sq = 6, 0.7 ** 2 + 1.2 ** 2
    fct.test_close(c(xs[..., keep]), full(xs)[..., keep], eps=1e-6)

def test_rmsnorm_over_several_dims_pins():
    m = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm((5, 16)), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(2, 5, 8)
    g0 = next(g for g in channel_groups(m, x) if '0' in g.producers)
    assert g0.pinned and 'RMSNorm' in g0.reason, g0
    Pruner(m, x).prune(0.5)  # the rest prunes
    fct.test_eq((m[0].out_features, m[2].out_features), (16, 16))


# 3. expand / repeat: pinned when they copy channels (a grey -> RGB adapter), channels pass when they copy elsewhere
class _Copy(nn.Module):
    def __init__(self, f): super().__init__(); self.f = f
    def forward(self, x): return self.f(x)

def _cnn(pre, mid=lambda y: y, c_mid=8, rep=1):
    return nn.Sequential(_Copy(pre), nn.Conv2d(3, c_mid, 3), nn.ReLU(), _Copy(mid), nn.Conv2d(c_mid * rep, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()

@pytest.mark.parametrize('pre', [lambda x: x.expand(-1, 3, -1, -1), lambda x: x.repeat(1, 3, 1, 1),
                                 lambda x: torch.tile(x, (1, 3, 1, 1))])
def test_grey_to_rgb_copy_prunes(pre):
    torch.manual_seed(0)
    m, x = _cnn(pre), torch.randn(2, 1, 16, 16)
    Pruner(m, x).prune(0.5)
    fct.test_eq((m[1].in_channels, m[1].out_channels, m[4].out_channels), (3, 4, 4))

@pytest.mark.parametrize('mid', [lambda y: y.repeat(1, 1, 2, 2), lambda y: y.expand(2, -1, -1, -1),
                                 lambda y: y.mean((2, 3), keepdim=True).expand(-1, -1, 6, 6) + y[:, :, :6, :6]])
def test_copy_along_other_dims_passes_channels(mid):
    torch.manual_seed(0)
    m, x = _cnn(lambda x: x, mid), torch.randn(1, 3, 16, 16)
    gs = channel_groups(m, x)
    fct.test_eq([g.pinned for g in gs], [False, False, True])
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq((m[1].out_channels, m[4].in_channels), (4, 4))

def test_repeat_of_channels_pins_them():
    m = _cnn(lambda x: x, lambda y: y.repeat(1, 4, 1, 1), c_mid=2, rep=4)
    gs = channel_groups(m, torch.randn(1, 3, 16, 16))
    g1 = next(g for g in gs if '1' in g.producers)
    assert g1.pinned and 'repeat copies channels' in g1.reason, g1


# 7. grouped-query attention: the error about repeat_interleave says what it is
class _GQA(nn.Module):
    def __init__(self, d=16, h=4, kv=2):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.wq, self.wo = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.wk, self.wv = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)
    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k, v = (p(x).view(B, T, self.kv, self.hd).transpose(1, 2) for p in (self.wk, self.wv))
        k, v = k.repeat_interleave(self.h // self.kv, dim=1), v.repeat_interleave(self.h // self.kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

def test_gqa_repeat_interleave_prunes_kv_groups():
    "GQA's repeat_interleave traces (it was an UnknownOpError); named with num_kv_heads, whole k/v groups prune"
    x = torch.randn(2, 3, 16)
    wq = next(g for g in channel_groups(_GQA(), x) if 'wq' in g.producers)
    assert wq.pinned and 'heads=' in wq.reason  # without heads=: the projections stay, the reason says what to do
    torch.manual_seed(0)
    m = _GQA()
    pr = Pruner(m, x, heads={'': AttentionHeads('h', 'wq', 'wk', 'wv', 'wo', num_kv_heads='kv')})
    pr.prune(0.5)
    fct.test_eq((m.h, m.kv, m.wq.out_features, m.wk.out_features, m.wo.in_features), (2, 1, 8, 4, 8))
    assert pr.history[-1]['rel_error'] <= 1e-5


# 4. nn.TransformerEncoder: traced inside, MHA heads and feed-forward units prune; the fused fast path stays off
class _Enc(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)
    def forward(self, x): return self.head(self.enc(x).mean(1))

def test_transformer_encoder_prunes_heads_and_units(tmp_path):
    from fasterprune.pruner import PrunedMultiheadAttention, save_pruned, load_pruned
    torch.manual_seed(0)
    m, x = _Enc().eval(), torch.randn(2, 5, 32)
    pr = Pruner(m, x)
    pr.prune(0.5)
    for l in m.enc.layers:
        assert isinstance(l.self_attn, PrunedMultiheadAttention)
        fct.test_eq((l.self_attn.num_heads, l.linear1.out_features, l.linear2.in_features), (2, 32, 32))
    assert pr.history[-1]['rel_error'] <= 1e-5
    with torch.no_grad(): y = m(x)  # eval + no_grad: the fused fast path would need every head
    fct.test_close(y, m(x).detach(), eps=1e-5)
    save_pruned(m, tmp_path / 'enc.pt')
    m2 = load_pruned(_Enc().eval(), tmp_path / 'enc.pt')
    with torch.no_grad(): fct.test_close(m2(x), y, eps=1e-6)


def test_compact_warns_zeroed_pinned_heads(caplog):
    "The SparsifyCallback was passed to fit(cbs=) (gone after the fit): compact cannot remove the heads, and says so"
    from fastai.learner import Learner
    X, dls, model, spec, cb = _lm_setup()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=cb)
    zero_rows = int((model.attn.wq.weight.abs().sum(1) == 0).sum())
    assert zero_rows > 0
    unnamed = copy.deepcopy(model)
    pr = Pruner(learn)  # the callback left its heads on the Learner (`learn._sparsify_heads`): they go
    fct.test_eq(pr.heads, spec)
    pr.compact()
    fct.test_eq(model.attn.wq.weight.shape[0], 16 - zero_rows)
    x = X[:2].to(model_device(unnamed))
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(unnamed, x).compact()
    log = caplog.text  # without heads=, the zeroed q/k/v rows must stay: compact says so
    assert "zeroed filters stay" in log and 'attn.wq' in log and 'heads=' in log, log
    fct.test_eq(unnamed.attn.wq.weight.shape[0], 16)


class _Seq2Seq(nn.Module):
    "PyTorch's own nn.Transformer between two Linear embeddings and a head"
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.tr = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 5)
    def forward(self, src, tgt): return self.head(self.tr(self.emb(src), self.emb(tgt)))


def test_nn_transformer_decoder_heads_and_units_prune():
    "nn.Transformer (encoder, decoder; self- and cross-attention): heads and units prune, and masks + compact agree"
    torch.manual_seed(0)
    src, tgt = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    m = _Seq2Seq().eval()
    twin = copy.deepcopy(m)
    n0 = sum(p.numel() for p in m.parameters())
    pr = Pruner(m, (src, tgt))
    pr.prune(0.5)
    h = pr.history[-1]
    assert h['rel_error'] <= h['rtol']
    dec = m.tr.decoder.layers[0]
    fct.test_eq((dec.self_attn.num_heads, dec.multihead_attn.num_heads, dec.linear1.out_features), (2, 2, 32))
    from fasterprune.sparsifier import Sparsifier
    Sparsifier(twin, 'filter', 'local', attention=True).couple((src, tgt)).sparsify(0.5)
    with torch.no_grad(): ref = twin(src, tgt)
    Pruner(twin, (src, tgt)).compact()
    with torch.no_grad(): fct.test_close(twin(src, tgt), ref, eps=1e-5)
    fct.test_eq(sum(p.numel() for p in twin.parameters()), sum(p.numel() for p in m.parameters()))
    assert sum(p.numel() for p in m.parameters()) < 0.6 * n0
