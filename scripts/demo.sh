#!/usr/bin/env bash
# The main job: builds the handlers (installing the guest toolchain if
# missing) and the host, then runs the end-to-end demo on a temporary data
# dir. Extra arguments go to `ordo demo` (see `ordo demo --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/build-guests.sh
cargo build --release -p ordo
exec target/release/ordo demo "$@"
