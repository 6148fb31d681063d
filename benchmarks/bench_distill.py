"""Knowledge distillation after pruning: does the dense teacher win back what 95 % sparsity costs?

Digits (scikit-learn, no download), LeNet-300-100. Per seed: a dense teacher is trained first; the student is a copy of
it pruned to the target sparsity by `SparsifyCallback` (AGP, global magnitude) in a fit of the same length, without
and with `DistillCallback(teacher)`. Printed: validation accuracy mean ± std over the seeds; then the time of a
training step of the pruning fit with distillation over the time without: one-epoch fits of each, alternated
`--rounds` times, the median step of each fit, the fastest fit of each kind (interference only slows a fit down).

    nice -n 10 .venv/bin/python benchmarks/bench_distill.py                      # CPU, the defaults (~20 s)
    .venv/bin/python benchmarks/bench_distill.py --device cuda                   # DEV switch: the same on a GPU
    .venv/bin/python benchmarks/bench_distill.py --device cuda --precision fp16  # teacher and student under autocast
    .venv/bin/python benchmarks/bench_distill.py --seeds 1 --epochs 2 --teacher-epochs 2   # a smoke run
"""
import argparse, copy, statistics, sys, time
from pathlib import Path
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fasterprune.callback import SparsifyCallback
from fasterprune.distill import DistillCallback
from fasterprune.data import digits_dls, lenet_300_100


class StepTimer(Callback):
    "Wall time of each training batch, forward to optimizer step (the device synchronized at both ends)"
    order, run_valid = 100, False
    def __init__(self, device): self.device, self.times = device, []
    def _sync(self):
        if self.device.type == 'cuda': torch.cuda.synchronize()
    def before_batch(self): self._sync(); self.t0 = time.perf_counter()
    def after_batch(self): self._sync(); self.times.append(time.perf_counter() - self.t0)


PRECISION = 'fp32'


def learner(seed, device, model=None):
    set_seed(seed)
    learn = Learner(digits_dls(bs=64, device=device), model or lenet_300_100(), loss_func=nn.CrossEntropyLoss(),
                    metrics=accuracy)
    learn.remove_cbs(ProgressCallback)
    learn.model.to(device)
    if PRECISION != 'fp32': getattr(learn, f'to_{PRECISION}')()  # fastai's autocast (CUDA): the teacher's too
    return learn


def run(seed, a):
    "Teacher accuracy, then for each student (plain, distilled): accuracy, reached sparsity, step times"
    dev = torch.device(a.device)
    learn = learner(seed, dev)
    learn.fit_one_cycle(a.teacher_epochs, a.lr)
    teacher = copy.deepcopy(learn.model)  # the recipe: a copy of the dense model taken before pruning
    out = dict(teacher=learn.validate()[1])
    for name, kd in [('plain', None), *[(f'KD T={T:g} a={al:g}', (T, al)) for T, al in a.kd]]:
        st = learner(seed, dev, copy.deepcopy(teacher))
        sp, timer = SparsifyCallback(a.sparsity, 'weight', 'global', 'magnitude', 'agp'), StepTimer(dev)
        cbs = [sp, timer] + ([DistillCallback(teacher, T=kd[0], alpha=kd[1])] if kd else [])
        st.fit_one_cycle(a.epochs, a.lr, cbs=cbs)
        out[name] = dict(acc=st.validate()[1], sparsity=sp.sparsifier.sparsity())
    return out, teacher


def step_times(teacher, a) -> dict:
    "The fastest median training step (s) of `a.rounds` one-epoch pruning fits of each student, alternated"
    dev, times = torch.device(a.device), {}
    kinds = [('plain', None), *[(f'KD T={T:g} a={al:g}', (T, al)) for T, al in a.kd]]
    for r in range(a.rounds):
        for name, kd in kinds:
            st = learner(r, dev, copy.deepcopy(teacher))
            timer = StepTimer(dev)
            cbs = [SparsifyCallback(a.sparsity, 'weight', 'global', 'magnitude', 'agp'), timer]
            st.fit(1, a.lr, cbs=cbs + ([DistillCallback(teacher, T=kd[0], alpha=kd[1])] if kd else []))
            times[name] = min(times.get(name, float('inf')), statistics.median(timer.times[2:]))  # (warm-up steps out)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--sparsity', type=float, default=0.95)
    p.add_argument('--epochs', type=int, default=20, help='the pruning fit (with or without distillation)')
    p.add_argument('--teacher-epochs', type=int, default=20)
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--rounds', type=int, default=7, help='timing: one-epoch fits of each student, alternated')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'fp16', 'bf16'], help="fastai's to_fp16/to_bf16")
    p.add_argument('--kd', type=lambda s: tuple(map(float, s.split(','))), nargs='+', default=[(4., .5)],
                   help='T,alpha pairs, e.g. --kd 4,0.5 4,0.9')
    a = p.parse_args()
    global PRECISION
    PRECISION = a.precision
    torch.set_num_threads(1) if a.device == 'cpu' else None
    t0 = time.time()
    res, teachers = zip(*[run(s, a) for s in range(a.seeds)])
    times = step_times(teachers[0], a)
    names = [k for k in res[0] if k != 'teacher']
    ms = lambda xs: f"{100 * statistics.mean(xs):5.2f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):4.2f}"
    print(f"\ndigits, LeNet-300-100, {a.sparsity:.0%} global magnitude AGP, {a.epochs} epochs pruning "
          f"(teacher: {a.teacher_epochs} dense epochs), {a.seeds} seeds, device {a.device}, {a.precision}")
    print(f"| {'student':<16} | {'valid acc % (mean ± std)':>24} | {'per seed':<22} | {'sparsity':>8} | "
          f"{'step ms':>7} | {'step / plain':>12} |")
    print(f"|{'-' * 18}|{'-' * 26}|{'-' * 24}|{'-' * 10}|{'-' * 9}|{'-' * 14}|")
    tacc = [r['teacher'] for r in res]
    print(f"| {'dense teacher':<16} | {ms(tacc):>24} | {' '.join(f'{100 * x:.2f}' for x in tacc):<22} | "
          f"{0:>8.3f} | {'':>7} | {'':>12} |")
    base = times['plain']
    for n in names:
        accs, step = [r[n]['acc'] for r in res], times[n]
        print(f"| {n:<16} | {ms(accs):>24} | {' '.join(f'{100 * x:.2f}' for x in accs):<22} | "
              f"{res[0][n]['sparsity']:>8.3f} | {1e3 * step:>7.3f} | {step / base:>12.2f} |")
    print(f"(total {time.time() - t0:.0f} s)")


if __name__ == '__main__': main()
