"""runtime/safetensors.py: the same bytes as the reference library, and every bad file refused in one line."""

import json
import struct

import pytest
import torch

from runtime.safetensors import DTYPES, load_file, save_file

reference = pytest.importorskip("safetensors.torch")


def some_tensors():
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t_{name.lower()}": torch.randn(3, 5, generator=generator).mul(4).to(dtype)
               for name, dtype in DTYPES.items()}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.empty(0, 4)
    tensors["base_model.model.blocks.0.attn.q_proj.lora_A.weight"] = torch.randn(4, 16, generator=generator)
    return tensors


def test_writes_the_same_bytes_as_the_reference_library(tmp_path):
    tensors = some_tensors()
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    reference.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_reads_what_the_reference_library_writes_bit_for_bit(tmp_path):
    tensors = some_tensors()
    reference.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    loaded, metadata = load_file(tmp_path / "theirs.safetensors")
    assert metadata == {"format": "pt"} and set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def write_raw(path, header, data: bytes, header_length=None):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text) if header_length is None else header_length) + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("header, data, header_length, message", [
    (GOOD, b"\0" * 8, 10 ** 9, "over the limit"),
    (GOOD, b"\0" * 8, 5000, "runs past the end"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, b"", None, "not valid JSON"),
    ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8, None, "not a range inside"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "leaves a gap"),
    (GOOD, b"\0" * 12, None, "trailing bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "code": "x"}}, b"\0" * 8, None, "exactly dtype"),
    ({"__metadata__": {"format": 1}, **GOOD}, b"\0" * 8, None, "strings to strings"),
])
def test_bad_files_are_refused_with_one_line_naming_the_file(tmp_path, header, data, header_length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, header_length)
    with pytest.raises(ValueError, match=message) as error:
        load_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_file_shorter_than_eight_bytes_is_refused(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="shorter than the 8-byte header length"):
        load_file(path)


def test_writer_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no safetensors name"):
        save_file({"c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="__metadata__"):
        save_file({"__metadata__": torch.ones(1)}, tmp_path / "m.safetensors")
