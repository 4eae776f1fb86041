//! Shared helpers: locating built handlers and assembling hostile components
//! from WebAssembly text at test time.

use std::path::PathBuf;

/// Path of a handler component built by `scripts/build-guests.sh`.
/// Missing handlers are a hard failure with a clear message, never a skip.
pub fn handler_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("ORDO_HANDLERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/handlers"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "handler component {} is missing: run `scripts/build-guests.sh` first \
         (the README test command does it)",
        path.display()
    );
    path
}

/// The bytes of a built handler component.
pub fn handler_bytes(name: &str) -> Vec<u8> {
    let path = handler_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Wraps a core module (WebAssembly text) that exports `handle` with the
/// canonical-ABI signature into an `ordo:handler/handler` component.
///
/// The core function receives the flattened `message` record (12 values) and
/// returns a pointer to the `result<_, handler-error>`; memory at address 0 is
/// zero, which encodes `ok`.
pub fn component_from_core(body: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $ret i32)
    ;; bump allocator, 8-byte aligned; grows memory when needed
    (local.set $ret (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
    (global.set $heap (i32.add (local.get $ret) (local.get 3)))
    (block $ok
      (br_if $ok (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
      (br_if $ok (i32.ne (memory.grow (i32.add (i32.shr_u (local.get 3) (i32.const 16)) (i32.const 1))) (i32.const -1)))
      unreachable)
    (local.get $ret))
  {body}
)"#
    );
    let mut module = wat::parse_str(&wat).expect("fixture wat parses");
    let mut resolve = wit_parser::Resolve::default();
    let wit_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../wit");
    let (pkg, _) = resolve.push_dir(&wit_dir).expect("wit parses");
    let world = resolve
        .select_world(&[pkg], Some("handler"))
        .expect("world handler");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("embed metadata");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("encoder takes module")
        .validate(true)
        .encode()
        .expect("component encodes")
}

/// The `handle` export's core signature (see [`component_from_core`]).
pub const HANDLE_SIG: &str =
    r#"(export "handle") (param i32 i32 i32 i32 i32 i32 i64 i32 i32 i32 i32 i32) (result i32)"#;
