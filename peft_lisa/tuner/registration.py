"""Registers LiSA as a PEFT method when ``peft_lisa`` is imported.

peft keeps its methods in the ``PeftType`` enum and four mapping dicts; ``register_peft_method`` refuses a name that
is not already an enum member, so an outside package has to add the member first. This module does that once, in a
way that keeps ``PeftType("LISA")``, ``PeftType.LISA`` and ``json.dumps`` working, and then fills the mapping dicts
through peft's own ``register_peft_method``.

Consequence for users: ``import peft_lisa`` must run before ``PeftModel.from_pretrained`` reads a LiSA adapter, and
before ``AutoModelForCausalLM.from_pretrained`` reads a merged LiSA model.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

LISA_NAME = "lisa"
LISA_PREFIX = "lisa_"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` enum (idempotent) and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # Enum members live in these three places; the class attribute makes ``PeftType.LISA`` work.
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    if PeftType(name) is not member:  # pragma: no cover - guards against a future change of enum internals
        raise RuntimeError(f"Could not add {name!r} to peft's PeftType enum; please report this with your versions.")
    return member


LISA_PEFT_TYPE = _add_peft_type_member(LISA_NAME.upper())


def register_lisa_method(config_cls: type, model_cls: type) -> None:
    """Fill peft's method mappings with the LiSA config and tuner classes (idempotent).

    Called once at the end of ``peft_lisa/tuner/__init__.py``, as peft's own tuners register themselves.
    """
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(LISA_PEFT_TYPE) is config_cls:
        return
    register_peft_method(name=LISA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=LISA_PREFIX)
