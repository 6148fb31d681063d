"""A second read of the fourth session's change (R3): each test fails on the code before its fix.
1. fit -> compact -> fit with fastai's `OptimWrapper` (a torch optimizer): the state lives in the torch optimizer, and
   compact cut the wrapper's own empty one; the next step failed on the old shapes.
2. `Pruner(learn)`'s rewinding on a `torch.compile`d Learner: the callbacks compared the compiled wrapper with the module.
3. The sparsity column of a compiled model with `exclude=` by name was NaN (layer names of the wrapper).
A last read of those fixes (R4): a large folded constant refused for its float32 rounding, a non-persistent buffer
with a rewind point (half-cut model), named tuples in float64 checks, DataParallel in Pruner(learn), a stale strict."""
import sys, tempfile, warnings
from functools import partial
import pytest, torch
import torch.nn as nn
import fastcore.test as fct
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from torch.utils.data import TensorDataset, DataLoader
from fasterprune.pruner import Pruner
from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import one_shot
from test_callback import _learn


@pytest.mark.parametrize('fold', [True, False])
def test_compact_cuts_the_state_of_a_wrapped_torch_optimizer(fold):
    "OptimWrapper(AdamW): compact cuts the torch optimizer's state, a fold's new bias joins its group, the fit goes on"
    torch.manual_seed(0)
    X, y = torch.randn(128, 3, 8, 8), torch.randint(0, 4, (128,))
    dls = DataLoaders(DataLoader(TensorDataset(X[:96], y[:96]), batch_size=16, shuffle=True, drop_last=True),
                      DataLoader(TensorDataset(X[96:], y[96:]), batch_size=32))
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1, bias=not fold), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    learn = Learner(dls, m, nn.CrossEntropyLoss(), opt_func=partial(OptimWrapper, opt=torch.optim.AdamW),
                    path=tempfile.mkdtemp())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    with torch.no_grad():
        m[0].weight[:5] = 0
        m[0].bias[:5] = 0.5 if fold else 0.  # 5 constant channels: folded into the next conv's (new) bias
    Pruner(learn).compact()
    fct.test_eq(m[0].out_channels, 11)
    st = learn.opt.opt.state
    fct.test_eq(tuple(st[m[0].weight]['exp_avg'].shape), (11, 3, 3, 3))
    b0 = m[2].bias.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)  # the step used to fail on the old shapes
    assert not torch.equal(b0, m[2].bias.detach())  # the bias (new with a fold) trains


def test_rewinding_a_compiled_learner():
    "keep_rewind_point -> fit -> prune_weights -> rewind -> fit on Learner(dls, torch.compile(model))"
    learn = _learn()
    learn.model = torch.compile(learn.model, backend='eager')
    pr = Pruner(learn)
    pr.keep_rewind_point(0)
    learn.fit(1, 1e-2)
    pr.prune_weights(0.5)
    pr.rewind()
    learn.fit(1, 1e-2)
    inner = learn.model._orig_mod
    fct.test_close(float((inner[0].weight == 0).float().mean()), 0.5, eps=0.01)


def test_sparsity_column_of_a_compiled_model_with_exclude():
    learn = _learn()
    learn.model = torch.compile(learn.model, backend='eager')
    cb = SparsifyCallback(0.5, schedule=one_shot(), exclude=['0'])
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(list(cb.sparsifier.layers), ['2', '4'])
    fct.test_close(learn.recorder.values[-1][-1], 0.5, eps=1e-3)


# --- a last read of those fixes (R4) ---------------------------------------------------------------------------------
@pytest.mark.parametrize('shift', [1e3, 3e3])
def test_a_large_folded_constant_is_checked_without_its_float32_rounding(shift):
    "A folded BatchNorm shift of 1e3: the float64 second look uses the fold as computed, not rounded to float32"
    from test_user_findings_f2 import ShiftNet
    torch.manual_seed(0)
    m = ShiftNet(shift).eval()
    with torch.no_grad():
        m.conv.weight[:4] = 0
        m.conv.bias[:4] = 0
    pr = Pruner(m, torch.randn(8, 3, 8, 8))
    pr.compact()  # refused before: the bias's float32 rounding counted as error against 1e-5
    h = pr.history[-1]
    assert h['checked_in'].startswith('float64') and h['rel_error'] <= 1e-12, h
    fct.test_eq(m.conv.out_channels, 4)


def test_compact_with_a_rewind_point_and_a_non_persistent_buffer():
    "A per-channel buffer outside the state dict: the surgery, the rewind point and rewind() stay consistent"
    import torch.nn.functional as F
    class M(nn.Module):
        def __init__(s):
            super().__init__()
            s.a, s.b = nn.Linear(4, 8), nn.Linear(8, 3)
            s.register_buffer('shift', torch.randn(8), persistent=False)
        def forward(s, x): return s.b(F.relu(s.a(x) + s.shift))
    torch.manual_seed(0)
    m, x = M(), torch.randn(5, 4)
    with torch.no_grad():
        m.a.weight[:3] = 0
        m.a.bias[:3] = 0
        m.shift[:3] = 0
    pr = Pruner(m, x)
    pr.keep_rewind_point()
    pr.compact()
    fct.test_eq((m.a.out_features, tuple(m.shift.shape), len(pr.history)), (5, (5,), 1))
    fct.test_eq(tuple(pr._rewinder.rewind_point['a.weight'].shape), (5, 4))
    pr.rewind()
    fct.test_eq(tuple(m(x).shape), (5, 3))


def test_a_half_precision_model_with_named_tuple_inputs():
    "bf16 checks run in float64 copies: named-tuple example inputs are converted too"
    from collections import namedtuple
    P = namedtuple('P', 'a b')
    class M(nn.Module):
        def __init__(s): super().__init__(); s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        def forward(s, p): return s.c2(torch.relu(s.c1(p.a + p.b)))
    torch.manual_seed(0)
    m = M().to(torch.bfloat16)
    with torch.no_grad():
        m.c1.weight[:3] = 0
        m.c1.bias[:3] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    Pruner(m, (P(x, x),)).compact()
    fct.test_eq(m.c1.out_channels, 5)


def test_pruner_of_a_learner_with_a_data_parallel_model():
    "learn.model = nn.DataParallel(model): Pruner(learn) prunes the module inside, and its rewinding fits run"
    learn = _learn()
    learn.model = nn.DataParallel(learn.model)
    pr = Pruner(learn)
    assert pr.model is learn.model.module
    pr.keep_rewind_point(0)
    learn.fit(1, 1e-2)
    pr.prune_weights(0.5)
    pr.rewind()
    learn.fit(1, 1e-2)
    fct.test_close(float((learn.model.module[0].weight == 0).float().mean()), 0.5, eps=0.01)


def test_a_later_fit_does_not_inherit_an_earlier_models_strict():
    "learn._sparsify_strict is said by the model the callback last traced: a new model's fit clears it"
    learn = _learn()
    learn._sparsify_strict = False  # left by a fit of an earlier model
    learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, 'weight', schedule=one_shot()))
    assert '_sparsify_strict' not in learn.__dict__


def test_a_forward_that_cannot_run_in_float64_gets_the_float32_refusal():
    "The float64 second look cannot run (a plain float32 tensor attribute): a SurgeryError, the model restored"
    from test_user_findings_f2 import ShiftNet
    from fasterprune.pruner import SurgeryError
    class Fixed(ShiftNet):
        def __init__(s):
            super().__init__()
            s.scale = torch.ones(4)  # not a buffer: .double() leaves it float32
        def forward(s, x): return super().forward(x) @ torch.diag(s.scale)
    torch.manual_seed(0)
    m = Fixed().eval()
    with torch.no_grad():
        m.conv.weight[:4] = 0
        m.conv.bias[:4] = 0
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError, match='restored'): Pruner(m, torch.randn(8, 3, 8, 8)).compact()
    for k, v in m.state_dict().items(): fct.test_eq(v, ref[k])


def test_a_perturbed_input_outside_the_models_domain_is_left_out():
    "A model defined for positive inputs (sqrt): the perturbed copy gives NaN, so the check uses the example"
    class M(nn.Module):
        def __init__(s): super().__init__(); s.l1, s.l2 = nn.Linear(4, 8), nn.Linear(8, 2)
        def forward(s, x): return s.l2(torch.relu(s.l1(x.sqrt())))
    torch.manual_seed(0)
    m = M()
    with torch.no_grad():
        m.l1.weight[:3] = 0
        m.l1.bias[:3] = 0
    x = torch.rand(8, 4) + 0.1
    with torch.no_grad(): ref = m(x)
    Pruner(m, x).compact()  # refused before: 'differs by inf'
    fct.test_eq(m.l1.out_features, 5)
    with torch.no_grad(): fct.test_close(m(x), ref, eps=1e-5)
