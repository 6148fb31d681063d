"""Global magnitude mask at scale: torchvision vit_l_16 (random weights, ~227 M prunable weights),
Sparsifier(model, 'weight', 'global').sparsify(0.9): wall time, exact count, peak extra memory.

    .venv/bin/python benchmarks/bench_global_mask.py [--repeats 3]

Peak extra memory = max RSS during sparsify (sampled every 0.5 ms by a thread) minus the RSS before it, after
malloc_trim so that freed heap left over from building the model is not counted as free room. The masks the
Sparsifier keeps are 1 byte per prunable weight, and are included. As a reference the same run times
torch.kthvalue over a concatenation of all |w| (which alone needs 4 bytes per weight more).
"""
import argparse, ctypes, gc, statistics, threading, time, warnings
import psutil, torch, torchvision
from fasterprune.sparsifier import Sparsifier

warnings.filterwarnings('ignore')


def trim():
    gc.collect()
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError: pass


class PeakRSS:
    def __init__(self): self.proc, self.peak, self.stop = psutil.Process(), 0, False
    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss); time.sleep(0.0005)
    def __enter__(self):
        self.base = self.proc.memory_info().rss; self.peak = self.base
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start(); return self
    def __exit__(self, *a):
        self.stop = True; self.t.join(); self.peak = max(self.peak, self.proc.memory_info().rss)


def main():
    p = argparse.ArgumentParser(); p.add_argument('--repeats', type=int, default=3); p.add_argument('--sparsity', type=float, default=0.9)
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for r in range(a.repeats):
        model = torchvision.models.vit_l_16()
        model.requires_grad_(False)
        sp = Sparsifier(model, 'weight', 'global', 'magnitude')
        n = sum(m.weight.numel() for m in sp.layers.values())
        trim()
        with PeakRSS() as mem:
            t = time.perf_counter(); sp.sparsify(a.sparsity); dt = time.perf_counter() - t
        pruned = sum(int((~mk).sum()) for mk in sp.masks.values())
        zeros = sum(int((m.weight == 0).sum()) for m in sp.layers.values())
        assert pruned == round(a.sparsity * n) == zeros, (pruned, zeros, round(a.sparsity * n))
        extra = (mem.peak - mem.base) / n
        rows.append((dt, extra))
        print(f"run {r}: {len(sp.layers)} layers, {n:,} prunable weights, pruned {pruned:,} (= round({a.sparsity}*n)), "
              f"{dt:.3f} s, peak extra {extra:.3f} bytes/weight")
        del sp, model; trim()
    # reference: kthvalue over all magnitudes (one run)
    model = torchvision.models.vit_l_16(); model.requires_grad_(False)
    ws = [m.weight for m in Sparsifier(model).layers.values()]
    t = time.perf_counter()
    allw = torch.cat([w.detach().abs().flatten() for w in ws]); kth = torch.kthvalue(allw, round(a.sparsity * allw.numel())).values
    dk = time.perf_counter() - t
    print(f"\n{'':<34}{'median s':>10}{'bytes/weight':>14}")
    print(f"{'Sparsifier global sparsify(0.9)':<34}{statistics.median(r[0] for r in rows):>10.3f}{statistics.median(r[1] for r in rows):>14.3f}")
    print(f"{'reference: cat + torch.kthvalue':<34}{dk:>10.3f}{'>= 4':>14}")


if __name__ == '__main__': main()
