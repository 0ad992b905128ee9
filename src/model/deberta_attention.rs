//! DeBERTa's disentangled self-attention (`DisentangledSelfAttention` of
//! `transformers.models.deberta_v2`), with its relative positions.
//!
//! With `d` the head size and `k = 1 + [c2p] + [p2c]`, HF computes
//!
//! ```text
//! scores = Q K^T / sqrt(d k) + (c2p + p2c) / sqrt(d k)
//! c2p[i, j] = Q_i . Kr_{clamp(δ(i, j) + span)}      Kr = key_proj(rel) (or pos_key_proj)
//! p2c[i, j] = K_j . Qr_{clamp(-δ(j, i) + span)}     Qr = query_proj(rel) (or pos_query_proj)
//! ```
//!
//! where δ is the (log-bucketed) relative distance query - key and `rel` the
//! relative-position embeddings. Where `policy.rs` says so (the CPU in fp32 and
//! bf16) the scores are written out as HF does, with the scale folded into q and
//! k ([`DisentangledSelfAttention::forward`]); elsewhere the c2p + p2c term, with the padding mask folded in when there is
//! padding, is the float `attn_mask` of libtorch's scaled_dot_product_attention,
//! called with scale 1 / sqrt(d k).
//!
//! HF multiplies Q by the projections of all `2 span` buckets and `gather`s the
//! [b, heads, s, 2 span] result, which autograd then keeps whole for `gather`'s
//! backward. Both terms depend on `i - j` alone, so here the projections are
//! taken at the `2s - 1` distances a block of length `s` has (rows of `rel`
//! picked by [`distance_buckets`]), multiplied with the batch folded into the
//! rows (`[heads, b s, d] @ [heads, d, 2s - 1]`: no batch-broadcast copy), and
//! the [s, 2s - 1] score rows are read at column `j - i + s - 1` through views
//! ([`skew`]), which autograd undoes from shapes alone: the scores by distance
//! are never saved for backward.
use tch::{nn, Kind, Tensor};

use super::layers::{dropout, finfo_min, Linear};
use super::policy::{self, Attention, AttentionPath};
use super::qkv::{Qkv, QkvProjection};

/// What the attention layers need of the config, checked once.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionSpec {
    pub hidden: i64,
    pub heads: i64,
    pub relative_attention: bool,
    pub share_att_key: bool,
    pub c2p: bool,
    pub p2c: bool,
    /// Relative distances are clamped to [-span, span): `position_buckets` when
    /// bucketed, else `max_relative_positions`.
    pub span: i64,
    pub position_buckets: i64,
    pub max_relative_positions: i64,
    pub std: f64,
    pub attention_dropout: f64,
    pub pos_dropout: f64,
}

/// HF's `make_log_bucket_position`: distances within ±bucket_size/2 stay as they
/// are, longer ones are binned logarithmically up to `max_position`. The same
/// float32 tensor ops as HF, so the buckets agree at the bin edges.
/// `relative` [..] i64 -> [..] i64.
fn log_bucket_position(relative: &Tensor, bucket_size: i64, max_position: i64) -> Tensor {
    let sign = relative.sign();
    let mid = bucket_size / 2;
    let near = relative.lt(mid).logical_and(&relative.gt(-mid));
    let abs_pos = relative.abs().where_self(&near.logical_not(), &Tensor::from(mid - 1));
    let denominator = Tensor::from(((max_position - 1) as f64 / mid as f64) as f32).log();
    let log_pos =
        ((abs_pos.to_kind(Kind::Float) / mid as f64).log() / denominator * (mid - 1) as f64).ceil() + mid as f64;
    let bucket = relative.to_kind(Kind::Float).where_self(&abs_pos.le(mid), &(log_pos * sign.to_kind(Kind::Float)));
    bucket.to_kind(Kind::Int64)
}

/// HF's `build_relative_position` applied to the distances `relative` (query -
/// key): bucketed when `bucket_size > 0 && max_position > 0`.
fn bucket_positions(relative: Tensor, bucket_size: i64, max_position: i64) -> Tensor {
    if bucket_size > 0 && max_position > 0 {
        log_bucket_position(&relative, bucket_size, max_position)
    } else {
        relative
    }
}

/// The rows of `rel` that a block of length `s` reads: entry `v` is the clamped
/// bucket `δ + span` of the distance query - key = `v - (s - 1)`, for `v` in
/// `0..2s-1`. -> [2s - 1] i64 on the CPU.
pub(super) fn distance_buckets(s: i64, spec: &AttentionSpec) -> Tensor {
    let distances = Tensor::arange_start(1 - s, s, (Kind::Int64, tch::Device::Cpu));
    let buckets = bucket_positions(distances, spec.position_buckets, spec.max_relative_positions);
    (buckets + spec.span).clamp(0, 2 * spec.span - 1)
}

/// `scores` [.., s, 2s - 1], whose row `r` holds at column `v` the score of
/// distance `v - (s - 1)` (in the orientation of the caller), -> the view
/// [.., s, s] with `out[.., r, c] = scores[.., r, c - r + s - 1]`: row `r`
/// starts at flat offset `r (2s - 1) + s - 1 - r`, so the rows of the result
/// lie `2s - 2` apart from offset `s - 1` (Transformer-XL's relative shift).
fn skew(scores: &Tensor, s: i64) -> Tensor {
    if s == 1 {
        return scores.shallow_clone();
    }
    let mut lead = scores.size();
    lead.truncate(lead.len() - 2);
    let shape = |tail: &[i64]| [lead.as_slice(), tail].concat();
    scores
        .view(shape(&[s * (2 * s - 1)]).as_slice())
        .narrow(-1, s - 1, s * (2 * s - 2))
        .view(shape(&[s, 2 * s - 2]).as_slice())
        .narrow(-1, 0, s)
}

/// HF's `get_attention_mask`: query i may see key j when both are tokens.
/// `attention_mask` [b, s] -> [b, 1, s, s] bool.
pub(super) fn pair_mask(attention_mask: &Tensor) -> Tensor {
    let m = attention_mask.ne(0);
    m.unsqueeze(1).unsqueeze(2).logical_and(&m.unsqueeze(1).unsqueeze(3))
}

/// The relative-position inputs of every layer of one forward.
#[derive(Debug)]
pub(super) struct RelativeInputs {
    /// [2 span, h]: the (normalised) relative embeddings.
    rel: Tensor,
    /// [2s - 1] i64: [`distance_buckets`], on the activations' device.
    by_distance: Tensor,
    /// The same, reversed: entry `v` for the distance `s - 1 - v`.
    by_distance_rev: Tensor,
}

impl RelativeInputs {
    /// `rel` [2 span, h], for blocks of length `s`.
    #[cfg(test)]
    pub(super) fn new(rel: Tensor, s: i64, spec: &AttentionSpec) -> Self {
        let by_distance = distance_buckets(s, spec).to_device(rel.device());
        Self::from_parts(rel, by_distance)
    }

    /// From `rel` and [`distance_buckets`] on its device.
    pub(super) fn from_parts(rel: Tensor, by_distance: Tensor) -> Self {
        let by_distance_rev = by_distance.flip([0]);
        Self { rel, by_distance, by_distance_rev }
    }
}

/// `deberta.encoder.layer.N.attention.self`.
#[derive(Debug)]
pub(super) struct DisentangledSelfAttention {
    qkv: QkvProjection,
    /// Without `share_att_key`: their own projections of the relative embeddings.
    pos_key_proj: Option<Linear>,
    pos_query_proj: Option<Linear>,
    spec: AttentionSpec,
}

impl DisentangledSelfAttention {
    pub(super) fn new(p: &nn::Path, spec: AttentionSpec) -> Self {
        let (h, std) = (spec.hidden, spec.std);
        let own = spec.relative_attention && !spec.share_att_key;
        Self {
            qkv: QkvProjection::new(
                Linear::new(&(p / "query_proj"), h, h, std),
                Linear::new(&(p / "key_proj"), h, h, std),
                Linear::new(&(p / "value_proj"), h, h, std),
            ),
            pos_key_proj: (own && spec.c2p).then(|| Linear::new(&(p / "pos_key_proj"), h, h, std)),
            pos_query_proj: (own && spec.p2c).then(|| Linear::new(&(p / "pos_query_proj"), h, h, std)),
            spec,
        }
    }

    pub(super) fn qkv_mut(&mut self) -> &mut QkvProjection {
        &mut self.qkv
    }

    /// `[.., n, h]` -> `[.., heads, n, d]`
    fn split_heads(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let h = shape.pop().expect("at least 1-d");
        shape.extend([self.spec.heads, h / self.spec.heads]);
        let rank = shape.len() as i64;
        x.view(shape.as_slice()).transpose(rank - 3, rank - 2)
    }

    /// `x` [b, s, h] (a projection's output) -> `[heads, b s, d]`, a view.
    fn heads_by_rows(&self, x: &Tensor) -> Tensor {
        let (b, s, h) = x.size3().expect("[batch, seq, hidden]");
        x.view([b * s, self.spec.heads, h / self.spec.heads]).transpose(0, 1)
    }

    /// c2p and p2c as views of their scores by distance: `q`, `k` [b, s, h]
    /// (projected; c2p reads `q`, p2c `k`) -> each `[heads, b, i, j]`, or
    /// `None` for a term the config lacks.
    fn position_terms(&self, q: &Tensor, k: &Tensor, rel: &RelativeInputs, train: bool) -> [Option<Tensor>; 2] {
        let (b, s, _) = q.size3().expect("[batch, seq, hidden]");
        let spec = &self.spec;
        let rel_emb = dropout(&rel.rel, spec.pos_dropout, train);
        // `rows` [heads, b s, d] times the projection of the `rel` rows `index`
        // [2s - 1] -> [heads, b, s, 2s - 1].
        let by_distance = |rows: &Tensor, proj: &Linear, index: &Tensor| {
            let pos = self.split_heads(&proj.forward(&rel_emb.index_select(0, index))); // [heads, 2s - 1, d]
            rows.matmul(&pos.to_kind(rows.kind()).transpose(-1, -2)).view([spec.heads, b, s, 2 * s - 1])
        };
        // c2p: row i, column v <-> key j = i + v - (s - 1), distance i - j = s - 1 - v.
        let c2p = spec.c2p.then(|| {
            let proj = self.pos_key_proj.as_ref().map_or_else(|| self.qkv.linear(Qkv::Key), Linear::shallow_clone);
            skew(&by_distance(&self.heads_by_rows(q), &proj, &rel.by_distance_rev), s)
        });
        // p2c: row j (key), column v <-> query i = j + v - (s - 1), distance i - j = v - (s - 1).
        // HF's bucket -δ(j, i) is δ(i, j): the (log) bucketing is odd.
        let p2c = spec.p2c.then(|| {
            let proj = self.pos_query_proj.as_ref().map_or_else(|| self.qkv.linear(Qkv::Query), Linear::shallow_clone);
            skew(&by_distance(&self.heads_by_rows(k), &proj, &rel.by_distance), s).transpose(-1, -2)
        });
        [c2p, p2c]
    }

    /// The c2p + p2c term, each divided by `scale` before the sum as HF does.
    /// -> [b, heads, s, s], or `None` when the config has neither term.
    fn position_bias(&self, q: &Tensor, k: &Tensor, rel: &RelativeInputs, scale: f64, train: bool) -> Option<Tensor> {
        let [c2p, p2c] = self.position_terms(q, k, rel, train).map(|t| t.map(|t| t.permute([1, 0, 2, 3]) / scale));
        match (c2p, p2c) {
            // In place: neither quotient is saved for backward.
            (Some(mut c2p), Some(p2c)) => Some(c2p.g_add_(&p2c)),
            (c2p, p2c) => c2p.or(p2c),
        }
    }

    /// `x` [b, s, h], `pad` [b, 1, s, s] bool: the (query, key) pairs to mask,
    /// `None` when the batch has no padding; `rel`: the relative-position inputs
    /// (`None` without relative attention) -> context [b, s, h].
    pub(super) fn forward(
        &self,
        x: &Tensor,
        pad: Option<&Tensor>,
        rel: Option<&RelativeInputs>,
        train: bool,
    ) -> Tensor {
        let p = if train { self.spec.attention_dropout } else { 0.0 };
        let path = policy::attention_path(Attention::Disentangled, x.device(), x.kind(), p);
        self.forward_with(x, pad, rel, train, path == AttentionPath::WrittenOut)
    }

    /// [`Self::forward`] with the kernel chosen: `explicit`, the scores
    /// written out ([`Self::explicit_attention`], the CPU's), else libtorch's
    /// scaled_dot_product_attention with c2p + p2c as its float mask.
    pub(super) fn forward_with(
        &self,
        x: &Tensor,
        pad: Option<&Tensor>,
        rel: Option<&RelativeInputs>,
        train: bool,
        explicit: bool,
    ) -> Tensor {
        let (b, s, h) = x.size3().expect("attention input must be [batch, seq, hidden]");
        let spec = &self.spec;
        let [q, k, v] = self.qkv.forward(x); // [b, s, h]
        let d = h / spec.heads;
        let factor = 1 + spec.c2p as i64 + spec.p2c as i64;
        // HF: sqrt(float32(d) * factor), divided in the activations' dtype.
        let scale = ((d * factor) as f32).sqrt() as f64;
        let rel = rel.filter(|_| spec.relative_attention);
        let p = if train { spec.attention_dropout } else { 0.0 };
        if explicit {
            return self.explicit_attention(&q, &k, &v, pad, rel, scale, p, train);
        }

        let bias = rel.and_then(|rel| self.position_bias(&q, &k, rel, scale, train));
        // Where HF fills the scores with finfo.min, the bias is finfo.min: adding a
        // finite score leaves it there, so padded queries attend uniformly as in HF.
        let bias = match (bias, pad) {
            (bias, Some(pad)) => {
                let mut bias = bias.unwrap_or_else(|| Tensor::zeros([b, 1, s, s], (x.kind(), x.device())));
                Some(bias.masked_fill_(pad, finfo_min(x.kind()))) // in place: a fresh sum
            }
            (bias, None) => bias,
        };
        let (q, k, v) = (self.split_heads(&q), self.split_heads(&k), self.split_heads(&v));
        let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, bias.as_ref(), p, false, 1.0 / scale, false);
        ctx.transpose(1, 2).contiguous().view([b, s, h])
    }

    /// Attention with the scores written out, as HF's `DisentangledSelfAttention`
    /// does, laid out heads first (`[heads b, s, s]`) so that the c2p and p2c
    /// views merge their leading dims without a copy. On the CPU with dropout, or
    /// a bias that needs a gradient, libtorch's attention runs its math kernel,
    /// which (torch 2.11) copies q, k, v and the scores to fp32 in bf16 and masks
    /// fully masked rows in extra passes; here the scale is folded into q and k
    /// (`[b, s, h]`, not the scores), c2p seeds a `baddbmm` of q k^T and p2c is
    /// added in place: one `[heads b, s, s]` tensor until the softmax. The
    /// batched matmuls run in [`policy::attention_matmul_kind`] (bf16 where the
    /// CPU has bf16 instructions, else fp32, as the math kernel's do), the softmax in fp32
    /// (HF's `XSoftmax` under autocast too), its dropout on the fp32 probabilities.
    #[allow(clippy::too_many_arguments)]
    fn explicit_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pad: Option<&Tensor>,
        rel: Option<&RelativeInputs>,
        scale: f64,
        p: f64,
        train: bool,
    ) -> Tensor {
        let (b, s, h) = q.size3().expect("[batch, seq, hidden]");
        let (heads, d) = (self.spec.heads, h / self.spec.heads);
        let acc = policy::attention_matmul_kind(q.device(), q.kind());
        let (qs, ks, k) = (q.to_kind(acc) / scale, k.to_kind(acc) / scale, k.to_kind(acc));
        let [c2p, p2c] = match rel {
            Some(rel) => self.position_terms(&qs, &ks, rel, train),
            None => [None, None],
        };
        // [b, s, h] -> [heads b, s, d]
        let by_head = |x: &Tensor| self.heads_by_rows(x).reshape([heads * b, s, d]);
        let (qh, kt) = (by_head(&qs), by_head(&k).transpose(1, 2));
        let mut scores = match c2p {
            Some(c2p) => c2p.reshape([heads * b, s, s]).baddbmm(&qh, &kt, 1.0, 1.0),
            None => qh.bmm(&kt),
        };
        if let Some(p2c) = p2c {
            let _ = scores.g_add_(&p2c.reshape([heads * b, s, s]));
        }
        if let Some(pad) = pad {
            // HF's masked_fill of the scores with finfo.min: padded queries attend uniformly.
            let pad = pad.permute([1, 0, 2, 3]).expand([heads, b, s, s], false).reshape([heads * b, s, s]);
            let _ = scores.masked_fill_(&pad, finfo_min(acc));
        }
        // The scores go before the dropout's mask and product exist (without
        // autograd nothing else holds them).
        let probs = scores.softmax(-1, Kind::Float);
        drop(scores);
        let probs = dropout(&probs, p, train).to_kind(acc);
        let ctx = probs.bmm(&by_head(&v.to_kind(acc))); // [heads b, s, d]
        ctx.view([heads, b, s, d]).permute([1, 2, 0, 3]).to_kind(q.kind()).contiguous().view([b, s, h])
    }
}

#[cfg(test)]
mod tests;
