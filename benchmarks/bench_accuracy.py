"""Accuracy after pruning: digits, LeNet-300-100 (64-300-100-10), fit_one_cycle, the same epochs for every run.
Dense vs SparsifyCallback(s, 'weight', 'global', 'magnitude', 'agp') for s in 0.9 and 0.95; 3 seeds; mean ± std.

    .venv/bin/python benchmarks/bench_accuracy.py [--epochs 30] [--seeds 3]
"""
import argparse, statistics, warnings
import torch, torch.nn as nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule, fastai.callback.progress  # noqa: F401
from fasterprune.callback import SparsifyCallback
from fasterprune.data import digits_dls, lenet_300_100

warnings.filterwarnings('ignore')


def run(seed, epochs, lr, sparsity=None):
    set_seed(seed)  # python, numpy and torch: the same initial weights and batch order on every rerun
    learn = Learner(digits_dls(seed=42), lenet_300_100(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    cbs = [SparsifyCallback(sparsity, 'weight', 'global', 'magnitude', 'agp')] if sparsity else []
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=cbs)
        acc = float(learn.validate()[1])
    if sparsity:
        assert abs(cbs[0].sparsifier.sparsity() - sparsity) < 1e-4
    return acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--lr', type=float, default=1e-2)
    a = p.parse_args()
    torch.set_num_threads(1)
    res = {}
    for s in (None, 0.9, 0.95):
        res[s] = [run(seed, a.epochs, a.lr, s) for seed in range(a.seeds)]
    dense = statistics.mean(res[None])
    print(f"digits (1,437 train / 360 valid), LeNet-300-100, fit_one_cycle {a.epochs} epochs lr {a.lr}, seeds 0..{a.seeds - 1}")
    print(f"{'run':<26}{'accuracy mean':>14}{'std':>8}{'vs dense (points)':>19}")
    for s, accs in res.items():
        name = 'dense' if s is None else f'AGP {s:.0%} global magnitude'
        m, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.
        print(f"{name:<26}{m:>14.4f}{sd:>8.4f}{(m - dense) * 100:>+19.2f}")


if __name__ == '__main__': main()
