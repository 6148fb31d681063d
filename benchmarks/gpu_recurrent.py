"""Recurrent masks on the device: an LSTM (cuDNN on CUDA keeps its parameters as views of one flat buffer) and
fastai's AWD_LSTM fit with SparsifyCallback; after every optimizer step the masked gate weights must be zero and the
LSTM's parameters must still be the same tensors at the same addresses (masked in place, never replaced).

    DEV=cuda .venv/bin/python benchmarks/gpu_recurrent.py     # on the GPU machine
    DEV=cpu  .venv/bin/python benchmarks/gpu_recurrent.py     # the same checks here, tiny
Prints one line per check and exits non-zero on a failure.
"""
import os, sys, warnings
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fasterprune.callback import SparsifyCallback
from fasterprune.data import TensorPairs
from fasterprune.schedules import agp

warnings.filterwarnings('ignore')
DEV = torch.device(os.environ.get('DEV', 'cuda' if torch.cuda.is_available() else 'cpu'))


class TextRNN(nn.Module):
    def __init__(self, hid=64):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.rnn = nn.LSTM(32, hid, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hid, 10)
    def forward(self, x): return self.fc(self.rnn(self.emb(x))[0][:, -1])


class Check(Callback):
    "After SparsifyCallback's after_step: masked weights zero, the LSTM's parameters the same tensors and addresses"
    order, run_valid = 41, False
    def __init__(self, cb, rnn=None): self.cb, self.rnn, self.steps, self.ptrs = cb, rnn, 0, None
    def before_fit(self):
        if self.rnn is not None: self.ptrs = [(id(p), p.data_ptr()) for p in self.rnn._flat_weights]
    def after_step(self):
        sp = self.cb.sparsifier
        if sp is None or not sp.masks: return
        for n, mk in sp.masks.items():
            assert int((sp.layers[n].weight[~mk] != 0).sum()) == 0, f"{n}: masked weights nonzero at step {self.steps}"
        if self.rnn is not None:
            assert [(id(p), p.data_ptr()) for p in self.rnn._flat_weights] == self.ptrs, "LSTM parameters replaced"
        self.steps += 1


def learner(model, loss, vocab=100):
    torch.manual_seed(0)
    x, y = torch.randint(2, vocab, (256, 16)), torch.randint(0, 10, (256,))
    dls = DataLoaders(DataLoader(TensorPairs(x, y), bs=32, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(x[:64], y[:64]), bs=64), device=DEV)
    return Learner(dls, model, loss_func=loss)


def check_lstm():
    learn = learner(TextRNN(), nn.CrossEntropyLoss())
    learn.model.to(DEV)
    cb = SparsifyCallback(0.8, 'weight', 'local', 'gradient_magnitude', schedule=agp(0, 0.6))
    chk = Check(cb, learn.model.rnn)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=[cb, chk])
    rnn = [n for n in cb.sparsifier.layers if n.startswith('rnn.')]
    assert len(rnn) == 8 and chk.steps > 0, (rnn, chk.steps)
    print(f"LSTM ({DEV}, cudnn={torch.backends.cudnn.enabled and DEV.type == 'cuda'}): {chk.steps} steps checked, "
          f"sparsity {cb.sparsifier.sparsity():.4f}, {len(rnn)} gate weights masked in place")


def check_awd():
    from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_config
    from fastai.text.models.core import get_text_classifier
    torch.manual_seed(0)
    cfg = dict(awd_lstm_clas_config, emb_sz=32, n_hid=64, n_layers=2)
    model = get_text_classifier(AWD_LSTM, 100, 10, seq_len=16, config=cfg, max_len=64).to(DEV)
    learn = learner(model, lambda out, y: F.cross_entropy(out[0], y))
    cb = SparsifyCallback(0.8, 'weight', 'global', schedule=agp(0, 0.6))
    chk = Check(cb)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=[cb, chk])
    raw = [n for n in cb.sparsifier.layers if n.endswith('_raw')]
    assert len(raw) == 2 and chk.steps > 0
    learn.model.eval()
    learn.model(torch.randint(2, 100, (2, 16), device=DEV))
    for i, wd in enumerate(model[0].module.rnns):
        mk = cb.sparsifier.masks[f'0.module.rnns.{i}.weight_hh_l0_raw']
        assert int((wd.module.weight_hh_l0[~mk] != 0).sum()) == 0, "the LSTM ran on unmasked raw weights"
    print(f"AWD_LSTM ({DEV}): {chk.steps} steps checked, sparsity {cb.sparsifier.sparsity():.4f}, raw weights masked "
          "and used by the forward")


if __name__ == '__main__':
    ok = True
    for f in (check_lstm, check_awd):
        try: f()
        except AssertionError as e:
            ok = False
            print(f"FAIL {f.__name__}: {e}")
    sys.exit(0 if ok else 1)
