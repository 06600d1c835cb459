"""Test-session setup shared by tests/ and benchmarks/."""

import os

# The Triton kernels run on CPU tensors only under Triton's interpreter, which must be chosen
# before triton is first imported. A machine with a GPU runs them natively instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
