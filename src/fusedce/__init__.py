"""fusedce: fused cross-entropy for PyTorch."""
