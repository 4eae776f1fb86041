//! The process-wide engine, linker, epoch ticker and component loading.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{Handler, HandlerPre};
use super::cache::ArtifactCache;
use super::host::{HandlerModule, HostState};
use super::imports::check_import;
use super::reaper::Reaper;
use super::{HandlerLimits, LoadError};

/// Process-wide sandbox settings. Per-handler limits are in [`HandlerLimits`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` disables the disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Invocations that may run at once. The pooling allocator has this
    /// many slots plus the reaper's (used instances waiting to be
    /// dropped); callers must not run more invocations concurrently.
    pub max_concurrent_instances: u32,
    /// Upper bound of any handler's memory limit (size of a pool slot).
    pub max_memory_bytes: usize,
    /// Wasm stack per invocation; deeper recursion traps.
    pub max_wasm_stack: usize,
    /// Epoch tick: the resolution of invocation deadlines.
    pub epoch_tick: Duration,
    /// Largest component accepted by [`Runtime::load`].
    pub max_component_bytes: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            max_concurrent_instances: 64,
            max_memory_bytes: 1 << 30,
            max_wasm_stack: 512 << 10,
            epoch_tick: Duration::from_millis(5),
            max_component_bytes: 32 << 20,
        }
    }
}

/// The sandbox: one wasmtime engine and linker for the whole process.
///
/// Cheap to clone (shared). Dropping the last clone stops the epoch ticker.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Option<ArtifactCache>,
    config: RuntimeConfig,
    ticker_stop: Arc<AtomicBool>,
    reaper: Reaper,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine (component model, pooling allocator, epoch
    /// interruption, bounded stack) and the linker, and starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        // Room for the instances that run at once and for the used ones
        // the reaper holds until it has dropped them.
        let slots = config
            .max_concurrent_instances
            .saturating_add(super::reaper::QUEUE as u32);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            .total_core_instances(slots * 16)
            .total_memories(slots * 4)
            .total_tables(slots * 8)
            .total_stacks(slots)
            .max_memory_size(config.max_memory_bytes)
            .max_unused_warm_slots(slots)
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            // Reset only the pages an instance dirtied (Linux ≥ 6.7), not
            // the whole resident prefix: see BENCHMARKS.md.
            .pagemap_scan(Enabled::Auto);

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;

        let cache = match &config.cache_dir {
            Some(dir) => Some(ArtifactCache::new(dir, &engine).map_err(|e| {
                anyhow::anyhow!("cannot create artifact cache {}: {e}", dir.display())
            })?),
            None => None,
        };

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("ordo-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })?;
        }

        let reaper = Reaper::start()?;

        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                linker,
                cache,
                config,
                ticker_stop,
                reaper,
            }),
        })
    }

    /// The runtime's configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Where used instances are dropped (see `reaper.rs`).
    pub(crate) fn reaper(&self) -> &Reaper {
        &self.inner.reaper
    }

    /// Validates and compiles a handler component.
    ///
    /// Checks, in order: size cap, that the bytes are a component (not a core
    /// module or a precompiled artifact), that it compiles, that every import
    /// is on the allow-list, and that it exports the `handler` world's
    /// `handle` function. The compiled artifact is cached on disk.
    pub fn load(&self, bytes: &[u8], limits: HandlerLimits) -> Result<HandlerModule, LoadError> {
        let inner = &*self.inner;
        if bytes.len() > inner.config.max_component_bytes {
            return Err(LoadError::TooLarge {
                size: bytes.len(),
                limit: inner.config.max_component_bytes,
            });
        }
        classify_binary(bytes)?;
        let content_hash = hex::encode(Sha256::digest(bytes));
        let component = self.compile(bytes, &content_hash)?;

        for (name, _) in component.component_type().imports(&inner.engine) {
            check_import(name)?;
        }
        let instance_pre = inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre =
            HandlerPre::new(instance_pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        if limits.memory_bytes > inner.config.max_memory_bytes {
            return Err(LoadError::Invalid(format!(
                "memory limit {} exceeds the host's ceiling of {} bytes",
                limits.memory_bytes, inner.config.max_memory_bytes
            )));
        }
        Ok(HandlerModule::new(
            self.clone(),
            pre,
            content_hash,
            bytes.len(),
            limits,
            inner.config.epoch_tick,
        ))
    }

    fn compile(&self, bytes: &[u8], content_hash: &str) -> Result<Component, LoadError> {
        let inner = &*self.inner;
        let Some(cache) = &inner.cache else {
            return Component::new(&inner.engine, bytes)
                .map_err(|e| LoadError::Invalid(format!("{e:#}")));
        };
        if let Some(component) = cache.get(&inner.engine, content_hash) {
            return Ok(component);
        }
        let artifact = inner
            .engine
            .precompile_component(bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        if let Err(e) = cache.put(content_hash, &artifact) {
            // A cache we cannot write costs a recompile at the next start,
            // nothing else: keep going.
            tracing::warn!(error = %e, "cannot write compiled artifact to cache");
        }
        // SAFETY: `artifact` was produced just above by this engine.
        unsafe { Component::deserialize(&inner.engine, &artifact) }
            .map_err(|e| LoadError::Cache(format!("{e:#}")))
    }
}

/// Tells a component from a core module, a precompiled artifact or garbage.
fn classify_binary(bytes: &[u8]) -> Result<(), LoadError> {
    if Engine::detect_precompiled(bytes).is_some() {
        return Err(LoadError::Precompiled);
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8 are version + layer: 1,0,0,0 for core modules; components
    // use layer 1 (0x0d,0x00,0x01,0x00 at the time of writing).
    match bytes[6..8] {
        [0, 0] => Err(LoadError::NotAComponent),
        [1, 0] => Ok(()),
        _ => Err(LoadError::Invalid(format!(
            "unknown WebAssembly layer/version {:02x?}",
            &bytes[4..8]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_classification() {
        assert!(matches!(classify_binary(b"hello"), Err(LoadError::NotWasm)));
        assert!(matches!(
            classify_binary(b"\0asm\x01\0\0\0"),
            Err(LoadError::NotAComponent)
        ));
        assert!(classify_binary(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
