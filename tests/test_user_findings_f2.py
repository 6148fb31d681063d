"F2 (a graph fuzzer's findings) and a compiled model in a Learner: silent wrong results the Pruner must not give"
import copy, logging
import pytest, torch
from torch import nn
import torch.nn.functional as F
import fastcore.test as fct
from fasterprune.pruner import Pruner, SurgeryError, relative_error

class SizeNet(nn.Module):
    "conv -> BN -> act -> a pooling `how` whose result for a constant channel may depend on the input size -> fc"
    def __init__(self, how='sum', act=None):
        super().__init__()
        self.how, self.act = how, act or nn.ReLU()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        with torch.no_grad(): self.bn.bias.uniform_(0.5, 1.0)  # a positive shift: relu(beta) is a nonzero constant
    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        if self.how == 'sum': x = x.sum((2, 3))
        elif self.how == 'avgpad': x = F.avg_pool2d(x, 3, 1, 1).mean((2, 3))
        elif self.how == 'zeropad': x = F.pad(x, (1, 1, 1, 1)).mean((2, 3))
        elif self.how == 'zeropad_module': x = nn.functional.adaptive_avg_pool2d(nn.ZeroPad2d(2)(x), 1).flatten(1)
        elif self.how == 'times_width': x = x.mean((2, 3)) * x.shape[-1]
        elif self.how == 'mean': x = x.mean((2, 3))
        elif self.how == 'max_interp': x = F.interpolate(F.max_pool2d(x, 2), scale_factor=2).amax((2, 3))
        return self.fc(x)

def _zero_filters(m):
    with torch.no_grad():
        m.conv.weight[:4] = 0
        m.conv.bias[:4] = 0

def _same_at_sizes(masked, m, sizes=(8, 16, 5)):
    with torch.no_grad():
        for hw in sizes:
            xi = torch.randn(2, 3, hw, hw)
            fct.test_close(m(xi), masked(xi), eps=1e-4 * float(masked(xi).abs().max()))

@pytest.mark.parametrize('how', ['sum', 'avgpad', 'zeropad', 'zeropad_module', 'times_width'])
def test_compact_does_not_fold_a_constant_that_depends_on_the_input_size(how):
    "compact() after filter masks: a BN shift through a sum / zero padding is c·H·W, not a constant: not folded"
    torch.manual_seed(0)
    m = SizeNet(how).eval()
    _zero_filters(m)
    masked = copy.deepcopy(m)
    Pruner(m, torch.randn(4, 3, 8, 8)).compact()
    _same_at_sizes(masked, m)

@pytest.mark.parametrize('how', ['mean', 'max_interp'])
def test_compact_still_folds_a_constant_the_size_does_not_change(how):
    "mean, max, interpolate keep a constant the same constant: the channels go, the fold is right at every size"
    torch.manual_seed(0)
    m = SizeNet(how).eval()
    _zero_filters(m)
    masked = copy.deepcopy(m)
    Pruner(m, torch.randn(4, 3, 8, 8)).compact()
    fct.test_eq(m.conv.out_channels, 4)
    _same_at_sizes(masked, m)

def test_prune_with_sigmoid_and_sum_pooling_is_right_at_other_sizes():
    "prune(): Sigmoid(0) = 0.5 is a constant; summed over the positions it is not, so those channels stay zeroed"
    torch.manual_seed(0)
    m = SizeNet('sum', nn.Sigmoid()).eval()
    twins = []
    pr = Pruner(m, torch.randn(4, 3, 8, 8))
    orig = pr._surgery
    pr._surgery = lambda *a: (twins.append(copy.deepcopy(pr.model)), orig(*a))[1]
    pr.prune(0.5)
    _same_at_sizes(twins[-1].eval(), m)
