//! The model that runs forward and backward, set up over the optimizer's flat
//! buffers: the fp32 master itself or a bf16 copy, its query/key/value
//! projections fused where the buffer allows, and the tensors the step
//! differentiates.
use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::optimizer::{ordered_params, FlatAdamW};
use crate::config::Precision;
use crate::model::MaskedLm;

#[cfg(test)]
mod tests;

/// The model that runs forward and backward: `master` itself in fp32, or a bf16
/// copy whose weights the optimizer rewrites after each update; with its
/// query, key and value projections fused where the flat buffer allows; and
/// the tensors the step differentiates, one per leaf of the optimizer.
pub(super) fn compute_model(
    master: &mut MaskedLm,
    opt: &mut FlatAdamW,
    precision: Precision,
) -> Result<(Option<MaskedLm>, Vec<Tensor>)> {
    let mut compute = match precision {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(master.to_kind_copy(Kind::BFloat16)?),
    };
    let params = ordered_params(&compute.as_ref().unwrap_or(master).vs, &opt.slots)?;
    if compute.is_some() {
        opt.attach_shadow(&params, Kind::BFloat16);
    }
    let model = compute.as_mut().unwrap_or(master);
    let fused = model.fuse_qkv(opt.compute_buffer());
    let mut tensors: std::collections::HashMap<i64, Tensor> =
        opt.slots.iter().zip(params).map(|(s, (_, t))| (s.offset, t)).collect();
    for f in &fused {
        for (range, tensor) in [(f.weight_range, &f.weight), (f.bias_range, &f.bias)] {
            opt.fuse_leaves(range)?;
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
        opt.leaves.iter().map(|l| tensors.remove(&l.offset).context("internal error: a leaf without a tensor"));
    Ok((compute, leaves.collect::<Result<_>>()?))
}
