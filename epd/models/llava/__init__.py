"""LLaVA-1.5, LLaVA-NeXT (1.6) and LLaVA-OneVision (`llava`, `llava_next`, `llava_onevision`)."""

from epd.models.llava.family import LlavaFamily as FAMILY
from epd.models.llava.tiny import PRESETS, text_dims, write_tiny

__all__ = ["FAMILY", "PRESETS", "text_dims", "write_tiny"]
