"""Real CPU speed from unstructured sparsity through the sparse inference export (issue 11).

    nice -n 10 .venv/bin/python benchmarks/bench_sparse.py            # ~5 min on 2 threads
    nice -n 10 .venv/bin/python benchmarks/bench_sparse.py --quick    # smaller, a smoke test

Every figure is a same-run ratio: the median over interleaved pairs (dense, sparse, alternating order) of
t_dense / t_sparse, on `--threads` CPU threads (default 2). Rows:

1. one 4096x4096 Linear at 90 / 95 / 98 % zeros, batch 1 and 64, as `CSRLinear` (target >= 5x at 95 %, batch 1);
2. the digits MLP 64-1024-1024-10 pruned to 95 % (global magnitude, the Sparsifier), end to end, the export choosing
   per layer by timing (targets >= 3x at batch 64, >= 1.5x at batch 1);
3. torchvision vit_b_16 (weights=None) with its Linear layers at 90 % unstructured (local magnitude), batch 1, end to
   end (target >= 1.5x); then with the attention in-projections (in_proj_weight) at 90 % too.
"""
import argparse, json, os, statistics, sys, time, warnings
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from torch import nn
from fasterprune.inference import to_sparse_inference, export_report

warnings.filterwarnings('ignore')


def pairs(a, b, x, n_pairs, min_s=2e-3):
    "Median of t_a / t_b over `n_pairs` interleaved pairs, and the median seconds of each (a sample lasts >= `min_s`)"
    with torch.inference_mode():
        for f in (a, b):
            for _ in range(2): f(x)
        t0 = time.perf_counter()
        a(x)
        reps = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))
        ta, tb = [], []
        for i in range(n_pairs):
            for f, ts in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
                t0 = time.perf_counter()
                for _ in range(reps): f(x)
                ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(p / q for p, q in zip(ta, tb)), statistics.median(ta), statistics.median(tb)


def magnitude_(w, sparsity):
    "Zero the `sparsity` fraction of smallest |w| of one tensor, in place"
    with torch.no_grad():
        k = int(w.numel() * sparsity)
        w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
    return w


def row(rows, what, batch, target, ratio, td, ts, note=''):
    rows.append(dict(case=what, batch=batch, dense_ms=td * 1e3, sparse_ms=ts * 1e3, speedup=ratio, target=target,
                     note=note))
    ok = '' if target is None else ('  PASS' if ratio >= target else '  FAIL')
    goal = '' if target is None else f'>= {target}x'
    print(f"{what:<46} {batch:>5} {td * 1e3:>10.3f} {ts * 1e3:>10.3f} {ratio:>8.2f}x {goal}{ok} {note}", flush=True)


def linear_rows(rows, n_pairs, threads, quick):
    n = 1024 if quick else 4096
    for sp in (0.9, 0.95, 0.98):
        torch.manual_seed(0)
        lin = nn.Linear(n, n).eval().requires_grad_(False)
        magnitude_(lin.weight, sp)
        for bs in (1, 64):
            x = torch.randn(bs, n)
            e = to_sparse_inference(nn.Sequential(lin), x, kernels='csr', threads=threads)
            r, td, ts = pairs(lin, e, x, n_pairs)
            target = 5.0 if sp == 0.95 and bs == 1 and not quick else None
            row(rows, f'Linear {n}x{n} at {sp:.0%}, CSR', bs, target, r, td, ts)


def mlp_rows(rows, n_pairs, threads, quick):
    from fasterprune.data import mlp
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    model = mlp(64, 1024, 1024, 10).eval().requires_grad_(False)
    Sparsifier(model, 'weight', 'global').sparsify(0.95)
    for bs, target in ((64, 3.0), (1, 1.5)):
        x = torch.randn(bs, 64)
        e = to_sparse_inference(model, x, threads=threads)
        picks = ', '.join(f"{r.layer}:{r.kernel}" for r in export_report(e).itertuples())
        r, td, ts = pairs(model, e, x, n_pairs)
        row(rows, 'digits MLP 64-1024-1024-10 at 95 %, export', bs, target, r, td, ts, f'({picks})')


def vit_rows(rows, n_pairs, threads, quick):
    from torchvision.models import vit_b_16
    torch.manual_seed(0)
    model = vit_b_16(weights=None, image_size=64 if quick else 224).eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.Linear): magnitude_(m.weight, 0.9)
    x = torch.randn(1, 3, 64 if quick else 224, 64 if quick else 224)
    for with_attn in (False, True):
        if with_attn:
            for m in model.modules():
                if isinstance(m, nn.MultiheadAttention): magnitude_(m.in_proj_weight, 0.9)
        t0 = time.perf_counter()
        e = to_sparse_inference(model, x, threads=threads, n_runs=7)
        secs = time.perf_counter() - t0
        df = export_report(e)
        mats = df[df.type != 'Conv2d']
        note = f"({int((mats.kernel != 'dense').sum())}/{len(mats)} matrices sparse, export {secs:.0f} s)"
        r, td, ts = pairs(model, e, x, max(4, n_pairs // 3))
        what = 'vit_b_16 Linears' + (' + attn in_proj' if with_attn else '') + ' at 90 %, export'
        row(rows, what, 1, None if with_attn else 1.5, r, td, ts, note)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--pairs', type=int, default=21)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--only', default='linear,mlp,vit')
    ap.add_argument('--json', default=None, help='write the rows here')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, median of {a.pairs} interleaved pairs "
          f"(vit: {max(4, a.pairs // 3)})")
    print(f"{'case':<46} {'batch':>5} {'dense ms':>10} {'sparse ms':>10} {'speedup':>9}")
    rows, t0 = [], time.perf_counter()
    for name, f in (('linear', linear_rows), ('mlp', mlp_rows), ('vit', vit_rows)):
        if name in a.only: f(rows, a.pairs, a.threads, a.quick)
    print(f"{time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, 'w') as fh: json.dump(rows, fh, indent=1)
