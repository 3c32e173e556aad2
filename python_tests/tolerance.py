"""How close the kernels must come to the float64 reference (documented in the README).

The kernels compute in float32 throughout; against a float64 evaluation of the same math the
evolved logits agree to ATOL + RTOL * |value|, and the kept top-k sets are identical. Projecting
hidden states adds float32's rounding of the projection itself, up to PROJECTION_ROUNDING times
the row's largest |logit| (measured: 4e-6, README "Exactness"), which only shows once logits reach
the thousands."""
import torch

ATOL = 1e-4
RTOL = 2e-5
PROJECTION_ROUNDING = 2**-17


def assert_matches_reference(out, expected, k, lower_bound, atol=ATOL):
    """``out``: the op's full ``[N, V]`` result; ``expected``: the float64 reference's."""
    assert out.dtype == torch.float32 and out.shape == expected.shape
    expected = expected.to(device=out.device, dtype=torch.float32)
    kept = expected != lower_bound
    assert torch.equal(out != lower_bound, kept), "top-k sets differ"
    assert bool((kept.sum(-1) == k).all())
    torch.testing.assert_close(out, expected, atol=atol, rtol=RTOL)
