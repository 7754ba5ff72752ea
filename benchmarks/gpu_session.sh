#!/usr/bin/env bash
# The ONE prepared run for a lent GPU (the `device` tool; issues 8 and 9). It needs no internet:
#   1. installs the wheels carried in .whl/ (the GPU image has torch, transformers, safetensors,
#      scipy, pytest, but not SimpleITK or MONAI; nibabel is only needed for data not carried) into $WORK/site;
#   2. runs the CUDA test(s) and registers the demo pair with mind-zeroshot on the GPU (first CUDA run);
#   3. times every network's forward pass on the GPU (benchmarks/network_speed.py --device cuda);
#   4. trains the brain unet (configs/unet-synthseg-gpu.toml, bf16 autocast) for TRAIN_SECONDS, then
#      stops it with SIGTERM (the trainer checkpoints and can be resumed here on the CPU) and exports it.
# Everything lands in $OUT (at most 8 files come back): log.txt, network_speed.md, train_log.csv,
# checkpoint.pt, model.safetensors, model.json.
#
# Prepare on the development machine (once per session, about 2 minutes; 63 MB travel, the limit is 64 MiB):
#   echo /.whl/ >> .git/info/exclude; echo /.train-cache/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl SimpleITK==2.5.3 monai==1.5.1
#   mkdir -p .train-cache/training .train-cache/shared/synthseg
#   cp ~/.cache/dinoreg/training/synthseg*_2mm_aligned_v*.npz .train-cache/training/   # prepared by any CPU run at 2 mm
#   cp ../shared/data/synthseg/*.npy .train-cache/shared/synthseg/
#   mkdir -p .train-cache/shared/brain && cp ../shared/data/brain/test_scan.npz .train-cache/shared/brain/   # network_speed --whole
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".train-cache"], timeout_s=560)
# Tested here on the CPU with: TRAIN_SECONDS=30 bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-$(mktemp -d -t dinoreg-gpu.XXXXXX)}"  # scratch: carried wheels and the training run
OUT="${OUT:-$WORK/out}"
TRAIN_SECONDS="${TRAIN_SECONDS:-240}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="$PWD/DinoRegistration${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .train-cache ]; then  # carried: prepared label maps (training/) and SynthSeg's label tables (shared/synthseg/)
  export DINOREG_CACHE="$PWD/.train-cache" DINOREG_SHARED_DATA="$PWD/.train-cache/shared"
fi
echo "== machine"; date -u; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

echo "== CUDA tests"
"$PYTHON" -m pytest -q -p no:cacheprovider Testing/test_geometry.py -k "cuda or warp or integrate or grid_sample" 2>&1 | tail -3

echo "== mind-zeroshot on the demo pair, device auto (the GPU when there is one)"
/usr/bin/time -f "whole process %e s, peak RSS %M KB" "$PYTHON" -m dinoreg register \
  Resources/Demo/MRBrainTumor1.nii.gz Resources/Demo/MRBrainTumor2.nii.gz -o "$WORK/demo" --quiet
"$PYTHON" -c "import json; r = json.load(open('$WORK/demo/report.json')); print(r['device'], r['seconds_per_stage'], 'total', r['seconds_total'], 's; NCC', r['similarity_before']['ncc'], '->', r['similarity_after']['ncc'], '; GPU MB', r['peak_gpu_mb'])"

echo "== network forward passes"
"$PYTHON" benchmarks/network_speed.py --device "$DEVICE" --repeats 5 --whole unet --output "$OUT/network_speed.md" 2>&1 | tail -20

echo "== training for $TRAIN_SECONDS s"
rm -rf "$WORK/run"
timeout -s TERM "$TRAIN_SECONDS" "$PYTHON" -m dinoreg train --config configs/unet-synthseg-gpu.toml \
  --output "$WORK/run" --quiet
tail -3 "$WORK/run/log.csv" 2>/dev/null
grep "val/dice," "$WORK/run/log.csv" 2>/dev/null
"$PYTHON" -c "
from pathlib import Path
from dinoreg.training.export import export_checkpoint
print('exported', export_checkpoint(Path('$WORK/run'), Path('$OUT')))" || echo "export failed"
cp "$WORK/run/log.csv" "$OUT/train_log.csv" 2>/dev/null
cp "$WORK/run/checkpoint.pt" "$OUT/checkpoint.pt" 2>/dev/null
echo "== done"; date -u
