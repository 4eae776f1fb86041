//! The torture run in CI mode: the real binary (`ordo torture`, which runs
//! `ordo serve` as its child) killed 100+ times by SIGKILL at random moments
//! and at named crash points under a producer with duplicates; the checker
//! must find nothing lost, duplicated or reordered, and the bank's money
//! conserved. `ordo torture --kills 2000` is the long mode (RELIABILITY.md).

use std::process::Command;
use std::time::Instant;

use crate::fixtures::handler_path;
use crate::server::Server;

/// Runs `ordo torture` with `args` and checks the checker found nothing
/// lost, duplicated or reordered and the bank's money conserved.
fn torture(args: &[&str]) {
    let started = Instant::now();
    let out = Command::new(Server::binary())
        .arg("torture")
        .args(args)
        .arg("--counter")
        .arg(handler_path("counter"))
        .arg("--bank")
        .arg(handler_path("bank"))
        .env_remove("ORDO_ADMIN_TOKEN")
        .output()
        .expect("run ordo torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "ordo torture {args:?} failed after {:.0} s\n{stdout}\n{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        stdout.contains("| lost (prefix / middle / suffix) | 0 (0 / 0 / 0) |")
            && stdout.contains("| duplicated | 0 |")
            && stdout.contains("| reordered | 0 |")
            && stdout.contains("| bank: money conserved | yes"),
        "figures:\n{stdout}"
    );
}

#[test]
fn torture_ci_mode_survives_100_kills() {
    torture(&["--kills", "120", "--seed", "7", "--duration", "240"]);
}

/// The same with instances reused for up to 64 messages of a lane batch: a
/// kill may fall while an instance is between messages, and a restart
/// groups the messages it replays differently.
#[test]
fn torture_with_reused_instances_survives_40_kills() {
    torture(&[
        "--kills",
        "40",
        "--seed",
        "11",
        "--duration",
        "120",
        "--messages-per-instance",
        "64",
    ]);
}
