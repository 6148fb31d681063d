"""What two user trials (fifth session: W5 with fastai's own learners, W6 with Hugging Face models) found in the
callback, the Sparsifier and the metrics.

- Filter granularity with heads= on a model with an op the channel graph does not know (HF Llama's rotary `cos`) was
  refused with "pass strict=False", an argument the callback does not take; coupled=True the same way; and when the
  retry around the unknown op failed too, the warning blamed the op and hid the retry's own error.
- coupled=False pruned the rows of the output layer: whole classes, silently.
- A fit frozen from start to end pruned nothing, said only at INFO level.
- A pruned layer tied to an embedding (an LM's decoder, GPT-2's lm_head) pruned the embedding without a word;
  transformers' Conv1D layers were neither pruned nor counted, without a word.
- fastai's WeightDropout was refused with a message about a forward hook there is none of."""
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
from fasterprune.data import TensorPairs, digits_arrays, mlp
from fit_checks import Rolled


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


@pytest.fixture
def retry_fails(monkeypatch):
    "Sparsifier.couple with strict=False fails (as HF Llama's DynamicCache once made it)"
    real = Sparsifier.couple
    def couple(self, x, *a, strict=True, **kw):
        if not strict: raise IndexError('tuple index out of range')
        return real(self, x, *a, strict=strict, **kw)
    monkeypatch.setattr(Sparsifier, 'couple', couple)


def test_the_retry_s_own_failure_is_said(retry_fails, caplog):
    "The strict=False retry fails too: the warning gives its error, not only the op it would have pinned"
    learn = _img_learner(Rolled())
    with caplog.at_level(logging.WARNING, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot()))
    assert 'roll' in caplog.text and 'IndexError: tuple index out of range' in caplog.text, caplog.text
    assert 'layer by layer' in caplog.text


def test_heads_with_an_unknown_op_whose_retry_fails_says_why_without_strict(retry_fails):
    "heads= needs coupled channels: a clear ValueError naming both failures, and no advice to pass strict=False"
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
    caplog.clear()  # a fit after compact(): nothing more is pruned, so coupling's warnings (now MQA) are not said
    with caplog.at_level(logging.WARNING, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=cb)
    assert 'multi-query' not in caplog.text and 'cos' not in caplog.text, caplog.text


def _digits_learner(model=None, **kw):
    torch.manual_seed(0)
    xt, yt, xv, yv = digits_arrays(True)
    dls = DataLoaders(DataLoader(TensorPairs(xt[:256], yt[:256]), bs=64, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(xv, yv), bs=256), device=torch.device('cpu'))
    return Learner(dls, model or mlp(64, 64, 32, 10), loss_func=nn.CrossEntropyLoss(), **kw)


def test_uncoupled_filters_leave_the_output_layer_s_classes_alone():
    "coupled=False prunes filters layer by layer; the output layer's rows (its classes) stay, as in the coupled modes"
    learn = _digits_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot(), coupled=False))
    m = learn.model
    fct.test_eq(int((m[4].weight == 0).all(1).sum()), 0)  # 10 classes: none pruned (was 5)
    fct.test_eq([int((m[i].weight == 0).all(1).sum()) for i in (0, 2)], [32, 16])


def test_uncoupled_filters_of_the_output_layer_when_named():
    "Naming the output layer in layers= prunes its rows all the same: the user's choice"
    learn = _digits_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule=one_shot(), coupled=False,
                                                layers=['0', '4']))
    fct.test_eq([int((learn.model[i].weight == 0).all(1).sum()) for i in (0, 4)], [32, 5])


def test_a_fit_frozen_from_start_to_end_warns_that_it_prunes_nothing(caplog):
    "learn.freeze(); fit: nothing is pruned, and a warning says so and what to do (fine_tune's frozen fit stays quiet)"
    from fastai.torch_core import params
    import fastai.callback.schedule  # noqa: F401  (fine_tune)
    learn = _digits_learner(splitter=lambda m: [params(m[0]), params(m[2:])])
    learn.freeze()
    cb = SparsifyCallback(0.8, schedule=one_shot())
    with caplog.at_level(logging.INFO, logger='fasterprune'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=cb)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and 'prunes nothing' in r.message]
    assert warned and 'unfreeze' in warned[0].message, caplog.text
    fct.test_eq(sum(int((p == 0).sum()) for p in learn.model.parameters()), 0)
    caplog.clear()
    learn2 = _digits_learner(splitter=lambda m: [params(m[0]), params(m[2:])])
    cb2 = SparsifyCallback(0.8, schedule=one_shot())
    with caplog.at_level(logging.INFO, logger='fasterprune'), learn2.no_bar(), learn2.no_logging():
        learn2.fine_tune(1, 1e-2, freeze_epochs=1, cbs=cb2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and 'frozen' in r.message], caplog.text
    assert "fine_tune's unfrozen fit" in caplog.text
    fct.test_close(cb2.sparsifier.sparsity(), 0.8, eps=1e-3)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight
    def forward(self, x): return self.head(torch.relu(self.body(self.emb(x))))


def test_a_layer_tied_to_an_embedding_is_said_to_prune_it(caplog):
    "The decoder shares the embedding's weight: pruning it zeroes the embedding's entries, and a warning says so"
    m = TiedLM()
    with caplog.at_level(logging.WARNING, logger='fasterprune'): sp = Sparsifier(m, 'weight', 'local').sparsify(0.5)
    assert 'head (also emb.weight, Embedding)' in caplog.text and 'tied' in caplog.text, caplog.text
    fct.test_eq(int((m.emb.weight == 0).sum()), 400)  # the same tensor: half of its 800 entries
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Sparsifier(m, 'weight', 'local', exclude=['head'])
    assert 'tied' not in caplog.text


def test_gpt2_conv1d_layers_are_named_by_the_sparsifier_and_the_flop_count(caplog):
    "GPT-2's Conv1D layers are not pruned or counted: the Sparsifier and the FLOP count say so and what to do"
    T = pytest.importorskip('transformers')
    from fasterprune.metrics import layer_flops
    g = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Sparsifier(g, 'weight', 'global')
    assert 'transformer.h.0.attn.c_attn' in caplog.text and 'conv1d_to_linear' in caplog.text, caplog.text
    assert 'lm_head (also transformer.wte.weight, Embedding)' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='fasterprune'): layer_flops(g, torch.randint(0, 64, (1, 8)))
    assert 'Conv1D' in caplog.text and 'conv1d_to_linear' in caplog.text


def test_weight_dropout_is_refused_for_what_it_is():
    "fastai's WeightDropout computes the weight in its forward: refused, and the message says a wrapper can do that"
    from fastai.text.models.awdlstm import WeightDropout
    m = nn.Sequential(WeightDropout(nn.Linear(8, 8), 0.5, layer_names='weight'), nn.ReLU(), nn.Linear(8, 2))
    m(torch.randn(2, 8))
    fct.test_fail(lambda: Sparsifier(m, 'weight', 'global'), contains="WeightDropout")


# --- F4 (a fuzzer of the callback over fastai's optimizers and training features) ---

def _cpu_mixed_precision():
    "fastai's MixedPrecision with CPU autocast and a live CPU GradScaler (fastai's own scaler is CUDA-only)"
    import fastai.callback.fp16 as fp16
    from torch.amp import GradScaler, autocast
    class MixedPrecision(fp16.MixedPrecision):  # the name fastai looks it up by: learn.mixed_precision
        def __init__(self): super().__init__('fp16')
        def before_fit(self):
            self.autocast = autocast('cpu', dtype=torch.float16)
            self.learn.scaler, self.scales = GradScaler('cpu'), []
    return MixedPrecision()


class InfGradAt:
    "An overflow in one step's gradients, as fp16 gives: the GradScaler skips that step"
    def __new__(cls, its):
        from fastai.callback.core import Callback
        class InfGrad(Callback):
            order = 5
            def before_step(self):
                if self.train_iter in its: next(self.learn.model.parameters()).grad.view(-1)[0] = float('inf')
        return InfGrad()


@pytest.mark.parametrize('crit', ['gradient_magnitude', 'movement'])
def test_a_step_the_grad_scaler_skips_does_not_rank_the_weights(crit):
    "An update due on a skipped step (inf gradients) waits for the next step: the fit ends at the exact target"
    learn = _digits_learner()
    cb = SparsifyCallback(0.5, 'weight', 'global', crit, 'agp', update_every=1)
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2, cbs=[cb, _cpu_mixed_precision(), InfGradAt({1, 3, 6})])
    assert cb.completed
    sp = cb.sparsifier
    n = sum(m.weight.numel() for m in sp.layers.values())
    fct.test_eq(sum(int((m.weight == 0).sum()) for m in sp.layers.values()), round(0.5 * n))
    assert all(torch.isfinite(m.weight).all() for m in sp.layers.values())


def test_gradient_scores_refuse_a_non_finite_gradient():
    "The gradient of the last backward, read when nothing was accumulated, must be finite to rank weights"
    from fasterprune.criteria import get_criterion
    c = get_criterion('gradient_magnitude')
    w = nn.Parameter(torch.ones(4))
    w.grad = torch.tensor([1., float('inf'), 0., 1.])
    fct.test_fail(lambda: c.score('w', w), contains='inf or NaN')


@pytest.mark.parametrize('reparam', ['weight_norm', 'spectral_norm'])
def test_gradient_criteria_on_computed_weights_are_refused_before_the_fit(reparam):
    "weight_norm/spectral_norm compute the weight each forward: it never has a gradient; refused before training"
    from torch.nn.utils import parametrizations as P
    model = mlp(64, 64, 32, 10)
    getattr(P, reparam)(model[2])
    learn = _digits_learner(model=model)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}  # (spectral_norm's u, v move on any access)
    with learn.no_bar(), learn.no_logging():
        fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, criteria='gradient_magnitude')),
                      contains="computed from other tensors")
    for k, v in model.named_parameters(): fct.test_eq(v, w0[k])


# --- R5 (a second read of this session's changes) ---

def test_multihead_attention_projections_are_not_called_tied(caplog):
    "attention=True prunes in_proj_weight through an AttentionProjection: its own module is not another owner"
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Sparsifier(layer, 'weight', 'local', attention=True)
    assert 'tied' not in caplog.text, caplog.text


def test_uncoupled_filters_of_a_one_layer_model_name_it():
    "A model that is one Linear: the refusal names it (its name is '')"
    learn = _digits_learner(model=nn.Linear(64, 10))
    with learn.no_bar(), learn.no_logging():
        fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'filter', coupled=False)),
                      contains='(the model itself)')


def test_finding_the_output_layers_leaves_a_forward_s_own_state():
    "The callback runs one forward to find the layers that make the output: a forward's state (`self.hidden`) stays"
    from fasterprune.callback import _output_layers
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls, self.h = nn.Linear(8, 8), nn.Linear(8, 2), 0, None
        def forward(self, x):
            self.calls += 1
            self.h = self.a(x) if self.h is None else self.a(x) + self.h.mean()
            return self.b(torch.relu(self.h))
    m = Stateful()
    fct.test_eq(_output_layers(Sparsifier(m, 'filter'), torch.randn(2, 8)), ['b'])
    fct.test_eq((m.calls, m.h), (0, None))


# --- R6 / F5 (second reads and fuzzers of the tracing changes) ---

def test_a_batch_encoding_passed_whole_stays_a_batch_encoding():
    "A forward that takes a tokenizer's BatchEncoding itself, `(batch,)`, reads it by attribute: copies keep its type"
    T = pytest.importorskip('transformers')
    from fasterprune.pruner import Pruner
    from fasterprune.core import map_tensors
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc1, self.fc2 = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 4)
        def forward(self, batch):
            return self.fc2(torch.relu(self.fc1(self.emb(batch.input_ids) * batch.attention_mask[..., None]))).mean(1)
    enc = T.BatchEncoding({'input_ids': torch.randint(0, 50, (2, 6)), 'attention_mask': torch.ones(2, 6)})
    assert type(map_tensors(lambda t: t + 0, enc)) is T.BatchEncoding
    torch.manual_seed(0)
    m = M()
    Pruner(m, (enc,)).prune(0.5)
    fct.test_eq(m.fc1.out_features, 16)


def test_a_refused_gradient_criterion_leaves_spectral_norm_state_alone():
    "The refusal comes before any weight is read: spectral_norm's power-iteration buffers do not move"
    from torch.nn.utils import parametrizations as P
    model = mlp(64, 64, 32, 10)
    P.spectral_norm(model[2])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fct.test_fail(lambda: Sparsifier(model, 'weight', 'global', 'gradient_magnitude'), contains='computed from other')
    for k, v in model.state_dict().items(): fct.test_eq(v, sd[k])


def test_filters_of_a_layer_tied_to_an_embedding_are_left_dense(caplog):
    "A filter of the tied decoder is a token's embedding row: with filter granularity the layer stays dense, said so"
    m = TiedLM()
    with caplog.at_level(logging.WARNING, logger='fasterprune'):
        sp = Sparsifier(m, 'filter', 'local')
    assert 'head' not in sp.layers and 'left dense' in caplog.text, caplog.text
    sp.sparsify(0.5)
    fct.test_eq(int((m.emb.weight == 0).all(1).sum()), 0)
