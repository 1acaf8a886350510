"""The LiSA tuner, laid out like peft's own tuners: ``config.py`` (the dataclass), ``functional.py`` and
``attention.py`` (the math), ``carrier.py`` (logits handed between layers), ``layer.py`` (the PEFT layer),
``model.py`` (inject, merge, unload), ``merged.py`` (the compact merged model) and registration at the end.

This package is the bottom floor of peft_lisa: it imports nothing from analysis, training, evaluation, the benchmark
or the CLI.
"""

from .architectures import SUPPORTED_ATTENTION, UnsupportedModelError
from .artifacts import atomic_directory, save_adapter
from .attention import HeadAlign, LiSASubstitute
from .carrier import LogitsCarrier
from .compression import CompressionReport, qk_compression_report
from .config import LiSAConfig
from .layer import LiSALayer
from .merged import (
    LiSAFullAttention,
    LiSASharedAttention,
    LiSASourceAttention,
    merged_layers,
    register_merged_models,
)
from .model import LiSAModel
from .registration import LISA_PEFT_TYPE, register_lisa_method

register_lisa_method(LiSAConfig, LiSAModel)
register_merged_models()

__all__ = [
    "LISA_PEFT_TYPE",
    "SUPPORTED_ATTENTION",
    "CompressionReport",
    "HeadAlign",
    "LiSAConfig",
    "LiSALayer",
    "LiSAModel",
    "LiSAFullAttention",
    "LiSASharedAttention",
    "LiSASourceAttention",
    "LiSASubstitute",
    "LogitsCarrier",
    "UnsupportedModelError",
    "atomic_directory",
    "merged_layers",
    "qk_compression_report",
    "save_adapter",
]
