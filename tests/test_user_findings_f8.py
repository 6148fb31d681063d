"What a workflow fuzzer (F8, seventh session) found: each test fails on the code before its fix"
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
import fastai.callback.progress  # Learner.no_bar
from fasterprune.callback import SparsifyCallback
from fasterprune.lottery import LotteryTicket
from fasterprune.data import TensorPairs


def _learner(model, n=256, d=16, c=10, bs=32):
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    dls = DataLoaders(DataLoader(TensorPairs(x, y), bs=bs, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(x, y), bs=2 * bs), device='cpu')
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss())


@pytest.mark.parametrize('param', [None, 'weight_norm'])
def test_rewind_keeps_a_layer_a_global_ranking_emptied(param):
    "A layer a SparsifyCallback pruned whole stays pruned through LotteryTicket.prune() and rewind()"
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad(): m[2].weight.mul_(1e-3)  # small weights: the global ranking takes this whole layer
    if param == 'weight_norm': parametrizations.weight_norm(m[2])  # its weight is computed at every read
    learn = _learner(m)
    lt = LotteryTicket(learn, rate=0.2, rewind_iter=0)
    cb = SparsifyCallback(0.6, 'weight', 'global', schedule='one_shot', show_sparsity=False)
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fct.test_eq(int(cb.sparsifier.weight('2').count_nonzero()), 0)
    lt.prune(); lt.rewind()
    for n, mk in cb.sparsifier.masks.items():  # every weight the callback pruned is still zero
        fct.test_eq(int(cb.sparsifier.weight(n)[~mk].count_nonzero()), 0)
    fct.test_eq(int(cb.sparsifier.weight('2').count_nonzero()), 0)


class _TwoHeads(nn.Module):
    "An auxiliary output the loss does not use: its layer gets no gradient"
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(16, 8), nn.Linear(8, 10), nn.Linear(8, 3)
    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h), self.aux(h)


def test_gradient_criterion_names_the_layer_the_loss_does_not_reach():
    "The refusal says which layer got no gradient and how to leave it out, not 'run a backward pass first'"
    torch.manual_seed(0)
    learn = _learner(_TwoHeads())
    learn.loss_func = lambda out, t: nn.functional.cross_entropy(out[0], t)
    cb = SparsifyCallback(0.5, 'weight', 'global', criteria='gradient_magnitude', schedule='agp', show_sparsity=False)
    with learn.no_bar(), learn.no_logging():
        fct.test_fail(lambda: learn.fit(1, 1e-2, cbs=cb), contains="exclude=['aux']")
        cb = SparsifyCallback(0.5, 'weight', 'global', criteria='gradient_magnitude', schedule='agp', exclude='aux',
                              show_sparsity=False)
        learn.fit(1, 1e-2, cbs=cb)  # the advice works
    fct.test_close(cb.sparsifier.sparsity(), 0.5, eps=1e-6)
    fct.test_eq(int(learn.model.aux.weight.count_nonzero()), 24)


def test_sensitivity_leaves_a_spectral_norm_layer_as_it_was():
    "The scan reads weights in eval mode: spectral_norm's power-iteration vectors do not move"
    from torch.nn.utils import parametrizations
    from fasterprune.sensitivity import sensitivity
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10))
    parametrizations.spectral_norm(m[2])
    learn = _learner(m, n=64, bs=16)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    sensitivity(learn, ratios=(0.5,), show_progress=False)
    fct.test_eq([k for k in sd0 if not torch.equal(sd0[k], m.state_dict()[k])], [])
    fct.test_eq(all(mod.training for mod in m.modules()), True)  # the modes come back


def test_emptying_a_spectral_norm_layer_says_the_output_is_nan(caplog):
    "A global ranking that empties a spectral_norm layer makes every output NaN: the warning says so"
    import logging
    from torch.nn.utils import parametrizations
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    parametrizations.spectral_norm(m[2])
    with torch.no_grad(): m[0].weight.mul_(100); m[4].weight.mul_(100)  # the middle layer's weights are the smallest
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Sparsifier(m, 'weight', 'global').sparsify(0.4)
    fct.test_eq(bool(torch.isnan(m.eval()(torch.randn(2, 8))).all()), True)
    fct.test_eq(any('NaN from here on' in r.getMessage() and '2 divides' in r.getMessage() for r in caplog.records), True)


def _filter_fit(model, **kw):
    learn = _learner(model)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', show_sparsity=False, **kw))
    return learn


def test_fit_after_lr_find_and_compact():
    "lr_find leaves its last batch's graph on the Learner; compact() then fit() trained, it no longer fails in backward"
    import fastai.callback.schedule  # Learner.lr_find
    from fasterprune.pruner import Pruner
    torch.manual_seed(0)
    learn = _filter_fit(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)))
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)
    Pruner(learn).compact()
    fct.test_eq(learn.model[2].weight.shape, (16, 16))
    w = learn.model[2].weight.clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fct.test_ne(learn.model[2].weight, w)  # it trained


def test_save_with_opt_after_compact_adds_a_bias(tmp_path):
    "A bias the fold creates gets an optimizer state: learn.save(with_opt=True) and load work after lr_find + compact"
    import fastai.callback.schedule  # Learner.lr_find
    from fasterprune.pruner import Pruner
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 10))
    learn = _filter_fit(m, coupled=False)
    learn.path = tmp_path
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)  # its opt state: a plain dict
    Pruner(learn).compact()
    fct.test_eq(m[2].bias is not None, True)  # the removed channels' constant output (GELU(bias)) folded in
    learn.save('m', with_opt=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    learn.save('m', with_opt=True)
    learn.load('m', with_opt=True)


def test_sparse_export_leaves_a_spectral_norm_model_untouched():
    "to_sparse_inference of a model in train mode reads its weights in eval mode: spectral_norm's vectors stay"
    from torch.nn.utils import parametrizations
    from fasterprune.inference import to_sparse_inference
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10))
    parametrizations.spectral_norm(m[2])
    Sparsifier(m, 'weight', 'local').sparsify(0.5)
    x = torch.randn(8, 16)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    to_sparse_inference(m, x, kernels='csr', n_runs=1)
    fct.test_eq([k for k in sd0 if not torch.equal(sd0[k], m.state_dict()[k])], [])
    fct.test_eq(m.training, True)


def test_reports_leave_a_spectral_norm_model_untouched():
    "sparsity_report and the FLOP counts of a model in train mode do not move spectral_norm's vectors"
    from torch.nn.utils import parametrizations
    from fasterprune.metrics import sparsity_report, theoretical_speedup
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10))
    parametrizations.spectral_norm(m[2])
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    sparsity_report(m, torch.randn(2, 16))
    theoretical_speedup(m, torch.randn(2, 16))
    fct.test_eq([k for k in sd0 if not torch.equal(sd0[k], m.state_dict()[k])], [])
    fct.test_eq(all(mod.training for mod in m.modules()), True)


def test_sparse_export_of_a_spectral_norm_conv_in_train_mode():
    "A refused (kept dense) spectral_norm Conv2d read in train mode made the export fail its own check (R10)"
    from torch.nn.utils import parametrizations
    from fasterprune.inference import to_sparse_inference
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
    parametrizations.spectral_norm(m[2])
    m.eval()
    Sparsifier(m, 'weight', 'local').sparsify(0.9)
    sd0 = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    x = torch.randn(4, 3, 8, 8)
    new = to_sparse_inference(m, x, n_runs=1, kernels='csr')
    fct.test_eq([k for k in sd0 if not torch.equal(sd0[k], m.state_dict()[k])], [])
    m.eval()
    with torch.no_grad(): fct.test_close(new(x), m(x), eps=1e-4)


@pytest.mark.parametrize('kind', ['namedtuple', 'fastuple'])
def test_fit_after_an_interrupted_batch_and_compact_with_a_structured_output(kind):
    "A fit stopped mid-batch leaves learn.pred with its graph in any structure: compact() then fit() trains (R10, R11)"
    import collections
    from fastcore.basics import fastuple
    from fastai.callback.core import Callback
    from fasterprune.pruner import Pruner
    Named = collections.namedtuple('Named', 'logits hidden')
    Out = Named if kind == 'namedtuple' else (lambda *a: fastuple(a))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        def forward(self, x): return Out(self.l2(torch.relu(self.l1(torch.relu(self.l0(x))))), x * 2)

    class Interrupt(Callback):
        def after_loss(self): raise KeyboardInterrupt  # the notebook's stop button, mid-batch

    torch.manual_seed(0)
    learn = _learner(Net())
    learn.loss_func = lambda out, t: nn.functional.cross_entropy(out[0], t)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, 'filter', 'local', schedule='one_shot', show_sparsity=False,
                                                layers=['l0', 'l1']))
        try: learn.fit(1, 1e-3, cbs=Interrupt())
        except KeyboardInterrupt: pass
    Pruner(learn).compact()
    fct.test_eq(learn.model.l1.weight.shape, (16, 16))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


@pytest.mark.parametrize('param', [None, 'weight_norm'])
def test_a_zero_initialized_layer_is_not_taken_as_emptied(param):
    "A layer zero at the rewind point too (weight_norm: its scale g zero) is not masked whole by prune_weights (R11)"
    from torch.nn.utils import parametrizations
    from fasterprune.rewind import Rewinder
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    if param == 'weight_norm': parametrizations.weight_norm(m[2])
    with torch.no_grad(): (m[2].parametrizations.weight.original0 if param else m[2].weight).zero_()
    rw = Rewinder(m).keep_rewind_point(0)
    rw.prune_weights(0.2)
    fct.test_eq(int(rw.masks['2'].sum()), 205)  # 20 % of 256 pruned like any layer, not all of it
