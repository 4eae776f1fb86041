#!/usr/bin/env bash
# Builds every Rust handler under handlers/rust/* into target/handlers/<name>.wasm
# (WebAssembly components for wasm32-wasip2). Installs the guest toolchain when
# it is missing: the rustup target if rustup can add it, otherwise Debian's
# rustc-web (which ships the std sources) with -Zbuild-std.
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

mode="${ORDO_GUEST_TOOLCHAIN:-}"  # rustup | debian | empty = detect
if [ -n "$mode" ]; then :
elif command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  mode=rustup
elif command -v rustup >/dev/null 2>&1 && rustup target add wasm32-wasip2 >/dev/null 2>&1; then
  echo "build-guests: installed rustup target wasm32-wasip2"
  mode=rustup
elif debian_toolchain_present; then
  mode=debian
else
  echo "build-guests: rustup cannot provide wasm32-wasip2 here; installing Debian's rustc-web toolchain (std sources, wasi-libc, lld)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    rustc-web cargo-web rust-web-src rust-web-llvm wasi-libc lld >/dev/null
  if ! debian_toolchain_present; then
    echo "build-guests: FAILED: no wasm32-wasip2 toolchain (rustup target unavailable, Debian rustc-web install incomplete)" >&2
    exit 1
  fi
  mode=debian
fi

start=$(date +%s)
case "$mode" in
  rustup)
    cargo build --target wasm32-wasip2 --profile guest "${pkg_args[@]}"
    ;;
  debian)
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="-C link-self-contained=no -L native=/usr/lib/wasm32-wasi" \
      /usr/bin/cargo build -Zbuild-std=std,panic_abort --target wasm32-wasip2 \
      --profile guest "${pkg_args[@]}"
    ;;
esac

# The SDK also builds for wasm32-unknown-unknown where the toolchain has it
# (handlers themselves are wasm32-wasip2 components).
if [ "$mode" = rustup ]; then
  if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
     || rustup target add wasm32-unknown-unknown >/dev/null 2>&1; then
    cargo build --target wasm32-unknown-unknown --profile guest -p ordo-guest
    echo "build-guests: ordo-guest also builds for wasm32-unknown-unknown"
  else
    echo "build-guests: wasm32-unknown-unknown is not available from rustup here; SDK check skipped"
  fi
fi

for p in "${packages[@]}"; do
  artifact="$CARGO_TARGET_DIR/wasm32-wasip2/guest/${p//-/_}.wasm"
  if [ ! -f "$artifact" ]; then
    echo "build-guests: expected $artifact after the build" >&2
    exit 1
  fi
  if ! cmp -s "$artifact" "$out/$p.wasm"; then
    cp "$artifact" "$out/$p.wasm.tmp" && mv "$out/$p.wasm.tmp" "$out/$p.wasm"
  fi
  printf 'build-guests: %-14s %8d bytes  %s\n' "$p" "$(stat -c %s "$out/$p.wasm")" "target/handlers/$p.wasm"
done
echo "build-guests: done in $(( $(date +%s) - start ))s ($mode toolchain)"

# Handlers in other languages (C, Python, JavaScript, Zig, Go): their own
# script, which installs their toolchains when missing.
"$root/scripts/build-polyglot.sh"
