//! Writing benchmark tables into BENCHMARKS.md, one marked section per bench.

use std::path::Path;

/// Replaces (or appends) the section `name` of the markdown file at `path`
/// with `body`, between `<!-- bench:name:begin -->` / `end` markers.
pub fn record_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- bench:{name}:begin -->");
    let end = format!("<!-- bench:{name}:end -->");
    let existing = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nFigures written by `ordo bench`; each section says how to reproduce it.\n"
            .to_string()
    });
    let section = format!("{begin}\n{body}\n{end}");
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!(
                "{}{}{}",
                &existing[..b],
                section,
                &existing[e + end.len()..]
            )
        }
        _ => format!("{}\n{}\n", existing.trim_end(), section),
    };
    std::fs::write(path, updated)?;
    Ok(())
}

/// One line describing the machine: CPU model, cores, memory, kernel, date.
pub fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / (1024 * 1024))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem_gib} GiB RAM, Linux {kernel}; measured {date}")
}
