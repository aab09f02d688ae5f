#!/usr/bin/env bash
# Runs the ring benchmarks and prints each median as records/s and as a ratio against the bare
# SPSC slot ring measured in the same run.  Usage: scripts/bench-ring.sh [criterion args...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p intergroup-benches --bench ring -- "$@"
python3 - <<'PY'
import json, pathlib
root = pathlib.Path("target/criterion")
for size in ("32B", "1024B"):
    group = root / f"ring_{size}"
    def median_ns(name, param):
        f = group / name / param / "new" / "estimates.json"
        return json.loads(f.read_text())["median"]["point_estimate"] if f.exists() else None
    base = median_ns("baseline_spsc", "threads")
    if base is None:
        continue
    print(f"\n{size} records (median of criterion samples)")
    print(f"{'benchmark':<32}{'Mrecords/s':>12}{'GB/s':>8}{'ratio':>8}")
    nbytes = int(size[:-1])
    for name, param in [("baseline_spsc", "threads"), ("single_1to1", "threads"),
                        ("single_1to1", "processes"), ("records_1to1", "threads"),
                        ("records_1to1", "processes"), ("records_2to1", "threads"),
                        ("broadcast_1to2", "threads")]:
        ns = median_ns(name, param)
        if ns is None:
            continue
        rate = 1e9 / ns
        print(f"{name + ' (' + param + ')':<32}{rate / 1e6:>12.2f}{rate * nbytes / 1e9:>8.2f}{base / ns:>8.2f}")
PY
