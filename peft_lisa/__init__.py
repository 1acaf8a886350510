"""peft-lisa: LiSA (cross-layer attention sharing, arXiv 2408.01890) as a PEFT tuner.

``import peft_lisa`` registers the ``LISA`` PEFT type with peft and the merged ``lisa_*`` model types with
transformers; do it before ``PeftModel.from_pretrained`` or ``AutoModelForCausalLM.from_pretrained`` reads a LiSA
adapter or merged model.
"""

from .architectures import SUPPORTED_ATTENTION, UnsupportedModelError
from .compression import CompressionReport, qk_compression_report
from .merged import LiSASharedAttention, LiSASourceAttention, merged_layers, register_merged_models
from .registration import LISA_PEFT_TYPE, register_lisa_method
from .tuner import HeadAlign, LiSAConfig, LiSALayer, LiSAModel

register_lisa_method()
register_merged_models()

__version__ = "0.1.0"

__all__ = [
    "LISA_PEFT_TYPE",
    "SUPPORTED_ATTENTION",
    "CompressionReport",
    "HeadAlign",
    "LiSAConfig",
    "LiSALayer",
    "LiSAModel",
    "LiSASharedAttention",
    "LiSASourceAttention",
    "UnsupportedModelError",
    "merged_layers",
    "qk_compression_report",
]
