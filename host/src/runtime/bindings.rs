//! Host-side bindings generated from the pinned WIT contract in `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    // Host functions return `wasmtime::Result` so that a guest exceeding a
    // limit (too many emits, an oversized state value) traps instead of
    // silently losing data.
    imports: { default: trappable },
});
