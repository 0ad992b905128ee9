//! The flat parameter buffer: the spine of training.
//!
//! Every trainable parameter of the fp32 master model is re-pointed
//! (`set_data`) at a slice of one contiguous fp32 buffer, decayed parameters
//! first, then by name (the *saved layout*: checkpoints' moments are saved in
//! it), except that the groups the model declares (each layer's query, key and
//! value weights, and their biases: [`crate::model::MaskedLm::qkv_groups`])
//! lie back to back at their first member's place, so that they can run as one
//! GEMM. Moments are converted to the saved layout when saved and back when
//! loaded ([`FlatParams::to_saved_layout`]), so checkpoints do not depend on
//! which groups a model declares. Beside
//! it lie the flat fp32 gradient and, for bf16 or fp16 training, a flat copy
//! in that dtype (the shadow) whose slices are the compute model's parameters. So the
//! gradient sum over workers, the norm, clipping and the AdamW update are a
//! handful of whole-buffer kernels, and the optimizer's moments are plain
//! tensors of the same layout.
//!
//! [`FlatParams`] owns all of it behind methods: the trainer accumulates
//! gradients into it, data parallelism sums ranges of the gradient in place
//! ([`FlatParams::grad_range`]: views), the optimizer updates it through
//! [`FlatParams::update_buffers`], and checkpoints read the master by name.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::config::Precision;
use crate::model::MaskedLm;

#[cfg(test)]
mod tests;

/// One trainable parameter's place in the flat buffers.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub offset: i64,
    pub numel: i64,
    pub shape: Vec<i64>,
    /// Where the parameter starts in the saved layout (by decay, then name).
    pub saved_offset: i64,
}

/// A tensor the training step differentiates: one slot, or adjacent slots
/// fused into one tensor (a layer's query, key and value weights:
/// [`crate::model::MaskedLm::fuse_qkv`]); one gradient each.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The slot's name, or the first fused slot's name with a `+N` suffix.
    pub name: String,
    pub offset: i64,
    pub numel: i64,
}

/// The fp32 master weights, their gradient and the bf16/fp16 compute copy, flat.
pub struct FlatParams {
    slots: Vec<Slot>,
    /// The gradients' units, in offset order: the slots, some fused.
    leaves: Vec<Leaf>,
    /// Elements `[0, n_decay)` get weight decay, the rest (biases, LayerNorm) do not.
    n_decay: i64,
    master: Tensor,
    grad: Tensor,
    /// Flat bf16/fp16 compute copy of `master` (bf16/fp16 training): the compute model's
    /// parameters are views of it, and each update rewrites it from the master.
    shadow: Option<Tensor>,
    /// The gradient buffer holds nothing yet for the coming step: the first
    /// micro-batch overwrites it instead of adding.
    grad_fresh: bool,
    /// The buffers' layout is the saved layout (no group moved a parameter).
    layout_is_saved: bool,
    /// What gradients of another dtype are multiplied by as they land in the
    /// fp32 buffer ([`Self::set_grad_factor`]).
    grad_factor: f64,
}

/// What an optimizer update reads and writes ([`FlatParams::update_buffers`]).
pub struct UpdateBuffers<'a> {
    pub master: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub shadow: Option<&'a mut Tensor>,
    /// Elements `[0, n_decay)` are decayed.
    pub n_decay: i64,
}

impl FlatParams {
    /// Builds the flat buffers from `(name, parameter)` pairs and re-points each
    /// parameter at its slice of the master buffer. `no_decay(name)` selects the
    /// parameters without weight decay. The layout is the saved layout.
    pub fn new(params: Vec<(String, Tensor)>, no_decay: impl Fn(&str) -> bool) -> Result<Self> {
        Self::with_groups(params, no_decay, &[])
    }

    /// [`Self::new`], with each of `groups` (parameter names) placed back to
    /// back, in name order, where its first member falls in the saved layout.
    /// A group with a member that is not among `params` (frozen), or whose
    /// members differ in weight decay, is left where names put it.
    pub fn with_groups(
        params: Vec<(String, Tensor)>,
        no_decay: impl Fn(&str) -> bool,
        groups: &[Vec<String>],
    ) -> Result<Self> {
        let mut params = params;
        params.sort_by(|a, b| (no_decay(&a.0), &a.0).cmp(&(no_decay(&b.0), &b.0)));
        let mut saved_offsets = std::collections::HashMap::new();
        let mut offset = 0i64;
        for (name, p) in &params {
            saved_offsets.insert(name.clone(), offset);
            offset += p.numel() as i64;
        }
        let total = offset;
        // Each grouped parameter sorts as its group's first member (by name).
        let mut anchor: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for g in groups {
            let present = g.iter().all(|n| saved_offsets.contains_key(n));
            let Some(first) = g.iter().min() else { continue };
            if present && g.iter().all(|n| no_decay(n) == no_decay(first)) {
                for n in g {
                    anchor.insert(n, first);
                }
            }
        }
        params.sort_by(|a, b| {
            let key = |n: &str| (no_decay(n), anchor.get(n).copied().unwrap_or(n).to_string());
            (key(&a.0), &a.0).cmp(&(key(&b.0), &b.0))
        });
        let Some((_, first)) = params.first() else { bail!("the model has no trainable parameters") };
        let device = first.device();
        let master = Tensor::zeros([total], (Kind::Float, device));
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0i64;
        let mut n_decay = 0i64;
        for (name, mut p) in params {
            let numel = p.numel() as i64;
            let shape = p.size();
            let mut view = master.narrow(0, offset, numel).view(shape.as_slice());
            tch::no_grad(|| view.copy_(&p.to_kind(Kind::Float)));
            p.set_data(&view);
            if !no_decay(&name) {
                n_decay = offset + numel;
            }
            let saved_offset = saved_offsets[&name];
            slots.push(Slot { name, offset, numel, shape, saved_offset });
            offset += numel;
        }
        let layout_is_saved = slots.iter().all(|s| s.offset == s.saved_offset);
        let leaves = slots.iter().map(|s| Leaf { name: s.name.clone(), offset: s.offset, numel: s.numel }).collect();
        Ok(Self {
            slots,
            leaves,
            n_decay,
            grad: master.zeros_like(),
            master,
            shadow: None,
            grad_fresh: true,
            layout_is_saved,
            grad_factor: 1.0,
        })
    }

    /// `flat` (a tensor in the buffers' layout, e.g. a moment) in the saved
    /// layout: itself where the two agree, else a reordered copy.
    pub fn to_saved_layout(&self, flat: &Tensor) -> Tensor {
        if self.layout_is_saved {
            return flat.shallow_clone();
        }
        let mut order: Vec<&Slot> = self.slots.iter().collect();
        order.sort_by_key(|s| s.saved_offset);
        Tensor::cat(&order.iter().map(|s| flat.narrow(0, s.offset, s.numel)).collect::<Vec<_>>(), 0)
    }

    /// The inverse of [`Self::to_saved_layout`]: `saved` in the buffers' layout.
    pub fn from_saved_layout(&self, saved: &Tensor) -> Tensor {
        if self.layout_is_saved {
            return saved.shallow_clone();
        }
        Tensor::cat(&self.slots.iter().map(|s| saved.narrow(0, s.saved_offset, s.numel)).collect::<Vec<_>>(), 0)
    }

    pub fn numel(&self) -> i64 {
        self.master.numel() as i64
    }

    pub fn device(&self) -> Device {
        self.master.device()
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    /// Elements `[0, n_decay)` of every flat buffer get weight decay.
    pub fn n_decay(&self) -> i64 {
        self.n_decay
    }

    /// The fp32 master weights (read only: the optimizer writes them).
    pub fn master(&self) -> &Tensor {
        &self.master
    }

    /// The accumulated gradient (a sum until the update divides it).
    pub fn grad(&self) -> &Tensor {
        &self.grad
    }

    /// The gradient, to set in tests.
    #[cfg(test)]
    pub fn grad_mut(&mut self) -> &mut Tensor {
        &mut self.grad
    }

    /// Elements `[offset, offset + numel)` of the gradient, a view.
    pub fn grad_range(&self, offset: i64, numel: i64) -> Tensor {
        self.grad.narrow(0, offset, numel)
    }

    /// The global L2 norm of the accumulated gradient, as a 0-d tensor on the
    /// device (no host read).
    pub fn grad_norm(&self) -> Tensor {
        self.grad.norm()
    }

    /// The flat buffer the running model's parameters are views of: the bf16/fp16
    /// shadow if any, else the master.
    pub fn compute_buffer(&self) -> &Tensor {
        self.shadow.as_ref().unwrap_or(&self.master)
    }

    /// Gradients of another dtype than fp32 (the compute copy's) are multiplied
    /// by `factor` as they land in the fp32 buffer: fp16 on several workers
    /// runs backward on the loss over this worker's masked tokens, which keeps
    /// the fp16 gradients in range, and the factor (those tokens) makes the
    /// buffer hold the gradient of the sum again, as the update expects.
    pub fn set_grad_factor(&mut self, factor: f64) {
        self.grad_factor = factor;
    }

    /// Adds one micro-batch's gradients (one per leaf, in leaf order; any
    /// dtype; undefined for a parameter the loss did not reach) into the flat
    /// fp32 gradient. The first micro-batch of a step overwrites it.
    ///
    /// Adjacent leaves are handled together: a run of defined gradients is one
    /// `cat` into its range of the buffer (plus one add when accumulating), a
    /// run of undefined ones one fill, so a whole-model backward costs a few
    /// kernels, not one copy per parameter (200-390 launches on a GPU).
    pub fn accumulate(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.leaves.len(), "one gradient per leaf");
        let fresh = self.grad_fresh;
        let factor = self.grad_factor;
        tch::no_grad(|| {
            let mut i = 0;
            while i < grads.len() {
                let defined = grads[i].defined();
                let mut j = i + 1;
                while j < grads.len() && grads[j].defined() == defined {
                    j += 1;
                }
                let (start, end) = (self.leaves[i].offset, self.leaves[j - 1].offset + self.leaves[j - 1].numel);
                let mut dst = self.grad.narrow(0, start, end - start);
                if !defined {
                    if fresh {
                        let _ = dst.zero_();
                    }
                } else {
                    let flat: Vec<Tensor> = grads[i..j].iter().map(|g| g.reshape([-1])).collect();
                    if fresh && flat.iter().all(|g| g.kind() == dst.kind()) {
                        let _ = Tensor::cat_out(&dst, &flat, 0);
                    } else if fresh {
                        // bf16 gradients: one cat in their dtype, then one
                        // converting copy (`cat_out` across dtypes falls back
                        // to a copy kernel per gradient on CUDA).
                        dst.copy_(&Tensor::cat(&flat, 0));
                        if factor != 1.0 {
                            let _ = dst.g_mul_scalar_(factor);
                        }
                    } else if factor != 1.0 {
                        let _ = dst.g_add_(&(Tensor::cat(&flat, 0).to_kind(Kind::Float) * factor));
                    } else {
                        let _ = dst.g_add_(&Tensor::cat(&flat, 0).to_kind(Kind::Float));
                    }
                }
                i = j;
            }
        });
        self.grad_fresh = false;
    }

    /// Drops the accumulated gradient: the next [`Self::accumulate`] starts
    /// the next step's (after an update, or instead of one).
    pub fn discard_grads(&mut self) {
        self.grad_fresh = true;
    }

    /// The buffers an optimizer update reads and writes. The caller rewrites
    /// the shadow from the master when it has one.
    pub fn update_buffers(&mut self) -> UpdateBuffers<'_> {
        UpdateBuffers {
            master: &mut self.master,
            grad: &self.grad,
            shadow: self.shadow.as_mut(),
            n_decay: self.n_decay,
        }
    }

    /// The master view of every parameter, by name (for saving).
    pub fn named_master(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), self.master.narrow(0, s.offset, s.numel).view(s.shape.as_slice())))
            .collect()
    }

    /// Sets up the model that runs forward and backward over these buffers:
    /// `master` itself in fp32, or a bf16/fp16 copy whose parameters are views of
    /// the shadow; its query, key and value projections fused where the flat
    /// buffer holds them back to back ([`Self::with_groups`] puts them so;
    /// leaves fused to match). Returns that
    /// copy (none in fp32) and the tensors the step differentiates, one per leaf.
    pub fn compute_model(
        &mut self,
        master: &mut MaskedLm,
        precision: Precision,
    ) -> Result<(Option<MaskedLm>, Vec<Tensor>)> {
        let kind = precision.compute_kind();
        let mut compute = match precision {
            Precision::Fp32 => None,
            Precision::Bf16 | Precision::Fp16 => Some(master.to_kind_copy(kind)?),
        };
        let params = ordered_params(&compute.as_ref().unwrap_or(master).vs, &self.slots)?;
        if compute.is_some() {
            self.attach_shadow(&params, kind);
        }
        let model = compute.as_mut().unwrap_or(master);
        let fused = model.fuse_qkv(self.compute_buffer());
        let mut tensors: std::collections::HashMap<i64, Tensor> =
            self.slots.iter().zip(params).map(|(s, (_, t))| (s.offset, t)).collect();
        for f in &fused {
            for (range, tensor) in [(f.weight_range, &f.weight), (f.bias_range, &f.bias)] {
                self.fuse_leaves(range)?;
                tensors.insert(range.0, tensor.shallow_clone());
            }
        }
        if !fused.is_empty() {
            let members: usize = fused.iter().map(|f| f.members).sum();
            tracing::info!(
                "attention: {members} of {} query/key/value projections fused into {} GEMMs (views of the flat buffer)",
                3 * model.num_layers(),
                fused.len()
            );
        }
        let leaves =
            self.leaves.iter().map(|l| tensors.remove(&l.offset).context("internal error: a leaf without a tensor"));
        Ok((compute, leaves.collect::<Result<_>>()?))
    }

    /// Makes `params` (a lower-precision compute copy with the slots' names, in
    /// slot order) views of one flat buffer of `kind` that every update rewrites
    /// from the master weights.
    pub(crate) fn attach_shadow(&mut self, params: &[(String, Tensor)], kind: Kind) {
        assert_eq!(params.len(), self.slots.len(), "one compute parameter per slot");
        let shadow = self.master.to_kind(kind);
        for ((name, p), s) in params.iter().zip(&self.slots) {
            assert_eq!(name, &s.name, "compute parameters in slot order");
            let mut p = p.shallow_clone();
            p.set_data(&shadow.narrow(0, s.offset, s.numel).view(s.shape.as_slice()));
        }
        self.shadow = Some(shadow);
    }

    /// Makes the leaves that exactly cover `(offset, numel)` one leaf (their
    /// tensors fused into one the step differentiates).
    fn fuse_leaves(&mut self, (offset, numel): (i64, i64)) -> Result<()> {
        let Some(first) = self.leaves.iter().position(|l| l.offset == offset) else {
            bail!("internal error: no parameter starts at element {offset} of the flat buffer");
        };
        let mut last = first;
        let mut end = offset + self.leaves[first].numel;
        while end < offset + numel && last + 1 < self.leaves.len() {
            last += 1;
            end += self.leaves[last].numel;
        }
        if end != offset + numel {
            bail!("internal error: elements {offset}..{} of the flat buffer are not whole parameters", offset + numel);
        }
        let name = format!("{}+{}", self.leaves[first].name, last - first);
        self.leaves.splice(first..=last, [Leaf { name, offset, numel }]);
        Ok(())
    }
}

/// Trainable parameters of a var store in the flat buffers' order (by name).
pub fn ordered_params(vs: &tch::nn::VarStore, slots: &[Slot]) -> Result<Vec<(String, Tensor)>> {
    let vars = vs.variables();
    slots
        .iter()
        .map(|s| match vars.get(&s.name) {
            Some(t) => Ok((s.name.clone(), t.shallow_clone())),
            None => bail!("parameter {} missing from the compute model", s.name),
        })
        .collect()
}
