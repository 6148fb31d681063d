"""Filter surgery on CPU: surgery time and measured vs theoretical speedup, random weights, 50 % of channels.

Usage: .venv/bin/python benchmarks/bench_surgery.py [--models resnet18 resnet50 mobilenet_v2] [--ratio 0.5]
       [--size 224] [--threads 1] [--runs1 30] [--runs16 7] [--round-to 8] [--no-fuse]

Surgery time is the whole `Pruner(model, x).prune(ratio)` call: fx trace, a structure run on meta tensors, scoring,
zeroing, a labelled run of the zeroed model, surgery and the verification (the masked model on a second input, the
pruned model on both), on a 1×3×size×size example. Speedups are medians of interleaved runs
(`fasterprune.metrics.measured_speedup`); theoretical speedup is dense Conv/Linear MACs before / after. The
'(conv+bn fused)' rows time both models after folding BatchNorm into the convs (eval-mode inference, as deployed):
BatchNorm and ReLU cost scales with activations (x0.5 here), not with MACs (x0.25), so they cap the unfused ratio.
"""
import argparse, copy, logging, os, platform, time, warnings
import torch, torchvision
from fasterprune.pruner import Pruner
from torch.fx.experimental.optimization import fuse
from fasterprune.metrics import count_flops, count_params, measured_speedup

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=['resnet18', 'resnet50', 'mobilenet_v2'])
    ap.add_argument('--ratio', type=float, default=0.5)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--threads', type=int, default=1, help='CPU threads for surgery and timing')
    ap.add_argument('--runs1', type=int, default=30, help='timed passes per model at batch 1')
    ap.add_argument('--runs16', type=int, default=7, help='timed passes per model at batch 16')
    ap.add_argument('--round-to', type=int, default=None, help='round kept channels to a multiple')
    ap.add_argument('--fuse', action=argparse.BooleanOptionalAction, default=True,
                    help='also time both models with BatchNorm folded into the convs (torch.fx fuse), as deployed')
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    logging.getLogger('fasterprune').setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{a.threads} thread(s), load average {os.getloadavg()[0]:.1f}, ratio {a.ratio}, round_to {a.round_to}, input {a.size}x{a.size}")
    rows = []
    for name in a.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        orig = copy.deepcopy(model)
        x1 = torch.randn(1, 3, a.size, a.size)
        t0 = time.perf_counter()
        pr = Pruner(model, x1, keep_original=False)
        pr.prune(a.ratio, round_to=a.round_to)
        t_surg = time.perf_counter() - t0
        err = pr.history[-1]['rel_error']
        p0, p1 = count_params(orig)[0], count_params(model)[0]
        f0, f1 = count_flops(orig, x1)[0], count_flops(model, x1)[0]
        theo = f0 / f1
        x16 = torch.randn(16, 3, a.size, a.size)
        pairs = [('', orig, model)]
        if a.fuse: pairs.append((' (conv+bn fused)', fuse(copy.deepcopy(orig)), fuse(copy.deepcopy(model))))
        for tag, o, m in pairs:
            s1 = measured_speedup(o, m, x1, n_warmup=3, n_runs=a.runs1, threads=a.threads)
            s16 = measured_speedup(o, m, x16, n_warmup=1, n_runs=a.runs16, threads=a.threads)
            rows.append((name + tag, t_surg, err, p0 / 1e6, p1 / 1e6, f0 / 1e9, f1 / 1e9, theo, s1, s1 / theo, s16, s16 / theo))
    hdr = ('model', 'surgery_s', 'rel_err', 'params_M', 'pruned_M', 'GMACs', 'pruned_GMACs', 'theor_x', 'meas_x_bs1', 'ratio_bs1', 'meas_x_bs16', 'ratio_bs16')
    print('| ' + ' | '.join(hdr) + ' |')
    print('|' + '---|' * len(hdr))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.1e} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} | {r[10]:.2f} | {r[11]:.2f} |")

if __name__ == '__main__': main()
