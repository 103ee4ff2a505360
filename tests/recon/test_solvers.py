"""FISTA: reaches the minimiser of a small (PR) problem computed independently; objective non-increasing."""

import pytest
import torch

from support import complex_randn, phantom, random_dictionary
from cdl_lambda.recon import fft
from cdl_lambda.recon.operators import SingleCoilOperator
from cdl_lambda.recon.sampling import central_window_mask
from cdl_lambda.recon.solvers import fista, gradient_step, soft_threshold

SHAPE = (12, 12)


@pytest.fixture(scope="module")
def problem():
    dictionary = random_dictionary(4, 5, seed=0, dtype=torch.float64)
    mask = fft.to_native(central_window_mask(SHAPE, (8, 8)).double())
    op = SingleCoilOperator(mask, centred=False)
    y = op.forward(fft.to_native(phantom(*SHAPE, dtype=torch.complex128))) + 0.05 * complex_randn(*SHAPE, seed=1) * mask
    lam = torch.full((4, *SHAPE), 0.5, dtype=torch.float64)

    def objective(s):
        residual = op.forward(dictionary.synthesize(s)) - y
        return (0.5 * residual.abs().pow(2).sum() + (lam * s.real.abs()).sum() + (lam * s.imag.abs()).sum()).item()

    def gradient(s):
        return dictionary.analyze(op.adjoint(op.forward(dictionary.synthesize(s)) - y))

    return dictionary, lam, objective, gradient, dictionary.lipschitz(SHAPE)


def test_soft_threshold_acts_on_real_and_imaginary_parts():
    z = torch.tensor([3 + 0.5j, -2 - 4j, 0.2 + 0j], dtype=torch.complex128)
    out = soft_threshold(z, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out, torch.tensor([2 + 0j, -1 - 3j, 0j], dtype=torch.complex128))


def test_fista_reaches_independent_ista_minimiser(problem):
    dictionary, lam, objective, gradient, lipschitz = problem
    # reference: plain ISTA (step 1/L, float64) on the explicit matrix of ∇f(s) = M s − b
    n = lam.numel()
    b = -gradient(torch.zeros(4, *SHAPE, dtype=torch.complex128)).flatten()
    basis = torch.eye(n, dtype=torch.complex128).reshape(n, 4, *SHAPE)
    matrix = (gradient(basis).reshape(n, n) + b).T  # column j = M e_j
    flat, lam_flat = torch.zeros(n, dtype=torch.complex128), lam.flatten()
    for _ in range(20000):
        flat = soft_threshold(flat - (matrix @ flat - b) / lipschitz, lam_flat / lipschitz)
    reference = flat.reshape(4, *SHAPE)
    start = torch.zeros_like(reference)
    solution = fista(gradient_step(gradient, 0.99 / lipschitz), 0.99 / lipschitz * lam, start, iterations=1000)
    assert (solution - reference).norm() / reference.norm() < 1e-3
    assert abs(objective(solution) - objective(reference)) / objective(reference) < 1e-6


def test_fista_objective_is_non_increasing_after_first_iterations(problem):
    """FISTA is not a descent method: the inertia leaves a ripple that decays with the iterations. After the first
    iterations any increase must be below 1e-6 of the objective, and the total decrease large."""
    dictionary, lam, objective, gradient, lipschitz = problem
    values = []
    fista(gradient_step(gradient, 0.99 / lipschitz), 0.99 / lipschitz * lam,
          torch.zeros(4, *SHAPE, dtype=torch.complex128), iterations=300,
          callback=lambda n, s: values.append(objective(s)))
    increases = [b - a for a, b in zip(values[10:], values[11:]) if b > a + 1e-6 * abs(a)]
    assert not increases
    assert values[-1] < 0.8 * values[0] and values[-1] <= min(values) * (1 + 1e-6)


def test_fista_rejects_non_convergent_inertia(problem):
    dictionary, lam, _, gradient, lipschitz = problem
    with pytest.raises(ValueError, match="a > 2"):
        fista(gradient_step(gradient, 1 / lipschitz), lam / lipschitz, torch.zeros(4, *SHAPE, dtype=torch.complex128),
              5, inertia=2.0)


def test_untracked_steps_reuse_buffers_and_give_the_same_codes():
    """The no-graph steps write into buffers allocated once per solve; the iterates are bit-identical to steps
    that allocate their results."""
    from cdl_lambda.recon.solvers import _real_threshold, _shrink_extrapolate, fista
    torch.manual_seed(3)
    target = torch.randn(2, 4, 16, 16, dtype=torch.complex64)
    threshold = 0.05 * torch.rand(2, 4, 16, 16)
    step = lambda z: z - 0.5 * (z - target)  # noqa: E731 - gradient step of ½‖z − target‖²
    seen = []
    with torch.no_grad():
        buffered = fista(step, threshold, torch.zeros_like(target), 9, callback=lambda n, s: seen.append(s))
    t = _real_threshold(threshold, target)
    s = z = torch.view_as_real(torch.zeros_like(target))
    for n in range(1, 10):
        v = torch.view_as_real(step(torch.view_as_complex(z)))
        s, z = _shrink_extrapolate(v, s, t, -t, torch.tensor((n - 1) / (n + 3.0)))
        assert torch.equal(seen[n - 1], torch.view_as_complex(s))  # callbacks get copies, not the live buffers
    assert torch.equal(buffered, torch.view_as_complex(s))


def test_a_new_process_compiles_with_a_log_line_and_no_deprecation_warning(tmp_path):
    import os
    import subprocess
    import sys
    from cdl_lambda.recon.solvers import compile_available
    if not compile_available(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from cdl_lambda.recon import compiled, solvers; compiled.COMPILE_MIN_WORK = 0\n"
            "x = torch.randn(1, 2, 8, 8, dtype=torch.complex64)\n"
            "with torch.no_grad(): solvers.fista(lambda z: z - 0.5 * (z - x), torch.full((1, 2, 8, 8), 0.1), "
            "torch.zeros_like(x), 3, compiled=True)\n")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TORCHDYNAMO_DISABLE", None)
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiling the FISTA kernel for codes 1×2×8×8" in result.stderr and "FISTA kernel ready" in result.stderr
    assert "DeprecationWarning" not in result.stderr and any((tmp_path / "cache").iterdir())
