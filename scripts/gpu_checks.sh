#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA tests, the GPU benchmarks, the
# IIA-against-k curve as parallel fits on the GPU, and the demo on the GPU.
#
#   OUT=gpu_out bash scripts/gpu_checks.sh
#
# Needs python3 with CUDA torch and masalign's dependencies; a folder .whl/ of wheels,
# if present, is installed first into /tmp/site (for a machine without a package
# index). MASALIGN_CACHE must hold the demo's GRUs (else they are trained first).
# Everything it writes goes under $OUT: log.txt (this script's output), the
# benchmarks' JSON, the merged k-curve and the demo's report.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*"; }
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/masalign . || exit 1
  export PYTHONPATH=/tmp/masalign:/tmp/site
fi
nvidia-smi -L
$PY -c "import torch, transformers, masalign; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| masalign', masalign.__file__)"
log "installed"

# 1. The benchmark first, alone on the machine.
OMP_NUM_THREADS=1 $PY benchmarks/bench_mas.py --device cuda --json "$OUT/bench_mas_cuda.json"
log "bench_mas done"

# 2. The k-curve at fit's default 2,000 steps: one process per (method, k), 9 at a time.
mkdir -p kc
KC_TIMEOUT=${KC_TIMEOUT:-600}
for k in 1 2 4 8 16 32; do for m in MAS stitching DAS; do echo "$m $k"; done; done |
  xargs -P 9 -L 1 sh -c 'timeout '"$KC_TIMEOUT"' '"$PY"' examples/iia_vs_subspace_dim.py --device cuda --threads 1 --steps 2000 --methods $0 --dims $1 --out kc/$0_$1 > kc/$0_$1.log 2>&1; echo "[k-curve] $0 k=$1 exit $?"' &
kcurve=$!

# 3. The CUDA tests, meanwhile (correctness only: no timing).
OMP_NUM_THREADS=4 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_similarity.py::test_cuda_matches_cpu 2>&1 | tail -40
log "CUDA tests done"

wait $kcurve
log "k-curve fits done"
done_runs=$(ls -d kc/*/ 2>/dev/null | wc -l)
log "$done_runs of 18 k-curve runs finished"
$PY examples/iia_vs_subspace_dim.py --merge kc/*/ --out kc_merged && cp kc_merged/iia_vs_k.json "$OUT/iia_vs_k_2000_steps_cuda.json"
cp kc_merged/iia_vs_k.png "$OUT/iia_vs_k_2000_steps_cuda.png" 2>/dev/null
tar czf "$OUT/kc_logs.tgz" kc

# 4. The demo on the GPU (the GRU pair, its defaults), time allowing.
timeout ${DEMO_TIMEOUT:-150} $PY -c 'import sys; from masalign.cli import main; sys.exit(main(sys.argv[1:]))' \
  demo --pair gru-gru --device cuda --out demo_cuda && cp demo_cuda/report.json "$OUT/demo_gru_gru_cuda_report.json"
log "all done"
