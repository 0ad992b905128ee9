//! World size 1: every collective is the identity.
use anyhow::{bail, Result};

use super::Communicator;

/// The communicator of a single-process job.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalComm;

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<()> {
        super::tensor::Elem::of(t, 0)?;
        Ok(())
    }
    fn broadcast_bytes(&mut self, root: usize, _data: &mut Vec<u8>) -> Result<()> {
        if root != 0 {
            bail!("broadcast from rank {root} in a job of one worker");
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "local"
    }
    fn set_timeout(&mut self, _: std::time::Duration) {
        // One process: nothing is ever waited for.
    }
}
