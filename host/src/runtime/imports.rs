//! The import allow-list: what a handler component may link against.

use super::LoadError;

/// Interfaces a handler may import, as `namespace:package/interface` without
/// version. WASI interfaces are linked with a context that grants nothing: no
/// preopened directories, no environment, no arguments, no sockets.
pub const ALLOWED_IMPORTS: &[&str] = &[
    "ordo:handler/types",
    "ordo:handler/state",
    "ordo:handler/outbox",
    "ordo:handler/log",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Checks one import name (`ns:pkg/iface@version`) against the allow-list.
pub(crate) fn check_import(name: &str) -> Result<(), LoadError> {
    let (unversioned, version) = match name.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    };
    let allowed = ALLOWED_IMPORTS.contains(&unversioned)
        && match (unversioned.starts_with("wasi:"), version) {
            // WASI 0.2.x only: the host links wasmtime-wasi's p2 implementation.
            (true, Some(v)) => v.starts_with("0.2."),
            (true, None) => false,
            (false, Some(v)) => v.starts_with("0.1."),
            (false, None) => false,
        };
    if allowed {
        Ok(())
    } else {
        Err(LoadError::ForbiddenImport {
            import: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        assert!(check_import("ordo:handler/state@0.1.0").is_ok());
        assert!(check_import("wasi:io/streams@0.2.3").is_ok());
        assert!(check_import("wasi:sockets/tcp@0.2.0").is_err());
        assert!(check_import("wasi:http/outgoing-handler@0.2.0").is_err());
        assert!(check_import("wasi:io/streams@0.3.0").is_err());
        assert!(check_import("ordo:handler/state@0.2.0").is_err());
        assert!(check_import("evil:pkg/iface").is_err());
        let err = check_import("wasi:sockets/tcp@0.2.0").unwrap_err();
        assert!(err.to_string().contains("wasi:sockets/tcp@0.2.0"));
    }
}
