#!/usr/bin/env bash
# Instructions a request costs behind each cache (callgrind, exact on a noisy machine):
# each side's routes called in one thread, no sockets, (Ir(12 000) − Ir(2 000)) / 10 000.
# Usage: benches/peers/instructions.sh [misses|hits]   (after the crate's release build)
set -euo pipefail
scenario="${1:-misses}"
here="$(cd "$(dirname "$0")" && pwd)"
bin="$here/../../target/peers/release/peer-comparison"
out="$(mktemp -d)"
count() {
    valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bin" \
        --instructions "$2" --side "$1" --scenario "$scenario" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
echo "| side ($scenario) | instructions a request | over no cache |"
echo "|---|---|---|"
base=""
for side in none ours tower-http-cache axum-response-cache http-cache-tower hitbox; do
    small="$(count "$side" 2000)"
    large="$(count "$side" 12000)"
    per=$(( (large - small) / 10000 ))
    if [ -z "$base" ]; then base=$per; echo "| $side | $per | baseline |"
    else echo "| $side | $per | +$(( per - base )) |"; fi
done
rm -rf "$out"
