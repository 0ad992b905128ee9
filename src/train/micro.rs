//! Micro-batches (`training.micro_batch_size`): each loader batch of
//! `training.batch_size` sequences runs through the model in slices of
//! `micro_batch_size` rows, so that a batch too large for the device in one
//! pass still makes the same optimizer step.
//!
//! The slices are cut from the loader's batch after masking (same data, same
//! masks), and each slice's loss is normalised by the masked tokens of the whole
//! optimizer step, as with `grad_accum_steps`: the slices' gradients add up to
//! the batch's. The data position counts optimizer steps, so a checkpoint
//! resumes the same way whatever split either run used (`"auto"` may choose
//! another size on another GPU).
use std::borrow::Cow;

use anyhow::Result;
use tch::{Device, Tensor};

use super::loss::{masked_lm_loss_sum, DeviceBatch};
use crate::config::{Config, MicroBatchSize};
use crate::data::loader::{index_in_step, make_batch, Batch};
use crate::data::masking::MaskingParams;
use crate::data::rng::hash_words;
use crate::data::store::TokenStore;
use crate::logging::catch_out_of_memory;
use crate::model::MaskedLm;

/// `batch` cut into consecutive slices of `rows` rows (the batch itself when
/// it has no more rows than that).
pub fn split(batch: &Batch, rows: usize) -> Vec<Cow<'_, Batch>> {
    assert!(rows > 0, "micro-batches of 0 rows");
    if rows >= batch.rows {
        return vec![Cow::Borrowed(batch)];
    }
    let bs = batch.block_size;
    (0..batch.rows)
        .step_by(rows)
        .map(|r0| {
            let r1 = (r0 + rows).min(batch.rows);
            let labels = batch.labels[r0 * bs..r1 * bs].to_vec();
            Cow::Owned(Batch {
                input_ids: batch.input_ids[r0 * bs..r1 * bs].to_vec(),
                n_masked: labels.iter().filter(|&&l| l != -100).count(),
                labels,
                rows: r1 - r0,
                block_size: bs,
                chunk_ids: batch.chunk_ids[r0..r1].to_vec(),
                // An upper bound for the slice: the batch's ids were checked whole.
                max_token: batch.max_token,
            })
        })
        .collect()
}

/// The forward passes of one optimizer step on worker `rank` of `world`: each
/// of the step's loader batches cut into slices of `rows` rows, with the index
/// of the slice's first row in the step's slice of the epoch order
/// ([`index_in_step`]): unique over the passes of all workers in the step.
pub fn step_passes(
    batches: &[Batch],
    rows: usize,
    rank: usize,
    world: usize,
) -> impl Iterator<Item = (usize, Cow<'_, Batch>)> {
    batches.iter().enumerate().flat_map(move |(a, b)| {
        split(b, rows)
            .into_iter()
            .enumerate()
            .map(move |(k, pass)| (index_in_step(a, rank, k * rows, world, b.rows), pass))
    })
}

/// The libtorch seed of one forward pass's dropout: a hash of the run's seed,
/// the step, and the index of the pass's first row in the step
/// ([`step_passes`]). Every pass of every worker draws its own masks; a resumed
/// job draws what the uninterrupted one drew; a job that splits its global
/// batch otherwise (world size, batch size, micro-batches) draws other masks.
pub fn dropout_seed(seed: u64, step: usize, first_row: usize) -> i64 {
    const DROPOUT_STREAM: u64 = 0x44_524F_504F_5554; // "DROPOUT"
    (hash_words(&[seed, step as u64, first_row as u64, DROPOUT_STREAM]) >> 1) as i64
}

/// Sequences per forward pass for this job (`batch` sequences per loader batch
/// on each worker): the configured size, the whole batch, or for `"auto"` on a
/// GPU the largest divisor of `batch` whose
/// forward and backward fit, tried on the training data's first chunks (one
/// line in the log says what was chosen).
pub fn rows_per_pass(
    cfg: &Config,
    batch: usize,
    model: &MaskedLm,
    params: &[Tensor],
    train: &TokenStore,
    masking: &MaskingParams,
    device: Device,
) -> Result<usize> {
    match cfg.training.micro_batch_size {
        MicroBatchSize::Whole => Ok(batch),
        MicroBatchSize::Rows(n) => Ok(n),
        MicroBatchSize::Auto if !device.is_cuda() => {
            tracing::info!(
                "training.micro_batch_size = \"auto\" on the CPU: the whole batch of {batch} sequences per \
                 forward pass (the search for the largest that fits runs on GPUs only)"
            );
            Ok(batch)
        }
        MicroBatchSize::Auto => {
            super::observe::oom::finding_micro_batch(cfg, batch);
            let ids: Vec<u32> = (0..batch.min(train.len()) as u32).collect();
            let sparse = cfg.training.sparse_head;
            let fits = |rows: usize| {
                catch_out_of_memory(|| {
                    let b = make_batch(train, masking, &ids[..rows.min(ids.len())], cfg.training.seed, 0);
                    let db = DeviceBatch::new(&b, device);
                    // The gradients are dropped: the optimizer never sees this pass.
                    // The path the steps take (`Trainer::forward_backward`).
                    let recompute = cfg.training.activation_checkpointing;
                    if recompute || !super::loss::head_fits_at_once(model, &db, sparse) {
                        let _ = super::recompute::forward_backward(
                            model,
                            &db,
                            1.0,
                            None,
                            sparse,
                            params,
                            recompute,
                            |_| {},
                        );
                    } else {
                        let loss = masked_lm_loss_sum(model, &db, true, sparse);
                        drop(Tensor::run_backward(&[&loss], params, false, false));
                    }
                    if let Device::Cuda(i) = device {
                        tch::Cuda::synchronize(i as i64);
                    }
                })
            };
            let block = cfg.data.block_size;
            let (rows, failed) = largest_fitting(batch, fits).map_err(|last| {
                anyhow::anyhow!(
                    "out of memory finding training.micro_batch_size = \"auto\" on {device:?}: not even 1 sequence \
                     of {block} tokens fits a forward and backward pass ({last}); set \
                     training.activation_checkpointing = true, or use a smaller data.block_size or model"
                )
            })?;
            if failed.is_empty() {
                tracing::info!(
                    "training.micro_batch_size = \"auto\": the whole batch of {batch} sequences of {block} tokens \
                     fits one forward pass on {device:?}"
                );
            } else {
                let tried: Vec<String> = failed.iter().map(usize::to_string).collect();
                tracing::info!(
                    "training.micro_batch_size = \"auto\": {rows} of the batch's {batch} sequences of {block} tokens \
                     per forward pass on {device:?} ({} did not fit)",
                    tried.join(", ")
                );
            }
            Ok(rows)
        }
    }
}

/// Tries the divisors of `batch` from the largest down; returns the first one
/// `fits` and those that ran out of memory before it, or the last allocation
/// failure when none fits. Whatever a failed try allocated is dropped before
/// the next (and libtorch's caching allocator releases its cached blocks and
/// retries before it reports a failure).
fn largest_fitting(
    batch: usize,
    mut fits: impl FnMut(usize) -> Result<(), String>,
) -> std::result::Result<(usize, Vec<usize>), String> {
    let mut failed = Vec::new();
    let mut last = String::new();
    for rows in (1..=batch).rev().filter(|d| batch.is_multiple_of(*d)) {
        match fits(rows) {
            Ok(()) => return Ok((rows, failed)),
            Err(e) => {
                tracing::debug!("micro-batch of {rows} sequences: {e}");
                failed.push(rows);
                last = e;
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(rows: usize, block: usize) -> Batch {
        let input_ids: Vec<i64> = (0..rows * block).map(|i| (i * 7 % 100) as i64).collect();
        let labels: Vec<i64> = (0..rows * block).map(|i| if i % 3 == 0 { i as i64 } else { -100 }).collect();
        let n_masked = labels.iter().filter(|&&l| l != -100).count();
        let chunk_ids = (0..rows as u64).map(|r| r * 10).collect();
        Batch { input_ids, labels, rows, block_size: block, chunk_ids, n_masked, max_token: 99 }
    }

    #[test]
    fn slices_put_back_together_are_the_batch() {
        let b = batch(8, 5);
        assert!(matches!(split(&b, 8)[0], Cow::Borrowed(_)));
        let parts = split(&b, 2);
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|p| p.rows == 2 && p.block_size == 5 && p.input_ids.len() == 10));
        let cat = |f: fn(&Batch) -> &[i64]| parts.iter().flat_map(|p| f(p).to_vec()).collect::<Vec<i64>>();
        assert_eq!(cat(|p| &p.input_ids), b.input_ids);
        assert_eq!(cat(|p| &p.labels), b.labels);
        assert_eq!(parts.iter().flat_map(|p| p.chunk_ids.clone()).collect::<Vec<_>>(), b.chunk_ids);
        assert_eq!(parts.iter().map(|p| p.n_masked).sum::<usize>(), b.n_masked);
    }

    #[test]
    fn every_pass_of_every_worker_has_its_own_dropout_seed() {
        // 2 workers x 2 batches of 4 rows x passes of 2 rows: 8 passes in the step.
        let (world, rows) = (2, 2);
        let batches = [batch(4, 5), batch(4, 5)];
        let mut firsts: Vec<usize> = Vec::new();
        for rank in 0..world {
            let passes: Vec<(usize, Cow<'_, Batch>)> = step_passes(&batches, rows, rank, world).collect();
            assert_eq!(passes.len(), 4);
            assert!(passes.iter().all(|(_, p)| p.rows == rows));
            firsts.extend(passes.iter().map(|(i, _)| *i));
        }
        // Row j of batch a on rank r is row r + 2 * (4a + j) of the step.
        assert_eq!(firsts, vec![0, 4, 8, 12, 1, 5, 9, 13]);
        let seeds: std::collections::BTreeSet<i64> = firsts.iter().map(|&i| dropout_seed(42, 7, i)).collect();
        assert_eq!(seeds.len(), firsts.len(), "two passes share a seed");
        for &i in &firsts {
            let s = dropout_seed(42, 7, i);
            assert!(s >= 0);
            assert_eq!(s, dropout_seed(42, 7, i), "a pure function of (seed, step, row)");
            assert_ne!(s, dropout_seed(42, 8, i), "another step");
            assert_ne!(s, dropout_seed(43, 7, i), "another seed");
        }
        // Whole batches: one pass per batch, at the batch's first row.
        let whole: Vec<usize> = step_passes(&batches, 4, 1, world).map(|(i, _)| i).collect();
        assert_eq!(whole, vec![1, 9]);
    }

    #[test]
    fn the_largest_divisor_that_fits_is_chosen() {
        let mut tried = Vec::new();
        let oom = |rows: usize| {
            catch_out_of_memory(|| {
                if rows > 3 {
                    panic!("CUDA out of memory. Tried to allocate {rows}.00 GiB");
                }
            })
        };
        let r = largest_fitting(12, |rows| {
            tried.push(rows);
            oom(rows)
        });
        assert_eq!(r, Ok((3, vec![12, 6, 4])));
        assert_eq!(tried, vec![12, 6, 4, 3]);
        assert_eq!(largest_fitting(8, |_| Ok(())), Ok((8, vec![])));
        let none = largest_fitting(4, |rows| Err(format!("CUDA out of memory at {rows}")));
        assert_eq!(none, Err("CUDA out of memory at 1".to_string()));
    }
}
