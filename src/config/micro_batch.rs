//! `training.micro_batch_size`: how many of a worker's `batch_size` sequences
//! run through one forward and backward pass. It changes memory, never the
//! result: the micro-batches of a batch add up to the batch's gradient.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// `training.micro_batch_size`: absent, a number, or `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MicroBatchSize {
    /// The whole `batch_size` in one pass (the key is absent).
    #[default]
    Whole,
    /// On a GPU, the largest divisor of `batch_size` whose forward and backward
    /// fit, found before the first step; on the CPU the whole batch.
    Auto,
    /// This many sequences per pass; divides `batch_size`.
    Rows(usize),
}

impl MicroBatchSize {
    /// Refuses a size that is 0, larger than `batch_size` or does not divide it.
    pub fn check(self, batch_size: usize) -> Result<()> {
        let MicroBatchSize::Rows(n) = self else { return Ok(()) };
        let (below, above) = nearest_divisors(batch_size, n);
        let nearest = match above {
            Some(a) if a != below => format!("{below} or {a}"),
            _ => below.to_string(),
        };
        if n == 0 {
            bail!(
                "training.micro_batch_size = 0 must be at least 1: a divisor of training.batch_size = {batch_size}, \
                 \"auto\", or leave it out for the whole batch"
            );
        }
        if n > batch_size {
            bail!(
                "training.micro_batch_size = {n} is larger than training.batch_size = {batch_size}: it splits the \
                 batch, so it must divide it ({nearest}, or \"auto\"; leave it out for the whole batch)"
            );
        }
        if !batch_size.is_multiple_of(n) {
            bail!(
                "training.micro_batch_size = {n} does not divide training.batch_size = {batch_size}: use a divisor \
                 ({nearest} are the nearest) or \"auto\""
            );
        }
        Ok(())
    }
}

/// The divisors of `batch` nearest to `n`: the largest at most `n` and the
/// smallest above it (none when `n >= batch`).
pub fn nearest_divisors(batch: usize, n: usize) -> (usize, Option<usize>) {
    let below = (1..=n.min(batch)).rev().find(|d| batch.is_multiple_of(*d)).unwrap_or(1);
    let above = (n + 1..=batch).find(|d| batch.is_multiple_of(*d));
    (below, above)
}

impl Serialize for MicroBatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            MicroBatchSize::Whole => s.serialize_none(),
            MicroBatchSize::Auto => s.serialize_str("auto"),
            MicroBatchSize::Rows(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MicroBatchSize;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of sequences that divides training.batch_size, or \"auto\"")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(MicroBatchSize::Rows(usize::try_from(v).map_err(E::custom)?))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "training.micro_batch_size = {v}: expected a number of sequences that divides \
                         training.batch_size, or \"auto\""
                    ))),
                }
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                match v {
                    "auto" => Ok(MicroBatchSize::Auto),
                    _ => Err(E::custom(format!(
                        "training.micro_batch_size = {v:?}: expected a number of sequences that divides \
                         training.batch_size, or \"auto\""
                    ))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn job(training: &str) -> Result<Config> {
        Config::from_toml(&format!("[model]\npath = \"m\"\n[training]\n{training}\n"))
    }

    #[test]
    fn micro_batch_size_is_absent_a_number_or_auto() {
        assert_eq!(job("").unwrap().training.micro_batch_size, MicroBatchSize::Whole);
        assert_eq!(
            job("batch_size = 8\nmicro_batch_size = 2").unwrap().training.micro_batch_size,
            MicroBatchSize::Rows(2)
        );
        assert_eq!(
            job("batch_size = 8\nmicro_batch_size = 8").unwrap().training.micro_batch_size,
            MicroBatchSize::Rows(8)
        );
        assert_eq!(job("micro_batch_size = \"auto\"").unwrap().training.micro_batch_size, MicroBatchSize::Auto);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[model]\npath = \"m\"\n[training]\nbatch_size = 512\n").unwrap();
        let set = |v: &str| Config::load(&p, &[format!("training.micro_batch_size={v}")]);
        assert_eq!(set("auto").unwrap().training.micro_batch_size, MicroBatchSize::Auto);
        assert_eq!(set("64").unwrap().training.micro_batch_size, MicroBatchSize::Rows(64));
    }

    #[test]
    fn micro_batch_size_errors_name_both_keys_and_values() {
        let err = |t: &str| format!("{:#}", job(t).unwrap_err());
        let e = err("batch_size = 512\nmicro_batch_size = 100");
        assert!(e.contains("training.micro_batch_size = 100 does not divide training.batch_size = 512"), "{e}");
        assert!(e.contains("64 or 128") && e.contains("\"auto\""), "{e}");
        let e = err("batch_size = 8\nmicro_batch_size = 16");
        assert!(e.contains("training.micro_batch_size = 16 is larger than training.batch_size = 8"), "{e}");
        let e = err("batch_size = 8\nmicro_batch_size = 0");
        assert!(e.contains("training.micro_batch_size = 0 must be at least 1") && e.contains("batch_size = 8"), "{e}");
        let e = err("micro_batch_size = \"big\"");
        assert!(e.contains("training.micro_batch_size = \"big\"") && e.contains("\"auto\""), "{e}");
        let e = err("micro_batch_size = -4");
        assert!(e.contains("training.micro_batch_size = -4"), "{e}");
        let e = err("micro_batch_size = 2.5");
        assert!(e.contains("micro_batch_size") && e.contains("divides training.batch_size"), "{e}");
    }

    #[test]
    fn nearest_divisors_bracket_the_size() {
        assert_eq!(nearest_divisors(512, 100), (64, Some(128)));
        assert_eq!(nearest_divisors(512, 600), (512, None));
        assert_eq!(nearest_divisors(12, 5), (4, Some(6)));
        assert_eq!(nearest_divisors(7, 0), (1, Some(1)));
    }
}
