//! Dropping used instances off the message's path.
//!
//! Dropping a message's `Store` returns its instance to the pooling
//! allocator, which resets the pages the instance dirtied (a
//! `PAGEMAP_SCAN` ioctl, then copying or zeroing them): about as much CPU
//! as instantiating it. Nothing waits for that, so the worker hands the
//! store to the reaper, a thread at the lowest scheduling priority
//! (`SCHED_IDLE` on Linux), and goes on with its next message. When the
//! cores have slack, as between the bursts of a loaded host, the reaper
//! drops the stores there; when they do not, its queue fills and workers
//! drop stores themselves, as before. Each message still runs in an
//! instance no other message has run in: a queued store is never reused,
//! only dropped.
//!
//! A queued store holds its pool slot until it is dropped, so the pool has
//! [`QUEUE`] slots more than the invocations it runs at once
//! (`Runtime::new`).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use wasmtime::Store;

use super::host::HostState;

/// Stores the reaper may hold, queued or being dropped (pool slots it may
/// hold on top of the runtime's `max_concurrent_instances`).
pub(crate) const QUEUE: usize = 16;

/// The sending side; the thread ends once every sender is dropped.
pub(crate) struct Reaper {
    tx: SyncSender<Store<HostState>>,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> std::io::Result<Reaper> {
        // The channel holds QUEUE - 1 and the thread one more while it drops it.
        let (tx, rx) = sync_channel(QUEUE - 1);
        std::thread::Builder::new()
            .name("ordo-reaper".into())
            .spawn(move || run(rx))?;
        Ok(Reaper { tx })
    }

    /// Drops `store` on the reaper thread if its queue has room, else here.
    pub fn reap(&self, store: Store<HostState>) {
        match self.tx.try_send(store) {
            Ok(()) => {}
            Err(TrySendError::Full(store) | TrySendError::Disconnected(store)) => drop(store),
        }
    }
}

fn run(rx: Receiver<Store<HostState>>) {
    lower_priority();
    for store in rx {
        drop(store);
    }
}

/// Moves the calling thread to `SCHED_IDLE`: it runs only on a core that
/// nothing else wants. Elsewhere (or if refused) it keeps its priority,
/// which costs the same CPU as dropping on the worker.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread (pid 0) with a valid
        // parameter struct that outlives the call.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "the instance reaper keeps its scheduling priority"
            );
        }
    }
}
