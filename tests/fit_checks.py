"What the callback, engine and workflow tests share: check the masks after every step, stop a fit early, count host reads"
import contextlib
import torch
from fastai.callback.core import Callback, CancelFitException
from fasterprune.sparsifier import force_device_path


class CheckZeros(Callback):
    "After every optimizer step (after SparsifyCallback's), the masked weights must be exactly zero"
    order, run_valid = 41, False
    def __init__(self, sp_cb): self.sp_cb, self.checked = sp_cb, 0
    def after_step(self):
        sp = self.sp_cb.sparsifier
        if sp is None: return  # a frozen or validation-only pass before the callback set itself up
        for n, mk in sp.masks.items():
            assert (sp.layers[n].weight[~mk] == 0).all(), f"{n}: nonzero masked weights at iteration {self.train_iter}"
        self.checked += bool(sp.masks)


class CancelAt(Callback):
    "Stop the fit after `n` training batches (an interrupted fit, or EarlyStopping)"
    order = 90
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.train_iter >= self.n: raise CancelFitException()


@contextlib.contextmanager
def device_path():
    force_device_path(True)
    try: yield
    finally: force_device_path(False)


_SYNCS = ('item', '__int__', '__bool__', '__float__', '__index__', 'tolist', 'cpu', 'numpy', 'nonzero')


@contextlib.contextmanager
def count_syncs():
    "Count the calls that would make a CUDA device wait for the host (reading values, copies to the host, data sizes)"
    counts = {}
    orig = {n: getattr(torch.Tensor, n) for n in _SYNCS}
    def wrap(n, f):
        def g(*a, **kw):
            counts[n] = counts.get(n, 0) + 1
            return f(*a, **kw)
        return g
    orig_nz = torch.nonzero
    try:
        for n, f in orig.items(): setattr(torch.Tensor, n, wrap(n, f))
        torch.nonzero = wrap('torch.nonzero', orig_nz)
        yield counts
    finally:
        for n, f in orig.items(): setattr(torch.Tensor, n, f)
        torch.nonzero = orig_nz


class Rolled(torch.nn.Module):
    "Channels moved round by torch.roll: an op the channel graph does not know (a 1-channel 8x8 image, 10 classes)"
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(torch.roll(h, 1, dims=1))).mean((2, 3)))


class LogitsOf(torch.nn.Module):
    "A Hugging Face model in a fastai Learner: fastai passes the dict batch whole, the model takes it as keywords"
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
    def forward(self, batch): return self.lm(**batch).logits
