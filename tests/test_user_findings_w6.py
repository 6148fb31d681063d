"""What a Hugging Face user's trial (W6) found in the callback: filter granularity with heads= on a model with an op
the channel graph does not know (HF Llama's rotary `cos`) was refused with "pass strict=False", an argument the
callback does not take; coupled=True was refused the same way; and when the retry around the unknown op failed too, the
warning blamed the op and hid the retry's own error."""
import logging
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.graph import AttentionHeads
from fasterprune.schedules import one_shot
from fasterprune.data import TensorPairs


class Rolled(nn.Module):
    "Channels moved round by torch.roll: an op the channel graph does not know"
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(torch.roll(h, 1, dims=1))).mean((2, 3)))


def _img_learner(model):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    dls = DataLoaders(DataLoader(TensorPairs(x, y), bs=16, shuffle=True), DataLoader(TensorPairs(x, y), bs=32),
                      device=torch.device('cpu'))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss())


def test_coupled_true_with_an_unknown_op_couples_the_rest(caplog):
    "coupled=True asks for coupled masks: channels around the unknown op stay dense, the rest prune coupled (was: raise)"
    learn = _img_learner(Rolled())
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot(), coupled=True)
    with caplog.at_level(logging.WARNING, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=cb)
    assert learn._sparsify_strict is False
    assert 'roll' in caplog.text and 'the rest prune coupled' in caplog.text
    assert cb.sparsifier.sparsity() > 0


def test_the_retry_s_own_failure_is_said(monkeypatch, caplog):
    "The strict=False retry fails too: the warning gives its error, not only the op it would have pinned"
    real = Sparsifier.couple
    def couple(self, x, *a, strict=True, **kw):
        if not strict: raise IndexError('tuple index out of range')
        return real(self, x, *a, strict=strict, **kw)
    monkeypatch.setattr(Sparsifier, 'couple', couple)
    learn = _img_learner(Rolled())
    with caplog.at_level(logging.WARNING, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot()))
    assert 'roll' in caplog.text and 'IndexError: tuple index out of range' in caplog.text, caplog.text
    assert 'layer by layer' in caplog.text


def test_heads_with_an_unknown_op_whose_retry_fails_says_why_without_strict(monkeypatch):
    "heads= needs coupled channels: a clear ValueError naming both failures, and no advice to pass strict=False"
    real = Sparsifier.couple
    def couple(self, x, *a, strict=True, **kw):
        if not strict: raise IndexError('tuple index out of range')
        return real(self, x, *a, strict=strict, **kw)
    monkeypatch.setattr(Sparsifier, 'couple', couple)
    learn = _img_learner(Rolled())
    w0 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError) as e:
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot(), coupled=True))
    msg = str(e.value)
    assert 'coupled=True' in msg and 'roll' in msg and 'IndexError' in msg and 'pass strict=False' not in msg, msg
    for k, v in learn.model.state_dict().items(): fct.test_eq(v, w0[k])


def _hf_llama_learner():
    T = pytest.importorskip('transformers')
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    class Wrap(nn.Module):  # fastai calls model(*xb): the batch dict goes in whole, the logits come out
        def __init__(self): super().__init__(); self.m = T.LlamaForCausalLM(cfg)
        def forward(self, batch): return self.m(**batch).logits
    ids = torch.randint(0, 100, (48, 12))
    ds = [({'input_ids': ids[i], 'attention_mask': torch.ones(12, dtype=torch.long)}, ids[i]) for i in range(48)]
    dls = DataLoaders(DataLoader(ds, bs=16, shuffle=True, drop_last=True), DataLoader(ds[:16], bs=16),
                      device=torch.device('cpu'))
    loss = lambda out, y: F.cross_entropy(out[:, :-1].reshape(-1, 100), y[:, 1:].reshape(-1))
    return Learner(dls, Wrap(), loss_func=loss)


def test_heads_on_hf_llama_prune_whole_heads_around_its_rotary_op(caplog):
    "HF Llama's rotary `cos` is unknown to the graph: heads= now couples around it and prunes whole k/v groups"
    from fasterprune.pruner import Pruner
    learn = _hf_llama_learner()
    heads = {'m.model.layers.*.self_attn': AttentionHeads(num_heads=None, head_dim='head_dim',
                                                          n_rep='num_key_value_groups')}
    cb = SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot(), heads=heads)
    with caplog.at_level(logging.WARNING, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=cb)
    assert learn._sparsify_strict is False and 'cos' in caplog.text
    q = learn.model.m.model.layers[0].self_attn.q_proj.weight
    rows_zero = (q == 0).all(1).reshape(2, -1).all(1)  # 2 k/v groups of 2 query heads of 8 rows
    fct.test_eq(int(rows_zero.sum()), 1)  # one whole k/v group (its query heads' rows) pruned
    x = {'input_ids': torch.randint(0, 100, (2, 12)), 'attention_mask': torch.ones(2, 12, dtype=torch.long)}
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(x)
    Pruner(learn).compact()
    attn = learn.model.m.model.layers[0].self_attn
    fct.test_eq((attn.q_proj.out_features, attn.k_proj.out_features), (16, 8))
    with torch.no_grad(): fct.test_close(learn.model(x), ref, eps=1e-4)
