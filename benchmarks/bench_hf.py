"""Pruner.prune on Hugging Face `transformers` models, heads named by `fasterprune.hf.hf_heads`.

    nice -n 10 .venv/bin/python benchmarks/bench_hf.py [--only llama,gpt2,bert,neox,phi3,t5,swin,swin_v2_t] [--runs 15]

Models from configs with random weights (transformers 5.24, no download), CPU, 1 thread, batch 1, T=128 tokens:
  llama: LlamaForCausalLM, d=512, 8 layers, 8 heads / 2 k/v heads, SwiGLU 1408, vocab 1000, untied
  gpt2:  GPT2LMHeadModel, d=512, 8 layers, 8 heads, MLP 2048, vocab 1000 (Conv1D turned into Linear first)
  bert:  BertForSequenceClassification, d=512, 8 layers, 8 heads, MLP 2048, vocab 1000, 2 labels
  neox:  GPTNeoXForCausalLM (Pythia-shaped: fused query_key_value interleaved per head, rotary_pct 0.25, parallel
         residual), d=512, 8 layers, 8 heads, MLP 2048, vocab 1000
  phi3:  Phi3ForCausalLM (fused qkv_proj, fused gate_up_proj), d=512, 8 layers, 8 heads / 8 k/v heads (Phi-3-mini's
         MHA), MLP 1408, vocab 1000; own_head_counts(model) first. Its fused gate_up_proj loses whole units (rows j and
         I + j, a `chunk` of one projection)
  t5:    T5ForConditionalGeneration (t5-small-shaped: d=512, d_kv 64, 8 heads, MLP 2048, 6 encoder + 6 decoder layers),
         vocab 1000; the example and the timed forward feed 128 encoder and 32 decoder tokens. Each stack keeps one
         head choice for all its layers (the first layer's relative position bias is shared); the MLPs prune
  swin:  SwinForImageClassification shaped as Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, MLP x4,
         1000 labels), one 224x224 image; each block's relative position table loses its removed heads' columns
  swin_v2_t: torchvision's swin_v2_t (weights=None), one 224x224 image, `Pruner(model, x)` (strict, no heads=: its
         ShiftedWindowAttentionV2 heads go with their cpb_mlp rows and logit scales); not a Hugging Face model, here to
         compare with `swin`
Each model is pruned at ratio 0.3 and 0.5 (local: every channel group and every attention block at the ratio; a block
with 2 k/v groups loses one at both ratios) with `Pruner(model, {'input_ids': ids}, heads=hf_heads(model),
strict=False)` (the rotary embedding of decoders is an op the channel graph does not know: its channels stay).
Columns: heads left per block, MLP width, parameters kept; theoretical speedup (fasterprune.metrics: Linear MACs);
FLOPs ratio counted by torch's FlopCounterMode (every op, the attention products included); measured latency ratio
pruned / dense (interleaved runs, median; below 1 = faster); the time of prune() and the verified max relative error
(pruned vs masked model, as the Pruner checks it). "paths" says whether a padded `attention_mask` forward (and for
the decoders `generate()`) still runs after the cut.
"""
import argparse, copy, time, warnings
import torch
from torch.utils.flop_counter import FlopCounterMode
from fasterprune.hf import hf_heads, conv1d_to_linear, own_head_counts
from fasterprune.pruner import Pruner
from fasterprune.metrics import theoretical_speedup, measured_speedup

warnings.filterwarnings('ignore')
V, T = 1000, 128


def build(name):
    import transformers as tf
    torch.manual_seed(0)
    if name == 'swin':
        cfg = tf.SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                            window_size=7, num_labels=1000)
        return tf.SwinForImageClassification(cfg)
    if name == 'swin_v2_t':
        from torchvision.models import swin_v2_t
        return swin_v2_t(weights=None)
    if name == 'llama':
        cfg = tf.LlamaConfig(vocab_size=V, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=T,
                             tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg)
    if name == 'gpt2':
        cfg = tf.GPT2Config(vocab_size=V, n_embd=512, n_layer=8, n_head=8, n_positions=T, bos_token_id=0,
                            eos_token_id=0)
        return conv1d_to_linear(tf.GPT2LMHeadModel(cfg))
    if name == 'neox':
        cfg = tf.GPTNeoXConfig(vocab_size=V, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                               num_attention_heads=8, max_position_embeddings=T, rotary_pct=0.25,
                               use_parallel_residual=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return tf.GPTNeoXForCausalLM(cfg)
    if name == 'phi3':
        cfg = tf.Phi3Config(vocab_size=V, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=T,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return own_head_counts(tf.Phi3ForCausalLM(cfg))
    if name == 't5':
        cfg = tf.T5Config(vocab_size=V, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return tf.T5ForConditionalGeneration(cfg)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                        intermediate_size=2048, max_position_embeddings=T, num_labels=2)
    return tf.BertForSequenceClassification(cfg)


def widths(name, m):
    "(heads left in the first block, MLP width of the first block)"
    if name == 'swin':
        b = m.swin.encoder.layers[0].blocks[0]
        return f"{b.attention.num_attention_heads}", b.mlp.fc1.out_features
    if name == 'swin_v2_t':
        b = m.features[1][0]
        return f"{b.attn.num_heads}", b.mlp[0].out_features
    if name == 'llama':
        a = m.model.layers[0].self_attn
        return f"{a.q_proj.out_features // a.head_dim}/{a.k_proj.out_features // a.head_dim}", \
            m.model.layers[0].mlp.gate_proj.out_features
    if name == 'gpt2':
        b = m.transformer.h[0]
        return f"{b.attn.c_proj.in_features // b.attn.head_dim}", b.mlp.c_fc.out_features
    if name == 'neox':
        b = m.gpt_neox.layers[0]
        return f"{b.attention.dense.in_features // b.attention.head_size}", b.mlp.dense_h_to_4h.out_features
    if name == 'phi3':
        a = m.model.layers[0].self_attn
        return f"{a.num_heads}/{a.num_key_value_heads}", m.model.layers[0].mlp.down_proj.in_features
    if name == 't5':
        b = m.encoder.block[0]
        return f"{b.layer[0].SelfAttention.n_heads}", b.layer[1].DenseReluDense.wo.in_features
    lay = m.bert.encoder.layer[0]
    s = lay.attention.self
    return f"{s.query.out_features // s.attention_head_size}", lay.intermediate.dense.out_features


def logits(out): return out.logits if hasattr(out, 'logits') else out


def call(m, x): return m(**x) if isinstance(x, dict) else m(x)


def flops(m, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad(): call(m, x)
    return fc.get_total_flops()


def paths(name, m):
    "Does a padded batch (and generate, for the decoders) still run after the cut?"
    ids = torch.randint(0, V, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        if name in ('swin', 'swin_v2_t'):  # two images of another size (padded to whole windows; not below 7x7 in
            px = torch.randn(2, 3, 256, 256)  # the last stage: HF Swin then shrinks a block's window size for good)
            call(m, {'pixel_values': px} if name == 'swin' else px)
            return 'ok'
        if name == 't5':
            m(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
            m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            return 'ok'
        m(input_ids=ids, attention_mask=mask)
        if name != 'bert': m.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    return 'ok'


def run(name, ratio, runs):
    dense = build(name).eval()
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    x = {'input_ids': ids}
    if name == 't5': x['decoder_input_ids'] = ids[:, :32]
    img = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    if name == 'swin': x = {'pixel_values': img}
    if name == 'swin_v2_t': x = img
    m = copy.deepcopy(dense)
    t0 = time.perf_counter()
    if name == 'swin_v2_t': pr = Pruner(m, x, keep_original=False)  # torchvision: no heads=, strict
    else: pr = Pruner(m, x, heads=hf_heads(m), strict=False, keep_original=False)
    pr.prune(ratio)
    secs = time.perf_counter() - t0
    h = pr.history[-1]
    n0, n1 = (sum(p.numel() for p in k.parameters()) for k in (dense, m))
    heads, mlp = widths(name, m)
    try: ok = paths(name, m)
    except Exception as e: ok = f"{type(e).__name__}"
    return dict(model=name, ratio=ratio, heads=heads, mlp=mlp, params_kept=n1 / n0,
                theo=theoretical_speedup(m, x, dense), fc=flops(m, x) / flops(dense, x),
                lat=1 / measured_speedup(dense, m, x, n_runs=runs, threads=1), prune_s=secs, err=h['rel_error'],
                paths=ok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--only', default='llama,gpt2,bert,neox,phi3,t5,swin,swin_v2_t')
    ap.add_argument('--ratios', default='0.3,0.5')
    ap.add_argument('--runs', type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':9} {'ratio':>5} {'heads':>5} {'MLP':>5} {'params':>7} {'theo x':>7} {'FLOPs':>6} {'lat p/d':>7} "
          f"{'prune s':>7} {'rel err':>8} paths")
    for name in args.only.split(','):
        for ratio in map(float, args.ratios.split(',')):
            r = run(name, ratio, args.runs)
            print(f"{r['model']:9} {r['ratio']:5.1f} {r['heads']:>5} {r['mlp']:5d} {r['params_kept']:7.3f} "
                  f"{r['theo']:7.2f} {r['fc']:6.3f} {r['lat']:7.3f} {r['prune_s']:7.2f} {r['err']:8.1e} {r['paths']}",
                  flush=True)


if __name__ == '__main__': main()
