//! The `mlm` binary: prepare, train, eval, fill-mask.
use clap::Parser;

/// A failed host allocation is reported like a failed libtorch one.
#[global_allocator]
static ALLOCATOR: mlm::logging::ReportingAllocator = mlm::logging::ReportingAllocator;

fn main() {
    mlm::device::default_cuda_allocator();
    mlm::logging::init();
    mlm::logging::quiet_panics();
    let cli = mlm::cli::Cli::parse();
    // A panic has already printed its one line (logging::quiet_panics).
    let result = std::panic::catch_unwind(|| mlm::cli::run(cli));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.downcast_ref::<mlm::cli::StdoutClosed>().is_some() => std::process::exit(141),
        Ok(Err(e)) if e.downcast_ref::<mlm::train::preempt::Preempted>().is_some() => {
            eprintln!("mlm: {e}");
            std::process::exit(mlm::train::preempt::REQUEUE_EXIT_CODE);
        }
        Ok(Err(e)) => {
            eprintln!("error: {}", mlm::logging::one_line(&e));
            std::process::exit(1);
        }
        Err(_) if mlm::logging::panic_was_out_of_memory() => std::process::exit(1),
        Err(_) => std::process::exit(101),
    }
}
