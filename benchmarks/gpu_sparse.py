"""2:4 semi-structured sparsity on the GPU through the sparse inference export (issue 11), one prepared script.

    python3 benchmarks/gpu_sparse.py                      # CUDA (H100/H200): a table, and $OUT/gpu_sparse.json
    python3 benchmarks/gpu_sparse.py --dev cpu --small    # CPU smoke test of the same code (the 2:4 part is skipped)

1. A 2:4 MLP (4096 -> 16384 -> 4096, GELU, 16,384 tokens) in fp16 and bf16: the dense (masked) model, the plain
   recipe (`lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight))`, cuSPARSELt by default), and
   `to_sparse_inference` (backend, algorithm and result layout chosen per layer by timing, bias fused). Median of
   interleaved, CUDA-synchronized pairs; target: export >= 1.4x dense.
2. Fallback: a model whose layers are too small for sparse kernels to win (2:4 MLP 256 -> 512 -> 256 on 64 tokens,
   a 95 % unstructured 1024x1024 Linear): the export must keep them dense and never be slower than dense (>= 0.95x).

Plain PyTorch, no fastai; works with torch 2.11 (the GPU box) and 2.14. Record the card's name with the figures.
"""
import argparse, copy, json, os, statistics, sys, time, warnings
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, torch.nn as nn, torch.nn.functional as F
from fasterprune.inference import to_sparse_inference, export_report

warnings.filterwarnings('ignore')


def prune_2_4(model):
    "Keep the 2 largest |w| of every group of 4 consecutive weights of each Linear (magnitude 2:4)"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                g = m.weight.reshape(-1, 4)
                drop = g.abs().argsort(1)[:, :2]
                g.scatter_(1, drop, 0.)
    return model


def prune_unstructured(model, sparsity):
    "Zero the smallest `sparsity` fraction of |w| of each Linear"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                k = int(w.numel() * sparsity)
                if k: w[w.abs() <= w.abs().flatten().float().kthvalue(k).values.to(w.dtype)] = 0
    return model


def plain_semi(model):
    "The documented recipe: every 2:4 Linear weight replaced by `to_sparse_semi_structured(weight)` (default backend)"
    from torch.sparse import to_sparse_semi_structured
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    return model


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def interleaved(models, x, n_runs=30, reps=3):
    "Seconds per forward of each model, `n_runs` interleaved samples of `reps` calls each (order alternating)"
    with torch.inference_mode():
        for m in models:
            for _ in range(2): m(x)
        times = [[] for _ in models]
        for i in range(n_runs):
            for j in (range(len(models)) if i % 2 == 0 else reversed(range(len(models)))):
                sync(x.device)
                t0 = time.perf_counter()
                for _ in range(reps): models[j](x)
                sync(x.device)
                times[j].append((time.perf_counter() - t0) / reps)
    return times


def ratio(ref, t): return statistics.median(a / b for a, b in zip(ref, t))


def rel_err(a, b): return float((a.float() - b.float()).abs().max() / a.float().abs().max())


def _num(v, k): return None if v != v else round(float(v), k)  # NaN -> None (JSON)


def _ms(times): return round(statistics.median(times) * 1e3, 4)


def choices(exported):
    return [dict(layer=r.layer, kernel=r.kernel, backend=r.backend, speedup=_num(r.speedup, 3),
                 dense_ms=_num(r.dense_ms, 4), sparse_ms=_num(r.sparse_ms, 4), reason=r.reason)
            for r in export_report(exported).itertuples()]


def mlp_case(dev, dtype, tokens, d, h, n_runs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).to(dev, dtype).eval().requires_grad_(False)
    prune_2_4(model)
    x = torch.randn(tokens, d, device=dev, dtype=dtype)
    res = dict(case=f'2:4 MLP {d}->{h}->{d}', dtype=str(dtype).replace('torch.', ''), tokens=tokens)
    models, names = [model], ['dense']
    try:
        plain = plain_semi(model)
        with torch.inference_mode(): res['plain_err'] = rel_err(model(x), plain(x))
        models.append(plain)
        names.append('plain')
    except Exception as e: res['plain_error'] = f'{type(e).__name__}: {str(e)[:200]}'
    t0 = time.perf_counter()
    exported = to_sparse_inference(model, x, n_runs=10)
    res['export_s'] = round(time.perf_counter() - t0, 2)
    with torch.inference_mode(): res['export_err'] = rel_err(model(x), exported(x))
    res['choices'] = choices(exported)
    models.append(exported)
    names.append('export')
    times = interleaved(models, x, n_runs)
    for n, t in zip(names, times): res[f'{n}_ms'] = round(statistics.median(t) * 1e3, 3)
    for n, t in zip(names[1:], times[1:]): res[f'{n}_speedup'] = round(ratio(times[0], t), 3)
    res['target'] = 1.4
    res['ok'] = res['export_speedup'] >= res['target']
    return res


def fallback_case(dev, dtype, n_runs):
    "Layers too small for sparse kernels: the export must keep them dense and be as fast as dense"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 1024),
                          nn.GELU(), nn.Linear(1024, 1024)).to(dev, dtype).eval().requires_grad_(False)
    prune_2_4(model[:3])
    prune_unstructured(model[6], 0.95)
    x = torch.randn(64, 256, device=dev, dtype=dtype)
    exported = to_sparse_inference(model, x, n_runs=10)
    times = interleaved([model, exported], x, n_runs, reps=20)
    res = dict(case='fallback: small 2:4 MLP + 95 % Linear', dtype=str(dtype).replace('torch.', ''), tokens=64,
               dense_ms=_ms(times[0]), export_ms=_ms(times[1]), export_speedup=round(ratio(*times), 3),
               choices=choices(exported), target=0.95)
    with torch.inference_mode(): res['export_err'] = rel_err(model(x), exported(x))
    res['ok'] = res['export_speedup'] >= res['target']
    return res


def cpu_case(n_runs, small):
    "The CPU path of the same export: a 95 % unstructured MLP (CSR where faster)"
    torch.manual_seed(0)
    d, h = (64, 1024) if small else (1024, 4096)
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)).eval()
    prune_unstructured(model, 0.95)
    x = torch.randn(64, d)
    exported = to_sparse_inference(model, x, n_runs=5)
    times = interleaved([model, exported], x, n_runs, reps=5)
    res = dict(case=f'CPU 95 % MLP {d}-{h}-{h}-10', dtype='float32', tokens=64,
               dense_ms=_ms(times[0]), export_ms=_ms(times[1]), export_speedup=round(ratio(*times), 3),
               choices=choices(exported))
    with torch.no_grad(): res['export_err'] = rel_err(model(x), exported(x))
    return res


def _failed(case, dtype, e):
    return dict(case=case, dtype=str(dtype), error=f'{type(e).__name__}: {str(e)[:300]}', ok=False)


def run(dev='cuda', small=False) -> dict:
    "Run the checks on `dev`; `small` shrinks every size (a smoke test). Returns everything measured, JSON-ready."
    dev = torch.device(dev)
    out = dict(torch=torch.__version__, device=str(dev), small=small, cases=[], notes=[])
    if dev.type == 'cuda':
        if not torch.cuda.is_available(): raise RuntimeError("--dev cuda asked, but torch.cuda.is_available() is False")
        out['gpu'] = torch.cuda.get_device_name(dev)
        out['capability'] = '.'.join(map(str, torch.cuda.get_device_capability(dev)))
        out['cusparselt'] = bool(getattr(getattr(torch.backends, 'cusparselt', None), 'is_available', lambda: False)())
        tokens, d, h, n_runs = (1024, 512, 2048, 10) if small else (16384, 4096, 16384, 30)
        for dtype in (torch.float16, torch.bfloat16):
            try: out['cases'].append(mlp_case(dev, dtype, tokens, d, h, n_runs))
            except Exception as e: out['cases'].append(_failed('2:4 MLP', dtype, e))
            torch.cuda.empty_cache()
        for dtype in (torch.float16,):
            try: out['cases'].append(fallback_case(dev, dtype, 30))
            except Exception as e: out['cases'].append(_failed('fallback', dtype, e))
    else:
        out['notes'].append("no CUDA device: the 2:4 semi-structured part (cuSPARSELt/CUTLASS) was skipped; "
                            "CPU CSR path and fallback only")
        out['cases'].append(cpu_case(5 if small else 20, small))
        out['cases'].append(fallback_case(dev, torch.float32, 5 if small else 20))
    return out


def show(res):
    card = f" (sm {res['capability']}, cuSPARSELt {res['cusparselt']})" if 'gpu' in res else ''
    print(f"torch {res['torch']}, {res.get('gpu', res['device'])}{card}")
    for n in res['notes']: print('note:', n)
    for c in res['cases']:
        if 'error' in c:
            print(f"FAIL  {c['case']} {c['dtype']}: {c['error']}")
            continue
        flag = '' if 'ok' not in c else ('PASS  ' if c['ok'] else 'FAIL  ')
        plain = f", plain {c['plain_ms']} ms ({c['plain_speedup']}x)" if 'plain_ms' in c else ''
        if 'plain_error' in c: plain = f", plain: {c['plain_error']}"
        print(f"{flag}{c['case']} {c['dtype']} x{c['tokens']}: dense {c['dense_ms']} ms{plain}, "
              f"export {c['export_ms']} ms ({c['export_speedup']}x dense, target {c.get('target', '-')}), "
              f"max rel err {c['export_err']:.2g}")
        for r in c['choices']:
            print(f"      {r['layer']:>6} {r['kernel']:>5} {r['backend'] or '':<22} dense {r['dense_ms']} ms, "
                  f"sparse {r['sparse_ms']} ms, {r['speedup']}x  {r['reason'][:110]}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dev', default='cuda')
    ap.add_argument('--small', action='store_true')
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = run(a.dev, a.small)
    res['seconds'] = round(time.perf_counter() - t0, 1)
    show(res)
    print(f"{res['seconds']} s")
    if os.environ.get('OUT'):
        with open(os.path.join(os.environ['OUT'], 'gpu_sparse.json'), 'w') as f:
            json.dump(res, f, indent=1, default=str)
    sys.exit(0 if all(c.get('ok', True) for c in res['cases']) else 1)
