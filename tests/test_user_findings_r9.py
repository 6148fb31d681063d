"Sixth session, review R9 of this session's fixes: the sparse export and the pruned attention (the coordinator's part)"
import logging
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from torch.nn.utils import prune as tprune
from fasterprune.sparsifier import Sparsifier
from fasterprune.inference import to_sparse_inference, CSRConv2d
from fasterprune.pruner import Pruner, PrunedMultiheadAttention


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def test_weight_computing_hooks_are_not_carried_to_the_export():
    "R9 #2: torch.nn.utils.prune's (and weight_norm's) pre-hook copied onto the CSR kernel broke the export"
    net = _mlp()
    tprune.l1_unstructured(net[2], 'weight', 0.95)  # its forward pre-hook computes weight = weight_orig * weight_mask
    seen = []
    net[2].register_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    x = torch.randn(8, 16)
    e = to_sparse_inference(net, x, kernels={'2': 'csr'}, n_runs=1)
    fct.test_eq(type(e[2]).__name__, 'CSRLinear')
    fct.test_eq(len(e[2]._forward_pre_hooks), 0)  # the pruning hook stays behind
    seen.clear()
    with torch.no_grad(): fct.test_close(e(x), net(x), eps=1e-5)
    fct.test_eq(seen, ['CSRLinear', 'Linear'])  # the user's capture hook came along (the export's call, then ours)


def test_unbatched_calls_run_hooks_once():
    "R9 #5: an unbatched call re-entered the module through __call__: its hooks ran twice (a changing hook: applied twice)"
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).eval()
    Sparsifier(nn.Sequential(conv), 'weight', 'local').sparsify(0.8)
    k = CSRConv2d(conv).eval()
    mha = nn.MultiheadAttention(32, 4).eval()
    class M(nn.Module):
        def __init__(self): super().__init__(); self.a = mha
        def forward(self, x): return self.a(x, x, x, need_weights=False)[0]
    m = M()
    Pruner(m, (torch.randn(5, 2, 32),), strict=False).prune(0.5)
    assert isinstance(m.a, PrunedMultiheadAttention)
    for mod, x in ((k, torch.randn(3, 6, 6)), (m.a, torch.randn(5, 32))):
        calls = []
        mod.register_forward_hook(lambda mo, a, out: calls.append(1))
        with torch.no_grad(): mod(x) if mod is k else mod(x, x, x, need_weights=False)
        fct.test_eq(len(calls), 1)


def test_csr_conv_under_autocast_and_after_half():
    "R9 #7: CSRConv2d had not got CSRLinear's autocast and half-precision handling"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    Sparsifier(net, 'weight', 'local').sparsify(0.9)
    x = torch.randn(2, 3, 8, 8)
    e = to_sparse_inference(net, x, kernels='csr', n_runs=1)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16): y = e(x)
    with torch.inference_mode(): fct.test_close(y.float(), net(x), eps=0.05)
    e.half()
    with pytest.raises(TypeError, match='float32 or float64'), torch.inference_mode(): e(x.half())


def test_pruning_an_encoder_says_padded_positions_are_now_computed(caplog):
    "R9 #6: turning the nested fast path off changes the outputs at padded positions: the Pruner says so"
    torch.manual_seed(0)
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1)
        def forward(self, x): return self.enc(x)
    m = Enc().eval()
    with caplog.at_level(logging.WARNING, logger='fasterprune'):
        Pruner(m, torch.randn(2, 6, 32), strict=False).prune(0.5)
    assert not m.enc.use_nested_tensor
    assert any('padded positions' in r.getMessage() and 'enc' in r.getMessage() for r in caplog.records)
