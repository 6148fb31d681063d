"""The GPU benchmark (issues 9 and 11): one prepared script for a session that is lent a device.

    python3 benchmarks/gpu_bench.py [--out DIR] [--only engine,surgery,sparse,callback,checks] [--dev cpu --small]

Sections, each in its own module so it can be run and tested alone:

- engine   (`gpu_engine.py`): exact global 90 % magnitude masks on vit_l_16 fp32 and on a Llama-2-7B-shaped stack of
  bf16 Linear layers (6.48 B weights), with the 0.9 -> 0.95 update; PyTorch's `global_unstructured` and one read of
  every weight as references in the same run.
- surgery  (`gpu_surgery.py`): `Pruner(model, x).prune(0.5)` on resnet18/resnet50/mobilenet_v2 under PyTorch's default
  CUDA settings (TF32 convolutions), fp32/fp16/bf16, verified.
- sparse   (`gpu_sparse.py`): 2:4 semi-structured MLP through the sparse inference export, fp16 and bf16.
- callback (here): SparsifyCallback's overhead against the same dense fit (resnet18, bf16, 192 steps).
- checks   (`gpu_checks.py`): correctness checks of the callback, coupled groups and lottery rounds on CUDA.

Every section writes into one JSON file (`gpu_bench.json` under `--out`, `$OUT` on the device machine) as soon as it
finishes, so a run cut short keeps what it measured. A failing section is recorded with its error; the others go on.
`--dev cpu --small` runs every section on tiny sizes here, to check the script before spending device time.
"""
import argparse, json, os, statistics, sys, time, traceback, warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings('ignore')


def _sync(dev):
    if dev == 'cuda': torch.cuda.synchronize()


def callback_overhead(dev='cuda', small=False, pairs=7):
    "Wall time of the same fit with and without SparsifyCallback(0.9, 'weight', 'global', 'magnitude', 'agp')"
    import torchvision
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    import fastai.callback.fp16  # noqa: F401  (Learner.to_bf16)
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    from fasterprune.callback import SparsifyCallback

    class Timed(SparsifyCallback):
        "Adds up the host time of its events, and of its mask updates apart (syncs included: a conservative figure)"
        self_s = upd_s = 0.

        def __call__(self, event_name):
            t = time.perf_counter()
            try: return super().__call__(event_name)
            finally: self.self_s += time.perf_counter() - t

        def _update(self, pos, frac):
            t = time.perf_counter()
            try: return super()._update(pos, frac)
            finally: self.upd_s += time.perf_counter() - t

    n_batches, bs, epochs = (4, 32, 2) if small else (96, 64, 2)  # 192 steps on the GPU
    g = torch.Generator(dev).manual_seed(0)
    # batches made once on the device (bs=None: each item is a batch), so the steps time the GPU, not a collate loop
    def batches(n): return [(torch.randn(bs, 3, 32, 32, generator=g, device=dev),
                             torch.randint(0, 10, (bs,), generator=g, device=dev)) for _ in range(n)]
    tr, va = batches(n_batches), batches(2)

    def fit(sparse):
        torch.manual_seed(0)
        dls = DataLoaders(DataLoader(tr, bs=None, shuffle=True), DataLoader(va, bs=None), device=torch.device(dev))
        model = torchvision.models.resnet18(num_classes=10).to(dev)
        learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
        if dev == 'cuda': learn = learn.to_bf16()
        cbs = [Timed(0.9, 'weight', 'global', 'magnitude', 'agp')] if sparse else []
        with learn.no_bar(), learn.no_logging():
            _sync(dev)
            t = time.perf_counter()
            learn.fit(epochs, 1e-3, cbs=cbs)
            _sync(dev)
            dt = time.perf_counter() - t
        if sparse:
            sp = cbs[0].sparsifier
            n = sum(m.weight.numel() for m in sp.layers.values())
            zeros = sum(int((m.weight == 0).sum()) for m in sp.layers.values())
            return dt, dict(updates=len(cbs[0].history), exact=zeros == round(0.9 * n), callback_s=cbs[0].self_s,
                            updates_s=cbs[0].upd_s)
        return dt, {}

    fit(False)  # warm-up: cuDNN autotuning, allocator
    fit(True)
    ratios, times, info, own, upd = [], {False: [], True: []}, {}, [], []
    for i in range(pairs):
        order = [False, True] if i % 2 == 0 else [True, False]
        res = {s: fit(s) for s in order}
        ratios.append(res[True][0] / res[False][0])
        for s in res: times[s].append(res[s][0])
        info = dict(res[True][1])
        own.append(info.pop('callback_s') / res[False][0])
        upd.append(info.pop('updates_s'))
        print(f"callback  pair {i}: dense {res[False][0]:.3f} s, sparse {res[True][0]:.3f} s, ratio {ratios[-1]:.3f}, "
              f"callback's own time {own[-1]:.3f} of the dense fit ({upd[-1]:.3f} s in mask updates)")
    steps = epochs * n_batches
    out = dict(model='resnet18', precision='bf16' if dev == 'cuda' else 'fp32', steps=steps, ratios=ratios,
               median_ratio=statistics.median(ratios), min_ratio=min(times[True]) / min(times[False]),
               dense_s=times[False], sparse_s=times[True], callback_own=own, median_callback_own=statistics.median(own),
               updates_s=upd, **info)
    print(f"callback  median ratio {out['median_ratio']:.3f} over {pairs} pairs (best-of ratio {out['min_ratio']:.3f}, "
          f"callback's own time {out['median_callback_own']:.3f} of the dense fit), "
          f"{steps} steps, {info}")
    return out


def checks(dev='cuda', small=False):
    import gpu_checks
    if dev != 'cuda':
        return dict(engine=bool(gpu_checks.engine_check(dev, cases=12)),
                    grad_accumulation=bool(gpu_checks.grad_accumulation_check(dev)),
                    nan_fp16=bool(gpu_checks.nan_check_fp16(dev)))
    ok_en = gpu_checks.engine_check(dev)
    ok_cu = gpu_checks.coupled_check(dev)
    ok_cb = gpu_checks.callback_checks()
    ok_ga = gpu_checks.grad_accumulation_check(dev)
    ok_nan = gpu_checks.nan_check_fp16(dev)
    ok_kd = gpu_checks.distill_check()
    ok_lt = gpu_checks.lottery_check()
    return dict(engine=bool(ok_en), coupled=bool(ok_cu), callback=bool(ok_cb), grad_accumulation=bool(ok_ga),
                nan_fp16=bool(ok_nan), distill=bool(ok_kd), lottery=bool(ok_lt))


def _sections():
    def engine(dev, small):
        import gpu_engine
        return gpu_engine.run(dev=dev, small=small)

    def surgery(dev, small):
        import gpu_surgery
        return gpu_surgery.run(dev=dev, small=small)

    def sparse(dev, small):
        import gpu_sparse
        return gpu_sparse.run(dev=dev, small=small)
    return dict(engine=engine, surgery=surgery, sparse=sparse, callback=callback_overhead, checks=checks)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', default=os.environ.get('OUT', '.'))
    p.add_argument('--only', default=None, help='comma-separated sections')
    p.add_argument('--dev', default='cuda')
    p.add_argument('--small', action='store_true')
    a = p.parse_args()
    if a.dev == 'cuda' and not torch.cuda.is_available():
        print("no CUDA device; use --dev cpu --small to check the script here")
        return 2
    secs = _sections()
    names = a.only.split(',') if a.only else list(secs)
    res = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if a.dev == 'cuda' else 'cpu',
               small=a.small, sections={})
    path = Path(a.out) / 'gpu_bench.json'
    print(f"torch {res['torch']} on {res['device']}")
    for name in names:
        t0 = time.perf_counter()
        try:
            r = secs[name](a.dev, a.small)
        except Exception as e:
            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {e}"[:2000])
        r = dict(r or {}, seconds=round(time.perf_counter() - t0, 2))
        res['sections'][name] = r
        print(f"== {name}: {r['seconds']} s")
        path.write_text(json.dumps(res, indent=1, default=str))
        if a.dev == 'cuda': torch.cuda.empty_cache()
    return 0 if all('error' not in r for r in res['sections'].values()) else 1


if __name__ == '__main__': sys.exit(main())
