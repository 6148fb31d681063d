"""Lottery tickets on digits: iterative magnitude pruning with rewinding to init vs its two controls.

Setting of issue 5: a 64-256-128-10 MLP, SGD with momentum 0.9 (lr 0.05, constant), 20 % of the remaining weights of
each layer pruned per round (output layer 10 %), rewind to the initialization, 30 epochs a round, 5 seeds.
Expected: the ticket stays within ~1.5 points of dense down to ~2 % of weights remaining, beats random re-init by
more than 1.5 points at <= 5 %, random pruning collapses toward chance by ~2 %.

    .venv/bin/python benchmarks/bench_lottery.py [--seeds 5 --epochs 30 --rounds 19]
    .venv/bin/python benchmarks/bench_lottery.py --overhead [--epochs 5]   # cost of keeping masks through a fit
    .venv/bin/python benchmarks/bench_lottery.py --check-rewind [--dev cuda --out $OUT/rewind.json]

`--dev cuda` runs any mode on the GPU (`--dev cpu` is the default); `--check-rewind` checks rewinding to iteration k
on that device (the rewind point equals the state after step k, BatchNorm buffers included; survivors come back
bit for bit; pruned weights stay zero through the next fit) and writes the result as JSON.

Resumable: the state is kept next to --json (a killed run continues after its last finished round)."""
import argparse, json, time, warnings
from functools import partial
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fasterprune.data import digits_dls, mlp, small_cnn
from fasterprune.lottery import lottery_experiment, lottery_table, plot_lottery, MaskCallback
from fasterprune.rewind import Rewinder, imp_masks, model_state

DEV = 'cpu'  # set by --dev


def make_learner():
    return Learner(digits_dls(device=torch.device(DEV)), mlp(64, 256, 128, 10).to(DEV),
                   loss_func=nn.CrossEntropyLoss(), metrics=accuracy, opt_func=partial(SGD, mom=0.9))


class Snapshots(Callback):
    "The model's full state after every optimizer step (after the masks: order 45 > 40)"
    order, run_valid = 45, False
    def before_fit(self): self.states = {0: model_state(self.learn.model)}
    def after_step(self): self.states[len(self.states)] = model_state(self.learn.model)


def rewind_check(k:int=5) -> dict:
    "Rewind to iteration `k` on DEV: a BatchNorm CNN, 2 epochs, half the weights pruned globally, rewound, 1 more epoch"
    torch.manual_seed(0)
    learn = Learner(digits_dls(flat=False, device=torch.device(DEV)), small_cnn(c=16).to(DEV),
                    loss_func=nn.CrossEntropyLoss(), metrics=accuracy, opt_func=partial(SGD, mom=0.9), wd=1e-2)
    rw = Rewinder(learn.model).attach(learn)
    rw.keep_rewind_point(k)
    snap = Snapshots()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=snap)
    want = snap.states[k]
    point_exact = all(torch.equal(rw.rewind_point[n], v) for n, v in want.items())
    masks = rw.prune_weights(0.5, 'global')
    rw.rewind()
    sd = model_state(learn.model)
    mk = {f'{n}.weight': m.cpu() for n, m in masks.items()}
    survivors = all(torch.equal(sd[n][mk[n]], v[mk[n]]) if n in mk else torch.equal(sd[n], v) for n, v in want.items())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    sd = model_state(learn.model)
    zero = all(bool((sd[n][~m] == 0).all()) for n, m in mk.items())
    res = dict(device=torch.cuda.get_device_name() if DEV == 'cuda' else DEV, k=k, point_exact=point_exact,
               bn_steps=int(rw.rewind_point['1.num_batches_tracked']), survivors_exact=survivors, pruned_zero=zero,
               remaining=rw.remaining(), ok=point_exact and survivors and zero)
    print(json.dumps(res))
    return res


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
    p.add_argument('--check-rewind', action='store_true', help='check rewinding to iteration k on --dev instead')
    p.add_argument('--dev', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--out', default=None, help='--check-rewind: write the result as JSON here')
    a = p.parse_args()
    warnings.filterwarnings('ignore', category=FutureWarning)
    torch.set_num_threads(a.threads)
    global DEV
    DEV = a.dev
    if a.check_rewind:
        res = rewind_check()
        if a.out: open(a.out, 'w').write(json.dumps(res, indent=1))
        return
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
