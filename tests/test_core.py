"The shared validators and helpers of fasterprune.core, as the modules that use them hit them"
import pytest, torch
from torch import nn
import fastcore.test as fct
from fasterprune.core import (check_fraction, check_context, evaluating, round_half_up, flat_tensors, to_device,
                              model_device)


@pytest.mark.parametrize('bad,zero,msg', [(90, True, 'e.g. 0.9 for 90 %'), (1, True, 'would prune every weight'),
                                          (0, False, 'must be a fraction in (0, 1), got 0'),
                                          (100, False, 'e.g. 1 for 100 %'), (101, True, 'got 101'),
                                          (-1e-9, True, '[0, 1)'), (float('inf'), True, 'got inf')])
def test_fraction_refused(bad, zero, msg):
    fct.test_fail(lambda: check_fraction(bad, 'rate', zero=zero), contains=msg)


def test_fraction_types():
    fct.test_eq(check_fraction(torch.tensor([0.5])), 0.5)
    fct.test_eq(type(check_fraction(0)), float)
    fct.test_fail(lambda: check_fraction(torch.tensor([0.1, 0.2])), contains='got Tensor')
    fct.test_fail(lambda: check_fraction(None, 'ratio'), contains='ratio must be a number')


def test_context():
    fct.test_eq(check_context('local'), 'local')
    fct.test_fail(lambda: check_context('Global'), contains="Unknown context 'Global'")
    fct.test_fail(lambda: check_context('all', names=('local',)), contains='valid names: local')


def test_evaluating_restores_mixed_flags_on_error():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3)).train()
    net[2].eval()
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match='boom'):
        with evaluating(net) as m:
            fct.test_eq(m(x).requires_grad, False)
            fct.test_eq(torch.equal(m(x), m(x)), True)  # dropout off
            raise RuntimeError('boom')
    fct.test_eq([m.training for m in net.modules()], [True, True, True, False])
    with evaluating(net, no_grad=False): fct.test_eq(net(x).requires_grad, True)


def test_small_helpers():
    fct.test_eq([round_half_up(v) for v in (0.5, 1.5, 2.5, -0.5, 3.4999)], [1, 2, 3, 0, 3])
    a, b = torch.ones(1), torch.zeros(2)
    out = flat_tensors({'x': (a, [b, 'no']), 'y': None})
    fct.test_eq(len(out), 2)
    assert out[0] is a and out[1] is b
    moved = to_device((a, [b]), torch.device('meta'))
    fct.test_eq([t.device.type for t in flat_tensors(moved)], ['meta', 'meta'])
    fct.test_eq(type(moved[1]), list)
    fct.test_eq(model_device(nn.Linear(1, 1).to('meta')).type, 'meta')
    assert model_device(nn.Identity()) is None


def test_state_problems_name_every_difference():
    from fasterprune.core import state_problems
    own = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict()
    fct.test_eq(state_problems(dict(own), own), [])
    bad = {**own, '0.weight': torch.zeros(5, 3), 'extra': torch.zeros(1)}
    del bad['1.bias']
    fct.test_eq(state_problems(bad, own), ['missing 1.bias', 'unexpected extra',
                                           'different shapes: 0.weight (5, 3) (model: (4, 3))'])
