#!/usr/bin/env bash
# gpu-service-pack.sh: make what benchmarks/gpu-service.sh needs on a GPU machine without
# Java or network, in two git-ignored folders of this checkout (carry both):
#
#   .out/gpu-broker  a jlink'ed Java 17 and the broker's jars, made by the script PACKER names
#                    (not part of this repository: it runs `PACKER DIR`, needs jlink and the
#                    jars deploy/kafka/kafka-local fetched here, and writes DIR/unpack.sh)
#   .whl             wheels of the service's packages that the GPU image lacks, for its
#                    Python (3.12, x86-64 manylinux), at the versions of this environment
#
# Environment: PACKER (the broker-packing script; needed only while .out/gpu-broker is
# missing), PY_VERSION [3.12], VENV (the Python environment whose versions to copy; default:
# the one running pip below).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${VENV:+$VENV/bin/}python3

if [[ -f .out/gpu-broker/unpack.sh ]]; then
  echo "gpu-service-pack: .out/gpu-broker exists (remove it to pack again)" >&2
else
  [[ -n ${PACKER:-} ]] || { echo "gpu-service-pack: set PACKER to the broker-packing script" >&2; exit 1; }
  bash "$PACKER" .out/gpu-broker
fi

# Not in the GPU image (see the device's KINDS.md package list): the Kafka client and
# pydantic with its settings. typing-extensions travels too: pydantic needs a recent one.
packages=(confluent-kafka pydantic pydantic-core pydantic-settings python-dotenv
  annotated-types typing-inspection typing-extensions)
pins=()
for name in "${packages[@]}"; do
  version=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [[ -n $version ]] || { echo "gpu-service-pack: $name is not installed in $python" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
du -sh .out/gpu-broker .whl
