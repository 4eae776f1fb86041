//! Named crash points for fault testing: `ORDO_CRASH_AT=<point>[:<nth>]`
//! makes the process abort (like a power cut: no flush, no cleanup) the
//! `nth` time (default 1) it reaches `<point>`. Inert unless the variable is
//! set; the check is one atomic load.
//!
//! Points: `after-commit-before-flush` (a lane transaction applied, not yet
//! flushed), `after-append-before-flush` (produced messages applied, not yet
//! flushed or acknowledged), `after-flush-before-ack` (flushed, waiters not
//! yet woken), `mid-batch` (a lane has run a message of a batch it has not
//! committed), `mid-replay` (a dead letter replayed, not committed),
//! `mid-deploy` (component and version record stored, not yet activated),
//! `mid-outbox-relay` (outbox entries published and acknowledged by the
//! broker, not yet deleted), `mid-commit` (a lane batch's journal record
//! and all but its last two writes flushed, those not; see
//! [`crate::ledger::journal`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every crash point, for validation and tests.
pub const POINTS: &[&str] = &[
    "after-commit-before-flush",
    "after-append-before-flush",
    "after-flush-before-ack",
    "mid-batch",
    "mid-replay",
    "mid-deploy",
    "mid-outbox-relay",
    "mid-commit",
];

struct Armed {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("ORDO_CRASH_AT").ok()?;
            let (point, nth) = match spec.split_once(':') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            if !POINTS.contains(&point.as_str()) {
                eprintln!(
                    "ordo: ORDO_CRASH_AT={point:?} is not a crash point ({POINTS:?}); ignored"
                );
                return None;
            }
            Some(Armed {
                point,
                nth: nth.max(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts the process if `point` is armed and reached for the nth time.
pub fn point(name: &str) {
    point_then(name, || {});
}

/// Like [`point`], running `before` just before aborting (to make the state
/// the crash must leave reach the disk, say).
pub fn point_then(name: &str, before: impl FnOnce()) {
    if let Some(a) = armed() {
        if a.point == name && a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
            eprintln!(
                "ordo: crash point {name} reached ({}th time): aborting",
                a.nth
            );
            before();
            std::process::abort();
        }
    }
}
