//! Rendezvous variables: torchrun's, SLURM's, none; and the errors for missing or
//! inconsistent ones, each naming the variable.

use std::collections::HashMap;
use std::path::PathBuf;

use zamba_dist::{Launcher, RendezvousInfo, TokenSource};

fn parse(vars: &[(&str, &str)]) -> Result<RendezvousInfo, String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    RendezvousInfo::from_lookup(|name| map.get(name).cloned()).map_err(|e| e.to_string())
}

const TORCHRUN: &[(&str, &str)] = &[
    ("RANK", "5"),
    ("WORLD_SIZE", "16"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "8"),
    ("MASTER_ADDR", "node01"),
    ("MASTER_PORT", "29500"),
    ("ZAMBA_DIST_TOKEN", "0123456789abcdef0123"),
];

const SLURM: &[(&str, &str)] = &[
    ("SLURM_PROCID", "9"),
    ("SLURM_NTASKS", "16"),
    ("SLURM_LOCALID", "1"),
    ("SLURM_NODEID", "1"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_TASKS_PER_NODE", "8(x2)"),
    ("SLURM_JOB_NODELIST", "gpu[007-008]"),
    ("SLURM_JOB_ID", "4242"),
    ("ZAMBA_DIST_TOKEN_FILE", "/runs/7b/.dist-token-4242"),
];

fn with(
    base: &[(&'static str, &'static str)],
    changes: &[(&'static str, Option<&'static str>)],
) -> Vec<(&'static str, &'static str)> {
    let mut vars: Vec<_> = base
        .iter()
        .copied()
        .filter(|(k, _)| !changes.iter().any(|(c, _)| c == k))
        .collect();
    vars.extend(changes.iter().filter_map(|(k, v)| v.map(|v| (*k, v))));
    vars
}

#[test]
fn no_variables_is_a_single_process() {
    let info = parse(&[]).unwrap();
    assert_eq!(info, RendezvousInfo::single());
    assert!(!info.is_distributed());
}

#[test]
fn torchrun_variables() {
    let info = parse(TORCHRUN).unwrap();
    assert_eq!(
        info,
        RendezvousInfo {
            rank: 5,
            world_size: 16,
            local_rank: 1,
            local_world_size: 8,
            master_addr: "node01".into(),
            master_port: 29500,
            launcher: Launcher::Torchrun,
            token: Some(TokenSource::Value("0123456789abcdef0123".into())),
        }
    );
    // torchrun inside a SLURM allocation: torchrun's variables win.
    let both: Vec<_> = TORCHRUN.iter().chain(SLURM).copied().collect();
    assert_eq!(parse(&both).unwrap().rank, 5);
    // WORLD_SIZE=1 alone means one process.
    let one = parse(&[("WORLD_SIZE", "1")]).unwrap();
    assert_eq!((one.rank, one.world_size), (0, 1));
}

#[test]
fn torchrun_errors_name_the_variable() {
    for (changes, expected) in [
        (vec![("RANK", None)], "RANK is not set"),
        (vec![("MASTER_PORT", None)], "MASTER_PORT is not set"),
        (
            vec![("LOCAL_WORLD_SIZE", None)],
            "LOCAL_WORLD_SIZE is not set",
        ),
        (
            vec![("WORLD_SIZE", Some("four"))],
            "WORLD_SIZE=\"four\" is not a non-negative integer",
        ),
        (
            vec![("RANK", Some("16"))],
            "RANK=16 is not below WORLD_SIZE=16",
        ),
        (
            vec![("LOCAL_RANK", Some("8"))],
            "LOCAL_RANK=8 is not below LOCAL_WORLD_SIZE=8",
        ),
        (
            vec![("LOCAL_WORLD_SIZE", Some("32"))],
            "LOCAL_WORLD_SIZE=32 must be between 1 and WORLD_SIZE=16",
        ),
        (vec![("MASTER_PORT", Some("0"))], "MASTER_PORT"),
        (
            vec![("MASTER_PORT", Some("70000"))],
            "MASTER_PORT=\"70000\"",
        ),
        (vec![("WORLD_SIZE", None)], "WORLD_SIZE is not set"),
    ] {
        let e = parse(&with(TORCHRUN, &changes)).unwrap_err();
        assert!(e.contains(expected), "{changes:?}: {e}");
    }
}

#[test]
fn slurm_variables() {
    let info = parse(SLURM).unwrap();
    assert_eq!(
        info,
        RendezvousInfo {
            rank: 9,
            world_size: 16,
            local_rank: 1,
            local_world_size: 8,
            master_addr: "gpu007".into(),
            master_port: 10_000 + 4242,
            launcher: Launcher::Slurm,
            token: Some(TokenSource::File(PathBuf::from(
                "/runs/7b/.dist-token-4242"
            ))),
        }
    );
    // MASTER_ADDR / MASTER_PORT, when set, win over the derived ones.
    let set = parse(&with(
        SLURM,
        &[
            ("MASTER_ADDR", Some("10.0.0.1")),
            ("MASTER_PORT", Some("12345")),
        ],
    ))
    .unwrap();
    assert_eq!(
        (set.master_addr.as_str(), set.master_port),
        ("10.0.0.1", 12345)
    );
    // The step's node list is where rank 0 runs.
    let step = parse(&with(
        SLURM,
        &[("SLURM_STEP_NODELIST", Some("gpu[008],gpu007"))],
    ))
    .unwrap();
    assert_eq!(step.master_addr, "gpu008");
    // SLURM_NTASKS_PER_NODE, and uneven nodes.
    let per_node = parse(&with(
        SLURM,
        &[
            ("SLURM_NTASKS_PER_NODE", Some("8")),
            ("SLURM_TASKS_PER_NODE", None),
        ],
    ))
    .unwrap();
    assert_eq!(per_node.local_world_size, 8);
    let uneven = parse(&with(
        SLURM,
        &[
            ("SLURM_NTASKS", Some("11")),
            ("SLURM_TASKS_PER_NODE", Some("8,3")),
            ("SLURM_PROCID", Some("9")),
        ],
    ))
    .unwrap();
    assert_eq!(uneven.local_world_size, 3);
    // Port derived from a large job id stays in range.
    let big = parse(&with(SLURM, &[("SLURM_JOB_ID", Some("987654321"))])).unwrap();
    assert_eq!(big.master_port, 10_000 + (987_654_321 % 20_000) as u16);
}

#[test]
fn slurm_errors_name_the_variable() {
    for (changes, expected) in [
        (vec![("SLURM_NTASKS", None)], "SLURM_NTASKS is not set"),
        (vec![("SLURM_LOCALID", None)], "SLURM_LOCALID is not set"),
        (
            vec![("SLURM_JOB_NODELIST", None)],
            "SLURM_JOB_NODELIST is not set",
        ),
        (
            vec![("SLURM_JOB_NODELIST", Some("gpu[007-"))],
            "SLURM_JOB_NODELIST: SLURM node list `gpu[007-`",
        ),
        (vec![("SLURM_JOB_ID", None)], "SLURM_JOB_ID is not set"),
        (
            vec![("SLURM_TASKS_PER_NODE", Some("8(x2"))],
            "SLURM_TASKS_PER_NODE=\"8(x2\"",
        ),
        (
            vec![("SLURM_NODEID", Some("2"))],
            "SLURM_NODEID=2 but SLURM_TASKS_PER_NODE=\"8(x2)\" lists 2 node(s)",
        ),
        (
            vec![("SLURM_PROCID", Some("16"))],
            "SLURM_PROCID=16 is not below SLURM_NTASKS=16",
        ),
        (vec![("SLURM_STEP_ID", None)], "not started by srun"),
    ] {
        let e = parse(&with(SLURM, &changes)).unwrap_err();
        assert!(e.contains(expected), "{changes:?}: {e}");
    }
    // Outside srun with one task (an interactive shell): one process.
    let shell = parse(&with(
        SLURM,
        &[
            ("SLURM_STEP_ID", None),
            ("SLURM_NTASKS", Some("1")),
            ("SLURM_PROCID", Some("0")),
        ],
    ))
    .unwrap();
    assert!(!shell.is_distributed());
}
