//! On-disk cache of compiled components, keyed by content hash and engine.
//!
//! Compiling a large component (a Python or JavaScript handler is ~20 MB)
//! takes seconds; a restart or a redeploy of the same bytes must not pay it
//! again. Artifacts are written atomically (temp file + rename) and are only
//! ever read back by the same engine configuration: the file name includes a
//! hash of wasmtime's compatibility key, and wasmtime re-checks it on load.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

/// Directory of `<component-sha256>-<engine-hash>.cwasm` files.
#[derive(Debug, Clone)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_tag: String,
}

impl ArtifactCache {
    pub(crate) fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // DefaultHasher::new() has fixed keys, so the tag is stable for one
        // build of the binary; a different build at worst misses the cache.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            engine_tag: format!("{:016x}", hasher.finish()),
        })
    }

    fn path(&self, content_hash: &str) -> PathBuf {
        self.dir
            .join(format!("{content_hash}-{}.cwasm", self.engine_tag))
    }

    /// Loads a cached artifact, or `None` if absent or unusable (in which case
    /// the caller recompiles and overwrites it).
    pub(crate) fn get(&self, engine: &Engine, content_hash: &str) -> Option<Component> {
        let path = self.path(content_hash);
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was produced by `Engine::precompile_component` of
        // this very engine configuration and lives in the host's own data
        // directory, which is trusted like the binary itself. wasmtime still
        // validates the header and engine compatibility before using it.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "ignoring unusable compiled artifact");
                None
            }
        }
    }

    /// Stores a compiled artifact atomically.
    pub(crate) fn put(&self, content_hash: &str, artifact: &[u8]) -> std::io::Result<()> {
        let path = self.path(content_hash);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, artifact)?;
        std::fs::rename(&tmp, &path)
    }
}
