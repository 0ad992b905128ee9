//! Where a step's time goes, and the model FLOPs utilisation.
//!
//! Phases are timed with wall clocks. On a GPU the kernels run asynchronously,
//! so the device is synchronised at phase boundaries, but only on the steps
//! that get logged: the other steps run without host syncs.
use std::time::Instant;

use serde_json::{json, Value};
use tch::Device;

use crate::model::MaskedLm;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the masker threads.
    Data,
    Forward,
    Backward,
    /// Gradient all-reduce between workers.
    Sync,
    /// Clipping, AdamW, the bf16 copy of the weights.
    Optimizer,
}

const PHASES: [Phase; 5] = [Phase::Data, Phase::Forward, Phase::Backward, Phase::Sync, Phase::Optimizer];

/// Seconds spent per phase over a logging window.
pub struct StepTimer {
    device: Device,
    /// Synchronise the device at phase boundaries (GPU, logged steps only).
    pub exact: bool,
    totals: [f64; 5],
    steps: usize,
    mark: Instant,
}

impl StepTimer {
    pub fn new(device: Device) -> Self {
        Self { device, exact: false, totals: [0.0; 5], steps: 0, mark: Instant::now() }
    }

    /// Starts timing a phase (ends the previous one).
    pub fn start(&mut self) {
        self.sync();
        self.mark = Instant::now();
    }

    /// Ends `phase`, adding its time, and starts the next one.
    pub fn end(&mut self, phase: Phase) {
        self.sync();
        let i = PHASES.iter().position(|&p| p == phase).expect("phase");
        self.totals[i] += self.mark.elapsed().as_secs_f64();
        self.mark = Instant::now();
    }

    pub fn step_done(&mut self) {
        self.steps += 1;
    }

    fn sync(&self) {
        if self.exact {
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
        }
    }

    /// Mean seconds per step of each phase since the last report, as metrics
    /// fields (`time_data_s`, ...), then starts a new window.
    pub fn report(&mut self) -> Value {
        let n = self.steps.max(1) as f64;
        let t = self.totals.map(|x| x / n);
        let total: f64 = t.iter().sum();
        self.totals = [0.0; 5];
        self.steps = 0;
        json!({
            "time_data_s": t[0], "time_forward_s": t[1], "time_backward_s": t[2],
            "time_sync_s": t[3], "time_optimizer_s": t[4],
            "data_wait_fraction": if total > 0.0 { t[0] / total } else { 0.0 },
        })
    }
}

/// Training FLOPs of one step: 6 x (non-embedding parameters) per token for
/// the matmuls, 12 x layers x hidden x sequence per token for attention
/// (PaLM, appendix B), and 6 x hidden x vocabulary per token that goes through
/// the vocabulary projection (only the masked ones with the sparse head).
pub fn train_flops(model: &MaskedLm, tokens: f64, projected_tokens: f64, seq: f64) -> f64 {
    let c = &model.config_json;
    let get = |keys: &[&str]| keys.iter().find_map(|k| c.get(*k).and_then(Value::as_f64)).unwrap_or(0.0);
    let layers = get(&["num_hidden_layers", "n_layers"]);
    let hidden = model.hidden_size() as f64;
    let vocab = model.vocab_size() as f64;
    let positions = get(&["max_position_embeddings"]);
    let embedding = (vocab + positions + get(&["type_vocab_size"])) * get(&["embedding_size"]).max(hidden);
    let dense = (model.num_parameters() as f64 - embedding).max(0.0);
    tokens * (6.0 * dense + 12.0 * layers * hidden * seq) + projected_tokens * 6.0 * hidden * vocab
}

/// Measured peak matmul throughput of `device` in TFLOP/s for `kind`
/// (`mlm bench-peak`): the best of a few large square matmuls of
/// random-looking matrices (GPUs multiply matrices of ones or zeros faster
/// than real data: fewer bits toggle, less power, higher clocks).
pub fn measure_peak_tflops(device: Device, kind: tch::Kind, n: i64, reps: usize) -> f64 {
    let a = scrambled(n, 0.0, kind, device);
    let b = scrambled(n, 1.0, kind, device);
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let _ = a.matmul(&b);
    sync();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let _ = a.matmul(&b);
        sync();
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best / 1e12
}

/// An `[n, n]` matrix of values spread over [-0.5, 0.5) by a hash of the
/// index, `salt` picking another one. Not drawn from libtorch's generator:
/// training's dropout draws from it.
fn scrambled(n: i64, salt: f64, kind: tch::Kind, device: Device) -> tch::Tensor {
    use tch::Kind::{Double, Int64};
    // In double: fp32 keeps too few digits of the scaled sine for its fraction.
    let i = tch::Tensor::arange(n * n, (Int64, device));
    let (x, y) = (i.remainder(65521).to_kind(Double), i.floor_divide_scalar(65521).to_kind(Double));
    let v = (x * 12.9898 + y * 78.233 + salt * 37.719).sin() * 43758.5453;
    let h = &v - v.floor() - 0.5;
    h.view([n, n]).to_kind(kind)
}

/// The peak the logged MFU is measured against: `training.peak_tflops` when
/// set, else on a GPU `measure()` (the best large matmul in the training's
/// dtype, what `mlm bench-peak` prints), else none (0: no MFU logged). Returns
/// the peak and the line that says where it came from.
pub fn resolve_peak_tflops(configured: f64, device: Device, measure: impl FnOnce() -> f64) -> (f64, Option<String>) {
    if configured > 0.0 {
        return (configured, Some(format!("MFU against training.peak_tflops = {configured} TFLOP/s")));
    }
    if !device.is_cuda() {
        return (0.0, None);
    }
    let peak = measure();
    let line = format!(
        "MFU against {peak:.0} TFLOP/s, measured on {device:?} (the best of {PEAK_REPS} matmuls of {PEAK_SIZE}x{PEAK_SIZE} in \
         the training's dtype, as `mlm bench-peak --size {PEAK_SIZE}`; training.peak_tflops overrides)"
    );
    (peak, Some(line))
}

/// The matmul size of the measured peak.
pub const PEAK_SIZE: i64 = 8192;
/// How many matmuls the measured peak is the best of.
pub const PEAK_REPS: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_matrices_look_random_and_draw_nothing() {
        let a = scrambled(64, 0.0, tch::Kind::Float, Device::Cpu);
        let b = scrambled(64, 1.0, tch::Kind::Float, Device::Cpu);
        let (lo, hi) = (a.min().double_value(&[]), a.max().double_value(&[]));
        assert!((-0.5..-0.45).contains(&lo) && (0.45..0.5).contains(&hi), "{lo} {hi}");
        assert!(a.mean(None).double_value(&[]).abs() < 0.05);
        assert!(!a.equal(&b));
        // Distinct values almost everywhere: no pattern of ones.
        let distinct = a.reshape([-1]).unique_dim(0, true, false, false).0.numel();
        assert!(distinct > 4000, "{distinct} distinct of 4096");
    }

    #[test]
    fn the_peak_is_configured_or_measured_on_gpus_only() {
        let never = || -> f64 { panic!("measured") };
        assert_eq!(resolve_peak_tflops(0.0, Device::Cpu, never), (0.0, None));
        let (peak, line) = resolve_peak_tflops(312.0, Device::Cuda(0), never);
        assert_eq!(peak, 312.0);
        assert!(line.unwrap().contains("training.peak_tflops = 312"));
        let (peak, line) = resolve_peak_tflops(0.0, Device::Cuda(0), || 801.4);
        assert_eq!(peak, 801.4);
        assert!(line.unwrap().contains("MFU against 801 TFLOP/s, measured on Cuda(0)"));
    }

    #[test]
    fn phases_add_up_per_step() {
        let mut t = StepTimer::new(Device::Cpu);
        for _ in 0..2 {
            t.start();
            std::thread::sleep(std::time::Duration::from_millis(5));
            t.end(Phase::Data);
            t.end(Phase::Forward);
            t.step_done();
        }
        let r = t.report();
        assert!(r["time_data_s"].as_f64().unwrap() >= 0.004);
        assert!(r["data_wait_fraction"].as_f64().unwrap() > 0.5);
        assert_eq!(t.report()["time_data_s"], 0.0);
    }

    #[test]
    fn peak_measurement_is_positive() {
        assert!(measure_peak_tflops(Device::Cpu, tch::Kind::Float, 128, 2) > 0.0);
    }
}
