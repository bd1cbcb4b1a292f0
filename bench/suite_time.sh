#!/usr/bin/env bash
# The cost of `make test` from a fresh clone of one commit: set-up seconds (`make assets`), pytest seconds, the
# test counts, the number of `accelerate launch` runs and the slowest tests. Appends one JSON line to
# bench/results/suite_time.jsonl and skips a commit already measured on this host.
#
#   bench/suite_time.sh e10306e      # before
#   bench/suite_time.sh HEAD         # after
#
# Launches are counted in the clone's own virtualenv: its accelerate `launch_command` appends a line to a log,
# so every route (the test helpers, `make -n demo`, a CLI) is counted the same way at every commit.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
commit="$(git -C "$here" rev-parse --short "${1:-HEAD}")"
results="$here/bench/results/suite_time.jsonl"
host="$(hostname)"
mkdir -p "$(dirname "$results")"
if [ -f "$results" ] && grep -q "\"commit\": \"$commit\", \"host\": \"$host\"" "$results"; then
    echo "already measured: $commit on $host"; exit 0
fi
work="$(mktemp -d /tmp/suite_time.XXXXXX)"
git clone -q "$here" "$work/repo" && git -C "$work/repo" checkout -q "$commit"
cd "$work/repo"
t0=$(date +%s)
make assets > "$work/setup.log" 2>&1
t1=$(date +%s)
launch_py="$(ls .venv/lib/python3*/site-packages/accelerate/commands/launch.py)"
python3 - "$launch_py" "$work/launches.log" <<'EOF'
import sys
path, log = sys.argv[1:]
src = open(path).read()
hook = ("def launch_command(args):\n"
        f"    open({log!r}, 'a').write('launch\\n')\n")
open(path, "w").write(src.replace("def launch_command(args):\n", hook, 1))
EOF
touch "$work/launches.log"
set +e
CI=true PYTEST_ADDOPTS="--junitxml=$work/junit.xml" make test > "$work/test.log" 2>&1
rc=$?
set -e
t2=$(date +%s)
python3 - "$work" "$commit" "$host" "$rc" "$((t1 - t0))" "$((t2 - t1))" "$results" <<'EOF'
import json, re, sys
work, commit, host, rc, setup_s, test_s, results = sys.argv[1:]
log = open(f"{work}/test.log").read()
summary = re.findall(r"=+ (.*? in ([\d.]+)s.*?) =+\s*$", log, re.M)
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1][0])} \
    if summary else {}
# every test's whole time (setup + call + teardown) from the JUnit report, summed per file
import xml.etree.ElementTree as ET
per_file = {}
try:
    for case in ET.parse(f"{work}/junit.xml").iter("testcase"):
        parts = case.get("classname", "?").split(".")  # tests.test_x, or tests.test_x.TestClass
        f = "/".join(parts[:-1] if parts[-1][:4] == "Test" else parts) + ".py"
        per_file[f] = round(per_file.get(f, 0.0) + float(case.get("time", 0)), 1)
except (OSError, ET.ParseError):
    pass
slowest = re.findall(r"^([\d.]+)s (call|setup|teardown) +(\S+)", log, re.M)[:25]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
row = {"commit": commit, "host": host, "cpu": cpu, "rc": int(rc), "setup_s": int(setup_s),
       "make_test_s": int(test_s), "pytest_s": float(summary[-1][1]) if summary else None, **counts,
       "launches": sum(1 for _ in open(f"{work}/launches.log")),
       "slowest": [f"{s}s {phase} {name}" for s, phase, name in slowest],
       "per_file_s": dict(sorted(per_file.items(), key=lambda kv: -kv[1]))}
open(results, "a").write(json.dumps(row) + "\n")
print(json.dumps(row, indent=1))
EOF
echo "logs: $work"
