#!/usr/bin/env bash
# gpu-priority.sh: benchmarks/priority.py (a live topic beside a bulk backlog, with and
# without priorities) on a GPU machine without Java or network, with a broker started from
# the carried pack (benchmarks/gpu-service-pack.sh makes it and the wheels; carry both).
#
#   bash benchmarks/gpu-priority.sh          # writes $OUT/priority-gpu.json, prints the table
#
# Environment (defaults in brackets): OUT [./.out]  PACK [.out/gpu-broker]  WHEELS [.whl]
#   PYTHON [python3]  KAFKA_BOOTSTRAP (use this broker)  SHAPE [large]  BACKLOG [100000]
#   SECONDS_EACH [30]  GUARANTEE [at_least_once]  PRIORITY_ARGS (more priority.py arguments)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { echo "gpu-priority: $*" >&2; }

# shellcheck source=benchmarks/gpu-env.sh
source benchmarks/gpu-env.sh

# shellcheck disable=SC2086 # PRIORITY_ARGS: words on purpose
PYTHONUNBUFFERED=1 "$python" benchmarks/priority.py --bootstrap "$KAFKA_BOOTSTRAP" \
  --shape "${SHAPE:-large}" --backlog "${BACKLOG:-100000}" --seconds "${SECONDS_EACH:-30}" \
  --guarantee "${GUARANTEE:-at_least_once}" ${PRIORITY_ARGS:-} --json "$out/priority-gpu.json"
