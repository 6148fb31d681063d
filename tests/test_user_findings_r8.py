"""Review R8 (distributed, CLI, rewind, lottery): each test is the user's path to a finding, and fails on the code
the review read (b41370e). Kept fast: tiny models, one-epoch fits."""
import io, os, re, socket, contextlib
from functools import partial
from pathlib import Path
import pytest, torch
import torch.nn as nn
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
from fasterprune.data import TensorPairs, digits_arrays, mlp
from fasterprune.distributed import StopOnNaNCallback, CheckpointError, load_checkpoint
from fasterprune.lottery import LotteryTicket, lottery_experiment, save_ticket, MaskCallback, model_state
from fasterprune.rewind import Rewinder
from fasterprune.cli import main, demo


def _tiny_dls(n_in=8, n=64, bs=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, n_in, generator=g), torch.randint(0, 2, (n,), generator=g)
    return DataLoaders(DataLoader(TensorPairs(x, y), bs=bs), DataLoader(TensorPairs(x, y), bs=bs),
                       device=torch.device('cpu'))


def _digits_dls(n=256, bs=64):
    xt, yt, xv, yv = digits_arrays(True)
    return DataLoaders(DataLoader(TensorPairs(xt[:n], yt[:n]), bs=bs, shuffle=True, drop_last=True),
                       DataLoader(TensorPairs(xv, yv), bs=360), device=torch.device('cpu'))


def _fit(learn, *args, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kw)


# ---------------------------------------------------------------- 4: fp16 gradients

class _Half(Callback):
    "A pure fp16 model: inputs in fp16, the prediction back to fp32 for the loss"
    order = 1
    def before_batch(self): self.learn.xb = tuple(t.half() for t in self.xb)
    def after_pred(self): self.learn.pred = self.pred.float()


class _ScaledGrads(Callback):
    "What a loss scale of 2**16 makes of fp16 gradients of ~0.02: every element finite, their fp16 norm past 65504"
    order = 80
    def __init__(self, value): self.value = value
    def before_step(self):
        for p in self.learn.model.parameters(): p.grad = torch.full_like(p, self.value)


def test_stop_on_nan_lets_finite_fp16_gradients_through():
    learn = Learner(_tiny_dls(100), nn.Sequential(nn.Linear(100, 100)), loss_func=nn.CrossEntropyLoss())
    learn.model.half()
    # finite: the fit runs to its end (it stopped at iteration 0 with "gradients are not finite")
    _fit(learn, 1, 1e-9, cbs=[_Half(), _ScaledGrads(1000.), StopOnNaNCallback()])
    fct.test_eq(learn.train_iter, len(learn.dls.train))
    # not finite: still stopped, at the first step
    with pytest.raises(FloatingPointError, match='gradients are not finite at iteration 0'):
        _fit(learn, 1, 1e-9, cbs=[_Half(), _ScaledGrads(float('inf')), StopOnNaNCallback()])


# ---------------------------------------------------------------- 6, 7: fasterprune lth

def _main(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize('lr', ['0', '-1', 'nan', 'inf'])
def test_lth_lr_refused_like_demo(lr):
    rc, out, err = _main('lth', '--lr', lr, '--rounds', '1', '--epochs', '1', '--controls=')
    fct.test_eq(rc, 2)
    assert err.startswith('fasterprune lth: error: lr must be a finite number > 0'), err
    assert 'round' not in out  # nothing trained
    make = lambda: Learner(_tiny_dls(), mlp(8, 4, 2), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with pytest.raises(ValueError, match='lr must be a finite number > 0'): lottery_experiment(make, lr=float(lr))


def test_lth_unreadable_state_file_is_named(tmp_path):
    (tmp_path/'lth.state.pt').write_bytes(b'PK\x03\x04garbage')  # a state file cut short next to --json
    rc, out, err = _main('lth', '--rounds', '1', '--epochs', '1', '--json', str(tmp_path/'lth.json'))
    fct.test_eq(rc, 2)
    assert err.startswith('fasterprune lth: error: '), err
    assert "lth.state.pt is the lottery runner's state file" in err and 'it is truncated' in err, err
    assert 'delete it' in err and '--json' in err and 'Traceback' not in err, err
    fct.test_eq((tmp_path/'lth.state.pt').read_bytes(), b'PK\x03\x04garbage')  # left as it was
    # a readable file that is not a runner state (a ticket saved there)
    torch.save({'masks': {}}, tmp_path/'lth.state.pt')
    rc, out, err = _main('lth', '--rounds', '1', '--epochs', '1', '--json', str(tmp_path/'lth.json'))
    assert rc == 2 and 'holds no runner state' in err, err


# ---------------------------------------------------------------- 8: checkpoint names and paths

def test_load_checkpoint_takes_pt_files_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = nn.Sequential(nn.Linear(4, 2))
    (tmp_path/'runs').mkdir()
    torch.save(src.state_dict(), 'ckpt.pt')
    torch.save(src.state_dict(), tmp_path/'runs'/'ckpt')  # a file without suffix in a folder
    for f in ('ckpt.pt', './ckpt.pt', 'runs/ckpt', './runs/ckpt'):
        learn = Learner(_tiny_dls(4), nn.Sequential(nn.Linear(4, 2)), loss_func=nn.CrossEntropyLoss())
        load_checkpoint(learn, f, with_opt=False)
        assert torch.equal(learn.model[0].weight, src[0].weight), f
    # a bare name is looked up as learn.load does, and the error says so and what to pass
    learn = Learner(_tiny_dls(4), nn.Sequential(nn.Linear(4, 2)), loss_func=nn.CrossEntropyLoss())
    with pytest.raises(FileNotFoundError, match=r"models/ckpt\.pth: 'ckpt' was read as a name in learn\.path"):
        load_checkpoint(learn, 'ckpt', with_opt=False)
    with pytest.raises(FileNotFoundError, match=r"'other\.pt' was read as a path \(a \.pt suffix\)"):
        load_checkpoint(learn, 'other.pt', with_opt=False)


# ---------------------------------------------------------------- 9: ranks agree on the checkpoint

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_latest_checkpoint_is_rank0s_choice_on_every_rank(tmp_path):
    pytest.importorskip('accelerate')
    import torch.multiprocessing as mp
    import ddp_worker as w
    # forked (nothing to import again: a second, not ten); the workers use one thread and gloo
    mp.start_processes(w.latest_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method='fork')
    r0, r1 = torch.load(tmp_path/'latest0.pt'), torch.load(tmp_path/'latest1.pt')
    # rank 1 lacks rank 0's newest file: every rank raises, naming it (it resumed from epoch 0, rank 0 from 2)
    for r in (r0, r1):
        assert r['r1_lacks'].startswith('FileNotFoundError: latest_checkpoint: rank 0 resumes after epoch 2'), r
        assert 'rank 1 (' in r['r1_lacks'] and 'node1/models/model_2.pth' in r['r1_lacks'], r
    # rank 1 has a newer one: every rank takes rank 0's epoch (it took its own 2)
    fct.test_eq((r0['r1_has_more'], r1['r1_has_more']), (1, 1))
    fct.test_eq((r0['resume'], r1['resume']), ((2, 1.0), (2, 1.0)))
    fct.test_eq((r0['r0_none'], r1['r0_none']), (None, None))  # rank 0 starts afresh: every rank does


# ---------------------------------------------------------------- 11: a NaN before the rewind point

class _PoisonAt(Callback):
    order = 5
    def __init__(self, at): self.at = at
    def after_loss(self):
        if self.train_iter == self.at:
            self.learn.loss_grad = self.learn.loss_grad * float('nan')
            self.learn.loss = self.learn.loss * float('nan')


def test_nan_before_the_rewind_point_is_the_error():
    torch.manual_seed(0)
    learn = Learner(_digits_dls(), mlp(64, 16, 10), loss_func=nn.CrossEntropyLoss())
    lt = LotteryTicket(learn, rewind_iter=3)
    with pytest.raises(FloatingPointError) as e:  # it was the rewind RuntimeError, with no word of the NaN
        _fit(learn, 1, 1e-2, cbs=[_PoisonAt(2), StopOnNaNCallback()])
    msg = str(e.value)
    assert msg.splitlines()[-1].strip().startswith('loss is nan and the gradients are not finite at iteration 2'), msg
    assert 'before the rewind iteration 3; no rewind point was kept' in msg, msg
    assert lt.rewind_point is None
    # a fit stopped short for another reason still raises the rewind error
    class Stop(Callback):
        def after_step(self):
            if self.train_iter == 1: raise __import__('fastai.learner').learner.CancelFitException
    learn = Learner(_digits_dls(), mlp(64, 16, 10), loss_func=nn.CrossEntropyLoss())
    LotteryTicket(learn, rewind_iter=3)
    with pytest.raises(RuntimeError, match='before the rewind iteration 3'): _fit(learn, 1, 1e-2, cbs=[Stop()])


# ---------------------------------------------------------------- 12: what the review's mutants changed

class _Record:
    "A `fit=` for lottery_experiment that records each arm's model at the start of its fit, and its masks"
    def __init__(self): self.runs = []
    def __call__(self, learn, epochs, lr, cbs):
        masks = next((dict(c.masks) for c in cbs if isinstance(c, MaskCallback)), None)
        self.runs.append(dict(init=model_state(learn.model), masks=masks))
        learn.fit(epochs, lr, cbs=cbs)


def test_lottery_controls_are_what_they_say():
    "reinit: the ticket's masks on a new init each round; random: the ticket's init, random masks nested over rounds"
    rec = _Record()
    make = lambda: Learner(_digits_dls(), mlp(64, 16, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                           opt_func=partial(SGD, mom=0.9))
    lottery_experiment(make, rounds=2, rate=0.5, epochs=1, lr=0.05, fit=rec, progress=False)
    fct.test_eq(len(rec.runs), 7)  # round 0, then ticket, reinit, random for rounds 1 and 2
    r0, (t1, ri1, rn1), (t2, ri2, rn2) = rec.runs[0], rec.runs[1:4], rec.runs[4:7]
    init = r0['init']  # the rewind point (rewind_iter=0)
    w = '0.weight'
    for t, ri, rn in ((t1, ri1, rn1), (t2, ri2, rn2)):
        # the ticket starts from the rewind point, masked
        assert torch.equal(t['init'][w], init[w] * t['masks']['0'])
        # reinit: the ticket's masks, on weights that are not the rewind point's
        fct.test_eq(set(ri['masks']), set(t['masks']))
        assert all(torch.equal(ri['masks'][n], t['masks'][n]) for n in t['masks'])
        keep = t['masks']['0']
        assert not torch.equal(ri['init'][w][keep], init[w][keep]), 'the reinit arm starts from the ticket'
        # random: the rewind point's weights, masks of the same counts that are not the ticket's
        assert torch.equal(rn['init'][w], init[w] * rn['masks']['0'])
        assert all(int(rn['masks'][n].sum()) == int(t['masks'][n].sum()) for n in t['masks'])
        assert not torch.equal(rn['masks']['0'], keep)
    assert not torch.equal(ri1['init'][w], ri2['init'][w]), 'the reinit arm has the same init in every round'
    for n in rn1['masks']:  # random masks nested: what round 2 keeps, round 1 kept
        assert not (rn2['masks'][n] & ~rn1['masks'][n]).any(), n


def _demo_rows(*argv):
    rc, out, err = _main('demo', '--epochs', '1', *argv)
    assert rc == 0, err
    rows = [l.split() for l in out.splitlines() if l.startswith(('lenet_300_100', 'small_cnn'))]
    fct.test_eq(len(rows), 4)
    return rows


def test_demo_sparsity_and_seed_are_used(monkeypatch):
    import fasterprune.cli as cli
    # the train/valid split held fixed: what --seed must still change is the weights and the batch order
    split0 = cli.digits_dls
    monkeypatch.setattr(cli, 'digits_dls', lambda flat=True, seed=0: split0(flat=flat, seed=0))
    a = _demo_rows('--sparsity', '0.5', '--seed', '1')
    # the pruned runs: 'agp 50% global', measured weight sparsity 0.5 (it was 0.9 whatever --sparsity said)
    for r in a[1::2]:
        fct.test_eq(r[1:4], ['agp', '50%', 'global'])
        fct.test_close(float(r[5]), 0.5, eps=1e-3)
    b = _demo_rows('--sparsity', '0.5', '--seed', '2')
    fct.test_ne([r[4] for r in a], [r[4] for r in b])  # another seed, other weights: other accuracies


def test_load_ticket_restores_round_and_rewind_iter(tmp_path):
    set_seed(0)
    learn = Learner(_digits_dls(), mlp(64, 16, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    lt = LotteryTicket(learn, rate=0.5, rewind_iter=2)
    _fit(learn, 1, 1e-2)
    lt.next_round()
    _fit(learn, 1, 1e-2)
    lt.next_round()
    save_ticket(lt.ticket(), tmp_path/'t.pt')
    rw = Rewinder(mlp(64, 16, 10))
    rw.load_ticket(torch.load(tmp_path/'t.pt'))
    fct.test_eq((rw.round, rw.rewind_iter), (2, 2))  # were (0, 0): a resumed IMP counted rounds from 0 again
    assert 'round 2' in repr(rw) and 'iteration 2' in repr(rw)
    rw.next_round(0.5)
    fct.test_eq(rw.ticket()['round'], 3)


def test_imp_keeps_at_least_one_weight_per_layer():
    "A layer with few weights at a high rate keeps one weight: it is not pruned away, and it raises no error"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))  # the head has 8 weights
    rw = Rewinder(model).keep_rewind_point()
    for _ in range(3): rw.next_round(0.9)  # 8 -> 1 -> 1 -> 1 (round(0.8) = 1, then round(0.1) = 0)
    kept = {n: int(m.sum()) for n, m in rw.masks.items()}
    fct.test_eq(kept['2'], 1)
    fct.test_eq(kept['0'], 1)  # 64 -> 6 -> 1 -> 1
