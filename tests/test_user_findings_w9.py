"Sixth session, trial W9 (a Hugging Face model pruned during a fastai fine-tune): the findings, as the user hit them"
import copy, logging
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from fasterprune.data import TensorPairs, mlp
from fasterprune.distill import DistillCallback, kd_loss
from fasterprune.sensitivity import sensitivity

V, L = 30, 6


class _TinyLM(nn.Module):
    "A language model's shape: token ids in, (B, L, vocab) logits out"
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(V, 16), nn.Linear(16, 16), nn.Linear(16, V)
    def forward(self, ids): return self.out(torch.relu(self.fc(self.emb(ids))))


def lm_loss(logits, ids):  # the kind of loss a user writes (15_hf): no `axis` to read the class dim from
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def _lm_learner():
    set_seed(0)
    ids = torch.randint(0, V, (64, L))
    ds = TensorPairs(ids, ids)
    dls = DataLoaders(DataLoader(ds, bs=16, shuffle=True, drop_last=True), DataLoader(ds, bs=32),
                      device=torch.device('cpu'))
    learn = Learner(dls, _TinyLM(), loss_func=lm_loss)
    learn.remove_cbs(ProgressCallback)
    return learn


def test_distilling_a_language_model_with_a_plain_loss_function_asks_for_the_class_dim():
    "W9 #1: the KL ran over the token positions (dim 1) of (B, L, vocab) logits, silently"
    learn = _lm_learner()
    teacher = copy.deepcopy(learn.model)
    sd = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='dim=-1'): learn.fit(1, 1e-2, cbs=DistillCallback(teacher))
    assert all(torch.equal(v, sd[k]) for k, v in learn.model.state_dict().items())  # nothing trained
    cb = DistillCallback(teacher, dim=-1)
    learn.fit(1, 1e-2, cbs=cb)
    x = learn.dls.valid.one_batch()[0][:4]
    with torch.no_grad(): s, t = learn.model(x), teacher(x)
    # the callback's term is the KL over the vocabulary: invariant to a per-position shift of the student's logits
    fct.test_close(kd_loss(s, t, dim=-1), kd_loss(s + torch.randn(4, L, 1), t, dim=-1), eps=1e-4)


def test_a_loss_named_metric_gets_no_direction_warning(caplog):
    "W9 #3: a metric named like a loss was read as lower-is-better, then the scan advised higher_is_better=True"
    set_seed(0)
    model = mlp(8, 16, 4)
    def weight_loss(m): return float(sum(p.abs().sum() for p in m.parameters()))  # pruning lowers it: an 'improvement'
    with caplog.at_level(logging.WARNING, logger='fasterprune'):
        scan = sensitivity(model, ratios=(0.5, 0.9), metric=weight_loss, show_progress=False)
    assert (scan['drop'] < 0).all()  # every layer 'improves'
    assert not any('higher_is_better' in r.getMessage() for r in caplog.records)


def test_a_teacher_that_takes_other_inputs_is_named_clearly():
    "W9 #5: a teacher that is not the wrapper the Learner calls failed with torch's bare error"
    learn = _lm_learner()
    class Dicty(nn.Module):  # takes a dict, as a Hugging Face model under a wrapper does
        def __init__(self): super().__init__(); self.m = _TinyLM()
        def forward(self, batch): return self.m(batch['input_ids'])
    with pytest.raises(ValueError, match='copy.deepcopy.learn.model'):
        learn.fit(1, 1e-2, cbs=DistillCallback(Dicty(), dim=-1))


def test_load_pruned_into_a_model_with_other_layers_says_so(tmp_path):
    "W9 #5: load_pruned into a model with more layers raised torch's bare 'Missing key(s)'"
    from fasterprune.pruner import Pruner, save_pruned, load_pruned
    set_seed(0)
    small = mlp(8, 16, 4)
    Pruner(small, torch.randn(2, 8)).prune(0.5)
    save_pruned(small, tmp_path / 'm.pt')
    other = mlp(8, 16, 16, 4)
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match='does not fit this model'): load_pruned(other, tmp_path / 'm.pt')
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())


def test_compact_after_weight_sparsity_says_why_nothing_was_removed(caplog):
    "W9 #5: compact() after a weight-granularity fit did nothing, with an INFO line only"
    from fasterprune.pruner import Pruner
    from fasterprune.sparsifier import Sparsifier
    set_seed(0)
    m = mlp(8, 16, 4)
    Sparsifier(m, 'weight', 'global').sparsify(0.5)
    n0 = sum(p.numel() for p in m.parameters())
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(m, torch.randn(2, 8)).compact()
    fct.test_eq(sum(p.numel() for p in m.parameters()), n0)
    assert any('not whole channels' in r.getMessage() for r in caplog.records)
