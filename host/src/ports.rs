//! Loopback ports for the `ordo serve` children that `ordo demo`,
//! `ordo torture` and the test suite start.
//!
//! Binding port 0, reading the port and closing the socket leaves a window
//! until the child binds it, and so does every restart of a child on its
//! port. In that window the kernel may hand the port to the next bind of
//! port 0 (another test's server) or, as the source port, to an outgoing
//! connection (it takes both from the ephemeral range): the child then
//! fails to bind, or a client talks to another test's server. Ports from
//! [`free_loopback_port`] come from below the ephemeral range
//! (`net.ipv4.ip_local_port_range`), which neither uses, and are handed
//! out at most once per process: only an explicit bind by another process
//! can take one.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Lowest port handed out.
const FIRST: u32 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default when
/// it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The end of the range ports are handed out from (`FIRST..end`): the
/// ephemeral range's start; `None` when that leaves no room below it.
fn range_end() -> Option<u32> {
    let end = ephemeral_start().min(u32::from(u16::MAX) + 1);
    (end > FIRST + 1_000).then_some(end)
}

/// A loopback TCP port that nothing listens on, below the ephemeral range,
/// not returned before by this process. Processes start at different
/// places in the range (by process id), so two of them rarely try the same
/// ports. Falls back to a kernel-chosen port when the ephemeral range
/// leaves no room below it.
pub fn free_loopback_port() -> std::io::Result<u16> {
    // The range and where the next pick starts, set on the first call.
    static NEXT: OnceLock<Option<(u32, AtomicU32)>> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        range_end().map(|end| {
            let start = std::process::id().wrapping_mul(7_919) % (end - FIRST);
            (end, AtomicU32::new(start))
        })
    });
    match next {
        Some((end, next)) => pick(next, *end),
        None => TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()
            .map(|a| a.port()),
    }
}

/// The first port from `FIRST + next` on (wrapping before `end`) that can
/// be bound; `next` moves past it.
fn pick(next: &AtomicU32, end: u32) -> std::io::Result<u16> {
    let span = end - FIRST;
    for _ in 0..span {
        let port = FIRST + next.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port).map_err(std::io::Error::other)?;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {FIRST}..{end}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50)
            .map(|_| free_loopback_port().expect("a free port"))
            .collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        if let Some(end) = range_end() {
            assert!(
                ports
                    .iter()
                    .all(|&p| u32::from(p) >= FIRST && u32::from(p) < end),
                "{ports:?} not in {FIRST}..{end}"
            );
        }
        for p in ports {
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("the port is bindable");
        }
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let port = pick(&AtomicU32::new(5_000), 30_000).expect("a free port");
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind");
        // A counter that would hand out the held port next.
        let next = AtomicU32::new(u32::from(port) - FIRST);
        let end = u32::from(port) + 100;
        let other = pick(&next, end).expect("another port");
        assert_ne!(other, port, "a port someone listens on was handed out");
        assert!(other > port && u32::from(other) < end, "{other}");
        drop(held);
    }
}
