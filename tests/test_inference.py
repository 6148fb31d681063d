"The sparse inference export (`fasterprune.inference`): outputs, choices, state dicts and errors, as a user meets them."
import copy, io, math, warnings
import pytest
import torch
from torch import nn
import torch.nn.functional as F
import fastcore.test as fct
from fasterprune.inference import (to_sparse_inference, export_report, CSRLinear, CSRConv2d, SemiLinear,
                                   SparseMultiheadAttention, is_2_4, default_rtol)

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def _prune_(model, sparsity=0.9, seed=0):
    "Zero the smallest `sparsity` of |w| of every weight matrix (Linear weights and attention in_proj_weight)"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)  # distinct magnitudes
                k = int(p.numel() * sparsity)
                p[p.abs() <= p.abs().flatten().kthvalue(k).values] = 0
    return model


def _mlp(*sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def _kinds(exported): return {r['layer']: r['kernel'] for r in exported.sparse_export['rows']}


@pytest.fixture(scope='module')
def trained():
    "A digits MLP pruned to 90 % by SparsifyCallback in a short fit, and a validation batch"
    from fastai.learner import Learner
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import digits_dls
    torch.manual_seed(0)
    dls = digits_dls()
    learn = Learner(dls, _mlp(64, 256, 256, 10), loss_func=nn.CrossEntropyLoss())
    cb = SparsifyCallback(0.9, schedule='one_shot', show_sparsity=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2, cbs=cb)
    xb, _ = dls.valid.one_batch()
    return learn.model, xb


def test_callback_model_exports_equal(trained):
    model, xb = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    e = to_sparse_inference(model, xb, kernels='csr')
    fct.test_eq(_kinds(e), {'0': 'csr', '2': 'csr', '4': 'csr'})
    fct.test_eq(type(e[2]), CSRLinear)
    with torch.no_grad(): ref = model.eval()(xb)
    model.train(was_training)
    with torch.inference_mode(): out = e(xb)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    fct.test_eq(torch.equal(out.argmax(1), ref.argmax(1)), True)
    # the model passed in is untouched: same modules, same weights, same training flag
    fct.test_eq([type(m) for m in model], [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear])
    fct.test_eq(all(torch.equal(before[k], v) for k, v in model.state_dict().items()), True)
    fct.test_eq(model.training, was_training)
    fct.test_eq(e.sparse_export['error'] <= default_rtol(torch.float32), True)


def test_timing_decides_and_outputs_still_equal(trained):
    model, xb = trained
    e = to_sparse_inference(model, xb, n_runs=3)
    df = export_report(e)
    fct.test_eq(list(df.layer), ['0', '2', '4'])
    fct.test_eq(df.dense_ms.notna().all() and df.sparse_ms.notna().all(), True)  # every layer measured
    for r in df.itertuples():
        fct.test_eq(r.kernel == 'csr', r.speedup >= 1.05)  # sparse exactly where measured faster
        fct.test_eq(type(e[int(r.layer)]), CSRLinear if r.kernel == 'csr' else nn.Linear)
    with torch.no_grad(): torch.testing.assert_close(e(xb), model.eval()(xb), rtol=0, atol=1e-4)


def test_fallback_choices_are_deterministic():
    torch.manual_seed(0)
    model = _prune_(_mlp(32, 64, 64, 8), 0.9).eval()
    x = torch.randn(4, 32)
    never = to_sparse_inference(model, x, min_speedup=float('inf'), n_runs=2)  # no kernel can be infinitely faster
    fct.test_eq(set(_kinds(never).values()), {'dense'})
    fct.test_eq([type(m) for m in never], [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear])
    fct.test_eq(all('no sparse kernel >= inf' in r['reason'] for r in never.sparse_export['rows']), True)
    always = to_sparse_inference(model, x, min_speedup=0, n_runs=2)  # any measured kernel wins
    fct.test_eq(set(_kinds(always).values()), {'csr'})
    dense = to_sparse_inference(model, x, max_density=0.05, n_runs=2)  # 10 % nonzero: too dense to try, nothing timed
    fct.test_eq(set(_kinds(dense).values()), {'dense'})
    fct.test_eq(all('max_density' in r['reason'] for r in dense.sparse_export['rows']), True)
    mixed = to_sparse_inference(model, x, kernels={'0': 'csr', '[24]': 'dense'})
    fct.test_eq(_kinds(mixed), {'0': 'csr', '2': 'dense', '4': 'dense'})
    fct.test_eq([r['reason'] for r in mixed.sparse_export['rows']][1:], ['kernels= asks for dense'] * 2)
    with torch.no_grad():
        for e in (never, always, dense, mixed): torch.testing.assert_close(e(x), model(x), rtol=0, atol=1e-5)


def test_leading_dims_bias_free_and_chained_layout():
    torch.manual_seed(0)
    model = _prune_(nn.Sequential(nn.Linear(16, 32, bias=False), nn.GELU(), nn.Linear(32, 8)), 0.8).eval()
    x = torch.randn(3, 5, 16)
    e = to_sparse_inference(model, x, kernels='csr')
    with torch.no_grad():
        out = e(x)
        fct.test_eq(out.shape, (3, 5, 8))
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(e(x[0, 0]), model(x[0, 0]), rtol=0, atol=1e-5)  # a single sample, no batch dim
        y = e[0](x.reshape(-1, 16))  # 2-D: a transposed view the next CSR layer reads without a copy
        fct.test_eq(y.t().is_contiguous(), True)


def test_state_dict_round_trip_through_a_file(tmp_path):
    torch.manual_seed(0)
    model = _prune_(_mlp(32, 64, 64, 8), 0.9).eval()
    x = torch.randn(4, 32)
    e = to_sparse_inference(model, x, kernels={'0': 'csr', '2': 'csr'})
    fct.test_eq(list(e.state_dict()), list(model.state_dict()))  # the masked model's own keys, dense weights
    torch.save(e.state_dict(), tmp_path / 'export.pt')
    # a fresh export of another (differently pruned) model of the same architecture, then load
    other = _prune_(_mlp(32, 64, 64, 8), 0.5, seed=1).eval()
    fresh = to_sparse_inference(other, x, kernels={'0': 'csr', '2': 'csr'})
    fresh.load_state_dict(torch.load(tmp_path / 'export.pt'))
    with torch.no_grad(): torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-5)
    fct.test_eq(fresh[0].values.numel(), int(torch.count_nonzero(model[0].weight)))  # rebuilt from the loaded weights
    plain = _mlp(32, 64, 64, 8)
    plain.load_state_dict(torch.load(tmp_path / 'export.pt'))  # and the dense architecture reads it too
    fct.test_eq(all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values())), True)
    with pytest.raises(RuntimeError, match='size mismatch'): fresh.load_state_dict(_mlp(32, 48, 64, 8).state_dict())
    c = copy.deepcopy(e)  # deep copies work (CSR parts are plain buffers)
    with torch.no_grad(): torch.testing.assert_close(c(x), e(x))


def test_attention_projections_run_sparse():
    torch.manual_seed(0)
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(64, 4, batch_first=True), nn.Linear(64, 64)
        def forward(self, x): return self.fc(self.attn(x, x, x, need_weights=False)[0])
    model = _prune_(Block(), 0.9).eval()
    fct.test_close(float((model.attn.in_proj_weight == 0).float().mean()), 0.9, eps=1e-3)
    x = torch.randn(2, 7, 64)
    e = to_sparse_inference(model, x, kernels={'attn.[qv]_proj': 'csr', 'attn.out_proj': 'csr', 'fc': 'dense'})
    fct.test_eq(type(e.attn), SparseMultiheadAttention)
    fct.test_eq([type(getattr(e.attn, n)) for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj')],
                [CSRLinear, nn.Linear, CSRLinear, CSRLinear])
    with torch.no_grad(): torch.testing.assert_close(e(x), model(x), rtol=0, atol=1e-5)
    fct.test_eq(set(e.state_dict()), set(model.state_dict()))
    fresh = Block()
    fresh.load_state_dict(e.state_dict())
    with torch.no_grad(): torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=1e-6)


def test_transformer_encoder_layer_keeps_working():
    "nn.TransformerEncoderLayer's fused fast path would read the sparse weights: the export turns it off"
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0., batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    enc = _prune_(enc, 0.9).eval()
    x = torch.randn(2, 6, 32)
    e = to_sparse_inference(enc, x, kernels={'*linear1': 'csr'})  # only the feed-forward input layers
    fct.test_eq(type(e.layers[0].linear1), CSRLinear)
    fct.test_eq(type(e.layers[0].self_attn), SparseMultiheadAttention)
    kp = torch.zeros(2, 6, dtype=torch.bool)
    kp[1, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(e(x, src_key_padding_mask=kp), enc(x, src_key_padding_mask=kp), rtol=0, atol=1e-5)


def test_inference_only_errors(trained):
    model, xb = trained
    e = to_sparse_inference(model, xb, kernels='csr')
    e.train()
    with pytest.raises(RuntimeError, match=r'\.eval\(\)'): e(xb)
    e.eval()
    with pytest.raises(RuntimeError, match='no_grad'): e(xb.clone().requires_grad_())
    fct.test_eq(all(not p.requires_grad for p in e.parameters()), True)
    with torch.no_grad(): e(xb.clone().requires_grad_())  # fine without autograd


def test_bad_requests_are_refused_and_leave_the_model_alone():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.ConvTranspose2d(8, 8, 3), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    _prune_(cnn[4], 0.9)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match='depthwise'): to_sparse_inference(cnn, x, kernels={'1': 'csr'})
    with pytest.raises(ValueError, match='nn.Conv2d only'): to_sparse_inference(cnn, x, kernels={'2': 'csr'})
    with pytest.raises(ValueError, match='2:4 kernels are for Linear'):
        to_sparse_inference(cnn, x, kernels={'0': 'semi'})
    e = to_sparse_inference(cnn, x, kernels='csr')  # every layer that can: the plain conv and the Linear
    fct.test_eq([type(m) for m in e], [CSRConv2d, nn.Conv2d, nn.ConvTranspose2d, nn.Flatten, CSRLinear])
    reasons = {r['layer']: r['reason'] for r in e.sparse_export['rows']}
    fct.test_eq('groups=8' in reasons['1'] and 'Conv2d only' in reasons['2'], True)
    with pytest.raises(ValueError, match='not 2:4'): to_sparse_inference(cnn, x, kernels={'4': 'semi'})
    nm = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad(): nm[0].weight.copy_(torch.tensor([1., 2, 0, 0]).repeat(4, 2))
    fct.test_eq(is_2_4(nm[0].weight), True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA'): to_sparse_inference(nm, torch.randn(3, 8), kernels='semi')
    with pytest.raises(ValueError, match='unknown kernel'): to_sparse_inference(nm, torch.randn(3, 8), kernels='bsr')
    with pytest.raises(ValueError, match='matches no Linear'):
        to_sparse_inference(nm, torch.randn(3, 8), kernels={'fc*': 'csr'})
    with pytest.raises(TypeError, match='example_input'): to_sparse_inference(nm, None)
    fct.test_eq([type(m) for m in cnn], [nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d, nn.Flatten, nn.Linear])


def test_conv2d_as_csr_matches_and_round_trips(tmp_path):
    "A ResNet-style stack: strided, padded, dilated, 1x1 and bias-free convolutions through unfold + CSR"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, (3, 5), padding='same', dilation=2), nn.ReLU(), nn.Conv2d(16, 32, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    net = _prune_conv_(net, 0.9).eval()
    x = torch.randn(3, 3, 17, 15)
    e = to_sparse_inference(net, x, kernels={'[035]': 'csr'})
    fct.test_eq([type(e[i]) for i in (0, 3, 5)], [CSRConv2d] * 3)
    with torch.no_grad():
        torch.testing.assert_close(e(x), net(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(e(x[:1]), net(x[:1]), rtol=0, atol=1e-5)
    torch.save(e.state_dict(), tmp_path / 'cnn.pt')
    fresh = copy.deepcopy(net)
    fresh.load_state_dict(torch.load(tmp_path / 'cnn.pt'))  # dense 4-D weights under the conv's own keys
    fct.test_eq(all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values())), True)
    again = to_sparse_inference(_prune_conv_(copy.deepcopy(net), 0.5, seed=1), x, kernels={'[035]': 'csr'})
    again.load_state_dict(torch.load(tmp_path / 'cnn.pt'))
    with torch.no_grad(): torch.testing.assert_close(again(x), net(x), rtol=0, atol=1e-5)


def _prune_conv_(model, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                p = m.weight
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
                p[p.abs() <= p.abs().flatten().kthvalue(int(p.numel() * sparsity)).values] = 0
    return model


def test_wrong_export_is_refused():
    "A model whose forward depends on its layers' type computes something else once exported: caught, nothing returned"
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
        def forward(self, x): return self.fc(x) * (2. if type(self.fc) is nn.Linear else 1.)
    model = _prune_(Peeks(), 0.9)
    with pytest.raises(ValueError, match='differs from the masked model'):
        to_sparse_inference(model, torch.randn(2, 16), kernels='csr')
    fct.test_eq(type(model.fc), nn.Linear)


@cuda
def test_cuda_2_4_export_matches_and_reports():
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda().to(dtype).eval()
        with torch.no_grad():
            for m in (model[0], model[2]):
                g = m.weight.reshape(-1, 4)
                g.scatter_(1, g.abs().argsort(1)[:, :2], 0.)
        x = torch.randn(256, 512, device='cuda', dtype=dtype)
        e = to_sparse_inference(model, x, kernels='semi')
        fct.test_eq([type(m) for m in (e[0], e[2])], [SemiLinear, SemiLinear])
        with torch.no_grad():
            ref, out = model(x), e(x)
        fct.test_eq(float((out - ref).abs().max() / ref.abs().max()) <= default_rtol(dtype), True)
        fct.test_eq(torch.equal(e[0].dense_weight(), model[0].weight), True)
        fresh = to_sparse_inference(model, x, kernels='semi')
        fresh.load_state_dict(e.state_dict())
        with torch.no_grad(): torch.testing.assert_close(fresh(x), out)
        auto = to_sparse_inference(model, x, n_runs=3)  # timing decides; whatever it picks is still right
        with torch.no_grad(): err = float((auto(x) - ref).abs().max() / ref.abs().max())
        fct.test_eq(err <= default_rtol(dtype), True)
        with pytest.raises(RuntimeError, match='cannot be moved or cast'): e.float()
        unstructured = _prune_(nn.Sequential(nn.Linear(64, 64)), 0.9).cuda().to(dtype)
        with pytest.raises(ValueError, match='not 2:4'): to_sparse_inference(unstructured, x[:, :64], kernels='semi')


def test_metrics_report_the_sparse_export(monkeypatch):
    from fasterprune.metrics import speedup_summary, measured_speedup, theoretical_speedup
    torch.manual_seed(0)
    model = _prune_(_mlp(64, 512, 512, 10), 0.95).eval()
    x = torch.randn(32, 64)
    s = speedup_summary(model, x, n_runs=5)
    fct.test_eq(list(s.index), ['compression ratio', 'theoretical speedup', 'measured speedup, sparse export'])
    fct.test_close(s.loc['theoretical speedup', 'value'], theoretical_speedup(model, x), eps=1e-9)
    fct.test_eq(0 < s.loc['measured speedup, sparse export', 'value'] < math.inf, True)
    e = to_sparse_inference(model, x, kernels='csr')
    def export_again(*args, **kwargs): raise AssertionError("an export was exported again")
    monkeypatch.setattr('fasterprune.inference.to_sparse_inference', export_again)
    fct.test_eq(0 < measured_speedup(model, e, x, n_runs=3, sparse=True) < math.inf, True)  # an export is timed as is
    fct.test_eq(list(speedup_summary(model, x, exported=False, n_runs=3).index),
                ['compression ratio', 'theoretical speedup'])


@pytest.mark.parametrize('kind', ['linear', 'conv'])
def test_a_model_that_is_one_layer_exports_that_layer(kind):
    "The model itself a Linear or Conv2d: the export is the sparse layer (it was a dense copy with an idle child)"
    torch.manual_seed(0)
    m = nn.Linear(256, 128) if kind == 'linear' else nn.Conv2d(32, 64, 3)
    with torch.no_grad(): m.weight.mul_(torch.rand_like(m.weight) > 0.95)
    x = torch.randn(4, 256) if kind == 'linear' else torch.randn(2, 32, 12, 12)
    fast = to_sparse_inference(m, x, kernels='csr', n_runs=1)
    assert isinstance(fast, CSRLinear if kind == 'linear' else CSRConv2d), type(fast)
    fct.test_eq(list(dict(fast.named_children())), [])
    with torch.no_grad(): fct.test_close(fast(x), m(x), eps=1e-4)
    fct.test_eq(export_report(fast).kernel.tolist(), ['csr'])


def test_transformer_encoder_export_takes_a_key_padding_mask():
    "nn.TransformerEncoder's nested-tensor fast path would hand the sparse attention a nested tensor: it is turned off"
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2).eval()
    Sparsifier(enc, 'weight', 'local').sparsify(0.9)
    x = torch.randn(3, 10, 64)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[:, 7:] = True
    fast = to_sparse_inference(enc, x, kernels='csr', n_runs=1)
    with torch.no_grad(): ref, out = enc(x, src_key_padding_mask=pad), fast(x, src_key_padding_mask=pad)
    fct.test_close(out[:, :7], ref[:, :7], eps=1e-4)  # padded positions: zeros from the nested path, computed here


class _Tokens(nn.Module):
    "A token MLP that flattens its hidden tokens with `.view`, as many models do"
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(64, 128), nn.Linear(8 * 128, 3)
    def forward(self, x): return self.out(self.fc(x).view(x.shape[0], -1))


class _Net(nn.Module):
    "A classic small CNN that flattens with `x.view(x.size(0), -1)`"
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16 * 8 * 8, 10)
    def forward(self, x): return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))


@pytest.mark.parametrize('bs', [1, 4])
def test_exported_outputs_take_view_at_any_batch(bs):
    "Sparse outputs are row-major like nn.Linear's/Conv2d's: `.view` works, also on another batch than the export's"
    torch.manual_seed(0)
    for model, x, kernels in ((_Tokens(), torch.randn(bs, 8, 64), {'fc': 'csr'}),
                              (_Net(), torch.randn(bs, 3, 8, 8), {'conv': 'csr'})):
        model = _prune_(model, 0.9).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 4: p.mul_(torch.rand_like(p) > 0.9)
        e = to_sparse_inference(model, x, kernels=kernels, n_runs=1)  # failed at batch 4 (`.view` of a transposed view)
        x4 = torch.cat([x] * (4 // bs))  # exported on batch 1, run on batch 4
        with torch.no_grad(): torch.testing.assert_close(e(x4), model(x4), rtol=0, atol=1e-5)
        layer = e.fc if isinstance(model, _Tokens) else e.conv
        with torch.no_grad(): fct.test_eq(layer(x4).is_contiguous(), True)


def test_export_refuses_a_kernel_returning_a_transposed_view(monkeypatch):
    "Exporting on a batch of 1 hides a transposed output from `is_contiguous()`: the export checks the strides"
    torch.manual_seed(0)
    model = _prune_(nn.Sequential(nn.Linear(64, 128)), 0.9).eval()
    def transposed(self, x): return torch.sparse.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()
    monkeypatch.setattr(CSRLinear, '_mm', transposed)  # the old kernel: `(W @ x.T + b).T`, a view
    with pytest.raises(RuntimeError, match='not row-major'):  # the export passed, then a batch of 4 failed `.view`
        to_sparse_inference(model, torch.randn(1, 64), kernels='csr', n_runs=1)


def test_only_a_chain_of_kernels_passes_transposed_views():
    "Inside an nn.Sequential a kernel feeding another (through an activation) skips the copy; the last one does not"
    torch.manual_seed(0)
    model = _prune_(_mlp(32, 64, 64, 8), 0.9).eval()
    x = torch.randn(5, 32)
    e = to_sparse_inference(model, x, kernels='csr', n_runs=1)
    fct.test_eq([m.contiguous_out for m in (e[0], e[2], e[4])], [False, False, True])
    with torch.no_grad():
        fct.test_eq(e[0](x).is_contiguous(), False)
        out = e(x)
    fct.test_eq(out.stride(), (8, 1))
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)
    fct.test_eq(copy.deepcopy(e)[0].contiguous_out, False)


def test_layers_called_by_keyword_export():
    "`self.fc(input=x)` works on nn.Linear/Conv2d: it works on the export, and its input is recorded for timing"
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.a, self.b = nn.Conv2d(2, 4, 3), nn.Linear(4 * 6 * 6, 64), nn.Linear(64, 2)
        def forward(self, x): return self.b(input=self.a(input=self.c(input=x).flatten(1)))
    torch.manual_seed(0)
    model = _prune_(Two(), 0.8).eval()
    x = torch.randn(3, 2, 8, 8)
    e = to_sparse_inference(model, x, kernels='csr', n_runs=1)  # IndexError in the input-recording hook
    fct.test_eq(_kinds(e), {'a': 'csr', 'b': 'csr', 'c': 'csr'})
    with torch.no_grad(): torch.testing.assert_close(e(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('kernels', ['csr', {'head': 'csr', 'enc.*': 'dense'}])  # (timing would depend on the box)
def test_transformer_encoder_export_with_the_padding_mask_in_the_example_input(kernels):
    "The mask in the example input: the masked model's nested-tensor path is off while the export records and checks"
    from fasterprune.sparsifier import Sparsifier
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0., batch_first=True), 1)
            self.head = nn.Linear(64, 3)
        def forward(self, x, pad): return self.head(self.enc(x, src_key_padding_mask=pad))
    torch.manual_seed(0)
    model = Enc().eval()
    Sparsifier(model, 'weight', 'local').sparsify(0.9)
    x, pad = torch.randn(4, 10, 64), torch.zeros(4, 10, dtype=torch.bool)
    pad[1:, 6:] = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    e = to_sparse_inference(model, (x, pad), kernels=kernels, n_runs=1)  # failed: a nested tensor reached `reshape`
    fct.test_eq(torch.backends.mha.get_fastpath_enabled(), True)  # restored
    fct.test_eq(model.enc.use_nested_tensor, True)  # the model passed in is untouched
    fct.test_eq(all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), True)
    fct.test_eq(type(e.head), CSRLinear)
    fct.test_eq(type(e.enc.layers[0].linear1), CSRLinear if kernels == 'csr' else nn.Linear)
    with torch.no_grad(): ref, out = model(x, pad), e(x, pad)
    torch.testing.assert_close(out[~pad], ref[~pad], rtol=0, atol=1e-4)  # padded positions: zeros on the nested path


def test_a_nested_tensor_input_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with pytest.raises(ValueError, match='nested tensor'): to_sparse_inference(model, x, kernels='csr', n_runs=1)
