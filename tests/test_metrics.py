"Closed-form and reference checks of `fasterprune.metrics`: parameter and FLOP (MAC) counts, ratios, report, latency."
import math
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
import fastcore.test as fct
from fasterprune.metrics import (count_params, layer_flops, count_flops, compression_ratio, theoretical_speedup,
                                 sparsity_report, measure_latency, measured_speedup, check_original)


def _reference_macs(model, x):
    "FlopCounterMode's total (2 FLOPs per multiply-add) halved"
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    total = fc.get_total_flops()
    assert total % 2 == 0
    return total // 2


def _uniform_mask_(model, keep_every:int):
    "Zero all but every `keep_every`-th weight of each Conv/Linear layer (exactly 1/keep_every density when divisible)"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
                assert m.weight.numel() % keep_every == 0
                flat = m.weight.view(-1)
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[::keep_every] = True
                flat.mul_(keep)


# --- closed form ------------------------------------------------------------------------------------------------------

def test_mlp_by_hand():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    fct.test_eq(count_params(mlp), (10 * 20 + 20 + 20 * 5 + 5,) * 2)
    fct.test_eq(layer_flops(mlp, torch.randn(1, 10)), {'0': (200, 200), '2': (100, 100)})
    with torch.no_grad():
        mlp[0].weight[:, :5] = 0.    # 100 of layer 0's weights
        mlp[2].weight[0] = 0.        # 20 of layer 2's weights
        mlp[2].bias[0] = 0.          # a zero bias counts as a zero parameter
    fct.test_eq(count_params(mlp), (325, 325 - 121))
    fct.test_eq(compression_ratio(mlp), 325 / 204)
    fct.test_eq(layer_flops(mlp, torch.randn(3, 10)), {'0': (600, 300), '2': (300, 240)})
    fct.test_eq(theoretical_speedup(mlp, torch.randn(3, 10)), 300 / 180)
    fct.test_eq(count_flops(mlp, torch.randn(4, 6, 10)), (24 * 300, 24 * 180))  # leading dims all count


def test_small_cnn_by_hand():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 8x8x8 out: 512 * 27
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),         # 16x4x4 out: 256 * 72
                        nn.Conv2d(16, 16, 3, padding=1, groups=16),                   # depthwise: 256 * 9
                        nn.Flatten(), nn.Linear(256, 10))                             # 2560
    fl = layer_flops(cnn, torch.randn(1, 3, 8, 8))
    fct.test_eq({n: f for n, (f, _) in fl.items()}, {'0': 512 * 27, '3': 256 * 72, '5': 256 * 9, '7': 2560})
    fct.test_eq(count_flops(cnn, torch.randn(1, 3, 8, 8))[0], _reference_macs(cnn, torch.randn(1, 3, 8, 8)))
    fct.test_eq(count_params(cnn)[0], 8 * 27 + 8 + 16 + 16 * 72 + 16 + 16 * 9 + 16 + 2560 + 10)


def test_uniform_masks_give_one_over_density():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                        nn.Linear(8 * 3 * 3, 8))
    x = torch.randn(2, 4, 8, 8)
    _uniform_mask_(cnn, 4)
    fct.test_eq(theoretical_speedup(cnn, x), 4.)                  # exactly
    assert compression_ratio(cnn) < 4                            # the biases are kept
    nobias = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                           nn.Linear(8 * 64, 8, bias=False))
    _uniform_mask_(nobias, 4)
    fct.test_eq(compression_ratio(nobias), 4.)
    fct.test_eq(theoretical_speedup(nobias, x[:1]), 4.)


def test_where_the_zeros_are_changes_the_speedup():
    "Same number of zeros: in the early conv (many uses per weight) vs in the Linear (one use per weight)"
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.Flatten(),
                             nn.Linear(8 * 8 * 8, 1, bias=False))
    x = torch.randn(1, 1, 8, 8)
    early, late = make(), make()
    with torch.no_grad():
        early[0].weight.view(-1)[:36] = 0.   # half the conv's 72 weights, each used 64 times
        late[2].weight.view(-1)[:36] = 0.    # 36 of the Linear's 512 weights, each used once
    fct.test_eq(compression_ratio(early), compression_ratio(late))
    fct.test_eq(theoretical_speedup(early, x), (72 * 64 + 512) / (36 * 64 + 512))
    fct.test_eq(theoretical_speedup(late, x), (72 * 64 + 512) / (72 * 64 + 476))


def test_report_totals_are_the_headline_numbers():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():
        cnn[0].weight[:4] = 0.
        cnn[4].weight[:, ::3] = 0.
    x = torch.randn(1, 1, 8, 8)
    df = sparsity_report(cnn, (x,))  # a fastai-style tuple of inputs
    fct.test_eq(list(df.layer), ['0', '4', '(other parameters)', 'total'])
    fct.test_eq(df.loc[2, 'params'], 8 + 8 + 8 + 10)  # conv bias, BN weight and bias, linear bias
    tot = df.iloc[-1]
    fct.test_close(tot.params / tot.nonzero, compression_ratio(cnn))
    fct.test_close(tot.flops / tot.nonzero_flops, theoretical_speedup(cnn, x))
    fct.test_close(df.attrs['theoretical_speedup'], theoretical_speedup(cnn, x))
    fct.test_close(df.loc[0, 'sparsity'], 0.5)
    fct.test_close(df.params_share[:-1].sum(), 1.)
    fct.test_close(df.flops_share[:-1].sum(), 1.)


# --- convolutions against a direct count ------------------------------------------------------------------------------

def _out_len(n, k, s, p, d): return (n + 2 * p - d * (k - 1) - 1) // s + 1

CONVS = [  # (dims, c_in, c_out, kernel, stride, padding, dilation, groups, input spatial)
    (1, 4, 6, 5, 2, 1, 1, 1, (33,)),
    (1, 6, 6, 3, 1, 2, 2, 6, (20,)),           # depthwise, dilated
    (2, 8, 16, 3, 2, 1, 1, 1, (15, 17)),       # strided, odd sizes
    (2, 8, 8, 3, 1, 1, 1, 8, (12, 12)),        # depthwise
    (2, 8, 12, 3, 1, 2, 2, 4, (11, 9)),        # grouped, dilated
    (2, 6, 4, (1, 5), (2, 1), (0, 2), 1, 2, (10, 7)),  # rectangular kernel, per-dim stride/padding
    (3, 4, 8, 3, 2, 1, 1, 2, (6, 7, 5)),
]

@pytest.mark.parametrize('dims,c_in,c_out,k,s,p,d,g,size', CONVS)
def test_conv_flops_direct(dims, c_in, c_out, k, s, p, d, g, size):
    conv = getattr(nn, f'Conv{dims}d')(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g)
    tup = lambda v: v if isinstance(v, tuple) else (v,) * dims
    x = torch.randn(2, c_in, *size)
    out = [_out_len(n, kk, ss, pp, dd) for n, kk, ss, pp, dd in zip(size, tup(k), tup(s), tup(p), tup(d))]
    direct = 2 * math.prod(out) * c_out * (c_in // g) * math.prod(tup(k))
    fct.test_eq(count_flops(conv, x), (direct, direct))
    fct.test_eq(direct, _reference_macs(conv, x))
    if dims == 2:  # positions as unfold (im2col) sees them
        L = F.unfold(x, tup(k), dilation=d, padding=p, stride=s).shape[-1]
        fct.test_eq(direct, 2 * L * c_out * (c_in // g) * math.prod(tup(k)))
    with torch.no_grad(): conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    nz = int(torch.count_nonzero(conv.weight))
    fct.test_eq(count_flops(conv, x), (direct, direct // conv.weight.numel() * nz))


@pytest.mark.parametrize('dims,groups,stride', [(1, 1, 2), (2, 1, 2), (2, 4, 1), (3, 2, 2)])
def test_conv_transpose_flops(dims, groups, stride):
    conv = getattr(nn, f'ConvTranspose{dims}d')(8, 4, 3, stride=stride, padding=1, output_padding=stride - 1,
                                                groups=groups)
    size = (5, 6, 4)[:dims]
    x = torch.randn(1, 8, *size)
    direct = math.prod(size) * 8 * (4 // groups) * 3 ** dims   # every input element meets C_out/groups kernels
    fct.test_eq(count_flops(conv, x)[0], direct)
    fct.test_eq(direct, _reference_macs(conv, x))


# --- torchvision models against FlopCounterMode -----------------------------------------------------------------------

@pytest.mark.parametrize('name,size', [('resnet18', 224), ('resnet50', 224), ('mobilenet_v3_small', 224),
                                       ('regnet_y_400mf', 64), ('shufflenet_v2_x0_5', 96)])
def test_torchvision_against_flop_counter(name, size):
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)()
    x = torch.randn(1, 3, size, size)
    dense, nz = count_flops(m, x)
    fct.test_eq(dense, _reference_macs(m, x))
    assert 0.999 * dense < nz <= dense  # random init: (almost) no exact zeros
    if name == 'resnet50': assert 4.0e9 < dense < 4.2e9  # ~4.1 G multiply-adds = ~8.2 G FLOPs


# --- original= (physically smaller models) --------------------------------------------------------------------------

def _net(c):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

def test_original_smaller_model():
    big, small, x = _net(16), _net(8), torch.randn(1, 3, 8, 8)
    check_original(small, big)
    fct.test_eq(compression_ratio(small, original=big), count_params(big)[0] / count_params(small)[0])
    fct.test_eq(theoretical_speedup(small, x, original=big), count_flops(big, x)[0] / count_flops(small, x)[0])
    fct.test_eq(theoretical_speedup(big, x, original=big), 1.)


def test_original_of_another_family():
    import torchvision
    x = torch.randn(1, 3, 8, 8)
    fct.test_fail(lambda: compression_ratio(_net(16), original=_net(8)), contains='can only be smaller')
    resnet, linear = torchvision.models.resnet18(), nn.Sequential(nn.Linear(3, 8))
    fct.test_fail(lambda: theoretical_speedup(_net(8), x, original=resnet), contains='only in original')
    fct.test_fail(lambda: compression_ratio(_net(8), original=linear), contains='only in the model')


# --- bad input --------------------------------------------------------------------------------------------------------

def test_bad_input():
    nothing = 'no Conv/ConvTranspose/Linear'
    fct.test_fail(lambda: compression_ratio(nn.Sequential(nn.ReLU(), nn.LayerNorm(4))), contains=nothing)
    fct.test_fail(lambda: sparsity_report(nn.Sequential(nn.ReLU()), torch.randn(1, 4)), contains=nothing)
    net = _net(8)
    fct.test_fail(lambda: theoretical_speedup(net, torch.randn(1, 1, 8, 8)), contains='shape (1, 1, 8, 8)')
    fct.test_fail(lambda: sparsity_report(net, torch.randn(3, 8)), contains='shape (3, 8)')
    fct.test_fail(lambda: measured_speedup(net, net, torch.randn(2, 2), n_warmup=0, n_runs=1),
                  contains='shape (2, 2)')
    fct.test_fail(lambda: count_flops(net, None), contains='example_input is required')
    fct.test_fail(lambda: compression_ratio('resnet'), contains='torch.nn.Module')
    fct.test_fail(lambda: measure_latency(net, torch.randn(1, 3, 8, 8), threads=0), contains='threads')
    with pytest.raises(ValueError) as e:
        theoretical_speedup(net, torch.randn(1, 1, 8, 8))
    assert isinstance(e.value.__cause__, RuntimeError)  # the original error stays attached


# --- latency ----------------------------------------------------------------------------------------------------------

def test_latency_restores_state():
    net, x = _net(8), torch.randn(1, 3, 8, 8)
    net.train()
    net[0].eval()
    n0 = torch.get_num_threads()
    t = measure_latency(net, x, n_warmup=1, n_runs=3, threads=1)
    assert 0 < t < 1
    fct.test_eq(torch.get_num_threads(), n0)
    fct.test_eq([m.training for m in net], [False, True, True, True, True, True])
    r = measured_speedup(net, net, x, n_warmup=1, n_runs=5)
    assert 0.2 < r < 5
    fct.test_eq(torch.get_num_threads(), n0)


def test_physically_smaller_is_faster():
    big, small, x = _net(128), _net(16), torch.randn(1, 3, 32, 32)
    assert measured_speedup(big, small, x, n_warmup=2, n_runs=7) > 1.5


def test_attention_projections_count_their_macs():
    "MultiheadAttention calls its projections functionally: their MACs come from the tokens q, k and v bring"
    from fasterprune.metrics import layer_flops
    E = 16
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, 4, batch_first=True)
        def forward(self, q, kv): return self.mha(q, kv, kv)[0]
    m = Cross()
    q, kv = torch.randn(2, 5, E), torch.randn(2, 7, E)  # 10 query tokens, 14 key/value tokens
    fl = layer_flops(m, (q, kv))
    fct.test_eq(fl['mha.in_proj_weight'], (E * E * (10 + 14 + 14),) * 2)
    fct.test_eq(fl['mha.out_proj'], (E * E * 10,) * 2)
    with torch.no_grad(): m.mha.in_proj_weight[2 * E:2 * E + 4] = 0  # 4 value rows
    fct.test_eq(layer_flops(m, (q, kv))['mha.in_proj_weight'], (E * E * 38, E * E * 38 - 4 * E * 14))


def test_dict_input_to_a_forward_taking_one_dict_hints_the_tuple():
    class DictIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
        def forward(self, batch): return self.fc(batch['x'])
    m, batch = DictIn(), {'x': torch.randn(1, 4)}
    fct.test_fail(lambda: count_flops(m, batch), contains='pass `(batch,)`')
    fct.test_eq(count_flops(m, (batch,)), (8, 8))


def test_head_pruned_attention_counts_each_projection_once():
    "After Pruner removes heads, out_proj runs as a module: counted once; q/k/v rows follow the heads left"
    from fasterprune.pruner import Pruner
    torch.manual_seed(0)
    E = 32
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.fc = nn.Linear(8, E), nn.MultiheadAttention(E, 4, batch_first=True), nn.Linear(E, 10)
        def forward(self, x, kv):
            h = self.inp(x)
            return self.fc(h + self.attn(h, self.inp(kv), self.inp(kv))[0])
    m = Block()
    x, kv = torch.randn(1, 5, 8), torch.randn(1, 7, 8)  # cross-attention: 5 query tokens, 7 key/value tokens
    Pruner(m, (x, kv)).prune({'attn*': 0.5})
    Ep = m.attn.num_heads * m.attn.head_dim
    fct.test_eq(Ep, 16)
    fl = layer_flops(m, (x, kv))
    fct.test_eq(fl['attn.in_proj_weight'][0], Ep * E * (5 + 7 + 7))
    fct.test_eq(fl['attn.out_proj'][0], Ep * E * 5)
    fct.test_eq(fl['inp'][0], 8 * E * (5 + 7 + 7))
    fct.test_eq(theoretical_speedup(m, (x, kv), original=m), 1.)


def test_report_rows_count_each_parameter_once():
    "A shared weight is counted in its first row only; a weight_norm layer's v in its row: the rows add up to the total"
    from torch.nn.utils.parametrizations import weight_norm
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a = nn.Embedding(10, 4), weight_norm(nn.Linear(4, 4))
            self.dec, self.dec2 = nn.Linear(4, 10, bias=False), nn.Linear(4, 10, bias=False)
            self.dec2.weight = self.dec.weight
        def forward(self, i): h = self.a(self.emb(i)); return self.dec(h) + self.dec2(h)
    torch.manual_seed(0)
    m = LM()
    with torch.no_grad(): m.dec.weight[:5] = 0
    df = sparsity_report(m, torch.tensor([[1, 2, 3]]))
    rows, tot = df.iloc[:-1], df.iloc[-1]
    fct.test_eq(rows.params.sum(), tot.params)
    fct.test_eq(rows.nonzero.sum(), tot.nonzero)
    fct.test_close(rows.params_share.sum(), 1.)
    d2 = df.set_index('layer').loc['dec2']
    fct.test_eq((d2.params, d2.nonzero, d2.sparsity, d2.flops), (0, 0, 0.5, 120))
    fct.test_eq(df.set_index('layer').loc['a'].params, 16)  # v; g (4) and the biases are other parameters
    fct.test_eq(df.set_index('layer').loc['(other parameters)'].params, 40 + 4 + 4)
    plain = sparsity_report(m)  # no input (Sparsifier.report()): the same rows, FLOPs NaN
    fct.test_eq(plain.drop(columns=['flops', 'nonzero_flops', 'flops_share']).equals(
        df.drop(columns=['flops', 'nonzero_flops', 'flops_share'])), True)
    assert plain[['flops', 'nonzero_flops', 'flops_share']].isna().all().all()


def test_padded_transformer_counts_tokens_without_padding():
    "A batch-first TransformerEncoder with a padding mask runs on nested tensors: its layers count the real tokens"
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.), 1)
    class M(nn.Module):
        def __init__(self): super().__init__(); self.enc, self.head = enc, nn.Linear(8, 3)
        def forward(self, x, pad): return self.head(self.enc(x, src_key_padding_mask=pad))
    x, pad = torch.randn(2, 6, 8), torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True  # 6 + 4 real tokens
    fl = layer_flops(M(), (x, pad))
    fct.test_eq(fl['head'][0], 8 * 3 * 12)  # the encoder's output is padded again
    fct.test_eq(fl['enc.layers.0.linear1'][0], 8 * 16 * 10)
    fct.test_eq(fl['enc.layers.0.self_attn.in_proj_weight'][0], 3 * 8 * 8 * 10)
