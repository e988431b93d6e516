#!/usr/bin/env bash
# Every GPU check and table in one call on a lent device (benchmarks/README.md, "GPU").
#   bash benchmarks/gpu.sh            # writes logs to $OUT (default /tmp/pellucid-gpu)
# Packages the device image lacks travel as wheels in .whl/ (see README); the shared sample
# radiographs the scripts read come from $PELLUCID_DATA (default .gpu/data, a copied subset).
# Each step has a time limit and the whole run a deadline ($BUDGET seconds), so that one slow
# or failing step never costs the others.
set -u
OUT=${OUT:-/tmp/pellucid-gpu}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
START=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PELLUCID_DATA=${PELLUCID_DATA:-$PWD/.gpu/data}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

step() {  # step NAME LIMIT SCRIPT ARGS...: run unless the deadline is too close
    local name=$1 limit=$2 lines=${TAIL:-45}
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < 20 )); then echo "=== $name skipped: ${left}s left"; return; fi
    (( limit > left - 5 )) && limit=$(( left - 5 ))
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" python3 "$@" > "$OUT/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - START ))s" >> "$OUT/$name.log"
    grep -v "^Traceback\|^  File\|^    " "$OUT/$name.log" | tail -n "$lines"
}

TAIL=14 step parity 70 benchmarks/device_parity.py --device "$DEVICE"
step cam 80 benchmarks/cam_vs_peers.py --device "$DEVICE"
step attribution 45 benchmarks/attribution_vs_peers.py --device "$DEVICE"
step metrics 60 benchmarks/metrics_vs_quantus.py --device "$DEVICE"
TAIL=12 step incremental 40 benchmarks/incremental.py --quick --device "$DEVICE"
# the full grid needs ~5 minutes on an H200 (training included); the quick grid fits a lease
step vs_peers 100 benchmarks/vs_peers.py --quick --device "$DEVICE" --no-ray --no-memory \
    --models /tmp/vs-peers
step vs_peers_bf16 60 benchmarks/vs_peers.py --quick --device "$DEVICE" --no-ray --no-memory \
    --precision bf16 --models /tmp/vs-peers
echo "total $(( $(date +%s) - START ))s"
