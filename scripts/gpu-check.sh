#!/usr/bin/env bash
# One command for a lent GPU machine (see docs/gpu.md in the team docs):
#   installs the package, prints nvidia-smi and torch's device, runs the GPU-marked tests,
#   the throughput curve at sizes that fill the card (pools generated ON the device and
#   written to local disk, never carried) and the issue's GPU targets, and writes ONE JSON
#   of results to $OUT (default ./gpu-out), plus the plot and a log.
#
#   scripts/gpu-check.sh            # on the GPU machine (must end well inside 10 minutes)
#   scripts/gpu-check.sh --dry      # same steps on the CPU at tiny sizes (tested in CI)
#
# Each step fails soft: its exit status and time are recorded and the next step runs, so
# one failing step never loses the others' results. Step time limits (seconds) can be
# scaled with GPU_CHECK_SCALE (e.g. 0.5 for a shorter lease); GPU_CHECK_STEPS=a,b,... runs
# only those steps (names: install nvidia-smi torch-device pytest-gpu target curve stream merge).
# The benchmark workers log at INFO (k-NN phases, HAC rounds): their logs come back in
# $OUT/worker-logs.txt.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DRY=0
for a in "$@"; do
  case "$a" in
    --dry) DRY=1 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $a (expected --dry)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK"
DATA=${GPU_CHECK_DATA:-$WORK/data}
PY=${PYTHON:-python3}
SCALE=${GPU_CHECK_SCALE:-1}
LOG="$OUT/gpu-check.log"
: > "$LOG"
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
export PYTHONUNBUFFERED=1

limit() { "$PY" -c "print(max(5, int($1 * $SCALE)))"; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log its output, record rc and wall.
step() {
  local name=$1 lim; lim=$(limit "$2"); shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    echo "=== [$name] skipped (GPU_CHECK_STEPS=$GPU_CHECK_STEPS)" | tee -a "$LOG"; return 0
  fi
  # GPU_CHECK_FAIL_STEP=NAME makes that step fail (the dry-mode test proves the others survive).
  [ "${GPU_CHECK_FAIL_STEP:-}" = "$name" ] && set -- bash -c "echo 'forced failure (GPU_CHECK_FAIL_STEP)'; exit 3"
  echo "=== [$name] (limit ${lim}s) $*" | tee -a "$LOG"
  local t0; t0=$(date +%s.%N)
  timeout --kill-after=10 "$lim" "$@" >> "$LOG" 2>&1
  local rc=$?
  local t1; t1=$(date +%s.%N)
  "$PY" - "$name" "$rc" "$t0" "$t1" "$lim" >> "$STEPS" <<'EOF'
import json, sys
name, rc, t0, t1, lim = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(json.dumps({"step": name, "rc": rc, "ok": rc == 0, "wall_s": round(t1 - t0, 2), "limit_s": lim,
                  "timed_out": rc in (124, 137)}))
EOF
  echo "=== [$name] rc=$rc" | tee -a "$LOG"
  collect_logs
  assemble
  return 0
}

# The workers' logs (k-NN phases, HAC rounds, tracebacks), one file.
collect_logs() {
  for f in "$DATA"/runs/*/*.log; do [ -f "$f" ] && { echo "##### $f"; tail -c 200000 "$f"; }; done > "$OUT/worker-logs.txt" 2>/dev/null
}

if [ "$DRY" = 1 ]; then
  # The CPU stands in for the card: same steps, tiny sizes, nothing installed.
  DEVICE=cpu
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  CURVE_ARGS=(--sizes 1500 --graph-max 1500 --d 32 --dtype float16 --classes 20 --recall-queries 100 --matmul-n 256 --no-warmup)
  STREAM_ARGS=(--sizes 3000 --graph-max 0 --d 32 --dtype float16 --classes 20 --matmul-n 256 --no-warmup)
  TARGET_ARGS=(--sizes 2000 --d 32 --dtype float16 --k 8 --classes 20 --budget 100 --recall-queries 100 --matmul-n 256 --no-warmup)
  L_INSTALL=30; L_TESTS=120; L_CURVE=120; L_STREAM=120; L_TARGET=120
else
  DEVICE=cuda
  # Pools that fill the card: 1M and 10M for k-NN + HAC, 100M rows for the streaming stages
  # (open, margin scoring, sampling). float16 d=128: the 100M pool is 25.6 GB on local disk.
  STREAM_ARGS=(--sizes 100000000 --graph-max 0 --d 128 --dtype float16 --classes 100
               --total-cap 100 --ours-cap 90 --matmul-n 8192)
  CURVE_ARGS=(--sizes 100000,1000000,10000000 --graph-max 10000000 --d 128 --dtype float16 --classes 100
              --total-cap 190 --ours-cap 150 --recall-queries 300 --matmul-n 8192)
  # The issue's GPU target: 10M x 256 float16, k=32, 1000 classes, 1M picked, from cold files,
  # plus the cached-cluster cycle (scoring + selection only).
  TARGET_ARGS=(--sizes 10000000 --graph-max 10000000 --d 256 --dtype float16 --k 32 --classes 1000 --budget 1000000
               --total-cap 225 --ours-cap 215 --recall-queries 300 --matmul-n 8192)
  L_INSTALL=45; L_TESTS=60; L_CURVE=200; L_STREAM=110; L_TARGET=235
fi

# One JSON for everything, rewritten after each step (a call cut short keeps what finished).
assemble() {
"$PY" - "$WORK" "$OUT/gpu-check.json" "$DRY" "${1:-quiet}" <<'EOF'
import json, os, platform, sys, time, xml.etree.ElementTree as ET
work, dest, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
final = sys.argv[4] == "final"
def load(name):
    p = os.path.join(work, name)
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:
        return {"missing": f"{name}: {type(e).__name__}: {e}"}
out = {"check": "gpu-check", "dry": dry, "complete": final, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "host": platform.node(), "steps": [json.loads(l) for l in open(os.path.join(work, "steps.jsonl")) if l.strip()],
       "torch": load("torch.json")}
try:
    out["nvidia_smi"] = open(os.path.join(work, "nvidia-smi.txt")).read()[-4000:]
except OSError:
    out["nvidia_smi"] = None
try:
    r = ET.parse(os.path.join(work, "pytest-gpu.xml")).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    out["pytest_gpu"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["pytest_gpu"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase")
                                   if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:
    out["pytest_gpu"] = {"missing": f"{type(e).__name__}: {e}"}
out["target"] = load("throughput_gpu_target.json")
out["curve"] = load("throughput_gpu_curve.json")
if "missing" in out["curve"]:  # the merge failed: keep the parts
    out["curve"] = load("throughput_gpu.json")
    out["stream"] = load("throughput_gpu_stream.json")
out["targets"] = {**(out["target"].get("targets") or {}), **(out["curve"].get("targets") or {})}
out["ok"] = all(s["ok"] for s in out["steps"])
tmp = dest + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
os.replace(tmp, dest)
if sys.argv[4] == "final":
  print(json.dumps({"ok": out["ok"], "steps": [(s["step"], s["rc"], s["wall_s"]) for s in out["steps"]],
                  "targets": out["targets"]}, indent=1))
EOF
}

# ---- 1. install (editable, no dependencies: the machine has torch, numpy, scipy, sklearn)
if [ "$DRY" = 1 ]; then
  step install "$L_INSTALL" "$PY" -c "import cm_engine, sys; print('cm_engine from', cm_engine.__file__)"
else
  step install "$L_INSTALL" bash -c "'$PY' -m pip install -q --no-deps --no-build-isolation -e . || { echo 'pip install failed; using PYTHONPATH'; exit 1; }"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- 2. the card
if command -v nvidia-smi >/dev/null 2>&1; then
  step nvidia-smi 30 bash -c "nvidia-smi | tee '$WORK/nvidia-smi.txt'"
else
  echo "nvidia-smi: not found" > "$WORK/nvidia-smi.txt"
  step nvidia-smi 10 bash -c "echo 'nvidia-smi not found (dry run: $DRY)'; [ $DRY = 1 ]"
fi
step torch-device 60 "$PY" -c "
import json, torch
d = {'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),
     'device_name': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none',
     'cuda': torch.version.cuda}
print(json.dumps(d)); open('$WORK/torch.json', 'w').write(json.dumps(d))
raise SystemExit(0 if (d['cuda_available'] or $DRY) else 1)"

# ---- 3. GPU-marked tests (they skip without CUDA: in --dry they only prove collection works)
# pytest exits 5 when no test is selected: that is not a failure of the check.
step pytest-gpu "$L_TESTS" bash -c "'$PY' -m pytest -m gpu -q -p no:cacheprovider --junitxml='$WORK/pytest-gpu.xml' tests;
  rc=\$?; if [ \$rc = 5 ]; then echo 'no GPU-marked tests selected'; exit 0; fi; exit \$rc"

# ---- 4. the issue's GPU targets, first: they matter most if the lease runs short
step target "$L_TARGET" "$PY" benchmarks/throughput.py "${TARGET_ARGS[@]}" --device "$DEVICE" \
  --generate-on "$DEVICE" --logits-on device --drop-cache --cycle --peers "" --tag gpu_target --log-level INFO \
  --data-dir "$DATA" --out-dir "$WORK" --no-plot

# ---- 5. throughput curve at card-filling sizes, k-NN + HAC (no peers: FAISS is not installed there)
step curve "$L_CURVE" "$PY" benchmarks/throughput.py "${CURVE_ARGS[@]}" --device "$DEVICE" \
  --generate-on "$DEVICE" --logits-on device --cycle --peers "" --tag gpu --log-level INFO \
  --data-dir "$DATA" --out-dir "$WORK"

# ---- 6. the streaming stages at the largest size (pool pass, margins of on-device logits, selection)
step stream "$L_STREAM" "$PY" benchmarks/throughput.py "${STREAM_ARGS[@]}" --device "$DEVICE" \
  --generate-on "$DEVICE" --logits-on device --cycle --peers "" --tag gpu_stream --log-level INFO \
  --data-dir "$DATA" --out-dir "$WORK" --no-plot
# One curve (JSON + plot) from both steps; fails soft like the rest.
step merge 60 "$PY" benchmarks/throughput.py --merge "$WORK/throughput_gpu.json,$WORK/throughput_gpu_stream.json" \
  --tag gpu_curve --out-dir "$WORK"
cp "$WORK/throughput_gpu_curve.png" "$OUT/throughput_gpu.png" 2>/dev/null || cp "$WORK/throughput_gpu.png" "$OUT/" 2>/dev/null

# ---- 7. the final JSON (written even when steps failed)
assemble final
echo "gpu-check: wrote $OUT/gpu-check.json (log: $LOG)"
[ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || [ -n "${GPU_CHECK_WORK:-}" ] || rm -rf "$WORK"
exit 0
