"A fastai user trial's findings (W5) in the channel graph and the Pruner: each test fails on the code before the fix"
import pytest, torch
import fastcore.test as fct
import torch.nn as nn
from fasterprune.graph import UnknownOpError, channel_groups
from fasterprune.pruner import Pruner
from fasterprune.sparsifier import Sparsifier


class _Wrap(nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return self.m(x)

class _Shared(nn.Module):
    "`c1` registered under two names (as fastai's AWD_LSTM registers its Embedding as `encoder` and `encoder_dp.emb`)"
    def __init__(self, unknown=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.alias = _Wrap(self.c1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.unknown = unknown
    def forward(self, x):
        h = torch.relu(self.alias(x))
        if self.unknown: h = torch.cumsum(h, 1)  # an op across channels the graph does not know
        return self.c2(h)

def _state(m): return {k: (v.device, v.detach().clone()) for k, v in m.state_dict().items()}

def _same_state(m, before):
    now = m.state_dict()
    fct.test_eq(set(now), set(before))
    for k, (dev, v) in before.items():
        fct.test_eq(now[k].device, dev)
        assert torch.equal(now[k].detach(), v), k


# 1. a module under two names kept its weights on the meta device after the graph (silent destruction)
def test_shared_module_channel_groups_keeps_weights():
    torch.manual_seed(0)
    m, x = _Shared(), torch.randn(2, 3, 8, 8)
    before, ref = _state(m), m(x)
    channel_groups(m, x)
    _same_state(m, before)
    Sparsifier(m, 'filter', 'local').couple(x)
    _same_state(m, before)
    assert torch.equal(m(x), ref)

def test_shared_module_pruner_prunes():
    torch.manual_seed(0)
    m, x = _Shared(), torch.randn(2, 3, 8, 8)
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq(m.c1.out_channels, 4)
    assert m.alias.m is m.c1
    fct.test_eq({p.device.type for p in m.parameters()}, {'cpu'})
    assert pr.history[-1]['rel_error'] < 1e-5

def test_failed_graph_leaves_model_unchanged():
    "an op the graph does not know (strict): the error, and the parameters and buffers as they were, values and devices"
    torch.manual_seed(0)
    m, x = _Shared(unknown=True), torch.randn(2, 3, 8, 8)
    before = _state(m)
    with pytest.raises(UnknownOpError): Sparsifier(m, 'filter', 'local').couple(x)
    _same_state(m, before)
    with pytest.raises(UnknownOpError): Pruner(m, x).prune(0.5)
    _same_state(m, before)

def test_on_meta_restores_on_error():
    from fasterprune.graph import _on_meta
    torch.manual_seed(0)
    m = _Shared()
    m.register_buffer('tied', m.c2.weight)  # a tensor held by two modules' dicts... and twice by one
    before = _state(m)
    with pytest.raises(RuntimeError, match='boom'):
        with _on_meta(m):
            fct.test_eq({p.device.type for p in m.parameters()}, {'meta'})
            assert m.tied is m.c2.weight  # tied tensors stay tied inside
            raise RuntimeError('boom')
    _same_state(m, before)
    assert m.tied is m.c2.weight


# 2. a forward that keeps state it computed (AWD_LSTM's `self.hidden`): tracing left an fx Proxy there, the output
# layer was cut and the check passed
class _Stateful(nn.Module):
    def __init__(self, c_in=3, n_out=4):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, n_out, 3, padding=1)
        self.h = torch.zeros(())
    def forward(self, x):
        out = self.c2(torch.relu(self.c1(x))) + self.h
        self.h = out.detach().mean() * 0  # state from the output (zero here)
        self.seen = True                   # an attribute the forward creates
        return out

def test_stateful_forward_pruner():
    torch.manual_seed(0)
    m, x = _Stateful(), torch.randn(2, 3, 8, 8)
    Pruner(m, x).prune(0.5)
    fct.test_eq(m.c1.out_channels, 4)
    fct.test_eq(m.c2.out_channels, 4)  # the model's output stays
    assert type(m.h) is torch.Tensor and type(m(x)) is torch.Tensor
    m2 = _Stateful()
    h2 = m2.h
    channel_groups(m2, x)
    assert m2.h is h2 and not hasattr(m2, 'seen')  # untouched by the graph

class _Carried(_Stateful):
    "state that changes the next output (an LM's hidden state carried from call to call)"
    def forward(self, x):
        out = self.c2(torch.relu(self.c1(x))) + self.h
        self.h = out.detach().mean()
        return out

def test_stateful_carried_state_verifies():
    "each check starts from the model's state, and leaves it as it was: the verification compares like with like"
    torch.manual_seed(0)
    m, x = _Carried(), torch.randn(2, 3, 8, 8)
    m(x)
    h = m.h
    pr = Pruner(m, x)
    pr.prune(0.5)
    fct.test_eq(m.c1.out_channels, 4)
    assert pr.history[-1]['rel_error'] < 1e-5
    assert m.h is h

def test_stateful_forward_couple():
    "the callback's path (filter granularity): the output filters are not coupled, the state stays a tensor"
    torch.manual_seed(0)
    m, x = _Stateful(), torch.randn(2, 3, 8, 8)
    h0 = m.h
    sp = Sparsifier(m, 'filter', 'local').couple(x)
    sp.sparsify(0.5)
    assert m.h is h0 and not hasattr(m, 'seen')
    fct.test_eq(int((m.c2.weight.flatten(1) == 0).all(1).sum()), 0)  # the output's filters stay
    fct.test_eq(int((m.c1.weight.flatten(1) == 0).all(1).sum()), 4)
    assert type(m(x)) is torch.Tensor


# 3. ranger (Lookahead) then Pruner(learn).compact(): Lookahead's slow weights kept the old shapes, the next fit crashed
def test_ranger_compact_then_fit():
    from torch.utils.data import TensorDataset, DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import ranger
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import small_cnn
    torch.manual_seed(0)
    X, Y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    dls = DataLoaders(DataLoader(TensorDataset(X, Y), batch_size=16), DataLoader(TensorDataset(X, Y), batch_size=32))
    learn = Learner(dls, small_cnn(c=8), loss_func=nn.CrossEntropyLoss(), opt_func=ranger)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot'))
    keep = (learn.model[0].weight.flatten(1) != 0).any(1)
    slow0 = learn.opt.slow_weights[0][0].clone()
    Pruner(learn).compact()
    fct.test_eq(learn.model[0].out_channels, 4)
    fct.test_eq(learn.opt.slow_weights[0][0], slow0[keep])  # the same rows as the weight's
    slow = [t for g in learn.opt.slow_weights for t in g]
    fct.test_eq([t.shape for t in slow], [p.shape for g in learn.opt.param_lists for p in g])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)  # 4 steps after 4: Lookahead syncs at its 6th
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()


# 4. Pruner(learn) on an AWD_LSTM failed in copy.deepcopy (WeightDropout holds a non-leaf copy of its weight)
def _awd_classifier():
    from fastai.text.models.core import get_text_classifier
    from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_config
    cfg = awd_lstm_clas_config.copy()
    cfg.update(emb_sz=16, n_hid=32, n_layers=2)
    return get_text_classifier(AWD_LSTM, 40, 2, seq_len=8, config=cfg)

def test_awd_lstm_pruner_keeps_original():
    torch.manual_seed(0)
    m, x = _awd_classifier(), torch.randint(2, 40, (4, 8))
    before = _state(m)
    pr = Pruner(m, x, strict=False)  # keep_original=True
    _same_state(m, before)
    _same_state(pr.original, before)
    assert pr.original.state_dict()['0.module.encoder.weight'] is not m.state_dict()['0.module.encoder.weight']
    assert pr.original[0].module.encoder_dp.emb is pr.original[0].module.encoder  # its sharing copied too
    pr.prune(0.3)
    fct.test_eq(m[1].layers[0][2].out_features, 35)  # the head's hidden Linear; the LSTMs and the output stay
    fct.test_eq(m[1].layers[1][2].out_features, 2)
    fct.test_eq(pr.original[1].layers[0][2].out_features, 50)
    assert pr.history[-1]['rel_error'] < 1e-5
