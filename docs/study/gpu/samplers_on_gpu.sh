#!/bin/bash
# Samplers suite of the study (docs/study) on the lent GPU machine: 12 runs (4 arms x 3 seeds), one process
# each, plus a 40-iteration smoke of every arm. Usage: study.sh start|continue SECONDS
#
# What ran (2026-11-30, one NVIDIA H200, 16 cores, torch 2.11): `bash study.sh start 535` from the repository
# root. In 535 s every run reached step 2400-2700 at about 6 it/s each (GPU 98 % busy); the checkpoints of
# step 2250 came back in $OUT and were copied to docs/study/runs/samplers/, where the study command resumed
# them on the 2-core CPU machine (result.json: "device": "CUDA NVIDIA H200 then CPU"). A second call
# (`continue`) found neither the processes nor .gpu/: they did not outlive the first call, so one call is all
# that this script can count on.
set -u
MODE=$1
T_END=$2
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .gpu/logs
if [ -d .whl ] && [ ! -d /tmp/site/faster_coco_eval ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
ARGS="--suite samplers --seeds 3 ${BUDGET_ARGS:---budget full} --threads 1 --no-progress --output .gpu/study"
if [ "$MODE" = start ]; then
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv 2>&1 | tail -2
  nproc
  $PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"
  if command -v nvidia-cuda-mps-control >/dev/null && [ "${MPS:-1}" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p /tmp/mps /tmp/mps-log
    if nvidia-cuda-mps-control -d && timeout 60 $PY -c "import torch; print('mps client ok', torch.ones(2, device='cuda').sum().item())"; then
      echo "MPS on"
    else
      echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS off"
    fi
  else
    echo "no MPS"
  fi
  setsid nohup $PY -m detbalance compare --suite samplers --iters ${SMOKE_ITERS:-40} --seeds 1 --threads 1 --no-progress \
    --output .gpu/smoke > .gpu/logs/smoke.log 2>&1 < /dev/null &
  for k in $(seq 1 ${PROCS:-12}); do
    setsid nohup $PY -m detbalance compare $ARGS > .gpu/logs/p$k.log 2>&1 < /dev/null &
    sleep 1
  done
fi
report() {
  echo "--- t=${SECONDS}s load=$(cut -d' ' -f1-3 /proc/loadavg) gpu=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  for f in .gpu/study/runs/samplers/*/*/seed*/metrics.jsonl; do
    [ -f "$f" ] || continue
    d=$(dirname "$f")
    step=$(grep -o '"step": [0-9]*' "$f" | tail -1)
    ap=$(grep '"type": "eval"' "$f" | grep -o '"AP": [0-9.]*' | tail -1)
    echo "$d $step $ap $([ -f "$d/result.json" ] && echo DONE)"
  done
  grep -l "Traceback\|Error" .gpu/logs/*.log 2>/dev/null | while read -r l; do echo "== $l"; tail -15 "$l"; done
}
while [ "$SECONDS" -lt "$T_END" ]; do
  sleep 20
  report
  n=$(ls .gpu/study/runs/samplers/*/*/seed*/result.json 2>/dev/null | wc -l)
  [ "$n" -ge 12 ] && break
done
report
# what comes back: finished runs' files (small), logs, and the checkpoints of unfinished runs (split < 16 MiB)
(cd .gpu/study && find runs \( -name result.json -o -name config.toml -o -name metrics.jsonl -o -name devices.txt \) \
  -print0 | tar czf "$OUT/runs.tgz" --null -T -)
tar czf "$OUT/logs.tgz" .gpu/logs .gpu/smoke/report.md 2>/dev/null
(cd .gpu/study && for d in runs/samplers/*/*/seed*; do [ -f "$d/result.json" ] || [ ! -f "$d/checkpoint.pt" ] || echo "$d/checkpoint.pt"; done \
  | tar cf - -T - | split -b 15M - "$OUT/ckpt.tar.")
ls -la "$OUT"
