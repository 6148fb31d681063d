"Recurrent layers (LSTM, GRU, RNN, their cells, fastai's AWD_LSTM) are pruned like Linear layers, by default"
import logging
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fit_checks import CheckZeros
from fasterprune.callback import SparsifyCallback
from fasterprune.data import TensorPairs
from fasterprune.lottery import LotteryTicket, save_ticket, load_ticket
from fasterprune.metrics import layer_flops, count_flops, theoretical_speedup, sparsity_report
from fasterprune.schedules import agp, one_shot
from fasterprune.sparsifier import Sparsifier, prunable_layers, RecurrentWeight

LSTM_WEIGHTS = [f'rnn.weight_{k}_l{i}{r}' for i in (0, 1) for r in ('', '_reverse') for k in ('ih', 'hh')]


class TextRNN(nn.Module):
    "Embedding -> a 2-layer bidirectional LSTM (or GRU) -> Linear -> Linear"
    def __init__(self, cell=nn.LSTM, vocab=50, emb=16, hid=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = cell(emb, hid, num_layers=2, bidirectional=True, batch_first=True)
        self.fc1, self.fc = nn.Linear(2 * hid, 32), nn.Linear(32, 10)
    def forward(self, x): return self.fc(torch.relu(self.fc1(self.rnn(self.emb(x))[0][:, -1])))


def _learner(model, n=192, bs=32, seq=8, vocab=50, loss=None):
    torch.manual_seed(0)
    x, y = torch.randint(2, vocab, (n, seq)), torch.randint(0, 10, (n,))
    dls = DataLoaders(DataLoader(TensorPairs(x, y), bs=bs, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(x[:64], y[:64]), bs=64), device=torch.device('cpu'))
    return Learner(dls, model, loss_func=loss or nn.CrossEntropyLoss())


def _zeros(t): return int((t == 0).sum())


@pytest.mark.parametrize('cell', [nn.LSTM, nn.GRU])
def test_weight_granularity_counts_are_exact_local_and_global(cell):
    "Every gate weight is a prunable layer; local: each at round(s·n); global: round(s·n) over all, one ranking"
    torch.manual_seed(0)
    m = TextRNN(cell)
    fct.test_eq(list(prunable_layers(m)), LSTM_WEIGHTS + ['fc1', 'fc'])
    sp = Sparsifier(m, 'weight', 'local').sparsify(0.7)
    for n, l in sp.layers.items(): fct.test_eq(_zeros(l.weight), round(0.7 * l.weight.numel()))
    fct.test_eq(_zeros(m.rnn.weight_hh_l1_reverse), round(0.7 * m.rnn.weight_hh_l1_reverse.numel()))
    torch.manual_seed(0)
    m = TextRNN(cell)
    sp = Sparsifier(m, 'weight', 'global').sparsify(0.8)
    ws = [m.rnn.get_parameter(n.split('.', 1)[1]) for n in LSTM_WEIGHTS] + [m.fc1.weight, m.fc.weight]
    fct.test_eq(sum(_zeros(w) for w in ws), round(0.8 * sum(w.numel() for w in ws)))
    assert all(_zeros(w) > 0 for w in ws[:8])  # the ranking reached every gate weight


def test_cells_and_proj_size_are_pruned():
    "LSTMCell/GRUCell/RNNCell weights, and an LSTM's projection weight_hr_l0 (proj_size)"
    m = nn.ModuleDict(dict(a=nn.LSTMCell(4, 6), b=nn.GRUCell(6, 5), c=nn.RNNCell(5, 3, bias=False),
                           d=nn.LSTM(4, 8, proj_size=3)))
    fct.test_eq(list(prunable_layers(m)), ['a.weight_ih', 'a.weight_hh', 'b.weight_ih', 'b.weight_hh', 'c.weight_ih',
                                           'c.weight_hh', 'd.weight_ih_l0', 'd.weight_hh_l0', 'd.weight_hr_l0'])
    Sparsifier(m, 'weight', 'local').sparsify(0.5)
    fct.test_eq(_zeros(m.d.weight_hr_l0), 12)
    fct.test_eq(_zeros(m.b.weight_hh), round(0.5 * 15 * 5))


@pytest.mark.parametrize('schedule,criteria,context', [(one_shot(), 'magnitude', 'global'),
                                                       (agp(0, 0.8), 'gradient_magnitude', 'local'),
                                                       (agp(0, 0.8), 'movement', 'global')])
def test_masked_gate_weights_stay_zero_after_every_step_of_a_fit(schedule, criteria, context):
    "SparsifyCallback in a Learner fit: the LSTM's masked weights are zero after every optimizer step, at the target"
    learn = _learner(TextRNN())
    cb = SparsifyCallback(0.75, 'weight', context, criteria, schedule=schedule)
    check = CheckZeros(cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=[cb, check])
    fct.test_eq(list(cb.sparsifier.layers), LSTM_WEIGHTS + ['fc1', 'fc'])
    assert check.checked == 2 * 6
    n = sum(m.weight.numel() for m in cb.sparsifier.layers.values())
    rnn = [m.weight for k, m in cb.sparsifier.layers.items() if k.startswith('rnn')]
    if context == 'local':
        for w in rnn: fct.test_eq(_zeros(w), round(0.75 * w.numel()))
    else: fct.test_eq(sum(_zeros(m.weight) for m in cb.sparsifier.layers.values()), round(0.75 * n))
    assert sum(_zeros(w) for w in rnn) > 0.5 * sum(w.numel() for w in rnn)


def test_report_rows_and_flops_by_hand():
    "The report names each gate weight (type LSTM); FLOPs are rows·numel, nonzero rows·nonzero; speedup their ratio"
    torch.manual_seed(0)
    m = TextRNN().eval()
    Sparsifier(m, 'weight', 'local').sparsify(0.75)
    x = torch.randint(2, 50, (3, 7))
    df = sparsity_report(m, x)
    fct.test_eq(list(df.layer[:8]), LSTM_WEIGHTS)
    fct.test_eq(set(df.type[:8]), {'LSTM'})
    rows = 3 * 7  # batch x time steps: each gate weight runs once per row and direction
    ws = {n: m.rnn.get_parameter(n.split('.', 1)[1]) for n in LSTM_WEIGHTS}
    fl = layer_flops(m, x)
    for n, w in ws.items(): fct.test_eq(fl[n], (rows * w.numel(), rows * int((w != 0).sum())))
    dense = rows * sum(w.numel() for w in ws.values()) + 3 * (48 * 32 + 32 * 10)
    nz = rows * sum(int((w != 0).sum()) for w in ws.values()) + 3 * (int((m.fc1.weight != 0).sum()) +
                                                                     int((m.fc.weight != 0).sum()))
    fct.test_eq(count_flops(m, x), (dense, nz))
    fct.test_close(theoretical_speedup(m, x), dense / nz)
    fct.test_close(df.attrs['theoretical_speedup'], 4., eps=0.05)


def _awd(vocab=60):
    from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_config
    from fastai.text.models.core import get_text_classifier
    cfg = dict(awd_lstm_clas_config, emb_sz=16, n_hid=24, n_layers=2)
    torch.manual_seed(0)
    return get_text_classifier(AWD_LSTM, vocab, 10, seq_len=8, config=cfg, max_len=64)


def test_awd_lstm_prunes_the_raw_weights_and_its_forward_uses_them():
    "fastai's AWD_LSTM: WeightDropout's weight_hh_l0_raw is pruned (never its per-forward copy); the LSTM runs on it"
    learn = _learner(_awd(), vocab=60, loss=lambda out, y: F.cross_entropy(out[0], y))
    cb = SparsifyCallback(0.8, 'weight', 'global', schedule=agp(0, 0.6))
    check = CheckZeros(cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=[cb, check])
    assert check.checked == 2 * 6
    enc = learn.model[0].module
    fct.test_eq([n for n in cb.sparsifier.layers if 'rnns' in n],
                ['0.module.rnns.0.weight_hh_l0_raw', '0.module.rnns.0.module.weight_ih_l0',
                 '0.module.rnns.1.weight_hh_l0_raw', '0.module.rnns.1.module.weight_ih_l0'])
    n = sum(m.weight.numel() for m in cb.sparsifier.layers.values())
    fct.test_eq(sum(_zeros(m.weight) for m in cb.sparsifier.layers.values()), round(0.8 * n))
    for wd in enc.rnns:
        mk = cb.sparsifier.masks[f'0.module.rnns.{list(enc.rnns).index(wd)}.weight_hh_l0_raw']
        assert not mk.all()
        fct.test_eq(_zeros(wd.weight_hh_l0_raw[~mk]), int((~mk).sum()))
        learn.model.eval()
        learn.model(torch.randint(2, 60, (2, 8)))  # the forward writes the raw weight into the LSTM
        fct.test_eq(torch.equal(wd.module.weight_hh_l0, wd.weight_hh_l0_raw), True)
    learn.model.train()
    with torch.no_grad(): out = learn.model(torch.randint(2, 60, (2, 8)))[0]  # weight dropout on: still masked
    assert torch.isfinite(out).all()
    fct.test_eq(_zeros(enc.rnns[0].module.weight_hh_l0[~cb.sparsifier.masks['0.module.rnns.0.weight_hh_l0_raw']]),
                int((~cb.sparsifier.masks['0.module.rnns.0.weight_hh_l0_raw']).sum()))
    from fasterprune.rewind import check_ticket, imp_masks
    masks = imp_masks(learn.model, {n: m for n, m in cb.sparsifier.masks.items()}, 0.5)  # raw weights found by name
    old = cb.sparsifier.masks['0.module.rnns.1.weight_hh_l0_raw']
    fct.test_eq(int((~masks['0.module.rnns.1.weight_hh_l0_raw']).sum()), int((~old).sum()) + int(old.sum()) // 2)
    check_ticket(dict(masks=masks, rewind=learn.model.state_dict()), _awd())
    # and exclude= by type reaches the raw weight through the LSTM it belongs to
    fct.test_eq([n for n in prunable_layers(learn.model, exclude=nn.LSTM)], ['1.layers.0.2', '1.layers.1.2'])


def test_lottery_round_keeps_gate_weights_pruned_and_rewinds_the_rest(tmp_path):
    "LotteryTicket: prune by magnitude, rewind, fit, next round: the LSTM's zeros stay, its survivors rewound"
    learn = _learner(TextRNN())
    lt = LotteryTicket(learn, rate=0.5)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    point = {k: v.clone() for k, v in lt.rewind_point.items()}
    lt.next_round()
    rnn = learn.model.rnn
    for n in LSTM_WEIGHTS:
        w, mk = rnn.get_parameter(n.split('.', 1)[1]), lt.masks[n]
        fct.test_eq(int((~mk).sum()), round(0.5 * w.numel()))
        fct.test_eq(_zeros(w[~mk]), int((~mk).sum()))
        fct.test_eq(torch.equal(w[mk], point[n][mk]), True)  # the survivors are back at the rewind point
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    lt.next_round()
    for n in LSTM_WEIGHTS:
        w, mk = rnn.get_parameter(n.split('.', 1)[1]), lt.masks[n]
        fct.test_eq(int((~mk).sum()), w.numel() - round(0.5 * round(0.5 * w.numel())))
        fct.test_eq(_zeros(w[~mk]), int((~mk).sum()))
    fct.test_close(lt.remaining(), 0.25, eps=0.01)
    save_ticket(lt.ticket(), tmp_path / 'rnn.pt')  # a saved ticket names the gate weights; it loads into a fresh model
    fresh = TextRNN()
    load_ticket(tmp_path / 'rnn.pt', fresh)
    for n in LSTM_WEIGHTS:
        fct.test_eq(_zeros(fresh.rnn.get_parameter(n.split('.', 1)[1])[~lt.masks[n]]), int((~lt.masks[n]).sum()))


def test_filter_granularity_leaves_them_dense_and_says_so(caplog):
    "A gate row is no removable unit: the LSTM stays dense under filters, with one log line; the Linears prune"
    torch.manual_seed(0)
    m = TextRNN()
    with caplog.at_level('WARNING', logger='fasterprune'):
        sp = Sparsifier(m, 'filter', 'local').sparsify(0.5)
    fct.test_eq(list(sp.layers), ['fc1', 'fc'])
    assert 'filter granularity leaves the recurrent weights rnn.weight_ih_l0' in caplog.text, caplog.text
    fct.test_eq(sum(_zeros(p) for p in m.rnn.parameters()), 0)
    fct.test_eq(_zeros(m.fc1.weight), 16 * 48)
    fct.test_fail(lambda: Sparsifier(nn.LSTM(4, 4), 'filter'), contains='leaves the recurrent weights')


def test_layers_and_exclude_name_them():
    "By name, by pattern, by the layer's name, by type; per-layer targets name them too"
    m = TextRNN()
    fct.test_eq(list(prunable_layers(m, layers='rnn.weight_hh_l0')), ['rnn.weight_hh_l0'])
    fct.test_eq(list(prunable_layers(m, layers='rnn.*')), LSTM_WEIGHTS)
    fct.test_eq(list(prunable_layers(m, layers='rnn')), LSTM_WEIGHTS)
    fct.test_eq(list(prunable_layers(m, layers=nn.LSTM)), LSTM_WEIGHTS)
    fct.test_eq(list(prunable_layers(m, exclude='rnn')), ['fc1', 'fc'])
    fct.test_eq(list(prunable_layers(m, exclude=[nn.LSTM, 'fc1'])), ['fc'])
    fct.test_eq(list(prunable_layers(m, exclude='rnn.weight_hh*')),
                [n for n in LSTM_WEIGHTS if 'hh' not in n] + ['fc1', 'fc'])
    assert isinstance(prunable_layers(m)['rnn.weight_ih_l1'], RecurrentWeight)
    sp = Sparsifier(m, layers='rnn.weight_hh_l0').sparsify({'rnn.weight_hh_l0': 0.5})
    fct.test_eq(_zeros(m.rnn.weight_hh_l0), 96 * 24 // 2)
    fct.test_eq(_zeros(m.rnn.weight_ih_l0), 0)
    fct.test_fail(lambda: prunable_layers(m, layers='rnn.weight_xx'), contains='prunable layers are: rnn.weight_ih_l0')


def test_sensitivity_scans_each_gate_weight_and_restores_it():
    "sensitivity prunes one gate weight at a time (its own row) and puts the model back exactly"
    from fasterprune.sensitivity import sensitivity
    torch.manual_seed(0)
    m, x = TextRNN(), torch.randint(2, 50, (8, 6))
    y0, sd = m(x).detach(), {k: v.clone() for k, v in m.state_dict().items()}
    scan = sensitivity(m, (0.5, 0.9), metric=lambda mm: float((mm(x) - y0).abs().mean()), layers='rnn',
                       higher_is_better=False, show_progress=False)
    fct.test_eq(list(dict.fromkeys(scan.layer)), LSTM_WEIGHTS)
    assert (scan[scan.layer == 'rnn.weight_ih_l0'].metric > 0).all()  # pruning it alone changes the output
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])


def test_compact_after_a_weight_level_fit_leaves_the_lstm_as_it_is():
    "Pruner surgery does not cut recurrent layers: after a weight-level fit the LSTM keeps its shape and values"
    from fasterprune.pruner import Pruner
    learn = _learner(TextRNN())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, schedule=one_shot()))
    before = {k: v.clone() for k, v in learn.model.rnn.state_dict().items()}
    assert sum(_zeros(v) for v in before.values()) > 0
    Pruner(learn, strict=False).compact()  # the graph does not know the LSTM: strict=False pins its channels
    for k, v in learn.model.rnn.state_dict().items(): fct.test_eq(v, before[k])


def test_nm_vector_and_kernel_granularities_act_as_for_a_linear():
    "N:M keeps N of every M weights along a gate row (the input dim); 'vector'/'kernel' prune single weights"
    torch.manual_seed(0)
    m = TextRNN()
    sp = Sparsifier(m, '2:4').sparsify(0.5)
    w = m.rnn.weight_ih_l1  # (96, 48): groups of 4 along each row
    fct.test_eq(set((w.reshape(96, 12, 4) != 0).sum(-1).flatten().tolist()), {2})
    fct.test_eq(sp.layer_sparsity()['rnn.weight_hh_l0_reverse'], 0.5)
    for g in ('vector', 'kernel'):
        torch.manual_seed(0)
        m = TextRNN()
        sp = Sparsifier(m, g, 'local').sparsify(0.3)
        fct.test_eq(_zeros(m.rnn.weight_hh_l1), round(0.3 * m.rnn.weight_hh_l1.numel()))
        fct.test_eq(sp._group_size('rnn.weight_hh_l1'), 1)


def test_computed_gate_weights_are_left_dense_and_said(caplog):
    "A gate weight computed at each forward (weight_norm, a parametrization) is no parameter: left dense, with a warning"
    lstm = nn.LSTM(4, 6)
    torch.nn.utils.parametrize.register_parametrization(lstm, 'weight_hh_l0', nn.Identity())
    fct.test_eq(list(prunable_layers(lstm)), ['weight_ih_l0'])
    with caplog.at_level('WARNING', logger='fasterprune'): Sparsifier(nn.Sequential(lstm)).sparsify(0.5)
    assert 'the recurrent weights 0.weight_hh_l0 are computed from other tensors' in caplog.text, caplog.text
    fct.test_eq(_zeros(lstm.weight_hh_l0), 0)
    fct.test_eq(_zeros(lstm.weight_ih_l0), 48)
