"""Shared measuring tools for every benchmark: side-by-side timing, paired ratios, peak memory, machine info.

Every figure in benchmarks/ is a *ratio measured side by side in one run*: the variants being compared
run in turn within each round (ours, then the reference, then ours again in the next round, in a
rotated order), so a machine that gets busier halfway slows every variant alike. Each round gives one
paired ratio; we report the median over rounds and the spread (the 25th to 75th percentile).

    round 1:  ours  ref   other          Timing: median ms, p25, p75, samples
    round 2:  ref   other ours           Ratio:  median of ours_i / ref_i, p25, p75
    round 3:  other ours  ref            (i = round, so each ratio compares one moment with itself)

On CUDA, kernels run asynchronously: each call is timed with a pair of CUDA events and the round ends
with a synchronize, so the host clock never measures launch time only. Warm-up rounds run first so that
allocator growth, cuBLAS handles, lazy initialisation and torch.compile stay out of the figures.

Peak memory:
    CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(): every tensor the
          caching allocator handed out (parameters, gradients, optimizer states, activations,
          temporaries), not the allocator's reserved-but-unused cache.
    CPU   the rise of the process's peak resident set size (VmHWM, reset through
          /proc/self/clear_refs on Linux) above the resident size before the model was built. Freed
          memory that the C allocator keeps can be reused without raising RSS, so measure each variant
          in a fresh process (`run_in_fresh_process`); on systems without /proc (macOS) the peak comes
          from getrusage and cannot be reset, so it is only meaningful in a fresh process.
"""

import gc
import importlib.metadata
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import torch


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def percentile(values: List[float], fraction: float) -> float:
    """Linear-interpolated percentile of a non-empty list (fraction 0.5 is the median)."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one variant: median and spread over the timed rounds."""

    median_ms: float  # the figure we report
    p25_ms: float  # 25th percentile: with p75, the spread a second run would likely fall in
    p75_ms: float  # 75th percentile
    min_ms: float  # the best round (least disturbed by other processes)
    samples_ms: tuple  # every timed round, in order, for the paired ratios

    @classmethod
    def from_samples(cls, samples_ms: List[float]) -> "Timing":
        return cls(median_ms=statistics.median(samples_ms), p25_ms=percentile(samples_ms, 0.25),
                   p75_ms=percentile(samples_ms, 0.75), min_ms=min(samples_ms), samples_ms=tuple(samples_ms))

    @classmethod
    def from_dict(cls, saved: dict) -> "Timing":
        """The inverse of `as_dict` (after a JSON round trip, which turns the samples into a list)."""
        return cls(**{**saved, "samples_ms": tuple(saved["samples_ms"])})

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms [{self.p25_ms:.3f}-{self.p75_ms:.3f}]"


@dataclass(frozen=True)
class Ratio:
    """ours / reference, from the rounds where both ran side by side: median and spread."""

    median: float  # below 1: ours takes less time (or memory) than the reference
    p25: float
    p75: float

    @classmethod
    def paired(cls, ours: Timing, reference: Timing) -> "Ratio":
        """Per-round ratios ours_i / reference_i (both timed in the same round i)."""
        ratios = [a / b for a, b in zip(ours.samples_ms, reference.samples_ms) if b > 0]
        return cls(median=statistics.median(ratios), p25=percentile(ratios, 0.25), p75=percentile(ratios, 0.75))

    @classmethod
    def exact(cls, numerator: float, denominator: float) -> "Ratio":
        """A ratio of two single measurements (memory, bytes): no spread."""
        value = numerator / denominator
        return cls(median=value, p25=value, p75=value)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.p25 == self.p75:
            return f"{self.median:.3f}x"
        return f"{self.median:.3f}x [{self.p25:.3f}-{self.p75:.3f}]"


def synchronize(device: str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(functions: Dict[str, Callable[[], object]], device: str, warmup: int = 2,
                      repeats: int = 10, calls_per_sample: int = 1) -> Dict[str, Timing]:
    """Time each function in turn within every round; rotate the order from round to round.

    Args:
        functions: name -> zero-argument callable (one training step, one forward pass, ...).
        device: "cpu" or "cuda": on CUDA each sample is measured with CUDA events.
        warmup: untimed rounds first.
        repeats: timed rounds; each gives one sample per function.
        calls_per_sample: calls averaged into one sample (for operations far shorter than a millisecond).

    Returns:
        name -> Timing (milliseconds per call).

    Example:
        >>> timings = time_side_by_side({"sum": lambda: sum(range(1000))}, "cpu", warmup=1, repeats=3)
        >>> len(timings["sum"].samples_ms)
        3
    """
    if repeats < 1 or warmup < 0 or calls_per_sample < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, calls_per_sample >= 1; got repeats={repeats}, "
                         f"warmup={warmup}, calls_per_sample={calls_per_sample}")
    names = list(functions)
    samples = {name: [] for name in names}
    use_events = str(device).startswith("cuda")
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]  # rotate: nobody always runs first (cold) or last
        round_samples = {}
        for name in order:
            function = functions[name]
            if use_events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                synchronize(device)
                start.record()
                for _ in range(calls_per_sample):
                    function()
                end.record()
                end.synchronize()
                round_samples[name] = start.elapsed_time(end) / calls_per_sample
            else:
                start_time = time.perf_counter()
                for _ in range(calls_per_sample):
                    function()
                round_samples[name] = (time.perf_counter() - start_time) * 1000 / calls_per_sample
        if round_index >= warmup:
            for name in names:
                samples[name].append(round_samples[name])
    return {name: Timing.from_samples(values) for name, values in samples.items()}


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> Optional[int]:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in bytes, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # the file says kB
    except OSError:
        return None
    return None


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # subtle: macOS reports bytes, Linux kB


class PeakMemory:
    """Measure the peak memory of what happens between `start()` and `stop()`.

    CUDA: peak allocated bytes (absolute: includes what was already allocated at `start()`, such as the
    model's weights if they were built before). CPU: peak resident bytes above the resident size at
    `start()`; build the model *after* `start()` so that it is counted.

    Example:
        >>> meter = PeakMemory("cpu").start()
        >>> block = torch.ones(1_000_000)              # 4 MB
        >>> meter.stop() >= 0
        True
    """

    def __init__(self, device: str):
        self.device = str(device)
        self.baseline_bytes = 0
        self.method = ""

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        resident = _proc_status_bytes("VmRSS")
        if resident is not None:
            try:
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
                self.baseline_bytes = resident
                self.method = "VmHWM rise over VmRSS"
                return self
            except OSError:
                pass
        self.baseline_bytes = _rusage_peak_bytes()  # no reset possible: valid in a fresh process only
        self.method = "ru_maxrss rise"
        return self

    def reset_peak(self) -> None:
        """Forget the peak so far (construction transients) but keep the baseline (CPU: Linux only)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")

    def stop(self) -> int:
        """Peak bytes (CUDA: absolute allocated; CPU: rise over the baseline)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.method.startswith("VmHWM"):
            return max(0, _proc_status_bytes("VmHWM") - self.baseline_bytes)
        return max(0, _rusage_peak_bytes() - self.baseline_bytes)


def release_memory(device: str) -> None:
    """Drop garbage and (on CUDA) the allocator's cache, so the next measurement starts clean."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _call_in_child(function, args, threads):
    torch.set_num_threads(threads)
    return function(*args)


def run_in_fresh_process(function: Callable, *args):
    """Run a picklable top-level `function(*args)` in a new Python process and return its result.

    A fresh process starts with no freed-but-kept memory, so its peak RSS counts only what `function`
    allocates. The child uses as many torch threads as this process.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_call_in_child, (function, args, torch.get_num_threads()))


def tensor_bytes(tensors) -> int:
    """Bytes of a collection of tensors, each storage counted once."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


# ----------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> Optional[str]:
    """Installed version of a package, or None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict:
    """What the figures were measured on: device, library versions, load, date (UTC)."""
    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": {name: package_version(name) for name in ("peft", "bitsandbytes", "torchao", "numpy")},
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    gpu_multiprocessors=properties.multi_processor_count)
    return info


def check_device(device: str) -> str:
    """'cpu' or 'cuda', with a clear error for anything else or for CUDA on a machine without one."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    return device


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB"


def parse_device_quick_repeats(argv, description: str, default_config, quick_help: str = "tiny model, few repeats"):
    """The command line most benchmarks share: --device cpu|cuda, --quick, --repeats N -> their config.

    `default_config(device, quick)` builds the module's BenchmarkConfig; an unknown option is an error
    that lists the valid ones (as the scripts' own parser does).
    """
    import argparse
    from dataclasses import replace

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, help="timed rounds")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; valid options are: --device {{cpu,cuda}}, --quick, "
                     f"--repeats N")
    config = default_config(args.device, args.quick)
    return replace(config, repeats=args.repeats) if args.repeats is not None else config


def preset(config_class, device: str, quick: bool, cuda: Optional[dict] = None, quick_changes: Optional[dict] = None):
    """A benchmark's config for a device: `config_class(device=device)`, with `cuda`'s changes on CUDA (the
    GPU sizes) and `quick_changes` with quick (a tiny smoke run, which wins over the GPU sizes).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Config:
        ...     device: str = "cpu"
        ...     rows: int = 512
        >>> preset(Config, "cuda", False, cuda=dict(rows=4096))
        Config(device='cuda', rows=4096)
        >>> preset(Config, "cuda", True, cuda=dict(rows=4096), quick_changes=dict(rows=8))
        Config(device='cuda', rows=8)
    """
    from dataclasses import replace

    config = config_class(device=device)
    if device == "cuda" and not quick and cuda:
        config = replace(config, **cuda)
    return replace(config, **quick_changes) if quick and quick_changes else config
