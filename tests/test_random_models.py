"""Property tests on drawn architectures (issue 13): residual adds, concatenations, tuple and dict outputs, LayerNorm,
PReLU, Embedding, grouped convs, channel LayerNorm and RMSNorm, self-attention and a parametrized layer (weight_norm,
spectral_norm), each checked against the library's promises —
exact sparsity at weight granularity, masked weights zero after SGD steps with SparsifyCallback, and
state_dict → fresh model → load_state_dict keeping the masks' zeros and the output."""
import math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from hypothesis import given, settings, strategies as st, HealthCheck
from torch.nn.utils import parametrizations
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.optimizer import SGD
from fasterprune.callback import SparsifyCallback
from fasterprune.data import TensorPairs
from fasterprune.sparsifier import Sparsifier

BLOCKS = ['plain', 'res', 'cat', 'ln', 'prelu', 'group', 'lnc', 'rms', 'attn']
SETTINGS = dict(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


class Drawn(nn.Module):
    "A small model from a drawn spec: a stem (Conv, Linear or Embedding), blocks, a head, one output form"
    def __init__(self, spec, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.spec, kind, c = spec, spec['kind'], spec['width']
        conv = kind == 'conv'
        lin = (lambda a, b: nn.Conv2d(a, b, 3, padding=1)) if conv else nn.Linear
        self.stem = (nn.Conv2d(3, c, 3, padding=1) if conv else nn.Embedding(20, c) if kind == 'tokens'
                     else nn.Linear(16, c))
        self.blocks = nn.ModuleList()
        for b in spec['blocks']:
            if b == 'plain': m = nn.Sequential(lin(c, c), nn.ReLU())
            elif b == 'res': m = nn.ModuleDict(dict(a=lin(c, c), b=lin(c, c)))
            elif b == 'cat': m = nn.ModuleDict(dict(a=lin(c, c // 2), b=lin(c, c - c // 2)))
            elif b == 'ln': m = nn.LayerNorm([c, 8, 8] if conv else c)
            elif b == 'group': m = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=2) if conv else nn.Linear(c, c),
                                                 nn.ReLU())
            elif b == 'lnc': m = nn.LayerNorm(c)  # over the channels: channels-last on a conv stream (ConvNeXt)
            elif b == 'rms': m = nn.RMSNorm(c)
            elif b == 'attn': m = nn.MultiheadAttention(c, 2, batch_first=True)
            else: m = nn.PReLU(c)
            with torch.no_grad():  # norms with non-trivial affine parameters: a pruned channel must be cut with them
                for p in m.parameters() if b in ('lnc', 'rms') else (): p.uniform_(0.5, 1.5)
            self.blocks.append(m)
        self.head, self.aux = nn.Linear(c, 10), nn.Linear(c, 3)
        if spec['param']:
            target = next(m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not self.stem)
            getattr(parametrizations, spec['param'])(target)

    def forward(self, x):
        x = self.stem(x)
        if self.spec['kind'] == 'tokens': x = x.mean(1)
        for b, m in zip(self.spec['blocks'], self.blocks):
            if b == 'res': x = F.relu(x + m['b'](F.relu(m['a'](x))))
            elif b == 'cat': x = torch.cat([m['a'](x), m['b'](x)], 1)
            elif b in ('lnc', 'rms') and self.spec['kind'] == 'conv': x = m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif b == 'attn':
                if self.spec['kind'] == 'conv':
                    B, C, H, W = x.shape
                    t = x.flatten(2).transpose(1, 2)
                    x = x + m(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)
                else:
                    t = x.unsqueeze(1)
                    x = x + m(t, t, t, need_weights=False)[0].squeeze(1)
            else: x = m(x)
        if self.spec['kind'] == 'conv': x = x.mean((2, 3))
        out = self.head(x)
        if self.spec['out'] == 'tensor': return out
        aux = self.aux(x)
        return (out, aux) if self.spec['out'] == 'tuple' else {'out': out, 'aux': aux}


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(['conv', 'mlp', 'tokens']))
    return dict(kind=kind, width=draw(st.sampled_from([4, 6, 8])),
                blocks=draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4)),
                out=draw(st.sampled_from(['tensor', 'tuple', 'dict'])),
                param=draw(st.sampled_from([None, None, 'weight_norm', 'spectral_norm'])))


def _inputs(spec, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    if spec['kind'] == 'conv': return torch.randn(n, 3, 8, 8, generator=g)
    if spec['kind'] == 'tokens': return torch.randint(0, 20, (n, 5), generator=g)
    return torch.randn(n, 16, generator=g)


def _logits(out): return out['out'] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out


def _flat(out):
    if isinstance(out, dict): return torch.cat([v.flatten() for v in out.values()])
    if isinstance(out, tuple): return torch.cat([v.flatten() for v in out])
    return out.flatten()


def _zeros_where_masked(sp):
    for n, mk in sp.masks.items():
        w = sp.weight(n)
        assert (w[~mk] == 0).all(), f"{n}: {int((w[~mk] != 0).sum())} masked weights are not zero"


@given(spec=specs(), s=st.sampled_from([0.3, 0.5, 0.85]), context=st.sampled_from(['local', 'global']))
@settings(**SETTINGS)
def test_exact_sparsity_weight_granularity(spec, s, context):
    model = Drawn(spec)
    sp = Sparsifier(model, 'weight', context).sparsify(s)
    nz = {n: int((sp.weight(n) == 0).sum()) for n in sp.layers}
    size = {n: sp.weight(n).numel() for n in sp.layers}
    if context == 'global': fct.test_eq(sum(nz.values()), math.floor(s * sum(size.values()) + 0.5))
    else: fct.test_eq(nz, {n: math.floor(s * size[n] + 0.5) for n in sp.layers})
    _zeros_where_masked(sp)


class _Zeros(Callback):
    order, run_valid = 41, False
    def __init__(self, cb): self.cb, self.checked = cb, 0
    def after_step(self):
        _zeros_where_masked(self.cb.sparsifier)
        self.checked += bool(self.cb.sparsifier.masks)


@given(spec=specs())
@settings(**SETTINGS)
def test_masked_weights_zero_after_sgd_steps(spec):
    torch.manual_seed(0)
    x, y = _inputs(spec, 64), torch.randint(0, 10, (64,))
    dls = DataLoaders(DataLoader(TensorPairs(x, y), bs=16, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(x[:16], y[:16]), bs=16), device=torch.device('cpu'))
    learn = Learner(dls, Drawn(spec), loss_func=lambda out, t: F.cross_entropy(_logits(out), t), opt_func=SGD,
                    moms=(0.9, 0.9, 0.9), wd=0.01)
    cb = SparsifyCallback(0.7, 'weight', 'global', schedule='agp', update_every=1, show_sparsity=False)
    chk = _Zeros(cb)
    with learn.no_logging(), learn.no_bar(): learn.fit(2, 0.05, cbs=[cb, chk])
    assert chk.checked >= 4
    sp = cb.sparsifier
    n = sum(sp.weight(k).numel() for k in sp.layers)
    fct.test_eq(sum(int((sp.weight(k) == 0).sum()) for k in sp.layers), math.floor(0.7 * n + 0.5))


@given(spec=specs(), s=st.sampled_from([0.5, 0.9]))
@settings(**SETTINGS)
def test_state_dict_into_fresh_model_keeps_zeros_and_output(spec, s):
    model = Drawn(spec, seed=0).eval()
    sp = Sparsifier(model, 'weight', 'global').sparsify(s)
    x = _inputs(spec)
    with torch.no_grad(): ref = _flat(model(x))
    fresh = Drawn(spec, seed=1).eval()  # other initial values everywhere, LayerNorm/PReLU/Embedding included
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad(): fct.test_close(_flat(fresh(x)), ref, eps=1e-5)
    sp2 = Sparsifier(fresh, 'weight', 'global')
    for n, mk in sp.masks.items(): assert torch.equal(sp2.weight(n) == 0, ~mk), n  # zero exactly where masked


@given(spec=specs(), context=st.sampled_from(['local', 'global']))
@settings(**SETTINGS)
def test_filter_prune_compact_save_load(spec, context):
    "Filter masks keep every model output (tuple and dict ones included); compact() gives the same outputs; "
    "save_pruned → fresh model → load_pruned gives them again (LayerNorm, PReLU, Embedding values included)"
    import tempfile, os
    from fasterprune.pruner import Pruner, save_pruned, load_pruned
    model = Drawn(spec).eval()
    x = _inputs(spec)
    with torch.no_grad(): ref = _flat(model(x))
    try: sp = Sparsifier(model, 'filter', context, example_input=x[:1], attention=True).sparsify(0.5)
    except ValueError as e:  # every channel feeds an output or a channel-mixing op (LayerNorm over C×H×W): said so
        assert 'Nothing to prune' in str(e)
        with torch.no_grad(): fct.test_eq(_flat(model(x)), ref)
        return
    for n in ('head', 'aux') if spec['out'] != 'tensor' else ('head',):  # the model's outputs are never pruned
        if n in sp.masks: assert sp.masks[n].any(1).all(), n
    with torch.no_grad(): ref = _flat(model(x))
    if spec['param']:  # the Pruner refuses reparametrized layers up front, with what to do, and changes nothing
        with pytest.raises(ValueError, match='reparametrized'): Pruner(model, x).compact()
        with torch.no_grad(): fct.test_eq(_flat(model(x)), ref)
        return
    Pruner(model, x).compact()
    with torch.no_grad(): fct.test_close(_flat(model(x)), ref, eps=1e-4)
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, 'm.pth')
        save_pruned(model, f)
        fresh = load_pruned(Drawn(spec, seed=1), f).eval()
    with torch.no_grad(): fct.test_close(_flat(fresh(x)), ref, eps=1e-4)
