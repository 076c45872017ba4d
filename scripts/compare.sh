#!/usr/bin/env bash
# Runs procpool's workloads (examples/compare.rs) and Python's multiprocessing baseline
# (../shared/bench/python_baseline.py, fork context) in one go, on the same machine
# state, and prints them side by side with ratios and the targets of DESIGN.md §8.
#
#   scripts/compare.sh                 # every workload
#   scripts/compare.sh rtt_apply ...   # some (names as in the Python harness)
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${PYTHON_BASELINE:-../shared/bench/python_baseline.py}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo build --release --example compare >&2
only=""
if [ $# -gt 0 ]; then only="--only $(IFS=,; echo "$*")"; fi
# Python first, then ours, back to back.
# shellcheck disable=SC2086
python3 "$baseline" --systems py-mp-fork $only > "$out/python.jsonl"
./target/release/examples/compare "$@" > "$out/procpool.jsonl"

python3 - "$out/procpool.jsonl" "$out/python.jsonl" <<'PY'
import json, sys, platform, os, datetime

def load(path):
    rows = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            rows[(r["system"], r["workload"], r["metric"])] = r
    return rows

ours, py = load(sys.argv[1]), load(sys.argv[2])
# (workload, metric, python workload, higher is better, target text, raw reference key)
table = [
    ("rtt_apply", "median", "rtt_apply", False, "<= 2x raw pipe", ("raw", "pipe_pingpong", "median")),
    ("tiny_map[cs=12500]", "throughput", "tiny_map[cs=12500]", True, ">= 50 M/s", None),
    ("tiny_map[cs=1000]", "throughput", "tiny_map[cs=1000]", True, "", None),
    ("apply_async_100k", "throughput", "tiny_map[cs=1]", True, ">= 300 k/s", None),
    ("tiny_map[cs=1]", "throughput", "tiny_map[cs=1]", True, "", None),
    ("pool_startup", "median", "pool_startup", False, "<= 2 ms", None),
    ("large_payload", "throughput", "large_payload", True, ">= 2000 MB/s", None),
    ("queue_throughput", "throughput", "queue_throughput", True, ">= 1 M/s", None),
    ("pipe_pingpong", "median", "pipe_pingpong", False, "<= 1.5x raw pipe", ("raw", "pipe_pingpong", "median")),
    ("cpu_scaling", "speedup", "cpu_scaling", True, ">= 1.95x", None),
    ("imap_10m", "peak_rss", None, False, "< 64 MB", None),
    ("process_spawn", "median", "process_spawn", False, "", ("raw", "process_spawn", "median")),
]

def fmt(v, unit):
    if v is None:
        return "-"
    if unit in ("tasks/s", "items/s"):
        return f"{v/1e6:.2f} M/s" if v >= 1e6 else f"{v/1e3:.0f} k/s"
    return f"{v:.3g} {unit}" if unit != "x" else f"{v:.2f}x"

print(f"procpool vs Python multiprocessing (fork), {datetime.date.today()}, "
      f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}")
print()
print("| workload | procpool | Python mp (fork) | procpool / Python | raw reference | target |")
print("|---|---|---|---|---|---|")
for wl, metric, pywl, higher, target, raw in table:
    o = ours.get(("procpool", wl, metric))
    if o is None:
        continue
    p = py.get(("py-mp-fork", pywl, metric)) if pywl else None
    ov, unit = o["value"], o["unit"]
    pv = p["value"] if p else None
    if pv:
        ratio = ov / pv if higher else pv / ov
        ratio_s = f"{ratio:.2f}x {'faster' if ratio >= 1 else 'slower'}"
    else:
        ratio_s = "-"
    raw_s = "-"
    if raw and raw in ours:
        rv = ours[raw]["value"]
        raw_s = f"{fmt(rv, ours[raw]['unit'])} (procpool = {ov / rv:.2f}x)"
    print(f"| {wl} {metric} | {fmt(ov, unit)} | {fmt(pv, unit)} | {ratio_s} | {raw_s} | {target} |")
PY
