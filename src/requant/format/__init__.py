"""On-disk format of quantized checkpoints (safetensors + JSON, never pickle)."""

from .checkpoint import FORMAT_VERSION, is_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["FORMAT_VERSION", "is_checkpoint", "load_checkpoint", "save_checkpoint"]
