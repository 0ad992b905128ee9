//! What a job tells the people watching it: metrics lines and TensorBoard
//! scalars, the step's log record and summaries, the loss plot, step timing
//! and MFU, and the one-line out-of-memory messages.
pub mod metrics;
pub mod oom;
pub mod plot;
mod report;
pub mod tensorboard;
pub mod timing;
