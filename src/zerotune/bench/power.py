"""The GPU's power draw and clock while a benchmark runs, read through NVML (the ``pynvml`` module of
``nvidia-ml-py``) in a background thread.

A LoRA step that keeps the tensor cores busy can run into the board's power cap (700 W on an H100 or H200
SXM): the driver then lowers the SM clock until the draw fits, and the step takes as long as its energy
divided by the cap. Faster kernels then buy little; fewer joules per step (fewer FLOPs, fewer HBM passes) do.
``zerotune bench`` records each side's mean watts, SM clock and joules per step with this, so a result says
whether it was power-bound. Without NVML (no NVIDIA driver, CPU machines) the sampler records nothing.
"""

from __future__ import annotations

import statistics
import threading
import time


class PowerSampler:
    """Readings of one GPU every ``period`` seconds: (wall time, energy counter in mJ, watts, SM MHz)."""

    def __init__(self, index: int = 0, period: float = 0.02):
        self.period = period
        self.samples: list[tuple[float, float, float, float]] = []
        self.limit_watts: float | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
            self.limit_watts = pynvml.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1e3
        except Exception:  # no pynvml, no driver, no such GPU: nothing to read
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> tuple[float, float, float, float]:
        nvml, handle = self._nvml, self._handle
        return (time.time(), float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
                nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)))

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.samples.append(self.read())
            time.sleep(self.period)

    def __enter__(self) -> PowerSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="zerotune-power", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def window(self, start: float, end: float, seconds_per_step: float | None = None) -> dict | None:
        """Over the wall-clock window [start, end]: mean watts from the energy counter, the median SM clock and
        its range, and given the mean step time, joules per step. None with fewer than two samples inside."""
        return summarise([s for s in self.samples if start <= s[0] <= end], self.limit_watts, seconds_per_step)


def summarise(samples: list[tuple[float, float, float, float]], limit_watts: float | None,
              seconds_per_step: float | None = None) -> dict | None:
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return None
    seconds = samples[-1][0] - samples[0][0]
    joules = (samples[-1][1] - samples[0][1]) / 1e3
    clocks = [s[3] for s in samples]
    row = {"mean_watts": round(joules / seconds, 1), "sm_mhz_median": statistics.median(clocks),
           "sm_mhz_range": [min(clocks), max(clocks)], "power_limit_watts": limit_watts,
           "seconds_sampled": round(seconds, 3)}
    if seconds_per_step:
        row["joules_per_step"] = round(row["mean_watts"] * seconds_per_step, 2)
    return row
