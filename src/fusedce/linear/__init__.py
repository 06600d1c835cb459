"""Linear + cross-entropy without the logits: ``torch.nn.functional.linear_cross_entropy``.

One job per module: ``functional`` (torch's signature and checks, the reduction), ``autograd``
(the Function: what is saved, which pass runs), ``ops`` (the passes as torch.library ops, for
torch.compile), ``chunked`` (the block loops themselves).
"""

from .functional import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
