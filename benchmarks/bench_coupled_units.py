"""Training-time filter masks and surgery agree (issue 10): params kept after
`Sparsifier(model, 'filter', context, attention=True).couple(x).sparsify(0.5)` + `Pruner(model, x).compact()`, against
`Pruner(twin, x).prune(0.5)` on a copy of the same model, in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_coupled_units.py [models...] [--context global]

regnet_y_400mf (grouped convs: whole units), vit_b_16 and swin_t (attention heads) by default; random weights,
224x224, batch-norm statistics calibrated as in bench_zoo.py. Every compact is verified by the Pruner.
"""
import argparse, copy, sys, time, logging, warnings
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from bench_zoo import build, n_params, _calibrate_bn, _no_zero_layers
from fasterprune.sparsifier import Sparsifier
from fasterprune.pruner import Pruner


def run(name, context='local', ratio=0.5):
    x = torch.randn(1, 3, 224, 224)
    torch.manual_seed(0)
    model = build(name).eval()
    _no_zero_layers(model)
    _calibrate_bn(model, x)
    twin, n0 = copy.deepcopy(model), n_params(model)
    t0 = time.perf_counter()
    sp = Sparsifier(model, 'filter', context, attention=True).couple(x).sparsify(ratio)
    masked = sp.sparsity()
    pr = Pruner(model, x, keep_original=False)
    pr.compact()
    t1 = time.perf_counter()
    Pruner(twin, x, keep_original=False).prune(ratio, context=context)
    return dict(model=name, masked_sparsity=masked, kept_compact=n_params(model) / n0, kept_prune=n_params(twin) / n0,
                rel_error=pr.history[-1]['rel_error'], seconds=t1 - t0)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('models', nargs='*', default=['regnet_y_400mf', 'vit_b_16', 'swin_t'])
    ap.add_argument('--context', default='local')
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    logging.getLogger('fasterprune').setLevel(logging.ERROR)
    print(f"{'model':<16}{'masked':>8}{'kept: sparsify+compact':>24}{'kept: Pruner.prune':>20}{'rel. error':>12}")
    for m in a.models:
        r = run(m, a.context)
        print(f"{m:<16}{r['masked_sparsity']:>8.3f}{r['kept_compact']:>24.3f}{r['kept_prune']:>20.3f}"
              f"{r['rel_error']:>12.1e}", flush=True)
