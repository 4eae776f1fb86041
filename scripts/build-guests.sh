#!/usr/bin/env bash
# Builds every Rust handler under handlers/rust/* into target/handlers/<name>.wasm:
# WebAssembly components for wasm32-unknown-unknown, linked by
# wasm-component-ld, which import ordo's interfaces and no WASI. `noop` and
# `counter` are also built for wasm32-wasip2 (target/handlers/<name>-wasip2.wasm),
# the target a handler that needs WASI uses: the sandbox benchmark and the
# conformance tests run both builds. `noop` is built once more with a 4 MiB
# initial memory (target/handlers/noop-initial-memory.wasm).
# Installs the guest toolchain when it is missing: the rustup targets if
# rustup can add them, otherwise Debian's rustc-web (which ships the std
# sources and wasm-component-ld) with -Zbuild-std.
# Incremental: a second run only rebuilds what changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/target/handlers"
mkdir -p "$out"
export CARGO_TARGET_DIR="$root/target-guest"

packages=()
for manifest in handlers/rust/*/Cargo.toml; do
  name="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n1)"
  [ -n "$name" ] && packages+=("$name")
done
if [ ${#packages[@]} -eq 0 ]; then
  echo "build-guests: no handlers found under handlers/rust" >&2
  exit 1
fi
pkg_args=()
for p in "${packages[@]}"; do pkg_args+=(-p "$p"); done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "build-guests: need root to run: $*" >&2; return 1; fi
}

debian_toolchain_present() {
  [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] && [ -d /usr/lib/wasm32-wasi ] \
    && /usr/bin/rustc --print sysroot >/dev/null 2>&1 \
    && [ -d "$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library" ]
}

rustup_targets() {
  command -v rustup >/dev/null 2>&1 || return 1
  local t
  for t in wasm32-unknown-unknown wasm32-wasip2; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$t"; then
      rustup target add "$t" >/dev/null 2>&1 || return 1
      echo "build-guests: installed rustup target $t"
    fi
  done
}

mode="${ORDO_GUEST_TOOLCHAIN:-}"  # rustup | debian | empty = detect
if [ -n "$mode" ]; then :
elif rustup_targets; then
  mode=rustup
elif debian_toolchain_present; then
  mode=debian
else
  echo "build-guests: rustup cannot provide the wasm32 targets here; installing Debian's rustc-web toolchain (std sources, wasi-libc, lld)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    rustc-web cargo-web rust-web-src rust-web-llvm wasi-libc lld >/dev/null
  if ! debian_toolchain_present; then
    echo "build-guests: FAILED: no wasm32 toolchain (rustup targets unavailable, Debian rustc-web install incomplete)" >&2
    exit 1
  fi
  mode=debian
fi

case "$mode" in
  rustup) rustc_bin=rustc ;;
  debian) rustc_bin=/usr/bin/rustc ;;
  *) echo "build-guests: ORDO_GUEST_TOOLCHAIN must be rustup or debian, not '$mode'" >&2; exit 1 ;;
esac
# wasm-component-ld ships with the toolchain (it is wasm32-wasip2's linker);
# for wasm32-unknown-unknown it is named explicitly.
host_triple="$("$rustc_bin" -vV | sed -n 's/^host: //p')"
component_ld=""
for candidate in "$("$rustc_bin" --print sysroot)/lib/rustlib/$host_triple/bin/wasm-component-ld" \
                 "$(command -v wasm-component-ld || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then component_ld="$candidate"; break; fi
done
if [ -z "$component_ld" ]; then
  echo "build-guests: FAILED: no wasm-component-ld beside $rustc_bin (it comes with the wasm32-wasip2 target)" >&2
  exit 1
fi
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$component_ld"

# The wasm32-wasip2 builds (see the header).
wasip2_packages=(noop counter)
wasip2_args=()
for p in "${wasip2_packages[@]}"; do wasip2_args+=(-p "$p"); done

# cargo build for a target, with the toolchain of $mode.
guest_build() {
  local target="$1"; shift
  case "$mode" in
    rustup) cargo build --target "$target" --profile guest "$@" ;;
    debian) RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
      /usr/bin/cargo build -Zbuild-std=std,panic_abort --target "$target" --profile guest "$@" ;;
  esac
}

start=$(date +%s)
guest_build wasm32-unknown-unknown "${pkg_args[@]}"
if [ "$mode" = debian ]; then
  RUSTFLAGS="-C link-self-contained=no -L native=/usr/lib/wasm32-wasi" \
    guest_build wasm32-wasip2 "${wasip2_args[@]}"
else
  guest_build wasm32-wasip2 "${wasip2_args[@]}"
fi
# The no-op linked with a 4 MiB initial memory, in a target dir of its own
# (other RUSTFLAGS would rebuild the rest): the runtime tests check that
# the SDK's heap serves a large message from the initial memory's tail.
initial_memory_dir="$CARGO_TARGET_DIR/initial-memory"
CARGO_TARGET_DIR="$initial_memory_dir" RUSTFLAGS="-C link-arg=--initial-memory=4194304" \
  guest_build wasm32-unknown-unknown -p noop

# Copies a build's artifact to target/handlers/<name>.wasm if it changed.
install_handler() {
  local artifact="$1" name="$2"
  if [ ! -f "$artifact" ]; then
    echo "build-guests: expected $artifact after the build" >&2
    exit 1
  fi
  if ! cmp -s "$artifact" "$out/$name.wasm"; then
    cp "$artifact" "$out/$name.wasm.tmp" && mv "$out/$name.wasm.tmp" "$out/$name.wasm"
  fi
  printf 'build-guests: %-20s %8d bytes  %s\n' "$name" "$(stat -c %s "$out/$name.wasm")" "target/handlers/$name.wasm"
}
for p in "${packages[@]}"; do
  install_handler "$CARGO_TARGET_DIR/wasm32-unknown-unknown/guest/${p//-/_}.wasm" "$p"
done
for p in "${wasip2_packages[@]}"; do
  install_handler "$CARGO_TARGET_DIR/wasm32-wasip2/guest/${p//-/_}.wasm" "$p-wasip2"
done
install_handler "$initial_memory_dir/wasm32-unknown-unknown/guest/noop.wasm" noop-initial-memory
echo "build-guests: done in $(( $(date +%s) - start ))s ($mode toolchain)"

# Handlers in other languages (C, Python, JavaScript, Zig, Go): their own
# script, which installs their toolchains when missing.
"$root/scripts/build-polyglot.sh"
