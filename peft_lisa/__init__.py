"""peft-lisa: LiSA (cross-layer attention sharing, arXiv 2408.01890) as a PEFT tuner.

``import peft_lisa`` registers the ``LISA`` PEFT type with peft and the merged ``lisa_*`` model types with
transformers; do it before ``PeftModel.from_pretrained`` or ``AutoModelForCausalLM.from_pretrained`` reads a LiSA
adapter or merged model.
"""

from .analysis import AttentionAnalysis, analyze, choose_share_layers
from .calibration import CalibrationReport, calibrate
from .calibration_blocks import mixed_token_blocks
from .qlora import merge_dequantized
from .tuner import (
    LISA_PEFT_TYPE,
    SUPPORTED_ATTENTION,
    CompressionReport,
    HeadAlign,
    LiSAConfig,
    LiSAFullAttention,
    LiSALayer,
    LiSAModel,
    LiSASharedAttention,
    LiSASourceAttention,
    UnsupportedModelError,
    atomic_directory,
    merged_layers,
    qk_compression_report,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionAnalysis",
    "analyze",
    "atomic_directory",
    "calibrate",
    "CalibrationReport",
    "mixed_token_blocks",
    "choose_share_layers",
    "save_adapter",
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
    "UnsupportedModelError",
    "merged_layers",
    "merge_dequantized",
    "qk_compression_report",
]
