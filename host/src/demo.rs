//! `ordo demo`: the end-to-end demonstration on the embedded default.
//!
//! Starts a real `ordo serve` (this binary) on a temporary data dir, deploys
//! the bank handler, produces a bank workload with duplicate deliveries and
//! transfers, shows progress while it drains, and checks the books.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::cli::client::Client;

/// Options of `ordo demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The bank handler component.
    #[arg(long, default_value = "target/handlers/bank.wasm")]
    pub handler: PathBuf,
    /// Messages to produce (before duplicates).
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Accounts.
    #[arg(long, default_value_t = 1_000)]
    pub accounts: usize,
    /// Share of messages delivered twice.
    #[arg(long, default_value_t = 0.10)]
    pub duplicate_rate: f64,
    /// Port of the demo host (0 = pick a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let component = std::fs::read(&args.handler).with_context(|| {
        format!(
            "reading {} (run scripts/build-guests.sh)",
            args.handler.display()
        )
    })?;
    let accounts = args.accounts.max(2);
    let data_dir = tempfile::tempdir().context("temp data dir")?;
    let port = if args.port == 0 {
        crate::ports::free_loopback_port().context("finding a free port")?
    } else {
        args.port
    };
    let base = format!("http://127.0.0.1:{port}");
    println!(
        "ordo demo: starting host on {base}, data dir {}",
        data_dir.path().display()
    );
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--data-dir"])
        .arg(data_dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env(
            "ORDO_LOG",
            std::env::var("ORDO_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .context("starting ordo serve")?;
    let result = drive(&args, &base, component, accounts).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    result
}

async fn drive(
    args: &DemoArgs,
    base: &str,
    component: Vec<u8>,
    accounts: usize,
) -> anyhow::Result<()> {
    let client = Client::new(base, std::env::var("ORDO_ADMIN_TOKEN").ok())?;
    let started = Instant::now();
    while client.get_json("/v1/status").await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("host did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = client
        // A malformed command is dead-lettered and its account carries on
        // (the default, park-key, would hold the account's later commands
        // until an operator replays them).
        .put_bytes(
            "/v1/handlers/bank?topic=bank&on_failure=dead-letter",
            component,
        )
        .await?;
    println!(
        "deployed bank handler version {} ({} bytes)",
        v["version"], v["size"]
    );

    // Workload: an opening deposit per account, then deposits, withdrawals
    // and transfers. Withdrawals and transfers never exceed what an account
    // is guaranteed to hold (its own deposits minus its own debits), so no
    // command fails; 10 deliberately malformed commands are dead-lettered.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut floor: Vec<i64> = vec![0; accounts];
    let (mut deposited, mut withdrawn) = (0i64, 0i64);
    let mut messages: Vec<Value> = Vec::with_capacity(args.messages * 11 / 10 + 16);
    let mut duplicates = 0u64;
    for i in 0..args.messages {
        let a = if i < accounts {
            i
        } else {
            rng.gen_range(0..accounts)
        };
        let command = if i < accounts || floor[a] < 10 {
            let amount = rng.gen_range(100..1_000);
            floor[a] += amount;
            deposited += amount;
            json!({"op": "deposit", "amount": amount})
        } else if rng.gen_bool(0.5) {
            let amount = rng.gen_range(1..=floor[a] / 2);
            floor[a] -= amount;
            let mut to = rng.gen_range(0..accounts);
            if to == a {
                to = (a + 1) % accounts;
            }
            json!({"op": "transfer", "amount": amount, "to": format!("acct-{to}")})
        } else {
            let amount = rng.gen_range(1..=floor[a] / 2);
            floor[a] -= amount;
            withdrawn += amount;
            json!({"op": "withdraw", "amount": amount})
        };
        let msg = json!({"key": format!("acct-{a}"), "idempotency_key": format!("cmd-{i}"),
                         "payload": command.to_string()});
        if rng.gen_bool(args.duplicate_rate.clamp(0.0, 1.0)) {
            messages.push(msg.clone());
            duplicates += 1;
        }
        messages.push(msg);
    }
    for i in 0..10 {
        messages.push(
            json!({"key": format!("acct-{i}"), "idempotency_key": format!("bad-{i}"),
                             "payload": "{\"op\":\"teleport\"}"}),
        );
    }

    let bar = ProgressBar::new(messages.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec}")?
            .progress_chars("=> "),
    );
    bar.set_message("producing");
    let t0 = Instant::now();
    for chunk in messages.chunks(1_000) {
        client
            .produce("bank", &Value::Array(chunk.to_vec()))
            .await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    let produce_secs = t0.elapsed().as_secs_f64();

    let unique = (args.messages + 10) as u64;
    let bar = ProgressBar::new(unique);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec}")?
            .progress_chars("=> "),
    );
    bar.set_message("handling");
    let status = loop {
        let status = client.get_json("/v1/status").await?;
        let h = status["handlers"][0].clone();
        let done = h["processed"].as_u64().unwrap_or(0) + h["dead_lettered"].as_u64().unwrap_or(0);
        bar.set_position(done.min(unique));
        // Transfers add deposits to the topic as they are handled; done when
        // nothing is left in the topic.
        if h["lag"] == 0 && done >= unique {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish();
    let total_secs = t0.elapsed().as_secs_f64();

    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    for a in 0..accounts {
        let key = format!("acct-{a}");
        let raw = client
            .get_bytes(&format!("/v1/handlers/bank/state/{key}/account"))
            .await?
            .with_context(|| format!("no state for {key}"))?;
        let v: Value = serde_json::from_slice(&raw)?;
        balances.insert(key, v["balance"].as_i64().unwrap_or(i64::MIN));
    }
    let sum: i64 = balances.values().sum();
    let negative = balances.values().filter(|b| **b < 0).count();
    let processed = status["processed"].as_u64().unwrap_or(0);
    println!();
    println!("summary");
    println!(
        "  messages produced          {:>10} ({} duplicate deliveries)",
        messages.len(),
        duplicates
    );
    println!("  processed (+credits)        {:>10}", processed);
    println!("  duplicates skipped         {:>10}", status["duplicates"]);
    println!(
        "  dead-lettered              {:>10} (10 malformed commands expected)",
        status["dead_lettered"]
    );
    println!("  produce time               {:>9.2}s", produce_secs);
    println!(
        "  end-to-end                 {:>9.2}s  ({:.0} msg/s handled)",
        total_secs,
        processed as f64 / total_secs
    );
    println!("  sum of balances            {:>10}", sum);
    println!("  deposits - withdrawals     {:>10}", deposited - withdrawn);
    println!("  negative balances          {:>10}", negative);
    let ok = sum == deposited - withdrawn
        && negative == 0
        && status["duplicates"].as_u64() == Some(duplicates)
        && status["dead_lettered"].as_u64() == Some(10);
    if ok {
        println!(
            "invariant check: OK (money conserved, every duplicate skipped, no negative balance)"
        );
        Ok(())
    } else {
        bail!("invariant check FAILED")
    }
}
