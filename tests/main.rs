//! The end-to-end tests, one module per file, built as one test binary
//! (`autotests = false` and one `[[test]]` in Cargo.toml): libtorch is linked
//! once instead of once per file, and what several tests need (the parity
//! models, the golden runs, a finished job to break) is made once per process
//! (`common`). `cargo test --test integration <module>::` runs one file's tests.
mod common;

mod activation_checkpointing;
mod bad_input;
mod bad_state;
mod clm;
mod data_arrow;
mod data_inputs;
mod data_parquet;
mod dist_mpi;
mod dist_tcp;
mod distributed;
mod elastic;
mod estimate_memory;
mod eval_files;
mod golden;
mod gpu_dryrun;
mod honest_logs;
mod hub_cache;
mod micro_batch;
mod mpi_runtime;
mod multi_node;
mod output_safety;
mod parity;
mod parity_gpt2;
mod parity_modernbert;
mod preempt;
mod progress;
mod resume;
mod slurm;
mod spm_tokenizer;
mod tensorboard;
mod tokenizer_fast;
mod train_cli;
mod train_modernbert;
