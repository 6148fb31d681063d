"Eighth session: lottery-ticket rewinding of nn.MultiheadAttention's input projections"
import logging
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from torch.utils.data import TensorDataset, DataLoader
from fasterprune.callback import SparsifyCallback
from fasterprune.lottery import LotteryTicket, save_ticket, load_ticket
from fasterprune.rewind import Rewinder, imp_masks, weights_remaining


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.l = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)
    def forward(self, x): return self.l(self.a(x, x, x)[0]).mean(1)


def _learner(seed=0):
    torch.manual_seed(seed)
    x, y = torch.randn(64, 5, 16), torch.randint(0, 4, (64,))
    dl = lambda: DataLoader(TensorDataset(x, y), batch_size=16)
    return Learner(DataLoaders(dl(), dl()), AttnNet(), loss_func=nn.CrossEntropyLoss())


def _fit(learn, cbs=None):
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)


def test_lottery_rewind_keeps_attention_projections_pruned_by_the_callback():
    "SparsifyCallback(attention=True) pruned in_proj_weight; a LotteryTicket round must not rewind them to dense"
    learn = _learner()
    lt = LotteryTicket(learn, rate=0.2)
    _fit(learn, SparsifyCallback(0.5, 'weight', 'local', schedule='one_shot', show_sparsity=False, attention=True))
    w = learn.model.a.in_proj_weight
    pruned = w.detach() == 0
    fct.test_eq(int(pruned.sum()), w.numel() // 2)
    lt.prune()
    lt.rewind()
    fct.test_eq('a.in_proj_weight' in lt.masks, True)
    fct.test_eq(bool(w.detach()[pruned].eq(0).all()), True)  # the callback's zeros stay zero after the rewind
    kept = w.numel() // 2
    fct.test_eq(int(w.detach().eq(0).sum()), w.numel() - round(kept * 0.8))  # and 20 % of the survivors went too
    _fit(learn)  # the next round's fit keeps them at zero
    fct.test_eq(int(w.detach().eq(0).sum()), w.numel() - round(kept * 0.8))
    fct.test_eq(bool(w.detach()[~lt.masks['a.in_proj_weight']].eq(0).all()), True)


def test_attention_true_prunes_projections_from_the_first_round_and_false_warns(caplog):
    learn = _learner()
    lt = LotteryTicket(learn, rate=0.5, attention=True)
    _fit(learn)
    lt.next_round()
    mk = lt.masks['a.in_proj_weight']
    fct.test_eq(int(mk.sum()), mk.numel() // 2)
    fct.test_eq(int(learn.model.a.in_proj_weight.detach().ne(0).sum()), mk.numel() // 2)
    # attention=False leaves them untracked, says so once, and refuses a mask that names one
    learn2 = _learner()
    _fit(learn2, SparsifyCallback(0.5, 'weight', 'local', schedule='one_shot', show_sparsity=False, attention=True))
    with caplog.at_level(logging.WARNING, logger='fasterprune'):
        rw = Rewinder(learn2.model, attention=False).keep_rewind_point()
        rw.prune_weights(0.2)
    fct.test_eq(sum('a.in_proj_weight' in r.getMessage() and 'attention=False' in r.getMessage()
                    for r in caplog.records), 1)
    fct.test_eq('a.in_proj_weight' in rw.masks, False)
    with pytest.raises(ValueError, match='attention=False'):
        rw.set_masks({'a.in_proj_weight': torch.ones_like(learn2.model.a.in_proj_weight, dtype=torch.bool)})
    with pytest.raises(TypeError, match='attention must be'):
        Rewinder(learn2.model, attention='yes')


def test_ticket_with_attention_masks_loads_into_a_fresh_model(tmp_path):
    learn = _learner()
    lt = LotteryTicket(learn, rate=0.3, attention=True)
    _fit(learn)
    lt.next_round()
    path = save_ticket(lt.ticket(), tmp_path/'t.pt')
    torch.manual_seed(5)
    fresh = AttnNet()
    load_ticket(path, fresh)
    mk = lt.masks['a.in_proj_weight']
    fct.test_eq(torch.equal(fresh.a.in_proj_weight.detach(), learn.model.a.in_proj_weight.detach()), True)
    fct.test_eq(bool(fresh.a.in_proj_weight.detach()[~mk].eq(0).all()), True)
    # the fraction of weights remaining counts the projections when the masks name them
    lin = learn.model.a.out_proj.weight.numel() + learn.model.l.weight.numel()
    n = lin + mk.numel()
    kept = sum(int(m.sum()) for m in lt.masks.values())
    fct.test_close(weights_remaining(lt.masks, learn.model), kept / n, eps=1e-12)
    fct.test_close(lt.remaining(), kept / n, eps=1e-12)


def test_imp_masks_and_follow_cuts_on_attention_projections():
    torch.manual_seed(0)
    net = AttnNet()
    m1 = imp_masks(net, rate=0.25, attention=True)
    fct.test_eq(int(m1['a.in_proj_weight'].sum()), round(0.75 * net.a.in_proj_weight.numel()))
    m2 = imp_masks(net, m1, rate=0.25)  # the masks name a projection: it is ranked again, nothing revived
    fct.test_eq(bool((m2['a.in_proj_weight'] & ~m1['a.in_proj_weight']).any()), False)
    rw = Rewinder(net, attention=True).keep_rewind_point()
    rw.set_masks(m1)
    keep = torch.arange(0, 48, 2)
    rw.follow_cuts({'a.in_proj_weight': [(0, keep)]})
    fct.test_eq(torch.equal(rw.masks['a.in_proj_weight'], m1['a.in_proj_weight'][keep]), True)
    fct.test_eq(tuple(rw.rewind_point['a.in_proj_weight'].shape), (24, 16))
