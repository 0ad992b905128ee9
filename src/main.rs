//! The `mlm` binary: prepare, train, eval, fill-mask.
use clap::Parser;

fn main() {
    mlm::logging::init();
    mlm::logging::quiet_panics();
    let cli = mlm::cli::Cli::parse();
    if let Err(e) = mlm::cli::run(cli) {
        eprintln!("error: {}", mlm::logging::one_line(&e));
        std::process::exit(1);
    }
}
