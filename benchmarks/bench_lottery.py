"""Lottery tickets on digits: iterative magnitude pruning with rewinding to init vs its two controls.

Setting of issue 5: a 64-256-128-10 MLP, SGD with momentum 0.9 (lr 0.05, constant), 20 % of the remaining weights of
each layer pruned per round (output layer 10 %), rewind to the initialization, 30 epochs a round, 5 seeds.
Expected: the ticket stays within ~1.5 points of dense down to ~2 % of weights remaining, beats random re-init by
more than 1.5 points at <= 5 %, random pruning collapses toward chance by ~2 %.

    .venv/bin/python benchmarks/bench_lottery.py [--seeds 5 --epochs 30 --rounds 19]
    .venv/bin/python benchmarks/bench_lottery.py --overhead [--epochs 5]   # cost of keeping masks through a fit

Resumable: the state is kept next to --json (a killed run continues after its last finished round)."""
import argparse, time, warnings
from functools import partial
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fasterprune.data import digits_dls, mlp
from fasterprune.lottery import lottery_experiment, lottery_table, plot_lottery, MaskCallback
from fasterprune.rewind import imp_masks


def make_learner():
    return Learner(digits_dls(), mlp(64, 256, 128, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                   opt_func=partial(SGD, mom=0.9))


class FusedMasks(Callback):
    "Baseline: fixed masks with one fused multiply after each step (a second mask mechanism, as lottery had before)"
    order, run_valid = 40, False
    def __init__(self, masks): self.masks = masks
    def before_fit(self):
        mods = dict(self.learn.model.named_modules())
        self.ws = [mods[n].weight for n in self.masks]
        self.fm = [mk.to(w.dtype) for w, mk in zip(self.ws, self.masks.values())]
        self.after_step()
    def after_step(self):
        with torch.no_grad(): torch._foreach_mul_(self.ws, self.fm)


def overhead(epochs:int, reps:int=3):
    "Best-of-`reps` seconds of `epochs` epochs: dense, fused-multiply baseline, MaskCallback (the Sparsifier's masks)"
    learn = make_learner()
    masks = imp_masks(learn.model, None, 0.5)
    arms = dict(dense=lambda: None, fused_baseline=lambda: FusedMasks(masks), MaskCallback=lambda: MaskCallback(masks))
    best = {a: float('inf') for a in arms}
    for _ in range(reps):
        for a, cb in arms.items():  # interleaved, so load on the machine hits every arm alike
            t0 = time.perf_counter()
            with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 0.05, cbs=cb())
            best[a] = min(best[a], time.perf_counter() - t0)
    print(f"keeping 50 % masks through a fit: mlp 64-256-128-10, digits, {epochs} epochs, best of {reps}")
    print(f"{'arm':<16}{'seconds':>9}{'vs dense':>10}")
    for a, t in best.items(): print(f"{a:<16}{t:>9.3f}{t / best['dense']:>10.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--rounds', type=int, default=19)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--json', default='benchmarks/lth_digits.json')
    p.add_argument('--plot', default='benchmarks/lth_digits.png')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--overhead', action='store_true', help='time keeping masks through a fit instead')
    a = p.parse_args()
    warnings.filterwarnings('ignore', category=FutureWarning)
    torch.set_num_threads(a.threads)
    if a.overhead: return overhead(a.epochs if a.epochs != 30 else 5)
    t0 = time.perf_counter()
    res = lottery_experiment(make_learner, rounds=a.rounds, rate=0.2, epochs=a.epochs, lr=a.lr, rewind_iter=0,
                             controls='reinit,random', seeds=a.seeds, context='local', layer_rates={'4': 0.1},
                             json_path=a.json, name='digits mlp 64-256-128-10')
    dt = time.perf_counter() - t0
    tbl = lottery_table(res)
    pd_opts = dict(index=False, float_format=lambda v: f'{v:.4f}')
    print(f"digits, mlp 64-256-128-10, SGD mom 0.9 lr {a.lr}, 20 %/round (output 10 %), local, rewind to init, "
          f"{a.epochs} epochs/round, {a.seeds} seeds, {a.rounds} rounds; torch threads {a.threads}")
    print(tbl.to_string(**pd_opts))
    print(f"time: {dt:.0f} s (this call; rounds loaded from the state file are not re-run)")
    plot_lottery(res, a.plot)
    print(f"plot: {a.plot}  json: {a.json}")


if __name__ == '__main__': main()
