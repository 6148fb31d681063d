"Callbacks the callback and workflow tests share: check the masks after every step, stop a fit early"
from fastai.callback.core import Callback, CancelFitException


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
