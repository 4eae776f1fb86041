#!/usr/bin/env bash
# The whole test suite, as CI runs it: builds the guest handlers (installing
# the guest toolchain if missing), checks formatting and lints, runs every
# unit and integration test against the real `ordo` binary. Installs
# Debian's chromium when missing (the status-page test loads the page in it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== guest handlers"
scripts/build-guests.sh
echo "== headless browser (status-page test)"
scripts/ensure-chromium.sh
echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== tests"
# A failing test's panic message, not a backtrace, ends its report, so the
# tail of a CI log names what failed and why.
export RUST_BACKTRACE="${ORDO_TEST_BACKTRACE:-0}"
cargo test --release -p ordo
