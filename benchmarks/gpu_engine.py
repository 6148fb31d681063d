"""Global magnitude mask on an accelerator: the Sparsifier's device path against PyTorch's built-in and one read.

    python benchmarks/gpu_engine.py                 # on the GPU machine (torch only, no fastai needed)
    python benchmarks/gpu_engine.py --dev cpu --small   # a quick check of the script itself
    python benchmarks/gpu_engine.py --json out.json

(1) torchvision vit_l_16 (weights=None, fp32, ~228 M prunable weights), Sparsifier(model, 'weight', 'global')
    .sparsify(0.9):
    median of 3 timed runs after one warm-up (weights restored between runs), peak extra bytes per weight (the masks the
    Sparsifier keeps, 1 byte per weight, included), exact counts; the same with the engine's CPU path forced (the old
    chunked selection), `torch.nn.utils.prune.global_unstructured`, and one read of every weight (sum of |w| per layer).
(2) A Llama-2-7B-shaped stack of bf16 Linear weights built on the device (32 x [4 x 4096x4096, 2 x 11008x4096,
    4096x11008], 6.48 B weights): global 0.9, then the 0.9 -> 0.95 update, each timed once, exact counts, extra bytes.
`small=True` uses a 2-layer ViT and 2 blocks of 512-sized matrices.
"""
import argparse, copy, json, statistics, time, warnings
import torch, torch.nn as nn
from fasterprune import sparsifier as S
from fasterprune.sparsifier import Sparsifier

warnings.filterwarnings('ignore')


def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()


def _measure(dev, f):
    "Seconds and peak extra bytes (CUDA only) of `f()`"
    _sync(dev)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = f()
    _sync(dev)
    dt = time.perf_counter() - t
    extra = torch.cuda.max_memory_allocated() - base if dev.type == 'cuda' else float('nan')
    return dt, extra, out


def _pruned(sp): return int(sum(((~m).sum() for m in sp.masks.values()), torch.zeros((), dtype=torch.int64)))


def _zeros(sp):
    return int(sum(((m.weight == 0).sum() for m in sp.layers.values()), torch.zeros((), dtype=torch.int64)))


def _vit(dev, small):
    import torchvision
    if small: return torchvision.models.VisionTransformer(32, 16, 2, 2, 64, 128).to(dev)
    return torchvision.models.vit_l_16(weights=None).to(dev)


def _profile(dev, sp, ws, saved, s):
    "One profiled `sparsify`: host time, device kernel time, kernel launches, host reads, the busiest ops"
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    try:
        if saved is not None:
            torch._foreach_copy_(ws, saved)
            sp.reset()
        _sync(dev)
        with profile(activities=acts) as prof: sp.sparsify(s)
        _sync(dev)
        ev = prof.key_averages()
        dev_us = sum(getattr(e, 'self_device_time_total', 0) for e in ev)
        kernels = sum(e.count for e in prof.events() if getattr(e, 'device_type', None) is not None
                      and str(e.device_type).endswith('CUDA'))
        reads = sum(e.count for e in ev if e.key == 'aten::_local_scalar_dense' or e.key.startswith('cudaStreamSync')
                    or e.key == 'aten::nonzero')
        ops = sum(e.count for e in ev if e.key.startswith('aten::'))
        top = sorted(ev, key=lambda e: -getattr(e, 'self_device_time_total', 0))[:10]
        top += sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
        out = dict(device_kernel_s=dev_us / 1e6, kernels=kernels, aten_ops=ops, host_reads=reads,
                   top=[(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3),
                         round(getattr(e, 'self_device_time_total', 0) / 1e3, 3)) for e in top])
        print(f"  profile: {ops} aten ops, {kernels} kernels, device time {dev_us / 1e3:.2f} ms, host reads {reads}")
        for t in out['top']: print(f"    {t[0]:<40} x{t[1]:<5} cpu {t[2]:8.2f} ms  device {t[3]:8.2f} ms")
        return out
    except Exception as e: return dict(error=repr(e)[:500])


def bench_vit(dev, small, s=0.9, repeats=3):
    torch.manual_seed(0)
    model = _vit(dev, small).requires_grad_(False)
    sp = Sparsifier(model, 'weight', 'global', 'magnitude')
    ws = [m.weight for m in sp.layers.values()]
    n = sum(w.numel() for w in ws)
    saved = [w.clone() for w in ws]
    res = dict(weights=n)

    def ours(path):
        S._SELECT_PATH = path
        times, extras = [], []
        try:
            for r in range(repeats + 1):
                torch._foreach_copy_(ws, saved)
                sp.reset()
                dt, extra, _ = _measure(dev, lambda: sp.sparsify(s))
                assert _pruned(sp) == round(s * n) == _zeros(sp), (_pruned(sp), _zeros(sp), round(s * n))
                if r:
                    times.append(dt)
                    extras.append(extra / n)
        finally: S._SELECT_PATH = None
        return statistics.median(times), statistics.median(extras)

    res['ours_s'], res['ours_bytes_per_weight'] = ours(None)
    res['exact'] = True
    res['profile'] = _profile(dev, sp, ws, saved, s)
    res['old_engine_s'], res['old_engine_bytes_per_weight'] = ours('host')
    torch._foreach_copy_(ws, saved)
    sp.reset()
    del saved
    times, extras = [], []
    for r in range(repeats + 1):
        m2 = copy.deepcopy(model)
        params = [(m, 'weight') for m in S.prunable_layers(m2).values()]
        P = torch.nn.utils.prune
        dt, extra, _ = _measure(dev, lambda: P.global_unstructured(params, P.L1Unstructured, amount=s))
        if r:
            times.append(dt)
            extras.append(extra / n)
        del m2, params
    res['torch_prune_s'], res['torch_prune_bytes_per_weight'] = statistics.median(times), statistics.median(extras)
    times = []
    for r in range(repeats + 1):
        dt, _, _ = _measure(dev, lambda: torch._foreach_norm(ws, 1))
        if r: times.append(dt)
    res['read_once_s'] = statistics.median(times)
    return res


def _llama_stack(dev, small):
    d, h, blocks = (512, 1376, 2) if small else (4096, 11008, 32)
    layers = []
    for _ in range(blocks):
        for out_f, in_f in [(d, d)] * 4 + [(h, d)] * 2 + [(d, h)]:
            lin = nn.Linear(in_f, out_f, bias=False, device='meta')
            w = torch.empty(out_f, in_f, device=dev, dtype=torch.bfloat16).normal_()
            lin.weight = nn.Parameter(w, requires_grad=False)
            layers.append(lin)
    return nn.Sequential(*layers)


def bench_llama(dev, small):
    torch.manual_seed(0)
    model = _llama_stack(dev, small)
    sp = Sparsifier(model, 'weight', 'global', 'magnitude')
    n = sum(m.weight.numel() for m in sp.layers.values())
    res = dict(weights=n)
    for key, s in (('s090', 0.9), ('s095', 0.95)):
        dt, extra, _ = _measure(dev, lambda: sp.sparsify(s))
        pruned, zeros = _pruned(sp), _zeros(sp)
        res[f'{key}_s'], res[f'{key}_bytes_per_weight'] = dt, extra / n
        res[f'{key}_exact'] = pruned == round(s * n) == zeros
        assert res[f'{key}_exact'], (s, pruned, zeros, round(s * n))
    ws = [m.weight for m in sp.layers.values()]
    print("  profile of one more update, 0.95 -> 0.97:")
    res['profile_update'] = _profile(dev, sp, ws, None, 0.97)
    times = []
    for r in range(3):
        dt, _, _ = _measure(dev, lambda: torch._foreach_norm(ws, 1))
        if r: times.append(dt)
    res['read_once_s'] = statistics.median(times)
    return res


def run(dev='cuda', small=False) -> dict:
    "Figures of both benchmarks as a dict (seconds, bytes per weight, exactness)"
    dev = torch.device(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'
    out = dict(device=name, torch=torch.__version__, small=small)
    t = time.perf_counter()
    out['vit_l_16'] = bench_vit(dev, small)
    out['llama7b_bf16'] = bench_llama(dev, small)
    out['total_s'] = time.perf_counter() - t
    v, l = out['vit_l_16'], out['llama7b_bf16']
    print(f"{out['device']}, torch {out['torch']}{' (small sizes)' if small else ''}")
    print(f"{'vit_l_16 fp32 global 0.9':<44}{'s':>9}{'extra B/w':>11}")
    for name, k in [('Sparsifier (device path)', 'ours'), ('Sparsifier, CPU path (old engine)', 'old_engine'),
                    ('torch.nn.utils.prune.global_unstructured', 'torch_prune')]:
        print(f"  {name:<42}{v[k + '_s']:>9.4f}{v[k + '_bytes_per_weight']:>11.2f}")
    print(f"  {'one read of every weight':<42}{v['read_once_s']:>9.4f}")
    print(f"{'7B-shaped bf16 stack (%.2f B weights)' % (l['weights'] / 1e9):<44}")
    print(f"  {'global 0.9':<42}{l['s090_s']:>9.4f}{l['s090_bytes_per_weight']:>11.2f}")
    print(f"  {'update 0.9 -> 0.95':<42}{l['s095_s']:>9.4f}{l['s095_bytes_per_weight']:>11.2f}")
    print(f"  {'one read of every weight':<42}{l['read_once_s']:>9.4f}")
    print(f"counts exact: {v['exact'] and l['s090_exact'] and l['s095_exact']}; total {out['total_s']:.1f} s")
    return out


if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--dev', default='cuda')
    p.add_argument('--small', action='store_true')
    p.add_argument('--json')
    a = p.parse_args()
    res = run(a.dev, a.small)
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=1)
