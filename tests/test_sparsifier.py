"Masks: exact counts for every granularity x context, ties, bad input leaves the model untouched"
import math, copy
import torch, torch.nn as nn
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
import fastcore.test as fct
from fasterprune.sparsifier import Sparsifier, select_prune, prunable_layers
from fasterprune import sparsifier as S
from fasterprune.granularity import get_granularity


def _model(seed, kind):
    "A small model whose weights hold no exact zero (a random init can draw 0.0, which would count as pruned)"
    torch.manual_seed(seed)
    if kind == 'mlp': m = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))
    elif kind == 'cnn':
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, (3, 2)), nn.Flatten(),
                          nn.Linear(12 * 4 * 5, 4))
    elif kind == 'mixed':
        m = nn.Sequential(nn.Conv1d(2, 6, 5), nn.ConvTranspose2d(4, 6, 3), nn.Conv3d(2, 4, 2), nn.Linear(8, 4))
    else: raise ValueError(kind)
    with torch.no_grad():
        for p in m.parameters(): p.masked_fill_(p == 0, 1e-3)
    return m


def _rnd(x): return int(math.floor(x + 0.5))


def _pruned_groups(sp, name):
    m = sp.layers[name]; g = sp.granularity
    keep = g.groups(sp.masks[name], m, name)
    return int((~keep).sum()) if g.is_nm else int((~keep.any(1)).sum())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from(['mlp', 'cnn', 'mixed']),
       st.sampled_from(['weight', 'vector', 'kernel', 'filter']), st.floats(0, 0.99))
def test_local_exact_groups(seed, kind, gran, s):
    model = _model(seed, kind)
    sp = Sparsifier(model, gran, 'local').sparsify(s)
    for n, m in sp.layers.items():
        g = sp.granularity
        ng = m.weight.numel() // g.group_size(m.weight, m, n)
        fct.test_eq(_pruned_groups(sp, n), _rnd(s * ng))
        # zeros in the weights are exactly the masked-out entries
        fct.test_eq(int((m.weight == 0).sum()), int((~sp.masks[n]).sum()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from(['mlp', 'cnn', 'mixed']), st.floats(0, 0.99))
def test_global_weight_exact(seed, kind, s):
    model = _model(seed, kind)
    before = torch.cat([m.weight.detach().abs().flatten() for m in prunable_layers(model).values()])
    sp = Sparsifier(model, 'weight', 'global').sparsify(s)
    n = sum(m.weight.numel() for m in sp.layers.values())
    keep = torch.cat([k.flatten() for k in sp.masks.values()])
    fct.test_eq(int((~keep).sum()), _rnd(s * n))
    # the pruned weights are the smallest ones: every pruned |w| <= every kept |w| (magnitudes saved before pruning)
    if 0 < int((~keep).sum()) < n: assert before[~keep].max() <= before[keep].min()
    # and the weights hold exactly the masks' zeros
    after = torch.cat([m.weight.detach().flatten() for m in sp.layers.values()])
    fct.test_eq(torch.equal(after == 0, ~keep), True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from(['cnn', 'mixed']), st.sampled_from(['vector', 'kernel', 'filter']),
       st.floats(0, 0.99))
def test_global_structured_never_overshoots(seed, kind, gran, s):
    model = _model(seed, kind)
    sp = Sparsifier(model, gran, 'global').sparsify(s)
    n = sum(m.weight.numel() for m in sp.layers.values())
    pruned = sum(int((~k).sum()) for k in sp.masks.values())
    biggest = max(sp.granularity.group_size(m.weight, m, nm) for nm, m in sp.layers.items())
    assert _rnd(s * n) - biggest < pruned <= _rnd(s * n)


def test_global_prunes_smallest():
    model = _model(1, 'mlp')
    before = torch.cat([m.weight.detach().abs().flatten() for m in prunable_layers(model).values()])
    sp = Sparsifier(model, 'weight', 'global').sparsify(0.7)
    keep = torch.cat([k.flatten() for k in sp.masks.values()])
    assert before[~keep].max() <= before[keep].min()


@pytest.mark.parametrize('nm', ['1:4', '2:4', '3:8'])
def test_nm_every_group(nm):
    g = get_granularity(nm)
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(4, 6, 2))
    sp = Sparsifier(model, nm).sparsify((g.m - g.n) / g.m)
    for n, m in sp.layers.items():
        rows = g.groups(sp.masks[n], m, n)
        fct.test_eq(rows.sum(1), torch.full((rows.shape[0],), g.n))
    fct.test_fail(lambda: sp.sparsify(0.9), contains='the most it can prune')


def test_ties_broken_by_position():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.); model[1].weight.fill_(1.)
    sp = Sparsifier(model, 'weight', 'global').sparsify(0.5)  # 18 weights, 9 pruned: the first 9 in model order
    fct.test_eq((~sp.masks['0']).flatten().tolist(), [True] * 9 + [False] * 3)
    fct.test_eq(sp.masks['1'].all().item(), True)


def test_sampled_selection_matches_sort():
    torch.manual_seed(0)
    layers = [torch.randn(40_000).abs(), (torch.randn(70_000).abs() * 10).round() / 10]
    for k in (1, 12_345, 55_000, 109_999):
        keeps = select_prune([lambda l=l: l for l in layers], [len(l) for l in layers], [1, 1], k, sample_size=2_000)
        order = torch.argsort(torch.cat(layers), stable=True)
        ref = torch.ones(110_000, dtype=torch.bool); ref[order[:k]] = False
        fct.test_eq(torch.cat(keeps), ref)


def test_masks_grow_monotonically():
    model = _model(3, 'cnn')
    sp = Sparsifier(model, 'weight', 'global', 'gradient_magnitude')
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    sp.sparsify(0.3); m1 = {k: v.clone() for k, v in sp.masks.items()}
    model.zero_grad(); model(x).pow(2).sum().backward()
    sp.sparsify(0.6)
    for k in m1: assert not (sp.masks[k] & ~m1[k]).any()  # nothing pruned before is kept now


def test_per_layer_dict_and_exclude():
    model = _model(0, 'mlp')
    sp = Sparsifier(model, exclude=['4']).sparsify({'0': 0.5, '2': 0.25})
    fct.test_eq(sp.layer_sparsity(), {'0': 0.5, '2': 0.25})
    fct.test_eq(list(sp.layers), ['0', '2'])
    fct.test_fail(lambda: sp.sparsify({'9': 0.5}), contains='matches no pruned layer')
    fct.test_eq(list(Sparsifier(model, exclude=['0', '2']).layers), ['4'])
    fct.test_eq(list(Sparsifier(model, layers='[02]').layers), ['0', '2'])
    fct.test_fail(lambda: Sparsifier(model, exclude=nn.Linear), contains='Nothing to prune')


@pytest.mark.parametrize('bad,msg', [(90, 'e.g. 0.9'), (1.0, 'would prune every weight'), (-0.1, '[0, 1)'),
                                     (150, '[0, 1)'), (float('nan'), 'NaN'), ('0.5', 'number')])
def test_bad_sparsity_leaves_model_untouched(bad, msg):
    model = _model(0, 'mlp'); ref = copy.deepcopy(model.state_dict())
    sp = Sparsifier(model)
    with pytest.raises((ValueError, TypeError), match=None) as e: sp.sparsify(bad)
    assert msg in str(e.value), str(e.value)
    for k, v in model.state_dict().items(): assert torch.equal(v, ref[k])


def test_nan_names_layer_and_leaves_model_untouched():
    model = _model(0, 'mlp')
    with torch.no_grad(): model[4].weight[0, 0] = float('nan')
    ref = copy.deepcopy(model.state_dict())
    fct.test_fail(lambda: Sparsifier(model).sparsify(0.5), contains="layer '4' has NaN weights")
    for k, v in model.state_dict().items(): assert torch.equal(v, ref[k], ) or torch.isnan(v).any()
    fct.test_eq(int((model[0].weight == 0).sum()), 0)


def test_unknown_names_list_valid_ones():
    model = _model(0, 'mlp')
    fct.test_fail(lambda: Sparsifier(model, granularity='row'), contains="'weight', 'vector', 'kernel', 'filter'")
    fct.test_fail(lambda: Sparsifier(model, criteria='taylor'),
                  contains='magnitude, gradient_magnitude, movement, random')
    fct.test_fail(lambda: Sparsifier(model, context='layer'), contains='local, global')


def test_state_dict_roundtrip():
    model = _model(0, 'cnn')
    sp = Sparsifier(model, 'kernel', 'local').sparsify(0.4)
    sd = sp.state_dict()
    fresh = _model(0, 'cnn')
    sp2 = Sparsifier(fresh, 'kernel', 'local').load_state_dict(sd)
    for n in sd: fct.test_eq(sp2.masks[n], sp.masks[n])
    fct.test_eq(sp2.layer_sparsity(), sp.layer_sparsity())
    fct.test_fail(lambda: Sparsifier(_model(0, 'mlp')).load_state_dict(sd), contains='mask for')


def test_nm_never_revives():
    model = nn.Sequential(nn.Linear(8, 2))
    with torch.no_grad(): model[0].weight[0, :3] = 0.  # a group of 4 already 3/4 zero
    sp = Sparsifier(model, '2:4').adopt_zeros().sparsify(0.5)
    fct.test_eq(int((model[0].weight[0, :4] == 0).sum()), 3)
    fct.test_eq(bool((model[0].weight.reshape(-1, 4) != 0).sum(1).max() <= 2), True)


def test_adopt_zeros_skips_zero_initialized_layers():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))
    with torch.no_grad(): model[1].weight.zero_(); model[0].weight[0, 0] = 0.
    sp = Sparsifier(model).adopt_zeros()
    fct.test_eq(list(sp.masks), ['0'])  # the all-zero (zero-initialized) layer is not taken as pruned


# ---- issue 13: silent wrong results in the engine ----
import warnings
import torchvision
from torch.nn.utils import parametrize, parametrizations
import torch.nn.utils.prune as tprune
from fasterprune.criteria import Magnitude
from fasterprune.sparsifier import NMRoundingWarning


def _live_filters(w): return int((w.reshape(w.shape[0], -1) != 0).any(1).sum())


class ThreeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(torch.relu(self.c0(x))))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize('context,s', [('global', 0.95), ('global', 0.99), ('local', 0.99)])
def test_coupled_filters_never_empty_a_layer(context, s):
    "item 10: a high target on a small conv net leaves every conv with at least one live filter, and the output varies"
    torch.manual_seed(0)
    model = ThreeConv(); x = torch.randn(4, 1, 8, 8)
    sp = Sparsifier(model, 'filter', context, example_input=x[:1]).sparsify(s)
    for n in ('c0', 'c1', 'c2'): assert _live_filters(getattr(model, n).weight) >= 1, n
    out = model(x)
    assert (out - out[:1]).abs().max() > 0  # not a constant function of the input
    n_w = sum(getattr(model, n).weight.numel() for n in ('c0', 'c1', 'c2'))
    assert 1 - sum(int((~sp.masks[n]).sum()) for n in sp.masks) / n_w <= 1 - 0.5  # it still prunes most of it


def test_resnet18_global_filters_fair_across_layers():
    "item 2: coupled global filter pruning, resnet18 at 0.5: every conv keeps >= 25 % of its filters, total exact"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    sp = Sparsifier(model, 'filter', 'global', example_input=torch.randn(1, 3, 32, 32)).sparsify(0.5)
    for n, m in sp.layers.items():
        if isinstance(m, nn.Conv2d):
            assert _live_filters(m.weight) >= 0.25 * m.out_channels, (n, _live_filters(m.weight), m.out_channels)
    g = sp.granularity
    sizes = [sum(g.group_size(sp.layers[n].weight, sp.layers[n], n) for n in gr.producers) for gr in sp.groups]
    n_w = sum(gr.width * s for gr, s in zip(sp.groups, sizes))
    pruned = sum(int((~mk).sum()) for mk in sp.masks.values())
    assert _rnd(0.5 * n_w) - max(sizes) < pruned <= _rnd(0.5 * n_w)


def test_magnitude_subclass_is_honoured():
    "item 13: a criterion subclassing Magnitude with its own score decides what is pruned (here: the largest weights)"
    class Largest(Magnitude):
        def score(self, name, w, out=None): return -w.detach().abs().float()
    model = _model(1, 'mlp')
    before = torch.cat([m.weight.detach().abs().flatten() for m in prunable_layers(model).values()])
    sp = Sparsifier(model, 'weight', 'global', Largest()).sparsify(0.3)
    keep = torch.cat([k.flatten() for k in sp.masks.values()])
    assert before[~keep].min() >= before[keep].max()


@pytest.mark.parametrize('gran,context', [('filter', 'local'), ('vector', 'local'), ('kernel', 'global'),
                                          ('weight', 'local')])
def test_sparsify_same_target_twice(gran, context):
    "item 13: sparsify(s) twice is a no-op, not 'masks never shrink' (odd group counts round up per layer)"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 5, 2), nn.Flatten(), nn.Linear(5 * 4, 3), nn.Linear(3, 4))
    sp = Sparsifier(model, gran, context)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NMRoundingWarning)
        sp.sparsify(0.5); m1 = {k: v.clone() for k, v in sp.masks.items()}
        sp.sparsify(0.5)
    for k in m1: fct.test_eq(sp.masks[k], m1[k])
    fct.test_fail(lambda: sp.sparsify(0.2), contains='masks never shrink')


@pytest.mark.parametrize('nm,s,got', [('2:4', 0.3, 0.25), ('2:4', 0.1, 0.0), ('1:4', 0.6, 0.5)])
def test_nm_unreachable_target_warns(nm, s, got):
    "item 14: an N:M target that cannot be reached warns, naming the reachable values, and measures what it says"
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    g = get_granularity(nm)
    reach = ', '.join(f'{i / g.m:g}' for i in range(g.m - g.n + 1))
    with pytest.warns(NMRoundingWarning, match=reach):
        sp = Sparsifier(model, nm).sparsify(s)
    fct.test_close(sp.sparsity(), got, eps=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter('error', NMRoundingWarning)
        Sparsifier(nn.Sequential(nn.Linear(16, 8)), nm).sparsify((g.m - g.n) / g.m)  # reachable: no warning


@pytest.mark.parametrize('gran,context', [('weight', 'global'), ('weight', 'local'), ('filter', 'local'),
                                          ('kernel', 'global'), ('2:4', 'local')])
def test_zero_size_layer_is_skipped(gran, context):
    "item 14: a zero-size layer gets no mask instead of a ZeroDivisionError"
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 4))
    sp = Sparsifier(model, gran, context).sparsify(0.5)
    fct.test_eq(list(sp.layers), ['1']); fct.test_close(sp.sparsity(), 0.5, eps=1e-9)
    fct.test_fail(lambda: Sparsifier(nn.Sequential(nn.Linear(0, 8))), contains='Nothing to prune')


_REPARAMS = {
    'weight_norm': lambda m: parametrizations.weight_norm(m),
    'weight_norm_whole': lambda m: parametrizations.weight_norm(m, dim=None),
    'spectral_norm': lambda m: parametrizations.spectral_norm(m),
    'old_weight_norm': lambda m: torch.nn.utils.weight_norm(m),
    'old_spectral_norm': lambda m: torch.nn.utils.spectral_norm(m),
    'prune': lambda m: tprune.random_unstructured(m, 'weight', 0.2),
}


@pytest.mark.parametrize('kind', list(_REPARAMS))
@pytest.mark.parametrize('gran', ['weight', 'filter'])
@pytest.mark.parametrize('reapply', ['apply_masks', 'masker', 'masker_by_layer'])
def test_reparametrized_layers_stay_masked(kind, gran, reapply, monkeypatch):
    "item 12: weight_norm / spectral_norm / torch prune layers stay masked through optimizer steps, sparsity exact"
    torch.manual_seed(0)
    rp = _REPARAMS[kind]
    model = nn.Sequential(rp(nn.Linear(12, 10)), nn.ReLU(), rp(nn.Linear(10, 6)), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(16, 12)
    sp = Sparsifier(model, gran, 'local').sparsify(0.5)
    def check():
        model(x)  # hook-based layers recompute their weight in the forward
        for n, m in sp.layers.items():
            w = m.weight.detach()
            assert torch.isfinite(w).all(), n
            fct.test_eq(w[~sp.masks[n]].abs().sum().item(), 0.)
        dense_zeros = sum(int((m.weight_mask == 0).sum()) for m in model.modules() if hasattr(m, 'weight_mask'))
        n_w = sum(m.weight.numel() for m in sp.layers.values())
        # measured on the weight the layers compute (torch prune's own mask may zero a few more)
        masked = sum(int((~mk).sum()) for mk in sp.masks.values())
        fct.test_close(sp.sparsity(), masked / n_w, eps=dense_zeros / n_w + 1e-9)
    check()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if reapply == 'masker_by_layer': monkeypatch.setattr(S, '_FUSED_MASKS_MAX', 0)  # the large-model path
    masker = sp.masker()  # what SparsifyCallback calls after each step
    for _ in range(3):
        opt.zero_grad(); model(x).pow(2).sum().backward(); opt.step()
        if reapply == 'apply_masks': sp.apply_masks()
        else: masker()
        check()


def test_unknown_parametrization_refused_up_front():
    "item 12: a parametrization the masks cannot follow is refused, naming the layer and the fix, model untouched"
    class Sym(nn.Module):
        def forward(self, w): return (w + w.T) / 2
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    parametrize.register_parametrization(model[0], 'weight', Sym())
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layer '0'.*exclude=.*remove_parametrizations"):
        Sparsifier(model).sparsify(0.5)
    for k, v in model.state_dict().items(): assert torch.equal(v, ref[k])
    sp = Sparsifier(model, exclude='0').sparsify(0.5)  # the fix the message names works
    fct.test_eq(list(sp.layers), ['1'])


# ---- issue 11: attention projections are prunable tensors ----
def _encoder(seed=0):
    torch.manual_seed(seed)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.), 2, enable_nested_tensor=False)


@pytest.mark.parametrize('gran,context', [('weight', 'global'), ('weight', 'local'), ('vector', 'local'),
                                          ('filter', 'local'), ('2:4', 'local')])
def test_attention_in_proj_pruned(gran, context):
    "nn.MultiheadAttention.in_proj_weight is pruned with attention=True, counted exactly, and the masks hold its zeros"
    model = _encoder().eval()
    x = torch.randn(5, 3, 16)
    sp = Sparsifier(model, gran, context, attention=True).sparsify(0.5)
    names = [n for n in sp.layers if n.endswith('in_proj_weight')]
    fct.test_eq(names, ['layers.0.self_attn.in_proj_weight', 'layers.1.self_attn.in_proj_weight'])
    for n in names:
        w = model.get_parameter(n)
        fct.test_eq(int((w == 0).sum()), int((~sp.masks[n]).sum()))
        if context == 'local': fct.test_close(float((w == 0).float().mean()), 0.5, eps=1e-9)
    n_w = sum(m.weight.numel() for m in sp.layers.values())
    if gran == 'weight' and context == 'global':
        fct.test_eq(sum(int((~k).sum()) for k in sp.masks.values()), _rnd(0.5 * n_w))
    assert torch.isfinite(model(x)).all()
    fct.test_eq(set(sp.state_dict()) >= set(names), True)
    fct.test_eq([n for n in Sparsifier(model).layers if 'in_proj' in n], [])  # off by default


def test_attention_separate_qkv_projections():
    "With kdim/vdim different from embed_dim, q/k/v_proj_weight are the prunable tensors"
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    sp = Sparsifier(mha, 'weight', 'local', attention=True).sparsify(0.25)
    fct.test_eq(sorted(sp.layers), ['k_proj_weight', 'out_proj', 'q_proj_weight', 'v_proj_weight'])
    for n in ('q_proj_weight', 'k_proj_weight', 'v_proj_weight'):
        w = getattr(mha, n)
        fct.test_eq(int((w == 0).sum()), _rnd(0.25 * w.numel()))
    out, _ = mha(torch.randn(3, 2, 8), torch.randn(5, 2, 6), torch.randn(5, 2, 4))
    assert torch.isfinite(out).all()


def test_report_is_the_metrics_report():
    "Sparsifier.report has sparsity_report's columns and rows; with an input, it is sparsity_report (FLOPs included)"
    from fasterprune.metrics import sparsity_report, report_columns
    model = _model(0, 'cnn')
    sp = Sparsifier(model, 'filter', 'local', exclude='4').sparsify(0.5)
    x = torch.randn(2, 3, 8, 8)
    ref = sparsity_report(model, x)
    fct.test_eq(list(ref.columns), list(report_columns))
    with_input = sp.report(x)
    fct.test_eq(with_input.equals(ref), True)
    plain = sp.report()
    fct.test_eq(list(plain.columns), list(report_columns))
    fct.test_eq(list(plain['layer']), ['0', '2', '4', '(other parameters)', 'total'])  # the excluded layer too
    flops = ['flops', 'nonzero_flops', 'flops_share']
    fct.test_eq(plain.drop(columns=flops).astype(str).equals(ref.drop(columns=flops).astype(str)), True)
    fct.test_eq(bool(plain[flops].isna().all().all()), True)
    fct.test_eq(plain['sparsity'].tolist()[:3], [0.5, 0.5, 0.])
    fct.test_close(plain.attrs['compression_ratio'], ref.attrs['compression_ratio'])


class _Tied(nn.Module):
    "Two Linear layers sharing one weight tensor"
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b.weight = self.a.weight
    def forward(self, x): return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize('context', ['global', 'local'])
def test_shared_weight_counted_once_and_exact(context):
    "A weight shared by two layers is one tensor: pruned through the first layer, counted once, the count exact"
    from fasterprune.metrics import sparsity_report, compression_ratio
    torch.manual_seed(0)
    m = _Tied()
    sp = Sparsifier(m, 'weight', context).sparsify(0.5)
    fct.test_eq(list(sp.layers), ['a', 'c'])
    fct.test_eq(int((m.a.weight == 0).sum()) + int((m.c.weight == 0).sum()), 160 if context == 'global' else 128 + 32)
    fct.test_eq(sp.sparsity(), 0.5)
    r = sparsity_report(m, torch.randn(1, 16))
    fct.test_eq(r.set_index('layer').loc['b', 'type'], 'Linear (weight of a)')
    fct.test_eq(int(r.set_index('layer').loc['total', 'params']), 256 + 16 + 16 + 64 + 4)  # the shared weight once


def test_shared_weight_left_dense_by_filter_pruning(caplog):
    torch.manual_seed(0)
    m = _Tied()
    w0 = m.a.weight.detach().clone()
    with caplog.at_level('WARNING', logger='fasterprune.sparsifier'):
        sp = Sparsifier(m, 'filter', 'local')
    assert 'share one weight tensor' in caplog.text
    fct.test_eq(list(sp.layers), ['c'])
    sp.sparsify(0.5)
    assert torch.equal(m.a.weight, w0)


def test_named_heads_with_an_excluded_projection_warn(caplog):
    "heads= names an attention whose q projection is excluded: its heads cannot go, and the Sparsifier says so"
    from test_zoo import LlamaBlock, _llama_heads
    torch.manual_seed(0)
    m, tok = LlamaBlock(), torch.randint(0, 50, (2, 8))
    with caplog.at_level('WARNING', logger='fasterprune.sparsifier'):
        sp = Sparsifier(m, 'filter', 'local', exclude='wq').couple(tok, heads=_llama_heads())
    assert "the heads of '' stay: wq is not pruned" in caplog.text
    sp.sparsify(0.5)
    fct.test_eq(int((m.wk.weight == 0).all(1).sum()), 0)  # no head went
    assert int((m.w1.weight == 0).all(1).sum()) == 32  # the SwiGLU units did


def test_shared_weight_of_a_left_out_layer_warns_and_counts_once(caplog):
    "exclude= the first of two layers sharing a weight: the other still prunes it, and says so"
    from fasterprune.rewind import weights_remaining
    torch.manual_seed(0)
    m = _Tied()
    with caplog.at_level('WARNING', logger='fasterprune.sparsifier'):
        sp = Sparsifier(m, 'weight', 'global', exclude='a').sparsify(0.5)
    assert 'a (the weight of b) left out' in caplog.text
    fct.test_eq(list(sp.layers), ['b', 'c'])
    w = weights_remaining(sp.masks, m)  # the shared weight counted once: 320 weights, 160 kept
    fct.test_eq(w, 0.5)
    only = _Tied()
    fct.test_fail(lambda: Sparsifier(only, 'filter', layers=['a', 'b']), contains='share weight tensors')


def test_a_layer_emptied_by_the_global_ranking_is_warned_about(caplog):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad(): m[2].weight.mul_(1e-3)  # all its weights smaller than any other layer's
    with caplog.at_level('WARNING', logger='fasterprune.sparsifier'):
        sp = Sparsifier(m, 'weight', 'global').sparsify(0.6)
    assert "2 entirely pruned" in caplog.text
    fct.test_eq(int((m[2].weight != 0).sum()), 0)
    caplog.clear()
    with caplog.at_level('WARNING', logger='fasterprune.sparsifier'): sp.sparsify(0.7)
    assert 'entirely pruned' not in caplog.text  # once a layer
