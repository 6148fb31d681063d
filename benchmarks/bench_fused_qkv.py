"""Pruner.prune on transformers with ONE fused q/k/v projection: a timm-style ViT and a nanoGPT, with and without
`heads=` (AttentionHeads(..., qkv=...)): whole heads removed from the q | k | v row segments, or the attention left
dense (the MLP and the residual width still prune).

    nice -n 10 .venv/bin/python benchmarks/bench_fused_qkv.py [--runs 15] [--only vit|gpt|timm] [--dev cpu|cuda]

timm's real `vit_tiny_patch16_224` (random weights, `pretrained=False`) is added when timm imports (it is not a
dependency: `pip install --target /tmp/timm timm --no-deps`, then PYTHONPATH=/tmp/timm); skipped otherwise.
Models (random weights):
  vit: timm-style ViT, 16x16 images, 4x4 patches (16 tokens + a class token), d=192, 6 blocks, 3 heads, MLP 768
  gpt: nanoGPT, vocab 256, d=256, 4 layers, 8 heads, T=64, tied embedding / lm head
  timm: timm.create_model('vit_tiny_patch16_224'): d=192, 12 blocks, 3 heads, 197 tokens
Columns: heads named or not; the ratio (local: each group at the ratio; 3 heads: 0.3 → 1 head, 0.5 → 2 heads);
heads left in block 0 and the fused projection's width; params kept; theoretical speedup (fasterprune.metrics,
Linear/Conv MACs, the attention products not counted); measured latency ratio pruned / dense (interleaved runs, batch
1, median, 1 CPU thread; below 1 = faster); the time of prune() (tracing, scoring, surgery, verification) and of the
surgery; the verified max relative error (pruned vs masked model, on the example and a perturbed copy).
"""
import argparse, copy, math, os, sys, time, warnings
import torch, torch.nn as nn, torch.nn.functional as F
from fasterprune.graph import AttentionHeads
from fasterprune.pruner import Pruner
from fasterprune.metrics import theoretical_speedup, measured_speedup

warnings.filterwarnings('ignore')


class Attention(nn.Module):
    "timm's Attention (1.0): `qkv`, `reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`, SDPA, `proj`"
    def __init__(self, d, h):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.attn_dim = h * self.head_dim
        self.qkv, self.proj = nn.Linear(d, 3 * self.attn_dim), nn.Linear(self.attn_dim, d)
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, self.attn_dim))

class CausalSelfAttention(nn.Module):
    "nanoGPT's, with C = self.n_embd (the attention width, which the Pruner updates: width='n_embd')"
    def __init__(self, d, h):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n_head, self.n_embd = h, d
    def forward(self, x):
        B, T, _ = x.size()
        C = self.n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

class Block(nn.Module):
    def __init__(self, attn, d, hidden):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d), attn, nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

class ViT(nn.Module):
    def __init__(self, d=192, depth=6, h=3, img=16, patch=4, n_cls=10):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token, self.pos_embed = nn.Parameter(torch.randn(1, 1, d) * .02), nn.Parameter(torch.randn(1, n + 1, d) * .02)
        self.blocks = nn.ModuleList(Block(Attention(d, h), d, 4 * d) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, n_cls)
    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks: x = b(x)
        return self.head(self.norm(x)[:, 0])

class GPT(nn.Module):
    def __init__(self, vocab=256, d=256, n_layer=4, h=8, T=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.h = nn.ModuleList(Block(CausalSelfAttention(d, h), d, 4 * d) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT
    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.h: x = b(x)
        return self.lm_head(self.ln_f(x))

TIMM_SPEC = AttentionHeads('num_heads', qkv='qkv', o='proj', head_dim='head_dim', width='attn_dim')
GPT_SPEC = AttentionHeads('n_head', qkv='c_attn', o='c_proj', width='n_embd')


def timm_vit():
    try: import timm
    except ImportError: return None
    return timm.create_model('vit_tiny_patch16_224', pretrained=False)


def models(dev):
    g = torch.Generator().manual_seed(1)
    out = dict(vit=(lambda: ViT(), torch.randn(2, 3, 16, 16, generator=g), {'blocks.*.attn': TIMM_SPEC},
                    lambda m: m.blocks[0].attn, lambda a: (a.num_heads, a.qkv.out_features)),
               gpt=(lambda: GPT(), torch.randint(0, 256, (2, 64), generator=g), {'h.*.attn': GPT_SPEC},
                    lambda m: m.h[0].attn, lambda a: (a.n_head, a.c_attn.out_features)))
    if timm_vit() is not None:
        out['timm'] = (timm_vit, torch.randn(2, 3, 224, 224, generator=g), {'blocks.*.attn': TIMM_SPEC},
                       lambda m: m.blocks[0].attn, lambda a: (a.num_heads, a.qkv.out_features))
    else: print("timm not importable: the real vit_tiny_patch16_224 row is skipped")
    return out


def run(name, spec, heads, ratio, runs, dev):
    make, x, hspec, attn, shape = spec
    torch.manual_seed(0)
    dense = make().eval().to(dev)
    x = x.to(dev)
    m = copy.deepcopy(dense)
    t0 = time.perf_counter()
    pr = Pruner(m, x, heads=hspec if heads else None, keep_original=False)
    pr.prune(ratio)
    secs = time.perf_counter() - t0
    h = pr.history[-1]
    x1 = x[:1]
    n0, n1 = (sum(p.numel() for p in k.parameters()) for k in (dense, m))
    H, W = shape(attn(m))
    lat = 1 / measured_speedup(dense, m, x1, n_runs=runs, threads=1 if dev == 'cpu' else None)
    return dict(model=name, heads='yes' if heads else 'no', ratio=ratio, H=H, W=W, params=n1 / n0,
                theo=theoretical_speedup(m, x1, dense), lat=lat, prune_s=secs, surgery_s=h['seconds'],
                err=h['rel_error'])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--only', choices=['vit', 'gpt', 'timm'])
    ap.add_argument('--runs', type=int, default=15)
    ap.add_argument('--dev', default='cpu')
    args = ap.parse_args()
    if args.dev == 'cpu': torch.set_num_threads(1)
    specs = models(args.dev)
    rows = [run(n, s, hd, r, args.runs, args.dev) for n, s in specs.items() if args.only in (None, n)
            for hd in (False, True) for r in (0.3, 0.5)]
    print(f"{'model':5} {'heads':>5} {'ratio':>5} {'H':>2} {'qkv w':>5} {'params':>7} {'theo x':>7} {'lat p/d':>7} "
          f"{'prune s':>7} {'surg s':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['model']:5} {r['heads']:>5} {r['ratio']:5.1f} {r['H']:2d} {r['W']:5d} {r['params']:7.3f} "
              f"{r['theo']:7.2f} {r['lat']:7.3f} {r['prune_s']:7.2f} {r['surgery_s']:6.2f} {r['err']:8.1e}")


if __name__ == '__main__': main()
