#!/usr/bin/env bash
# Checks that the version floors in Cargo.toml are enough: resolves every direct
# dependency to the lowest version its requirement allows (nightly cargo's
# -Z direct-minimal-versions) in a scratch clone, then type-checks everything.
#
#   scripts/minimal-versions.sh
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/crate"
cd "$work/crate"
cargo +nightly update -Z direct-minimal-versions
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$src/target/minimal-versions}" \
    cargo +nightly check --all-targets --all-features
