"""Cross-entropy: fusedce (plain and inplace_backward), torch eager, torch.compile and, on CUDA,
Liger when importable, over the workloads of docs/benchmarks.md and the four modes."""

OPS = ("cross_entropy",)


def test_cross_entropy(run_case, key, mode, provider):
    run_case(key, mode, provider)
