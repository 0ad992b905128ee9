//! torch's launcher conventions, read as `mlm-launch`'s flags.
//!
//! Kubernetes operators (Kubeflow's PyTorchJob and TrainJob) and cloud ML
//! services start one pod per node and expect a launcher inside it (torchrun's
//! place). They describe the job in the environment:
//!
//! | flag | read from, in order |
//! |---|---|
//! | `--master-addr` | `PET_MASTER_ADDR`, `MASTER_ADDR` |
//! | `--master-port` | `PET_MASTER_PORT`, `MASTER_PORT` |
//! | `--nnodes` | `PET_NNODES` (`N` or `N:N`), else `WORLD_SIZE` counting pods |
//! | `--node-rank` | `PET_NODE_RANK`, else `RANK` counting pods |
//! | `--nproc` | `PET_NPROC_PER_NODE` (a number; `auto`/`gpu`: every visible GPU) |
//!
//! `WORLD_SIZE`/`RANK` count pods only where no `PET_NNODES` is set and the
//! operator gave a rendezvous (`MASTER_ADDR` or `MASTER_PORT`): a stray `RANK`
//! in a login shell is not a job. A flag on the command line wins over the
//! environment; where the two disagree, one line says which value is used.
//! The workers then get `mlm-launch`'s own variables (`RANK` counting workers,
//! `MLM_MASTER_*`), so every GPU of the pod gets a worker.
use anyhow::{bail, Result};

use crate::args::Args;

/// The variables that describe the pod to the launcher; its workers do not
/// inherit them (they get `mlm-launch`'s own).
pub const POD_VARIABLES: [&str; 7] = [
    "MASTER_ADDR",
    "MASTER_PORT",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
];

/// Which flags the command line gave (clap's defaults are not "given").
#[derive(Debug, Default, Clone, Copy)]
pub struct Given {
    pub master_addr: bool,
    pub master_port: bool,
    pub nnodes: bool,
    pub node_rank: bool,
    /// `--nproc` or `--gpus`.
    pub workers: bool,
}

impl Given {
    pub fn from_matches(m: &clap::ArgMatches) -> Self {
        let on_line = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        Self {
            master_addr: on_line("master_addr"),
            master_port: on_line("master_port"),
            nnodes: on_line("nnodes"),
            node_rank: on_line("node_rank"),
            workers: on_line("nproc") || on_line("gpus"),
        }
    }
}

/// Fills the flags the command line did not give from torch's variables
/// (`get`: the environment); returns the lines to print (a flag that overrode
/// a different value in the environment, and where the job's shape came from).
pub fn apply(args: &mut Args, given: Given, get: &dyn Fn(&str) -> Option<String>) -> Result<Vec<String>> {
    let var = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).map(|v| (k.to_string(), v));
    let first = |keys: &[&str]| keys.iter().find_map(|k| var(k));
    let mut notes = Vec::new();
    let mut from_env = Vec::new();
    let number = |(k, v): &(String, String)| -> Result<usize> {
        v.parse::<usize>().map_err(|_| anyhow::anyhow!("environment variable {k}={v:?} is not a non-negative integer"))
    };

    let addr = first(&["PET_MASTER_ADDR", "MASTER_ADDR"]);
    let port = first(&["PET_MASTER_PORT", "MASTER_PORT"]);
    let operator = addr.is_some() || port.is_some();
    if let Some((k, v)) = &addr {
        if !given.master_addr {
            args.master_addr = v.clone();
            from_env.push(format!("--master-addr {v} ({k})"));
        } else if *v != args.master_addr {
            notes.push(format!("--master-addr {} wins over {k}={v}", args.master_addr));
        }
    }
    if let Some(kv @ (k, v)) = &port {
        let p = u16::try_from(number(kv)?)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| anyhow::anyhow!("environment variable {k}={v:?} is not a port number (1-65535)"))?;
        match args.master_port {
            _ if !given.master_port => {
                args.master_port = Some(p);
                from_env.push(format!("--master-port {p} ({k})"));
            }
            Some(ours) if ours != p => notes.push(format!("--master-port {ours} wins over {k}={v}")),
            _ => {}
        }
    }

    let nnodes = match var("PET_NNODES") {
        Some((k, v)) => Some((k.clone(), elastic_fixed(&k, &v)?)),
        None if operator => var("WORLD_SIZE").map(|kv| number(&kv).map(|n| (kv.0, n))).transpose()?,
        None => None,
    };
    let node_rank = match var("PET_NODE_RANK") {
        Some(kv) => Some((kv.0.clone(), number(&kv)?)),
        None if operator && var("PET_NNODES").is_none() => {
            var("RANK").map(|kv| number(&kv).map(|n| (kv.0, n))).transpose()?
        }
        None => None,
    };
    if let Some((k, n)) = nnodes {
        if !given.nnodes {
            args.nnodes = n;
            from_env.push(format!("--nnodes {n} ({k})"));
        } else if n != args.nnodes {
            notes.push(format!("--nnodes {} wins over {k}={n}", args.nnodes));
        }
    }
    if let Some((k, r)) = node_rank {
        if !given.node_rank {
            args.node_rank = r;
            from_env.push(format!("--node-rank {r} ({k})"));
        } else if r != args.node_rank {
            notes.push(format!("--node-rank {} wins over {k}={r}", args.node_rank));
        }
    }
    if let Some((k, v)) = var("PET_NPROC_PER_NODE") {
        match v.as_str() {
            "auto" | "gpu" => {}
            _ => {
                let n = number(&(k.clone(), v.clone())).map_err(|_| {
                    anyhow::anyhow!("environment variable {k}={v:?}: expected a number of workers, auto or gpu")
                })?;
                if !given.workers {
                    args.nproc = Some(n);
                    from_env.push(format!("--nproc {n} ({k})"));
                } else if args.nproc.is_some_and(|ours| ours != n) {
                    notes.push(format!("--nproc {} wins over {k}={n}", args.nproc.unwrap_or(0)));
                }
            }
        }
    }
    if !from_env.is_empty() {
        notes.insert(0, format!("from torch's launcher variables: {}", from_env.join(", ")));
    }
    Ok(notes)
}

/// torchrun's `--nnodes` value: `N` or an elastic range `MIN:MAX`, which must
/// be one size here (a job's size is fixed; resume on another size instead).
fn elastic_fixed(key: &str, v: &str) -> Result<usize> {
    let parse = |s: &str| s.trim().parse::<usize>().ok();
    let n = match v.split_once(':') {
        None => parse(v),
        Some((lo, hi)) => match (parse(lo), parse(hi)) {
            (Some(a), Some(b)) if a == b => Some(a),
            (Some(_), Some(_)) => bail!(
                "environment variable {key}={v:?}: an elastic range of nodes is not supported; give one size \
                 (a job resumes on another number of nodes instead)"
            ),
            _ => None,
        },
    };
    n.ok_or_else(|| anyhow::anyhow!("environment variable {key}={v:?} is not a number of nodes (N or N:N)"))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    fn launch(line: &[&str], env: &[(&str, &str)]) -> Result<(Args, Vec<String>)> {
        let mut v = vec!["mlm-launch", "job.toml"];
        v.extend_from_slice(line);
        let m = Args::command().try_get_matches_from(v).unwrap();
        let mut args = Args::from_arg_matches(&m).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let notes = apply(&mut args, Given::from_matches(&m), &get)?;
        Ok((args, notes))
    }

    #[test]
    fn a_pytorchjob_pod_counts_nodes_by_rank_and_world_size() {
        let env = [("MASTER_ADDR", "job-master-0"), ("MASTER_PORT", "23456"), ("WORLD_SIZE", "3"), ("RANK", "2")];
        let (a, notes) = launch(&[], &env).unwrap();
        assert_eq!((a.master_addr.as_str(), a.master_port, a.nnodes, a.node_rank), ("job-master-0", Some(23456), 3, 2));
        assert_eq!(a.nproc, None, "every visible GPU");
        assert!(notes[0].contains("--nnodes 3 (WORLD_SIZE)"), "{notes:?}");
    }

    #[test]
    fn pet_variables_win_over_rank_and_world_size() {
        // Some operators count processes in WORLD_SIZE while PET_* count nodes.
        let env = [
            ("MASTER_ADDR", "m"),
            ("MASTER_PORT", "29500"),
            ("WORLD_SIZE", "8"),
            ("RANK", "1"),
            ("PET_NNODES", "2:2"),
            ("PET_NODE_RANK", "1"),
            ("PET_NPROC_PER_NODE", "4"),
        ];
        let (a, _) = launch(&[], &env).unwrap();
        assert_eq!((a.nnodes, a.node_rank, a.nproc), (2, 1, Some(4)));
        let (a, _) =
            launch(&[], &[("PET_NNODES", "2"), ("PET_NODE_RANK", "0"), ("PET_NPROC_PER_NODE", "gpu")]).unwrap();
        assert_eq!((a.nnodes, a.node_rank, a.nproc), (2, 0, None));
    }

    #[test]
    fn flags_win_and_a_conflict_is_one_line() {
        let env = [("MASTER_ADDR", "m"), ("MASTER_PORT", "29500"), ("PET_NNODES", "2"), ("PET_NODE_RANK", "1")];
        let (a, notes) = launch(&["--nnodes", "4", "--node-rank", "1", "--master-port", "29600"], &env).unwrap();
        assert_eq!((a.nnodes, a.node_rank, a.master_port, a.master_addr.as_str()), (4, 1, Some(29600), "m"));
        assert!(notes.iter().any(|n| n == "--nnodes 4 wins over PET_NNODES=2"), "{notes:?}");
        assert!(notes.iter().any(|n| n == "--master-port 29600 wins over MASTER_PORT=29500"), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("node-rank 1 wins")), "equal values are no conflict: {notes:?}");
    }

    #[test]
    fn a_login_shell_rank_is_not_a_job_and_bad_values_name_the_variable() {
        let (a, notes) = launch(&[], &[("RANK", "3"), ("WORLD_SIZE", "4")]).unwrap();
        assert_eq!((a.nnodes, a.node_rank), (1, 0));
        assert!(notes.is_empty());
        let e = |env: &[(&str, &str)]| launch(&[], env).unwrap_err().to_string();
        assert!(e(&[("PET_NNODES", "1:4")]).contains("PET_NNODES=\"1:4\": an elastic range"));
        assert!(e(&[("MASTER_PORT", "70000")]).contains("MASTER_PORT=\"70000\" is not a port number"));
        assert!(e(&[("PET_NPROC_PER_NODE", "many")]).contains("PET_NPROC_PER_NODE=\"many\""));
        assert!(e(&[("MASTER_ADDR", "m"), ("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
    }
}
