"""``patch()``: swap fusedce in for torch's cross-entropy family in an existing program."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn import functional as torch_functional

from . import functional, modules

# (namespace, attribute, replacement)
_TARGETS = [
    (torch_functional, "cross_entropy", functional.cross_entropy),
    (torch_functional, "nll_loss", functional.nll_loss),
    (torch_functional, "log_softmax", functional.log_softmax),
    (torch_functional, "softmax", functional.softmax),
    (nn, "CrossEntropyLoss", modules.CrossEntropyLoss),
    (nn, "NLLLoss", modules.NLLLoss),
    (nn, "LogSoftmax", modules.LogSoftmax),
    (nn, "Softmax", modules.Softmax),
]


@contextlib.contextmanager
def patch() -> Iterator[None]:
    """Within the block, ``torch.nn.functional`` and ``torch.nn`` resolve the eight names to
    fusedce. Code that imported a name before the block (``from torch.nn.functional import
    cross_entropy``) keeps torch's, since a module attribute is all that can be swapped."""
    saved = [(space, name, getattr(space, name)) for space, name, _ in _TARGETS]
    try:
        for space, name, replacement in _TARGETS:
            setattr(space, name, replacement)
        yield
    finally:
        for space, name, original in saved:
            setattr(space, name, original)
