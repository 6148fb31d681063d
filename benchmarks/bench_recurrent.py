"""Recurrent layers pruned like Linear layers: fastai's AWD_LSTM text classifier (tiny, random weights, random
numericalized tokens) fit dense and with SparsifyCallback(0.9, 'weight', 'global', 'magnitude', agp), interleaved,
median of N pairs, on one thread.

    nice -n 10 .venv/bin/python benchmarks/bench_recurrent.py [--pairs 5]

Prints: the share of the model's parameters the masks zero (the LSTM's gate weights, WeightDropout's raw ones
included), the theoretical speedup from `fasterprune.metrics` (Linear + gate-weight MACs on one sequence), and the
per-step overhead of the callback: (sparse fit - dense fit) / steps, and the ratio sparse / dense wall time, with the
time spent inside the callback's events as a share of the dense fit (its own cost, without pair-to-pair noise).
"""
import argparse, statistics, time, warnings
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.learner import Learner
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_config
from fastai.text.models.core import get_text_classifier
from fasterprune.data import TensorPairs
from bench_overhead import TimedSparsify  # SparsifyCallback adding up the wall time of its events
from fasterprune.metrics import theoretical_speedup, count_params
from fasterprune.schedules import agp

warnings.filterwarnings('ignore')
VOCAB, SEQ, BS, N, EPOCHS = 2000, 48, 32, 640, 2  # 20 steps an epoch


def make_learner(seed=0):
    torch.manual_seed(seed)
    cfg = dict(awd_lstm_clas_config, emb_sz=64, n_hid=256, n_layers=2)
    model = get_text_classifier(AWD_LSTM, VOCAB, 5, seq_len=SEQ, config=cfg, max_len=SEQ * 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(2, VOCAB, (N + 64, SEQ), generator=g), torch.randint(0, 5, (N + 64,), generator=g)
    dls = DataLoaders(DataLoader(TensorPairs(x[:N], y[:N]), bs=BS, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(x[N:], y[N:]), bs=64), device=torch.device('cpu'))
    return Learner(dls, model, loss_func=lambda out, yb: F.cross_entropy(out[0], yb))


def timed_fit(sparse):
    learn = make_learner()
    cb = TimedSparsify(0.9, 'weight', 'global', 'magnitude', schedule=agp(0, 0.5)) if sparse else None
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(EPOCHS, 1e-3, cbs=cb)
    return time.perf_counter() - t, learn, cb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--pairs', type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps = EPOCHS * (N // BS)
    timed_fit(False)  # warm-up
    dense, sparse, own = [], [], []
    for i in range(a.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for s in order:
            t, learn, cb = timed_fit(s)
            (sparse if s else dense).append(t)
            if s: own.append(cb.self_s)
    sp = cb.sparsifier
    rnn = [n for n in sp.layers if 'rnns' in n]
    P, NZ = count_params(learn.model)
    pruned_w = sum(m.weight.numel() for m in sp.layers.values())
    zeros = pruned_w - sum(int((m.weight != 0).sum()) for m in sp.layers.values())
    learn.model.eval()
    x1 = learn.dls.valid.one_batch()[0][:1]
    print(f"AWD_LSTM classifier: vocab {VOCAB}, emb 64, 2 LSTM layers of 256, seq {SEQ}, bs {BS}, {steps} steps; "
          f"{len(sp.layers)} pruned tensors ({len(rnn)} recurrent: {', '.join(rnn)})")
    print(f"{'':38}{'value':>12}")
    print(f"{'params (all)':38}{P:>12,}")
    print(f"{'weights in the pruned layers':38}{pruned_w:>12,}  ({pruned_w / P:.1%} of the params)")
    print(f"{'zeros in them (target 0.9)':38}{zeros:>12,}  ({zeros / pruned_w:.4f})")
    print(f"{'share of all params pruned':38}{zeros / P:>12.3f}")
    print(f"{'compression ratio':38}{P / NZ:>12.2f}")
    print(f"{'theoretical speedup (metrics)':38}{theoretical_speedup(learn.model, x1):>12.2f}")
    md, ms = statistics.median(dense), statistics.median(sparse)
    print(f"{'dense fit, median s':38}{md:>12.3f}")
    print(f"{'sparse fit, median s':38}{ms:>12.3f}")
    print(f"{'sparse / dense (median of pair ratios)':38}"
          f"{statistics.median(s / d for s, d in zip(sparse, dense)):>12.3f}")
    print(f"{'per-step overhead, ms':38}{1e3 * (ms - md) / steps:>12.2f}")
    print(f"{'callback events / dense fit':38}{statistics.median(own) / md:>12.3f}")


if __name__ == '__main__': main()
