"""Distributed training (fastai DDP, 2 processes, gloo on CPU) and fault tolerance (SIGKILL and resume, bad
checkpoints, NaN loss). The training runs are in tests/ddp_worker.py."""
import os, sys, time, signal, socket, subprocess
from pathlib import Path
import pytest, torch
pytest.importorskip('accelerate')  # fastai.distributed needs it (our `distributed` extra)
import fastcore.test as fct
from fastai.callback.core import Callback
from fastai.callback.tracker import TerminateOnNaNCallback
from fasterprune.callback import SparsifyCallback
from fasterprune.distributed import (CheckpointError, load_checkpoint, latest_checkpoint, resume_from_checkpoint,
                                     StopOnNaNCallback, patch_distributed_dl)
import ddp_worker as w

WORKER = Path(__file__).with_name('ddp_worker.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _n_weights(masks): return sum(m.numel() for m in masks.values())


def test_ddp_two_processes_match_one(tmp_path):
    "torchrun, 2 processes, gloo: identical masks on both ranks, exact sparsity, one process's result, same batches"
    assert patch_distributed_dl()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-addr', '127.0.0.1',
           '--master-port', str(_free_port()), str(WORKER), 'ddp', str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ref = {name: w.run(name, 1) for name in w.CONFIGS}  # the one-process runs, while the two processes train
        ref_nan = w.nan_run(1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    ranks = torch.load(tmp_path/'ddp.pt', weights_only=False)
    assert len(ranks) == 2
    for name in w.CONFIGS:
        r0, r1, one = ranks[0][name], ranks[1][name], ref[name]
        # every rank holds the same masks and the same weights, bit for bit
        # filter granularity prunes coupled channel groups: the classifier's outputs ('4') stay
        layers = ['0', '2', '4'] if name == 'magnitude' else ['0', '2']
        assert list(r0['masks']) == list(r1['masks']) == list(one['masks']) == layers
        for k in r0['masks']: assert torch.equal(r0['masks'][k], r1['masks'][k]), (name, k)
        for k in r0['state']: assert torch.equal(r0['state'][k], r1['state'][k]), (name, k)
        # sparsity is exact
        if name == 'magnitude':  # global, weight: round(0.8 * n) zeros over all layers
            assert sum(int((~m).sum()) for m in r0['masks'].values()) == round(0.8 * _n_weights(r0['masks']))
        else:                    # local, filter: round(0.5 * rows) whole rows per layer
            for k, m in r0['masks'].items(): assert int((~m.any(1)).sum()) == round(0.5 * m.shape[0]), k
        for k, m in r0['masks'].items(): assert torch.equal(r0['state'][f'{k}.weight'] == 0, ~m), k
        fct.test_close(r0['sparsity'], one['sparsity'], eps=1e-12)
        # against one process on the same global batches. Tolerance: the two runs differ only by the order of the
        # floating-point sums (two half-batch means averaged by all-reduce vs one mean); after 60 Adam steps the
        # weights differ by ~1e-7 (checked: 1.2e-7) and the masks have been identical. We allow 0.1 % of the masks to
        # flip at the threshold and 1e-5 on the weights where the masks agree.
        flips = sum(int((r0['masks'][k] != one['masks'][k]).sum()) for k in r0['masks'])
        assert flips <= 0.001 * _n_weights(r0['masks']), (name, flips)
        for k, v in r0['state'].items():
            lk = k[:-len('.weight')]
            masked = k.endswith('.weight') and lk in r0['masks']
            agree = (r0['masks'][lk] == one['masks'][lk]) if masked else torch.ones_like(v, dtype=torch.bool)
            assert torch.allclose(v[agree], one['state'][k][agree], atol=1e-5, rtol=1e-4), \
                (name, k, (v - one['state'][k]).abs().max())
        assert [h['target'] for h in r0['history']] == pytest.approx([h['target'] for h in one['history']])
    # a NaN loss on rank 1 only: both ranks stop at the same step, before it, with a message naming the loss
    for r in ranks:
        nan = r['nan']
        assert nan['error'] is not None and 'gradients are not finite' in nan['error']
        assert f"iteration {w.NAN_ITER}" in nan['error']
        assert nan['train_iter'] == w.NAN_ITER and nan['finite'] and nan['sparsity'] == nan['last']
    assert 'loss is nan' in ranks[w.NAN_RANK]['nan']['error']
    assert ranks[0]['nan']['sparsity'] == ranks[1]['nan']['sparsity'] == ref_nan['sparsity']
    # check_masks_in_sync raises on every rank, naming the layer, when the ranks disagree
    for r in ranks:
        assert "masks differ between ranks in 'b' (1 of 3 weights)" in r['sync']['values']
        assert r['sync']['layout'] == "ranks hold masks for different layers or shapes: 'c' (2,) (not on every rank)"


def test_sigkill_resume(tmp_path):
    "A fit killed with SIGKILL mid-schedule resumes from its last checkpoint to the weights of an uninterrupted fit"
    killed, ref_dir = tmp_path/'killed', tmp_path/'ref'
    proc = subprocess.Popen([sys.executable, str(WORKER), 'fit', str(killed)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ref = w.make_learner(1, ref_dir)
        ref_cbs = w.resume_cbs()  # the uninterrupted fit, while the other one runs
        w._fit(ref, 1, w.R_EPOCHS, ref_cbs)
        deadline = time.monotonic() + 120
        while not (killed/'midway').exists():  # epochs 0 and 1 are checkpointed, epoch 2 is half done
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the fit did not reach the middle of epoch 2 in 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    path, ep = latest_checkpoint(killed/'models')
    assert ep == w.KILL_EPOCH - 1 and not (killed/'models'/f'model_{w.KILL_EPOCH}.pth').exists()  # killed mid-schedule
    # the checkpoint holds the masks (its zeros) and weights of the uninterrupted fit at that epoch
    a = torch.load(path, weights_only=False)['model']
    b = torch.load(ref_dir/'models'/f'model_{ep}.pth', weights_only=False)['model']
    assert all(torch.equal(a[k], b[k]) for k in b)
    learn = w.make_learner(1, killed)
    start = resume_from_checkpoint(learn)
    assert start == ep + 1
    cbs = w.resume_cbs()
    w._fit(learn, 1, w.R_EPOCHS, cbs, start_epoch=start)
    # the same schedule position and targets from there on, the same masks and weights at the end
    got, want = cbs[0].history, [h for h in ref_cbs[0].history if h['pos'] > start / w.R_EPOCHS + 1e-9]
    assert [h['sparsity'] for h in got] == [h['sparsity'] for h in want]  # measured: exact
    for key in 'pos', 'target': assert [h[key] for h in got] == pytest.approx([h[key] for h in want], abs=1e-12)
    assert len(got) >= 2 and got[-1]['target'] == 0.8
    for k, v in ref.model.state_dict().items(): assert torch.equal(v, learn.model.state_dict()[k]), k
    fct.test_close(cbs[0].sparsifier.sparsity(), 0.8, eps=1e-12)


def _state(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}
def _same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_checkpoints_leave_the_model_untouched(tmp_path):
    learn = w.make_learner(1, tmp_path)
    w._fit(learn, 1, 1, [SparsifyCallback(0.5, schedule='one_shot')])
    good = learn.save('good', with_opt=True)
    data = good.read_bytes()
    (tmp_path/'models'/'half.pth').write_bytes(data[:len(data) // 2])
    (tmp_path/'models'/'empty.pth').write_bytes(b'')
    from fasterprune.data import mlp
    # first layer fits, the rest does not
    torch.save(mlp(64, 300, 50, 10).state_dict(), tmp_path/'models'/'foreign.pth')
    torch.save({'config': {'lr': 1}}, tmp_path/'models'/'config.pth')
    osd = torch.load(good, weights_only=False)
    st0 = osd['opt']['state'][0]
    osd['opt']['state'][0] = {k: (v[:1] if torch.is_tensor(v) and v.ndim else v) for k, v in st0.items()}
    torch.save(osd, tmp_path/'models'/'badopt.pth')
    before, opt_before = _state(learn), [dict(s) for s in learn.opt.state_dict()['state']]
    for name, msg in [('half', 'truncated'), ('empty', 'empty'), ('foreign', 'different shapes: 2.weight (50, 300)'),
                      ('config', 'holds no model state'), ('badopt', 'optimizer state of different shapes')]:
        with pytest.raises(CheckpointError, match=msg.replace('(', r'\(').replace(')', r'\)')):
            load_checkpoint(learn, name)
        assert _same(before, _state(learn)), name
        assert all(all(s[k] is t[k] for k in s) for s, t in zip(opt_before, learn.opt.state_dict()['state'])), name
    # the file a SIGKILL during a write leaves is skipped when resuming: the newest complete one is used
    (tmp_path/'models'/'model_0.pth').write_bytes(data)
    (tmp_path/'models'/'model_1.pth').write_bytes(data[:1000])
    assert latest_checkpoint(learn) == (tmp_path/'models'/'model_0.pth', 0)
    fresh = w.make_learner(1, tmp_path)
    assert resume_from_checkpoint(fresh) == 1 and _same(before, _state(fresh))


class _Poison(Callback):
    def after_loss(self):
        if self.train_iter == 23:
            self.learn.loss_grad = self.loss_grad * float('nan')
            self.learn.loss = self.loss * float('nan')


@pytest.mark.parametrize('every', [1, 7])  # a mask update at the NaN step, and none
def test_nan_loss_stops_with_a_message(every):
    learn = w.make_learner(1)
    cb = SparsifyCallback(0.8, update_every=every, show_sparsity=False)
    with pytest.raises(FloatingPointError, match='loss is nan .* at iteration 23 .* during sparsification'):
        w._fit(learn, 1, 3, [cb, _Poison(), StopOnNaNCallback(), TerminateOnNaNCallback()])
    assert learn.train_iter == 23
    assert all(bool(torch.isfinite(p).all()) for p in learn.model.parameters())
    assert cb.sparsifier.sparsity() == cb.history[-1]['sparsity']  # the masks are still exact
    # no NaN gradients left over
    assert not learn.opt.state or all(p.grad is None or not p.grad.any() for p in learn.model.parameters())


def test_stop_on_nan_when_mixed_precision_skips_the_step():
    "fp16 MixedPrecision cancels steps with non-finite gradients before StopOnNaNCallback.before_step: loss stops it"
    from fastai.learner import Learner
    from fastai.callback.core import Callback, CancelStepException
    from fasterprune.callback import SparsifyCallback
    from fasterprune.distributed import StopOnNaNCallback
    from fasterprune.data import digits_dls, mlp
    class SkipLikeGradScaler(Callback):  # what MixedPrecision.before_step does when the gradients overflow
        order = 10
        def before_step(self):
            if not torch.isfinite(self.loss).all(): raise CancelStepException()
    class PoisonAt(Callback):
        order = 5
        def after_loss(self):
            if self.train_iter == 7:
                self.learn.loss_grad = self.learn.loss_grad * float('nan')
                self.learn.loss = self.learn.loss * float('nan')
    torch.manual_seed(0)
    learn = Learner(digits_dls(), mlp(64, 32, 10), loss_func=torch.nn.CrossEntropyLoss())
    with pytest.raises(FloatingPointError, match='loss is nan.*iteration 7'):
        learn.fit(1, 1e-2, cbs=[SkipLikeGradScaler(), PoisonAt(), SparsifyCallback(0.5), StopOnNaNCallback()])
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
