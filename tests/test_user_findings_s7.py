"What the seventh session found by measuring: each test fails on the code before its fix"
import os, subprocess, sys


def test_a_fit_with_the_callback_does_not_import_dynamo():
    "The final report's eager_compiled() imported torch._dynamo (1.5 s on a CPU) for models nothing had compiled"
    code = """
import sys, warnings, torch, torch.nn as nn
warnings.filterwarnings('ignore')
from fastai.learner import Learner
import fastai.callback.progress
from fasterprune.callback import SparsifyCallback
from fasterprune.data import digits_dls, lenet_300_100
learn = Learner(digits_dls(), lenet_300_100(), loss_func=nn.CrossEntropyLoss())
cb = SparsifyCallback(0.5, schedule='one_shot')
with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
assert cb.report is not None
print('torch._dynamo' in sys.modules)
"""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(p or '.' for p in sys.path)}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == 'False', out.stdout
