"""Benchmark: our pure-PyTorch NF4 against bitsandbytes (and torchao's NF4, if it imports), side by side.

Run from the repository root:

    python -m benchmarks.nf4                  # CPU, a 4096x4096 float32 weight (about a minute)
    python -m benchmarks.nf4 --quick          # CPU, 1024x1024, few repeats (a few seconds)
    python -m benchmarks.nf4 --device cuda    # GPU: also bitsandbytes' CUDA kernels and torch.compile
    python -m benchmarks.nf4 --threads 1      # one CPU thread: steadier figures on a busy machine

What it measures, all in one run, each implementation timed in turn within every round so that a
busy machine slows them all alike (medians over the rounds are reported):

- quantize   : weight -> NF4 with double quantization (block 64, absmax blocks of 256)
- dequantize : NF4 -> weight in the original dtype
- qlora_fwd_bwd : a QLoRA linear, y = x · dequant(W)ᵀ + s · B(A x), forward and backward, with the
  LoRA branch (rank 16) trainable and the 4-bit base frozen; ours (`quant.Linear4bit`) against
  `bitsandbytes.nn.Linear4bit`. On CUDA in bfloat16, also under torch.compile.
- peak extra memory while quantizing: on CPU, measured in a fresh process per implementation as the
  rise of the peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident
  size before the call; it counts the outputs (the NF4 data) as well as every temporary. Our figure is
  also counted analytically from the chunk size. On CUDA, torch.cuda.max_memory_allocated.

Goals (issue #4): quantize no slower than bitsandbytes, dequantize within 1.5x of its native kernel,
peak extra memory while quantizing at most 2x the weight's own size.
"""

import argparse
import gc
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from quant import NF4_CODE, Linear4bit, quantize_nf4
from quant.nf4 import CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, unpack_nibbles
from quant.nf4_code import code_midpoints


@dataclass(frozen=True)
class BenchmarkConfig:
    device: str = "cpu"  # "cpu" or "cuda"; cuda adds bitsandbytes' CUDA kernels and torch.compile
    rows: int = 4096  # weight shape [rows, cols]; 4096x4096 is one projection of a 7B Llama
    cols: int = 4096
    block_size: int = 64  # QLoRA's block size
    repeats: int = 7  # timed rounds; medians reported
    warmup: int = 2  # untimed rounds first (allocator, caches, lazy initialisation)
    batch_tokens: int = 64  # rows of x in the QLoRA linear forward+backward (CPU); 4x that on CUDA
    lora_rank: int = 16  # rank of the LoRA branch in the QLoRA linear
    measure_memory: bool = True  # run the peak-memory measurement (fresh processes on CPU)
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is steadier on a busy machine
    seed: int = 0  # the weight is torch.randn with this seed, times 0.02 (a typical init scale)


QUICK = dict(rows=1024, cols=1024, repeats=5, warmup=1)


# ----------------------------------------------------------------------------------------------------
# Optional competitors
# ----------------------------------------------------------------------------------------------------

def _import_bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional
        return bitsandbytes, None
    except Exception as error:  # not installed, or no native library for this platform
        return None, f"bitsandbytes not available ({type(error).__name__}: {error})"


def _import_torchao_to_nf4():
    for module_name in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            module = __import__(module_name, fromlist=["to_nf4"])
            return module.to_nf4, None
        except Exception:
            continue
    return None, "torchao's NF4 (to_nf4) not importable"


def _quantizers(config, bitsandbytes):
    """name -> function(weight) returning something dequantizable, for every available implementation."""
    quantizers = {"ours": lambda weight: quantize_nf4(weight, block_size=config.block_size, double_quant=True)}
    if bitsandbytes is not None:
        def bnb_quantize(weight):
            return bitsandbytes.functional.quantize_4bit(weight, blocksize=config.block_size, quant_type="nf4",
                                                         compress_statistics=True)
        quantizers["bitsandbytes"] = bnb_quantize
    to_nf4, _ = _import_torchao_to_nf4()
    if to_nf4 is not None:
        quantizers["torchao"] = lambda weight: to_nf4(weight, config.block_size, 256)
    return quantizers


def _dequantizers(config, quantized, bitsandbytes):
    """name -> zero-argument function that dequantizes the already-quantized weight."""
    dequantizers = {}
    for name, value in quantized.items():
        if name == "ours":
            dequantizers["ours"] = value.dequantize
        elif name == "bitsandbytes":
            packed, state = value
            dequantizers["bitsandbytes"] = lambda packed=packed, state=state: (
                bitsandbytes.functional.dequantize_4bit(packed, state))
        elif name == "torchao":
            dequantizers["torchao"] = value.get_original_weight
    if config.device == "cuda":
        compiled = torch.compile(quantized["ours"].dequantize)
        dequantizers["ours+compile"] = compiled
    return dequantizers


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _working(functions: dict, label: str, config: BenchmarkConfig, notes: list) -> dict:
    """The functions that run once without raising; the others are reported in the notes and skipped."""
    working = {}
    for name, function in functions.items():
        try:
            function()
            working[name] = function
        except Exception as error:
            notes.append(f"{name} {label} failed on {config.device}: {type(error).__name__}: {error}")
    return working


def time_side_by_side(functions: dict, config: BenchmarkConfig) -> dict:
    """(median, fastest) milliseconds per function; every round runs each function once, in turn.

    The fastest round is what the code can do; the median also shows how much a busy machine costs it.
    """
    samples = {name: [] for name in functions}
    for round_index in range(config.warmup + config.repeats):
        for name, function in functions.items():
            _synchronize(config.device)
            start = time.perf_counter()
            function()
            _synchronize(config.device)
            if round_index >= config.warmup:
                samples[name].append((time.perf_counter() - start) * 1000)
    return ({name: statistics.median(values) for name, values in samples.items()},
            {name: min(values) for name, values in samples.items()})


# ----------------------------------------------------------------------------------------------------
# QLoRA linear forward + backward
# ----------------------------------------------------------------------------------------------------

def _qlora_step_functions(config, weight, bitsandbytes, notes):
    """name -> function running one QLoRA linear forward+backward on a fixed input."""
    device = torch.device(config.device)
    dtype = torch.bfloat16 if config.device == "cuda" else torch.float32
    tokens = config.batch_tokens * (4 if config.device == "cuda" else 1)
    generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    x = torch.randn(tokens, config.cols, generator=generator).to(device, dtype)
    lora_a = (torch.randn(config.lora_rank, config.cols, generator=generator) * 0.01).to(device, dtype)
    lora_b = (torch.randn(config.rows, config.lora_rank, generator=generator) * 0.01).to(device, dtype)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    scaling = 2.0

    linear = torch.nn.Linear(config.cols, config.rows, bias=False, device=device)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
    bases = {"ours": Linear4bit.from_linear(linear, block_size=config.block_size, compute_dtype=dtype)}
    if bitsandbytes is not None:
        try:
            bnb_layer = bitsandbytes.nn.Linear4bit(config.cols, config.rows, bias=False, compute_dtype=dtype,
                                                   compress_statistics=True, quant_type="nf4")
            bnb_layer.weight = bitsandbytes.nn.Params4bit(linear.weight.detach().cpu().clone(), requires_grad=False,
                                                          quant_type="nf4", compress_statistics=True,
                                                          blocksize=config.block_size)
            bases["bitsandbytes"] = bnb_layer.to(device)
        except Exception as error:
            notes.append(f"bitsandbytes Linear4bit unavailable on {config.device}: {type(error).__name__}: {error}")

    def make_step(base):
        def step():
            y = base(x) + scaling * ((x @ lora_a.t()) @ lora_b.t())  # (T, out): QLoRA eq. 5
            loss = y.float().square().mean()
            loss.backward()
            lora_a.grad = None
            lora_b.grad = None
            return loss
        return step

    steps = {name: make_step(base) for name, base in bases.items()}
    if config.device == "cuda":
        for name, base in list(bases.items()):
            try:
                compiled_step = torch.compile(make_step(base))
                compiled_step()  # compile outside the timed rounds
                steps[f"{name}+compile"] = compiled_step
            except Exception as error:
                notes.append(f"torch.compile failed for {name}: {type(error).__name__}: {error}")
    return steps


# ----------------------------------------------------------------------------------------------------
# Peak memory while quantizing
# ----------------------------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure_cpu_quantize_memory(name: str, config: BenchmarkConfig, threads: int) -> int:
    """Runs in a fresh process: rise of peak RSS above the RSS before quantizing (bytes)."""
    torch.set_num_threads(threads)  # as many as the parent uses (a spawned process starts at the default)
    bitsandbytes, _ = _import_bitsandbytes()
    quantize = _quantizers(config, bitsandbytes)[name]
    quantize(torch.randn(256, 256))  # load libraries and lookup tables before measuring
    weight = torch.randn(config.rows, config.cols, generator=torch.Generator().manual_seed(config.seed)) * 0.02
    gc.collect()
    resident_before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    result = quantize(weight)
    peak = _proc_status_bytes("VmHWM")
    del result
    return peak - resident_before


def ours_analytic_extra_bytes(numel: int, block_size: int, chunk_elements: int, weight_element_size: int = 4) -> int:
    """Bytes our quantize_nf4 holds at its peak beyond the input: outputs + one chunk's temporaries.

    outputs: packed n/2 + float32 absmax 4n/64 + the double-quant codes n/64 (the rest is tiny).
    per chunk of c weights: scaled values (4c) and int32 codes (4c) alive together, and a float32 copy
    of the chunk (4c) when the weight is not float32.
    """
    chunk = min(chunk_elements, max(numel // 4, 1 << 16), numel)  # as quantize_nf4 picks it
    num_blocks = -(-numel // block_size)
    outputs = (numel + 1) // 2 + 4 * num_blocks + num_blocks
    temporaries = 4 * chunk + 4 * chunk + (4 * chunk if weight_element_size != 4 else 0)
    return outputs + temporaries


def measure_quantize_memory(config: BenchmarkConfig, names, notes) -> dict:
    """Peak extra bytes while quantizing, per implementation."""
    results = {}
    if config.device == "cuda":
        bitsandbytes, _ = _import_bitsandbytes()
        quantizers = {name: function for name, function in _quantizers(config, bitsandbytes).items()
                      if name in names}
        weight = (torch.randn(config.rows, config.cols, generator=torch.Generator().manual_seed(config.seed))
                  * 0.02).cuda()
        for name in names:
            quantizers[name](weight[:256, :256].contiguous())  # warm-up outside the measurement
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            result = quantizers[name](weight)
            torch.cuda.synchronize()
            results[name] = torch.cuda.max_memory_allocated() - base
            del result
        return results
    context = multiprocessing.get_context("spawn")
    for name in names:
        try:
            with context.Pool(1) as pool:
                results[name] = pool.apply(_measure_cpu_quantize_memory, (name, config, torch.get_num_threads()))
        except Exception as error:
            notes.append(f"memory measurement failed for {name}: {type(error).__name__}: {error}")
    return results


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def main(config: BenchmarkConfig) -> dict:
    """Run every measurement, print a report, and return the figures as a dict."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    notes = []
    bitsandbytes, note = _import_bitsandbytes()
    if note:
        notes.append(note)
    if _import_torchao_to_nf4()[1]:
        notes.append(_import_torchao_to_nf4()[1])

    weight = (torch.randn(config.rows, config.cols, generator=torch.Generator().manual_seed(config.seed))
              * 0.02).to(device)
    weight_bytes = weight.numel() * weight.element_size()

    quantizers = _quantizers(config, bitsandbytes)
    quantized = {}
    for name, function in list(quantizers.items()):  # first call: keep the result, drop what fails
        try:
            quantized[name] = function(weight)
        except Exception as error:
            notes.append(f"{name} quantize failed on {config.device}: {type(error).__name__}: {error}")
            del quantizers[name]
    quantize_ms, quantize_fastest = time_side_by_side({name: (lambda function=function: function(weight))
                                     for name, function in quantizers.items()}, config)
    if "bitsandbytes" in quantized:  # sanity: same codes as the reference, or the timing means nothing
        packed, _ = quantized["bitsandbytes"]
        note = compare_codes(quantized["ours"], packed.reshape(-1), weight)
        if note:
            notes.append(note)
    dequantizers = _working(_dequantizers(config, quantized, bitsandbytes), "dequantize", config, notes)
    dequantize_ms, dequantize_fastest = time_side_by_side(dequantizers, config)

    qlora_steps = _qlora_step_functions(config, weight, bitsandbytes, notes)
    qlora_ms, qlora_fastest = time_side_by_side(_working(qlora_steps, "QLoRA step", config, notes), config)

    memory = {}
    if config.measure_memory:
        memory = measure_quantize_memory(config, list(quantizers), notes)
    chunk = CHUNK_ELEMENTS if config.device == "cpu" else GPU_CHUNK_ELEMENTS
    analytic = ours_analytic_extra_bytes(weight.numel(), config.block_size, chunk)

    ratios = _ratios({"quantize": quantize_ms, "dequantize": dequantize_ms, "qlora_fwd_bwd": qlora_ms})
    for name, value in memory.items():  # a size ratio: the peak extra bytes over the weight's own bytes
        ratios[f"quantize peak extra memory/weight: {name}"] = value / weight_bytes
    ratios_fastest = _ratios({"quantize": quantize_fastest, "dequantize": dequantize_fastest,
                              "qlora_fwd_bwd": qlora_fastest})
    results = {
        "config": asdict(config),
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine skew every figure
        "device_name": torch.cuda.get_device_name() if config.device == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "weight_bytes": weight_bytes,
        "quantize_ms": quantize_ms,
        "dequantize_ms": dequantize_ms,
        "qlora_fwd_bwd_ms": qlora_ms,
        "fastest_ms": {"quantize": quantize_fastest, "dequantize": dequantize_fastest, "qlora_fwd_bwd": qlora_fastest},
        "quantize_peak_extra_bytes": memory,
        "quantize_peak_extra_over_weight": {name: value / weight_bytes for name, value in memory.items()},
        "ours_analytic_peak_extra_bytes": analytic,
        "ratios": ratios,  # of the medians
        "ratios_fastest": ratios_fastest,  # of the fastest rounds
        "notes": notes,
    }
    print_report(results)
    return results


def compare_codes(ours, bnb_packed: torch.Tensor, weight: torch.Tensor) -> str:
    """"" when our 4-bit codes equal bitsandbytes', else a note saying how many differ and where.

    On the CPU they are identical (tests/quant/test_nf4_vs_bitsandbytes.py). bitsandbytes' CUDA kernel is
    built with fast math, so its reciprocal 1/absmax can be one ulp off the IEEE one: a value that lands
    exactly on a midpoint then rounds up instead of down (measured on an H200: 1 code in 16.8M for a
    4096x4096 float32 weight; bitsandbytes' own CPU path agrees with ours there). A difference anywhere
    else would be a bug, and the note says so.
    """
    if torch.equal(bnb_packed, ours.packed):
        return ""
    numel = ours.numel
    ours_codes = unpack_nibbles(ours.packed, numel)
    bnb_codes = unpack_nibbles(bnb_packed, numel)
    differ = torch.nonzero(ours_codes != bnb_codes).flatten()
    # The float32 absmax each code was scaled by (before double quantization touched it).
    absmax = ours.absmax if not ours.double_quant else \
        quantize_nf4(weight, block_size=ours.block_size, double_quant=False).absmax
    block_absmax = absmax[differ // ours.block_size]
    values = weight.reshape(-1).float()[differ]
    in_full_block = differ < (numel // ours.block_size) * ours.block_size
    # exactly what quantize_nf4 bucketed: full blocks times the reciprocal, the partial last one divided
    scaled = torch.where(in_full_block, values * (1.0 / block_absmax), values / block_absmax)
    on_midpoint = torch.isin(scaled, code_midpoints(NF4_CODE).to(scaled.device))
    where = "all on a midpoint (a tie, rounded by a reciprocal one ulp apart)" if bool(on_midpoint.all()) \
        else f"WARNING: {int((~on_midpoint).sum())} of them are not ties"
    return f"{differ.numel()} of {numel:,} 4-bit codes differ from bitsandbytes' ({where})"


def _ratios(tables: dict) -> dict:
    """"<measure>: <name>/bitsandbytes" for every implementation that is not bitsandbytes itself."""
    ratios = {}
    for label, table in tables.items():
        for name in table:
            if name.startswith("bitsandbytes"):
                continue
            reference = "bitsandbytes+compile" if name.endswith("+compile") and "bitsandbytes+compile" in table \
                else "bitsandbytes"
            if reference in table:
                ratios[f"{label}: {name}/{reference}"] = table[name] / table[reference]
    return ratios


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def print_report(results: dict) -> None:
    config = results["config"]
    print(f"NF4 benchmark: {config['rows']}x{config['cols']} float32 weight, block {config['block_size']}, "
          f"double quantization, {config['device']} ({results['device_name']}, "
          f"{results['torch_threads']} threads), median of {config['repeats']}, "
          f"load average {results['load_average_1min']:.2f}")
    for title, key, short in (("quantize", "quantize_ms", "quantize"), ("dequantize", "dequantize_ms", "dequantize"),
                              ("QLoRA linear forward+backward", "qlora_fwd_bwd_ms", "qlora_fwd_bwd")):
        print(f"\n{title:<34}{'median':>10}{'fastest':>12}")
        for name, milliseconds in results[key].items():
            fastest = results["fastest_ms"][short][name]
            print(f"  {name:<32}{milliseconds:7.2f} ms{fastest:9.2f} ms")
    if results["quantize_peak_extra_bytes"]:
        print(f"\npeak extra memory while quantizing (weight itself: {results['weight_bytes'] / 2**20:.1f} MiB)")
        for name, value in results["quantize_peak_extra_bytes"].items():
            ratio = results["quantize_peak_extra_over_weight"][name]
            print(f"  {name:<24}{value / 2**20:10.1f} MiB  ({ratio:.2f}x the weight, measured)")
        print(f"  {'ours (analytic)':<24}{results['ours_analytic_peak_extra_bytes'] / 2**20:10.1f} MiB")
    print(f"\n{'ratios (below 1: ours is faster)':<50}{'median':>8}{'fastest':>10}")
    for name, ratio in results["ratios"].items():
        fastest = results["ratios_fastest"].get(name)  # a memory ratio has no fastest round
        print(f"  {name:<48}{ratio:7.2f}x" + (f"{fastest:9.2f}x" if fastest is not None else ""))
    for note in results["notes"]:
        print(f"note: {note}")


def parse_args(argv=None) -> BenchmarkConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="1024x1024 weight, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 7)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = "--device {cpu,cuda}, --quick, --repeats N, --no-memory, --threads N"
        parser.error(f"unknown option(s) {' '.join(unknown)}; valid options are: {valid}")
    config = BenchmarkConfig(device=args.device, measure_memory=not args.no_memory, threads=args.threads)
    if args.quick:
        config = replace(config, **QUICK)
    if args.repeats is not None:
        config = replace(config, repeats=args.repeats)
    return config


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
