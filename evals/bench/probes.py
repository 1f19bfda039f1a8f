"""Memory and time probes of the bench: the peak memory of one run, and device-synchronised clocks.

Peak memory is `torch.cuda.max_memory_allocated` on CUDA and the process's resident high-water
mark on CPU (Linux `VmHWM`, reset per run through `/proc/self/clear_refs`), each also as the
growth over what was resident at the start. `device_time` times a callable with CUDA events (the
median of a few calls after a warm-up one), or with the wall clock where there is no GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _proc_status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one run: CUDA allocator peak, or resident set high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_bytes = 0
        self.peak_resettable = True

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_resettable = _reset_rss_peak()
            self.start_bytes = _proc_status_bytes("VmRSS") or 0

    def peak(self) -> tuple[int, int]:
        """(peak bytes, peak minus the bytes held at `start`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM") or 0
        return peak, max(0, peak - self.start_bytes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls after one warm-up call: CUDA events when CUDA is
    available, else the wall clock."""
    fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return statistics.median(times)
