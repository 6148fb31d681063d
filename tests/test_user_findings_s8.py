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
    fct.test_eq(torch.equal(w.detach() == 0, pruned), True)  # the callback's zeros stay zero, no more (attention=None)
    fct.test_eq(int(learn.model.l.weight.detach().ne(0).sum()), round(64 * 0.5 * 0.8))  # the layers: 20 % more
    _fit(learn)  # the next round's fit keeps them at zero
    fct.test_eq(torch.equal(w.detach() == 0, pruned), True)
    lt.next_round()
    fct.test_eq(torch.equal(w.detach() == 0, pruned), True)


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


def test_chance_zeros_keep_a_projection_as_it_is_and_excluding_one_projection_works():
    "attention=None: a few zeros are kept, not an opt-in to pruning; one projection can be left out by name"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    net.a, net.b = nn.MultiheadAttention(16, 2), nn.MultiheadAttention(16, 2)
    with torch.no_grad(): net.a.in_proj_weight[0, 0] = 0; net.b.in_proj_weight[0, :4] = 0
    rw = Rewinder(net, exclude='b.in_proj_weight').keep_rewind_point()
    for _ in range(3): rw.next_round(0.5)
    fct.test_eq(int(net.a.in_proj_weight.detach().eq(0).sum()), 1)  # the one zero kept, nothing more pruned
    fct.test_eq('b.in_proj_weight' in rw.layers, False)
    fct.test_eq(int(net.b.in_proj_weight.detach().eq(0).sum()), 4)  # left out: rewound to the point (zeros there too)
    fct.test_eq(int(net[0].weight.detach().ne(0).sum()), round(round(round(256 * 0.5) * 0.5) * 0.5))
    with pytest.raises(ValueError, match='attention=True'):
        Rewinder(net, layers='*.in_proj_weight')


def test_refused_calls_leave_the_rewinder_as_it_was(caplog):
    learn = _learner()
    _fit(learn, SparsifyCallback(0.5, 'weight', 'local', schedule='one_shot', show_sparsity=False, attention=True))
    model = learn.model
    rw = Rewinder(model, exclude='a.*').keep_rewind_point()  # the projection left out (a warning says so)
    rw.round = 7
    point = {k: v.clone() for k, v in rw.rewind_point.items()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {'round': 3, 'rewind_iter': 0, 'masks': {'a.in_proj_weight': torch.ones(48, 16, dtype=torch.bool)},
           'rewind': {k: torch.zeros_like(v) for k, v in sd.items()}}
    with pytest.raises(ValueError, match='not a pruned layer'): rw.load_ticket(bad)
    fct.test_eq(rw.round, 7)
    fct.test_eq(all(torch.equal(rw.rewind_point[k], v) for k, v in point.items()), True)
    fct.test_eq(all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()), True)
    rw2 = Rewinder(model)  # tracks the projection (it holds the callback's zeros)
    rw3 = Rewinder(_learner(1).model)  # dense: nothing tracked; a mask of the wrong shape is refused, not tracked
    with pytest.raises(ValueError, match='shape'):
        rw3.set_masks({'a.in_proj_weight': torch.ones(16, 16, dtype=torch.bool)})
    fct.test_eq('a.in_proj_weight' in rw3.layers, False)
    fct.test_eq('a.in_proj_weight' in rw2.layers, True)


def test_pruner_made_after_a_lottery_ticket_cuts_its_masks_and_rewind_point():
    from fasterprune.pruner import Pruner
    learn = _learner()
    lt = LotteryTicket(learn, rate=0.2)
    _fit(learn)
    lt.prune()
    Pruner(learn, torch.randn(2, 5, 16)).prune(0.5)  # whole hidden units of out_proj -> l: the ticket must follow
    lt.rewind()  # before: the rewind point no longer fits
    for n, mk in lt.masks.items():
        fct.test_eq(tuple(mk.shape), tuple(lt.rewinder.layers[n].weight.shape))
        fct.test_eq(bool(lt.rewinder.layers[n].weight.detach()[~mk].eq(0).all()), True)
    _fit(learn)


def test_lottery_table_compression_counts_attention_projections():
    from fasterprune.lottery import _row
    torch.manual_seed(0)
    net = AttnNet()
    n_params = sum(p.numel() for p in net.parameters())
    mk = {'a.in_proj_weight': torch.zeros(48, 16, dtype=torch.bool), 'a.out_proj': torch.ones(16, 16, dtype=torch.bool),
          'l': torch.ones(4, 16, dtype=torch.bool)}
    row = _row(1, [mk], n_params, net, {'ticket': [0.5]}, ['ticket'])
    fct.test_close(row['compression'], n_params / (n_params - 48 * 16), eps=1e-9)


def test_pruning_while_a_loss_still_holds_its_graph_says_so(caplog):
    "R13: a loss kept from before the cut makes the next backward fail in PyTorch's words; the Pruner says why first"
    from fasterprune.pruner import Pruner
    def run(keep):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(5, 8)
        loss = m(x).pow(2).mean()
        loss.backward()
        m.zero_grad(set_to_none=True)
        if not keep: del loss
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(m, x).prune(0.5)
        warned = any('autograd graph built before the cut' in r.getMessage() for r in caplog.records)
        try: m(x).pow(2).mean().backward(); ok = True
        except RuntimeError: ok = False
        return warned, ok
    fct.test_eq(run(keep=True), (True, False))   # warned, and the warning is right: the backward fails
    fct.test_eq(run(keep=False), (False, True))  # nothing kept: no warning, the backward runs


def test_a_ticket_made_after_a_sparsifying_fit_keeps_its_zeros_through_round_0_and_the_rewind():
    "W10: zeros at the rewind point (a callback pruned them before) regrew in round 0 and after every rewind"
    learn = _learner()
    _fit(learn, SparsifyCallback(0.5, 'weight', 'local', schedule='one_shot', show_sparsity=False, attention=True))
    zero = {n: p.detach() == 0 for n, p in learn.model.named_parameters() if p.dim() == 2}
    lt = LotteryTicket(learn, rate=0.5)
    _fit(learn)  # round 0: nothing regrows
    for n, p in learn.model.named_parameters():
        if n in zero: fct.test_eq(bool(p.detach()[zero[n]].eq(0).all()), True)
    lt.next_round()
    _fit(learn)
    for n, p in learn.model.named_parameters():
        if n in zero: fct.test_eq(bool(p.detach()[zero[n]].eq(0).all()), True)
    n_w = sum(z.numel() for z in zero.values())
    fct.test_close(lt.remaining(), sum(int(p.detach().ne(0).sum()) for n, p in learn.model.named_parameters()
                                       if n in zero) / n_w, eps=1e-12)


def test_a_pruner_made_before_the_fit_takes_the_callbacks_heads_and_no_false_optimizer_warning(caplog):
    "W10: Pruner(learn) read the SparsifyCallback's heads= only when made; a Learner without an optimizer was warned"
    from fasterprune.graph import AttentionHeads
    from fasterprune.pruner import Pruner

    class Attn(nn.Module):
        def __init__(self, d=16, h=4):
            super().__init__()
            self.n_heads, self.q, self.k, self.v, self.o = h, *[nn.Linear(d, d) for _ in range(4)]
        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (f(x).view(B, T, self.n_heads, -1).transpose(1, 2)
                       for f in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
            return self.o(a.transpose(1, 2).reshape(B, T, -1))
    class Net(nn.Module):
        def __init__(self): super().__init__(); self.attn, self.l = Attn(), nn.Linear(16, 4)
        def forward(self, x): return self.l(x + self.attn(x)).mean(1)
    learn = _learner()
    learn.model = Net()
    pr = Pruner(learn).keep_rewind_point()  # made before the fit
    heads = {'attn': AttentionHeads('n_heads', q='q', k='k', v='v', o='o')}
    _fit(learn, SparsifyCallback(0.5, 'filter', heads=heads, schedule='one_shot', show_sparsity=False))
    learn.opt = None  # as a LotteryTicket's rewind leaves it (fastai makes a new one at the next fit)
    with caplog.at_level(logging.WARNING, logger='fasterprune'): pr.compact()
    fct.test_eq((learn.model.attn.n_heads, learn.model.attn.q.out_features), (2, 8))
    fct.test_eq([r.getMessage() for r in caplog.records if 'given no optimizer' in r.getMessage()], [])
    _fit(learn)


def test_a_rewind_keeps_the_biases_of_heads_and_units_a_filter_callback_pruned():
    "F9: a rewind restored the q/k/v and fc1 biases of pruned heads and units; compact() then kept those heads"
    import torch.nn.functional as F
    from fasterprune.graph import AttentionHeads
    from fasterprune.pruner import Pruner

    class Attn(nn.Module):
        def __init__(self, d=16, h=4):
            super().__init__()
            self.num_heads, self.head_dim = h, d // h
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc1, self.fc2, self.head = Attn(), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        def forward(self, x):
            x = x + self.attn(x)
            return self.head((x + self.fc2(F.gelu(self.fc1(x)))).mean(1))
    learn = _learner()
    learn.model = Net()
    lt = LotteryTicket(learn, rate=0.2)  # rewind point: the first fit's start, before anything is pruned
    cb = SparsifyCallback(0.5, 'filter', schedule='one_shot', show_sparsity=False,
                          heads={'attn': AttentionHeads('num_heads', q='q', k='k', v='v', o='o')})
    _fit(learn, cb)
    lt.next_round()
    learn.remove_cb(cb)  # the ticket trains alone
    _fit(learn)
    m = learn.model
    dead = (m.attn.q.weight == 0).all(1)
    fct.test_eq(int(dead.sum()), 8)
    fct.test_eq([int(p.bias.detach()[dead].ne(0).sum()) for p in (m.attn.q, m.attn.k, m.attn.v)], [0, 0, 0])
    dead1 = (m.fc1.weight == 0).all(1)
    assert int(dead1.sum()) >= 12, int(dead1.sum())
    fct.test_eq(int(m.fc1.bias.detach()[dead1].ne(0).sum()), 0)
    Pruner(learn).compact()
    fct.test_eq((m.attn.num_heads, m.fc1.out_features), (2, 32 - int(dead1.sum())))  # every unit pruned whole goes
    _fit(learn)  # the ticket goes on training after the surgery, its masks (bias masks too) cut with it
    lt.next_round()
    fct.test_eq({n: len(bm) for n, bm in lt.rewinder._bias_masks.items()},
                {n: len(lt.rewinder.layers[n].bias) for n in lt.rewinder._bias_masks})


def test_keep_zeros_false_lets_an_initialization_with_zeros_train(caplog):
    "R15: keeping the rewind point took an eye_ init's zeros as pruned; it says so, and keep_zeros=False trains them"
    def run(**kw):
        learn = _learner()
        learn.model = nn.Sequential(nn.Flatten(), nn.Linear(80, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                    nn.Linear(16, 4))
        with torch.no_grad(): nn.init.eye_(learn.model[3].weight)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='fasterprune'):
            LotteryTicket(learn, **kw)
            _fit(learn)
        return int(learn.model[3].weight.detach().ne(0).sum()), any('keep_zeros=False' in r.getMessage()
                                                                    for r in caplog.records)
    fct.test_eq(run(), (16, True))                  # the default keeps them pruned, and warns
    n, warned = run(keep_zeros=False)
    assert n > 200 and not warned, (n, warned)      # trained like the rest


def test_tickets_carry_the_bias_masks_and_magnitude_emptied_units_keep_their_biases(tmp_path):
    "R15: a loaded ticket lost the bias masks; a unit the Rewinder emptied by magnitude had its zero bias frozen"
    import torch.nn.functional as F
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        def forward(self, x): return self.head((x + self.fc2(F.gelu(self.fc1(x)))).mean(1))
    learn = _learner()
    learn.model = Net()
    lt = LotteryTicket(learn, rate=0.2)
    _fit(learn, SparsifyCallback(0.5, 'filter', schedule='one_shot', show_sparsity=False))
    lt.next_round()
    dead = ~lt.rewinder._bias_masks['fc1']
    fct.test_eq(int(dead.sum()), 16)
    path = save_ticket(lt.ticket(), tmp_path/'t.pt')
    fresh = Net()
    load_ticket(path, fresh)
    rw = Rewinder(fresh).load_ticket(torch.load(path, weights_only=False))
    fct.test_eq(torch.equal(rw._bias_masks['fc1'], ~dead), True)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    rw.attach(opt)
    fresh(torch.randn(4, 5, 16)).sum().backward(); opt.step()
    fct.test_eq(int(fresh.fc1.bias.detach()[dead].ne(0).sum()), 0)  # held through a step
    # a unit emptied by the Rewinder's own magnitude masks keeps its bias, zero-initialized or not
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad(): m.fc1.bias.zero_()
    rw2 = Rewinder(m).keep_rewind_point()
    mk = torch.ones(32, 16, dtype=torch.bool)
    mk[:8] = False
    rw2.set_masks({'fc1': mk})
    rw2.next_round(0.2)
    rw2.next_round(0.2)  # twice, no fit between: the emptied units' biases are zero (their init), not pruning
    fct.test_eq(rw2._bias_masks, {})


def test_pruning_inside_a_batch_and_a_given_optimizer_and_a_model_attribute_named_heads():
    "R15: a prune from a callback crashed the Recorder; opt= was ignored for a Learner; model.heads was read as heads="
    from fastai.callback.core import Callback
    from fasterprune.pruner import Pruner
    class PruneOnce(Callback):
        def after_step(self):
            if self.iter == 1: Pruner(self.learn).prune(0.5)
    class MeanMLP(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        def forward(self, x): return self.b(torch.relu(self.a(x))).mean(1)
    learn = _learner()
    learn.model = MeanMLP()
    learn.model.heads = {'note': 'a plain attribute'}  # fastai's getattr reaches the model from a callback
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=PruneOnce())
    fct.test_eq(learn.model.a.out_features, 16)
    learn = _learner()
    learn.model = MeanMLP()
    opt = torch.optim.Adam(learn.model.parameters(), lr=1e-3)
    x = torch.randn(8, 5, 16)
    learn.model(x).sum().backward(); opt.step(); opt.zero_grad()
    Pruner(learn, x, opt=opt).prune(0.5)  # the Learner has no optimizer: the given one follows the cut
    fct.test_eq(tuple(opt.state[learn.model.a.weight]['exp_avg'].shape), (16, 16))
    learn.model(x).sum().backward(); opt.step()


def test_a_rewind_keeps_the_norm_entries_of_channels_a_filter_callback_pruned():
    "F9: a rewind restored BatchNorm/LayerNorm entries of pruned channels (a constant came back in their place)"
    from fasterprune.data import digits_dls, small_cnn
    torch.manual_seed(0)
    learn = Learner(digits_dls(bs=64, flat=False), small_cnn(c=8), loss_func=nn.CrossEntropyLoss())
    lt = LotteryTicket(learn, rate=0.2)  # its rewind point: the init, BatchNorm weights 1
    cb = SparsifyCallback(0.5, 'filter', schedule='one_shot', show_sparsity=False)
    _fit(learn, cb)
    bn = learn.model[1]
    gone = bn.weight.detach() == 0
    assert 0 < int(gone.sum()) < 8, int(gone.sum())
    lt.next_round()
    learn.remove_cb(cb)
    _fit(learn)
    fct.test_eq((int(bn.weight.detach()[gone].ne(0).sum()), int(bn.bias.detach()[gone].ne(0).sum())), (0, 0))
    fct.test_eq(torch.equal(lt.ticket()['norm_masks']['1'], ~gone), True)
    # a zero-initialized gamma (fastai's xresnet, zero_init_residual) is no pruning: it trains
    torch.manual_seed(0)
    learn2 = Learner(digits_dls(bs=64, flat=False), small_cnn(c=8), loss_func=nn.CrossEntropyLoss())
    with torch.no_grad(): learn2.model[4].weight.zero_()
    lt2 = LotteryTicket(learn2, rate=0.2)
    _fit(learn2)
    lt2.next_round()
    _fit(learn2)
    fct.test_eq(lt2.rewinder._norm_masks, {})  # nothing holds it at zero (here ReLU(0) gives it no gradient anyway)


def test_a_rewind_point_due_at_a_step_that_ends_the_epoch_is_kept_at_that_step():
    "R16: the point, kept once the step's callbacks ran, was lost or kept a step late when a callback ended the epoch"
    from fastai.callback.core import Callback
    from fastai.callback.training import ShortEpochCallback
    steps = []
    class Rec(Callback):
        order = 99
        def after_step(self): steps.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})
    for epochs in (1, 2):
        learn = _learner()  # 4 training batches an epoch; the ShortEpochCallback ends each after its 2nd
        rw = Rewinder(learn.model).attach(learn, iteration=2)
        steps.clear()
        with learn.no_bar(), learn.no_logging():
            learn.fit(epochs, 1e-3, cbs=[ShortEpochCallback(0.25, short_valid=False), Rec()])
        fct.test_eq(all(torch.equal(rw.rewind_point[k], v) for k, v in steps[1].items()), True)
        fct.test_eq(rw._due, False)


def test_keep_zeros_false_from_the_pruner_and_at_every_prune():
    "R16: Pruner.keep_rewind_point had no keep_zeros; a prune with no fit between took the init's zeros as pruned"
    from fasterprune.pruner import Pruner
    learn = _learner()
    learn.model = nn.Sequential(nn.Flatten(), nn.Linear(80, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                nn.Linear(16, 4))
    with torch.no_grad(): nn.init.eye_(learn.model[3].weight)
    pr = Pruner(learn).keep_rewind_point(keep_zeros=False)
    _fit(learn)
    assert int(learn.model[3].weight.detach().ne(0).sum()) > 200
    rw = Rewinder(learn.model, keep_zeros=False).keep_rewind_point()  # the point: the eye_ layer after training
    with torch.no_grad(): learn.model[3].weight.copy_(torch.eye(16))
    rw.keep_rewind_point()
    rw.next_round(0.2)  # no fit between: the init's zeros are not taken as pruned, 20 % of the layer goes
    fct.test_eq(int((~rw.masks['3']).sum()), round(256 * 0.2))
    with pytest.raises(TypeError, match='keep_zeros'): pr.keep_rewind_point(keep_zeros='no')


def test_a_surgery_inside_a_sparsifying_fit_is_refused_before_anything_changes():
    "R15: compact() from a callback between epochs of a SparsifyCallback fit failed at the next step (size mismatch)"
    from fastai.callback.core import Callback
    from fasterprune.pruner import Pruner
    seen = []
    class CompactBetweenEpochs(Callback):
        def after_epoch(self):
            sd = {k: v.clone() for k, v in self.learn.model.state_dict().items()}
            try: Pruner(self.learn).compact()
            except RuntimeError as e: seen.append(str(e))
            fct.test_eq(all(torch.equal(v, sd[k]) for k, v in self.learn.model.state_dict().items()), True)
    class MeanMLP(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        def forward(self, x): return self.b(torch.relu(self.a(x))).mean(1)
    learn = _learner()
    learn.model = MeanMLP()
    cb = SparsifyCallback(0.5, 'filter', schedule='one_shot', show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[cb, CompactBetweenEpochs()])
    assert len(seen) == 2 and 'once learn.fit has returned' in seen[0], seen
    n = sum(p.numel() for p in learn.model.parameters())
    Pruner(learn).compact()  # after the fit: it runs
    assert sum(p.numel() for p in learn.model.parameters()) < n


def test_r17_a_cancelled_fit_a_model_built_pruner_a_zeroed_gamma_and_weight_norm(caplog):
    "R17: masks after a fit cancelled in an earlier after_step; the in-fit refusal for Pruner(model); user zeros"
    from fastai.callback.core import Callback, CancelFitException
    from fasterprune.pruner import Pruner
    learn = _learner()
    lt = LotteryTicket(learn, rate=0.5)
    _fit(learn)
    lt.next_round()
    class Stop(Callback):  # order 0: its after_step runs before the RewindCallback's
        def after_step(self):
            if self.iter == 2: raise CancelFitException
    _fit(learn, Stop())
    for n, mk in lt.masks.items():
        fct.test_eq(bool(lt.rewinder.sparsifier.weight(n).detach()[~mk].eq(0).all()), True)
    # a Pruner made from the model, inside a fit whose SparsifyCallback prunes: refused like Pruner(learn)
    class MeanMLP(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        def forward(self, x): return self.b(torch.relu(self.a(x))).mean(1)
    seen = []
    class CompactModel(Callback):
        def after_epoch(self):
            try: Pruner(self.learn.model, torch.randn(2, 5, 16)).compact()
            except RuntimeError as e: seen.append(str(e))
    learn = _learner()
    learn.model = MeanMLP()
    _fit(learn, [SparsifyCallback(0.5, 'filter', schedule='one_shot', show_sparsity=False), CompactModel()])
    assert seen and 'once learn.fit has returned' in seen[0], seen
    # a gamma zeroed on purpose (its channel's filter alive) is not held, and its beta is left alone
    from fasterprune.data import digits_dls, small_cnn
    torch.manual_seed(0)
    learn = Learner(digits_dls(bs=64, flat=False), small_cnn(c=8), loss_func=nn.CrossEntropyLoss())
    rw = Rewinder(learn.model).attach(learn, iteration=0)
    _fit(learn)
    with torch.no_grad(): learn.model[1].weight[0] = 0
    rw.next_round(0.2)
    fct.test_eq(rw._norm_masks, {})
    # keep_zeros=False on a weight_norm layer: the init's zeros (in v) are not taken as pruned
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad(): nn.init.eye_(net[0].weight)
    torch.nn.utils.parametrizations.weight_norm(net[0])
    rw2 = Rewinder(net, keep_zeros=False).keep_rewind_point()
    rw2.next_round(0.2)
    fct.test_eq(int((~rw2.masks['0']).sum()), round(256 * 0.2))
