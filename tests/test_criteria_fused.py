"Gradient criteria accumulate every layer's step in a few fused kernels: the sums must be the per-layer reference's"
import pytest, torch
import fastcore.test as fct
from fasterprune import criteria
from fasterprune.criteria import get_criterion


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('name', ['gradient_magnitude', 'movement'])
def test_fused_accumulation_equals_the_per_layer_sums(name, fused, monkeypatch):
    "Both paths (the CPU's loop, an accelerator's fused kernels, forced here) give the reference sums"
    monkeypatch.setattr(criteria, '_fuse_steps', lambda p: fused)
    g = torch.Generator().manual_seed(0)
    ws = {'a': torch.randn(5, 3, generator=g), 'b': torch.randn(4, 4, generator=g).t(),  # a transposed view
          'c': torch.randn(6, generator=g).to(torch.bfloat16), 'd': torch.randn(2, 2, generator=g)}
    ps = {k: torch.nn.Parameter(v) for k, v in ws.items()}
    crit, ref = get_criterion(name), {}
    for step in range(3):
        for k, p in ps.items():  # layer d has no gradient in the second step (a frozen or unused layer)
            p.grad = None if (k == 'd' and step == 1) else torch.randn(p.shape, generator=g).to(p.dtype)
            if p.grad is None: continue
            t = (p.detach() * p.grad)
            t = t.abs() if name == 'gradient_magnitude' else -t
            ref[k] = ref[k] + t.float() if k in ref else t.float()
        crit.accumulate(ps)
    fct.test_eq(crit.n_steps, 3)
    fct.test_eq(set(crit.acc), set(ref))
    for k in ref:
        fct.test_eq(crit.acc[k].dtype, torch.float32)
        fct.test_eq(crit.acc[k].shape, ps[k].shape)
        fct.test_close(crit.acc[k], ref[k], eps=1e-6)
    crit.reset()
    fct.test_eq((crit.acc, crit.n_steps), ({}, 0))
