#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent device (see eval/README.md).
#   bash eval/gpu_check.sh            # results under $OUT (the device tool's folder), else runs/gpu
# Each check is one script eval/gpu/NAME.py that takes --out FILE.json; its first lines carry
# "# budget: SECONDS" (its time limit here). The whole run must stay under 8 minutes.
# Nothing here needs open_clip or xformers, nor a network.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - > "$OUT/env.txt" 2>&1 <<'PY'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
: > "$OUT/summary.txt"
for check in eval/gpu/*.py; do
  [ -e "$check" ] || continue
  name=$(basename "$check" .py)
  budget=$(sed -n 's/^# budget: *\([0-9]*\).*/\1/p' "$check" | head -n 1)
  start=$(date +%s)
  timeout "${budget:-60}" python "$check" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start )) budget=${budget:-60}" | tee -a "$OUT/summary.txt"
done
