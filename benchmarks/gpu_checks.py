"""The GPU checks of issue 6, as one prepared script for a task that is lent a device (not run yet: no GPU so far).

    .venv/bin/python benchmarks/gpu_checks.py            # on a machine with CUDA; prints a table, exits 1 on a failed check

1. SparsifyCallback on the GPU with bf16 and fp16 mixed precision (fastai `to_bf16()` / `to_fp16()`): masked weights
   exactly zero after the fit, sparsity exact — weight/global/AGP, and filter/coupled/AGP (several mask updates,
   which exercises the device handling of coupled groups).
2. Lottery rounds on the GPU with a layer of more than 32 k weights (the sampled selection path).
3. N:M: a Linear layer pruned 2:4 by the Sparsifier, converted with `torch.sparse.to_sparse_semi_structured`,
   timed against the dense layer (fp16, interleaved runs, CUDA-synchronized, median ratio). Needs an Ampere or newer
   card; record the card's name with the figures in benchmarks/RESULTS.md.
4. Rewinding after a filter `SparsifyCallback` on the GPU: the pruned channels' BatchNorm entries stay zero through a
   rewind and a fit, and `compact()` removes them (`rewind_check`, runnable on the CPU with `rewind_check('cpu')`).
"""
import statistics, sys, time, warnings
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F

warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).parent))


def check(name, ok, detail=''):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    return bool(ok)


def callback_checks():
    from fasterprune import sparsifier as S
    limit = S._FUSED_MASKS_MAX
    try: return _callback_checks(S, limit)
    finally: S._FUSED_MASKS_MAX = limit


def _callback_checks(S, limit):
    from fastai.learner import Learner
    import fastai.callback.fp16, fastai.callback.schedule  # noqa: F401
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import digits_dls, lenet_300_100, small_cnn
    ok = True
    for prec, fused in (('to_bf16', True), ('to_fp16', True), ('to_bf16', False)):
        # fused=False: the per-step masking of large models (a `where` per layer with the bool masks)
        S._FUSED_MASKS_MAX = limit if fused else 100
        for gran, flat, make in (('weight', True, lenet_300_100), ('filter', False, small_cnn)):
            torch.manual_seed(0)
            dls = digits_dls(flat=flat, device=torch.device('cuda'))
            learn = getattr(Learner(dls, make().cuda(), loss_func=nn.CrossEntropyLoss()), prec)()
            cb = SparsifyCallback(0.5 if gran == 'filter' else 0.9, gran, 'global', 'magnitude', 'agp')
            learn.fit_one_cycle(3, 1e-2, cbs=cb)
            sp = cb.sparsifier
            zero = all(bool((sp.layers[n].weight[~mk] == 0).all()) for n, mk in sp.masks.items())
            how = '' if fused else ' (layer by layer)'
            ok &= check(f"{prec} {gran}{how}: masked weights exactly zero on cuda", zero and sp.masker().fused == fused,
                        f"sparsity {sp.sparsity():.4f}, {len(cb.history)} updates")
            if gran == 'weight':
                n = sum(m.weight.numel() for m in sp.layers.values())
                ok &= check(f"{prec} weight{how}: exact count",
                            sum(int((m.weight == 0).sum()) for m in sp.layers.values()) == round(0.9 * n))
    return ok


def grad_accumulation_check(dev='cuda'):
    "Gradient criteria accumulate a step in fused kernels on a device: the sums equal a per-layer float64 reference"
    from fasterprune.criteria import get_criterion
    g = torch.Generator(dev).manual_seed(0)
    shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (1000, 512), (37,)]
    ok = True
    for name in ('gradient_magnitude', 'movement'):
        for dt in (torch.float32, torch.bfloat16):
            ps = {f'l{i}': nn.Parameter(torch.randn(s, generator=g, device=dev).to(dt)) for i, s in enumerate(shapes)}
            crit, ref, scale = get_criterion(name), {}, {}
            for _ in range(3):
                for k, p in ps.items():
                    p.grad = torch.randn(p.shape, generator=g, device=dev).to(dt)
                    t = p.detach().double() * p.grad.double()
                    ref[k] = ref.get(k, 0) + (t.abs() if name == 'gradient_magnitude' else -t)
                    scale[k] = scale.get(k, 0) + t.abs()  # movement's signed sums cancel: errors relative to |terms|
                crit.accumulate(ps)
            tol = 1e-5 if dt == torch.float32 else 2e-2
            err = max(float(((crit.acc[k].double() - ref[k]).abs() / (scale[k] + 1e-12)).max()) for k in ps)
            ok &= check(f"{name} {str(dt)[6:]}: fused accumulation on {dev} equals the reference", err <= tol,
                        f"max relative error {err:.1e} (tolerance {tol:g})")
    return ok


def nan_check_fp16(dev='cuda'):
    "StopOnNaNCallback's gradient check on the device: large finite fp16 gradients read finite, one NaN does not"
    from fasterprune.distributed import _grads_finite
    big = [torch.full((10_000,), 1000., dtype=torch.float16, device=dev), torch.ones(3, device=dev)]
    bad = [big[0].clone(), big[1]]
    bad[0][17] = float('nan')
    ok_big, ok_bad = _grads_finite(big), _grads_finite(bad)
    return check(f"StopOnNaN's fp16 gradient check on {dev}", ok_big and not ok_bad,
                 f"finite fp16 (norm 1e5 > fp16 max) read finite: {ok_big}; one NaN read finite: {ok_bad}")


def distill_check(dev='cuda'):
    "DistillCallback on CUDA: a bf16 teacher beside a `to_bf16()` student trains with a finite loss, the teacher untouched"
    import copy
    from fastai.learner import Learner
    import fastai.callback.fp16  # noqa: F401  (Learner.to_bf16)
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import digits_dls, lenet_300_100
    from fasterprune.distill import DistillCallback
    torch.manual_seed(0)
    learn = Learner(digits_dls(device=torch.device(dev)), lenet_300_100().to(dev), loss_func=nn.CrossEntropyLoss())
    teacher = copy.deepcopy(learn.model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    learn.to_bf16()
    learn.fit(1, 1e-2, cbs=[SparsifyCallback(0.9), DistillCallback(teacher)])
    loss = learn.recorder.losses[-1]
    same = all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    return check(f"DistillCallback on {dev}: bf16 teacher, to_bf16 student", bool(torch.isfinite(loss)) and same,
                 f"last training loss {float(loss):.4f}, teacher unchanged: {same}")


def rewind_check(dev='cuda'):
    "Eighth session: a rewind after a filter SparsifyCallback keeps pruned units' weights, biases and norm entries at 0"
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    from fasterprune.data import digits_dls, small_cnn
    from fasterprune.lottery import LotteryTicket
    from fasterprune.pruner import Pruner
    torch.manual_seed(0)
    learn = Learner(digits_dls(flat=False, device=torch.device(dev)), small_cnn(c=16).to(dev),
                    loss_func=nn.CrossEntropyLoss())
    lt = LotteryTicket(learn, rate=0.2)
    cb = SparsifyCallback(0.5, 'filter', schedule='one_shot', show_sparsity=False)
    learn.fit(1, 1e-2, cbs=cb)
    bn = learn.model[1]
    gone = bn.weight.detach() == 0
    lt.next_round()
    learn.fit(1, 1e-2)  # the ticket trains alone
    held = int(bn.weight.detach()[gone].ne(0).sum()) + int(bn.bias.detach()[gone].ne(0).sum())
    conv = learn.model[0]
    dead = int((conv.weight.detach() == 0).flatten(1).all(1).sum())
    Pruner(learn).compact()
    ok = held == 0 and int(gone.sum()) > 0 and conv.out_channels == 16 - dead
    return check(f"rewinding after a filter SparsifyCallback on {dev}: pruned channels' norm entries held, compacted",
                 ok, f"{int(gone.sum())} channels pruned, {held} entries back, conv {conv.out_channels} of 16 kept")


def lottery_check():
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fasterprune.data import digits_dls, mlp
    from fasterprune.lottery import lottery_experiment
    def make_learner():
        return Learner(digits_dls(device=torch.device('cuda')), mlp(64, 1024, 256, 10).cuda(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    res = lottery_experiment(make_learner, rounds=3, rate=0.5, epochs=1, controls=('random',), progress=False)
    return check("lottery rounds on cuda (layers > 32 k weights)", len(res['rows']) == 4, f"{res['rows'][-1]}")


def engine_check(dev='cuda', cases=60):
    "The device selection against a full sort on `dev`: fp32/bf16/fp16 with ties, group sizes, earlier masks"
    from fasterprune.sparsifier import device_select_prune
    bad = 0
    for case in range(cases):
        g = torch.Generator().manual_seed(case)
        dt = (torch.float32, torch.bfloat16, torch.float16)[case % 3]
        scores, sizes, prevs = [], [], []
        for _ in range(1 + case % 4):
            n = int(torch.randint(1, 200_000, (1,), generator=g))
            x = torch.randn(n, generator=g).abs()
            if case % 2: x = (x * 4).round() / 4  # many ties
            scores.append(x.to(dt).to(dev))
            sizes.append((1, 1, 3, 9)[int(torch.randint(0, 4, (1,), generator=g))])
            prevs.append(None if case % 5 < 2 else (torch.rand(n, generator=g) < 0.7).to(dev))
        n_w = sum(len(s) * z for s, z in zip(scores, sizes))
        k = int(torch.randint(0, n_w + 1, (1,), generator=g))
        got = torch.cat(device_select_prune([lambda out=None, s=s: s for s in scores], [len(s) for s in scores],
                                            sizes, k, prevs, device=dev)).cpu()
        v = torch.cat([s.float().cpu() for s in scores])
        sz = torch.cat([torch.full((len(s),), z, dtype=torch.int64) for s, z in zip(scores, sizes)])
        lv = torch.cat([torch.ones(len(s), dtype=torch.bool) if p is None else p.cpu() for s, p in zip(scores, prevs)])
        kk = k - int((sz * ~lv).sum())
        ref = lv.clone()
        if kk > 0:
            idx = lv.nonzero().squeeze(1)
            order = idx[torch.argsort(v[idx], stable=True)]
            ref[order[:int((torch.cumsum(sz[order], 0) <= kk).sum())]] = False
        bad += not torch.equal(got, ref)
    return check(f"device selection equals a full sort on {dev} ({cases} cases)", bad == 0, f"{bad} mismatches")


def coupled_check(dev='cuda', size=64):
    "Filter masks on grouped-conv units and attention heads, then compact, on `dev`: kept equal to Pruner.prune's"
    import copy, logging
    from bench_zoo import build, n_params, _calibrate_bn, _no_zero_layers
    from fasterprune.sparsifier import Sparsifier
    from fasterprune.pruner import Pruner
    logging.getLogger('fasterprune').setLevel(logging.ERROR)
    ok = True
    for name in ('regnet_y_400mf', 'vit_b_16'):
        x = torch.randn(1, 3, 224 if name == 'vit_b_16' else size, 224 if name == 'vit_b_16' else size)
        torch.manual_seed(0)
        model = build(name).eval()
        _no_zero_layers(model)
        _calibrate_bn(model, x)  # on the CPU, then both go to the device
        model, x = model.to(dev), x.to(dev)
        twin, n0 = copy.deepcopy(model), n_params(model)
        Sparsifier(model, 'filter', 'local', attention=True).couple(x).sparsify(0.5)
        pr = Pruner(model, x, keep_original=False)
        pr.compact()
        Pruner(twin, x, keep_original=False).prune(0.5)
        a, b = n_params(model) / n0, n_params(twin) / n0
        ok &= check(f"{name} filter masks + compact on {dev} keep what Pruner.prune keeps", abs(a - b) < 1e-9,
                    f"{a:.3f} vs {b:.3f}, verified rel. error {pr.history[-1]['rel_error']:.1e}")
    return ok


def nm_speed(rows=8192, features=(4096, 4096), runs=50):
    from fasterprune.sparsifier import Sparsifier
    from torch.sparse import to_sparse_semi_structured
    lin = nn.Linear(*features, bias=False).half().cuda()
    Sparsifier(nn.Sequential(lin), '2:4').sparsify(0.5)
    w = lin.weight.detach()
    ok = check("2:4 pattern", bool(((w.reshape(-1, 4) != 0).sum(1) <= 2).all()))
    ws = to_sparse_semi_structured(w)
    x = torch.randn(rows, features[0], dtype=torch.half, device='cuda')
    dense_out, sparse_out = F.linear(x, w), F.linear(x, ws)
    ok &= check("semi-structured output equals dense", torch.allclose(dense_out, sparse_out, rtol=1e-2, atol=1e-2))
    def t(weight):
        torch.cuda.synchronize(); s = time.perf_counter()
        for _ in range(10): F.linear(x, weight)
        torch.cuda.synchronize(); return (time.perf_counter() - s) / 10
    for _ in range(5): t(w); t(ws)
    ratios = []
    for i in range(runs):
        a, b = (t(w), t(ws)) if i % 2 == 0 else tuple(reversed((t(ws), t(w))))
        ratios.append(a / b)
    print(f"2:4 semi-structured Linear {features}, x {rows} rows, fp16, {torch.cuda.get_device_name()}: "
          f"measured speedup vs dense, median of {runs} interleaved pairs: {statistics.median(ratios):.3f}x")
    return ok


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU"); return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    ok = callback_checks()
    ok &= grad_accumulation_check()
    ok &= nan_check_fp16()
    ok &= distill_check()
    ok &= lottery_check()
    ok &= rewind_check()
    ok &= nm_speed()
    return 0 if ok else 1


if __name__ == '__main__': sys.exit(main())
