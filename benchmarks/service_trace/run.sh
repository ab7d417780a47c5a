#!/usr/bin/env bash
# run.sh TRACE_JSON COMMAND...: run COMMAND (the service) with the pass tracer of this folder
# (sitecustomize.py), which writes TRACE_JSON when the service's engine stage shuts down.
# As the service benchmark's prefix:
#   SERVICE_PREFIX="bash $PWD/benchmarks/service_trace/run.sh $OUT/trace-{guarantee}.json" \
#     LABELS=4 bash benchmarks/gpu-service.sh
#   python3 benchmarks/service_trace/analyze.py $OUT/trace-*.json
# It runs COMMAND as a child (not exec), so that the benchmark signals the service itself.
trace=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
SC_TRACE=$trace PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} "$@"
