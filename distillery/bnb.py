"""bitsandbytes settings shared by the quantize stage (int8/NF4 copies) and QLoRA training (an NF4 frozen base)."""

from __future__ import annotations

from distillery.config import QuantizeConfig


def require_bnb() -> None:
    """bitsandbytes is an optional install: say how to get it before any model loads."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantize needs bitsandbytes: pip install 'bitsandbytes>=0.45'")


def bnb_config(fmt: str, cfg: QuantizeConfig):
    """The BitsAndBytesConfig of a quantize format (int8, or NF4 with its double-quant and compute dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
    )
