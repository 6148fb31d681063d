"Sixth session, trial W8 (a PyTorch 2 user: compile, export, quantize, deploy): each finding as the user hit it"
import copy, pickle, warnings
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fasterprune.sparsifier import Sparsifier
from fasterprune.metrics import count_flops, sparsity_report, theoretical_speedup, compression_ratio
from fasterprune.inference import to_sparse_inference, CSRLinear
from fasterprune.pruner import Pruner, PrunedMultiheadAttention, save_pruned, load_pruned


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


# 1. FLOP counts and the sparse export recorded through hooks, which a compiled model that already ran skips
def test_metrics_of_a_compiled_model_that_already_ran_equal_the_eager_ones():
    net = _mlp()
    Sparsifier(net, 'weight', 'global').sparsify(0.9)
    x = torch.randn(8, 64)
    ref = count_flops(net, x)
    c = torch.compile(net, backend='eager')
    with torch.no_grad(): c(x)  # as learn.model is after a fit
    fct.test_eq(count_flops(c, x), ref)
    fct.test_eq(theoretical_speedup(c, x), theoretical_speedup(net, x))
    r = sparsity_report(c, x)
    fct.test_eq(list(r.layer[:3]), ['0', '2', '4'])  # the layers' own names, not `_orig_mod.0`
    fct.test_eq(int(r.flops.iloc[-1]), ref[0])
    inplace = _mlp()
    inplace.compile(backend='eager')
    with torch.no_grad(): inplace(x)
    fct.test_eq(count_flops(inplace, x)[0], ref[0])


def test_sparse_export_of_a_compiled_model_is_the_export_of_the_module_inside():
    net = _mlp()
    Sparsifier(net, 'weight', 'local').sparsify(0.95)
    x = torch.randn(16, 64)
    c = torch.compile(net, backend='eager')
    with torch.no_grad(): c(x)
    e = to_sparse_inference(c, x, kernels={'0': 'csr', '2': 'csr'}, n_runs=1)
    fct.test_eq([type(m).__name__ for m in e][:3], ['CSRLinear', 'ReLU', 'CSRLinear'])
    fct.test_eq([r['layer'] for r in e.sparse_export['rows']], ['0', '2', '4'])
    with torch.no_grad(): fct.test_close(e(x), net(x), eps=1e-4)


# 2. + 3. nn.TransformerEncoder and nn.MultiheadAttention after a head surgery: padded batches, unbatched inputs
class _Enc(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 5)
    def forward(self, x, mask=None): return self.head(self.enc(x, src_key_padding_mask=mask).mean(1))


def test_pruned_transformer_encoder_takes_padded_batches_in_inference():
    "The encoder used to pack padded batches into nested tensors, which the pruned attention cannot read"
    x = torch.randn(4, 10, 32)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 7:] = True
    m = _Enc().eval()
    masked = copy.deepcopy(m)
    Pruner(m, x, strict=False).prune(0.5)
    assert isinstance(m.enc.layers[0].self_attn, PrunedMultiheadAttention)
    assert not m.enc.use_nested_tensor
    with torch.no_grad(): y = m(x, mask)  # no_grad: where the nested fast path was taken
    fct.test_eq(y.shape, (4, 5))
    m2 = _Enc().eval()  # the padded batch as the example: verified (both run without the nested fast path)
    Pruner(m2, (x, mask), strict=False).prune(0.5)
    fct.test_eq(m2.enc.layers[0].self_attn.num_heads, 2)
    fct.test_eq(m2.enc.use_nested_tensor, False)


def test_pruned_encoder_recipe_keeps_nested_tensors_off(tmp_path):
    x = torch.randn(2, 6, 32)
    m = _Enc().eval()
    Pruner(m, x, strict=False).prune(0.5)
    save_pruned(m, tmp_path / 'enc.pt')
    fresh = load_pruned(_Enc().eval(), tmp_path / 'enc.pt')
    assert not fresh.enc.use_nested_tensor
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    with torch.no_grad(): fct.test_close(fresh(x, mask), m(x, mask), eps=1e-6)


@pytest.mark.parametrize('batch_first', [False, True])
def test_pruned_attention_takes_unbatched_inputs(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(7, 32)
    class M(nn.Module):
        def __init__(self): super().__init__(); self.a = mha
        def forward(self, x): return self.a(x, x, x, need_weights=False)[0]
    m = M()
    Pruner(m, (x.unsqueeze(0 if batch_first else 1),), strict=False).prune(0.5)
    a = m.a
    assert isinstance(a, PrunedMultiheadAttention)
    kp = torch.zeros(7, dtype=torch.bool)
    kp[5:] = True
    with torch.no_grad():
        for need in (False, True):
            out, w = a(x, x, x, key_padding_mask=kp, need_weights=need)
            bx = x.unsqueeze(0 if batch_first else 1)
            ref, rw = a(bx, bx, bx, key_padding_mask=kp.unsqueeze(0), need_weights=need)
            fct.test_eq(out.shape, (7, 32))
            fct.test_close(out, ref.squeeze(0 if batch_first else 1), eps=1e-6)
            if need: fct.test_close(w, rw.squeeze(0), eps=1e-6)


# 4. load_pruned given fastai's learn.save checkpoint
def test_load_pruned_of_a_learn_save_file_says_what_the_file_is(tmp_path):
    from fastai.learner import Learner
    from fastai.optimizer import Adam
    from fasterprune.data import digits_dls, mlp
    torch.manual_seed(0)
    learn = Learner(digits_dls(), mlp(64, 32, 10), loss_func=nn.CrossEntropyLoss(), opt_func=Adam, path=tmp_path)
    learn.create_opt()
    learn.save('ckpt')
    with pytest.raises(ValueError, match='learn.save') as e:
        load_pruned(mlp(64, 32, 10), tmp_path / 'models' / 'ckpt.pth')
    assert 'save_pruned' in str(e.value) and 'not a file written by torch.save' not in str(e.value)


# 5. + 6. the CPU sparse export: jit.trace at batch 1, autocast, half precision
def test_traced_csr_conv_export_runs_other_batch_sizes():
    net = _cnn()
    Sparsifier(net, 'weight', 'local').sparsify(0.9)
    x1 = torch.randn(1, 3, 16, 16)
    e = to_sparse_inference(net, x1, kernels={'0': 'csr', '2': 'csr'}, n_runs=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        t = torch.jit.trace(e, x1)
    with torch.no_grad():
        for x in (torch.randn(4, 3, 16, 16), torch.randn(1, 3, 24, 24)):
            fct.test_close(t(x), net(x), eps=1e-4)


def test_csr_export_under_autocast_and_after_half():
    net = _mlp()
    Sparsifier(net, 'weight', 'local').sparsify(0.95)
    x = torch.randn(8, 64)
    e = to_sparse_inference(net, x, kernels={'0': 'csr', '2': 'csr'}, n_runs=1)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        y, ref = e(x), net(x)
    fct.test_close(y.float(), ref.float(), eps=0.1)  # the masked model ran in bfloat16
    e.half()
    with pytest.raises(TypeError, match='float32 or float64'), torch.inference_mode(): e(x.half())


# 8. save_pruned of a sparse export
def test_save_pruned_refuses_a_sparse_export_and_writes_nothing(tmp_path):
    net = _cnn()
    Sparsifier(net, 'weight', 'local').sparsify(0.9)
    e = to_sparse_inference(net, torch.randn(2, 3, 16, 16), kernels={'0': 'csr'}, n_runs=1)
    with pytest.raises(ValueError, match='to_sparse_inference'): save_pruned(e, tmp_path / 'e.pt')
    assert not (tmp_path / 'e.pt').exists()


# 10. quantized models: every entry point says why nothing can be pruned, and what to do
def test_quantized_models_are_refused_with_the_way_out():
    q = torch.ao.quantization.quantize_dynamic(_mlp(), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(4, 64)
    for f in (lambda: Sparsifier(q), lambda: compression_ratio(q), lambda: count_flops(q, x),
              lambda: to_sparse_inference(q, x), lambda: Pruner(q, x).prune(0.5)):
        with pytest.raises(Exception, match='prune the float model first'): f()


# 11. a channels_last model stays channels_last through a surgery
def test_surgery_keeps_channels_last_weights():
    net = _cnn().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    Pruner(net, x).prune(0.5)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    fct.test_eq(convs[0].out_channels, 8)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
