"A review's findings (R5) on tracing a forward with defaults and on dict-like examples: each fails on the code before"
import logging
import pytest, torch
import fastcore.test as fct
import torch.nn as nn
import torch.nn.functional as F
from fasterprune.core import map_tensors, first_items, flat_tensors, to_device
from fasterprune.graph import ChannelGraph, UnknownOpError
from fasterprune.metrics import count_flops, measure_latency
from fasterprune.inference import to_sparse_inference
from fasterprune.pruner import Pruner


class _Flag(nn.Module):
    "`proj` runs only when `features` is set; the example leaves it at its default"
    def __init__(self):
        super().__init__()
        self.body, self.head, self.proj = nn.Linear(6, 16), nn.Linear(16, 3), nn.Linear(16, 4)
    def forward(self, x, features=False):
        h = F.relu(self.body(x))
        if features: return self.proj(h)
        return self.head(h)

class _OptionalY(nn.Module):
    "`c` runs only when `y` is given: its output joins `a`'s channels"
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(5, 8)
    def forward(self, x, y=None):
        h = F.relu(self.a(x))
        if y is not None: h = h + self.c(y)
        return self.b(h)


# 1. a layer on a branch the example's defaults do not take was left uncut, silently (fx traced the default branch)
def test_layer_on_a_default_flag_branch_is_refused_and_the_model_left_as_it_was():
    torch.manual_seed(0)
    m, x = _Flag().eval(), torch.randn(8, 6)
    fct.test_eq(ChannelGraph(m, x).branch_layers, ['proj'])
    fct.test_fail(lambda: Pruner(m, x).prune(0.5), contains="'proj' did not run on the example")
    fct.test_eq((m.body.out_features, m.proj.in_features), (16, 16))
    fct.test_eq(m(x, features=True).shape, (8, 4))  # still runs

def test_layer_on_an_optional_input_branch_is_refused_strict_and_named_otherwise(caplog):
    torch.manual_seed(0)
    m, x = _OptionalY().eval(), torch.randn(8, 6)
    fct.test_fail(lambda: Pruner(m, x).prune(0.5), contains="'c' did not run on the example")
    fct.test_eq(m.a.out_features, 8)
    with caplog.at_level(logging.WARNING, logger='fasterprune'): Pruner(m, x, strict=False).prune(0.5)
    fct.test_eq(m.a.out_features, 4)  # pruned anyway, and the warning names the layer left unverified
    assert any("'c' did not run on the example" in r.getMessage() for r in caplog.records), caplog.text
    # with the branch taken by the example, `c` runs and is cut with `a`
    m2, y = _OptionalY().eval(), torch.randn(8, 5)
    Pruner(m2, {'x': x, 'y': y}).prune(0.5)
    fct.test_eq((m2.a.out_features, m2.c.out_features), (4, 4))
    fct.test_eq(m2(x, y=y).shape, (8, 4))


# 2. a tensor default: torch.fx stored the class's own tensor on the model and the surgery cut it for every instance
def test_tensor_default_is_not_cut_nor_left_on_the_model():
    class TensorDefault(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        def forward(self, x, shift=torch.zeros(8)): return self.b(F.relu(self.a(x) + shift))
    torch.manual_seed(0)
    m, x = TensorDefault().eval(), torch.randn(4, 6)
    fct.test_fail(lambda: Pruner(m, x).prune(0.25), contains="'shift'")  # strict: an input of unknown origin
    Pruner(m, x, strict=False).prune(0.25)  # its channels are kept
    fct.test_eq(TensorDefault.forward.__defaults__[0].shape, (8,))
    fct.test_eq([k for k in vars(m) if k.startswith('_tensor_constant')], [])
    fct.test_eq(TensorDefault()(torch.randn(2, 6)).shape, (2, 3))  # another instance of the class still runs


# 3. a tuple default before another input: fx flattened it into two placeholders and the later inputs shifted
class _SizeThenY(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4, 4)
    def forward(self, x, size=(2, 2), y=None):
        h = F.adaptive_avg_pool2d(F.relu(self.a(x)), size)
        if y is not None: h = h * y
        return self.b(h.flatten(1))

def test_tuple_default_graph_computes_the_model_and_prunes():
    torch.manual_seed(0)
    m, x, y = _SizeThenY().eval(), torch.randn(3, 3, 8, 8), torch.rand(3, 1, 1, 1) + 0.5
    for ex, ref in (({'x': x, 'y': y}, m(x, y=y)), ((x,), m(x)), ({'x': x, 'size': (2, 2)}, m(x))):
        assert torch.allclose(ChannelGraph(m, ex).output, ref, atol=1e-6), list(ex) if isinstance(ex, dict) else len(ex)
    Pruner(m, (x,)).prune(0.25)
    fct.test_eq(m.a.out_channels, 6)
    fct.test_eq(m(x, y=y).shape, (3, 4))


# 4. an optional input given explicitly as None was traced as an input (`h * mask` on None)
class _Masked(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)
    def forward(self, x, mask=None, scale:float=2.0):
        h = F.relu(self.a(x))
        if mask is not None: h = h * mask
        return self.b(h) * scale

def test_explicit_none_input_is_an_omitted_input():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    for ex in ({'x': x, 'mask': None}, (x, None), {'x': x}, (x, None, 3.0)):
        m = _Masked().eval()
        g = ChannelGraph(m, ex)
        fct.test_eq(g.branch_layers, [])
        Pruner(m, ex).prune(0.25)
        fct.test_eq(m.a.out_features, 6)


# 5. a tokenizer's output (transformers.BatchEncoding, a UserDict) was passed as one positional input
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(20, 8), nn.Linear(8, 16), nn.Linear(16, 3)
    def forward(self, input_ids, attention_mask=None):
        h = self.out(F.relu(self.fc(self.emb(input_ids))))
        return h if attention_mask is None else h * attention_mask[..., None]

def test_batch_encoding_is_keyword_arguments_everywhere():
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5))
    enc = transformers.BatchEncoding({'input_ids': ids, 'attention_mask': torch.ones(2, 5)})
    fct.test_eq(len(flat_tensors(enc)), 2)
    for d in (map_tensors(lambda t: t * 1, enc), first_items(enc), to_device(enc, 'cpu')):
        fct.test_eq((type(d), list(d)), (type(enc), ['input_ids', 'attention_mask']))  # its own type (R6)
    fct.test_eq(first_items(enc)['input_ids'].shape, (1, 5))
    m = _Tiny().eval()
    ref = m(**enc)
    fct.test_eq(count_flops(m, enc), count_flops(m, dict(enc)))
    assert measure_latency(m, enc, n_warmup=0, n_runs=1) > 0
    sp = to_sparse_inference(m, enc, kernels='dense', n_runs=1)
    assert torch.allclose(sp(**enc), ref)
    Pruner(m, enc).prune(0.25)
    fct.test_eq(m.fc.out_features, 12)
    fct.test_eq(m(**enc).shape, (2, 5, 3))
    # the tokenizer's output is as it was: still a BatchEncoding, its methods work
    assert isinstance(enc, transformers.BatchEncoding)
    fct.test_eq(enc.to('cpu')['input_ids'].shape, (2, 5))
