//! Command line and the worker plan: how many workers, on which devices.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "mlm-launch",
    version,
    about = "Launch an mlm training job: prepare the data once, then one `mlm train` worker per GPU (or N CPU workers)"
)]
pub struct Args {
    /// The job's TOML config (none with --selfcheck).
    #[arg(required_unless_present = "selfcheck")]
    pub config: Option<PathBuf>,
    /// Override a config key: section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Device of the workers: auto (GPUs when visible), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// GPUs to use: a count ("4": the first four visible) or a list of
    /// visible-device indices ("0,2,3"). One worker per GPU.
    #[arg(long, value_name = "N|LIST", conflicts_with = "nproc")]
    pub gpus: Option<String>,
    /// Number of workers: CPU workers with --device cpu, else the first N GPUs.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Restart the whole group up to K times after a worker fails.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub max_restarts: usize,
    /// Seconds between SIGTERM and SIGKILL when stopping workers after a failure.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub grace_period: f64,
    /// Seconds the workers have, after a signal the launcher passes on
    /// (SIGTERM, SIGINT, SIGUSR1, SIGUSR2), to finish their step, save a
    /// checkpoint (`checkpoint.save_signals`) and exit; those still running
    /// then are killed (SIGKILL). Keep it below the warning time of Slurm's
    /// `--signal=B:USR1@SECS`.
    #[arg(long, value_name = "SECS", default_value_t = 240.0)]
    pub save_timeout: f64,
    /// Address of the tcp rendezvous: rank 0 (on node 0) listens there, every
    /// other worker connects to it. With several nodes, node 0's address as the
    /// other nodes reach it.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the tcp rendezvous. Default: a free port, new at each restart,
    /// on one node; 29500 (torchrun's) with several nodes, where every node
    /// must be given the same port.
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// Number of nodes of the job; run one mlm-launch per node, each with the
    /// same --nnodes, --master-addr, --master-port and number of workers.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's rank, 0..nnodes; node 0 prepares the data and hosts rank 0.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: usize,
    /// The `mlm` binary (default: next to this launcher, then PATH).
    #[arg(long)]
    pub mlm: Option<PathBuf>,
    /// Check this node instead of running a job: on a tiny model it writes
    /// itself, N ranks against 1 rank with the summed batch (overlap on and
    /// off, fp32 and bf16 communication), a worker killed mid-step, and the
    /// all-reduce bandwidth; one line per check and a PASS/FAIL verdict. Takes
    /// the device flags (--gpus, --nproc, --device), no CONFIG.
    #[arg(long)]
    pub selfcheck: bool,
    /// With --selfcheck: keep its temporary directory (jobs, logs, metrics).
    #[arg(long, requires = "selfcheck")]
    pub keep: bool,
    /// Test hook of --selfcheck: the N-rank jobs train with another seed, so
    /// the loss checks must fail (proves that they can).
    #[arg(long, hide = true, requires = "selfcheck")]
    pub selfcheck_break: bool,
}

/// torchrun's default rendezvous port, used when several nodes must agree on one.
pub const DEFAULT_MULTI_NODE_PORT: u16 = 29500;

/// Where this launcher's workers sit in the whole job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nodes {
    pub nnodes: usize,
    pub node_rank: usize,
    /// Workers on every node (this node's plan; every node must use the same).
    pub per_node: usize,
}

impl Nodes {
    /// Checks `--nnodes`/`--node-rank` against each other.
    pub fn new(args: &Args, per_node: usize) -> Result<Self> {
        if args.nnodes == 0 {
            bail!("--nnodes 0: a job needs at least one node");
        }
        if args.node_rank >= args.nnodes {
            bail!(
                "--node-rank {} is not below --nnodes {} (node ranks are 0..{})",
                args.node_rank,
                args.nnodes,
                args.nnodes
            );
        }
        if args.nnodes > 1 && args.master_port == Some(0) {
            bail!("--master-port 0: with several nodes every node must be given the same, real port");
        }
        Ok(Self { nnodes: args.nnodes, node_rank: args.node_rank, per_node })
    }

    pub fn world(&self) -> usize {
        self.nnodes * self.per_node
    }

    /// The job-wide rank of local worker `local`: node_rank * per_node + local.
    pub fn rank(&self, local: usize) -> usize {
        self.node_rank * self.per_node + local
    }

    pub fn multi(&self) -> bool {
        self.nnodes > 1
    }
}

/// Where one worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Cpu,
    /// A value for `CUDA_VISIBLE_DEVICES`.
    Gpu(String),
}

/// The workers to start, rank by rank.
pub fn plan(args: &Args, visible: Option<Vec<String>>) -> Result<Vec<Slot>> {
    if !["auto", "cpu", "cuda"].contains(&args.device.as_str()) {
        bail!("--device {:?}: expected auto, cpu or cuda", args.device);
    }
    let cpu = args.device == "cpu";
    if let Some(spec) = &args.gpus {
        if cpu {
            bail!("--gpus and --device cpu contradict each other; use --nproc N --device cpu for CPU workers");
        }
        let wanted = parse_gpus(spec)?;
        return pick(&wanted, visible.as_deref());
    }
    if let Some(n) = args.nproc {
        if n == 0 {
            bail!("--nproc 0: need at least one worker");
        }
        let gpus = visible.as_ref().map_or(0, |v| v.len());
        if cpu || (args.device == "auto" && gpus == 0) {
            return Ok(vec![Slot::Cpu; n]);
        }
        return pick(&GpuSpec::Count(n), visible.as_deref());
    }
    match visible {
        _ if cpu => Ok(vec![Slot::Cpu]),
        Some(v) if !v.is_empty() => Ok(v.into_iter().map(Slot::Gpu).collect()),
        _ if args.device == "cuda" => {
            bail!("--device cuda but no GPU is visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES)")
        }
        _ => Ok(vec![Slot::Cpu]),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum GpuSpec {
    Count(usize),
    List(Vec<usize>),
}

pub fn parse_gpus(spec: &str) -> Result<GpuSpec> {
    let bad = || format!("--gpus {spec:?}: expected a count (4) or a list of GPU indices (0,2,3)");
    if spec.contains(',') {
        let list: Vec<usize> =
            spec.split(',').map(|s| s.trim().parse::<usize>()).collect::<Result<_, _>>().with_context(bad)?;
        let mut sorted = list.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != list.len() {
            bail!("--gpus {spec:?}: a GPU is listed twice (NCCL needs one rank per GPU)");
        }
        return Ok(GpuSpec::List(list));
    }
    let n: usize = spec.trim().parse().with_context(bad)?;
    if n == 0 {
        bail!("--gpus 0: need at least one GPU (for CPU workers use --nproc N --device cpu)");
    }
    Ok(GpuSpec::Count(n))
}

/// Maps indices into the visible devices to `CUDA_VISIBLE_DEVICES` values.
fn pick(spec: &GpuSpec, visible: Option<&[String]>) -> Result<Vec<Slot>> {
    let indices: Vec<usize> = match spec {
        GpuSpec::Count(n) => (0..*n).collect(),
        GpuSpec::List(l) => l.clone(),
    };
    indices
        .into_iter()
        .map(|i| match visible {
            Some(v) if i < v.len() => Ok(Slot::Gpu(v[i].clone())),
            Some([]) => bail!(
                "GPU workers asked for, but no GPU is visible here (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides \
                 them all): for CPU workers use --nproc N --device cpu"
            ),
            Some(v) => bail!("GPU {i} requested but only {} visible ({})", v.len(), v.join(",")),
            // Nothing to check against (a driver but no nvidia-smi): trust the user.
            None => Ok(Slot::Gpu(i.to_string())),
        })
        .collect()
}

/// The GPUs this launcher may use: `CUDA_VISIBLE_DEVICES` when set, else one per
/// line of `nvidia-smi -L`; none where no NVIDIA driver is loaded (no
/// `/dev/nvidiactl`, no `/proc/driver/nvidia`), so that a GPU job is refused
/// before any data is prepared; `None` when nothing says.
pub fn visible_gpus() -> Option<Vec<String>> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let v = v.trim();
        if v.is_empty() || v == "-1" || v.eq_ignore_ascii_case("nodevfiles") {
            return Some(Vec::new());
        }
        return Some(v.split(',').map(|s| s.trim().to_string()).collect());
    }
    let driver = ["/dev/nvidiactl", "/proc/driver/nvidia"].iter().any(|p| std::path::Path::new(p).exists());
    let out = match std::process::Command::new("nvidia-smi").arg("-L").output() {
        Ok(out) => out,
        Err(_) if !driver => return Some(Vec::new()),
        Err(_) => return None,
    };
    if !out.status.success() {
        return if driver { None } else { Some(Vec::new()) };
    }
    let n = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("GPU ")).count();
    Some((0..n).map(|i| i.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["mlm-launch", "job.toml"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    fn gpus(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn gpu_count_and_list_index_the_visible_devices() {
        let plan_gpus = |a: &[&str], vis| plan(&args(a), vis).unwrap();
        assert_eq!(
            plan_gpus(&["--gpus", "2"], gpus(&["4", "5", "6"])),
            vec![Slot::Gpu("4".into()), Slot::Gpu("5".into())]
        );
        assert_eq!(
            plan_gpus(&["--gpus", "0,2"], gpus(&["4", "5", "6"])),
            vec![Slot::Gpu("4".into()), Slot::Gpu("6".into())]
        );
        assert_eq!(plan_gpus(&["--gpus", "0,2,3"], None).len(), 3);
        assert_eq!(plan_gpus(&[], gpus(&["0", "1"])), vec![Slot::Gpu("0".into()), Slot::Gpu("1".into())]);
        assert!(plan(&args(&["--gpus", "3"]), gpus(&["0"])).unwrap_err().to_string().contains("only 1 visible"));
        assert!(plan(&args(&["--gpus", "0,0"]), None).is_err());
        assert!(plan(&args(&["--gpus", "x"]), None).is_err());
    }

    #[test]
    fn ranks_follow_torchrun_across_nodes() {
        let a = args(&["--nnodes", "3", "--node-rank", "2", "--nproc", "4", "--device", "cpu"]);
        let n = Nodes::new(&a, 4).unwrap();
        assert_eq!((n.world(), n.rank(0), n.rank(3)), (12, 8, 11));
        assert!(n.multi());
        let single = Nodes::new(&args(&[]), 2).unwrap();
        assert_eq!((single.world(), single.rank(1), single.multi()), (2, 1, false));
        let e = Nodes::new(&args(&["--nnodes", "2", "--node-rank", "2"]), 1).unwrap_err().to_string();
        assert!(e.contains("--node-rank 2") && e.contains("--nnodes 2"), "{e}");
        assert!(Nodes::new(&args(&["--nnodes", "0"]), 1).is_err());
        assert!(Nodes::new(&args(&["--nnodes", "2", "--master-port", "0"]), 1).is_err());
    }

    #[test]
    fn cpu_workers_when_asked_or_when_no_gpu() {
        assert_eq!(plan(&args(&["--nproc", "3", "--device", "cpu"]), gpus(&["0"])).unwrap(), vec![Slot::Cpu; 3]);
        assert_eq!(plan(&args(&["--nproc", "2"]), None).unwrap(), vec![Slot::Cpu; 2]);
        assert_eq!(plan(&args(&[]), None).unwrap(), vec![Slot::Cpu]);
        assert_eq!(plan(&args(&[]), gpus(&[])).unwrap(), vec![Slot::Cpu]);
        assert_eq!(plan(&args(&["--device", "cpu"]), gpus(&["0", "1"])).unwrap(), vec![Slot::Cpu]);
        assert!(plan(&args(&["--gpus", "1", "--device", "cpu"]), None).is_err());
        assert!(plan(&args(&["--device", "cuda"]), None).is_err());
    }
}
