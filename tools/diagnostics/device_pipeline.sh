#!/usr/bin/env bash
# The steady-state pipeline bench on one GPU in one call (an estimate: about 5 minutes on an H100 or H200;
# its timeout 7):
# the compact network at width 64, 2-2-2-2 (R3D-18's parameters) at 112 px, 16-frame SSL clips, 240 UCF-like videos listed 6 times, every stage's rows
# (step alone, loader alone, the stage from its epoch 2, GPU utilisation and power every 200 ms), then
# torch.profiler over 10 steady steps of supervised and invariant. Everything lands in OUT.
#
#     bash tools/diagnostics/device_pipeline.sh OUT                      # a CUDA machine
#     bash tools/diagnostics/device_pipeline.sh OUT --device cpu --width 8 --layers 1 1 1 1 --size 32 --ssl-frames 8 \
#         --workers 2 --videos 16 --repeat 2 --batches 20 --steps 3     # the same path, tiny, on a CPU
# Flags after OUT replace the defaults. A folder .whl/ of wheels (PyAV where it is missing) is installed first.
set -euo pipefail
OUT=${1:?usage: bash tools/diagnostics/device_pipeline.sh OUT [pipeline.py flags]}
shift
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
if ! python3 -c "import av" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true) | tee "$OUT/device.txt"
echo "$(nproc) cores; /dev/shm $(df -h --output=size /dev/shm 2>/dev/null | tail -1)" | tee -a "$OUT/device.txt"
python3 -c "import torch, av; print('torch', torch.__version__, 'PyAV', av.__version__)" | tee -a "$OUT/device.txt"
# each row is printed as it ends, so a run cut by the timeout still keeps the rows before it
PYTHONUNBUFFERED=1 timeout 420 python3 tools/diagnostics/pipeline.py --device cuda --width 64 --layers 2 2 2 2 --size 112 \
    --ssl-frames 16 --workers 14 --videos 240 --repeat 6 --epochs 3 --batches 200 --profile --out "$OUT" "$@" \
    2>&1 | tee "$OUT/pipeline.log"
