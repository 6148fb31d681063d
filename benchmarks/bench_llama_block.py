"""Pruner.prune on Llama-style decoders with grouped-query attention: whole k/v groups and SwiGLU units removed.

    nice -n 10 .venv/bin/python benchmarks/bench_llama_block.py [--only small|large] [--runs 15]

Models (random weights, the test suite's `Llama` from tests/test_gqa.py: nn.RMSNorm, rotary embedding, GQA with
Llama's `repeat_kv`, SwiGLU, tied embedding / lm head):
  small: vocab 100, d=64, 2 layers, 8 heads / 2 k/v heads, SwiGLU 128, T=16
  large: vocab 1000, d=512, 8 layers, 8 heads / 2 k/v heads, SwiGLU 1408, T=128
Each model is pruned at ratio 0.3 and 0.5 (local: every group at the ratio; with 2 k/v groups both ratios remove one)
with `Pruner(model, tokens, heads={'layers.*.self_attn': AttentionHeads(num_kv_heads='num_kv_heads')})`.
Columns: params kept; theoretical speedup (fasterprune.metrics: Linear MACs, the attention products not counted);
FLOPs ratio counted by torch's FlopCounterMode (every op, the attention products included); measured CPU latency
ratio pruned / dense (interleaved runs, 1 thread, batch 1, median; below 1 = faster); the time of prune() (tracing,
scoring, surgery, verification) and the verified max relative error (pruned vs masked model on the example and a
perturbed copy, as the Pruner checks it).
"""
import argparse, copy, os, statistics, sys, time, warnings
import torch
from torch.utils.flop_counter import FlopCounterMode
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from test_gqa import Llama  # the model the tests verify
from fasterprune.graph import AttentionHeads
from fasterprune.pruner import Pruner
from fasterprune.metrics import theoretical_speedup, measured_speedup

warnings.filterwarnings('ignore')
HEADS = {'layers.*.self_attn': AttentionHeads(num_kv_heads='num_kv_heads')}
CONFIGS = dict(small=dict(vocab=100, d=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden=128, T=16),
               large=dict(vocab=1000, d=512, n_layers=8, n_heads=8, n_kv_heads=2, hidden=1408, T=128))


def flops(m, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad(): m(x)
    return fc.get_total_flops()


def run(name, ratio, runs):
    cfg = dict(CONFIGS[name])
    T = cfg.pop('T')
    torch.manual_seed(0)
    dense = Llama(**cfg, max_T=T).eval()
    tok = torch.randint(0, cfg['vocab'], (2, T), generator=torch.Generator().manual_seed(1))
    m = copy.deepcopy(dense)
    t0 = time.perf_counter()
    pr = Pruner(m, tok, heads=HEADS, keep_original=False)
    pr.prune(ratio)
    secs = time.perf_counter() - t0
    h = pr.history[-1]
    a, mlp = m.layers[0].self_attn, m.layers[0].mlp
    x1 = tok[:1]
    n0, n1 = (sum(p.numel() for p in k.parameters()) for k in (dense, m))
    return dict(model=name, ratio=ratio, heads=f"{a.num_heads}/{a.num_kv_heads}", swiglu=mlp.gate_proj.out_features,
                params_kept=n1 / n0, theo=theoretical_speedup(m, x1, dense), fc=flops(m, x1) / flops(dense, x1),
                lat=1 / measured_speedup(dense, m, x1, n_runs=runs, threads=1), prune_s=secs, surgery_s=h['seconds'],
                err=h['rel_error'])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--only', choices=list(CONFIGS))
    ap.add_argument('--runs', type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [run(n, r, args.runs) for n in ([args.only] if args.only else CONFIGS) for r in (0.3, 0.5)]
    print(f"{'model':6} {'ratio':>5} {'H/Hkv':>6} {'SwiGLU':>6} {'params':>7} {'theo x':>7} {'FLOPs':>6} "
          f"{'lat p/d':>7} {'prune s':>7} {'surg s':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['model']:6} {r['ratio']:5.1f} {r['heads']:>6} {r['swiglu']:6d} {r['params_kept']:7.3f} "
              f"{r['theo']:7.2f} {r['fc']:6.3f} {r['lat']:7.3f} {r['prune_s']:7.2f} {r['surgery_s']:6.2f} "
              f"{r['err']:8.1e}")


if __name__ == '__main__': main()
