"Sixth session, review R8 of the sparse inference export: each finding as the user hits it, and the mutants it named"
import math, pytest, torch, torch.nn as nn
import fastcore.test as fct
from fasterprune.sparsifier import Sparsifier
from fasterprune.inference import to_sparse_inference, CSRConv2d, SparseMultiheadAttention, _check_output


def _export(net, x, **kw):
    return to_sparse_inference(net, x, n_runs=1, **kw)


def _sparse(net, s=0.9):
    Sparsifier(net, 'weight', 'local').sparsify(s)
    return net.eval()


def test_an_encoder_layer_that_is_the_whole_model_exports_and_runs():
    "R8 #1: the fused fast path stayed on when the TransformerEncoderLayer was the model itself ('' prefix)"
    torch.manual_seed(0)
    net = _sparse(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 0.9)
    x = torch.randn(2, 5, 32)
    e = _export(net, x, kernels={'linear1': 'csr', 'linear2': 'csr', 'self_attn.*': 'dense'})
    assert isinstance(e.self_attn, SparseMultiheadAttention)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            fct.test_close(e(x), net(x), eps=1e-5)


def test_hooks_of_replaced_layers_carry_over_to_the_export():
    "R8 #2: forward hooks and pre-hooks on the masked model's layers fire on the export's kernels too"
    torch.manual_seed(0)
    net = _sparse(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), 0.95)
    seen = []
    net[2].register_forward_hook(lambda m, a, out: seen.append(('fwd', type(m).__name__, out.shape)))
    net[2].register_forward_pre_hook(lambda m, a: seen.append(('pre', type(m).__name__, a[0].shape)))
    x = torch.randn(3, 16)
    e = _export(net, x, kernels={'0': 'csr', '2': 'csr'})
    seen.clear()
    with torch.no_grad(): e(x)
    fct.test_eq(seen, [('pre', 'CSRLinear', (3, 64)), ('fwd', 'CSRLinear', (3, 64))])
    assert e[0].contiguous_out  # its output reaches a hooked kernel: no transposed view


class _Indexed(nn.Module):
    "A parent that calls the children of its Sequential itself: the Sequential's forward never runs"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    def forward(self, x): return self.body[2](self.body[1](self.body[0](x))).view(x.shape[0], 2, 4)


@pytest.mark.parametrize('n', [1, 4])
def test_chain_views_only_where_the_sequential_runs_its_children(n):
    "R8 #3: exported at batch 1 it used to fail at batch 4 (a transposed view reached `.view`)"
    torch.manual_seed(0)
    net = _sparse(_Indexed(), 0.95)
    e = _export(net, torch.randn(n, 16), kernels={'body.0': 'csr', 'body.2': 'csr'})
    assert e.body[0].contiguous_out
    with torch.no_grad():
        for b in (1, 4):
            x = torch.randn(b, 16)
            fct.test_close(e(x), net(x), eps=1e-5)
    seq = _sparse(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)), 0.95)  # the chain still applies
    assert not _export(seq, torch.randn(n, 16), kernels='csr')[0].contiguous_out


def test_a_layers_own_name_wins_over_patterns_and_conflicting_patterns_are_refused():
    "R8 #5: the first matching pattern won, so {'*': 'csr', '4': 'dense'} ignored '4'"
    torch.manual_seed(0)
    net = _sparse(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), 0.95)
    x = torch.randn(4, 16)
    for k in ({'*': 'csr', '4': 'dense'}, {'4': 'dense', '*': 'csr'}):
        fct.test_eq({r['layer']: r['kernel'] for r in _export(net, x, kernels=k).sparse_export['rows']},
                    {'0': 'csr', '2': 'csr', '4': 'dense'})
    with pytest.raises(ValueError, match='different kernels'): _export(net, x, kernels={'*': 'csr', '[24]': 'dense'})


def test_semi_for_every_layer_leaves_convolutions_dense_with_the_reason():
    "R8 #10: timing picked CSR for a conv under kernels='semi', and {'*': 'semi'} told the user to prune it 2:4"
    torch.manual_seed(0)
    net = _sparse(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), 0.9)
    for k in ('semi', {'*': 'semi'}):
        rows = _export(net, torch.randn(1, 3, 8, 8), kernels=k).sparse_export['rows']
        fct.test_eq([(r['layer'], r['kernel']) for r in rows], [('0', 'dense')])
        assert "for Linear layers" in rows[0]['reason']


def test_unbatched_csr_conv_and_sparse_attention_match_the_dense_modules():
    "R8 mutants 0 and 4: unbatched inputs (no batch dim in, none out; the key padding mask of one sequence)"
    torch.manual_seed(0)
    conv = _sparse(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), 0.8)[0]
    k = CSRConv2d(conv).eval()
    x = torch.randn(3, 6, 6)
    with torch.no_grad():
        fct.test_eq(k(x).shape, (8, 6, 6))
        fct.test_close(k(x), conv(x), eps=1e-5)
    mha = nn.MultiheadAttention(16, 4).eval()
    s = SparseMultiheadAttention(mha).eval()
    q = torch.randn(5, 16)
    kp = torch.tensor([False, False, False, True, True])
    with torch.no_grad():
        ref, _ = mha(q, q, q, key_padding_mask=kp, need_weights=False)
        out, _ = s(q, q, q, key_padding_mask=kp, need_weights=False)
    fct.test_close(out, ref, eps=1e-5)


def test_an_export_whose_output_is_nan_is_refused():
    "R8 mutant 9: `err > tol` would accept NaN; the check is `not err <= tol`"
    ref, out = torch.ones(3), torch.tensor([1., math.nan, 1.])
    with pytest.raises(ValueError, match='differs'): _check_output(ref, out, None)
