"""Training runs for tests/test_distributed.py.

- `torchrun --nproc-per-node 2 ddp_worker.py ddp OUT`: every configuration of `CONFIGS` under fastai's DDP (gloo, CPU),
  then a fit where only rank 1's loss turns NaN; rank 0 saves what both ranks hold to OUT/ddp.pt.
- `python ddp_worker.py fit DIR`: one process, a checkpointed fit that the test kills with SIGKILL in the middle of
  epoch 2 (it writes DIR/midway there and waits).
- imported by the test for the one-process reference runs (`run(name, world=1)`, `resume_learner`).

The data order is fixed (no shuffle) and the global batch is the same for one and two processes: under DDP each rank
takes `BS` items of its half of the training set per step (fastai's `DistributedDL` gives rank r the r-th contiguous
half), and the one-process run takes the same two slices as one batch of `2 * BS`, so both runs take the same steps
up to floating-point summation order.
"""
import os, sys, time, logging
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
import fastai.callback.schedule  # Learner.fit_one_cycle
import fastai.callback.progress  # Learner.no_bar
from fasterprune.data import TensorPairs, digits_arrays, lenet_300_100
from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import agp
from fasterprune.distributed import check_masks_in_sync, StopOnNaNCallback, is_rank0

N_TRAIN, BS, EPOCHS, LR = 1280, 32, 3, 1e-2  # 20 steps per epoch of a global batch of 64
CONFIGS = {
    'magnitude': dict(sparsity=0.8, granularity='weight', context='global', criteria='magnitude', schedule='agp'),
    # filter granularity traces coupled channels on one batch of the wrapped loader, on every rank
    'gradient': dict(sparsity=0.5, granularity='filter', context='local', criteria='gradient_magnitude',
                     schedule='iterative'),
}
NAN_RANK, NAN_ITER = 1, 25


def make_dls(world:int) -> DataLoaders:
    "Digits, first `N_TRAIN` training items; per-process batches of `BS` for 2 processes, the same global batches for 1"
    xt, yt, xv, yv = digits_arrays()
    xt, yt = xt[:N_TRAIN], yt[:N_TRAIN]
    if world == 1:  # batch i = rank 0's i-th slice, then rank 1's
        idx = torch.arange(N_TRAIN).reshape(2, N_TRAIN // (2 * BS), BS).transpose(0, 1).reshape(-1)
        xt, yt = xt[idx], yt[idx]
    return DataLoaders(DataLoader(TensorPairs(xt, yt), bs=BS * (2 // world), shuffle=False),
                       DataLoader(TensorPairs(xv, yv), bs=128), device=torch.device('cpu'))


def make_learner(world:int, path='.') -> Learner:
    torch.manual_seed(0)
    return Learner(make_dls(world), lenet_300_100(), loss_func=nn.CrossEntropyLoss(), path=path)


def _fit(learn, world, n_epoch, cbs, start_epoch=0):
    with learn.no_bar(), learn.no_logging():
        if world == 1: learn.fit_one_cycle(n_epoch, LR, cbs=cbs, start_epoch=start_epoch)
        else:
            with learn.distrib_ctx(cpu=True): learn.fit_one_cycle(n_epoch, LR, cbs=cbs, start_epoch=start_epoch)


def run(name:str, world:int) -> dict:
    "Train configuration `name` on `world` processes; masks (by the plain model's layer names), weights, history"
    learn = make_learner(world)
    cb = SparsifyCallback(**CONFIGS[name], show_sparsity=False)
    _fit(learn, world, EPOCHS, [cb])
    if world > 1: check_masks_in_sync(cb)
    return dict(masks={n: m.clone() for n, m in cb.sparsifier.masks.items()},  # no `module.` prefix under DDP
                state={k: v.clone() for k, v in learn.model.state_dict().items()},
                history=cb.history, sparsity=cb.sparsifier.sparsity())


class PoisonOnRank(Callback):
    "Make the loss NaN on one rank at one iteration"
    def __init__(self, rank:int, at:int): self.rank, self.at = rank, at
    def after_loss(self):
        if self.train_iter == self.at and int(os.environ.get('RANK', 0)) == self.rank:
            self.learn.loss_grad = self.loss_grad * float('nan')
            self.learn.loss = self.loss * float('nan')


def nan_run(world:int) -> dict:
    "A NaN loss on rank `NAN_RANK` only: every rank must stop at the same step, with finite weights and exact masks"
    learn = make_learner(world)
    cb = SparsifyCallback(0.8, show_sparsity=False)
    err = None
    try: _fit(learn, world, EPOCHS, [cb, PoisonOnRank(NAN_RANK if world > 1 else 0, NAN_ITER), StopOnNaNCallback()])
    except FloatingPointError as e: err = str(e)
    finite = all(bool(torch.isfinite(p).all()) for p in learn.model.parameters())
    return dict(error=err, train_iter=learn.train_iter, finite=finite,
                sparsity=cb.sparsifier.sparsity(), last=cb.history[-1]['sparsity'] if cb.history else None)


def sync_check_errors() -> dict:
    "What `check_masks_in_sync` says when rank 1 differs in one weight, and when it holds a mask for one more layer"
    one = lambda *shape: torch.ones(*shape, dtype=torch.bool)
    values, layout = {'a': one(4, 5), 'b': one(3)}, {'a': one(4, 5)}
    if dist.get_rank() == 1:
        values['b'][1] = False
        layout['c'] = one(2)
    out = {}
    for name, m in [('values', values), ('layout', layout)]:
        try:
            check_masks_in_sync(m)
            out[name] = None
        except RuntimeError as e: out[name] = str(e)
    return out


# the fit that the test kills: checkpoints after every epoch; in the middle of epoch 2 it says so and waits to be killed
R_EPOCHS, KILL_EPOCH, KILL_ITER = 4, 2, 5
def resume_cbs():
    # still pruning at the kill
    return [SparsifyCallback(0.8, 'weight', 'global', 'magnitude', agp(end_pct=0.9), show_sparsity=False),
            SaveModelCallback(every_epoch=True, with_opt=True, fname='model')]

class Midway(Callback):
    "Write `marker` in the middle of epoch `KILL_EPOCH`, then wait there (for the SIGKILL)"
    def __init__(self, marker:Path): self.marker = marker
    def after_batch(self):
        if self.training and self.epoch == KILL_EPOCH and self.iter == KILL_ITER:
            self.marker.write_text(str(self.train_iter))
            time.sleep(300)


def latest_worker(rank:int, port:int, root:str):
    "`mp.spawn` target: 2 gloo ranks whose checkpoint folders differ; what `latest_checkpoint` and resume say on each"
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2')
    dist.init_process_group('gloo', rank=rank, world_size=2)
    from fasterprune.distributed import latest_checkpoint, resume_from_checkpoint
    out = {}
    # rank 0's disk has epochs ..., rank 1's others (node-local disks, or a copy still being written)
    for case, eps in {'r1_lacks': ([0, 1, 2], [0]), 'r1_has_more': ([0, 1], [0, 1, 2]), 'r0_none': ([], [0, 1])}.items():
        d = Path(root)/case/f'node{rank}'/'models'
        d.mkdir(parents=True)
        for ep in eps[rank]: torch.save({'w': torch.full((1,), float(ep))}, d/f'model_{ep}.pth')
        try:
            found = latest_checkpoint(d)
            out[case] = None if found is None else found[1]
        except FileNotFoundError as e: out[case] = f"FileNotFoundError: {e}"
        if case == 'r1_has_more':  # resume_from_checkpoint on a Learner whose model_dir is that folder
            x = torch.zeros(4, 1)
            dls = DataLoaders(DataLoader(TensorPairs(x, x), bs=2), DataLoader(TensorPairs(x, x), bs=2),
                              device=torch.device('cpu'))
            model = nn.ParameterDict({'w': nn.Parameter(torch.zeros(1))})  # state key 'w', as the files
            learn = Learner(dls, model, loss_func=nn.MSELoss(), path=d.parent)
            out['resume'] = (resume_from_checkpoint(learn, with_opt=False), float(learn.model['w']))
    torch.save(out, Path(root)/f'latest{rank}.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == 'fit':
        learn = make_learner(1, out)
        _fit(learn, 1, R_EPOCHS, resume_cbs() + [Midway(out/'midway')])
    elif mode == 'ddp':
        res = {name: run(name, 2) for name in CONFIGS}
        res['nan'] = nan_run(2)
        res['sync'] = sync_check_errors()
        got = [None] * dist.get_world_size()
        dist.all_gather_object(got, res)  # what every rank holds, to compare them on rank 0
        if is_rank0(): torch.save(got, out/'ddp.pt')
        dist.barrier()
        dist.destroy_process_group()
    else: raise SystemExit(f"unknown mode {mode!r}: use 'ddp' or 'fit'")
