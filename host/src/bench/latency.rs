//! The latency phase of `bench pipeline` and `bench compare`: an open-loop
//! load at a set rate (a producer request every `interval`, each on its own
//! task whether or not the earlier ones were answered, as independent
//! producers would send them) plus probe messages on their own key, each
//! timed from produce to its lane's committed position passing it
//! (applied, durable and counted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::ingest::IncomingMessage;
use crate::dispatch::LanePosition;
use crate::host::Host;

/// How long a probe may wait for its message to be committed before the
/// offered load is declared not sustained.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Time between two probes.
pub(super) const PROBE_GAP: Duration = Duration::from_millis(20);

/// Message `seq` of partition key `key-<key>`, as the benches' counter
/// workloads send it.
pub(super) fn msg(key: usize, seq: u64) -> IncomingMessage {
    IncomingMessage {
        key: format!("key-{key}"),
        idempotency_key: Some(format!("key-{key}/{seq}")),
        payload: format!("{{\"seq\":{seq}}}").into_bytes(),
        headers: vec![],
    }
}

/// (key, seq) of the `j`-th message of a load over `keys` keys: the keys
/// in turn, with sequence numbers above any a bench's backlog uses.
pub(super) fn load_seq(j: usize, keys: usize) -> (usize, u64) {
    (j % keys, 2_000_000 + (j / keys) as u64)
}

/// Paces an open-loop load: at every tick of `interval`, the messages due
/// by then at `per_second`, whether or not earlier ones were answered.
pub(super) struct Pacer {
    tick: tokio::time::Interval,
    started: Instant,
    per_second: f64,
    sent: usize,
}

impl Pacer {
    pub fn new(per_second: f64, interval: Duration) -> Pacer {
        Pacer {
            tick: tokio::time::interval(interval),
            started: Instant::now(),
            per_second,
            sent: 0,
        }
    }

    /// Waits for the next tick; the indices of the messages due since the
    /// last one. Every message due by now, so a late tick does not lower
    /// the offered rate.
    pub async fn next(&mut self) -> std::ops::Range<usize> {
        self.tick.tick().await;
        let due =
            ((self.started.elapsed().as_secs_f64() * self.per_second) as usize).max(self.sent);
        let range = self.sent..due;
        self.sent = due;
        range
    }

    /// Messages due so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The load of a latency phase.
pub(super) struct Load {
    /// Messages offered per second.
    pub per_second: f64,
    /// Time between two producer requests.
    pub interval: Duration,
    /// The load's messages go round-robin to `key-0` … `key-<keys - 1>`.
    pub keys: usize,
    /// Probes to time (one every 20 ms).
    pub samples: usize,
    /// Advanced by one per probe timed.
    pub progress: Option<indicatif::ProgressBar>,
}

/// What a latency phase measured.
pub(super) struct Loaded {
    /// Per probe, sorted: produce→committed, produce→ingest returned
    /// (durable in the log), produce→applied by the lane.
    pub stages: [Vec<Duration>; 3],
    /// Messages the load sent.
    pub sent: usize,
    /// How long the load ran.
    pub secs: f64,
    /// CPU of all cores during the phase, in %.
    pub cpu_pct: f64,
    /// Group flushes during the phase.
    pub flushes: u64,
}

impl Loaded {
    /// The `p` quantile of stage `i` in milliseconds.
    pub fn ms(&self, i: usize, p: f64) -> f64 {
        quantile_ms(&self.stages[i], p)
    }
}

/// The `p` quantile of sorted `samples`, in milliseconds (NaN if empty).
pub(super) fn quantile_ms(samples: &[Duration], p: f64) -> f64 {
    match samples.len() {
        0 => f64::NAN,
        n => samples[((n - 1) as f64 * p) as usize].as_secs_f64() * 1e3,
    }
}

/// Runs `load` on `host`'s handler `counter` (topic `bench`) while timing
/// `load.samples` probes on the key `probe`, whose state must not exist
/// yet. Fails if a probe is not committed within 10 s (the load is not
/// sustained) or a producer request fails.
pub(super) async fn under_load(host: &Arc<Host>, load: &Load) -> anyhow::Result<Loaded> {
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (host, stop) = (host.clone(), stop.clone());
        let (per_second, interval, keys) = (load.per_second, load.interval, load.keys.max(1));
        tokio::spawn(async move {
            let mut pacer = Pacer::new(per_second, interval);
            let mut requests = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<IncomingMessage> = pacer
                    .next()
                    .await
                    .map(|j| {
                        let (key, seq) = load_seq(j, keys);
                        msg(key, seq)
                    })
                    .collect();
                if !batch.is_empty() {
                    let host = host.clone();
                    requests.spawn(async move { host.ingest("bench", batch).await });
                }
                while let Some(done) = requests.try_join_next() {
                    done??;
                }
            }
            while let Some(done) = requests.join_next().await {
                done??;
            }
            anyhow::Ok((pacer.sent(), pacer.elapsed()))
        })
    };
    let flushes0 = host.committer().flushes();
    let meter = super::compare::Meter::start();
    let probed = probe(host, load.samples, load.progress.as_ref()).await;
    stop.store(true, Ordering::Relaxed);
    let (_, cpu_pct, _) = meter.finish();
    let flushes = host.committer().flushes() - flushes0;
    let produced = producer.await?;
    let (mut stages, (sent, took)) = (probed?, produced?);
    for s in &mut stages {
        s.sort();
    }
    Ok(Loaded {
        stages,
        sent,
        secs: took.as_secs_f64().max(0.001),
        cpu_pct,
        flushes,
    })
}

/// Sends `samples` probe messages on their own key, 20 ms apart, and times
/// each: `[produce→committed, produce→ingest returned (durable in the log),
/// produce→applied by the lane]`, read from the lane's position (committed:
/// the batch holding it is durable and counted), then checks the state the
/// probe left.
async fn probe(
    host: &Host,
    samples: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<[Vec<Duration>; 3]> {
    let mut stages: [Vec<Duration>; 3] = Default::default();
    let mut position = host.lane_position("counter", "probe")?;
    for i in 0..samples {
        tokio::time::sleep(PROBE_GAP).await;
        let start = Instant::now();
        let offset = ingest_one(
            host,
            IncomingMessage {
                key: "probe".into(),
                idempotency_key: Some(format!("probe/{i}")),
                payload: format!("{{\"seq\":{}}}", i + 1).into_bytes(),
                headers: vec![],
            },
        )
        .await?;
        let ingested = start.elapsed();
        reached(&mut position, |p| p.applied > offset, start).await?;
        let applied = start.elapsed();
        reached(&mut position, |p| p.committed > offset, start).await?;
        stages[0].push(start.elapsed());
        stages[1].push(ingested);
        stages[2].push(applied);
        if let Some(bar) = progress {
            bar.inc(1);
        }
        let want = (i + 1).to_string();
        let count = host.state_get("counter", "probe", "count")?;
        anyhow::ensure!(
            count.as_deref() == Some(want.as_bytes()),
            "probe {i} committed but the count is {:?}, not {want}",
            count.map(|c| String::from_utf8_lossy(&c).into_owned())
        );
    }
    Ok(stages)
}

/// Produces one message; its offset.
pub(super) async fn ingest_one(host: &Host, m: IncomingMessage) -> anyhow::Result<u64> {
    host.ingest("bench", vec![m])
        .await?
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("ingest returned no offset"))
}

/// Waits until the lane's position satisfies `done`, at most
/// [`PROBE_DEADLINE`] after `start`.
pub(super) async fn reached(
    position: &mut tokio::sync::watch::Receiver<LanePosition>,
    done: impl FnMut(&LanePosition) -> bool,
    start: Instant,
) -> anyhow::Result<()> {
    let left = PROBE_DEADLINE.saturating_sub(start.elapsed());
    match tokio::time::timeout(left, position.wait_for(done)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => anyhow::bail!("the handler's lane stopped"),
        Err(_) => anyhow::bail!(
            "not sustained: a probe was not committed within {} s",
            PROBE_DEADLINE.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_index_the_sorted_samples_and_an_empty_set_has_none() {
        assert!(quantile_ms(&[], 0.5).is_nan());
        let one = [Duration::from_millis(3)];
        assert_eq!(quantile_ms(&one, 0.5), 3.0);
        assert_eq!(quantile_ms(&one, 0.99), 3.0);
        // 1..=100 ms: p50 is the 50th sample (index 49), p99 the 99th.
        let hundred: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile_ms(&hundred, 0.5), 50.0);
        assert_eq!(quantile_ms(&hundred, 0.99), 99.0);
        assert_eq!(quantile_ms(&hundred, 1.0), 100.0);
    }

    #[test]
    fn a_load_visits_every_key_in_turn_above_the_backlogs_sequences() {
        let keys = 3;
        let seen: Vec<(usize, u64)> = (0..7).map(|j| load_seq(j, keys)).collect();
        assert_eq!(
            seen,
            vec![
                (0, 2_000_000),
                (1, 2_000_000),
                (2, 2_000_000),
                (0, 2_000_001),
                (1, 2_000_001),
                (2, 2_000_001),
                (0, 2_000_002),
            ]
        );
        let m = msg(2, 2_000_001);
        assert_eq!(m.key, "key-2");
        assert_eq!(m.idempotency_key.as_deref(), Some("key-2/2000001"));
        assert_eq!(m.payload, b"{\"seq\":2000001}");
    }
}
