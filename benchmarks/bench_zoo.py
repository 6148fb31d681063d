"""The Pruner on today's model zoo, Torch-Pruning 1.6.1 side by side in the same run (CPU, random weights, local 0.5).

Usage: (ulimit -v 8000000; .venv/bin/python benchmarks/bench_zoo.py [--models ...] [--size 224] [--ratio 0.5] [--json f])
(the memory limit turns a runaway Torch-Pruning row into a MemoryError: on swin_t it needs more than 8 GB)
Torch-Pruning (optional): pip install --target /tmp/tp torch-pruning==1.6.1 --no-deps; PYTHONPATH=/tmp/tp

fasterprune: `Pruner(model, x).prune(ratio)` (verified: the pruned model computes what the masked model did).
Torch-Pruning: `MetaPruner` with L1 magnitude importance at the same ratio, the classifier (every layer with the
model's number of outputs) ignored so both keep the outputs; Torch-Pruning does not verify, so its row shows the
relative change of the output instead (an unverified surgery may change it; pruning changes it anyway: the removed
channels were not zero). "kept" is the fraction of parameters kept; times are seconds of the whole call.
"""
import argparse, copy, json, logging, os, platform, time, warnings
import torch, torchvision
from torch import nn
from fasterprune.pruner import Pruner, relative_error

TORCHVISION = ['resnet18', 'mobilenet_v3_small', 'efficientnet_b0', 'densenet121', 'vgg11_bn', 'googlenet',
               'shufflenet_v2_x0_5', 'convnext_tiny', 'vit_b_16', 'swin_t', 'regnet_y_400mf', 'squeezenet1_0']
FASTAI = ['fastai_resnet34', 'xresnet50', 'dynamic_unet']

def build(name:str) -> nn.Module:
    if name == 'fastai_resnet34':
        from fastai.vision.learner import create_vision_model
        return create_vision_model(torchvision.models.resnet34, 10, pretrained=False)
    if name == 'xresnet50':
        from fastai.vision.models.xresnet import xresnet50
        return xresnet50()
    if name == 'dynamic_unet':
        from fastai.vision.learner import create_unet_model
        return create_unet_model(torchvision.models.resnet34, 5, (64, 64), pretrained=False)
    kw = dict(aux_logits=False, init_weights=False) if name == 'googlenet' else {}  # its own init vanishes: output = fc bias
    return getattr(torchvision.models, name)(weights=None, **kw)

def n_params(m): return sum(p.numel() for p in m.parameters())

def _calibrate_bn(model, x):
    """BatchNorm statistics of a random batch: at random init, activations otherwise vanish with depth (GoogLeNet's
    output is its classifier's bias), and then any surgery would look exact"""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns: return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad(): model(x.expand(4, *x.shape[1:]) + torch.randn(4, *x.shape[1:]))
    for m in bns: m.momentum = 0.1
    model.eval()

def _no_zero_layers(model):
    "Random values for layers initialised to zero (torchvision's ViT head): a zero output would make any check vacuous"
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, 'weight', None)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(w, torch.Tensor) and not w.any(): nn.init.normal_(w, std=0.02)

def _outputs_of(model, x):
    with torch.no_grad(): y = model.eval()(x)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return y.shape[1]

def run_fp(model, x, ratio):
    n0, twin = n_params(model), copy.deepcopy(model)
    t0 = time.perf_counter()
    Pruner(twin, x, keep_original=False, verify=False).prune(ratio)
    t_noverify = time.perf_counter() - t0
    t0 = time.perf_counter()
    pr = Pruner(model, x, keep_original=False)
    pr.prune(ratio)
    return dict(kept=n_params(model) / n0, seconds=time.perf_counter() - t0, seconds_unverified=t_noverify,
                rel_error=pr.history[-1]['rel_error'], rtol=pr.history[-1]['rtol'])

def run_tp(model, x, ratio):
    import torch_pruning as tp
    n0, n_out = n_params(model), _outputs_of(model, x)
    with torch.no_grad(): ref = model.eval()(x)
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == n_out)
               or (isinstance(m, nn.Conv2d) and m.out_channels == n_out)]
    t0 = time.perf_counter()
    pr = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                              ignored_layers=ignored)
    pr.step()
    sec = time.perf_counter() - t0
    with torch.no_grad(): out = model.eval()(x)
    return dict(kept=n_params(model) / n0, seconds=sec, output_change=relative_error(ref, out))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=TORCHVISION + FASTAI)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--ratio', type=float, default=0.5)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--json', default=None)
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    logging.getLogger('fasterprune').setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    try:
        import torch_pruning as tp
        tp_version = tp.__version__ if hasattr(tp, '__version__') else '?'
    except ImportError: tp_version = None
    print(f"# torch {torch.__version__}, Torch-Pruning {tp_version}, {platform.machine()}, {a.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}, ratio {a.ratio} local, input 1x3x{a.size}x{a.size} (dynamic_unet: 64x64)")
    rows = []
    warm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))  # one-time costs (imports, first calls) out of the rows
    run_fp(copy.deepcopy(warm), torch.randn(1, 3, 8, 8), 0.5)
    if tp_version is not None: run_tp(warm, torch.randn(1, 3, 8, 8), 0.5)
    for name in a.models:
        size = 64 if name == 'dynamic_unet' else a.size
        x = torch.randn(1, 3, size, size)
        row = dict(model=name)
        try:
            torch.manual_seed(0)
            model = build(name).eval()
            _no_zero_layers(model)
            _calibrate_bn(model, x)
        except Exception as e:
            row['fp_error'] = row['tp_error'] = f"cannot build: {type(e).__name__}: {e}"[:200]
            rows.append(row)
            continue
        twin = copy.deepcopy(model)
        try: row.update({f'fp_{k}': v for k, v in run_fp(model, x, a.ratio).items()})
        except Exception as e: row['fp_error'] = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:200]
        if tp_version is not None:
            try: row.update({f'tp_{k}': v for k, v in run_tp(twin, x, a.ratio).items()})
            except Exception as e: row['tp_error'] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        rows.append(row)
        fp = (f"{row['fp_kept']:.3f} | {row['fp_seconds']:.2f} | {row['fp_seconds_unverified']:.2f} | {row['fp_rel_error']:.1e}"
              if 'fp_kept' in row else f"fails: {row['fp_error']} | | | ")
        tpr = (f"{row['tp_kept']:.3f} | {row['tp_seconds']:.2f} | {row['tp_output_change']:.2f}" if 'tp_kept' in row
               else f"fails: {row.get('tp_error', 'not installed')} | | ")
        if len(rows) == 1:
            print("| model | fasterprune kept | fp s | fp s unverified | fp verified rel. error | Torch-Pruning kept | TP s | TP output change |")
            print("|---|---|---|---|---|---|---|---|")
        print(f"| {name} | {fp} | {tpr} |", flush=True)
    if a.json:
        with open(a.json, 'w') as f: json.dump(rows, f, indent=1)

if __name__ == '__main__': main()
