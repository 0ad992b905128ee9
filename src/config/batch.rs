//! The batch of an optimizer step: `training.global_batch_size`, or the
//! per-worker `batch_size` times `grad_accum_steps` times the workers. The
//! global batch is what shapes the job (and what a checkpoint records); how it
//! is split over workers, loader batches and forward passes is not.
use anyhow::{anyhow, bail, Result};

use super::TrainingConfig;

/// `training.batch_size` when neither it nor `global_batch_size` is given.
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// How one optimizer step's `global()` sequences are split: `world` workers,
/// each taking `grad_accum_steps` loader batches of `batch_size` sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub world: usize,
    pub batch_size: usize,
    pub grad_accum_steps: usize,
}

impl BatchShape {
    /// Sequences per optimizer step over all workers.
    pub fn global(&self) -> usize {
        self.world * self.batch_size * self.grad_accum_steps
    }
}

impl std::fmt::Display for BatchShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let workers = if self.world == 1 { "worker" } else { "workers" };
        write!(
            f,
            "global batch {} = {} {workers} x batch {} x accumulation {}",
            self.global(),
            self.world,
            self.batch_size,
            self.grad_accum_steps
        )
    }
}

impl TrainingConfig {
    /// The split of the step on `world` workers, from the keys given (any two of
    /// `global_batch_size`, `batch_size` and `grad_accum_steps` determine the
    /// third; `global_batch_size` alone means `grad_accum_steps = 1`; without it,
    /// `batch_size` defaults to 8 and `grad_accum_steps` to 1). An error names
    /// the keys and values that do not divide or do not agree.
    pub fn batch_shape(&self, world: usize) -> Result<BatchShape> {
        assert!(world > 0, "a job has at least one worker");
        let workers = if world == 1 { "worker" } else { "workers" };
        let Some(global) = self.global_batch_size else {
            let shape = BatchShape {
                world,
                batch_size: self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE),
                grad_accum_steps: self.grad_accum_steps.unwrap_or(1),
            };
            self.micro_batch_size.check(shape.batch_size)?;
            return Ok(shape);
        };
        let shape = match (self.batch_size, self.grad_accum_steps) {
            (Some(b), Some(a)) => {
                if world * b * a != global {
                    bail!(
                        "training.global_batch_size = {global} does not match {world} {workers} x training.batch_size \
                         {b} x training.grad_accum_steps {a} = {}: give two of the three (the third is derived)",
                        world * b * a
                    );
                }
                BatchShape { world, batch_size: b, grad_accum_steps: a }
            }
            (Some(b), None) => {
                if !global.is_multiple_of(world * b) {
                    bail!(
                        "training.global_batch_size = {global} is not divisible by {world} {workers} x \
                         training.batch_size {b}: choose a global batch that is a multiple of {}, or another \
                         batch_size",
                        world * b
                    );
                }
                BatchShape { world, batch_size: b, grad_accum_steps: global / (world * b) }
            }
            (None, a) => {
                let a = a.unwrap_or(1);
                if !global.is_multiple_of(world * a) {
                    bail!(
                        "training.global_batch_size = {global} is not divisible by {world} {workers} x \
                         grad_accum_steps {a}: choose a global batch that is a multiple of {}, or another number \
                         of workers",
                        world * a
                    );
                }
                BatchShape { world, batch_size: global / (world * a), grad_accum_steps: a }
            }
        };
        self.micro_batch_size.check(shape.batch_size).map_err(|e| {
            if self.batch_size.is_some() {
                e
            } else {
                anyhow!("{e} (the per-worker batch of training.global_batch_size = {global}: {shape})")
            }
        })?;
        Ok(shape)
    }

    /// The checks of the batch keys that need no world size (`validate`).
    pub(super) fn check_batch_keys(&self) -> Result<()> {
        for (key, v) in [
            ("training.batch_size", self.batch_size),
            ("training.grad_accum_steps", self.grad_accum_steps),
            ("training.global_batch_size", self.global_batch_size),
        ] {
            if v == Some(0) {
                bail!("{key} must be at least 1");
            }
        }
        match (self.global_batch_size, self.batch_size, self.grad_accum_steps) {
            // The world size is not known yet: only what holds for every one.
            (Some(g), b, a) if !g.is_multiple_of(b.unwrap_or(1) * a.unwrap_or(1)) => bail!(
                "training.global_batch_size = {g} is not divisible by training.batch_size {} x \
                 training.grad_accum_steps {}: give two of the three (the third is derived)",
                b.unwrap_or(1),
                a.unwrap_or(1)
            ),
            (None, b, _) => self.micro_batch_size.check(b.unwrap_or(DEFAULT_BATCH_SIZE)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, MicroBatchSize};

    fn training(keys: &str) -> Result<crate::config::TrainingConfig, String> {
        Config::from_toml(&format!("[model]\npath = \"m\"\n[training]\n{keys}\n"))
            .map(|c| c.training)
            .map_err(|e| e.to_string())
    }

    fn shape(keys: &str, world: usize) -> Result<(usize, usize, usize), String> {
        let s = training(keys)?.batch_shape(world).map_err(|e| e.to_string())?;
        assert_eq!(s.world, world);
        Ok((s.batch_size, s.grad_accum_steps, s.global()))
    }

    #[test]
    fn without_a_global_batch_the_per_worker_keys_and_their_defaults_hold() {
        assert_eq!(shape("", 1), Ok((8, 1, 8)));
        assert_eq!(shape("", 4), Ok((8, 1, 32)));
        assert_eq!(shape("batch_size = 3\ngrad_accum_steps = 2", 2), Ok((3, 2, 12)));
    }

    #[test]
    fn a_global_batch_that_divides_gives_the_per_worker_batch() {
        // Alone: no accumulation.
        assert_eq!(shape("global_batch_size = 64", 1), Ok((64, 1, 64)));
        assert_eq!(shape("global_batch_size = 64", 2), Ok((32, 1, 64)));
        // With batch_size: the accumulation is derived.
        assert_eq!(shape("global_batch_size = 64\nbatch_size = 8", 2), Ok((8, 4, 64)));
        // With grad_accum_steps: the batch is derived.
        assert_eq!(shape("global_batch_size = 64\ngrad_accum_steps = 4", 4), Ok((4, 4, 64)));
        // All three, consistent.
        assert_eq!(shape("global_batch_size = 64\nbatch_size = 8\ngrad_accum_steps = 2", 4), Ok((8, 2, 64)));
        let s = training("global_batch_size = 64").unwrap().batch_shape(2).unwrap();
        assert_eq!(s.to_string(), "global batch 64 = 2 workers x batch 32 x accumulation 1");
    }

    #[test]
    fn a_global_batch_that_does_not_divide_is_refused_naming_the_values() {
        let e = shape("global_batch_size = 10", 4).unwrap_err();
        assert!(
            e.contains("training.global_batch_size = 10 is not divisible by 4 workers x grad_accum_steps 1"),
            "{e}"
        );
        let e = shape("global_batch_size = 24\nbatch_size = 4", 4).unwrap_err();
        assert!(e.contains("global_batch_size = 24 is not divisible by 4 workers x training.batch_size 4"), "{e}");
        let e = shape("global_batch_size = 24\ngrad_accum_steps = 4", 4).unwrap_err();
        assert!(e.contains("24 is not divisible by 4 workers x grad_accum_steps 4"), "{e}");
        // Fewer sequences than workers.
        assert!(shape("global_batch_size = 2", 4).unwrap_err().contains("not divisible by 4 workers"));
    }

    #[test]
    fn three_inconsistent_batch_keys_are_refused() {
        let e = shape("global_batch_size = 64\nbatch_size = 8\ngrad_accum_steps = 4", 4).unwrap_err();
        assert!(
            e.contains("global_batch_size = 64 does not match 4 workers x training.batch_size 8 x ")
                && e.contains("grad_accum_steps 4 = 128"),
            "{e}"
        );
        // Caught without the world size when no world size can fit.
        let e = training("global_batch_size = 10\nbatch_size = 4").unwrap_err();
        assert!(e.contains("global_batch_size = 10 is not divisible by training.batch_size 4"), "{e}");
        assert!(training("global_batch_size = 0")
            .unwrap_err()
            .contains("training.global_batch_size must be at least 1"));
    }

    #[test]
    fn the_micro_batch_divides_the_derived_batch() {
        let mut t = training("global_batch_size = 16\nmicro_batch_size = 4").unwrap();
        assert_eq!(t.batch_shape(2).unwrap().batch_size, 8);
        let e = t.batch_shape(8).unwrap_err().to_string();
        assert!(e.contains("micro_batch_size = 4 is larger than training.batch_size = 2"), "{e}");
        assert!(e.contains("global batch 16 = 8 workers x batch 2"), "{e}");
        t.micro_batch_size = MicroBatchSize::Rows(3);
        assert!(t.batch_shape(1).unwrap_err().to_string().contains("does not divide"));
    }
}
