//! The lean disentangled attention against today's straightforward one (HF's
//! formulation, kept here as the oracle): outputs and gradients in fp32.
use tch::{nn, Device, Kind, Tensor};

use super::*;

/// HF's `build_relative_position` for self-attention: query - key. -> [s, s] i64.
fn relative_positions(s: i64, bucket_size: i64, max_position: i64) -> Tensor {
    let ids = Tensor::arange(s, (Kind::Int64, Device::Cpu));
    bucket_positions(ids.unsqueeze(1) - ids.unsqueeze(0), bucket_size, max_position)
}

impl DisentangledSelfAttention {
    /// HF's computation as written: the projections of all `2 span` buckets,
    /// broadcast over the batch, `gather`ed from [b, heads, s, 2 span], a dense
    /// bias and a masked_fill. `mask` [b, 1, s, s] bool (true: may attend),
    /// `rel` [2 span, h], `rel_pos` [s, s] i64 -> [b, s, h].
    fn forward_oracle(&self, x: &Tensor, mask: &Tensor, rel: Option<&Tensor>, rel_pos: Option<&Tensor>) -> Tensor {
        let (b, s, h) = x.size3().unwrap();
        let spec = &self.spec;
        let q = self.split_heads(&self.qkv.query.forward(x)); // [b, heads, s, d]
        let k = self.split_heads(&self.qkv.key.forward(x));
        let v = self.split_heads(&self.qkv.value.forward(x));
        let d = h / spec.heads;
        let factor = 1 + spec.c2p as i64 + spec.p2c as i64;
        let scale = ((d * factor) as f32).sqrt() as f64;

        let mut bias = Tensor::zeros([b, spec.heads, s, s], (x.kind(), x.device()));
        if let (true, Some(rel), Some(rel_pos)) = (spec.relative_attention, rel, rel_pos) {
            let span = spec.span;
            let index = |pos: Tensor| pos.clamp(0, 2 * span - 1).expand([b, spec.heads, s, s], false);
            if spec.c2p {
                let proj = self.pos_key_proj.as_ref().unwrap_or(&self.qkv.key);
                let pos_key = self.split_heads(&proj.forward(rel)); // [heads, 2 span, d]
                let c2p = q.matmul(&pos_key.transpose(-1, -2)); // [b, heads, s, 2 span]
                bias = bias + c2p.gather(-1, &index(rel_pos + span), false) / scale;
            }
            if spec.p2c {
                let proj = self.pos_query_proj.as_ref().unwrap_or(&self.qkv.query);
                let pos_query = self.split_heads(&proj.forward(rel)); // [heads, 2 span, d]
                let p2c = k.matmul(&pos_query.transpose(-1, -2)); // [b, heads, s_key, 2 span]
                bias = bias + p2c.gather(-1, &index(-rel_pos + span), false).transpose(-1, -2) / scale;
            }
        }
        let bias = bias.masked_fill(&mask.logical_not(), finfo_min(x.kind()));
        let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, 1.0 / scale, false);
        ctx.transpose(1, 2).contiguous().view([b, s, h])
    }
}

#[test]
fn log_buckets_follow_transformers() {
    // torch: make_log_bucket_position(arange(-40, 41), 8, 64)
    let rel = Tensor::arange_start(-40, 41, (Kind::Int64, Device::Cpu));
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

#[test]
fn distance_buckets_are_the_relative_positions_of_each_distance() {
    for (s, buckets, max_rel) in [(5, -1, 8), (12, -1, 4), (6, 8, 64), (40, 8, 64), (40, 16, 20)] {
        let spec = spec_for(8, 2, true, true, true, buckets, max_rel);
        let by_distance: Vec<i64> = Vec::try_from(distance_buckets(s, &spec)).unwrap();
        let rel_pos =
            (relative_positions(s, buckets, spec.max_relative_positions) + spec.span).clamp(0, 2 * spec.span - 1);
        for i in 0..s {
            for j in 0..s {
                assert_eq!(by_distance[(i - j + s - 1) as usize], rel_pos.int64_value(&[i, j]), "s {s}: ({i}, {j})");
            }
        }
    }
}

/// The spec of a small layer; `buckets` <= 0: unbucketed, span `max_rel`.
fn spec_for(hidden: i64, heads: i64, share: bool, c2p: bool, p2c: bool, buckets: i64, max_rel: i64) -> AttentionSpec {
    AttentionSpec {
        hidden,
        heads,
        relative_attention: true,
        share_att_key: share,
        c2p,
        p2c,
        span: if buckets > 0 { buckets } else { max_rel },
        position_buckets: buckets,
        max_relative_positions: max_rel,
        std: 0.2,
        attention_dropout: 0.0,
        pos_dropout: 0.0,
    }
}

/// Elementwise |a - b| <= 1e-5 + 1e-5 |b|, naming `what` when not (the explicit
/// kernel folds the scale into q and k: other roundings).
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    let diff = (a - b).abs();
    let excess = (&diff - (b.abs() * 1e-5 + 1e-5)).max().double_value(&[]);
    assert!(excess <= 0.0, "{what}: max |diff| {:.3e}", diff.max().double_value(&[]));
}

/// Which forward [`run`] takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    /// HF's gather formulation ([`DisentangledSelfAttention::forward_oracle`]).
    Oracle,
    /// The lean terms as scaled_dot_product_attention's float mask (CUDA's).
    Sdpa,
    /// The lean terms with the scores written out (the CPU's).
    Explicit,
}

/// Output and the gradients of the layer's parameters, of `x` and of `rel` under
/// a fixed random linear loss, from the forward `kernel`.
fn run(
    layer: &DisentangledSelfAttention,
    vs: &nn::VarStore,
    x: &Tensor,
    rel: &Tensor,
    mask: &Tensor,
    kernel: Kernel,
) -> Vec<(String, Tensor)> {
    let (x, rel) = (x.detach().set_requires_grad(true), rel.detach().set_requires_grad(true));
    let s = x.size()[1];
    let out = if kernel == Kernel::Oracle {
        let rel_pos = relative_positions(s, layer.spec.position_buckets, layer.spec.max_relative_positions);
        layer.forward_oracle(&x, &pair_mask(mask), Some(&rel), Some(&rel_pos))
    } else {
        let padded = mask.eq(0).any().int64_value(&[]) != 0;
        let pad = padded.then(|| pair_mask(mask).logical_not());
        let inputs = RelativeInputs::new(rel.shallow_clone(), s, &layer.spec);
        layer.forward_with(&x, pad.as_ref(), Some(&inputs), false, kernel == Kernel::Explicit)
    };
    // Like the MLM loss, the loss reads no padded position: a padded query sees
    // no key, and its gradient differs between HF's masked_fill of the scores
    // (the explicit kernel: none) and a finfo.min bias (the others: uniform).
    let weights = Tensor::linspace(-1.0, 1.0, out.numel() as i64, (Kind::Float, Device::Cpu))
        .view(out.size().as_slice())
        * mask.unsqueeze(-1).to_kind(Kind::Float);
    for mut var in vs.trainable_variables() {
        var.zero_grad();
    }
    (&out * weights).sum(Kind::Float).backward();
    let mut got =
        vec![("output".to_string(), out.detach()), ("x.grad".into(), x.grad()), ("rel.grad".into(), rel.grad())];
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    got.extend(vars.into_iter().map(|(name, t)| (format!("{name}.grad"), t.grad().copy())));
    got
}

/// The lean layer, with either kernel, against the oracle on a random [3, s]
/// batch, the last two rows padded (two pads; all but the first token) when `padded`.
fn check_against_oracle(spec: AttentionSpec, s: i64, padded: bool, seed: i64) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = DisentangledSelfAttention::new(&vs.root(), spec);
    let x = Tensor::randn([3, s, spec.hidden], (Kind::Float, Device::Cpu));
    let rel = Tensor::randn([2 * spec.span, spec.hidden], (Kind::Float, Device::Cpu));
    let mask = Tensor::ones([3, s], (Kind::Int64, Device::Cpu));
    if padded {
        let _ = mask.get(1).narrow(0, s - 2, 2).fill_(0);
        let _ = mask.get(2).narrow(0, 1, s - 1).fill_(0);
    }
    let oracle = run(&layer, &vs, &x, &rel, &mask, Kernel::Oracle);
    for kernel in [Kernel::Sdpa, Kernel::Explicit] {
        let lean = run(&layer, &vs, &x, &rel, &mask, kernel);
        for ((name, got), (_, want)) in lean.iter().zip(&oracle) {
            if !want.defined() {
                assert!(!got.defined(), "{name}: a gradient where the oracle has none");
                continue;
            }
            assert_close(got, want, &format!("{name}: {kernel:?}, s {s}, padded {padded}, {spec:?}"));
        }
    }
}

#[test]
fn lean_attention_matches_the_gather_formulation_in_outputs_and_gradients() {
    let mut cases = 0;
    // (position_buckets, max_relative_positions): span 6 unbucketed, span 8 bucketed.
    for (buckets, max_rel) in [(-1, 6), (8, 64)] {
        // s shorter and longer than the span.
        for s in [4, 13] {
            for share in [true, false] {
                for (c2p, p2c) in [(true, false), (false, true), (true, true)] {
                    for padded in [false, true] {
                        check_against_oracle(spec_for(16, 2, share, c2p, p2c, buckets, max_rel), s, padded, cases);
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 48);
}

#[test]
fn lean_attention_matches_the_gather_formulation_on_edge_shapes() {
    // One-token blocks (nothing to skew), and the bias of padding alone.
    check_against_oracle(spec_for(16, 2, true, true, true, 8, 64), 1, false, 1);
    check_against_oracle(spec_for(16, 2, false, true, true, -1, 6), 1, false, 2);
    let no_relative =
        AttentionSpec { relative_attention: false, c2p: false, p2c: false, ..spec_for(16, 2, true, true, true, -1, 6) };
    for padded in [false, true] {
        check_against_oracle(no_relative, 5, padded, 3);
    }
}

/// Values that do not come from libtorch's global generator, which the tests
/// running beside this one draw from too: `scale * sin(i * freq + phase)`.
fn fixed_values(shape: &[i64], scale: f64, freq: f64, phase: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * freq + phase).sin() * scale).to_kind(Kind::Float).view(shape)
}

/// In bf16 both kernels stay within bf16's rounding of the fp32 oracle (the
/// written-out one multiplies in bf16 where the CPU has bf16 instructions).
/// Weights and inputs are fixed values, not draws: with draws shared with
/// the tests running beside it, an unlucky draw once went past the bound.
#[test]
fn lean_attention_in_bf16_stays_near_the_fp32_gather_formulation() {
    let spec = spec_for(16, 2, true, true, true, 8, 64);
    let s = 13;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let layer = DisentangledSelfAttention::new(&vs.root(), spec);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (_, v)) in vars.iter_mut().enumerate() {
            v.copy_(&fixed_values(&v.size(), 0.2, 0.37 + 0.01 * i as f64, i as f64));
        }
    });
    let x = fixed_values(&[3, s, spec.hidden], 1.0, 0.731, 0.2);
    let rel = fixed_values(&[2 * spec.span, spec.hidden], 1.0, 0.519, 1.1);
    let mask = Tensor::ones([3, s], (Kind::Int64, Device::Cpu));
    let oracle = run(&layer, &vs, &x, &rel, &mask, Kernel::Oracle);
    vs.bfloat16();
    let (x, rel) = (x.to_kind(Kind::BFloat16), rel.to_kind(Kind::BFloat16));
    for kernel in [Kernel::Sdpa, Kernel::Explicit] {
        let got = run(&layer, &vs, &x, &rel, &mask, kernel);
        for ((name, got), (_, want)) in got.iter().zip(&oracle) {
            let scale = want.abs().max().double_value(&[]).max(1e-6);
            let err = (got.to_kind(Kind::Float) - want).abs().max().double_value(&[]) / scale;
            assert!(err < 0.03, "{name}: {kernel:?}: max |diff| / max |oracle| = {err:.4}");
        }
    }
}

/// Bytes of the heap in use (arena + mmapped chunks): libtorch's CPU tensors
/// come from malloc, and it caches none.
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads glibc's counters.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

#[test]
#[ignore = "reads process-wide heap counters: run alone, `--ignored --test-threads=1`"]
fn lean_attention_keeps_less_for_backward() {
    // DeBERTa-v3-large's attention (hidden 1024, 16 heads, 256 buckets) at batch 4 x 128, fp32.
    let (b, s) = (4, 128);
    let spec = spec_for(1024, 16, true, true, true, 256, 512);
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = DisentangledSelfAttention::new(&vs.root(), spec);
    let x = Tensor::randn([b, s, spec.hidden], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let rel = Tensor::randn([2 * spec.span, spec.hidden], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mask = Tensor::ones([b, s], (Kind::Int64, Device::Cpu));
    let rel_pos = relative_positions(s, spec.position_buckets, spec.max_relative_positions);
    let inputs = RelativeInputs::new(rel.shallow_clone(), s, &spec);
    let kept = |forward: &dyn Fn() -> Tensor| {
        let before = heap_in_use();
        let out = forward();
        let kept = heap_in_use() - before;
        out.sum(Kind::Float).backward();
        kept
    };
    let oracle = kept(&|| layer.forward_oracle(&x, &pair_mask(&mask), Some(&rel), Some(&rel_pos)));
    let lean = kept(&|| layer.forward(&x, None, Some(&inputs), false));
    println!(
        "kept for backward by one attention layer, b {b} s {s} fp32: gather formulation {oracle} B, lean {lean} B"
    );
    assert!(2 * lean < oracle, "lean {lean} B vs {oracle} B");
}
