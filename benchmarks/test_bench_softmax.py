"""log_softmax and softmax on lm-32k: fusedce, torch eager and torch.compile of the same op; the
backward takes a fixed random upstream gradient."""

OPS = ("log_softmax", "softmax")


def test_softmax(run_case, key, mode, provider):
    run_case(key, mode, provider)
