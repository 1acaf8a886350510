"""The LiSA tuner, laid out like peft's own tuners: ``config.py``, ``layer.py``, ``model.py``."""

from .config import LiSAConfig
from .layer import HeadAlign, LiSALayer, LogitsCarrier
from .model import LiSAModel

__all__ = ["HeadAlign", "LiSAConfig", "LiSALayer", "LiSAModel", "LogitsCarrier"]
