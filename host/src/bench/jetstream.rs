//! JetStream source benchmark: ordo (counter handler, effectively-once,
//! durable) draining a preloaded stream, beside a plain async-nats ordered
//! pull consumer that does no work on the same stream.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use clap::Args;
use futures_util::StreamExt;

use crate::host::{Host, HostConfig};
use crate::source::jetstream::JetStreamConfig;

/// Options of `ordo bench jetstream`.
#[derive(Debug, Args)]
pub struct JetStreamArgs {
    /// Directory holding `counter.wasm`.
    #[arg(long, default_value = "target/handlers")]
    handlers_dir: PathBuf,
    /// Messages in the stream.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Partition keys.
    #[arg(long, default_value_t = 1_000)]
    keys: usize,
    /// Partitions (subjects).
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Use this NATS server instead of starting `nats-server -js` on a
    /// free port with a temporary store.
    #[arg(long)]
    nats_url: Option<String>,
    /// The nats-server binary to start.
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    /// Markdown file to record the table in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

/// A nats-server child, killed on drop (its store is removed with it).
struct OwnServer {
    child: Child,
    _store: tempfile::TempDir,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nats(binary: &PathBuf) -> anyhow::Result<(OwnServer, String)> {
    let port = crate::ports::free_loopback_port()?;
    let store = tempfile::tempdir_in(".")?;
    let mut found = binary.clone();
    if !found.is_file() && binary.components().count() == 1 {
        for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
            let p = PathBuf::from(dir).join(binary);
            if p.is_file() {
                found = p;
                break;
            }
        }
    }
    let child = Command::new(&found)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start {} ({e}); install nats-server or pass --nats-url",
                found.display()
            )
        })?;
    Ok((
        OwnServer {
            child,
            _store: store,
        },
        format!("nats://127.0.0.1:{port}"),
    ))
}

/// Runs the JetStream benchmark.
pub async fn run(args: JetStreamArgs) -> anyhow::Result<()> {
    let bytes = super::handler_bytes(&args.handlers_dir, "counter")?;
    let (_own, url) = match &args.nats_url {
        Some(u) => (None, u.clone()),
        None => {
            let (s, u) = start_nats(&args.nats_server)?;
            (Some(s), u)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match async_nats::connect(url.as_str()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => anyhow::bail!("cannot reach {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let js = jetstream::new(client);
    let name = "ordobench";
    let _ = js.delete_stream(name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.*")],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;

    // Preload: the counter's payloads, keys spread over the partitions.
    let keys = args.keys.max(1);
    let bar = indicatif::ProgressBar::new(args.messages as u64);
    bar.set_message("publishing");
    let mut acks = Vec::with_capacity(1_000);
    for i in 0..args.messages {
        let (key, seq) = (format!("key-{}", i % keys), (i / keys) as u64 + 1);
        let p = crate::source::partition_for(&key, args.partitions);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Ordo-Key", key.as_str());
        headers.insert("Nats-Msg-Id", format!("{key}/{seq}").as_str());
        let payload = format!("{{\"seq\":{seq}}}");
        acks.push(
            js.publish_with_headers(format!("{name}.{p}"), headers, payload.into())
                .await?,
        );
        if acks.len() >= 1_000 {
            for a in acks.drain(..) {
                a.await?;
            }
            bar.set_position(i as u64);
        }
    }
    for a in acks.drain(..) {
        a.await?;
    }
    bar.finish_and_clear();
    let total = args.messages as u64;

    // Baseline: a plain ordered pull consumer over the stream, no work.
    let stream = js.get_stream(name).await?;
    let t0 = Instant::now();
    let mut messages = stream
        .create_consumer(OrderedConfig::default())
        .await?
        .messages()
        .await?;
    let mut seen = 0u64;
    while seen < total {
        match messages.next().await {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => anyhow::bail!("baseline consumer: {e}"),
            None => anyhow::bail!("baseline consumer ended after {seen} messages"),
        }
    }
    let plain = t0.elapsed();
    drop(messages);

    // ordo: the counter handler, effectively-once, durable commits.
    let dir = tempfile::tempdir_in(".")?;
    let config = HostConfig {
        jetstream: vec![(
            name.to_string(),
            JetStreamConfig {
                url: url.clone(),
                partitions: args.partitions,
                create_stream: false,
                ..Default::default()
            },
        )],
        ..HostConfig::default()
    };
    let host = Host::open(dir.path(), config).await?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_message("ordo draining");
    let t0 = Instant::now();
    host.deploy("counter", name, bytes, Default::default())
        .await?;
    let flushes0 = host.committer().flushes();
    loop {
        let s = host.status()?;
        let processed = s.first().map(|h| h.processed + h.duplicates).unwrap_or(0);
        bar.set_position(processed);
        if processed >= total {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "ordo did not drain the stream within 30 minutes ({processed}/{total})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = t0.elapsed();
    bar.finish_and_clear();
    let flushes = host.committer().flushes() - flushes0;
    host.shutdown().await?;

    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    let table = format!(
        "| consumer | msg/s | vs plain consumer |\n|---|---:|---:|\n\
         | plain async-nats ordered pull consumer, no work | {:.0} | 1.00 |\n\
         | ordo, counter WASM, effectively-once, durable ({} partitions) | {:.0} | {:.2} |\n\n\
         {total} messages, {keys} keys; ordo flushed {flushes} times ({:.1} messages per flush).\n",
        rate(plain),
        args.partitions,
        rate(drained),
        rate(drained) / rate(plain),
        total as f64 / flushes.max(1) as f64,
    );
    println!("{table}");
    let body = format!(
        "## JetStream source (preloaded stream, drain)\n\n{}; nats-server with file storage on the same disk.\n\
         Reproduce: `scripts/build-guests.sh && cargo run --release -- bench jetstream`.\n\n{table}",
        super::machine_summary(),
    );
    super::record_section(&args.output, "jetstream", &body)?;
    Ok(())
}
