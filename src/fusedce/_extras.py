"""Validation of cross_entropy's LLM extras (z_loss, logit_softcap, return_lse).

They are fusedce-only keyword arguments, so there is no torch behaviour to mirror: a value that
cannot mean what it says raises, rather than being coerced.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple


class LossExtras(NamedTuple):
    """The extras as the kernels take them: plain floats, 0.0 for "none"."""

    z_loss: float
    softcap: float
    return_lse: bool


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fusedce: {name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"fusedce: {name} must be finite, got {number}")
    return number


def loss_extras(z_loss: object, logit_softcap: object, return_lse: object) -> LossExtras:
    """Check the three and return them as the kernels take them."""
    z = _real("z_loss", z_loss)
    if z < 0:
        raise ValueError(f"fusedce: z_loss must be >= 0, got {z}")
    cap = 0.0
    if logit_softcap is not None:
        cap = _real("logit_softcap", logit_softcap)
        if cap <= 0:
            raise ValueError(f"fusedce: logit_softcap must be positive (or None), got {cap}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"fusedce: return_lse must be a bool, got {type(return_lse).__name__}")
    return LossExtras(z, cap, return_lse)
