#!/usr/bin/env bash
# The one prepared run for the offline GPU machine (../shared/DEVICE.md; benchmarks/results/README.md, "GPU").
#
# Here, before sending the checkout:
#   python ../shared/tools/device_pack.py --wheel pytest==9.2.0 --wheel pluggy==1.7.0 \
#       --wheel iniconfig==2.3.1 --wheel pygments==2.21.0      # .device/: MTD-256, diffusers, lite0, pytest
#   mkdir -p .device/weights && cp ../shared/weights/taef2_*.pth .device/weights/    # TAEF2 (5.4 MB)
# On the GPU machine, from the repository root (with .device carried along):
#   bash scripts/device_run.sh                  # everything, under 10 minutes
#   STEPS=tests bash scripts/device_run.sh      # only some steps: env,tests,throughput,mtd
#
# Steps (each one's output tee'd into $OUT, default ./device-out):
#   env         install .device/wheels into /tmp/site; nvidia-smi; versions        -> env.txt
#   tests       python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py   -> pytest.txt
#   throughput  python3 -m benchmarks speed --json $OUT/throughput.jsonl $THROUGHPUT_EXTRA
#               (default "--warmup 1 --reps 3 --budget-s 20") -> throughput.txt
#   mtd         python3 -m benchmarks mtd --methods patchcore,deco-diff --data .device/data/mtd-256/split.csv
#               --json $OUT/mtd.jsonl $MTD_EXTRA                                    -> mtd.txt
# Each step runs under `timeout` (T_TESTS, T_THROUGHPUT, T_MTD seconds), cut to what is left of
# TOTAL_S (default 570 s, the machine's 10-minute limit per call less the start-up); a step that
# fails or times out does not stop the next. summary.txt lists every step's exit status
# (124 = timed out). MTD_EXTRA defaults to "--steps 1000": the full-mode DeCo-Diff schedule
# (20000 steps) does not fit one call; pass MTD_EXTRA="" for the table's own settings.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
STEPS=${STEPS:-env,tests,throughput,mtd}
TOTAL_S=${TOTAL_S:-570}
T_TESTS=${T_TESTS:-200}
T_THROUGHPUT=${T_THROUGHPUT:-200}
T_MTD=${T_MTD:-170}
MTD_EXTRA=${MTD_EXTRA---steps 1000}
THROUGHPUT_EXTRA=${THROUGHPUT_EXTRA---warmup 1 --reps 3 --budget-s 20}
START=$(date +%s)
: > "$OUT/summary.txt"

log() { echo "[device_run +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# run NAME LIMIT_S CMD...: the command under timeout (at most what is left), output tee'd to $OUT/NAME.txt
run() {
    local name=$1 limit=$2
    shift 2
    local rest
    rest=$(left)
    if (( rest < 20 )); then
        log "$name: skipped, ${rest}s left of TOTAL_S=$TOTAL_S"
        return 0
    fi
    (( limit > rest )) && limit=$rest
    log "$name: start (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    log "$name: rc=$rc in $(( $(date +%s) - t0 ))s$( (( rc == 124 )) && echo ' (timed out)')"
    return 0
}

# the environment is needed by every step, so it is set up even when `env` is not in STEPS
if compgen -G ".device/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl > "$OUT/pip.txt" 2>&1 \
        || log "pip install of .device/wheels failed (see pip.txt)"
else
    log "no .device/wheels: run python ../shared/tools/device_pack.py here first (diffusers is not on the machine)"
fi
export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1

if want env; then
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
        python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "diffusers", "accelerate", "timm", "pytest", "ccad"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", type(exc).__name__, exc)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no-bf16")
EOF
        git log -1 --format='commit %h (%cI)' 2>/dev/null || echo "commit unknown (no git)"
        [[ -f .device/weights/taef2_encoder.pth ]] && echo "taef2 weights: .device/weights" \
            || echo "taef2 weights: absent (throughput uses taef2:random; mtd's deco-diff needs them)"
    } 2>&1 | tee "$OUT/env.txt"
fi

if want tests; then
    if python3 -c "import pytest" 2> /dev/null; then
        run pytest "$T_TESTS" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
    else
        log "tests: skipped, no pytest on the machine: pack it (device_pack.py --wheel pytest==9.2.0 --wheel" \
            "pluggy==1.7.0 --wheel iniconfig==2.3.1 --wheel pygments==2.21.0)"
    fi
fi

if want throughput; then
    # shellcheck disable=SC2086
    run throughput "$T_THROUGHPUT" python3 -m benchmarks speed --json "$OUT/throughput.jsonl" $THROUGHPUT_EXTRA
fi

if want mtd; then
    if [[ -f .device/data/mtd-256/split.csv ]]; then
        # shellcheck disable=SC2086  # MTD_EXTRA is a list of words
        run mtd "$T_MTD" python3 -m benchmarks mtd --methods patchcore,deco-diff \
            --data .device/data/mtd-256/split.csv --json "$OUT/mtd.jsonl" $MTD_EXTRA
    else
        log "mtd: skipped, no .device/data/mtd-256/split.csv (run device_pack.py here)"
    fi
fi
log "done; files in $OUT"
