"""What a second read (R7) of the last Pruner/graph changes found: an inference-tensor buffer made every check fail
(no version counter); every layer's KV cache was copied (a per-buffer limit, not a total); a flag whose other value
samples was refused for the randomness; an `nn.Linear` subclass holding its adapter as plain tensors, or whose forward
differs for one row, was taken for a plain Linear."""
import logging
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from fasterprune.pruner import Pruner
import fasterprune.graph as graph


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer('scale', torch.ones(16))
    def forward(self, x): return self.b(torch.relu(self.a(x)) * self.scale)


def test_an_inference_tensor_buffer_does_not_break_the_pruner():
    "A buffer made under torch.inference_mode (HF dynamic RoPE's inv_freq) has no version counter: pruned all the same"
    torch.manual_seed(0)
    m = WithBuffer().eval()
    with torch.inference_mode(): m.scale = torch.ones(16)
    assert m.scale.is_inference()
    Pruner(m, torch.randn(4, 8)).prune(0.5)
    fct.test_eq(m.a.out_features, 8)


def test_buffers_are_copied_up_to_a_total(monkeypatch):
    "Per-layer caches: `_untouched` copies buffers up to `_big_buffer` bytes in all, not per buffer"
    copied = []
    real = torch.Tensor.clone
    monkeypatch.setattr(graph, '_big_buffer', 100 * 4)  # room for 100 floats in all
    m = nn.Sequential(*[WithBuffer() for _ in range(3)])  # 3 buffers of 16 floats, then bigger ones
    for i, w in enumerate(m): w.register_buffer('cache', torch.zeros(40))
    monkeypatch.setattr(torch.Tensor, 'clone', lambda t, *a, **k: copied.append(t.numel()) or real(t, *a, **k))
    with graph._untouched(m): pass
    assert sum(copied) <= 100 and copied, copied


def test_a_flag_whose_other_value_samples_is_compared_with_the_same_noise():
    "forward(x, sample=False) draws noise when True: the other path is compared under one seed, not refused"
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(8, 32), nn.Linear(32, 4)
        def forward(self, x, sample=False):
            y = self.dec(torch.relu(self.enc(x)))
            return y + torch.randn_like(y) if sample else y  # noise on the output, which no cut reaches
    torch.manual_seed(0)
    m = Noisy().eval()
    Pruner(m, (torch.randn(4, 8), False)).prune(0.5)  # strict: the flipped flag's path verified with the same draws
    fct.test_eq(m.enc.out_features, 16)


def test_noise_on_cut_channels_is_a_path_that_differs():
    "Noise added to channels the cut removes: the masked model passes it on, the pruned one cannot; refused (strict)"
    from fasterprune.pruner import SurgeryError
    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.mu, self.dec = nn.Linear(8, 32), nn.Linear(32, 4), nn.Linear(4, 8)
        def forward(self, x, sample=False):
            z = self.mu(torch.relu(self.enc(x)))
            return self.dec(z + torch.randn_like(z) if sample else z)
    torch.manual_seed(0)
    m = VAE().eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError, match='sample=True'): Pruner(m, (torch.randn(4, 8), False)).prune(0.5)
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])


def test_a_linear_subclass_with_plain_tensor_adapters_is_not_a_plain_linear():
    "A LoRA-style adapter held as plain tensors: the subclass is traced inside (its channels kept), never cut as Linear"
    class LoRAPlain(nn.Linear):
        def __init__(self, i, o, r=4):
            super().__init__(i, o)
            self.lora_A, self.lora_B = torch.randn(r, i) * 0.1, torch.zeros(o, r)
        def forward(self, x): return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B)
    assert not graph._linear_subclass(LoRAPlain(8, 8))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), LoRAPlain(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    Pruner(m, torch.randn(4, 8), strict=False).prune(0.5)  # was: SurgeryError (the adapter's width was not cut)
    fct.test_eq((m[2].weight.shape, m[2].lora_A.shape), ((32, 32), (4, 32)))


def test_a_linear_subclass_whose_forward_differs_for_one_row_is_not_a_plain_linear():
    "Centred only for a batch of one: the probe tries one row too, so the subclass is traced inside"
    class OddLinear(nn.Linear):
        def forward(self, x):
            y = F.linear(x, self.weight, self.bias)
            return y - y.mean(-1, keepdim=True) if x.shape[0] == 1 else y
    assert not graph._linear_subclass(OddLinear(8, 8))
    class Plain(nn.Linear):
        def forward(self, x): return x @ self.weight.T + self.bias
    assert graph._linear_subclass(Plain(8, 8))


# --- F6 (the widened graph fuzzer on this session's final code): strict refused correct cuts ---

class Extra(nn.Module):
    "A layer on an optional input: `side(extra)` only when `extra` is given"
    def __init__(self, join:bool=False, through:bool=False):
        super().__init__()
        self.stem, self.body, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)
        self.side = nn.Conv2d(16 if through else 3, 16 if join or through else 5, 1)
        self.join, self.through = join, through
    def forward(self, x, extra=None):
        h = F.relu(self.stem(x))
        g = F.relu(self.body(h))
        if extra is not None:
            s = self.side(self.stem(extra) if self.through else extra)
            if self.join: g = g + s  # its output joins channels the cut removes
            else: return self.head(g.mean((2, 3))), s.mean()
        return self.head(g.mean((2, 3)))


def test_a_layer_fed_only_by_an_optional_input_does_not_block_a_strict_cut():
    "side(extra) reads the optional input alone: a narrower width is not a slice of cut channels; pruned, verified"
    torch.manual_seed(0)
    m = Extra().eval()
    x, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    pr = Pruner(m, x)  # strict
    pr.prune(0.5)
    fct.test_eq(m.body.out_channels, 8)
    with torch.no_grad(): fct.test_eq(m(x, extra)[1].shape, ())  # the optional path still runs


def test_a_layer_on_an_optional_input_whose_output_joins_cut_channels_is_refused():
    "side(extra) + body(h): the cut removes channels side's output must lose too; strict refuses, model untouched"
    torch.manual_seed(0)
    m = Extra(join=True).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="'side' did not run"): Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
    for k, v in m.state_dict().items(): fct.test_eq(v, sd[k])


def test_a_layer_fed_through_a_cut_layer_on_an_optional_input_is_refused():
    "side(stem(extra)): stem is cut on the example's path, so side reads cut channels; strict refuses"
    torch.manual_seed(0)
    m = Extra(through=True).eval()
    with pytest.raises(ValueError, match="'side' did not run"): Pruner(m, torch.randn(2, 3, 8, 8)).prune(0.5)
