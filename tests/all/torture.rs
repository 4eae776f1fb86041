//! The torture run in CI mode: the real binary (`ordo torture`, which runs
//! `ordo serve` as its child) killed 100+ times by SIGKILL at random moments
//! and at named crash points under a producer with duplicates; the checker
//! must find nothing lost, duplicated or reordered, and the bank's money
//! conserved. `ordo torture --kills 2000` is the long mode (RELIABILITY.md).

use std::process::Command;
use std::time::Instant;

use crate::fixtures::handler_path;
use crate::server::Server;

#[test]
fn torture_ci_mode_survives_100_kills() {
    let started = Instant::now();
    let out = Command::new(Server::binary())
        .args(["torture", "--kills", "120", "--seed", "7"])
        .arg("--counter")
        .arg(handler_path("counter"))
        .arg("--bank")
        .arg(handler_path("bank"))
        .args(["--duration", "240"])
        .env_remove("ORDO_ADMIN_TOKEN")
        .output()
        .expect("run ordo torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "ordo torture failed after {:.0} s\n{stdout}\n{stderr}",
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
