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
//! relative-position embeddings. Here the c2p + p2c term, with the padding mask
//! folded in, is the float `attn_mask` of libtorch's scaled_dot_product_attention,
//! called with scale 1 / sqrt(d k).
use tch::{nn, Kind, Tensor};

use super::layers::{finfo_min, Linear};

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

/// HF's `build_relative_position` for self-attention: query - key, bucketed when
/// `bucket_size > 0 && max_position > 0`. -> [s, s] i64 on the CPU.
pub(super) fn relative_positions(s: i64, bucket_size: i64, max_position: i64) -> Tensor {
    let ids = Tensor::arange(s, (Kind::Int64, tch::Device::Cpu));
    let relative = ids.unsqueeze(1) - ids.unsqueeze(0);
    if bucket_size > 0 && max_position > 0 {
        log_bucket_position(&relative, bucket_size, max_position)
    } else {
        relative
    }
}

/// HF's `get_attention_mask`: query i may see key j when both are tokens.
/// `attention_mask` [b, s] -> [b, 1, s, s] bool.
pub(super) fn pair_mask(attention_mask: &Tensor) -> Tensor {
    let m = attention_mask.ne(0);
    m.unsqueeze(1).unsqueeze(2).logical_and(&m.unsqueeze(1).unsqueeze(3))
}

/// `deberta.encoder.layer.N.attention.self`.
#[derive(Debug)]
pub(super) struct DisentangledSelfAttention {
    query_proj: Linear,
    key_proj: Linear,
    value_proj: Linear,
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
            query_proj: Linear::new(&(p / "query_proj"), h, h, std),
            key_proj: Linear::new(&(p / "key_proj"), h, h, std),
            value_proj: Linear::new(&(p / "value_proj"), h, h, std),
            pos_key_proj: (own && spec.c2p).then(|| Linear::new(&(p / "pos_key_proj"), h, h, std)),
            pos_query_proj: (own && spec.p2c).then(|| Linear::new(&(p / "pos_query_proj"), h, h, std)),
            spec,
        }
    }

    /// `[.., n, h]` -> `[.., heads, n, d]`
    fn split_heads(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let h = shape.pop().expect("at least 1-d");
        shape.extend([self.spec.heads, h / self.spec.heads]);
        let rank = shape.len() as i64;
        x.view(shape.as_slice()).transpose(rank - 3, rank - 2)
    }

    /// `x` [b, s, h], `mask` [b, 1, s, s] bool, `rel` [2 span, h] (normalised
    /// relative embeddings), `rel_pos` [s, s] i64 -> context [b, s, h].
    pub(super) fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rel: Option<&Tensor>,
        rel_pos: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (b, s, h) = x.size3().expect("attention input must be [batch, seq, hidden]");
        let spec = &self.spec;
        let q = self.split_heads(&self.query_proj.forward(x)); // [b, heads, s, d]
        let k = self.split_heads(&self.key_proj.forward(x));
        let v = self.split_heads(&self.value_proj.forward(x));
        let d = h / spec.heads;
        let factor = 1 + spec.c2p as i64 + spec.p2c as i64;
        // HF: sqrt(float32(d) * factor), divided in the activations' dtype.
        let scale = ((d * factor) as f32).sqrt() as f64;

        let mut bias = Tensor::zeros([b, spec.heads, s, s], (x.kind(), x.device()));
        if let (true, Some(rel), Some(rel_pos)) = (spec.relative_attention, rel, rel_pos) {
            let rel = rel.dropout(spec.pos_dropout, train);
            let span = spec.span;
            let index = |pos: Tensor| pos.clamp(0, 2 * span - 1).expand([b, spec.heads, s, s], false);
            if spec.c2p {
                let proj = self.pos_key_proj.as_ref().unwrap_or(&self.key_proj);
                let pos_key = self.split_heads(&proj.forward(&rel)); // [heads, 2 span, d]
                let c2p = q.matmul(&pos_key.transpose(-1, -2)); // [b, heads, s, 2 span]
                let c2p = c2p.gather(-1, &index(rel_pos + span), false);
                bias = bias + c2p / scale;
            }
            if spec.p2c {
                let proj = self.pos_query_proj.as_ref().unwrap_or(&self.query_proj);
                let pos_query = self.split_heads(&proj.forward(&rel)); // [heads, 2 span, d]
                let p2c = k.matmul(&pos_query.transpose(-1, -2)); // [b, heads, s_key, 2 span]
                let p2c = p2c.gather(-1, &index(-rel_pos + span), false).transpose(-1, -2);
                bias = bias + p2c / scale;
            }
        }
        // Where HF fills the scores with finfo.min, the bias is finfo.min: adding a
        // finite score leaves it there, so padded queries attend uniformly as in HF.
        let bias = bias.masked_fill(&mask.logical_not(), finfo_min(x.kind()));
        let p = if train { spec.attention_dropout } else { 0.0 };
        let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), p, false, 1.0 / scale, false);
        ctx.transpose(1, 2).contiguous().view([b, s, h])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_buckets_follow_transformers() {
        // torch: make_log_bucket_position(arange(-40, 41), 8, 64)
        let rel = Tensor::arange_start(-40, 41, (Kind::Int64, tch::Device::Cpu));
        let got: Vec<i64> = Vec::try_from(log_bucket_position(&rel, 8, 64)).unwrap();
        let mut want = vec![-7i64; 15];
        want.extend([-6; 15]);
        want.extend([-5; 6]);
        want.extend(-4..=4);
        want.extend([5; 6]);
        want.extend([6; 15]);
        want.extend([7; 15]);
        assert_eq!(got, want);
        let rel = relative_positions(3, -1, -1);
        assert_eq!(Vec::<i64>::try_from(rel.view([-1])).unwrap(), [0, -1, -2, 1, 0, -1, 2, 1, 0]);
    }
}
