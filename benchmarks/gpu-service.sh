#!/usr/bin/env bash
# gpu-service.sh: the service benchmark (`stream-classifier bench --service`) on a GPU
# machine that has no Java and no network, with a broker started from a carried pack.
#
# Once, on a machine with Java, Maven's jars and pip (this one): benchmarks/gpu-service-pack.sh
# makes .out/gpu-broker (a jlink'ed Java and the broker's jars, ~32 MB) and .whl (the Python
# packages the GPU image lacks). Carry both; then, from the repository root there:
#
#   bash benchmarks/gpu-service.sh               # 4 and 10 labels, both guarantees
#   LABELS=4 bash benchmarks/gpu-service.sh      # one label count (fits a 10-minute call)
#
# For each label count it writes $OUT/service-<labels>.json and prints the table: the
# service's msgs/s from first consume to last commit and between 10% and 90% of the
# outputs, GPU busy fraction, p50/p99 latency at 50% and 90% of the saturated rate, and
# bench's end-to-end and pre-tokenized rates of the same model on the same events.
#
# Environment (defaults in brackets):
#   OUT [./.out]  PACK [.out/gpu-broker]  WHEELS [.whl]  PYTHON [python3]
#   KAFKA_BOOTSTRAP   use this broker instead of starting one (nothing is started or stopped)
#   KAFKA_PORT [9092] KAFKA_LOCAL_DIR [/tmp/gpu-broker-state]  for the broker started here
#   SHAPE [large]  DEVICE [auto]  LABELS ["4 10"]  EVENTS_4 [20000]  EVENTS_10 [10000]
#   EVENTS (every label count)  GUARANTEES [at_least_once,exactly_once]  PARTITIONS [12]
#   LOADS [0.5,0.9]  LATENCY_SECONDS [20]
#   MAX_BATCH_MESSAGES, PREPARE_WORKERS  the service's settings (default: the device's)
#   SERVICE_PREFIX  a command the service runs under (a profiler), see bench --service-prefix
#   CUDA_GRAPHS [1]  0: launch every pass eagerly (engine.cuda_graphs: false), for an A/B
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { echo "gpu-service: $*" >&2; }

# shellcheck source=benchmarks/gpu-env.sh
source benchmarks/gpu-env.sh

"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
for labels in ${LABELS:-4 10}; do
  default_events=20000
  [[ $labels == 10 ]] && default_events=10000
  per_labels=EVENTS_$labels
  events=${EVENTS:-${!per_labels:-$default_events}}
  extra=()
  [[ -z ${MAX_BATCH_MESSAGES:-} ]] || extra+=(--max-batch-messages "$MAX_BATCH_MESSAGES")
  [[ -z ${PREPARE_WORKERS:-} ]] || extra+=(--prepare-workers "$PREPARE_WORKERS")
  [[ -z ${SERVICE_PREFIX:-} ]] || extra+=(--service-prefix "$SERVICE_PREFIX")
  [[ ${CUDA_GRAPHS:-1} != 0 ]] || extra+=(--no-cuda-graphs)
  log "$labels labels, $events events, broker $KAFKA_BOOTSTRAP"
  PYTHONUNBUFFERED=1 "$python" -m stream_classifier.cli bench --service \
    --bootstrap "$KAFKA_BOOTSTRAP" --shape "${SHAPE:-large}" --device "${DEVICE:-auto}" \
    --labels "$labels" --events "$events" \
    --guarantees "${GUARANTEES:-at_least_once,exactly_once}" \
    --partitions "${PARTITIONS:-12}" --loads "${LOADS:-0.5,0.9}" \
    --latency-seconds "${LATENCY_SECONDS:-20}" "${extra[@]}" \
    --json "$out/service-$labels${CUDA_GRAPHS:+-graphs$CUDA_GRAPHS}.json"
done
