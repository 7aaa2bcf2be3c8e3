#!/usr/bin/env bash
# fastscore on a CUDA machine in one run: the environment, the CUDA build of fastscore._C, the tests, every
# fused op on CUDA tensors against the float64 reference (cuda and triton backends), compute-sanitizer
# (memcheck on every kernel, racecheck on those with shared memory) and each op's achieved bandwidth.
#
#     bash bench/gpu_check.sh [--dry-run]        # from anywhere; it works in the repository root
#
# Every step runs under its own time limit inside an overall budget (GPU_CHECK_BUDGET seconds, default 450,
# so the whole run ends within 8 minutes); a failing step does not stop the ones after it. Everything goes
# to ONE results file: each step's status, time, command and the tail of its output, then a summary.
#   results: $GPU_CHECK_RESULTS, else $OUT/gpu_check.txt where OUT is set, else ./gpu_check_results.txt
#   exit status: 0 when every step passed (GPU steps skipped in a dry run count as passed), 1 otherwise
#
# --dry-run (and automatically when torch sees no CUDA device, where it then also exits 1): runs each step
# as far as it goes without a GPU -- the environment report, `fastscore info`, the pytest steps, the
# drivers up to the point where they need CUDA, and their CPU self-tests -- builds and installs nothing,
# and records the GPU steps as "skipped: no CUDA device". Run it with fastscore already installed.
#
# Settings (environment): PYTHON (default python3; a path without spaces), GPU_CHECK_BUDGET,
# GPU_CHECK_SKIP_BUILD=1 (keep a fastscore._C that already has CUDA kernels: a rerun on the same machine).
# Needs no network: the build uses the installed torch (--no-build-isolation) and fetches nothing.

set -u

DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

START_DIR=$(pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
if [ -n "${GPU_CHECK_RESULTS:-}" ]; then
    RESULTS=$GPU_CHECK_RESULTS
elif [ -n "${OUT:-}" ]; then
    RESULTS=$OUT/gpu_check.txt
else
    RESULTS=$START_DIR/gpu_check_results.txt
fi
mkdir -p "$(dirname "$RESULTS")" && : > "$RESULTS" || exit 2

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
NPROC=$(nproc 2>/dev/null || echo 4)
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$LOGDIR"' EXIT

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_NO_INPUT=1
# A backend forced from the environment would override the drivers' use_backend choices.
unset FASTSCORE_BACKEND
# Tools installed beside the interpreter (ninja for the build) come first on PATH.
PATH=$(dirname "$(command -v "$PYTHON" || echo /usr/bin/python3)"):$PATH
export PATH

HAVE_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null | tail -n 1)
NO_GPU_FAIL=0
if [ "$HAVE_CUDA" != 1 ]; then
    HAVE_CUDA=0
    if [ "$DRY" = 0 ]; then
        NO_GPU_FAIL=1  # a GPU run was asked for: a machine without one fails it, after the dry run's checks
    fi
    DRY=1
else
    # Triton's interpreter runs kernels on the CPU: on a GPU machine the triton backend must be the real one.
    unset TRITON_INTERPRET
fi
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # a dry run asked for on a GPU machine does no GPU work either
fi

# ---- steps ----------------------------------------------------------------------------------------
# A step's files: $LOGDIR/NAME.cmd (its command), .limit (seconds), .log (stdout and stderr), .rc ("RC SECS";
# RC -1: not run for lack of time), .pid (a background step).

NSTEP=0
FAILED=0
SUMMARY=""

timed() {  # timed NAME LIMIT 'COMMAND'
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$2" bash -c "$3" < /dev/null > "$LOGDIR/$1.log" 2>&1
    rc=$?
    echo "$rc $(($(date +%s) - t0))" > "$LOGDIR/$1.rc"
}

# start NAME CAP 'COMMAND' [bg]: runs COMMAND (bash -c, in the repository root) under min(CAP, time left);
# with "bg" in the background (for steps that can share the machine), collected by finish.
start() {
    local name=$1 cap=$2 cmd=$3 mode=${4:-fg} limit
    printf '%s\n' "$cmd" > "$LOGDIR/$name.cmd"
    limit=$((DEADLINE - $(date +%s)))
    if [ "$cap" -lt "$limit" ]; then limit=$cap; fi
    echo "$limit" > "$LOGDIR/$name.limit"
    if [ "$limit" -lt 10 ]; then
        echo "(not run: the time budget of ${BUDGET} s was spent)" > "$LOGDIR/$name.log"
        echo "-1 0" > "$LOGDIR/$name.rc"
        return
    fi
    echo "-- $name: started, limit ${limit} s"
    if [ "$mode" = bg ]; then
        timed "$name" "$limit" "$cmd" &
        echo $! > "$LOGDIR/$name.pid"
    else
        timed "$name" "$limit" "$cmd"
    fi
}

# finish NAME 'OK_CODES' [SKIP_CODE]: waits for the step and sets RC, SECS and STATUS. SKIP_CODE is the
# drivers' "no CUDA device" exit (3): a skip in a dry run, a failure otherwise.
finish() {
    local name=$1 ok=$2 skip=${3:-} limit c
    if [ -f "$LOGDIR/$name.pid" ]; then wait "$(cat "$LOGDIR/$name.pid")"; fi
    read -r RC SECS < "$LOGDIR/$name.rc"
    limit=$(cat "$LOGDIR/$name.limit")
    STATUS="FAILED (exit $RC)"
    if [ "$RC" = -1 ]; then STATUS="FAILED (not run: out of time)"; return; fi
    if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then STATUS="FAILED (timed out after ${limit} s)"; return; fi
    for c in $ok; do
        if [ "$RC" = "$c" ]; then STATUS="ok"; fi
    done
    if [ -n "$skip" ] && [ "$RC" = "$skip" ] && [ "$DRY" = 1 ]; then STATUS="skipped: no CUDA device"; fi
}

# record NAME [TAIL_LINES] [KEY_REGEX]: appends the step's status, command and output tail to the results.
# KEY_REGEX: lines shown first, from the whole output (failures that the tail would cut off).
record() {
    local name=$1 tail_lines=${2:-40} key=${3:-} log=$LOGDIR/$1.log
    NSTEP=$((NSTEP + 1))
    case $STATUS in FAILED*) FAILED=$((FAILED + 1)) ;; esac
    SUMMARY="$SUMMARY$(printf '%-24s %-44s %4s s' "$name" "$STATUS" "$SECS")
"
    {
        echo
        echo "==== [$NSTEP] $name: $STATUS (${SECS} s)"
        sed 's/^/$ /' "$LOGDIR/$name.cmd"
        if [ -n "$key" ] && grep -Eq "$key" "$log"; then
            echo "-- key lines (the first 60):"
            grep -E "$key" "$log" | head -n 60
            echo "-- output (the last $tail_lines lines):"
        fi
        tail -n "$tail_lines" "$log"
    } >> "$RESULTS"
    echo "== $name: $STATUS (${SECS} s)"
}

# skip NAME REASON [COMMAND] / not_run NAME REASON: a step that cannot run here, as a skip or as a failure.
skip() {
    printf '%s\n' "${3:-(not run)}" > "$LOGDIR/$1.cmd"
    : > "$LOGDIR/$1.log"
    STATUS="skipped: $2"; SECS=0
    record "$1"
}
not_run() {
    printf '(not run)\n' > "$LOGDIR/$1.cmd"
    : > "$LOGDIR/$1.log"
    STATUS="FAILED (not run: $2)"; SECS=0
    record "$1"
}

{
    echo "fastscore gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
    echo "repository: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
    echo "python: $PYTHON; budget ${BUDGET} s; $NPROC CPUs"
    if [ "$NO_GPU_FAIL" = 1 ]; then
        echo "mode: DRY RUN: torch sees no CUDA device (which fails this run)"
    elif [ "$DRY" = 1 ]; then
        echo "mode: DRY RUN (asked for): no GPU work"
    else
        echo "mode: GPU"
    fi
} | tee -a "$RESULTS"

# ---- 1. environment -------------------------------------------------------------------------------

cat > "$LOGDIR/env.py" <<'EOF'
import platform
import sys

print("python", sys.version.replace("\n", " "), "|", platform.platform())
import torch

print("torch", torch.__version__, "| torch.version.cuda", torch.version.cuda, "| CUDA available", torch.cuda.is_available())
try:
    import triton

    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 20} MiB")
EOF
start environment 60 "nvidia-smi || echo 'nvidia-smi: not found'
echo; $PYTHON $LOGDIR/env.py
echo; nvcc --version || echo 'nvcc: not found'
echo; echo \"compute-sanitizer: \$(command -v compute-sanitizer || echo 'not found')\"
compute-sanitizer --version 2>/dev/null | tail -n 2
echo \"TRITON_INTERPRET=\${TRITON_INTERPRET:-(unset)}; ninja: \$(command -v ninja || echo 'not found')\"
$PYTHON -m pip --version"
finish environment "0"
record environment 60

# ---- 2. build, and beside it Triton's cache filled ------------------------------------------------
# Triton compiles each kernel specialisation at its first call, a second or so each, one after another:
# well over a minute for the parity run's cases. Those compilations need neither fastscore._C nor the
# install, so they run on the GPU while nvcc and g++ run on the CPUs, through a link that makes kernels/
# importable as fastscore._triton (its name once installed, so the cache entries are the ones used later).

ARCH="TORCH_CUDA_ARCH_LIST=<the GPU's capability> "
if [ "$DRY" = 0 ]; then
    # Only the present GPU's architecture: a fraction of the nvcc time of a list of several. (Without it,
    # torch's build also targets the GPUs it sees.)
    ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null | tail -n 1)
    case $ARCH in
        [0-9]*.[0-9]*) ARCH="TORCH_CUDA_ARCH_LIST=$ARCH " ;;
        *) ARCH="" ;;
    esac
fi
BUILD="FASTSCORE_CUDA=1 MAX_JOBS=$NPROC ${ARCH}$PYTHON -m pip install --no-index --no-build-isolation --no-deps -v -e ."
HAS_CUDA_KERNELS="import sys, fastscore; sys.exit(0 if fastscore.backends()['cuda']['available'] else 1)"

mkdir -p "$LOGDIR/shim" && ln -s "$REPO/kernels" "$LOGDIR/shim/_triton"
cat > "$LOGDIR/prewarm.py" <<'EOF'
# prewarm.py REPO SHIM SCRIPT ARGS...: runs a bench/ driver with fastscore imported from the source tree and
# fastscore._triton found through SHIM/_triton (a link to REPO/kernels), before fastscore is installed.
import os
import runpy
import sys

repo, shim, script = sys.argv[1:4]
sys.path[:0] = [repo, os.path.join(repo, "bench")]
import fastscore

fastscore.__path__.append(shim)
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
EOF
PREWARM="$PYTHON $LOGDIR/prewarm.py $REPO $LOGDIR/shim"
PREWARM_CMD="$PREWARM bench/gpu_sanitize.py --backends triton; a=\$?
[ \$a = 3 ] && exit 3
$PREWARM bench/gpu_bandwidth.py --backends triton --warm; b=\$?
[ \$a = 0 ] && exit \$b; exit \$a"

# prewarm_record: filling the cache only saves time (the later steps compile what it missed): a note.
prewarm_record() {
    case $STATUS in FAILED*) STATUS="note: ${STATUS#FAILED } (the later steps compile for themselves)" ;; esac
    record triton-prewarm 15 "^FAIL"
}

if [ "$DRY" = 1 ]; then
    skip build "no CUDA device (a dry run builds nothing)" "$BUILD"
    start triton-prewarm 60 "$PREWARM_CMD"  # how far it gets: the link and the imports, then exit 3
    finish triton-prewarm "0" 3
    prewarm_record
elif [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ] && "$PYTHON" -c "$HAS_CUDA_KERNELS" > /dev/null 2>&1; then
    skip build "GPU_CHECK_SKIP_BUILD=1 and fastscore._C has CUDA kernels"
else
    start triton-prewarm 240 "$PREWARM_CMD" bg
    start build 300 "$BUILD && ls -l fastscore/_C*.so"
    finish build "0"
    record build 40 "error:|Error:|ERROR|FAILED:"
    finish triton-prewarm "0"
    prewarm_record
fi

# ---- 3. backends ----------------------------------------------------------------------------------

cat > "$LOGDIR/backends.py" <<'EOF'
import json
import sys

import torch

import fastscore

report = fastscore.backends()
print("fastscore.backends():", json.dumps(report, indent=1))
if not torch.cuda.is_available():
    print("no CUDA device: the cuda and triton backends cannot run here")
    sys.exit(3)
missing = [name for name in ("cuda", "triton") if "cuda" not in report[name]["devices"]]
if missing:
    print("NOT available on CUDA tensors:", "; ".join(f"{n} ({report[n]['reason']})" for n in missing))
    sys.exit(1)
print("cuda and triton: both available on CUDA tensors")
EOF
start backends 60 "$PYTHON -m fastscore.cli info && $PYTHON $LOGDIR/backends.py"
finish backends "0" 3
record backends 50

# ---- 4. tests (CPU work: in the background, beside step 5) -----------------------------------------
# The op tests run every backend on CPU tensors only (the triton backend in its interpreter, which a GPU
# machine does not use). Nothing in tests/ carries the gpu marker yet (pytest exit 5: no test selected):
# the first step runs such tests if they appear. The backend and CLI tests check what fastscore reports
# with a GPU present. The fused backends on CUDA tensors are step 5's.

start pytest-gpu-marker 90 "$PYTHON -m pytest -q -p no:cacheprovider -m gpu tests" bg
start pytest-backend-cli 120 "$PYTHON -m pytest -q -p no:cacheprovider -m 'not slow and not compile' tests/test_backend.py tests/test_cli.py" bg

# ---- 5. every op on CUDA tensors against the float64 reference ------------------------------------
# Both backends in float32 and float16, then the CUDA kernels' other two dtypes (Triton would compile its
# kernels again for them: the time goes to the sanitizers instead).

start parity 180 "$PYTHON bench/gpu_sanitize.py --check; a=\$?
[ \$a = 3 ] && exit 3
$PYTHON bench/gpu_sanitize.py --check --backends cuda --dtypes bfloat16,float64; b=\$?
[ \$a = 0 ] && exit \$b; exit \$a"
finish parity "0" 3
record parity 80 "^FAIL"
if [ "$DRY" = 1 ]; then
    # The same driver on CPU tensors (the cpp backend): its cases and reference checks, end to end.
    start parity-cpu-selftest 150 "$PYTHON bench/gpu_sanitize.py --check --device cpu --backends cpp"
    finish parity-cpu-selftest "0"
    record parity-cpu-selftest 25 "^FAIL"
fi

finish pytest-gpu-marker "0 5"
if [ "$RC" = 5 ]; then STATUS="ok (no test carries the gpu marker)"; fi
record pytest-gpu-marker 15
finish pytest-backend-cli "0"
record pytest-backend-cli 25 "^(FAILED|ERROR)"

# ---- 6. bandwidth (alone on the machine) ----------------------------------------------------------

start bandwidth 150 "$PYTHON bench/gpu_bandwidth.py"
finish bandwidth "0" 3
record bandwidth 220 "^(FAIL|note:)"
if [ "$DRY" = 1 ]; then
    start bandwidth-cpu-selftest 120 "$PYTHON bench/gpu_bandwidth.py --device cpu --quick --trials 1 --ops elu,langevin"
    finish bandwidth-cpu-selftest "0"
    record bandwidth-cpu-selftest 20 "^FAIL"
fi

# ---- 7. compute-sanitizer: memcheck, then racecheck in the time left ----------------------------
# The caching allocator hands out pieces of large blocks, inside which an overrun is no error to the
# sanitizer: every tensor gets its own cudaMalloc instead. API errors are not reported (PyTorch probes the
# driver with calls that fail by design); a kernel's launch error raises in the driver anyway.

SANITIZER="compute-sanitizer --launch-timeout 0 --report-api-errors no --error-exitcode 86 --print-limit 40"
KEYS="ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race reported|hazard|^FAIL|^=+ (Error|Warning)"
MEMCHECK="PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool memcheck $PYTHON bench/gpu_sanitize.py --quick"
# Shared memory: the CUDA statistics, halo-tile and norms kernels, and Triton's reductions.
RACECHECK="$SANITIZER --tool racecheck $PYTHON bench/gpu_sanitize.py --quick --dtypes float32 --ops cond_instance_norm,crp_pool,langevin"
if [ "$DRY" = 1 ]; then
    # How far the driver gets without CUDA: its --quick cases are built, then it stops (exit 3).
    start sanitizer-driver 60 "$PYTHON bench/gpu_sanitize.py --quick"
    finish sanitizer-driver "0" 3
    record sanitizer-driver 10
    why="no CUDA device"
    if ! command -v compute-sanitizer > /dev/null 2>&1; then why="$why; compute-sanitizer not found"; fi
    skip memcheck "$why" "$MEMCHECK"
    skip racecheck "$why" "$RACECHECK"
elif ! command -v compute-sanitizer > /dev/null 2>&1; then
    not_run memcheck "compute-sanitizer not found"
    not_run racecheck "compute-sanitizer not found"
else
    start memcheck 200 "$MEMCHECK"
    finish memcheck "0"
    if [ "$RC" = 86 ]; then STATUS="FAILED (memcheck found errors)"; fi
    record memcheck 50 "$KEYS"
    start racecheck 150 "$RACECHECK"
    finish racecheck "0"
    if [ "$RC" = 86 ]; then STATUS="FAILED (racecheck found hazards)"; fi
    record racecheck 50 "$KEYS"
fi

# ---- summary --------------------------------------------------------------------------------------

if [ "$NO_GPU_FAIL" = 1 ]; then
    FAILED=$((FAILED + 1))
    SUMMARY="$SUMMARY$(printf '%-24s %-44s' "GPU run" "FAILED (torch sees no CUDA device)")
"
fi
{
    echo
    echo "==== summary: $FAILED failed; $(($(date +%s) - T0)) s of the ${BUDGET} s budget"
    printf '%s' "$SUMMARY"
    echo "results: $RESULTS"
} | tee -a "$RESULTS"
[ "$FAILED" = 0 ]
