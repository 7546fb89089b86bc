"""The lora package as a reader meets it: the split files keep every old import working, the LoRA forward
comes early in layer.py, and every docs/reference.md anchor the files cite is one of its known sections."""

import inspect
import pathlib
import re

import lora
from lora.layer import LoRALinear

ANCHORS = {"lora", "rslora", "initialisations", "dora", "several-adapters", "merging", "lora-on-embeddings",
           "lora-plus", "combining-adapters", "adapter-files-and-peft-key-names", "qlora", "where-we-differ"}
ANCHORS |= {"mixed-batch-inference", "layer-replication"}


def test_old_imports_still_work():
    from lora.base_layer import base_weight, is_4bit_linear, is_linear_like
    from lora.bookkeeping import LoRALayerBase
    from lora import layer
    assert (layer.LoRALayerBase, layer.base_weight, layer.is_4bit_linear, layer.is_linear_like) == (
        LoRALayerBase, base_weight, is_4bit_linear, is_linear_like)
    assert lora.LoRALinear is layer.LoRALinear and lora.base_weight is base_weight
    assert issubclass(lora.LoRAEmbedding, LoRALayerBase)


def test_a_reader_meets_the_lora_forward_early():
    """Issue "Redesign for reading": the LoRA forward is within layer.py's first 100 lines."""
    _, first_line = inspect.getsourcelines(LoRALinear.forward)
    assert first_line < 100, f"LoRALinear.forward starts at line {first_line} of lora/layer.py"


def test_lora_files_cite_docs_reference_md_with_known_anchors():
    for path in sorted((pathlib.Path(lora.__file__).parent).glob("*.py")):
        text = path.read_text()
        assert "REFERENCE" + ".md" not in text and "../" + "shared" not in text, path
        for anchor in re.findall(r"docs/reference\.md#([\w-]+)", text):
            assert anchor in ANCHORS, (path, anchor)
