#!/usr/bin/env bash
# gpu-startup.sh: where a GPU replica's start-up goes, and what a warm compile cache saves.
#
# Runs `bench` (large shape, 4 labels) four times in fresh processes on one machine and
# prints each run's start-up clock and its steady rate:
#   cold          the machine's first start (cold page cache, empty compile cache)
#   warm          the same again (page cache and compile cache warm: a restarted container
#                 whose compile cache survived, on a node that ran it before)
#   cache-only    an empty compile cache, warm page cache (what the cache alone saves)
#   eager         torch.compile off (TORCHDYNAMO_DISABLE=1): the set-up without compiling,
#                 and the steady rate it costs
# Usage on the device: OUT=$OUT bash benchmarks/gpu-startup.sh (carry .whl).
set -euo pipefail
log() { echo "gpu-startup: $*" >&2; }
root=$PWD
out=${OUT:-$root/.out}
python=${PYTHON:-python3}
mkdir -p "$out"
if ! "$python" -c 'import confluent_kafka, pydantic_settings' 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$root"/.whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

bench() {  # name, then environment assignments
  local name=$1
  shift
  log "run $name"
  env "$@" "$python" -m stream_classifier.cli bench --shape large --labels 4 --messages 4000 \
    --baseline-messages 100 --reference-messages 50 --json "$out/startup-$name.json" \
    >"$out/startup-$name.log" 2>&1 || { tail -20 "$out/startup-$name.log"; return 1; }
}
bench cold TORCHINDUCTOR_CACHE_DIR=/tmp/sc-compile-a
bench warm TORCHINDUCTOR_CACHE_DIR=/tmp/sc-compile-a
bench cache-only TORCHINDUCTOR_CACHE_DIR=/tmp/sc-compile-b
bench eager TORCHINDUCTOR_CACHE_DIR=/tmp/sc-compile-c TORCHDYNAMO_DISABLE=1

"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
steps = ["python", "imports", "model_setup", "weights_read", "to_device", "warmup", "graphs"]
rows = {}
print(f"{'run':<11}" + "".join(f"{s:>13}" for s in steps) + f"{'engine total':>14}{'msgs/s':>9}")
for name in ["cold", "warm", "cache-only", "eager"]:
    data = json.loads((out / f"startup-{name}.json").read_text())
    start = data["startup"]
    total = sum(v for k, v in start.items() if k != "random_model")
    ours = [r for r in data["results"] if r["method"].startswith("stream-classifier (")]
    end_to_end = [r for r in ours if "pre-tokenized" not in r["method"]][0]
    msgs = end_to_end["msgs_per_s"]
    rows[name] = {"startup": start, "total_s": total, "result": end_to_end}
    print(f"{name:<11}" + "".join(f"{start.get(s, 0):>13.2f}" for s in steps) + f"{total:>14.2f}{msgs or 0:>9.0f}")
(out / "startup-summary.json").write_text(json.dumps(rows, indent=2))
EOF
