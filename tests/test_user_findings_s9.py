"Ninth session: what users hit around fits cut short, and the persistence of pruned models"
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.callback.core import Callback, CancelFitException, CancelBatchException
from fastai.optimizer import SGD
from torch.utils.data import TensorDataset, DataLoader
from fasterprune.callback import SparsifyCallback
from fasterprune.rewind import Rewinder
from fasterprune.schedules import one_shot


def _learner(seed=0):
    torch.manual_seed(seed)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    dl = lambda: DataLoader(TensorDataset(x, y), batch_size=16)  # 4 training batches an epoch
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return Learner(DataLoaders(dl(), dl()), net, loss_func=nn.CrossEntropyLoss(),
                   opt_func=lambda p, lr: SGD(p, lr, mom=0.9))


class Stop(Callback):
    "A user's callback (order 0, so its after_step runs before ours) that ends the fit or the batch at step `at`"
    def __init__(self, ex, at): self.ex, self.at, self.n = ex, at, 0
    def after_step(self):
        self.n += 1
        if self.n == self.at: raise self.ex()


@pytest.mark.parametrize('ex', [CancelFitException, CancelBatchException])
def test_masks_hold_when_an_earlier_callback_ends_the_fit_in_after_step(ex):
    "The last optimizer step's masked weights were left nonzero (20,444 on lenet_300_100) when a fit ended that way"
    learn = _learner()
    cb = SparsifyCallback(0.5, 'weight', 'local', schedule=one_shot(), show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-1, cbs=[cb, Stop(ex, 4)])  # step 4: the fit's last
    sp = cb.sparsifier
    for n, m in sp.layers.items():
        fct.test_eq(int(m.weight.detach()[~sp.masks[n]].ne(0).sum()), 0)
        fct.test_eq(int(m.weight.detach().eq(0).sum()), m.weight.numel() // 2)


@pytest.mark.parametrize('ex', [CancelFitException, CancelBatchException])
def test_a_step_whose_after_step_was_cut_short_counts_toward_the_rewind_point(ex):
    "A rewind point due at the step an earlier callback cut short was lost (fit: a RuntimeError) or kept a step late"
    steps = []
    class Rec(Callback):
        order = -5  # before the user's Stop: sees every step
        def after_step(self): steps.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})
    learn = _learner()
    rw = Rewinder(learn.model).attach(learn, iteration=2)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-1, cbs=[Rec(), Stop(ex, 2)])
    assert rw.rewind_point is not None
    fct.test_eq(all(torch.equal(rw.rewind_point[k], v) for k, v in steps[1].items()), True)
