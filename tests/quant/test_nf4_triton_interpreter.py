"""quant/nf4_triton.py without a GPU: the Triton kernels run on CPU tensors in Triton's interpreter.

`TRITON_INTERPRET=1` makes `triton.jit` run a kernel program by program in numpy, on CPU tensors. It is
read when the kernels are defined (when quant.nf4_triton is imported), so it cannot be switched on in
the pytest process, which has imported quant already and must not leak the variable into other tests:
every check runs in one child process (this file run as a script, with the variable set), which prints
one JSON line of results; the tests below read it. One child for all cases keeps the suite fast
(the interpreter costs about 2 ms per program of 2048 weights, plus a second or two to start).

What the interpreter proves, and what it cannot:
- the kernels' logic, bit for bit against the plain reference (`dequantize_nf4_reference` of
  `dequantize_absmax_reference`): which byte, which nibble, which block and second-level block each
  weight takes, masks at the end of a weight whose size is no multiple of the block sizes, a partial
  last second-level block, the one rounding to float16;
- that Linear4bit's forward and backward reach the one-kernel path and give the bits of the plain one.
- Not the GPU's arithmetic. numpy never fuses a multiply and an add into an FMA, so the reason for
  `enable_fp_fusion=False` is not exercised here, and the interpreter converts float32 to bfloat16 by
  truncating, where the GPU rounds to nearest even: for bfloat16 the check here is that the output is
  that conversion of the reference's float32 values. tests/quant/test_nf4_triton_cuda.py checks both on a GPU.

Triton is in the `dev` extra (pyproject.toml), so this runs in CI; without Triton it is skipped.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (pip install triton: its "
                                "interpreter runs the kernels on CPU, no GPU needed)")

SMALL_SHAPES = [(256, 256), (33, 47), (4097,)]
DTYPES = ["float32", "float16", "bfloat16"]
BLOCK_SIZES = [32, 64, 4096]

# Every small shape with every dtype and block size, the second-level blocks of 256 (the 33 x 47 and 4097
# ones end in a partial block and a partial second-level block); blocks of 32 at the second level too,
# in float32 (the output dtype only decides the last rounding). Then a larger weight: 32 x 4096 with
# blocks of 32 is 4096 block scales, 16 second-level blocks of 256, 64 Triton programs (what the
# interpreter spends its time on, so fewer combinations of it).
CASES = [{"shape": shape, "dtype": dtype, "block_size": block_size, "dq_block_size": 256}
         for shape in SMALL_SHAPES for dtype in DTYPES for block_size in BLOCK_SIZES]
CASES += [{"shape": shape, "dtype": "float32", "block_size": block_size, "dq_block_size": 32}
          for shape in SMALL_SHAPES for block_size in BLOCK_SIZES]
CASES += [{"shape": (32, 4096), "dtype": "float32", "block_size": 32, "dq_block_size": 256},
          {"shape": (32, 4096), "dtype": "float16", "block_size": 64, "dq_block_size": 256},
          {"shape": (32, 4096), "dtype": "bfloat16", "block_size": 4096, "dq_block_size": 32}]
# Not from quantize_nf4: random bytes, so that every one of the 256 block-scale codes and all 16 weight codes
# occur, under random second-level scales and offset (the rounding of `map[q] * scale + offset` everywhere).
CASES += [{"shape": (517, 64), "dtype": dtype, "block_size": 32, "dq_block_size": 32, "random_bytes": True}
          for dtype in DTYPES]


def case_id(case: dict) -> str:
    shape = "x".join(str(size) for size in case["shape"])
    random_bytes = "-random_bytes" if case.get("random_bytes") else ""
    return f"{shape}-{case['dtype']}-bs{case['block_size']}-dq{case['dq_block_size']}{random_bytes}"


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    """Run every check in one child process with TRITON_INTERPRET=1; {case id: result}."""
    # subtle: PYTHONPATH puts this checkout first, so that the child imports its `quant`, not another
    # copy installed in the environment (an editable install of a different checkout, say)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, f"the interpreter child failed:\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_kernel_double_quant_dequantize_is_bit_identical_to_the_reference(case, interpreter_results):
    result = interpreter_results[case_id(case)]
    assert result["double_quant_kernel"], result["detail"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_absmax_kernel_is_bit_identical_to_the_reference(case, interpreter_results):
    # the kernel used without double quantization, on the same fields' float32 block scales
    result = interpreter_results[case_id(case)]
    assert result["absmax_kernel"], result["detail"]


def test_linear4bit_uses_one_kernel_per_dequantize_and_gives_the_plain_bits(interpreter_results):
    result = interpreter_results["linear4bit"]
    assert result["same_bits"], result["detail"]
    # forward and backward each dequantize once: double quantization through the one-kernel path, the
    # float32 block scales through the other, and with use_triton(False) neither
    assert result["kernel_calls"] == {"double_quant=True": {"double_quant_kernel": 2, "absmax_kernel": 0},
                                      "double_quant=False": {"double_quant_kernel": 0, "absmax_kernel": 2},
                                      "use_triton(False)": {"double_quant_kernel": 0, "absmax_kernel": 0}}


# ----------------------------------------------------------------------------------------------------
# The child: run with TRITON_INTERPRET=1 (see interpreter_results), prints one JSON line
# ----------------------------------------------------------------------------------------------------

def _nf4_fields(case: dict):
    """(packed, absmax_q, absmax_scale, absmax_offset) for a case: a quantized random weight, or random bytes."""
    import torch

    from quant import quantize_nf4

    generator = torch.Generator().manual_seed(sum(case["shape"]) + case["block_size"] + case["dq_block_size"])
    numel = torch.Size(case["shape"]).numel()
    if case.get("random_bytes"):
        num_blocks = -(-numel // case["block_size"])
        num_scales = -(-num_blocks // case["dq_block_size"])
        packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=generator)
        # every block-scale code at least once (num_blocks >= 256), in random order
        absmax_q = (torch.randperm(num_blocks, generator=generator) % 256).to(torch.uint8)  # [num_blocks]
        absmax_scale = torch.rand(num_scales, generator=generator) * 0.1  # float32 [num_scales]
        absmax_offset = torch.rand((), generator=generator) * 0.1 + 0.05  # float32 []
        return packed, absmax_q, absmax_scale, absmax_offset
    # weights of magnitudes from 1e-3 to 1, so that the block scales spread over the 8-bit codes
    weight = torch.randn(case["shape"], generator=generator).reshape(-1)  # [n]
    weight = weight * torch.logspace(-3, 0, numel).flip(0)[torch.randperm(numel, generator=generator)]
    nf4 = quantize_nf4(weight.reshape(case["shape"]), block_size=case["block_size"], double_quant=True,
                       dq_block_size=case["dq_block_size"])
    return nf4.packed, nf4.absmax_q, nf4.absmax_scale, nf4.absmax_offset


def _same_bits(actual, expected) -> bool:
    """Equal dtype, shape and bytes (stricter than torch.equal, which calls 0.0 and -0.0 equal)."""
    import torch

    return (actual.dtype == expected.dtype and actual.shape == expected.shape
            and torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)))


def _expected_in_interpreter(reference_float32, dtype):
    """The reference's float32 values converted to `dtype` the way the interpreter converts (see above)."""
    import torch

    if dtype != torch.bfloat16:
        return reference_float32.to(dtype)  # numpy's float16 conversion rounds to nearest even, as the GPU
    # subtle: the interpreter keeps the top 16 bits of a float32 (rounding toward zero); accepted too is
    # the GPU's rounding to nearest even, should a later interpreter do that
    return (reference_float32.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def _check_case(case: dict) -> dict:
    import torch

    from quant import nf4_triton
    from quant.nf4 import dequantize_absmax_reference, dequantize_nf4_reference

    shape, dtype = torch.Size(case["shape"]), getattr(torch, case["dtype"])
    block_size, dq_block_size = case["block_size"], case["dq_block_size"]
    packed, absmax_q, absmax_scale, absmax_offset = _nf4_fields(case)
    absmax = dequantize_absmax_reference(absmax_q, absmax_scale, absmax_offset, dq_block_size)  # [num_blocks]
    reference_float32 = dequantize_nf4_reference(packed, absmax, shape, block_size, torch.float32)
    reference = dequantize_nf4_reference(packed, absmax, shape, block_size, dtype)  # the rule on a GPU
    expected = _expected_in_interpreter(reference_float32, dtype)

    one_kernel = nf4_triton.dequantize_nf4_double_quant_triton(packed, absmax_q, absmax_scale, absmax_offset,
                                                                shape, block_size, dq_block_size, dtype)
    from_absmax = nf4_triton.dequantize_nf4_triton(packed, absmax, shape, block_size, dtype)
    results = {}
    for name, got in (("double_quant_kernel", one_kernel), ("absmax_kernel", from_absmax)):
        results[name] = _same_bits(got, expected) or _same_bits(got, reference)
    differing = int((one_kernel.float() != expected.float()).sum())
    results["detail"] = (f"{case_id(case)}: {differing} of {shape.numel()} weights differ from the expected "
                         f"(double-quant kernel); first values got {one_kernel.reshape(-1)[:4].tolist()}, "
                         f"expected {expected.reshape(-1)[:4].tolist()}")
    return results


def _check_linear4bit() -> dict:
    """Linear4bit forward and backward with and without the Triton kernels: the same bits."""
    import torch
    import torch.nn as nn

    from quant import Linear4bit, nf4_triton

    # available() says CUDA only; in the interpreter the kernels run on CPU tensors, so let it say yes here
    nf4_triton.available = lambda tensor: nf4_triton._ENABLED["on"] and nf4_triton.triton is not None
    calls = {"double_quant_kernel": 0, "absmax_kernel": 0}

    def counting(name, kernel_function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return kernel_function(*args, **kwargs)
        return wrapper

    nf4_triton.dequantize_nf4_double_quant_triton = counting("double_quant_kernel",
                                                             nf4_triton.dequantize_nf4_double_quant_triton)
    nf4_triton.dequantize_nf4_triton = counting("absmax_kernel", nf4_triton.dequantize_nf4_triton)

    kernel_calls, problems = {}, []
    for double_quant in (True, False):
        for compute_dtype in (torch.float32, torch.float16):
            torch.manual_seed(0)
            # 200 x 72 in blocks of 32: 450 block scales, a full and a partial second-level block of 256
            layer = Linear4bit.from_linear(nn.Linear(200, 72), block_size=32, double_quant=double_quant,
                                           compute_dtype=compute_dtype)
            x = torch.randn(3, 200)
            outputs = {}
            for enabled in (True, False):
                nf4_triton.use_triton(enabled)
                calls.update(double_quant_kernel=0, absmax_kernel=0)
                x_leaf = x.clone().requires_grad_(True)
                y = layer(x_leaf)  # (3, 72)
                y.float().square().sum().backward()
                outputs[enabled] = (y.detach(), x_leaf.grad)
                if compute_dtype == torch.float32:
                    kernel_calls[f"double_quant={double_quant}" if enabled else "use_triton(False)"] = dict(calls)
            nf4_triton.use_triton(True)
            for what, with_triton, plain in zip(("y", "dx"), outputs[True], outputs[False]):
                if not _same_bits(with_triton, plain):
                    problems.append(f"double_quant={double_quant}, compute_dtype={compute_dtype}: {what} differs")
    return {"same_bits": not problems, "detail": "; ".join(problems), "kernel_calls": kernel_calls}


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the tests: the child needs TRITON_INTERPRET=1"
    import quant

    # the check the PYTHONPATH line in interpreter_results is there for
    assert Path(quant.__file__).resolve().is_relative_to(ROOT), f"imported {quant.__file__}, not this checkout's"
    results = {case_id(case): _check_case(case) for case in CASES}
    results["linear4bit"] = _check_linear4bit()
    print(json.dumps(results))


if __name__ == "__main__":
    _child_main()
