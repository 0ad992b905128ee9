use super::*;

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: std::collections::HashMap<String, String> =
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k: &str| m.get(k).cloned()
}

/// The node list read by the parser only (no scontrol), as on a machine without Slurm.
fn parse_first(var: &str, list: &str) -> Result<String> {
    HostList::parse(list).map(|l| l.first()).map_err(|why| anyhow!("{var}={list:?} is not a Slurm host list ({why})"))
}

const STEP: [(&str, &str); 7] = [
    ("SLURM_JOB_ID", "123456"),
    ("SLURM_STEP_ID", "3"),
    ("SLURM_PROCID", "1"),
    ("SLURM_STEP_NUM_TASKS", "16"),
    ("SLURM_LOCALID", "1"),
    ("SLURM_STEP_NODELIST", "gpu[07-08]"),
    ("SLURM_JOB_NODELIST", "gpu[01-08]"),
];

fn rank(r: usize) -> WorldInfo {
    WorldInfo { rank: r, world_size: 16, local_rank: r % 8 }
}

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = STEP.iter().copied().filter(|(k, _)| !extra.iter().any(|(e, _)| e == k)).collect();
    v.extend_from_slice(extra);
    v
}

#[test]
fn port_is_derived_from_job_and_step_in_the_unprivileged_range() {
    assert_eq!(derived_port(123456, 3), 10000 + 10 * 1456 + 3);
    assert_eq!(derived_port(0, 0), 10000);
    assert_eq!(derived_port(1999, 9), 29999);
    assert_eq!(derived_port(u64::MAX, u64::MAX), derived_port(u64::MAX % 2000, u64::MAX % 10));
    assert_ne!(derived_port(41, 0), derived_port(42, 0), "consecutive jobs");
    assert_ne!(derived_port(42, 0), derived_port(42, 1), "steps of one job");
}

#[test]
fn step_meets_at_the_first_host_of_the_step_on_the_derived_port() {
    let m = meeting(&vars(&STEP), rank(1), "job", &parse_first).unwrap();
    assert_eq!((m.host.as_str(), m.port, m.listen_everywhere), ("gpu07", 24563, true));
    assert_eq!(m.addr(), "gpu07:24563");
    assert!(
        m.origin.contains("SLURM_STEP_NODELIST=\"gpu[07-08]\"") && m.origin.contains("SLURM_JOB_ID=123456"),
        "{}",
        m.origin
    );
    // Every rank of the step computes the same meeting (rank 0 on gpu07).
    let zero = with(&[("SLURM_PROCID", "0"), ("SLURMD_NODENAME", "gpu07")]);
    assert_eq!(meeting(&vars(&zero), rank(0), "job", &parse_first).unwrap(), m);
    // Without a step node list, the job's; then the old name.
    let job_list: Vec<_> = STEP.iter().copied().filter(|(k, _)| *k != "SLURM_STEP_NODELIST").collect();
    assert_eq!(meeting(&vars(&job_list), rank(1), "job", &parse_first).unwrap().host, "gpu01");
    let old = [("SLURM_JOB_ID", "7"), ("SLURM_STEPID", "0"), ("SLURM_NODELIST", "a-[1-2]-b")];
    let m = meeting(&vars(&old), rank(1), "job", &parse_first).unwrap();
    assert_eq!((m.host.as_str(), m.port), ("a-1-b", 10070));
}

#[test]
fn master_variables_override_the_slurm_ones() {
    let both = with(&[("MLM_MASTER_ADDR", "10.0.0.5"), ("MLM_MASTER_PORT", "29500")]);
    let m = meeting(&vars(&both), rank(1), "job", &parse_first).unwrap();
    assert_eq!((m.addr().as_str(), m.listen_everywhere), ("10.0.0.5:29500", false));
    assert!(m.origin.starts_with("MLM_MASTER_ADDR, MLM_MASTER_PORT"), "{}", m.origin);
    let port = with(&[("MLM_MASTER_PORT", "29500")]);
    assert_eq!(meeting(&vars(&port), rank(1), "job", &parse_first).unwrap().addr(), "gpu07:29500");
    let v6 = with(&[("MLM_MASTER_ADDR", "fe80::1")]);
    assert_eq!(meeting(&vars(&v6), rank(1), "job", &parse_first).unwrap().addr(), "[fe80::1]:24563");
    // Rank 0 on another node than the first is fine when the address is given.
    let elsewhere = with(&[("SLURM_PROCID", "0"), ("SLURMD_NODENAME", "gpu08"), ("MLM_MASTER_ADDR", "gpu08")]);
    assert!(meeting(&vars(&elsewhere), rank(0), "job", &parse_first).is_ok());
}

#[test]
fn token_differs_per_step_and_job_and_obeys_mlm_job_token() {
    let token = |extra: &[(&'static str, &'static str)], job: &str| {
        meeting(&vars(&with(extra)), rank(1), job, &parse_first).unwrap().token
    };
    let t = token(&[], "job");
    assert_eq!(t.len(), 64);
    // Another step of the same job on the same port (MLM_MASTER_PORT) is refused.
    let p = [("MLM_MASTER_PORT", "29500")];
    assert_ne!(token(&p, "job"), token(&[p[0], ("SLURM_STEP_ID", "4")], "job"));
    assert_ne!(token(&p, "job"), token(&[p[0], ("SLURM_JOB_ID", "123457")], "job"));
    assert_ne!(t, token(&[], "another config"));
    assert_eq!(token(&[("MLM_JOB_TOKEN", "abc")], "job"), "abc");
}

#[test]
fn errors_name_the_variable_and_its_value() {
    let err = |extra: &[(&'static str, &'static str)], r: usize| {
        meeting(&vars(&with(extra)), rank(r), "job", &parse_first).unwrap_err().to_string()
    };
    let e = format!(
        "{:#}",
        meeting(&vars(&with(&[("SLURM_STEP_NODELIST", "n[1-")])), rank(1), "job", &parse_first).unwrap_err()
    );
    assert!(e.contains("rank 1") && e.contains("SLURM_STEP_NODELIST=\"n[1-\" is not a Slurm host list"), "{e}");
    let e = err(&[("MLM_MASTER_PORT", "http")], 1);
    assert!(e.contains("MLM_MASTER_PORT=\"http\" is not a port number"), "{e}");
    let e = err(&[("MLM_MASTER_PORT", "0")], 1);
    assert!(e.contains("MLM_MASTER_PORT=\"0\""), "{e}");
    let e = err(&[("SLURM_JOB_ID", "12_3")], 1);
    assert!(e.contains("SLURM_JOB_ID=\"12_3\""), "{e}");
    let e = err(&[("SLURM_STEP_ID", "batch")], 1);
    assert!(e.contains("SLURM_STEP_ID=\"batch\""), "{e}");
    let no_lists: Vec<_> = STEP.iter().copied().filter(|(k, _)| !k.ends_with("NODELIST")).collect();
    let e = meeting(&vars(&no_lists), rank(1), "job", &parse_first).unwrap_err().to_string();
    assert!(
        e.contains("SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST") && e.contains("MLM_MASTER_ADDR"),
        "{e}"
    );
    let no_ids: Vec<_> = STEP.iter().copied().filter(|(k, _)| *k != "SLURM_JOB_ID").collect();
    let e = meeting(&vars(&no_ids), rank(1), "job", &parse_first).unwrap_err().to_string();
    assert!(e.contains("SLURM_JOB_ID") && e.contains("MLM_MASTER_PORT"), "{e}");
    // Rank 0 is not where the others look for it.
    let e = err(&[("SLURM_PROCID", "0"), ("SLURMD_NODENAME", "gpu08")], 0);
    assert!(e.contains("rank 0 runs on gpu08 (SLURMD_NODENAME)") && e.contains("gpu07"), "{e}");
}

#[test]
fn first_host_reads_the_list_with_or_without_scontrol() {
    // scontrol, where it runs here, and the parser agree.
    assert_eq!(first_host("SLURM_JOB_NODELIST", "node[01-03,07],gpu5").unwrap(), "node01");
    assert_eq!(first_host("SLURM_JOB_NODELIST", "n[1-2]r[3-4]").unwrap(), "n1r3");
    // Slurm 22.05's scontrol cannot read text after a bracket group: the parser can.
    assert_eq!(first_host("SLURM_JOB_NODELIST", "a-[1-2]-b").unwrap(), "a-1-b");
    let e = first_host("SLURM_STEP_NODELIST", "n[1-").unwrap_err().to_string();
    assert_eq!(e, "SLURM_STEP_NODELIST=\"n[1-\" is not a Slurm host list ('[' at byte 1 is not closed)");
}

#[test]
fn peers_are_named_with_their_node_when_every_node_has_the_same_tasks() {
    assert_eq!(tasks_per_node(&vars(&[("SLURM_STEP_TASKS_PER_NODE", "8(x2)")]), 16), Some(8));
    assert_eq!(tasks_per_node(&vars(&[("SLURM_TASKS_PER_NODE", "4")]), 4), None); // one node
    assert_eq!(tasks_per_node(&vars(&[("SLURM_STEP_TASKS_PER_NODE", "2(x2),1")]), 5), None);
    let cyclic = [("SLURM_STEP_TASKS_PER_NODE", "2(x2)"), ("SLURM_DISTRIBUTION", "cyclic")];
    assert_eq!(tasks_per_node(&vars(&cyclic), 4), None);
    assert_eq!(tasks_per_node(&vars(&[]), 4), None);
}
