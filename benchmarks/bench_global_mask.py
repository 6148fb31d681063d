"""Global magnitude mask at scale: torchvision vit_l_16 (random weights, ~227 M prunable weights),
Sparsifier(model, 'weight', 'global').sparsify(0.9): wall time, exact count, peak extra memory.

    .venv/bin/python benchmarks/bench_global_mask.py [--repeats 3] [--baseline GIT_REV]

With --baseline, the Sparsifier of that git revision (e.g. 7f0ad71, before the radix engine) is timed in the same run,
runs alternating, and the ratio of the medians is printed: on a busy machine the ratio is the figure to trust.

Peak extra memory = max RSS during sparsify (sampled every 0.5 ms by a thread) minus the RSS before it, after
malloc_trim so that freed heap left over from building the model is not counted as free room. The masks the
Sparsifier keeps are 1 byte per prunable weight, and are included. As a reference the same run times
torch.kthvalue over a concatenation of all |w| (which alone needs 4 bytes per weight more).
"""
import argparse, ctypes, gc, statistics, threading, time, warnings
import importlib, os, subprocess, sys, tempfile
import psutil, torch, torchvision
from fasterprune.sparsifier import Sparsifier

warnings.filterwarnings('ignore')


def trim():
    gc.collect()
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError: pass


class PeakRSS:
    "Peak resident memory inside the `with` block, sampled every 0.5 ms by a thread"
    def __init__(self): self.proc, self.peak, self.stop = psutil.Process(), 0, False

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.0005)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def baseline_sparsifier(rev):
    "The Sparsifier class of git revision `rev`, imported from a temporary copy of its package"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tempfile.mkdtemp()
    pkg = os.path.join(d, 'fp_baseline')
    os.makedirs(pkg)
    for f in ('__init__.py', 'core.py', 'criteria.py', 'granularity.py', 'sparsifier.py'):
        got = subprocess.run(['git', '-C', root, 'show', f'{rev}:fasterprune/{f}'], capture_output=True, text=True)
        if got.returncode and f == 'core.py': continue  # revisions before fasterprune/core.py existed
        got.check_returncode()
        with open(os.path.join(pkg, f), 'w') as fh: fh.write(got.stdout.replace('fasterprune.', 'fp_baseline.'))
    sys.path.insert(0, d)
    return importlib.import_module('fp_baseline.sparsifier').Sparsifier


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('--baseline', help='git revision whose Sparsifier is timed in the same run')
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows, base_rows = [], []
    engines = [('this', Sparsifier)] + ([(a.baseline, baseline_sparsifier(a.baseline))] if a.baseline else [])
    for r, (tag, cls) in ((r, e) for r in range(a.repeats) for e in engines):
        model = torchvision.models.vit_l_16()
        model.requires_grad_(False)
        sp = cls(model, 'weight', 'global', 'magnitude')
        n = sum(m.weight.numel() for m in sp.layers.values())
        trim()
        with PeakRSS() as mem:
            t, c = time.perf_counter(), time.process_time()
            sp.sparsify(a.sparsity)
            dt, dc = time.perf_counter() - t, time.process_time() - c
        pruned = sum(int((~mk).sum()) for mk in sp.masks.values())
        zeros = sum(int((m.weight == 0).sum()) for m in sp.layers.values())
        assert pruned == round(a.sparsity * n) == zeros, (pruned, zeros, round(a.sparsity * n))
        extra = (mem.peak - mem.base) / n
        (rows if tag == 'this' else base_rows).append((dt, extra, dc))
        print(f"run {r} [{tag}]: {len(sp.layers)} layers, {n:,} prunable weights, "
              f"pruned {pruned:,} (= round({a.sparsity}*n)), "
              f"{dt:.3f} s ({dc:.3f} s CPU), peak extra {extra:.3f} bytes/weight")
        del sp, model
        trim()
    # reference: kthvalue over all magnitudes (one run)
    model = torchvision.models.vit_l_16()
    model.requires_grad_(False)
    ws = [m.weight for m in Sparsifier(model).layers.values()]
    t = time.perf_counter()
    allw = torch.cat([w.detach().abs().flatten() for w in ws])
    kth = torch.kthvalue(allw, round(a.sparsity * allw.numel())).values
    dk = time.perf_counter() - t
    print(f"\n{'':<34}{'median s':>10}{'bytes/weight':>14}")
    def med(rs, i): return statistics.median(r[i] for r in rs)
    print(f"{'Sparsifier global sparsify(0.9)':<34}{med(rows, 0):>10.3f}{med(rows, 1):>14.3f}")
    if base_rows:
        mb = statistics.median(r[0] for r in base_rows)
        print(f"{'baseline ' + a.baseline:<34}{mb:>10.3f}{statistics.median(r[1] for r in base_rows):>14.3f}")
        print(f"{'ratio this / baseline':<34}{statistics.median(r[0] for r in rows) / mb:>10.3f}")
        print(f"{'ratio of CPU seconds':<34}{med(rows, 2) / med(base_rows, 2):>10.3f}")
    print(f"{'reference: cat + torch.kthvalue':<34}{dk:>10.3f}{'>= 4':>14}")


if __name__ == '__main__': main()
