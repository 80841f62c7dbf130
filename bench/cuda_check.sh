#!/usr/bin/env bash
# The CUDA checks for a session that has a GPU machine (CI has none): tests/test_cuda.py (training,
# QLoRA, alignment and compare cells on the GPU in bf16 autocast), then the CPU suite with CUDA visible.
# Wheels missing on that machine can travel in .whl/ (see docs/performance.md); logs go to $OUT.
set -u
OUT=${OUT:-/tmp/cuda-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TUNELAB_HOME=/tmp/tunelab-home
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, trl, datasets
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/env.txt"
timeout "${CUDA_TESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -40
# the CPU suite with CUDA visible (conftest pins `device: auto` to the CPU): nothing may break
timeout "${SUITE_S:-300}" python3 -m pytest -q -p no:cacheprovider -n 8 -m "not slow" \
  --ignore tests/test_serve.py --ignore tests/test_cuda.py ${SUITE_PATHS:-tests} 2>&1 | tee "$OUT/suite.log" | tail -60
