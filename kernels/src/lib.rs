//! The CPU inner loops of `mlm`, in a crate of their own so that every profile
//! builds them optimised (the workspace's dev profile builds `mlm` itself at
//! opt-level 1, where LLVM does not vectorise) and so that each loop can be
//! compiled once per instruction set and picked at run time.
//!
//! Nothing here knows about tensors: the callers hand over plain slices.
pub mod adamw;
pub mod bf16;
