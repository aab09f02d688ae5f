#!/usr/bin/env bash
# The whole test suite: formatting, lints, every crate's tests, and the CLI's own contract.
# Usage: scripts/test.sh            (from anywhere in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test --workspace"
cargo test --workspace 2>&1 | tee -a "$log"

echo "== loom: ring memory orderings (bounded preemptions to fit CI time)"
RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" \
  cargo test -p intergroup-ring --test loom --release --target-dir target/loom 2>&1 | tee -a "$log"

echo "== intergroup sim contract (6 members, 3 senders, 20000 messages, 30% loss)"
cargo build --release -p intergroup-tools
bin=target/release/intergroup
for seed in 1 2 3; do
  out=$("$bin" sim --members 6 --senders 3 --messages 20000 --loss 0.3 --seed "$seed" --json)
  python3 - "$seed" "$out" <<'PY'
import json, sys
seed, out = sys.argv[1], json.loads(sys.argv[2])
need = ["seed", "members", "senders", "messages", "delivered_ok", "sent_datagrams", "retransmissions",
        "naks_sent", "naks_received_by_senders", "lost_packets", "virtual_seconds"]
missing = [k for k in need if k not in out]
assert not missing, f"seed {seed}: JSON lacks {missing}"
assert out["delivered_ok"] is True, f"seed {seed}: checker failed: {out.get('failure')}"
print(f"seed {seed}: delivered_ok, {out['lost_packets']} lost packets, {out['retransmissions']} retransmissions")
PY
done
# A failing checker must exit non-zero: a receiver cut off for good cannot get everything.
if "$bin" sim --members 3 --messages 10 --loss 0.999999 --seed 1 --max-virtual-seconds 2 --json >/dev/null 2>&1; then
  echo "intergroup sim exited 0 although its checker cannot have passed" >&2
  exit 1
fi
echo "== all tests passed"
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
