"""The GPU path: the same numbers on CUDA as on the CPU, and bitsandbytes' CUDA kernels as the reference.

Skipped where there is no CUDA device (CI has none); run on a GPU machine with
`pytest tests/scripts/test_cuda.py`. What the CPU tests prove bit for bit, these check carries over:

- NF4 on CUDA writes the same codes, absmax and double-quantization fields as on the CPU, and
  dequantizes to the same bits.
- bitsandbytes' CUDA quantizer agrees with ours except on exact ties (a scaled value on a midpoint),
  where its fast-math reciprocal can land one ulp above the midpoint (docs/benchmarks.md); given the
  same codes, its CUDA dequantization equals ours.
- LoRA and DoRA: B = 0 is the base, merged equals unmerged; QLoRA in bf16 trains and merges; a tiny
  finetune.py run on CUDA (bf16 autocast) writes the folders, and merged equals base + adapter.
"""

import pytest
import torch
import torch.nn as nn

import lora
from quant import Linear4bit, NF4_CODE, quantize_nf4, unpack_nibbles
from quant.nf4_code import code_midpoints

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((256, 256), (33, 47), (4097,))


def weight_of(shape, dtype, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_on_cuda_equals_nf4_on_cpu(shape, dtype, block_size):
    weight = weight_of(shape, dtype)
    on_cpu = quantize_nf4(weight, block_size=block_size, double_quant=False)
    on_gpu = quantize_nf4(weight.cuda(), block_size=block_size, double_quant=False)
    assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed)
    assert torch.equal(on_gpu.absmax.cpu(), on_cpu.absmax)
    assert torch.equal(on_gpu.dequantize().cpu(), on_cpu.dequantize())
    # Double quantization centres the absmax on its mean, and a GPU sums in another order than a CPU
    # (bitsandbytes calls the same torch mean, so it differs across devices in the same way): the
    # offset may move by float rounding, the rest follows from it.
    dq_cpu = quantize_nf4(weight, block_size=block_size, double_quant=True)
    dq_gpu = quantize_nf4(weight.cuda(), block_size=block_size, double_quant=True)
    assert torch.equal(dq_gpu.packed.cpu(), dq_cpu.packed)
    torch.testing.assert_close(dq_gpu.absmax_offset.cpu(), dq_cpu.absmax_offset, rtol=1e-6, atol=0)
    if torch.equal(dq_gpu.absmax_offset.cpu(), dq_cpu.absmax_offset):
        for field in ("absmax_q", "absmax_scale"):
            assert torch.equal(getattr(dq_gpu, field).cpu(), getattr(dq_cpu, field)), field
        assert torch.equal(dq_gpu.dequantize().cpu(), dq_cpu.dequantize())
    torch.testing.assert_close(dq_gpu.dequantize().cpu().float(), dq_cpu.dequantize().float(),
                               rtol=1e-2, atol=1e-6)


def test_nf4_large_weight_on_cuda_equals_cpu():
    weight = weight_of((2048, 4096), torch.float32)  # several GPU chunks
    on_cpu = quantize_nf4(weight)
    on_gpu = quantize_nf4(weight.cuda())
    assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed)
    # The same stored fields dequantize to the same bits on either device...
    assert torch.equal(on_cpu.to("cuda").dequantize().cpu(), on_cpu.dequantize())
    # ...but double quantization's offset is a mean of 131072 block scales, summed in another order on
    # the GPU (see test_nf4_on_cuda_equals_nf4_on_cpu): it may differ by float rounding, and then the
    # 8-bit scales and the dequantized weight follow it, within that rounding.
    torch.testing.assert_close(on_gpu.absmax_offset.cpu(), on_cpu.absmax_offset, rtol=1e-6, atol=0)
    if torch.equal(on_gpu.absmax_offset.cpu(), on_cpu.absmax_offset):
        assert torch.equal(on_gpu.dequantize().cpu(), on_cpu.dequantize())
    torch.testing.assert_close(on_gpu.dequantize().cpu(), on_cpu.dequantize(), rtol=1e-2, atol=1e-6)


@pytest.fixture(scope="module")
def bnb_cuda():
    functional = pytest.importorskip("bitsandbytes.functional")
    try:
        functional.quantize_4bit(torch.zeros(64, device="cuda"), blocksize=64, quant_type="nf4")
    except Exception as error:  # a CPU-only build of bitsandbytes
        pytest.skip(f"bitsandbytes has no CUDA kernels here: {error}")
    return functional


@pytest.mark.parametrize("block_size", [64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_equal_bitsandbytes_cuda_except_ties(bnb_cuda, dtype, block_size):
    weight = weight_of((1024, 1024), dtype, seed=block_size).cuda()
    bnb_packed, bnb_state = bnb_cuda.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                                   compress_statistics=False)
    ours = quantize_nf4(weight, block_size=block_size, double_quant=False)
    assert torch.equal(ours.absmax, bnb_state.absmax)
    ours_codes = unpack_nibbles(ours.packed, weight.numel())
    bnb_codes = unpack_nibbles(bnb_packed.reshape(-1), weight.numel())
    differ = torch.nonzero(ours_codes != bnb_codes).flatten()
    assert differ.numel() <= 4, f"{differ.numel()} codes differ"
    if differ.numel():  # each one a tie, rounded down by us (docs/reference.md#nf4-quantize), up by bitsandbytes
        scaled = weight.reshape(-1).float()[differ] * (1.0 / ours.absmax[differ // block_size])
        assert torch.isin(scaled, code_midpoints(NF4_CODE).cuda()).all()
        assert torch.equal(bnb_codes[differ].long(), ours_codes[differ].long() + 1)
    # Given our codes, bitsandbytes' CUDA dequantization gives our bits.
    theirs = bnb_cuda.dequantize_4bit(ours.packed.view(-1, 1), bnb_state)
    assert torch.equal(theirs.reshape(-1), ours.dequantize().reshape(-1))


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_merged_equals_unmerged_on_cuda(use_dora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).cuda()
    x = torch.randn(8, 64, device="cuda")
    base = model(x)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=use_dora))
    assert torch.equal(model(x), base)  # B = 0: the adapter starts as a no-op
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    unmerged = model(x)
    lora.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)


def test_qlora_bf16_trains_only_adapters_and_merges_on_cuda():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).cuda()
    layer = nn.Sequential(Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16))
    lora.apply_lora(layer, lora.LoRAConfig(r=8, alpha=16, target_modules=["0"]))
    frozen = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    trainable = [parameter for parameter in layer.parameters() if parameter.requires_grad]
    assert trainable and all(parameter.dtype == torch.bfloat16 for parameter in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, frozen[name]), f"the 4-bit base changed: {name}"
    with torch.no_grad():
        adapted = layer(x).float()
        merged = lora.merge_and_unload(layer)  # dequantize + add: a full-precision nn.Linear
        assert isinstance(merged[0], nn.Linear) and merged[0].weight.dtype == torch.float32
        torch.testing.assert_close(merged(x.float()), adapted, rtol=0.02, atol=0.02)  # bf16 rounding


def test_finetune_tiny_run_on_cuda(tmp_path):
    from finetuning import experiment
    from minigpt import pretrain
    from minigpt import load_model

    base = tmp_path / "base"
    pretrain.main(pretrain.PretrainConfig(out=str(base), steps=30, embed_dim=32, n_layers=1, n_heads=2,
                                    context_length=16, batch_size=16, plot=False, progress=False, device="cuda"))
    out = tmp_path / "results"
    results = experiment.main(experiment.FinetuneConfig(base=str(base), out=str(out), steps=5, batch_size=4,
                                                    warmup_steps=1, rank=2, alpha=4.0, plot=False,
                                                    progress=False, device="cuda"))
    assert [result.method for result in results["results"]] == experiment.DEFAULTS.methods.split(",")
    merged, _ = load_model(out / "lora_merged")
    adapted, tokenizer = load_model(base, adapter=out / "lora_adapter")
    ids = torch.tensor([tokenizer.encode("the cat sits on the")])
    assert (merged(ids)[0] - adapted(ids)[0]).abs().max().item() < 1e-4
