"""Accuracy across training budgets and schedule windows: how much a gradual schedule costs at the user's budget.

digits (scikit-learn, 1,437 train / 360 valid), two reference models from `fasterprune.data`:
LeNet-300-100 (64-300-100-10 MLP) and `small_cnn` (two 3×3 conv blocks with BatchNorm, 1×8×8 input).
For every budget (epochs of `fit_one_cycle`), dense vs `SparsifyCallback(s, 'weight', 'global', 'magnitude',
agp(start_pct, end_pct))` for s in 0.9, 0.95 and every window; 3 seeds; mean ± std of the final accuracy. A seed
fixes the initial weights and the batch order, the same for the dense and the sparse runs.
The sparse runs assert that the final sparsity is exactly the target.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_budgets.py [--budgets 5 10 30] [--seeds 3]

Writes `benchmarks/budgets.json` (every run, and the summary) and `benchmarks/budgets.png`.
`--quick` runs a tiny grid (1 seed, budgets 1 and 2) to check the script; its outputs go to a temporary folder.

`--sweep` instead fixes the budget (30 epochs) and the default window (`agp()`: the first half) and sweeps the
sparsity from 50 % to 99 %: `benchmarks/sparsity_sweep.json` and `benchmarks/sparsity_sweep.png` (the README's
picture).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_budgets.py --sweep
"""
import argparse, json, statistics, tempfile, time, warnings
from pathlib import Path
import torch, torch.nn as nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule, fastai.callback.progress  # noqa: F401
from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import agp
from fasterprune.data import digits_dls, lenet_300_100, small_cnn

warnings.filterwarnings('ignore')
HERE = Path(__file__).parent
MODELS = dict(lenet=(lenet_300_100, True, 1e-2), cnn=(small_cnn, False, 1e-2))  # factory, flat input, lr
MODEL_NAMES = dict(lenet='LeNet-300-100', cnn='small CNN')
WINDOWS = [(0., .25), (0., .4), (0., .5), (0., .6), (0., .75), (0., 1.), (.1, .6), (.25, .75)]  # (start_pct, end_pct)


def run(model, seed, epochs, sparsity=None, window=None):
    "Final validation accuracy of one fit (dense when `sparsity` is None)"
    factory, flat, lr = MODELS[model]
    set_seed(seed)  # python, numpy and torch: the same initial weights and batch order for the dense and sparse runs
    learn = Learner(digits_dls(seed=42, flat=flat), factory(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    cbs = []
    if sparsity: cbs = [SparsifyCallback(sparsity, 'weight', 'global', 'magnitude', agp(*window), show_sparsity=False)]
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=cbs)
        acc = float(learn.validate()[1])
    if sparsity:
        got = cbs[0].sparsifier.sparsity()
        assert abs(got - sparsity) < 1e-4, f"final sparsity {got} != target {sparsity}"
    return acc


def _ms(xs): return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.)


def summarize(runs):
    "rows of (model, budget, sparsity, window, mean, std, points vs dense)"
    rows = []
    for m in dict.fromkeys(r['model'] for r in runs):
        for b in sorted({r['epochs'] for r in runs if r['model'] == m}):
            sel = [r for r in runs if r['model'] == m and r['epochs'] == b]
            dense, _ = _ms([r['acc'] for r in sel if r['sparsity'] is None])
            for key in dict.fromkeys((r['sparsity'], tuple(r['window']) if r['window'] else None) for r in sel):
                accs = [r['acc'] for r in sel if (r['sparsity'], tuple(r['window']) if r['window'] else None) == key]
                mean, sd = _ms(accs)
                rows.append(dict(model=m, epochs=b, sparsity=key[0], window=key[1], mean=mean, std=sd,
                                 delta=(mean - dense) * 100, n=len(accs)))
    return rows


def print_table(rows, budgets, windows, sparsities):
    "one markdown table per model: a row per (sparsity, window), a column per budget; mean ± std and points vs dense"
    for m in dict.fromkeys(r['model'] for r in rows):
        print(f"\n{MODEL_NAMES[m]}: accuracy mean ± std (points vs dense)\n")
        print('| run | ' + ' | '.join(f'{b} epochs' for b in budgets) + ' |')
        print('|---|' + '---|' * len(budgets))
        for s in (None, *sparsities):
            for w in ([None] if s is None else windows):
                cells = []
                for b in budgets:
                    r = next(r for r in rows if r['model'] == m and r['epochs'] == b and r['sparsity'] == s
                             and r['window'] == w)
                    cells.append(f"{r['mean']:.4f} ± {r['std']:.4f}" + ('' if s is None else f" ({r['delta']:+.2f})"))
                name = 'dense' if s is None else f'{s:.0%} agp({w[0]:g}, {w[1]:g})'
                print(f'| {name} | ' + ' | '.join(cells) + ' |')
    print("\nworst loss (points vs dense) over budgets and sparsities, per window:")
    for w in windows:
        worst = min(r['delta'] for r in rows if r['window'] == w)
        mean = statistics.mean(r['delta'] for r in rows if r['window'] == w)
        print(f"  agp{w}: worst {worst:+.2f}, mean {mean:+.2f}")


def plot(rows, budgets, windows, sparsities, fname):
    "a panel per (sparsity, model): points vs dense against end_pct (windows that start at 0), a line per budget"
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r['model'] for r in rows))
    ends = [w for w in windows if w[0] == 0]
    fig, axs = plt.subplots(len(sparsities), len(models), figsize=(4.6 * len(models), 3.2 * len(sparsities)),
                            squeeze=False, sharex=True, sharey=True)
    for j, m in enumerate(models):
        for i, s in enumerate(sparsities):
            ax = axs[i][j]
            for b in budgets:
                sel = [next(r for r in rows if r['model'] == m and r['epochs'] == b and r['sparsity'] == s
                            and r['window'] == w) for w in ends]
                ax.errorbar([w[1] for w in ends], [r['delta'] for r in sel], yerr=[r['std'] * 100 for r in sel],
                            marker='o', ms=4, capsize=3, label=f'{b} epochs')
            ax.axhline(0, color='k', lw=0.8)
            ax.axvline(0.5, color='gray', ls=':', lw=1)
            ax.set_yscale('symlog', linthresh=5)
            ax.set_yticks([0, -1, -2, -5, -10, -20, -40], ['0', '−1', '−2', '−5', '−10', '−20', '−40'])
            ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_ylim(-50, 1)
            ax.set_title(f'{MODEL_NAMES[m]}, {s:.0%} of the weights pruned', fontsize=10)
            if j == 0: ax.set_ylabel('accuracy vs dense (points)')
            if i == len(sparsities) - 1: ax.set_xlabel('end_pct of agp(start_pct=0, end_pct)')
    h, l = axs[0][0].get_legend_handles_labels()
    fig.legend(h, l, loc='lower center', ncol=len(budgets), fontsize=9, title='training budget (fit_one_cycle)',
               title_fontsize=9, bbox_to_anchor=(0.5, 0))
    fig.suptitle('digits: what AGP pruning costs, by training budget and by when pruning ends '
                 f'(mean ± std, {rows[0]["n"]} seeds)', fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(fname, dpi=80)


SWEEP = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]


def plot_sweep(rows, dense, fname):
    "accuracy against the fraction of weights kept (log scale), a line per model, dense as a dashed line"
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k, m in enumerate(dict.fromkeys(r['model'] for r in rows)):
        sel = sorted((r for r in rows if r['model'] == m), key=lambda r: r['sparsity'])
        kept = [100 * (1 - r['sparsity']) for r in sel]
        n = sum(l.weight.numel() for l in MODELS[m][0]().modules() if isinstance(l, (nn.Linear, nn.Conv2d)))
        ax.errorbar(kept, [100 * r['mean'] for r in sel], yerr=[100 * r['std'] for r in sel], marker='o', ms=4,
                    capsize=3, color=f'C{k}', label=f"{MODEL_NAMES[m]} ({n / 1000:.0f}k weights), AGP global magnitude")
        ax.axhline(100 * dense[m][0], color=f'C{k}', ls='--', lw=1, label=f"{MODEL_NAMES[m]}, dense")
    ax.set_xscale('log')
    ax.invert_xaxis()
    ticks = [50, 30, 20, 10, 5, 3, 2, 1]
    ax.set_xticks(ticks, [f'{t}' for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel='% of the weights left (sparsity 50 % → 99 %)', ylabel='validation accuracy (%)')
    ax.set_ylim(max(0, ax.get_ylim()[0]), 100)
    ax.legend(fontsize=8, loc='lower left')
    ax.set_title(f"digits, fit_one_cycle {rows[0]['epochs']} epochs, SparsifyCallback(s, schedule='agp'): "
                 f"mean ± std, {rows[0]['n']} seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(fname, dpi=90)


def sweep(a, out, seeds):
    "accuracy against sparsity at a fixed budget and the default window"
    runs, t0 = [], time.time()
    for m in a.models:
        for seed in seeds:
            acc = run(m, seed, a.epochs)
            runs.append(dict(model=m, epochs=a.epochs, seed=seed, sparsity=None, window=None, acc=acc))
            for s in SWEEP:
                runs.append(dict(model=m, epochs=a.epochs, seed=seed, sparsity=s, window=[0., .5],
                                 acc=run(m, seed, a.epochs, s, (0., .5))))
        print(f"{m} done, {time.time() - t0:.0f} s", flush=True)
    rows = summarize(runs)
    dense = {m: _ms([r['acc'] for r in runs if r['model'] == m and r['sparsity'] is None]) for m in a.models}
    print(f"\ndigits, fit_one_cycle({a.epochs}, 1e-2), SparsifyCallback(s, 'weight', 'global', 'magnitude', agp()), "
          f"seeds {seeds[0]}..{seeds[-1]}; {time.time() - t0:.0f} s\n")
    print('| sparsity | ' + ' | '.join(MODEL_NAMES[m] for m in a.models) + ' |')
    print('|---|' + '---|' * len(a.models))
    print('| dense | ' + ' | '.join(f'{dense[m][0]:.4f} ± {dense[m][1]:.4f}' for m in a.models) + ' |')
    sp = [r for r in rows if r['sparsity'] is not None]
    for s in SWEEP:
        cells = [next(r for r in sp if r['model'] == m and r['sparsity'] == s) for m in a.models]
        cells = [f"{r['mean']:.4f} ± {r['std']:.4f} ({r['delta']:+.2f})" for r in cells]
        print(f'| {s:.0%} | ' + ' | '.join(cells) + ' |')
    (out / 'sparsity_sweep.json').write_text(json.dumps(dict(summary=rows, runs=runs), indent=1))
    plot_sweep(sp, dense, out / 'sparsity_sweep.png')
    print(f"wrote sparsity_sweep.json and sparsity_sweep.png{' (quick run, temporary folder)' if a.quick else ''}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--budgets', type=int, nargs='+', default=[5, 10, 30])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--models', nargs='+', default=list(MODELS))
    p.add_argument('--sparsities', type=float, nargs='+', default=[0.9, 0.95])
    p.add_argument('--quick', action='store_true', help='1 seed, budgets 1 and 2, temp dir')
    p.add_argument('--sweep', action='store_true', help='accuracy against sparsity at --epochs, default window')
    p.add_argument('--epochs', type=int, default=30, help='the budget of --sweep')
    p.add_argument('--windows', nargs='+', help='start,end pairs, e.g. 0,0.5 0,0.6 (default: the full grid)')
    p.add_argument('--first-seed', type=int, default=0, help='seeds first_seed .. first_seed + seeds - 1')
    p.add_argument('--name', default='budgets', help='output files NAME.json and NAME.png')
    a = p.parse_args()
    windows = [tuple(float(v) for v in w.split(',')) for w in a.windows] if a.windows else WINDOWS
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp()) if a.quick else HERE
    if a.quick: a.budgets, a.seeds, a.epochs = [1, 2], 1, 1
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    if a.sweep: return sweep(a, out, seeds)
    runs, t0 = [], time.time()
    for m in a.models:
        for b in a.budgets:
            for seed in seeds:
                runs.append(dict(model=m, epochs=b, seed=seed, sparsity=None, window=None, acc=run(m, seed, b)))
                for s in a.sparsities:
                    for w in windows:
                        runs.append(dict(model=m, epochs=b, seed=seed, sparsity=s, window=list(w),
                                         acc=run(m, seed, b, s, w)))
            print(f"{m} {b} epochs done, {time.time() - t0:.0f} s", flush=True)
    rows = summarize(runs)
    head = f"digits (1,437 train / 360 valid), fit_one_cycle(epochs, 1e-2), bs 64, Adam, seeds {seeds[0]}..{seeds[-1]}"
    took = time.time() - t0
    print(f"\n{head}, SparsifyCallback(s, 'weight', 'global', 'magnitude', agp(start_pct, end_pct)); {took:.0f} s")
    print_table(rows, a.budgets, windows, a.sparsities)
    setup = dict(data='sklearn digits, 1437 train / 360 valid, valid split seed 42', bs=64, lr=1e-2,
                 fit='fit_one_cycle', opt='Adam', criteria='magnitude', context='global', granularity='weight',
                 seeds=list(seeds), budgets=a.budgets, windows=[list(w) for w in windows], sparsities=a.sparsities)
    (out / f'{a.name}.json').write_text(json.dumps(dict(setup=setup, summary=rows, runs=runs), indent=1))
    plot(rows, a.budgets, windows, a.sparsities, out / f'{a.name}.png')
    print(f"wrote {a.name}.json and {a.name}.png{' (quick run, temporary folder)' if a.quick else ''}")


if __name__ == '__main__': main()
