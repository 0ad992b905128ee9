//! The CPU inner loops of `mlm`, in a crate of their own so that every profile
//! builds them optimised (the workspace's dev profile builds `mlm` itself at
//! opt-level 1, where LLVM does not vectorise) and so that each loop can be
//! compiled once per instruction set and picked at run time.
//!
//! Nothing here knows about tensors: the callers hand over plain slices.
pub mod adamw;
pub mod bf16;
pub mod dropout;

/// Starts the threads the kernels split their work across (rayon's global
/// pool): `threads` of them (0: one per core), unless the pool is already
/// running; returns how many there are. A process calls it before its memory
/// can run out: started lazily at a first use under memory pressure, a thread
/// that cannot map its stack or signal stack aborts the whole process instead
/// of letting the allocation that ran out fail with an error.
pub fn start_threads(threads: usize) -> usize {
    // An error means the pool runs already (its size stays).
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    rayon::current_num_threads()
}
