"""Pruner surgery on a GPU under PyTorch's default CUDA settings (TF32 convolutions), and in fp16/bf16.

For resnet18, resnet50, mobilenet_v2 and convnext_tiny (random weights, 224x224; ConvNeXt's stream goes through
CountedLayerNorm): `Pruner(model, x).prune(0.5)` with its verification,
the surgery time, the relative error and the tolerance it was checked against, the parameters kept, and the measured
latency of the dense and the pruned model (batch 16, CUDA-synchronised). No fastai import: runs on a bare PyTorch box.

    python benchmarks/gpu_surgery.py                      # cuda, full sizes
    python benchmarks/gpu_surgery.py --dev cpu --small    # smoke test: resnet18 at 64x64
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path
import torch, torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fasterprune.pruner import Pruner  # noqa: E402

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}

def _sync(dev):
    if torch.device(dev).type == 'cuda': torch.cuda.synchronize()

def latency(model, x, n:int=20, warmup:int=3) -> float:
    "Mean seconds per forward pass of `model` on `x` (eval, no_grad, device-synchronised)"
    model.eval()
    with torch.no_grad():
        for _ in range(warmup): model(x)
        _sync(x.device)
        t0 = time.perf_counter()
        for _ in range(n): model(x)
        _sync(x.device)
    return (time.perf_counter() - t0) / n

def _flags():
    return dict(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                float32_matmul_precision=torch.get_float32_matmul_precision())

def one(name:str, dtype:str, dev:str, size:int, bs:int=16, n_example:int=8, n_runs:int=20) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():  # ViT's head starts at zero: a zero output would make the check vacuous
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any(): torch.nn.init.normal_(m.weight, std=0.02)
    model = model.to(device=dev, dtype=DTYPES[dtype]).eval()
    x = torch.randn(bs, 3, size, size, device=dev, dtype=DTYPES[dtype])
    n0 = sum(p.numel() for p in model.parameters())
    row = dict(model=name, dtype=dtype, size=size, params_dense=n0)
    row['lat_dense_ms'] = latency(model, x, n_runs) * 1e3
    flags = _flags()
    pr = Pruner(model, x[:n_example], keep_original=False)
    _sync(dev)
    t0 = time.perf_counter()
    try: pr.prune(0.5)
    except Exception as e:  # recorded, not raised: the other rows still run
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        return row
    finally:
        _sync(dev)
        row['surgery_s'] = time.perf_counter() - t0
        row['flags_restored'] = _flags() == flags
    h = pr.history[-1]
    n1 = sum(p.numel() for p in model.parameters())
    row.update(rel_error=h['rel_error'], rtol=h['rtol'], checked_in=h['checked_in'], params_pruned=n1, kept=n1 / n0)
    row['lat_pruned_ms'] = latency(model, x, n_runs) * 1e3
    row['speedup'] = row['lat_dense_ms'] / row['lat_pruned_ms']
    return row

def run(dev:str='cuda', small:bool=False, models:list|None=None) -> dict:
    "Every row of the table, with the device, its default flags and the software versions"
    names = models or (['resnet18'] if small else ['resnet18', 'resnet50', 'mobilenet_v2', 'convnext_tiny'])
    size = 64 if small else 224
    res = dict(device=torch.cuda.get_device_name() if torch.device(dev).type == 'cuda' else 'cpu', torch=torch.__version__,
               default_flags=_flags(), rows=[])
    for name in names:
        for dt in DTYPES:
            res['rows'].append(one(name, dt, dev, 224 if name.startswith(('vit', 'swin')) else size, n_runs=5 if small else 20))
            r = res['rows'][-1]
            print(f"{r['model']:>13} {r['dtype']:>9}  " + (f"ERROR {r['error']}" if 'error' in r else
                  f"surgery {r['surgery_s']:6.2f} s  err {r['rel_error']:.2e} <= rtol {r['rtol']:.1e} ({r['checked_in']})  "
                  f"kept {r['kept']:.3f}  latency {r['lat_dense_ms']:7.2f} -> {r['lat_pruned_ms']:7.2f} ms  x{r['speedup']:.2f}  "
                  f"flags restored {r['flags_restored']}"), flush=True)
    return res

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dev', default='cuda')
    ap.add_argument('--small', action='store_true', help='resnet18 at 64x64 only (a smoke test)')
    ap.add_argument('--models', nargs='+', default=None, help='torchvision models (default: resnet18 resnet50 mobilenet_v2; '
                    'also try vit_b_16 convnext_tiny regnet_y_400mf)')
    ap.add_argument('--out', default=None, help='JSON file (default: $OUT/gpu_surgery.json when $OUT is set)')
    a = ap.parse_args()
    res = run(a.dev, a.small, a.models)
    out = a.out or (os.path.join(os.environ['OUT'], 'gpu_surgery.json') if os.environ.get('OUT') else None)
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
        print('wrote', out)
