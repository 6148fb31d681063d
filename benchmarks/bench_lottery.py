"""Lottery tickets on digits: iterative magnitude pruning with rewinding to init vs its two controls.

Setting of issue 5: a 64-256-128-10 MLP, SGD with momentum 0.9 (lr 0.05, constant), 20 % of the remaining weights of
each layer pruned per round (output layer 10 %), rewind to the initialization, 30 epochs a round, 5 seeds.
Expected: the ticket stays within ~1.5 points of dense down to ~2 % of weights remaining, beats random re-init by
more than 1.5 points at <= 5 %, random pruning collapses toward chance by ~2 %.

    .venv/bin/python benchmarks/bench_lottery.py [--seeds 5 --epochs 30 --rounds 19]

Resumable: the state is kept next to --json (a killed run continues after its last finished round)."""
import argparse, time, warnings
from functools import partial
import torch, torch.nn as nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fasterprune.data import digits_dls, mlp
from fasterprune.lottery import lottery_experiment, lottery_table, plot_lottery


def make_learner():
    return Learner(digits_dls(), mlp(64, 256, 128, 10), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                   opt_func=partial(SGD, mom=0.9))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--rounds', type=int, default=19)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--json', default='benchmarks/lth_digits.json')
    p.add_argument('--plot', default='benchmarks/lth_digits.png')
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    warnings.filterwarnings('ignore', category=FutureWarning)
    torch.set_num_threads(a.threads)
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
