"""DistillCallback (knowledge distillation of a pruned student from its dense teacher) on the fastai paths users walk:
the loss is Hinton's formula, alpha=0 is plain training, the teacher is never changed nor run during validation,
beside SparsifyCallback, after compact(), with GradientAccumulation, mixed precision, fine_tune, lr_find, export."""
import copy, pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.losses import CrossEntropyLossFlat
import fastai.losses
from fastai.learner import Learner, load_learner
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fastai.torch_core import params, set_seed
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune, lr_find)
from fasterprune.callback import SparsifyCallback
from fasterprune.data import digits_arrays, digits_dls, mlp, small_cnn, TensorPairs
from fasterprune.distill import DistillCallback, kd_loss
from fasterprune.pruner import Pruner
from fit_checks import CheckZeros, count_syncs


def learner(model=None, cbs=None, flat=True, seed=0, dls=None, loss_func=None, **kw):
    set_seed(seed)  # torch, and Python's random: fastai's DataLoader draws its shuffling seed from it
    learn = Learner(dls or digits_dls(flat=flat), model or mlp(64, 32, 10), cbs=cbs,
                    loss_func=loss_func or nn.CrossEntropyLoss(), metrics=None if loss_func else accuracy, **kw)
    learn.remove_cbs(ProgressCallback)
    return learn


def trained_teacher(flat=True):
    "A dense model trained for one epoch (outputs that are not uniform): `deepcopy(learn.model)`, eval mode after fit"
    learn = learner(mlp(64, 32, 10) if flat else small_cnn(c=8), flat=flat, seed=1)
    learn.fit(1, 1e-2)
    return copy.deepcopy(learn.model)


def state(m): return {k: v.clone() for k, v in m.state_dict().items()}
def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
def modes(m): return [x.training for x in m.modules()]


class Capture(Callback):
    "What the backward pass of the first training batch sees (runs after DistillCallback's after_loss)"
    order, run_valid = 7, False
    def __init__(self): self.got = None
    def after_loss(self):
        if self.got is None:
            self.got = dict(xb=self.xb, yb=self.yb, pred=self.pred.detach().clone(),
                            loss_grad=self.loss_grad.detach().clone(), loss=self.learn.loss.detach().clone())


def test_loss_is_hintons_formula():
    teacher = trained_teacher()
    cap = Capture()
    learn = learner()
    learn.fit(1, 1e-3, cbs=[DistillCallback(teacher, T=3., alpha=0.3), cap])
    g = cap.got
    teacher.eval()
    with torch.no_grad(): zt = teacher(*g['xb'])
    zs, y = g['pred'], g['yb'][0]
    pt, ps = torch.softmax(zt / 3, 1), torch.softmax(zs / 3, 1)
    kl = (pt * (pt.log() - ps.log())).sum() / len(y)  # KL(teacher ‖ student), batchmean
    want = 0.7 * F.cross_entropy(zs, y) + 0.3 * 9 * kl
    fct.test_close(g['loss_grad'], want, eps=1e-5)
    fct.test_close(g['loss'], want, eps=1e-5)  # the train_loss the Recorder shows
    assert abs(float(kl)) > 1e-3  # the term was not zero


def test_custom_loss_replaces_the_kl_term():
    teacher = trained_teacher()
    cap = Capture()
    learn = learner()
    learn.fit(1, 1e-3, cbs=[DistillCallback(teacher, alpha=0.25, loss=F.mse_loss), cap])
    g = cap.got
    teacher.eval()
    with torch.no_grad(): zt = teacher(*g['xb'])
    want = 0.75 * F.cross_entropy(g['pred'], g['yb'][0]) + 0.25 * F.mse_loss(g['pred'], zt)
    fct.test_close(g['loss_grad'], want, eps=1e-5)


class Seq(nn.Module):
    "Per-position logits of digits: (B, 10, 4) (class dim 1) or, `last=True`, (B, 4, 10) (class dim last, like an LM)"
    def __init__(self, last=False): super().__init__(); self.lin, self.last = nn.Linear(64, 40), last
    def forward(self, x):
        z = self.lin(x).view(-1, 10, 4)
        return z.transpose(1, 2) if self.last else z


class Repeat(TensorPairs):
    def __getitem__(self, i): return self.x[i], self.y[i].repeat(4)


@pytest.mark.parametrize('last', [False, True])
def test_kl_over_the_class_dim_of_per_position_logits(last):
    "(B, C, L) logits with nn.CrossEntropyLoss: KL over dim 1; (B, L, C) with CrossEntropyLossFlat (axis -1): dim -1"
    xt, yt, xv, yv = digits_arrays()
    dls = DataLoaders(DataLoader(Repeat(xt[:256], yt[:256]), bs=64, shuffle=True),
                      DataLoader(Repeat(xv[:64], yv[:64]), bs=64), device=torch.device('cpu'))
    torch.manual_seed(1)
    teacher = Seq(last)
    torch.manual_seed(0)
    learn = Learner(dls, Seq(last), loss_func=CrossEntropyLossFlat() if last else nn.CrossEntropyLoss())
    learn.remove_cbs(ProgressCallback)
    cap = Capture()
    learn.fit(1, 1e-3, cbs=[DistillCallback(teacher, T=2., alpha=1.), cap])
    with torch.no_grad(): zt = teacher(*cap.got['xb'])
    zs = cap.got['pred']
    if last: zs, zt = zs.transpose(1, 2), zt.transpose(1, 2)
    pt, ps = torch.softmax(zt / 2, 1), torch.softmax(zs / 2, 1)
    want = 4 * (pt * (pt.log() - ps.log())).sum(1).mean()  # summed over the classes, averaged over B and positions
    fct.test_close(cap.got['loss_grad'], want, eps=1e-5)


def test_alpha_zero_is_plain_training():
    "alpha=0: the same weights, bit for bit, as a seeded fit without the callback (nothing else drawn or scaled)"
    teacher = trained_teacher()
    def fit(cbs=None):
        set_seed(0)
        learn = learner(nn.Sequential(mlp(64, 32, 32), nn.Dropout(0.3), nn.Linear(32, 10)), cbs=cbs)
        learn.fit_one_cycle(2, 1e-2)
        return state(learn.model)
    plain = fit()
    assert same(fit(DistillCallback(teacher, alpha=0.)), plain)
    assert not same(fit(DistillCallback(teacher, alpha=0.5)), plain)  # the term does change the training


def test_teacher_untouched_and_not_run_in_validation():
    "Weights, BatchNorm statistics and modes of the teacher stay; validate/get_preds never run it"
    teacher = trained_teacher(flat=False).train()  # small_cnn: BatchNorm, in train mode (a copy taken inside a fit)
    teacher[1].eval()  # one module in eval mode: each module's own mode is kept
    sd, md = state(teacher), modes(teacher)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    learn = learner(small_cnn(c=8), flat=False, cbs=DistillCallback(teacher))
    learn.validate()
    learn.get_preds()
    fct.test_eq(len(calls), 0)
    learn.lr_find(num_it=8, show_plot=False)
    learn.fit(1, 1e-3)
    assert len(calls) >= len(learn.dls.train)  # it ran on every training batch
    assert same(state(teacher), sd)
    fct.test_eq(modes(teacher), md)


def test_validation_sees_the_plain_loss():
    teacher = trained_teacher()
    learn = learner(cbs=DistillCallback(teacher, T=4., alpha=0.9))
    learn.fit(1, 1e-2)
    recorded = learn.recorder.values[-1][1]
    fct.test_close(learn.validate()[0], recorded, eps=1e-6)
    x, y = learn.dls.valid.dataset.x, learn.dls.valid.dataset.y
    learn.model.eval()
    with torch.no_grad(): plain = F.cross_entropy(learn.model(x), y)
    fct.test_close(recorded, plain, eps=1e-5)
    preds, targs, losses = learn.get_preds(with_loss=True)
    fct.test_close(losses.mean(), plain, eps=1e-5)


@pytest.mark.parametrize('first', ['sparsify', 'distill'])
def test_beside_sparsify_callback(first):
    "Any order in cbs: the student is pruned exactly, masked weights stay zero after every step, the teacher dense"
    teacher = trained_teacher()
    sd = state(teacher)
    sp = SparsifyCallback(0.9, 'weight', 'global', 'magnitude', 'agp')
    kd = DistillCallback(teacher)
    learn = learner(cbs=[sp, kd] if first == 'sparsify' else [kd, sp])
    z = CheckZeros(sp)
    learn.fit(2, 1e-2, cbs=z)
    assert z.checked > 0
    n = sum(m.weight.numel() for m in sp.sparsifier.layers.values())
    fct.test_eq(sum(int((m.weight == 0).sum()) for m in sp.sparsifier.layers.values()), round(0.9 * n))
    assert same(state(teacher), sd)


def test_after_compact():
    "A filter-pruned, compacted student (fewer channels) distils from the dense teacher: logits of the same shape"
    learn = learner(small_cnn(c=8), flat=False, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot'))
    learn.fit(1, 1e-2)
    teacher = copy.deepcopy(learn.model)  # (masked but not compacted: the shapes of the dense model)
    teacher_n = sum(p.numel() for p in teacher.parameters())
    Pruner(learn).compact()
    assert sum(p.numel() for p in learn.model.parameters()) < 0.7 * teacher_n
    cap = Capture()
    w0 = state(learn.model)
    learn.fit(1, 1e-3, cbs=[DistillCallback(teacher, alpha=1.), cap])
    assert not same(state(learn.model), w0)
    teacher.eval()
    with torch.no_grad(): zt = teacher(*cap.got['xb'])
    fct.test_close(cap.got['loss_grad'], kd_loss(cap.got['pred'], zt), eps=1e-5)


def test_wrong_teacher_refused_before_anything_changes():
    "A teacher with 5 outputs for a 10-class student: a clear error, and nothing pruned or trained (one-shot beside)"
    learn = learner(cbs=[SparsifyCallback(0.9, schedule='one_shot'), DistillCallback(mlp(64, 16, 5))])
    sd = state(learn.model)
    with pytest.raises(ValueError, match="does not have the student's shape"): learn.fit(1, 1e-2)
    assert same(state(learn.model), sd)
    learn = learner()
    learn.add_cb(DistillCallback(copy.copy(learn.model)))  # a shallow copy: the same parameters
    with pytest.raises(ValueError, match='shares weights'): learn.fit(1, 1e-2)
    assert same(state(learn.model), sd)
    learn = learner()
    with pytest.raises(ValueError, match='shares weights'): learn.fit(1, 1e-2, cbs=DistillCallback(learn.model))
    assert same(state(learn.model), sd)
    learn = learner(cbs=DistillCallback(nn.Sequential(mlp(64, 16, 10), nn.Softmax(1)).requires_grad_(False)))
    learn.fit(1, 1e-2)  # (a teacher without gradients, returning probabilities, is a valid model: it runs)


@pytest.mark.parametrize('kw, err, msg', [
    (dict(T=0), ValueError, 'T=0'), (dict(T=-1.), ValueError, 'T=-1'), (dict(T=float('nan')), ValueError, 'T=nan'),
    (dict(T='4'), TypeError, 'T must be a number'), (dict(T=True), TypeError, 'T must be a number'),
    (dict(alpha=1.5), ValueError, 'alpha=1.5'), (dict(alpha=-0.1), ValueError, 'alpha=-0.1'),
    (dict(alpha=None), TypeError, 'alpha must be a number'),
    (dict(loss=F.mse_loss, T=2.), ValueError, 'loss= replaces'), (dict(loss='mse'), TypeError, 'loss must be'),
    (dict(dim=True), TypeError, 'dim must be an int')])
def test_bad_arguments(kw, err, msg):
    with pytest.raises(err, match=msg): DistillCallback(mlp(64, 10), **kw)


def test_not_a_module():
    with pytest.raises(TypeError, match='teacher must be an nn.Module'): DistillCallback(mlp(64, 10).state_dict())


def _sequential_dls(bs):
    xt, yt, _, _ = digits_arrays()
    ds = TensorPairs(xt[:256], yt[:256])
    return DataLoaders(DataLoader(ds, bs=bs, shuffle=False, drop_last=True), DataLoader(ds, bs=128),
                       device=torch.device('cpu'))


def test_gradient_accumulation():
    "Two half batches accumulated take the step that one whole batch takes: the term is scaled with the loss"
    teacher = trained_teacher()
    def run(bs, cbs):
        learn = learner(dls=_sequential_dls(bs), opt_func=SGD, wd=0.)
        learn.fit(1, 0.5, cbs=[DistillCallback(teacher, alpha=0.8)] + cbs)
        return state(learn.model)
    whole = run(64, [])
    acc = run(32, [GradientAccumulation(64)])
    for k in whole: fct.test_close(acc[k], whole[k], eps=1e-5)


class CPUMixedPrecision(MixedPrecision):
    "fastai's MixedPrecision with a CPU autocast (fastai's own is a CUDA one: a no-op here)"
    def before_fit(self):
        super().before_fit()
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16)


def test_teacher_runs_under_the_students_autocast():
    teacher = trained_teacher()
    dtypes = []
    teacher[0].register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    learn = learner(cbs=[DistillCallback(teacher), CPUMixedPrecision('bf16')])
    learn.fit(1, 1e-2)
    assert torch.bfloat16 in dtypes  # the training batches' teacher forward ran in bf16
    assert all(torch.isfinite(torch.tensor(v[:2])).all() for v in learn.recorder.values)


def test_to_bf16_and_to_fp16_run_on_cpu():
    for to in ('to_bf16', 'to_fp16'):
        learn = getattr(learner(cbs=DistillCallback(trained_teacher())), to)()
        with pytest.warns(UserWarning): learn.fit(1, 1e-2)  # (fastai's CUDA autocast: disabled on the CPU)
        assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()


def test_fine_tune():
    teacher = trained_teacher()
    sd = state(teacher)
    learn = learner(splitter=lambda m: [params(m[:2]), params(m[2:])], cbs=DistillCallback(teacher))
    w0 = state(learn.model)
    learn.fine_tune(1, 1e-2, freeze_epochs=1)
    fct.test_eq(len(learn.recorder.values), 1)  # the unfrozen fit
    assert not same(state(learn.model), w0)
    assert same(state(teacher), sd)


def test_no_host_sync_per_batch():
    "The teacher's forward and the term read nothing back to the host (on CUDA each read would stall the device)"
    counts = []
    class Counted(DistillCallback):
        def after_pred(self):
            with count_syncs() as c: super().after_pred()
            counts.append(sum(c.values()))
        def after_loss(self):
            with count_syncs() as c: super().after_loss()
            counts.append(sum(c.values()))
    learner(cbs=Counted(trained_teacher())).fit(1, 1e-2)
    assert counts and not any(counts), counts


def test_export_leaves_the_teacher_out(tmp_path):
    "learn.export() carries one model; the loaded Learner predicts, and asks for a teacher before training"
    teacher = nn.Sequential(mlp(64, 512, 10))  # large: a file that carried it would be much bigger
    learn = learner(cbs=DistillCallback(teacher), path=tmp_path)
    learn.fit(1, 1e-2)
    learn.export('kd.pkl')
    assert learn.distill.teacher is teacher  # the callback in memory keeps it
    plain = learner(path=tmp_path)
    plain.export('plain.pkl')
    assert (tmp_path / 'kd.pkl').stat().st_size < (tmp_path / 'plain.pkl').stat().st_size + 20_000
    with pytest.warns(UserWarning): loaded = load_learner(tmp_path / 'kd.pkl')
    assert loaded.distill.teacher is None
    x = torch.rand(3, 64)
    fct.test_close(loaded.model.eval()(x), learn.model.eval()(x))
    loaded.dls = learn.dls
    loaded.get_preds()  # validation needs no teacher
    with pytest.raises(ValueError, match='has no teacher'): loaded.fit(1, 1e-2)
    loaded.distill.teacher = teacher
    loaded.fit(1, 1e-2)
    c = copy.deepcopy(learn.distill)  # a deep copy keeps a (copied) teacher
    assert c.teacher is not None and c.teacher is not teacher


class Pair(nn.Module):
    "Two outputs: logits and the hidden features"
    def __init__(self): super().__init__(); self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)
    def forward(self, x):
        h = self.a(x).relu()
        return self.b(h), h


def test_other_outputs_need_loss():
    "Regression outputs (B,) or tuples: the KL term is refused with what to pass; loss= distils them"
    reg = lambda: nn.Sequential(nn.Linear(64, 1), nn.Flatten(0))
    mse = lambda p, y: F.mse_loss(p, y.float())
    learn = learner(reg(), loss_func=mse)
    with pytest.raises(ValueError, match='pass dim=, or loss='): learn.fit(1, 1e-3, cbs=DistillCallback(reg()))
    learn.fit(1, 1e-3, cbs=DistillCallback(reg(), loss=F.mse_loss))
    learn = learner(Pair(), loss_func=lambda out, y: F.cross_entropy(out[0], y))
    with pytest.raises(TypeError, match='pass loss='): learn.fit(1, 1e-3, cbs=DistillCallback(Pair()))
    teacher = Pair()
    both = lambda s, t: F.mse_loss(s[0], t[0]) + F.mse_loss(s[1], t[1])
    class CaptureTuple(Callback):
        order, run_valid = 7, False
        def __init__(self): self.got = []
        def after_loss(self):
            self.got.append((self.xb, self.yb, [o.detach() for o in self.pred], self.loss_grad.detach()))
    c = CaptureTuple()
    learn.fit(1, 1e-3, cbs=[DistillCallback(teacher, alpha=0.5, loss=both), c])
    xb, yb, (zs, hs), got = c.got[0]
    with torch.no_grad(): zt, ht = teacher(*xb)
    fct.test_close(got, 0.5 * F.cross_entropy(zs, yb[0]) + 0.5 * (F.mse_loss(zs, zt) + F.mse_loss(hs, ht)), eps=1e-5)


def _regression_dls(y):
    X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    return DataLoaders(DataLoader(TensorPairs(X[:192], y(X[:192])), bs=64, shuffle=True, drop_last=True),
                       DataLoader(TensorPairs(X[192:], y(X[192:])), bs=64), device=torch.device('cpu'))


@pytest.mark.parametrize('n_out, loss_func, y', [
    (1, lambda p, y: F.mse_loss(p, y), lambda X: X[:, :1] * 2),        # a (B, 1) output: a KL of exactly 0
    (3, fastai.losses.MSELossFlat(), lambda X: X[:, :3] * 2),          # regression
    (3, nn.L1Loss(), lambda X: X[:, :3] * 2),
    (5, fastai.losses.BCEWithLogitsLossFlat(), lambda X: (X[:, :5] > 0).float())])  # multi-label
def test_kl_term_refused_for_outputs_that_are_not_class_logits(n_out, loss_func, y):
    "Regression or multi-label outputs: the softmax KL means nothing; refused before training, pointing to loss="
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, n_out))
    learn = learner(net(2), dls=_regression_dls(y), loss_func=loss_func)
    sd = state(learn.model)
    with pytest.raises(ValueError, match='loss='): learn.fit(1, 1e-3, cbs=DistillCallback(net(1)))
    assert same(state(learn.model), sd)
    c = Capture()
    learn.fit(1, 1e-3, cbs=[DistillCallback(net(1), loss=F.mse_loss), c])  # loss= distils them
    assert torch.isfinite(c.got['loss_grad'])


def test_kd_loss_ignores_classes_both_models_mask():
    "-inf on the same class in both (a masked vocabulary): the KL of the other classes, not NaN; finite gradients"
    inf = float('inf')
    zs = torch.tensor([[2., 1., -inf], [.5, .1, -inf]], requires_grad=True)
    zt = torch.tensor([[1.5, 1.2, -inf], [.3, .4, -inf]])
    got = kd_loss(zs, zt, T=2.)
    fct.test_close(got, kd_loss(zs[:, :2], zt[:, :2], T=2.))
    got.backward()
    assert torch.isfinite(zs.grad).all()
    fct.test_eq(zs.grad[:, 2], torch.zeros(2))


def test_teacher_in_another_dtype():
    "A bf16 teacher beside a float32 student: a clear error naming both dtypes; under a bf16 autocast it trains"
    teacher = trained_teacher().to(torch.bfloat16)
    learn = learner()
    sd = state(learn.model)
    msg = r'torch\.bfloat16 and the student.s torch\.float32.*teacher\.to\(torch\.float32'
    with pytest.raises(ValueError, match=msg):
        learn.fit(1, 1e-2, cbs=DistillCallback(teacher))
    assert same(state(learn.model), sd)
    learn = learner(cbs=[DistillCallback(teacher), CPUMixedPrecision('bf16')])  # the autocast of to_bf16, on the CPU
    learn.fit(1, 1e-2)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()
