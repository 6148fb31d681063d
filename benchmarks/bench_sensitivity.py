"""Non-uniform targets from a sensitivity scan vs uniform local and global magnitude, at the same total budget.

Digits (1,437 train / 360 valid): LeNet-300-100 (64-300-100-10) and small_cnn (two 3x3 convs with BatchNorm, a Linear
head). Per seed: train the dense model, then from the same dense weights, three ways to reach the same fraction of the
pruned layers' weights (`--budget`), each one-shot with magnitude and fine-tuned for the same epochs:

  uniform local      SparsifyCallback(budget, context='local')    every layer at the budget
  sensitivity        SparsifyCallback(targets, context='local')   targets_from_sensitivity(scan, budget=budget)
  global magnitude   SparsifyCallback(budget, context='global')   one ranking over all layers

The scan prunes each layer alone (ratios below) and measures the loss on the *training* set (`dl=`, `metric=
'valid_loss'`): the validation set, on which the accuracies are reported, is not used to choose the targets.
'one-shot' is the validation accuracy right after pruning, before fine-tuning. Mean ± std over the seeds.

    .venv/bin/python benchmarks/bench_sensitivity.py [--seeds 3] [--budget 0.9] [--epochs 10] [--ft-epochs 3]
    (--quick: one seed, 2 + 1 epochs, a smoke run)
"""
import argparse, statistics, time, warnings
import torch, torch.nn as nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule, fastai.callback.progress  # noqa: F401
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.data import digits_dls, lenet_300_100, small_cnn
from fasterprune.sensitivity import sensitivity, targets_from_sensitivity

warnings.filterwarnings('ignore')
RATIOS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
MODELS = {'LeNet-300-100': (lenet_300_100, True, 1e-2), 'small_cnn': (lambda: small_cnn(c=32), False, 1e-2)}


def _learner(make, flat, state=None):
    learn = Learner(digits_dls(seed=42, flat=flat), make(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    if state is not None: learn.model.load_state_dict(state)
    return learn


def _acc(learn):
    with learn.no_bar(), learn.no_logging(): return float(learn.validate()[1])


def run(name, seed, a):
    make, flat, lr = MODELS[name]
    set_seed(seed)
    learn = _learner(make, flat)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.epochs, lr)
    dense, state = _acc(learn), {k: v.clone() for k, v in learn.model.state_dict().items()}
    train = learn.dls.train.new(shuffle=False, drop_last=False)
    arms, targets, scan_s = {'uniform local': (a.budget, 'local')}, {}, []
    for metric, what in (('accuracy', 'acc'), ('valid_loss', 'loss')):  # on `train`: its accuracy, its loss
        t0 = time.perf_counter()
        scan = sensitivity(learn, ratios=RATIOS, metric=metric, dl=train, show_progress=False)
        scan_s.append(time.perf_counter() - t0)
        targets[what] = targets_from_sensitivity(scan, budget=a.budget)
        arms[f'sensitivity ({what})'] = (targets[what], 'local')
    arms['global magnitude'] = (a.budget, 'global')
    out = {}
    for arm, (s, ctx) in arms.items():
        shot = _learner(make, flat, state)  # the accuracy right after pruning: the masks the callback computes at pos 0
        Sparsifier(shot.model, context=ctx).sparsify(s)
        learn = _learner(make, flat, state)
        set_seed(seed)
        cb = SparsifyCallback(s, context=ctx, schedule='one_shot', show_sparsity=False)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.ft_epochs, lr / 10, cbs=cb)
        sp = cb.sparsifier.sparsity()
        assert abs(sp - a.budget) < 1e-6, (arm, sp)
        out[arm] = (_acc(shot), _acc(learn))
    return dense, statistics.mean(scan_s), len(scan), targets, out


def _ms(xs): return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--budget', type=float, default=0.9)
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--ft-epochs', type=int, default=3)
    p.add_argument('--quick', action='store_true')
    a = p.parse_args()
    if a.quick: a.seeds, a.epochs, a.ft_epochs = 1, 2, 1
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    print(f"digits, budget {a.budget:.0%} of the pruned layers' weights, magnitude, one-shot then fit_one_cycle "
          f"{a.ft_epochs} epochs (dense: {a.epochs} epochs); seeds 0..{a.seeds - 1}; scan ratios {RATIOS}")
    for name in MODELS:
        res = [run(name, seed, a) for seed in range(a.seeds)]
        dense = _ms([r[0] for r in res])
        scan_t = _ms([r[1] for r in res])
        print(f"\n{name}: dense accuracy {dense[0]:.4f} ± {dense[1]:.4f}; scan {res[0][2]} evaluations in "
              f"{scan_t[0]:.2f} ± {scan_t[1]:.2f} s (CPU, 1 thread)")
        for what, t in res[0][3].items():
            print(f"  targets from the {what} scan (seed 0): " + ', '.join(f"{n}: {s:.3f}" for n, s in t.items()))
        print(f"  {'method':<22}{'one-shot':>18}{'fine-tuned':>18}{'vs uniform (pts)':>18}")
        base = _ms([r[4]['uniform local'][1] for r in res])[0]
        for arm in res[0][4]:
            shot, ft = _ms([r[4][arm][0] for r in res]), _ms([r[4][arm][1] for r in res])
            vs = (ft[0] - base) * 100
            print(f"  {arm:<22}{shot[0]:>10.4f} ± {shot[1]:.4f}{ft[0]:>10.4f} ± {ft[1]:.4f}{vs:>+18.2f}")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == '__main__': main()
