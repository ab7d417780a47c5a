"""GPU gauges from NVML (``nvidia-ml-py``): memory used and total, and utilisation, per GPU.

Optional by design: without the ``pynvml`` module, without an NVIDIA driver or without a
GPU, :func:`start_gpu_sampler` returns ``None`` and nothing is exported. The GPUs sampled
are those the process may use: ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUIDs) when
set, else every GPU NVML sees (in a container: the ones the runtime gave it). The ``gpu``
label is the NVML index.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from stream_classifier.metrics import Metrics

log = logging.getLogger(__name__)

#: NVML's utilisation covers the last 1/6 s to 1 s, so sample often; each call is cheap.
DEFAULT_INTERVAL_S = 2.0


class Nvml(Protocol):
    """The part of ``pynvml`` used here (a fake in the tests)."""

    def nvmlInit(self) -> None: ...  # noqa: N802 - NVML's names
    def nvmlShutdown(self) -> None: ...  # noqa: N802
    def nvmlDeviceGetCount(self) -> int: ...  # noqa: N802
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...  # noqa: N802
    def nvmlDeviceGetUUID(self, handle: Any) -> Any: ...  # noqa: N802
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...  # noqa: N802
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...  # noqa: N802


class GpuSampler:
    """Sets the GPU gauges every ``interval_s`` in a daemon thread, until stopped."""

    def __init__(
        self, metrics: Metrics, nvml: Nvml, handles: Mapping[str, Any], interval_s: float
    ) -> None:
        self._metrics = metrics
        self._nvml = nvml
        self._handles = dict(handles)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._warned = False

    @property
    def gpus(self) -> list[str]:
        return list(self._handles)

    def sample_once(self) -> None:
        for gpu, handle in self._handles.items():
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            self._metrics.gpu_memory_used.labels(gpu).set(float(memory.used))
            self._metrics.gpu_memory_total.labels(gpu).set(float(memory.total))
            self._metrics.gpu_utilization.labels(gpu).set(float(rates.gpu) / 100.0)

    def _loop(self) -> None:
        while True:
            try:
                self.sample_once()
            except Exception as exc:  # noqa: BLE001 - a lost GPU must not stop the service
                if not self._warned:
                    log.warning("GPU sampling failed (will keep trying): %s", exc)
                    self._warned = True
            if self._stop.wait(self._interval_s):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("nvmlShutdown failed", exc_info=True)


def start_gpu_sampler(
    metrics: Metrics,
    interval_s: float = DEFAULT_INTERVAL_S,
    nvml: Nvml | None = None,
    environ: Mapping[str, str] = os.environ,
) -> GpuSampler | None:
    """Start sampling the usable GPUs, or return None (and say why at debug level)."""
    nvml = nvml if nvml is not None else import_nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - pynvml.NVMLError_*: no driver, no GPU
        log.info("no GPU metrics: NVML is not available (%s)", exc)
        return None
    try:
        handles = visible_handles(nvml, environ.get("CUDA_VISIBLE_DEVICES"))
    except Exception as exc:  # noqa: BLE001
        log.warning("no GPU metrics: listing GPUs through NVML failed: %s", exc)
        nvml.nvmlShutdown()
        return None
    if not handles:
        log.info("no GPU metrics: no GPU visible to this process")
        nvml.nvmlShutdown()
        return None
    sampler = GpuSampler(metrics, nvml, handles, interval_s)
    sampler.sample_once()
    sampler.start()
    log.info("sampling GPU metrics of GPU %s every %.1fs", ",".join(handles), interval_s)
    return sampler


def import_nvml() -> Nvml | None:
    """The ``pynvml`` module, or None where it is not installed (public: ``bench --service``
    samples the GPU the same way)."""
    try:
        module: Nvml = importlib.import_module("pynvml")
    except ImportError:
        log.debug("no GPU metrics: nvidia-ml-py (pynvml) is not installed")
        return None
    return module


def visible_handles(nvml: Nvml, cuda_visible: str | None) -> dict[str, Any]:
    """NVML index (as the label) → handle, for the GPUs CUDA_VISIBLE_DEVICES allows (public:
    ``bench --service`` samples the GPUs the service uses, chosen the same way)."""
    every = {str(i): nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())}
    if cuda_visible is None:
        return every
    wanted = [entry.strip() for entry in cuda_visible.split(",") if entry.strip()]
    chosen: dict[str, Any] = {}
    for entry in wanted:
        if entry.isdigit():
            if entry in every:
                chosen[entry] = every[entry]
            continue
        for index, handle in every.items():
            if _uuid(nvml, handle).startswith(entry):
                chosen[index] = handle
    return chosen


def _uuid(nvml: Nvml, handle: Any) -> str:
    uuid = nvml.nvmlDeviceGetUUID(handle)
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)
