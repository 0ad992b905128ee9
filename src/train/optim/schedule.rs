//! Learning-rate schedules, as `transformers.get_{linear,cosine,constant}_schedule_with_warmup`.
use crate::config::{Schedule, TrainingConfig};

/// The learning rate of every optimizer step of one job.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub kind: Schedule,
}

impl LrSchedule {
    pub fn new(t: &TrainingConfig, total_steps: usize) -> Self {
        let warmup =
            if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total_steps as f64).ceil() as usize };
        Self { peak: t.lr, warmup, total: total_steps, kind: t.schedule }
    }

    /// Learning rate of the optimizer step with 0-based index `step`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        self.peak
            * match self.kind {
                Schedule::Constant => 1.0,
                Schedule::Linear => 1.0 - progress,
                Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay_to_zero() {
        let t = TrainingConfig { lr: 1.0, warmup_steps: 10, ..Default::default() };
        let s = LrSchedule::new(&t, 110);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(110), 0.0);
    }

    #[test]
    fn warmup_ratio_and_cosine() {
        let t = TrainingConfig { lr: 2.0, warmup_ratio: 0.1, schedule: Schedule::Cosine, ..Default::default() };
        let s = LrSchedule::new(&t, 100);
        assert_eq!(s.warmup, 10);
        assert!((s.lr(55) - 1.0).abs() < 1e-12);
    }
}
