"""safetensors, written from scratch: the file format PEFT and transformers save tensors in.

A safetensors file is three parts, and nothing in it can run code (unlike a pickle):

    [8 bytes]  N, the header's length, an unsigned little-endian 64-bit integer
    [N bytes]  the header: a JSON object, padded with spaces to a multiple of 8 bytes
                 {"__metadata__": {"format": "pt"},                                   (optional, str -> str)
                  "lora_A.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 256]}, ...}
    [the rest] the tensors' raw little-endian bytes; data_offsets count from the end of the header

    save_file({"w": torch.ones(2, 3)}, "adapter_model.safetensors", metadata={"format": "pt"})
    tensors, metadata = load_file("adapter_model.safetensors")

Reading an untrusted file checks everything against the file's length before a tensor is built: the
header's length, that it is a JSON object of the expected form, each dtype, shape and offset pair, that
a tensor's bytes are exactly numel x item size, and that the tensors tile the data without gaps or
overlaps (the rule of the reference implementation). Every problem is a one-line ValueError naming the
file and the tensor. The writer orders tensors as the reference `safetensors` library does (by dtype,
widest first, then by name), so for the same tensors the two write the same bytes.
"""

import json
import math
import struct
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

# dtype name in the header <-> torch dtype. Listed in the reference library's order: the writer puts
# later (wider) dtypes first, which keeps every tensor aligned to its own item size.
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPES)}
MAX_HEADER_BYTES = 100_000_000  # the reference library's own limit: a bigger header is refused unread

if sys.byteorder != "little":  # the format is little-endian; so is every platform PyTorch ships for
    raise ImportError("runtime.safetensors reads and writes raw bytes in the host's order, which must be "
                      "little-endian (the format's); this host is big-endian")


def save_file(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write `tensors` (name -> tensor, any device; saved contiguous, on the CPU) to a safetensors file.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> _ = save_file({"b": torch.arange(3), "a": torch.ones(2)}, path, {"format": "pt"})
        >>> tensors, metadata = load_file(path)
        >>> tensors["b"].tolist(), tensors["a"].dtype, metadata
        ([0, 1, 2], torch.float32, {'format': 'pt'})
    """
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor names must be strings other than '__metadata__', got {name!r}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name; supported: "
                             f"{', '.join(str(dtype) for dtype in DTYPE_NAMES)}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    # widest dtype first, then by name (the reference library's order)
    order = sorted(tensors, key=lambda name: (-DTYPE_RANK[DTYPE_NAMES[tensors[name].dtype]], name))
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        blob = _tensor_bytes(tensors[name])
        header[name] = {"dtype": DTYPE_NAMES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned
    path = Path(path)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for blob in blobs:
            file.write(blob)
    return path


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes in row-major order (the host's order: little-endian, see the check below)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()  # subtle: via uint8, since numpy has no bfloat16


def read_header(path) -> Tuple[dict, int, int]:
    """(header dict, where the data starts, the data's length): everything checked, no tensor read yet."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        header_length = struct.unpack("<Q", prefix)[0]
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {header_length:,} bytes is over the limit of "
                             f"{MAX_HEADER_BYTES:,}; the file is corrupt or not safetensors")
        if 8 + header_length > size:
            raise ValueError(f"{path}: header length {header_length:,} runs past the end of the file "
                             f"({size:,} bytes); the file is truncated or not safetensors")
        raw = file.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: the header is not valid JSON ({type(error).__name__}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    data_length = size - 8 - header_length
    _check_entries(path, header, data_length)
    return header, 8 + header_length, data_length


def _check_entries(path, header: dict, data_length: int) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor {name!r}: an entry holds exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_length):
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {offsets!r} are not a range inside the "
                             f"{data_length:,} data bytes; the file is corrupt or truncated")
        expected = math.prod(shape) * torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != expected:
            raise ValueError(f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {expected:,} bytes, "
                             f"data_offsets give {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            problem = "overlaps the tensor before it" if start < position else f"leaves a gap at byte {position:,}"
            raise ValueError(f"{path}: tensor {name!r} (bytes {start:,}-{end:,}) {problem}; the file is corrupt")
        position = end
    if position != data_length:
        raise ValueError(f"{path}: the tensors cover {position:,} of the {data_length:,} data bytes; "
                         f"the file has trailing bytes or is corrupt")


def load_file(path, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a safetensors file: ({name: tensor}, metadata). Checks the whole header first (read_header)."""
    header, data_start, _ = read_header(path)
    tensors = {}
    with open(path, "rb") as file:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            file.seek(data_start + start)
            raw = bytearray(file.read(end - start))
            dtype = DTYPES[entry["dtype"]]
            if not raw:
                tensors[name] = torch.empty(entry["shape"], dtype=dtype, device=device)
                continue
            tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)  # no copy: raw is ours
            tensors[name] = tensor.reshape(entry["shape"]).to(device)
    return tensors, dict(header.get("__metadata__", {}))
