"""What torch's autograd saves for backward in one encoder layer, op for op as
mlm's model files compute it (src/model/bert.rs, deberta.rs, deberta_attention.rs,
gpt2.rs, layers.rs), on the CPU, without padding (training chunks have none): the
reference of `a_cpu_layer_saves_what_autograd_saves`
in src/train/memory.rs.

Usage: saved_tensors.py [ROWS]   (default 4; prints bytes per layer)

Counts the distinct storages `torch.autograd.graph.saved_tensors_hooks` sees,
parameters left out. fp32, dropout 0.1, block 128, hidden 256, 4 heads,
intermediate 1024; DeBERTa with c2p and p2c over a span of 256; GPT-2's pre-LN
block (causal attention written out, as on the CPU with dropout) and its head
(ln_f and the tied projection) over every position but each block's last, vocab 512.
"""
import math
import sys

import torch
import torch.nn.functional as F

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
S, H, HEADS, FF, SPAN, P = 128, 256, 4, 1024, 256, 0.1
torch.manual_seed(0)
params = []


def param(*shape):
    t = (torch.randn(*shape) * 0.02).requires_grad_(True)
    params.append(t)
    return t


def linear(o, i):
    return param(o, i), param(o)


def saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {p.untyped_storage().data_ptr() for p in params}
    return sum(n for ptr, n in seen.items() if ptr not in skip)


q_lin, k_lin, v_lin, o_lin = linear(H, H), linear(H, H), linear(H, H), linear(H, H)
ff1, ff2 = linear(FF, H), linear(H, FF)
ln1, ln2 = (param(H), param(H)), (param(H), param(H))
x = torch.randn(ROWS, S, H, requires_grad=True)


def heads(t):
    shape = list(t.shape[:-1]) + [HEADS, t.shape[-1] // HEADS]
    return t.view(*shape).transpose(-3, -2)


def feed_forward(ctx, x):
    y = F.dropout(F.linear(ctx, *o_lin), P, True)
    a = F.layer_norm(y + x, (H,), *ln1, 1e-7)
    y = F.dropout(F.linear(F.gelu(F.linear(a, *ff1)), *ff2), P, True)
    return F.layer_norm(y + a, (H,), *ln2, 1e-7)


def bert_layer():
    q, k, v = (heads(F.linear(x, *w)) for w in (q_lin, k_lin, v_lin))
    out = F.scaled_dot_product_attention(q, k, v, None, P, False)
    return feed_forward(out.transpose(1, 2).contiguous().view(ROWS, S, H), x)


rel_emb, rel_ln = param(2 * SPAN, H), (param(H), param(H))
# Normalised once per pass by the embeddings (DebertaV2ForMaskedLM::embed), not per layer.
rel = F.layer_norm(rel_emb, (H,), *rel_ln, 1e-7)
# The rows of `rel` the 2s - 1 distances of a block read (deberta_attention::distance_buckets;
# which rows does not change the memory).
by_distance = (torch.arange(1 - S, S) + SPAN).clamp(0, 2 * SPAN - 1)


def skew(scores):
    """[.., s, 2s - 1] by distance -> the [.., s, s] view (deberta_attention::skew)."""
    lead = list(scores.shape[:-2])
    flat = scores.reshape(*lead, S * (2 * S - 1)).narrow(-1, S - 1, S * (2 * S - 2))
    return flat.view(*lead, S, 2 * S - 2).narrow(-1, 0, S)


def deberta_layer():
    q, k = F.linear(x, *q_lin), F.linear(x, *k_lin)
    v = heads(F.linear(x, *v_lin))
    scale = math.sqrt(H // HEADS * 3)
    r = F.dropout(rel, P, True)
    rows = lambda t: t.view(ROWS * S, HEADS, H // HEADS).transpose(0, 1)  # [heads, b s, d]

    def scores(t, w, index):
        pos = heads(F.linear(r.index_select(0, index), *w))  # [heads, 2s - 1, d]
        return rows(t).matmul(pos.transpose(-1, -2)).view(HEADS, ROWS, S, 2 * S - 1)

    c2p = skew(scores(q, k_lin, by_distance.flip(0))).permute(1, 0, 2, 3) / scale
    p2c = skew(scores(k, q_lin, by_distance)).permute(1, 0, 3, 2) / scale
    bias = c2p.add_(p2c)
    out = F.scaled_dot_product_attention(heads(q), heads(k), v, bias, P, False, scale=1 / scale)
    return feed_forward(out.transpose(1, 2).contiguous().view(ROWS, S, H), x)


c_attn, c_proj = linear(3 * H, H), linear(H, H)
causal = torch.full((S, S), float("-inf")).triu(1)


def gpt2_layer():
    """gpt2.rs Gpt2Block::forward with layers.rs causal_attention_written_out."""
    q, k, v = (heads(t) for t in F.linear(F.layer_norm(x, (H,), *ln1, 1e-5), *c_attn).split(H, -1))
    scores = q.matmul(k.transpose(-1, -2)) * (1 / math.sqrt(H // HEADS)) + causal
    probs = F.dropout(scores.softmax(-1, dtype=torch.float32), P, True)
    ctx = probs.matmul(v).transpose(1, 2).contiguous().view(ROWS, S, H)
    y = F.dropout(F.linear(ctx, *c_proj), P, True) + x
    a = F.linear(F.gelu(F.linear(F.layer_norm(y, (H,), *ln2, 1e-5), *ff1), approximate="tanh"), *ff2)
    return F.dropout(a, P, True) + y


wte, ln_f = param(512, H), (param(H), param(H))
targets = torch.randint(0, 512, (ROWS * (S - 1),))


def gpt2_head():
    """loss.rs chunk_loss_sum over gpt2.rs mlm_head, at every position but each block's last."""
    positions = (torch.arange(ROWS)[:, None] * S + torch.arange(S - 1)).flatten()
    picked = x.view(-1, H).index_select(0, positions)
    logits = F.linear(F.layer_norm(picked, (H,), *ln_f, 1e-5), wte).float()
    return F.cross_entropy(logits, targets, reduction="sum")


print(f"gpt2 layer, {ROWS} rows: {saved_bytes(gpt2_layer)} bytes")
print(f"gpt2 head, {ROWS} rows: {saved_bytes(gpt2_head)} bytes")
print(f"bert layer, {ROWS} rows: {saved_bytes(bert_layer)} bytes")
print(f"deberta layer, {ROWS} rows: {saved_bytes(deberta_layer)} bytes")
