//! Reads of device tensors on the host, counted.
//!
//! On a GPU each read waits for every queued kernel, so the training step
//! avoids them: its reads (the log line's loss and norm, the non-finite
//! counters, the step count for a checkpoint) are made at log steps and saves
//! only, and all go through these functions, whose count a test holds at zero
//! over steps that do not log.
use std::cell::Cell;

use tch::{Device, Tensor};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// A one-element tensor's value on the host.
pub fn read_f64(t: &Tensor) -> f64 {
    READS.with(|r| r.set(r.get() + 1));
    t.double_value(&[])
}

/// A tensor's elements on the host, as f64.
pub fn read_vec(t: &Tensor) -> Vec<f64> {
    READS.with(|r| r.set(r.get() + 1));
    Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(tch::Kind::Double).reshape([-1]))
        .expect("a tensor of numbers")
}

/// Reads made by this thread so far.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

/// A one-element CPU tensor's value: CPU memory, so no device sync and not
/// counted (the CPU AdamW kernel takes its scalars this way).
pub fn cpu_value(t: &Tensor) -> f64 {
    assert_eq!(t.device(), Device::Cpu, "cpu_value of a tensor on {:?}", t.device());
    t.double_value(&[])
}
