"""Tests written from mutation testing (benchmarks/mutation.py): each one fails on a mutant that survived the other
tests, i.e. on a plausible wrong version of the library. Public behaviour only, so they outlive refactors."""
import dataclasses, math
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fasterprune.schedules import Schedule, one_shot, iterative, agp, linear, cos, sched_agp, get_schedule


# ---- schedules ---------------------------------------------------------------------------------------------------

def test_schedule_defaults_cover_all_training():
    "A bare Schedule runs from 0 to 1, is smooth (not stepwise), and is the shape itself in between"
    s = Schedule(lambda t: t)
    fct.test_eq((s.start_pct, s.end_pct, s.stepwise), (0., 1., False))
    fct.test_eq([s(p) for p in (0., 0.25, 0.5, 1.)], [0., 0.25, 0.5, 1.])


def test_schedules_are_immutable_hashable_values():
    s = agp()
    with pytest.raises(dataclasses.FrozenInstanceError): s.end_pct = 0.9
    fct.test_eq(len({agp(), agp(), iterative(3), iterative(3), iterative(4)}), 3)


def test_stepwise_flag():
    "one_shot and iterative jump (masks update at the jump), the smooth schedules do not"
    fct.test_eq([one_shot().stepwise, iterative().stepwise], [True, True])
    fct.test_eq([agp().stepwise, linear().stepwise, cos().stepwise, get_schedule(lambda p: p).stepwise],
                [False] * 4)


def test_schedule_window_validated():
    for a, b in ((-0.5, 0.5), (0.2, 1.5), (0.6, 0.4)):
        fct.test_fail(lambda: Schedule(lambda t: t, a, b), contains='start_pct')
    Schedule(lambda t: t, 0., 0.)  # the edges are allowed
    Schedule(lambda t: t, 1., 1.)


def test_fraction_above_one_refused():
    fct.test_fail(lambda: get_schedule(lambda p: 1.5)(0.3), contains='[0, 1]')
    fct.test_eq(get_schedule(lambda p: 1.)(0.3), 1.)
    fct.test_eq(get_schedule(lambda p: 0.)(0.3), 0.)


def test_one_shot_default_prunes_at_once():
    s = one_shot()
    fct.test_eq((s.start_pct, s.end_pct), (0., 0.))
    fct.test_eq([s(0.), s(0.5)], [1., 1.])
    fct.test_eq([one_shot(0.3)(0.29), one_shot(0.3)(0.3)], [0., 1.])


def test_iterative_exact_levels():
    "n equal steps at the start of n equal segments: the first step happens at start_pct itself"
    s = iterative(4, 0., 1.)
    fct.test_eq([s(p) for p in (0., 0.2, 0.25, 0.3, 0.5, 0.74, 0.75, 0.99, 1.)],
                [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1., 1., 1.])
    s = iterative(3, 0.2, 0.5)
    fct.test_close([s(0.19), s(0.2), s(0.25), s(0.35), s(0.45), s(0.5)], [0., 1 / 3, 1 / 3, 2 / 3, 1., 1.])
    fct.test_eq(iterative()(0.), 1 / 3)  # 3 steps by default
    fct.test_eq((iterative().start_pct, iterative().end_pct), (0., 0.5))


@pytest.mark.parametrize('n', [0, -1, 2.5])
def test_iterative_bad_steps(n):
    fct.test_fail(lambda: iterative(n), contains='whole number of steps')


def test_sched_agp_values():
    fct.test_close(sched_agp(0.2, 0.8, 0.), 0.2)
    fct.test_close(sched_agp(0.2, 0.8, 1.), 0.8)
    fct.test_close(sched_agp(0., 1., 0.5), 1 - 0.5 ** 3)
    fct.test_close(sched_agp(0.1, 0.5, 0.25), 0.5 + (0.1 - 0.5) * 0.75 ** 3)


# ---- sparsifier --------------------------------------------------------------------------------------------------
from fasterprune.sparsifier import Sparsifier, prunable_layers
from fasterprune import sparsifier as S


def test_attention_projection_name_hints_at_attention_flag():
    "Naming an attention input projection without attention=True says how to prune it"
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 4))
    fct.test_fail(lambda: prunable_layers(model, layers='0.in_proj_weight'), contains='attention=True')
    fct.test_eq(list(prunable_layers(model, layers='0.in_proj_weight', attention=True)), ['0.in_proj_weight'])
    with pytest.raises(ValueError) as e: prunable_layers(model, layers='2*')
    assert 'attention=True' not in str(e.value)  # the hint only where it helps


def test_zero_size_layer_is_reported_in_the_log(caplog):
    model = nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 4))
    with caplog.at_level('INFO', logger='fasterprune'): fct.test_eq(list(prunable_layers(model)), ['1'])
    assert any('hold no weight' in r.getMessage() for r in caplog.records), caplog.text


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 4))


def _dead_channels_zero(model, sp):
    "Every output channel whose filter is pruned has a zero bias and zero BatchNorm scale and shift"
    n_dead = 0
    for conv, bn in ((model[0], model[1]), (model[3], model[4])):
        dead = ~sp.masks[[n for n, m in sp.layers.items() if m is conv][0]].reshape(conv.out_channels, -1).any(1)
        n_dead += int(dead.sum())
        for p in (conv.bias, bn.weight, bn.bias): fct.test_eq(p.detach()[dead].abs().sum().item(), 0.)
    assert n_dead > 0


@pytest.mark.parametrize('reapply', ['apply_masks', 'masker', 'masker_by_layer'])
def test_coupled_filters_zero_bias_and_norm_of_dead_channels(reapply, monkeypatch):
    "Coupled filter pruning removes whole channels: their bias and BatchNorm affine stay zero through training steps"
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    sp = Sparsifier(model, 'filter', 'global', example_input=x).sparsify(0.4)
    _dead_channels_zero(model, sp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if reapply == 'masker_by_layer': monkeypatch.setattr(S, '_FUSED_MASKS_MAX', 0)  # the large-model path
    masker = sp.masker()  # what SparsifyCallback calls after each step
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        if reapply == 'apply_masks': sp.apply_masks()
        else: masker()
    _dead_channels_zero(model, sp)


@pytest.mark.parametrize('context', ['local', 'global'])
def test_coupled_sparsify_same_target_twice(context):
    "Asking again for the target already reached is not a shrink (each context counts its own rounding)"
    model = _cnn()
    sp = Sparsifier(model, 'filter', context, example_input=torch.randn(2, 3, 8, 8))
    for s in (0.3, 0.5, 0.5):
        sp.sparsify(s)
        before = {n: m.clone() for n, m in sp.masks.items()}
        sp.sparsify(s)
        for n, m in sp.masks.items(): fct.test_eq(m, before[n])
    fct.test_fail(lambda: sp.sparsify(0.2), contains='never shrink')


# ---- callback ----------------------------------------------------------------------------------------------------
import warnings
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import NMRoundingWarning
from fasterprune.data import digits_arrays, TensorPairs, mlp
from fasterprune.criteria import GradientMagnitude


def _learn(bs=64, n=256):
    torch.manual_seed(0)
    xt, yt, xv, yv = digits_arrays(True)
    dls = DataLoaders(DataLoader(TensorPairs(xt[:n], yt[:n]), bs=bs, shuffle=True, drop_last=True),
                      DataLoader(TensorPairs(xv[:128], yv[:128]), bs=128), device=torch.device('cpu'))
    learn = Learner(dls, mlp(64, 32, 12), loss_func=nn.CrossEntropyLoss())
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    return learn


def _zeros(cb): return sum(int((m.weight == 0).sum()) for m in cb.sparsifier.layers.values())
def _n_w(cb): return sum(m.weight.numel() for m in cb.sparsifier.layers.values())


def test_callback_coupled_needs_filter_granularity():
    fct.test_fail(lambda: SparsifyCallback(0.5, 'weight', coupled=True), contains="granularity='filter'")
    fct.test_eq(SparsifyCallback(0.5, 'filter', coupled=True).coupled, True)


def test_callback_nm_target_out_of_reach_prunes_the_most_it_can():
    "2:4 keeps 2 of every 4 weights: a 0.9 target warns, then prunes exactly half of every layer"
    with pytest.warns(NMRoundingWarning, match='will be 0.5'): cb = SparsifyCallback(0.9, '2:4', schedule=one_shot())
    learn = _learn()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NMRoundingWarning)
        learn.fit(1, 1e-2, cbs=cb)
    for n, m in cb.sparsifier.layers.items(): fct.test_eq(int((m.weight == 0).sum()), m.weight.numel() // 2)


def test_restart_prunes_again_in_the_next_fit():
    learn = _learn()
    cb = SparsifyCallback(0.5, schedule=one_shot())
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(_zeros(cb), round(0.5 * _n_w(cb)))
    assert cb.completed
    learn.fit(1, 1e-2, cbs=cb)  # a completed schedule keeps its masks
    fct.test_eq(_zeros(cb), round(0.5 * _n_w(cb)))
    assert cb.restart(0.8) is cb
    assert not cb.completed
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq(_zeros(cb), round(0.8 * _n_w(cb)))


def test_no_sparsity_column_when_not_asked():
    learn = _learn()
    learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, schedule=one_shot(), show_sparsity=False))
    assert 'sparsity' not in learn.recorder.metric_names
    learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, schedule=one_shot()))
    assert 'sparsity' in learn.recorder.metric_names


def test_default_update_every_gives_at_least_eight_updates_in_a_late_window():
    "update_every=None: at least 8 mask updates inside the schedule's window, wherever the window starts"
    learn = _learn(bs=16, n=512)  # 32 steps per epoch, 64 in the fit; the window [0.5, 0.75] is 16 steps
    cb = SparsifyCallback(0.8, schedule=agp(0.5, 0.75))
    learn.fit(2, 1e-2, cbs=cb)
    assert len(cb.history) >= 8, cb.history
    assert all(0.5 < h['pos'] <= 0.75 + 1e-9 for h in cb.history), cb.history
    fct.test_eq(_zeros(cb), round(0.8 * _n_w(cb)))


class _CountingGradient(GradientMagnitude):
    "Gradient magnitude that records, at each scoring, how many training steps it has summed since its last reset"
    def __init__(self):
        super().__init__()
        self.since, self.seen = 0, []
    def accumulate(self, params):
        self.since += 1
        super().accumulate(params)
    def reset(self):
        self.since = 0
        super().reset()
    def score(self, name, w, out=None):
        self.seen.append(self.since)
        return super().score(name, w, out)


def test_gradient_criteria_sum_this_fits_steps_since_the_last_update():
    crit = _CountingGradient()
    for _ in range(5): crit.accumulate({})  # left over from an earlier use: a new fit starts from zero
    learn = _learn()  # 4 steps per epoch
    cb = SparsifyCallback(0.5, criteria=crit, schedule=linear(0., 0.75), update_every=2)
    learn.fit(2, 1e-2, cbs=cb)
    assert crit.seen and crit.seen[0] == 2, crit.seen
    assert set(crit.seen) <= {1, 2}, crit.seen
    fct.test_eq(_zeros(cb), round(0.5 * _n_w(cb)))


def test_fit_logs_the_final_sparsity_report(caplog):
    learn = _learn()
    with caplog.at_level('INFO', logger='fasterprune'): learn.fit(1, 1e-2, cbs=SparsifyCallback(0.5, schedule=one_shot()))
    assert any('0.5000 sparsity' in r.getMessage() for r in caplog.records), caplog.text


def test_all_zero_per_layer_targets_prune_nothing():
    learn = _learn()
    cb = SparsifyCallback({'0': 0., '2': 0.}, schedule='linear')
    learn.fit(1, 1e-2, cbs=cb)
    fct.test_eq((cb.history, _zeros(cb)), ([], 0))


# ---- pruner ------------------------------------------------------------------------------------------------------
from fasterprune.pruner import Pruner, PrunedMultiheadAttention, save_pruned, load_pruned


@pytest.mark.parametrize('batch_first', [False, True])
def test_pruned_attention_with_every_head_is_torchs_attention(batch_first):
    "PrunedMultiheadAttention with all its heads computes what nn.MultiheadAttention does: masks, weights, cross-attention"
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    pm = PrunedMultiheadAttention(8, 2, batch_first=batch_first).eval()
    pm.load_state_dict(ref.state_dict())
    T, S, B = 3, 5, 2
    q, kv = torch.randn(T, B, 8), torch.randn(S, B, 8)
    if batch_first: q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kp = torch.zeros(B, S, dtype=torch.bool)
    kp[0, -2:] = True
    am = torch.zeros(T, S, dtype=torch.bool)
    am[1, 0] = True
    with torch.no_grad():
        for kw in (dict(), dict(key_padding_mask=kp), dict(attn_mask=am), dict(average_attn_weights=False)):
            for nw in (True, False):
                (o1, w1), (o2, w2) = ref(q, kv, kv, need_weights=nw, **kw), pm(q, kv, kv, need_weights=nw, **kw)
                fct.test_close(o2, o1, eps=1e-5)
                if nw: fct.test_close(w2, w1, eps=1e-5)
                else: assert w1 is None and w2 is None


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(8, 4), nn.Linear(8, 3)
    def forward(self, x): return self.head(self.mha(x, x, x, need_weights=False)[0].mean(0))


@pytest.mark.parametrize('silence', ['out_proj', 'value'])
def test_compact_removes_silent_heads_only(silence):
    "A head whose output-projection columns are zero, or whose value rows and bias are zero, is removed; no other"
    torch.manual_seed(0)
    m = _Attn().eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        if silence == 'out_proj': m.mha.out_proj.weight[:, 2:4] = 0  # head 1 of 4 (head_dim 2)
        else:
            m.mha.in_proj_weight[16 + 2:16 + 4] = 0
            m.mha.in_proj_bias[16 + 2:16 + 4] = 0
        ref = m(x)
    Pruner(m, x).compact()
    fct.test_eq((m.mha.num_heads, m.mha.in_proj_weight.shape[0], m.mha.out_proj.in_features), (3, 18, 6))
    with torch.no_grad(): fct.test_close(m(x), ref, eps=1e-5)


@pytest.mark.parametrize('window,shift', [([2, 3], [1, 2]), ([2, 2], [0, 0])])
def test_compact_swin_window_attention_keeps_the_output(window, shift):
    "Silent heads of a (shifted, padded) Swin window attention go, twice; the smaller module computes the same output"
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    torch.manual_seed(0)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = ShiftedWindowAttention(12, window, shift, 3), nn.Linear(12, 3)
        def forward(self, x): return self.head(self.attn(x).mean((1, 2)))
    m = M().eval()
    x = torch.randn(2, 4, 5, 12)  # 4x5 pads to whole windows; rectangular windows and shifts
    pr = Pruner(m, x)
    for heads, cols in ((2, slice(8, 12)), (1, slice(0, 4))):  # silence the last head, then the first one left
        with torch.no_grad():
            m.attn.proj.weight[:, cols] = 0
            ref = m(x)
        pr.compact()
        fct.test_eq((m.attn.num_heads, m.attn.qkv.out_features, m.attn.proj.in_features), (heads, 12 * heads, 4 * heads))
        with torch.no_grad():
            fct.test_close(m(x), ref, eps=1e-5)
            fct.test_eq(m(torch.randn(1, 4, 6, 12)).shape, (1, 3))  # another size runs too


def test_compacted_attention_saved_and_loaded_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    m = _Attn().eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad(): m.mha.out_proj.weight[:, 2:4] = 0
    Pruner(m, x).compact()
    save_pruned(m, tmp_path / 'a.pt')
    fresh = load_pruned(_Attn(), tmp_path / 'a.pt').eval()
    fct.test_eq((type(fresh.mha), fresh.mha.num_heads), (PrunedMultiheadAttention, 3))
    with torch.no_grad(): fct.test_eq(fresh(x), m(x))


def test_recipe_that_does_not_fit_the_model_is_refused():
    from fasterprune.pruner import pruning_recipe, apply_recipe
    r = pruning_recipe(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    fct.test_fail(lambda: apply_recipe(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), r), contains="recipe entry '1'")


def test_prune_removes_the_lowest_scoring_attention_heads():
    torch.manual_seed(0)
    m = _Attn().eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        for h in (0, 2):  # heads 0 and 2 (head_dim 2) get tiny weights: magnitude ranks them last
            rows = torch.cat([torch.arange(2 * h, 2 * h + 2) + k * 8 for k in range(3)])
            m.mha.in_proj_weight[rows] *= 1e-3
            m.mha.out_proj.weight[:, 2 * h:2 * h + 2] *= 1e-3
    q_kept = m.mha.in_proj_weight.detach()[[2, 3, 6, 7]].clone()
    Pruner(m, x).prune(0.5)
    fct.test_eq(m.mha.num_heads, 2)
    fct.test_eq(m.mha.in_proj_weight.detach()[:4], q_kept)


def test_relative_error_of_empty_outputs_is_zero():
    from fasterprune.pruner import relative_error
    fct.test_eq(relative_error(torch.empty(0), torch.empty(0)), 0.)
    fct.test_eq(relative_error(torch.ones(3), torch.ones(3)), 0.)
    fct.test_eq(relative_error(torch.ones(2), torch.tensor([1., 1.5])), 0.5)


def test_global_prune_removes_exactly_the_ratio_of_channels():
    torch.manual_seed(0)
    m = mlp(8, 16, 16, 4)
    Pruner(m, torch.randn(4, 8)).prune(0.5, context='global')
    fct.test_eq(m[0].out_features + m[2].out_features, 16)


class _Written(nn.Module):
    "A hand-written attention block (named to the Pruner with AttentionHeads)"
    def __init__(self):
        super().__init__()
        self.h, self.hd = 4, 2
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)
    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.h, self.hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(self.wo(o.transpose(1, 2).reshape(B, T, -1)).mean(1))


def test_compact_removes_a_silent_hand_written_head():
    from fasterprune.graph import AttentionHeads
    torch.manual_seed(0)
    m = _Written().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        m.wo.weight[:, 2:4] = 0  # head 1 is silent
        ref = m(x)
    Pruner(m, x, heads={'': AttentionHeads('h', 'wq', 'wk', 'wv', 'wo')}).compact()
    fct.test_eq((m.h, m.wq.out_features, m.wo.in_features, m.wo.out_features), (3, 6, 6, 8))
    with torch.no_grad(): fct.test_close(m(x), ref, eps=1e-5)


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_prune_failing_before_the_cut_restores_the_zeroed_filters(monkeypatch):
    "An error after the chosen filters were zeroed (re-tracing, folding analysis) leaves the model exactly as it was"
    import fasterprune.pruner as P
    torch.manual_seed(0)
    m = _conv_net().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pr = Pruner(m, torch.randn(2, 3, 8, 8))
    def boom(*a, **k): raise RuntimeError("analysis failed")
    monkeypatch.setattr(P, '_removable', boom)
    with pytest.raises(RuntimeError, match='analysis failed'): pr.prune(0.5)
    for k, v in m.state_dict().items(): assert torch.equal(v, before[k]), k


def test_pruner_rewinding_calls_chain():
    "keep_rewind_point and rewind return the Pruner, so the README's chained calls work"
    torch.manual_seed(0)
    m = _conv_net().eval()
    pr = Pruner(m, torch.randn(2, 3, 8, 8))
    assert pr.keep_rewind_point() is pr
    pr.prune_weights(0.5)
    assert pr.rewind() is pr
