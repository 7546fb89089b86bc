"""vision: MiniViT, MiniVLM (LLaVA-style image prefix, Flamingo-style gated cross-attention) and the
synthetic coloured-shapes captions they learn from; no downloads.

Files, in reading order: shapes.py (the data, generated in code), config.py (ViTConfig, VLMConfig),
model.py (MiniViT, MiniVLM), training.py (captions to tensors, a training loop, the measures),
checkpoint.py (save_vlm / load_vlm). The experiment comparing the four LoRA strategies is
finetuning/vision.py (`python finetune.py --task vision`).
"""

from vision.checkpoint import load_vlm, save_vlm
from vision.config import VLMConfig, ViTConfig
from vision.model import MiniViT, MiniVLM
from vision.shapes import make_split

__all__ = ["ViTConfig", "VLMConfig", "MiniViT", "MiniVLM", "make_split", "save_vlm", "load_vlm"]
