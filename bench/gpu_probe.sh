#!/usr/bin/env bash
# The first-GPU probe: what a person lent one H100 or H200 for ten minutes runs as is, and sends back.
#
#   bash bench/gpu_probe.sh [OUT_DIR]           # GPU: ~9 minutes, Vera-1.3B shapes (49 frames, 832x480)
#   DRY=1 bash bench/gpu_probe.sh OUT_DIR       # CPU: the same code at tiny shapes in a minute or two (CI runs it)
#
# Needs Python 3.10+ with torch (CUDA build) installed. diffusers and peft, if missing, are installed from the
# wheels carried next to this script (bench/wheels/, or $WHEELS): the machine needs no network. docs/GPU.md says
# how to make that folder, what each section measures and what to send back (OUT_DIR/probe.jsonl and
# OUT_DIR/probe.md).
#
# Each section runs in its own process under `timeout` (its time box, seconds; override with BUDGET_<SECTION>=N):
# a section that hangs, runs out of memory or crashes is recorded as such and the next one runs. Results are JSON
# lines appended as each case is measured (OUT_DIR/probe.jsonl), then printed as a table (OUT_DIR/probe.md).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${DRY:-0}"
OUT="${1:-$REPO/gpu-probe-$(date -u +%Y%m%dT%H%M%SZ)}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/bench/wheels}"

mkdir -p "$OUT" || { echo "gpu_probe: cannot create $OUT" >&2; exit 2; }
JSONL="$OUT/probe.jsonl"
: >"$JSONL"
export PYTHONPATH="$REPO/engine${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_probe: $PYTHON cannot import torch; set PYTHON=/path/to/python of the environment with torch" >&2
    exit 2
fi
for package in diffusers peft; do
    if ! "$PYTHON" -c "import $package" 2>/dev/null; then
        if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
            echo "gpu_probe: installing $package from $WHEELS (no network)"
            "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "$package" \
                || { echo "gpu_probe: could not install $package from $WHEELS" >&2; exit 2; }
        else
            echo "gpu_probe: $package is not installed and $WHEELS has no wheels; see docs/GPU.md" >&2
            exit 2
        fi
    fi
done

DRY_FLAG=()
if [ "$DRY" = "1" ]; then
    DRY_FLAG=(--dry)
fi

# section:seconds. The GPU budgets add up to about 9 minutes; a dry run needs far less than its boxes.
SECTIONS=(env:20 attention:60 step:100 vae:45 offload_plain:50 offload_stream:50 compile:90 train_lora:60 train_full:60)

for entry in "${SECTIONS[@]}"; do
    name="${entry%%:*}"
    budget_var="BUDGET_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    default_budget="${entry##*:}"
    # A dry run's shapes are tiny, but a shared CI machine may take tens of seconds just to import torch.
    [ "$DRY" = "1" ] && default_budget=600
    budget="${!budget_var:-$default_budget}"
    log="$OUT/$name.log"
    echo "gpu_probe: $name (time box ${budget}s)"
    start=$(date +%s)
    # (the array expansion is written so that bash < 4.4 accepts it empty under set -u)
    timeout --kill-after=10 "$budget" "$PYTHON" "$REPO/bench/gpu_probe.py" "$name" --out "$JSONL" ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} \
        >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; else status=failed; fi
        echo "gpu_probe: $name $status (exit $rc after ${took}s; log $log)"
        "$PYTHON" "$REPO/bench/gpu_probe.py" record --out "$JSONL" --section "$name" --status "$status" \
            --rc "$rc" --log "$log" --budget "$budget"
    else
        echo "gpu_probe: $name done in ${took}s"
    fi
done

"$PYTHON" "$REPO/bench/gpu_probe.py" table "$JSONL" | tee "$OUT/probe.md"
echo "gpu_probe: results in $JSONL and $OUT/probe.md (send both back, with the *.log files of failed sections)"
