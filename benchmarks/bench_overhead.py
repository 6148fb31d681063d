"""Per-step cost of SparsifyCallback: the same Learner set-up fit dense and with
SparsifyCallback(0.9, 'weight', 'global', 'magnitude', 'agp'), interleaved, median of N pairs.

    .venv/bin/python benchmarks/bench_overhead.py [--pairs 3] [--only mlp|resnet18]

MLP: digits repeated 4x (7,188 rows, 6,400 train), 64-1024-1024-10, bs 64, 3 epochs.
ResNet-18 (torchvision, 10 classes): random 3x32x32 data, 4,096 train images, bs 64, 2 epochs (128 steps).
Prints a table; the ratio (sparse / dense wall time) is what we track, never an absolute time. The "callback" column
is the time spent inside the callback's events during the sparse fit (fastai calls every event through
`Callback.__call__`), as a fraction of the dense fit: the callback's own cost, without the pair-to-pair noise of two
separate fits.
"""
import argparse, statistics, time, warnings
import numpy as np, torch, torch.nn as nn
from fastai.learner import Learner
import fastai.callback.progress  # Learner.no_bar
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fasterprune.callback import SparsifyCallback
from fasterprune.data import TensorPairs, mlp

warnings.filterwarnings('ignore')


def digits_x4():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = np.tile(x / 16., (4, 1)).astype(np.float32), np.tile(y, 4)
    x, y = torch.tensor(x), torch.tensor(y)
    return TensorPairs(x[:6400], y[:6400]), TensorPairs(x[6400:], y[6400:])


def random_images(n_train=4096, n_valid=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g)
    return TensorPairs(x[:n_train], y[:n_train]), TensorPairs(x[n_train:], y[n_train:])


def make_learner(kind, seed=0):
    torch.manual_seed(seed)
    if kind == 'mlp': (tr, va), model, epochs = digits_x4(), mlp(64, 1024, 1024, 10), 3
    else:
        import torchvision
        (tr, va), model, epochs = random_images(), torchvision.models.resnet18(num_classes=10), 2
    dls = DataLoaders(DataLoader(tr, bs=64, shuffle=True, drop_last=True), DataLoader(va, bs=128), device=torch.device('cpu'))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss()), epochs


class TimedSparsify(SparsifyCallback):
    "SparsifyCallback that adds up the wall time of its events"
    self_s = 0.

    def __call__(self, event_name):
        t = time.perf_counter()
        try: return super().__call__(event_name)
        finally: self.self_s += time.perf_counter() - t


def timed_fit(kind, sparse, update_every=None):
    learn, epochs = make_learner(kind)
    cbs = [TimedSparsify(0.9, 'weight', 'global', 'magnitude', 'agp', update_every=update_every)] if sparse else []
    with learn.no_bar(), learn.no_logging():
        t = time.perf_counter()
        learn.fit(epochs, 1e-3, cbs=cbs)
        dt = time.perf_counter() - t
    if sparse:
        sp = cbs[0].sparsifier
        assert abs(sp.sparsity() - 0.9) < 1e-6, sp.sparsity()
        return dt, len(cbs[0].history), cbs[0].self_s
    return dt, 0, 0.


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--pairs', type=int, default=3)
    p.add_argument('--only', default=None)
    p.add_argument('--update-every', type=int, default=None, help="the callback's update_every (default: its own)")
    a = p.parse_args()
    kinds = [a.only] if a.only else ['mlp', 'resnet18']
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, update_every={a.update_every or 'default'}")
    print(f"{'model':<10}{'pair':>5}{'dense s':>10}{'sparse s':>10}{'ratio':>8}{'updates':>9}{'callback s':>12}"
          f"{'cb/dense':>10}")
    for kind in kinds:
        timed_fit(kind, False)  # warm-up
        ratios, own = [], []
        for i in range(a.pairs):
            order = [False, True] if i % 2 == 0 else [True, False]
            res = {s: timed_fit(kind, s, a.update_every) for s in order}
            r = res[True][0] / res[False][0]
            ratios.append(r)
            own.append(res[True][2] / res[False][0])
            print(f"{kind:<10}{i:>5}{res[False][0]:>10.2f}{res[True][0]:>10.2f}{r:>8.3f}{res[True][1]:>9}"
                  f"{res[True][2]:>12.3f}{own[-1]:>10.3f}")
        print(f"{kind:<10}{'median':>5}{'':>20}{statistics.median(ratios):>8.3f}{'':>21}{statistics.median(own):>10.3f}")


if __name__ == '__main__': main()
