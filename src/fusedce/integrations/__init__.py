"""Integrations with other libraries, each an optional extra imported on its own.

``fusedce.integrations.transformers``: Hugging Face causal LMs that train through
``fusedce.linear_cross_entropy`` without materialising their logits (``pip install fusedce[hf]``).
Nothing here is imported by ``import fusedce``.
"""
