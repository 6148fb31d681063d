"Ninth session: what users hit around fits cut short, and the persistence of pruned models"
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.callback.core import Callback, CancelFitException, CancelBatchException, CancelEpochException
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


@pytest.mark.parametrize('ex', [CancelFitException, CancelBatchException, CancelEpochException])
def test_a_step_whose_after_step_was_cut_short_counts_toward_the_rewind_point(ex):
    "A rewind point due at the step an earlier callback cut short was lost (fit: a RuntimeError) or kept a step late"
    steps = []
    class Rec(Callback):
        order = -5  # before the user's Stop: sees every step
        def after_step(self): steps.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})
    learn = _learner()
    rw = Rewinder(learn.model).attach(learn, iteration=2)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-1, cbs=[Rec(), Stop(ex, 2)])
    assert rw.rewind_point is not None
    fct.test_eq(all(torch.equal(rw.rewind_point[k], v) for k, v in steps[1].items()), True)


def test_movement_ranks_by_the_whole_fits_steps_and_gradient_magnitude_by_the_last_ones():
    "W11: movement forgot its sum at every mask update (one step of noise with update_every=1): 0.24 accuracy on LeNet"
    from fasterprune.criteria import Movement, GradientMagnitude
    seen = {}
    for cls in (Movement, GradientMagnitude):
        steps = seen.setdefault(cls.name, [])
        class Rec(cls):
            def score(self, name, w, out=None):
                if name == '0': steps.append(self.n_steps)
                return super().score(name, w, out)
        learn = _learner()
        cb = SparsifyCallback(0.5, 'weight', 'local', criteria=Rec(), schedule='agp', update_every=1,
                              show_sparsity=False)
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=cb)
    fct.test_eq(seen['movement'], list(range(1, len(seen['movement']) + 1)))  # 1, 2, 3, ...: every step so far
    fct.test_eq(set(seen['gradient_magnitude']), {1})  # the step since the last update
    assert len(seen['movement']) >= 3, seen


def test_a_global_filter_ranking_that_thins_a_layer_far_past_the_target_says_so(caplog):
    "W11: SparsifyCallback(granularity='filter') at its defaults cut a conv to 1 of 32 filters (accuracy 0.24) silently"
    from fasterprune.data import digits_dls
    for context, warned in (('global', True), ('local', False)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        with torch.no_grad(): net[0].weight[0].mul_(100)  # one filter far above its layer's mean: the rest rank low
        learn = Learner(digits_dls(bs=64, flat=False), net, loss_func=nn.CrossEntropyLoss())
        caplog.clear()
        with caplog.at_level('WARNING', logger='fasterprune'), learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3, cbs=SparsifyCallback(0.8, 'filter', context, schedule=one_shot(), show_sparsity=False))
        kept = int(net[0].weight.detach().flatten(1).ne(0).any(1).sum())
        fct.test_eq(('cut layers far past the target' in caplog.text, "'0' 1 of 32" in caplog.text), (warned, warned))
        fct.test_eq(kept, 1 if warned else 6)


@pytest.mark.parametrize('rnn', ['lstm', 'gru'])
def test_a_model_with_a_recurrent_layer_prunes_around_it_with_the_default_strict(rnn):
    "H13: Pruner(learn).compact() raised UnknownOpError on any model with an LSTM unless strict=False"
    from fasterprune.pruner import Pruner
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            cls = nn.LSTM if rnn == 'lstm' else nn.GRU
            self.emb, self.rnn = nn.Embedding(50, 16), cls(16, 32, batch_first=True, bidirectional=True)
            self.head = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
        def forward(self, x): return self.head(self.rnn(self.emb(x))[0][:, -1])
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randint(0, 50, (4, 7))
    before = {k: v.clone() for k, v in net.rnn.state_dict().items()}
    pr = Pruner(net, x)
    pr.prune(0.5)
    fct.test_eq((net.head[0].out_features, net.head[2].in_features, net.head[2].out_features), (24, 24, 10))
    fct.test_eq(all(torch.equal(v, before[k]) for k, v in net.rnn.state_dict().items()), True)  # the gates stay whole
    assert pr.history[-1]['rel_error'] <= 1e-5


def test_the_sparse_export_says_recurrent_layers_stay_dense(caplog):
    "H13: to_sparse_inference kept a pruned LSTM dense (right) and said only '0 of 2 weights sparse'"
    from fasterprune.sparsifier import Sparsifier
    from fasterprune.inference import to_sparse_inference, export_report
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 10)
        def forward(self, x): return self.fc(self.rnn(self.emb(x))[0][:, -1])
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randint(0, 50, (4, 7))
    Sparsifier(net, 'weight', 'local').sparsify(0.9)
    with caplog.at_level('INFO', logger='fasterprune'): new = to_sparse_inference(net, x, n_runs=2)
    rep = export_report(new)
    row = rep[rep.layer == 'rnn'].iloc[0]
    fct.test_eq((row.type, row.kernel), ('LSTM', 'dense'))
    assert 'recurrent rnn stay dense' in caplog.text, caplog.text
    fct.test_close(new(x), net(x), eps=1e-5)


@pytest.mark.parametrize('gran', ['filter', 'kernel', 'vector', '2:4'])
def test_zeros_of_a_finer_pruned_checkpoint_stay_pruned_under_a_coarser_granularity(gran):
    "F10 #1: a group ranked as pruned only when all of it was; zeros inside groups that stay trained back (127 of 173)"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # a checkpoint pruned unstructured: 60 % of each conv's weights
        for i in (0, 2): net[i].weight.mul_((torch.rand_like(net[i].weight) > 0.6).float())
    zero = {i: net[i].weight.detach() == 0 for i in (0, 2)}
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    dl = lambda: DataLoader(TensorDataset(x, y), batch_size=16)
    learn = Learner(DataLoaders(dl(), dl()), net, loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.25, gran, 'local', schedule='agp', show_sparsity=False,
                          exclude=['0', '6'] if gran == '2:4' else None)  # rows of 9: not in groups of 4
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=cb)
    for i in ((2,) if gran == '2:4' else (0, 2)): fct.test_eq(int(net[i].weight.detach()[zero[i]].ne(0).sum()), 0)


def test_a_fit_resumed_with_a_new_learner_and_callback_ends_as_the_uninterrupted_one(tmp_path):
    "F10 #2: the resumed callback ranked again at its first step; a coupled ranking then pruned 4 more channels"
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(12, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12)
            self.c2, self.b2 = nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        def forward(self, x): return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
            self.blocks, self.fc1, self.fc = nn.Sequential(Block(), Block()), nn.Linear(12, 16), nn.Linear(16, 10)
        def forward(self, x): return self.fc(torch.relu(self.fc1(self.blocks(self.stem(x)).mean((2, 3)))))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    dl = lambda: DataLoader(TensorDataset(x, y), batch_size=16)
    def learner():
        torch.manual_seed(1)
        return Learner(DataLoaders(dl(), dl()), Net(), loss_func=nn.CrossEntropyLoss(), path=tmp_path,
                       cbs=SparsifyCallback(0.5, 'filter', 'global', schedule='one_shot', show_sparsity=False))
    class StopAfterFirstEpoch(Callback):
        order = 90
        def after_epoch(self):
            if self.epoch == 0: raise CancelFitException()
    a, b = learner(), learner()
    with a.no_bar(), a.no_logging(): a.fit(3, 1e-2)
    with b.no_bar(), b.no_logging(): b.fit(3, 1e-2, cbs=StopAfterFirstEpoch())
    b.save('ck', with_opt=True)
    c = learner()
    c.load('ck', with_opt=True)
    with c.no_bar(), c.no_logging(): c.fit(3, 1e-2, start_epoch=1)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    fct.test_eq([k for k in sa if not torch.equal(sa[k], sc[k])], [])


def test_the_sparse_export_of_a_one_output_linear():
    "F10 #3: kernels='csr' refused any Linear with one output (a binary or regression head) as 'a bug of the export'"
    from fasterprune.inference import to_sparse_inference
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    with torch.no_grad():
        for l in (m[0], m[2]): l.weight.mul_((torch.rand_like(l.weight) > 0.9).float())
    for x in (torch.randn(4, 16), torch.randn(1, 16)):
        fast = to_sparse_inference(m, x, kernels='csr', n_runs=2)
        with torch.no_grad(): y = fast(x)
        fct.test_eq(y.stride(), torch.empty(y.shape).stride())
        fct.test_close(y, m(x), eps=1e-6)


def test_lottery_experiment_refuses_a_file_as_its_tickets_folder(tmp_path):
    "F10 #4: `fasterprune lth --tickets FILE` ended in a raw FileExistsError traceback after the set-up"
    from fasterprune.lottery import lottery_experiment
    f = tmp_path / 'afile'
    f.write_text('')
    def make(): raise AssertionError('nothing should be built')
    fct.test_fail(lambda: lottery_experiment(make, rounds=1, epochs=1, tickets_dir=f), contains='is a file, not a folder')


def test_a_second_lottery_ticket_on_one_learner_is_refused():
    "F10 #6: two RewindCallbacks were accepted (a load_learner'd Learner got a second one, rewinding to trained weights)"
    from fasterprune.lottery import LotteryTicket, RewindCallback
    learn = _learner()
    lt = LotteryTicket(learn, 0.5)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    lt.next_round()
    fct.test_fail(lambda: LotteryTicket(learn, 0.5), contains='already has a RewindCallback')
    fct.test_eq(sum(isinstance(c, RewindCallback) for c in learn.cbs), 1)
    lt.rewinder.attach(learn)  # the same Rewinder again: fine, it replaces its own callback
    fct.test_eq(sum(isinstance(c, RewindCallback) for c in learn.cbs), 1)


def test_a_pruned_model_refuses_a_checkpoint_of_other_shapes_before_copying_anything(tmp_path):
    "F10 #5: loading the pre-surgery checkpoint into the compacted model overwrote the tensors that fit, then raised"
    import copy, io
    from fasterprune.pruner import Pruner
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).eval()
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    Pruner(net, torch.randn(4, 20)).prune(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fct.test_fail(lambda: net.load_state_dict(dense), contains='nothing was loaded')
    fct.test_eq(all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), True)
    net.load_state_dict(before)  # its own shapes load
    fct.test_fail(lambda: copy.deepcopy(net).load_state_dict(dense), contains='nothing was loaded')
    # R19: pickled, the guard is a no-op of the standard library: a plain pruned model loads without fasterprune
    assert b'fasterprune' not in _saved(net)
    m = torch.load(io.BytesIO(_saved(net)), weights_only=False)
    m.load_state_dict(before)
    # R19: a model load_pruned rebuilt is guarded too
    from fasterprune.pruner import save_pruned, load_pruned
    save_pruned(net, tmp_path / 'p.pth')
    fresh = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    load_pruned(fresh, tmp_path / 'p.pth')
    fresh_before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fct.test_fail(lambda: fresh.load_state_dict(dense), contains='nothing was loaded')
    fct.test_eq(all(torch.equal(v, fresh_before[k]) for k, v in fresh.state_dict().items()), True)


def _saved(m) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(m, buf)
    return buf.getvalue()


@pytest.mark.parametrize('sched', ['one_shot', 'agp'])
def test_a_fit_resumed_past_the_schedule_with_zeros_from_elsewhere_prunes_to_its_level(sched):
    "R19: one stray zero at a resume after the schedule's end was taken for the schedule's masks: nothing was pruned"
    from fasterprune.schedules import agp
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad(): net[0].weight[0, 0] = 0.  # a zero that is not from this schedule
    learn = _learner()
    learn.model = net
    cb = SparsifyCallback(0.5, 'weight', 'global', schedule=one_shot(0.5) if sched == 'one_shot' else agp(0., 0.5),
                          show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(4, 1e-2, cbs=cb, start_epoch=3)
    n = sum(m.weight.numel() for m in cb.sparsifier.layers.values())
    fct.test_eq(sum(int(m.weight.detach().eq(0).sum()) for m in cb.sparsifier.layers.values()), n // 2)


def test_masks_hold_in_validation_when_a_callback_cuts_an_epochs_last_step_short():
    "R19: a CancelBatchException from an earlier after_step at an epoch's last batch left masked weights nonzero there"
    seen = []
    cb = SparsifyCallback(0.5, 'weight', 'local', schedule=one_shot(), show_sparsity=False)
    class Check(Callback):
        order = 100
        def _n(self):
            sp = cb.sparsifier
            return sum(int(m.weight.detach()[~sp.masks[n]].ne(0).sum()) for n, m in sp.layers.items())
        def before_validate(self): seen.append(self._n())
        def after_epoch(self): seen.append(self._n())
    class EveryFourth(Stop):
        def after_step(self):
            self.n += 1
            if self.n % 4 == 0: raise CancelBatchException()  # the last batch of every epoch
    learn = _learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-1, cbs=[cb, EveryFourth(None, None), Check()])
    fct.test_eq(seen, [0, 0, 0, 0])


def test_recurrent_r18_exclude_by_wrapper_module_hx_keyword_and_computed_gates(caplog):
    "R18: exclude=<WeightDropout> missed the inner LSTM's weight_ih; rnn(hx=h, input=x) counted h; a computed gate"
    from fastai.text.models.awdlstm import WeightDropout
    from fasterprune.sparsifier import prunable_layers
    from fasterprune.metrics import layer_flops
    wd = WeightDropout(nn.LSTM(8, 8, batch_first=True), 0.1)
    net = nn.Sequential(wd)
    fct.test_eq(list(prunable_layers(net, exclude=[wd])), [])
    fct.test_eq(sorted(prunable_layers(net, layers=[wd])), ['0.module.weight_ih_l0', '0.weight_hh_l0_raw'])
    class Kw(nn.Module):
        def __init__(self): super().__init__(); self.rnn = nn.GRU(6, 12, batch_first=True)
        def forward(self, x, h): return self.rnn(hx=h, input=x)[0]
    x, h = torch.randn(2, 5, 6), torch.zeros(1, 2, 12)
    fl = layer_flops(Kw(), (x, h))
    fct.test_eq((fl['rnn.weight_ih_l0'][0], fl['rnn.weight_hh_l0'][0]), (10 * 36 * 6, 10 * 36 * 12))
    lstm = nn.LSTM(8, 8)
    torch.nn.utils.parametrizations.weight_norm(lstm, 'weight_hh_l0')
    with caplog.at_level('WARNING', logger='fasterprune'): layer_flops(lstm, torch.randn(10, 1, 8))
    assert 'weight_hh_l0, computed at each forward' in caplog.text, caplog.text


def _resume_pair(mk_cb, net, shape, n_epoch=6, at=3, lr=5e-2, update_every=None):
    "An uninterrupted fit and one resumed at epoch `at` from its own state: (their updates after `at`, same weights?)"
    import copy
    def make():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(80, *shape, generator=g), torch.randint(0, 4, (80,), generator=g)
        dl = lambda: DataLoader(TensorDataset(x, y), batch_size=16)  # 5 batches an epoch
        return Learner(DataLoaders(dl(), dl()), net(), loss_func=nn.CrossEntropyLoss(),
                       opt_func=lambda p, lr: SGD(p, lr, mom=0.9))
    class SaveAt(Callback):
        order = 100
        def after_epoch(self):
            if self.epoch == at - 1: self.state = copy.deepcopy((self.learn.model.state_dict(),
                                                                 self.learn.opt.state_dict()))
    a, b, sv, cba, cbb = make(), make(), SaveAt(), mk_cb(), mk_cb()
    with a.no_bar(), a.no_logging(): a.fit(n_epoch, lr, cbs=[cba, sv])
    b.model.load_state_dict(sv.state[0])
    b.create_opt()
    b.opt.load_state_dict(sv.state[1])
    with b.no_bar(), b.no_logging(): b.fit(n_epoch, lr, cbs=[cbb], start_epoch=at)
    ha = [(round(h['pos'], 6), h['target']) for h in cba.history if h['pos'] > at / n_epoch]
    hb = [(round(h['pos'], 6), h['target']) for h in cbb.history]
    return ha, hb, all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_r20_resumed_fits_follow_the_uninterrupted_one():
    "R20: a faithful resume judged 'below level' re-ranked (units of other sizes, gradients, an emptied layer, the end)"
    from fasterprune.schedules import agp
    mlp = lambda: nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 4))
    def emptied():
        m = mlp()
        with torch.no_grad(): m[4].weight.mul_(1e-3)  # the global ranking empties it
        return m
    cases = [(lambda: SparsifyCallback(0.7, 'filter', 'global', coupled=False, schedule='agp', show_sparsity=False), mlp),
             (lambda: SparsifyCallback(0.37, 'filter', 'global', criteria='gradient_magnitude', coupled=False,
                                       schedule=one_shot(0.1), show_sparsity=False), mlp),
             (lambda: SparsifyCallback(0.5, 'weight', 'global', schedule='agp', show_sparsity=False), emptied),
             (lambda: SparsifyCallback(0.8, 'weight', 'global', schedule=agp(0, 0.75), update_every=8,
                                       show_sparsity=False), mlp)]
    for mk, net in cases:
        ha, hb, same = _resume_pair(mk, net, (16,), lr=0.1)
        fct.test_eq((hb, same), (ha, True))
