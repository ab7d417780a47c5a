# gpu-env.sh: sourced by the GPU benchmark scripts (gpu-service.sh, gpu-priority.sh) on a
# machine without Java or network: installs the carried wheels the image lacks and starts a
# broker from the carried pack (benchmarks/gpu-service-pack.sh), unless KAFKA_BOOTSTRAP
# names one. Sourced from the repository root, with log() defined; sets root, out (made),
# python, wheels and KAFKA_BOOTSTRAP, and stops the broker it started on exit.

root=$PWD
out=${OUT:-$root/.out}
python=${PYTHON:-python3}
wheels=${WHEELS:-$root/.whl}
mkdir -p "$out"

# The Python packages the image lacks (confluent-kafka, pydantic, pydantic-settings, ...).
if ! "$python" -c 'import confluent_kafka, pydantic_settings' 2>/dev/null; then
  compgen -G "$wheels/*.whl" >/dev/null ||
    { log "no confluent_kafka/pydantic_settings and no wheels in $wheels"; exit 1; }
  log "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into /tmp/site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

if [[ -z ${KAFKA_BOOTSTRAP:-} ]]; then
  pack=${PACK:-$root/.out/gpu-broker}
  [[ -f $pack/unpack.sh ]] || { log "no broker pack at $pack (benchmarks/gpu-service-pack.sh)"; exit 1; }
  if ! command -v xz >/dev/null; then  # tar -J needs it; Python's lzma does the same
    mkdir -p /tmp/xz-shim
    printf '%s\n' '#!/bin/sh' \
      "exec $python -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'" \
      >/tmp/xz-shim/xz
    chmod +x /tmp/xz-shim/xz
    export PATH=/tmp/xz-shim:$PATH
  fi
  eval "$(bash "$pack/unpack.sh" | grep '^export ')"
  export KAFKA_PORT=${KAFKA_PORT:-9092}
  export KAFKA_LOCAL_DIR=${KAFKA_LOCAL_DIR:-/tmp/gpu-broker-state}
  deploy/kafka/kafka-local start
  trap 'deploy/kafka/kafka-local stop' EXIT
  KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
fi
