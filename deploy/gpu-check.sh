#!/usr/bin/env bash
# The GPU check of the learning side (issue 4) on a machine that has a GPU and torch, transformers, peft
# and scikit-learn, but no network and maybe none of our other packages:
#   deploy/gpu-check.sh prepare DIR          here, with network: wheels, the base model, the data -> DIR
#   deploy/gpu-check.sh run DIR OUT [NAME=ENV ...]   there: bench train and score, then one full evaluation per
#                                            NAME (env settings, comma-separated), all at once on the GPU
# DIR stays under 64 MiB: the base model travels as fp16 and is restored to fp32 there (GE's zero-shot
# holdout AUC moved from 0.66097 to 0.66112 by that round trip). OUT gets 3 files + 2 per NAME.
# Each evaluation stops after EVAL_TIMEOUT_S (450) seconds; its --out JSON keeps what it measured so far.
# Example: deploy/gpu-check.sh run .gpu "$OUT" default= no-history=WORKER_QUERY_HISTORY=false
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
python=${PYTHON:-python3}
[ "${1:-}" != prepare ] || [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || python=.venv/bin/python

prepare() {
  local dir=$1
  mkdir -p "$dir/wheels" "$dir/model" "$dir/data"
  # What the evaluation imports and a torch-only image lacks, at the versions installed here, for
  # CPython 3.12 on x86-64.
  local wheels
  read -ra wheels <<< "$("$python" -c 'from importlib.metadata import version as v
print(*(f"{n}=={v(n)}" for n in ("pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
      "typing-inspection", "annotated-types", "orjson", "structlog")))')"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/wheels" "${wheels[@]}"
  "$python" - "$dir/model" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from worker.learn.encoder import default_base_model
src, dst = default_base_model(), Path(sys.argv[1])
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
save_file({k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()}, str(dst / "fp16.safetensors"))
EOF
  cp "$here/../shared/data/homedepot/train_with_brand.csv.gz" "$dir/data/"
  du -sh "$dir"
}

run() {
  local dir=$1 out=$2
  shift 2
  mkdir -p "$out"
  if ! "$python" -c "import pydantic_settings, orjson" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$dir"/wheels/*.whl
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$here" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  local model=/tmp/gpu-check-model
  rm -rf "$model" && cp -r "$dir/model" "$model"
  "$python" - "$model" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
d = Path(sys.argv[1])
save_file({k: v.float() for k, v in load_file(str(d / "fp16.safetensors")).items()}, str(d / "model.safetensors"))
(d / "fp16.safetensors").unlink()
EOF
  export WORKER_BASE_MODEL="$model"
  local data="$dir/data/train_with_brand.csv.gz"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt" ||
    echo "no nvidia-smi: $(uname -m) CPU" | tee "$out/device.txt"
  # shellcheck disable=SC2086  # BENCH_ARGS and EVAL_ARGS are word lists (a smoke test: EVAL_ARGS=--quick)
  "$python" -m worker.tools.bench.train --json ${BENCH_ARGS:-} > "$out/bench-train.json" 2> /tmp/bench-train.err ||
    { echo "bench train failed:"; tail -n 20 /tmp/bench-train.err; }
  tail -n 1 "$out/bench-train.json"
  # shellcheck disable=SC2086  # SCORE_ARGS: e.g. --pairs 8192 --refresh-segments 100
  "$python" -m worker.tools.bench.score --json ${SCORE_ARGS:-} > "$out/bench-score.json" 2> /tmp/bench-score.err ||
    { echo "bench score failed:"; tail -n 20 /tmp/bench-score.err; }
  tail -n 1 "$out/bench-score.json"
  local pids=() name
  for spec in "${@:-default=}"; do
    name=${spec%%=*}
    (
      IFS=, read -ra settings <<< "${spec#*=}"
      [ ${#settings[@]} -eq 0 ] || export "${settings[@]}"
      # shellcheck disable=SC2086
      timeout "${EVAL_TIMEOUT_S:-450}" "$python" -m worker.tools.evaluation.offline_command --data "$data" --json --no-progress \
        ${EVAL_ARGS:-} --out "$out/eval-$name.json" --plot "$out/eval-$name.png" > /dev/null \
        2> "/tmp/eval-$name.err" || { echo "eval $name ended early:"; tail -n 20 "/tmp/eval-$name.err"; }
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  "$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("eval-*.json")):
    r = json.loads(path.read_text())
    print(path.name, r.get("partial", "done"), r.get("seconds"), r["worker"]["decisions"],
          "worse:", r["worker"]["promoted_worse_than_parent"])
    for proc, by in r["mean"].items():
        print(f"  {proc:9}", " ".join("-" if v["auc"] is None else f"{v['auc']:.4f}" for v in by.values()))
EOF
}

case "${1:-}" in
  prepare) prepare "${2:?usage: $0 prepare DIR}" ;;
  run) run "${2:?usage: $0 run DIR OUT [NAME=ENV ...]}" "${3:?usage: $0 run DIR OUT [NAME=ENV ...]}" "${@:4}" ;;
  *) echo "usage: $0 prepare DIR | run DIR OUT [NAME=WORKER_X=1,WORKER_Y=2 ...]" >&2; exit 2 ;;
esac
