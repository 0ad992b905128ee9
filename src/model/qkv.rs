//! The query, key and value projections of one attention layer, fused into
//! one GEMM where their weights lie back to back in the optimizer's flat buffer.
//!
//! The model keeps its three `nn.Linear`s (HF names, loading and saving
//! unchanged). Once training has made every parameter a view of one flat
//! buffer, [`QkvProjection::fuse`] finds the projections whose weights (and
//! biases) are adjacent there, and gives them one `[n h, h]` weight and `[n h]`
//! bias that are views of the same memory: a forward pass is one matrix product
//! over the input instead of two or three, and its backward one product for the
//! input's gradient. The fused tensors are the autograd leaves the training
//! step differentiates; the separate ones stay for everything else.
//!
//! The flat buffer puts each layer's three weights, and its three biases,
//! back to back because the model declares them as groups
//! ([`super::MaskedLm::qkv_groups`], read from these projections), not because
//! their names happen to sort together: DistilBERT's `k_lin`, `q_lin`, `v_lin`
//! (with `out_lin` between them by name) and DeBERTa's projections with their
//! own position keys fuse whole too.
use tch::Tensor;

use super::layers::Linear;

/// One of the three projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qkv {
    Query = 0,
    Key = 1,
    Value = 2,
}

/// `query`, `key`, `value`: separate, or partly or wholly fused.
#[derive(Debug)]
pub struct QkvProjection {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    /// Fused groups of two or three projections (none until [`Self::fuse`]).
    groups: Vec<Group>,
}

/// Projections computed by one GEMM: `linear` stacks their weights along its
/// output rows in the order of `members`.
#[derive(Debug)]
struct Group {
    linear: Linear,
    members: Vec<Qkv>,
}

/// A fused group's place in the flat buffer, for the optimizer: the fused
/// tensors become the leaves the gradients are taken for.
#[derive(Debug)]
pub struct FusedLeaves {
    /// `(offset, numel)` of the stacked weights and of the stacked biases.
    pub weight_range: (i64, i64),
    pub bias_range: (i64, i64),
    /// How many projections the group computes (2 or 3).
    pub members: usize,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl QkvProjection {
    pub fn new(query: Linear, key: Linear, value: Linear) -> Self {
        Self { query, key, value, groups: Vec::new() }
    }

    fn own(&self, which: Qkv) -> &Linear {
        match which {
            Qkv::Query => &self.query,
            Qkv::Key => &self.key,
            Qkv::Value => &self.value,
        }
    }

    /// Whether any projection is fused.
    #[cfg(test)]
    pub fn is_fused(&self) -> bool {
        !self.groups.is_empty()
    }

    /// `x` [.., h] -> the query, key and value projections, each [.., h]
    /// (views of one output where fused).
    pub fn forward(&self, x: &Tensor) -> [Tensor; 3] {
        let mut out: [Option<Tensor>; 3] = [None, None, None];
        for g in &self.groups {
            let y = g.linear.forward(x);
            for (part, &which) in y.chunk(g.members.len() as i64, -1).into_iter().zip(&g.members) {
                out[which as usize] = Some(part);
            }
        }
        for which in [Qkv::Query, Qkv::Key, Qkv::Value] {
            if out[which as usize].is_none() {
                out[which as usize] = Some(self.own(which).forward(x));
            }
        }
        out.map(|t| t.expect("every projection computed"))
    }

    /// The projection `which` alone, through the tensors the forward pass
    /// differentiates (rows of the fused weight where fused), e.g. DeBERTa's
    /// projection of its relative-position embeddings.
    pub fn linear(&self, which: Qkv) -> Linear {
        for g in &self.groups {
            if let Some(pos) = g.members.iter().position(|&m| m == which) {
                let h = g.linear.bias.size()[0] / g.members.len() as i64;
                return Linear {
                    weight: g.linear.weight.narrow(0, pos as i64 * h, h),
                    bias: g.linear.bias.narrow(0, pos as i64 * h, h),
                };
            }
        }
        self.own(which).shallow_clone()
    }

    /// Fuses the projections whose weights and biases lie back to back in
    /// `buffer` (1-d, contiguous, the parameters' dtype and device: the flat
    /// buffer the parameters are views of): each such run gets one weight and
    /// one bias, views of `buffer` that require a gradient. Returns the runs'
    /// ranges and leaves; none when no two projections are adjacent there (or
    /// the parameters are not views of `buffer`).
    pub fn fuse(&mut self, buffer: &Tensor) -> Vec<FusedLeaves> {
        self.groups.clear();
        let mut placed = Vec::new();
        for which in [Qkv::Query, Qkv::Key, Qkv::Value] {
            let l = self.own(which);
            match (offset_in(&l.weight, buffer), offset_in(&l.bias, buffer)) {
                (Some(weight), Some(bias)) => placed.push(Placed {
                    which,
                    weight: (weight, l.weight.numel() as i64),
                    bias: (bias, l.bias.numel() as i64),
                }),
                _ => return Vec::new(),
            }
        }
        placed.sort_by_key(|p| p.weight.0);
        // Runs adjacent in both the weights and the biases.
        let mut runs: Vec<Vec<Placed>> = Vec::new();
        for p in placed {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|last| last.followed_by(&p)) => run.push(p),
                _ => runs.push(vec![p]),
            }
        }
        let in_dim = self.query.weight.size()[1];
        let mut leaves = Vec::new();
        for run in runs.into_iter().filter(|r| r.len() > 1) {
            let span = |part: fn(&Placed) -> (i64, i64)| (part(&run[0]).0, run.iter().map(|p| part(p).1).sum::<i64>());
            let (weight_range, bias_range) = (span(|p| p.weight), span(|p| p.bias));
            let leaf = |t: Tensor| t.detach().set_requires_grad(true);
            let weight = leaf(buffer.narrow(0, weight_range.0, weight_range.1).view([weight_range.1 / in_dim, in_dim]));
            let bias = leaf(buffer.narrow(0, bias_range.0, bias_range.1));
            leaves.push(FusedLeaves {
                weight_range,
                bias_range,
                members: run.len(),
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
            });
            self.groups.push(Group { linear: Linear { weight, bias }, members: run.iter().map(|p| p.which).collect() });
        }
        leaves
    }
}

/// Where one projection's weight and bias lie in the flat buffer: `(offset, numel)`.
struct Placed {
    which: Qkv,
    weight: (i64, i64),
    bias: (i64, i64),
}

impl Placed {
    /// Whether `next`'s weight and bias start where this one's end.
    fn followed_by(&self, next: &Placed) -> bool {
        self.weight.0 + self.weight.1 == next.weight.0 && self.bias.0 + self.bias.1 == next.bias.0
    }
}

/// Where `t` (contiguous) starts in `buffer` (1-d, contiguous), in elements,
/// if it lies wholly inside it.
fn offset_in(t: &Tensor, buffer: &Tensor) -> Option<i64> {
    if t.device() != buffer.device() || t.kind() != buffer.kind() || !t.is_contiguous() || buffer.dim() != 1 {
        return None;
    }
    let size = buffer.kind().elt_size_in_bytes() as i64;
    let (start, base) = (t.data_ptr() as i64, buffer.data_ptr() as i64);
    let (delta, n) = (start - base, t.numel() as i64);
    (delta >= 0 && delta % size == 0 && delta / size + n <= buffer.numel() as i64).then_some(delta / size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    /// Three projections of `h` made views of one flat buffer laid out in
    /// `order` (by row blocks), with an unrelated tensor after `gap_after`.
    fn flat(h: i64, order: [Qkv; 3], gap_after: Option<usize>) -> (QkvProjection, Tensor) {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root();
        let mk = |name: &str| Linear::new(&(&p / name), h, h, 0.5);
        let mut qkv = QkvProjection::new(mk("q"), mk("k"), mk("v"));
        let gap = 7;
        let n = 3 * (h * h + h) + 2 * gap;
        let buffer = Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let mut at = 0;
        // Weights first, then biases, each in `order`.
        for part in 0..2 {
            for (i, which) in order.iter().enumerate() {
                let l = match which {
                    Qkv::Query => &mut qkv.query,
                    Qkv::Key => &mut qkv.key,
                    Qkv::Value => &mut qkv.value,
                };
                let t = if part == 0 { &mut l.weight } else { &mut l.bias };
                let numel = t.numel() as i64;
                let mut view = buffer.narrow(0, at, numel).view(t.size().as_slice());
                tch::no_grad(|| view.copy_(t));
                t.set_data(&view);
                at += numel;
                if gap_after == Some(i) {
                    at += gap;
                }
            }
        }
        (qkv, buffer)
    }

    fn grads(outs: &[Tensor; 3], wrt: &[&Tensor]) -> Vec<Tensor> {
        let loss = (&outs[0] * 1.0 + &outs[1] * 2.0 + &outs[2] * 3.0).square().sum(Kind::Float);
        Tensor::run_backward(&[loss], wrt, false, false)
    }

    #[test]
    fn fused_projections_equal_separate_ones_with_the_same_gradients() {
        tch::manual_seed(3);
        let h = 8;
        let x = Tensor::randn([2, 5, h], (Kind::Float, Device::Cpu));
        let (mut qkv, buffer) = flat(h, [Qkv::Key, Qkv::Query, Qkv::Value], None);
        let separate = qkv.forward(&x);
        let wrt = [&qkv.query.weight, &qkv.key.weight, &qkv.value.weight, &qkv.query.bias, &qkv.key.bias];
        let g_sep: Vec<Tensor> = grads(&separate, &wrt);

        let leaves = qkv.fuse(&buffer);
        assert_eq!(leaves.len(), 1, "key, query, value adjacent: one group");
        assert_eq!(leaves[0].weight_range, (0, 3 * h * h));
        assert_eq!(leaves[0].bias_range, (3 * h * h, 3 * h));
        assert!(qkv.is_fused());
        let fused = qkv.forward(&x);
        for (a, b) in separate.iter().zip(&fused) {
            assert!(a.allclose(b, 1e-5, 1e-6, false), "outputs differ");
        }
        let g = grads(&fused, &[&leaves[0].weight, &leaves[0].bias]);
        // Row blocks in buffer order: key, query, value.
        let (gw, gb) = (&g[0], &g[1]);
        assert!(gw.narrow(0, 0, h).allclose(&g_sep[1], 1e-4, 1e-5, false), "key weight gradient");
        assert!(gw.narrow(0, h, h).allclose(&g_sep[0], 1e-4, 1e-5, false), "query weight gradient");
        assert!(gw.narrow(0, 2 * h, h).allclose(&g_sep[2], 1e-4, 1e-5, false), "value weight gradient");
        assert!(gb.narrow(0, 0, h).allclose(&g_sep[4], 1e-4, 1e-5, false), "key bias gradient");
        assert!(gb.narrow(0, h, h).allclose(&g_sep[3], 1e-4, 1e-5, false), "query bias gradient");
        // The fused leaves are the buffer's memory.
        assert_eq!(leaves[0].weight.data_ptr(), buffer.data_ptr());
        // One projection alone goes through the fused rows.
        let q_alone = qkv.linear(Qkv::Query).forward(&x);
        assert!(q_alone.allclose(&separate[0], 1e-5, 1e-6, false));
        let g = Tensor::run_backward(&[q_alone.sum(Kind::Float)], &[&leaves[0].weight], false, false);
        assert_eq!(g[0].narrow(0, 0, h).abs().sum(Kind::Float).double_value(&[]), 0.0, "key rows untouched");
        assert!(g[0].narrow(0, h, h).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn only_adjacent_projections_are_fused() {
        tch::manual_seed(4);
        let h = 4;
        let x = Tensor::randn([3, h], (Kind::Float, Device::Cpu));
        // DistilBERT's layout: k_lin, (out_lin), q_lin, v_lin.
        let (mut qkv, buffer) = flat(h, [Qkv::Key, Qkv::Query, Qkv::Value], Some(0));
        let separate = qkv.forward(&x);
        let leaves = qkv.fuse(&buffer);
        assert_eq!(leaves.len(), 1);
        assert_eq!(leaves[0].weight_range, (h * h + 7, 2 * h * h));
        let fused = qkv.forward(&x);
        for (a, b) in separate.iter().zip(&fused) {
            assert!(a.allclose(b, 1e-5, 1e-6, false));
        }
        // Not views of the buffer given: nothing fused.
        let (mut other, _) = flat(h, [Qkv::Query, Qkv::Key, Qkv::Value], None);
        assert!(other.fuse(&Tensor::zeros([1000], (Kind::Float, Device::Cpu))).is_empty());
        assert!(!other.is_fused());
    }
}
