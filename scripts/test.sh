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

echo "== the secure layer with AWS-LC's AES-GCM (cargo feature aws-lc): same known answers, same attacks"
cargo test -p intergroup-secure -p intergroup-engine --features intergroup-engine/aws-lc \
  --lib --test mls --test secure 2>&1 | tee -a "$log"

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
echo "== secure layer under attack in the simulator: sealed datagrams, 10% loss, an adversary injecting 10% more"
for seed in 1 2 3; do
  out=$("$bin" sim --members 5 --senders 2 --messages 5000 --loss 0.1 --attack 0.1 --seed "$seed" --json)
  python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
assert out["delivered_ok"] and out["secure"], f"seed {out['seed']}: {out.get('failure')}"
zero = [k for k, v in out["secure_rejected"].items() if v == 0]
assert not zero, f"seed {out['seed']}: no rejection counted for {zero}"
print(f"seed {out['seed']}: delivered_ok under {out['attacks_injected']} attacks; rejected {out['secure_rejected']}")
PY
done
echo "== seed sweep: 100 seeds x 5 scenarios (small windows, heavy fragmentation, ten senders, jitter, messages framed alone)"
sweep_failures=0
for seed in $(seq 1 100); do
  for args in "--members 5 --senders 2 --messages 2000 --window 16 --loss 0.1 --reorder 0.1" \
              "--members 4 --senders 2 --messages 200 --size 1000 --mtu 200 --loss 0.2" \
              "--members 10 --senders 10 --messages 500 --loss 0.1 --dup 0.05 --reorder 0.1" \
              "--members 6 --senders 2 --messages 2000 --loss 0.05 --latency-us 1 --jitter-us 2000" \
              "--members 6 --senders 3 --messages 2000 --size 1000 --loss 0.1 --reorder 0.05"; do
    # shellcheck disable=SC2086
    if ! "$bin" sim $args --seed "$seed" --json >/dev/null; then
      echo "sweep FAILED: intergroup sim $args --seed $seed" >&2
      sweep_failures=$((sweep_failures + 1))
    fi
  done
done
if [ "$sweep_failures" -ne 0 ]; then
  echo "$sweep_failures sweep runs failed" >&2
  exit 1
fi
echo "500 sweep runs: all delivered_ok"

# A failing checker must exit non-zero: a receiver cut off for good cannot get everything.
if "$bin" sim --members 3 --messages 10 --loss 0.999999 --seed 1 --max-virtual-seconds 2 --json >/dev/null 2>&1; then
  echo "intergroup sim exited 0 although its checker cannot have passed" >&2
  exit 1
fi
echo "== group layer contract: intergroup sim --members 7 --senders 3 --order total --crash 2 --partition 1 --loss 0.1"
for seed in 1 2 3; do
  out=$("$bin" sim --members 7 --senders 3 --order total --crash 2 --partition 1 --loss 0.1 --seed "$seed" --json)
  python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
need = ["delivered_ok", "virtual_synchrony_ok", "views_installed", "order"]
missing = [k for k in need if k not in out]
assert not missing, f"group sim JSON lacks {missing}"
assert out["delivered_ok"] and out["virtual_synchrony_ok"] and out["order"] == "total", out
print(f"seed {out['seed']}: {out['views_installed']} primary views, {out['delivered_messages']} total-order deliveries, delivered_ok and virtual_synchrony_ok")
PY
done
echo "== secured group layer: MLS commit per view change, crash + join + leave, self-updates every 300 ms, 10% loss"
for seed in 1 2 3; do
  out=$("$bin" sim --secure --key-update-ms 300 --members 7 --senders 3 --order safe --crash 1 --join 1 --leave 1 --loss 0.1 --seed "$seed" --json)
  python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
need = ["keys_ok", "key_epoch", "key_commits", "self_updates", "departed_locked_out", "secure_rejected"]
missing = [k for k in need if k not in out]
assert not missing, f"secured group sim JSON lacks {missing}"
assert out["delivered_ok"] and out["virtual_synchrony_ok"] and out["keys_ok"], out
assert out["departed_locked_out"] is True, out
assert sum(out["self_updates"]) > 0, out
print(f"seed {out['seed']}: MLS epoch {out['key_epoch']}, {out['key_commits']} coordinator commits, {sum(out['self_updates'])} self-updates, departed members locked out")
PY
done
out=$("$bin" bench order --senders 3 --size 64 --duration 0.5 --json)
python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
need = ["msgs_per_sec", "ratio_to_fifo", "p50", "p90", "p99", "p999", "max", "fifo", "ordered"]
missing = [k for k in need if k not in out]
assert not missing, f"bench order JSON lacks {missing}"
assert out["msgs_per_sec"] > 0 and out["fifo"]["msgs_per_sec"] > 0, out
print(f"bench order: total {out['msgs_per_sec']:.0f} msgs/s at every member, ratio_to_fifo {out['ratio_to_fifo']}")
PY
echo "== intergroup bench contract (raw-udp and udp on both backends over loopback, short runs; speed is not judged here)"
core=$(python3 -c 'import os; print(min(os.sched_getaffinity(0)))')
out=$("$bin" bench raw-udp --subscribers 2 --size 1024 --duration 0.3 --sender-core "$core" --json)
python3 - "$out" "$core" <<'PY'
import json, sys
out, core = json.loads(sys.argv[1]), int(sys.argv[2])
need = ["msgs_per_sec", "mb_per_sec", "lost", "retransmissions", "p50", "p90", "p99", "p999", "max", "ceiling", "paths"]
missing = [k for k in need if k not in out]
assert not missing, f"bench raw-udp JSON lacks {missing}"
assert len(out["paths"]) == 5, out["paths"]
# Every path's sender and receivers spent CPU on the datagrams they moved (ns per datagram).
for p in out["paths"]:
    for side in ("sender", "receiver"):
        c = p["cpu_ns_per_msg"][side]
        assert c["user"] >= 0 and c["system"] >= 0 and c["user"] + c["system"] > 0, (p["path"], side, c)
    # The host's shares while the path ran: percentages (this host has /proc/stat).
    h = p["host_cpu"]
    assert 0 <= h["steal_pct"] <= 100 and 0 <= h["idle_pct"] <= 100, (p["path"], h)
    assert p["sender_core"] == core, (p["path"], p["sender_core"])
print(f"raw-udp: ceiling {out['ceiling']}, {out['msgs_per_sec']:.0f} datagrams/s per receiver")
PY
if "$bin" bench raw-udp --duration 0.1 --sender-core 100000 --json >/dev/null 2>/tmp/intergroup-core.err; then
  echo "bench raw-udp accepted a core this process may not use" >&2; exit 1
fi
grep -q "core 100000 is not one this process may run on" /tmp/intergroup-core.err
for backend in io-uring portable; do
  # The portable run also sets the loss-recovery timings (they reach the subscriber children):
  # the slower ones of the engine before 2026-11-28, and pins nothing.
  recovery=()
  if [ "$backend" = portable ]; then
    recovery=(--nak-backoff-us 250 --nak-retry-us 500 --retransmit-linger-us 300 --no-pin)
  fi
  out=$("$bin" bench udp --subscribers 2 --size 1024 --duration 1 --raw-duration 0.2 --loss 0.05 --backend "$backend" "${recovery[@]}" --json)
  python3 - "$backend" "$out" <<'PY'
import json, os, sys
backend, out = sys.argv[1], json.loads(sys.argv[2])
need = ["msgs_per_sec", "mb_per_sec", "lost", "retransmissions", "p50", "p90", "p99", "p999", "max", "ratio_to_raw",
        "raw_msgs_per_sec", "raw_msgs_per_sec_before", "raw_msgs_per_sec_after", "raw_msgs_per_sec_pinned",
        "publisher_core"]
missing = [k for k in need if k not in out]
assert not missing, f"bench udp JSON lacks {missing}"
# By default the publishing side is pinned to the first core this process may use, when it may
# use two or more; --no-pin (the portable run) pins nothing.
cores = sorted(os.sched_getaffinity(0))
expected = cores[0] if backend == "io-uring" and len(cores) >= 2 else None
assert out["publisher_core"] == expected, (out["publisher_core"], cores)
# The ceiling is the highest of the best path's rate before and after the engine, and, with
# the publisher pinned, of the same path with its sender pinned there.
assert (out["raw_msgs_per_sec_pinned"] is None) == (expected is None), out
rates = [out["raw_msgs_per_sec_before"], out["raw_msgs_per_sec_after"], out["raw_msgs_per_sec_pinned"] or 0]
assert out["raw_msgs_per_sec"] == max(rates) > 0, out
assert out["backend"] == backend, out["backend"]
assert out["lost"] == 0 and out["complete"], f"bench udp lost messages: {out}"
# The engine's default publication window, reported as run.
assert out["publication_window"] == 1 << 20 and out["ring_bytes"] == 16 << 20, out
assert out["retransmissions"] > 0, "5% loss was injected but nothing was retransmitted"
cpu = out["cpu_ns_per_msg"]
for who in ("publisher_app", "publisher_worker", "subscriber"):
    assert cpu[who]["user"] >= 0 and cpu[who]["system"] >= 0, (who, cpu)
# The worker and each subscriber do the protocol's work: neither can be free.
assert cpu["publisher_worker"]["user"] + cpu["publisher_worker"]["system"] > 0, cpu
assert all(p["cpu_ns_per_msg"]["user"] + p["cpu_ns_per_msg"]["system"] > 0 for p in out["per_subscriber"]), out["per_subscriber"]
for phase in ["host_cpu", "raw_host_cpu_before", "raw_host_cpu_after"] + (["raw_host_cpu_pinned"] if expected is not None else []):
    h = out[phase]
    assert 0 <= h["steal_pct"] <= 100 and 0 <= h["idle_pct"] <= 100, (phase, h)
print(f"udp {backend}: lost 0, {out['msgs_per_sec']:.0f} msgs/s, ratio_to_raw {out['ratio_to_raw']}")
PY
done
for mode in worker invoker; do
  flags=()
  if [ "$mode" = invoker ]; then flags=(--invoker); fi
  out=$("$bin" bench udp --pingpong "${flags[@]}" --duration 0.3 --json)
  python3 - "$mode" "$out" <<'PY'
import json, sys
mode, out = sys.argv[1], json.loads(sys.argv[2])
need = ["msgs_per_sec", "p50", "p90", "p99", "p999", "max", "paths"]
missing = [k for k in need if k not in out]
assert not missing, f"bench udp --pingpong JSON lacks {missing}"
assert out["pingpong"] and out["round_trip"], out
raw = [p for p in out["paths"] if p["path"].startswith("raw ")]
engine = [p for p in out["paths"] if p["path"].startswith("engine ")]
assert len(raw) == 3 and len(engine) == 2, out["paths"]
# The default mode and the busy-poll mode, both in invoker mode when asked for.
assert engine[1]["path"].endswith("busy-poll") and not engine[0]["path"].endswith("busy-poll"), engine
assert all(("invoker" in p["path"]) == (mode == "invoker") for p in engine), engine
for p in raw + engine:
    assert p["msgs_per_sec"] > 0 and 0 < p["p50"] <= p["p99"] <= p["max"], p
assert all(p["timeouts"] == 0 for p in engine), engine
print(f"pingpong ({mode}): engine p50 {engine[0]['p50']} us, busy-poll {engine[1]['p50']} us")
PY
done
out=$("$bin" bench udp --secure --subscribers 2 --size 1024 --duration 1 --raw-duration 0.2 --aead-duration 0.2 --loss 0.05 --json)
python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
need = ["msgs_per_sec", "mb_per_sec", "lost", "retransmissions", "p50", "p99", "ratio_to_raw",
        "ratio_to_plain", "ratio_to_aead", "aead_mb_per_sec", "plain_mb_per_sec", "publisher_secure"]
missing = [k for k in need if k not in out]
assert not missing, f"bench udp --secure JSON lacks {missing}"
assert out["lost"] == 0 and out["plain_lost"] == 0 and out["complete"], f"secure bench lost messages: {out}"
for s in [out["publisher_secure"]] + [p["secure"] for p in out["per_subscriber"]]:
    assert s["sealed"] > 0 and s["opened"] > 0 and sum(s["rejected"].values()) == 0, s
print(f"udp --secure: lost 0, {out['msgs_per_sec']:.0f} msgs/s, ratio_to_plain {out['ratio_to_plain']}, ratio_to_aead {out['ratio_to_aead']} ({out['aead_backend']})")
PY
for tree in full degraded; do
  out=$("$bin" bench rekey --members 10 --rounds 3 --tree "$tree" --json)
  python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
for step in ("remove", "add", "update"):
    need = ["commit_ms", "process_ms", "epoch_ms", "commit_bytes"]
    missing = [k for k in need if k not in out[step]]
    assert not missing, f"bench rekey {step} lacks {missing}"
    assert out[step]["commit_bytes"] > 0, out
assert out["add"]["welcome_bytes"] > 0 and out["members"] == 10, out
print(f"rekey ({out['tree']} tree, 10 members): remove {out['remove']['epoch_ms']} ms, {out['remove']['commit_bytes']:.0f} B")
PY
done
out=$("$bin" bench ipc --size 32 --duration 0.5 --json)
python3 - "$out" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
need = ["msgs_per_sec", "mb_per_sec", "lost", "p50", "p90", "p99", "p999", "max", "ring_baseline_msgs_per_sec", "ratio_to_ring"]
missing = [k for k in need if k not in out]
assert not missing, f"bench ipc JSON lacks {missing}"
assert out["lost"] == 0 and out["out_of_order"] == 0 and out["messages"] > 0, out
print(f"ipc: {out['msgs_per_sec']:.0f} msgs/s, ratio_to_ring {out['ratio_to_ring']}")
PY
echo "== engine daemon contract: engine, then pub and sub as separate processes, then stat"
dir=$(mktemp -d /dev/shm/ig-test-XXXXXX)
printf '[network]\nport = %d\n' $((47000 + $$ % 1000)) > "$dir.toml"
"$bin" engine --dir "$dir" --config "$dir.toml" 2>/dev/null &
engine_pid=$!
for _ in $(seq 100); do [ -e "$dir/cnc" ] && break; sleep 0.05; done
"$bin" sub --dir "$dir" --group demo --count 100000 --format jsonl > "$dir.out" &
sub_pid=$!
seq 1 100000 | "$bin" pub --dir "$dir" --group demo 2>/dev/null
wait "$sub_pid"
sleep 0.3
stat=$("$bin" stat --dir "$dir" --once --json)
kill -TERM "$engine_pid"
wait "$engine_pid"
python3 - "$dir.out" "$stat" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
msgs = [l for l in lines if "event" not in l]
assert [m["payload"] for m in msgs] == [str(i) for i in range(1, 100001)], "every line once, in order"
assert all(k in msgs[0] for k in ("sender", "seq", "view", "payload")), msgs[0]
c = json.loads(sys.argv[2])["counters"]
assert c["messages_published"] == 100000 and c["messages_received"] == 100000, c
print("daemon: 100000 lines once and in order; stat messages_published = messages_received = 100000")
PY
rm -rf "$dir" "$dir.toml" "$dir.out"
echo "== all tests passed"
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
