"""How often SparsifyCallback updates its masks, against accuracy: the study behind `default_update_every`.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_update_every.py [--epochs 4 8 12] [--every 1 4 16]
        [--seeds 8] [--sparsity 0.97] [--model lenet|cnn] [--lr 1e-2]

LeNet-300-100 (or the small CNN) on scikit-learn's digits, `fit_one_cycle(E, lr)` with fastai's Adam,
`SparsifyCallback(s, 'weight', 'global', 'magnitude', agp(0, 0.5), update_every=U)`, validation accuracy, mean ± std
over seeds 10, 11, ... (fastai's `set_seed`: initial weights and batch order). For every budget E it runs U = 1 (an
update at every step), the callback's default (`default_update_every` of the window), the earlier default
(`max(1, min(100, window // 8))`) and the intervals of `--every`, and prints one table with the number of updates of
each. Accuracy only: the cost of an interval is `bench_overhead.py --update-every U`. Nothing here is a test.
"""
import argparse, statistics, time, warnings
import torch.nn as nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.progress  # Learner.no_bar
import fastai.callback.schedule  # Learner.fit_one_cycle
from fasterprune.callback import SparsifyCallback, default_update_every
from fasterprune.schedules import agp
from fasterprune.data import digits_dls, lenet_300_100, small_cnn

warnings.filterwarnings('ignore')


def earlier_default(window:int) -> int: return max(1, min(100, window // 8))


def run(model:str, epochs:int, every:int, seed:int, sparsity:float, lr:float):
    "Validation accuracy and the number of mask updates of one fit"
    set_seed(seed)
    flat = model == 'lenet'
    learn = Learner(digits_dls(flat=flat), lenet_300_100() if flat else small_cnn(), loss_func=nn.CrossEntropyLoss(),
                    metrics=accuracy)
    cb = SparsifyCallback(sparsity, 'weight', 'global', 'magnitude', agp(0., 0.5), update_every=every,
                          show_sparsity=False)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=cb)
        return learn.validate()[1], len(cb.history)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--epochs', type=int, nargs='+', default=[4, 8, 12])
    p.add_argument('--every', type=int, nargs='+', default=[4, 16], help='intervals besides 1 and the two defaults')
    p.add_argument('--seeds', type=int, default=8)
    p.add_argument('--sparsity', type=float, default=0.97)
    p.add_argument('--model', choices=['lenet', 'cnn'], default='lenet')
    p.add_argument('--lr', type=float, default=1e-2)
    a = p.parse_args()
    t0 = time.perf_counter()
    steps_per_epoch = len(digits_dls().train)
    print(f"digits, {a.model}, fit_one_cycle(E, {a.lr:g}), SparsifyCallback({a.sparsity:g}, 'weight', 'global', "
          f"'magnitude', agp(0, 0.5), update_every=U), seeds {10}..{10 + a.seeds - 1}")
    print(f"{'E':>3} {'window':>7} {'U':>5} {'updates':>8}  {'accuracy':>16}  which")
    for e in a.epochs:
        window = round(0.5 * e * steps_per_epoch)
        named = [(1, 'every step'), (default_update_every(window), 'default'),
                 (earlier_default(window), 'earlier default')]
        for u in sorted(set([1, default_update_every(window), earlier_default(window), *a.every])):
            res = [run(a.model, e, u, 10 + s, a.sparsity, a.lr) for s in range(a.seeds)]
            accs = [r[0] for r in res]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.
            which = ' / '.join(v for k, v in named if k == u)
            print(f"{e:>3} {window:>7} {u:>5} {res[0][1]:>8}  {statistics.mean(accs):.3f} ± {sd:.3f}  {which}",
                  flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == '__main__': main()
