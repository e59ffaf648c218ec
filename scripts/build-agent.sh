#!/usr/bin/env bash
# Builds the in-sandbox agent (agent/, `stacyvm-agent`) as a static
# executable and puts it beside the `stacyvm` binaries in target/debug and
# target/release, where the docker provider looks for it
# (providers.docker.agent_binary overrides that).
#
# Static, so that images carry no libc for it: glibc's static runtime
# (`-C target-feature=+crt-static`). The explicit --target keeps these
# RUSTFLAGS away from the host build's artefacts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TRIPLE=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    cargo build --manifest-path "$ROOT/Cargo.toml" -p stacyvm-agent --features bin --release \
    --target "$TRIPLE" --quiet
for profile in debug release; do
    mkdir -p "$TARGET_DIR/$profile"
    install -m 0755 "$TARGET_DIR/$TRIPLE/release/stacyvm-agent" "$TARGET_DIR/$profile/stacyvm-agent"
done
