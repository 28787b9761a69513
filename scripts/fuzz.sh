#!/usr/bin/env bash
# Fuzzes the signature-header parser and the event-envelope parser with cargo-fuzz
# (libFuzzer + AddressSanitizer), starting from the committed corpus in fuzz/corpus/.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 600)
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them, since no other toolchain can be installed here.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-600}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in signature_header envelope; do
    echo "== $target for ${seconds}s" >&2
    cargo fuzz run -O "$target" -- -max_total_time="$seconds" -max_len=4096 -print_final_stats=1
done
