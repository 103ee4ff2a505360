"""ADMM and the stopping rule: the same minimiser as long plain FISTA (float64), a rule that stops before the cap on
an easy problem and at the cap on a hard one, slices independent of their batch, permutation invariance, gradients
through the solver, and the same image on every device present."""

import pytest
import torch

from support import complex_randn, phantom, random_dictionary, synthetic_maps
from cdl_lambda.recon import fft
from cdl_lambda.recon.admm import ADMM, Problem, cg_until
from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.operators import MultiCoilOperator, SingleCoilOperator
from cdl_lambda.recon.sampling import central_window_mask, equispaced_line_mask
from cdl_lambda.recon.solvers import fista, gradient_step

SHAPE = (12, 12)
K = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny-tensor iterations: intra-op threads only add synchronisation (and on a loaded machine
    oversubscription makes it many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_problem(coils: int, seed: int = 1, lam_value: float = 0.5):
    """A small (PR) problem in float64, native layout: (dictionary, Λ, operator, y′, objective, gradient)."""
    dictionary = random_dictionary(K, 5, seed=0, dtype=torch.float64)
    if coils:
        mask = fft.to_native(equispaced_line_mask(SHAPE, 2, 4).double())
        maps = fft.to_native(synthetic_maps(coils, SHAPE).to(torch.complex128))
        maps = maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()
        op = MultiCoilOperator(mask, maps, centred=False)
        noise = 0.05 * complex_randn(coils, *SHAPE, seed=seed) * mask
    else:
        mask = fft.to_native(central_window_mask(SHAPE, (8, 8)).double())
        op = SingleCoilOperator(mask, centred=False)
        noise = 0.05 * complex_randn(*SHAPE, seed=seed) * mask
    y = op.forward(fft.to_native(phantom(*SHAPE, dtype=torch.complex128))) + noise
    lam = torch.full((K, *SHAPE), lam_value, dtype=torch.float64)

    def objective(s):
        residual = op.forward(dictionary.synthesize(s)) - y
        return (0.5 * residual.abs().pow(2).sum() + (lam * s.real.abs()).sum() + (lam * s.imag.abs()).sum()).item()

    def gradient(s):
        return dictionary.analyze(op.adjoint(op.forward(dictionary.synthesize(s)) - y))

    return dictionary, lam, op, y, objective, gradient


def admm_problem(dictionary, lam, op, y, coils):
    d_hat = dictionary.spectra(SHAPE, "cpu", torch.complex128)
    if coils:
        return Problem(d_hat, lam[None], op.adjoint(y)[None], normal=op.normal)
    return Problem(d_hat, lam[None], op.adjoint(y)[None], mask=op.mask, y_hat=y[None])


@pytest.fixture(scope="module", params=[0, 3], ids=["single-coil", "3-coils"])
def solved(request):
    """A problem and its minimiser by long plain FISTA (float64)."""
    coils = request.param
    dictionary, lam, op, y, objective, gradient = make_problem(coils)
    lipschitz = dictionary.lipschitz(SHAPE)

    def plain_fista(iterations):
        return fista(gradient_step(gradient, 0.99 / lipschitz), 0.99 / lipschitz * lam,
                     torch.zeros(K, *SHAPE, dtype=torch.complex128), iterations)

    return coils, dictionary, lam, op, y, objective, plain_fista, plain_fista(2000)


def test_admm_reaches_the_minimiser_of_long_plain_fista(solved):
    coils, dictionary, lam, op, y, objective, _, reference = solved
    codes, info = ADMM(cg_tolerance=1e-3, cg_max=30)(admm_problem(dictionary, lam, op, y, coils), 1000,
                                                       tolerance=1e-6)
    assert int(info.iterations[0]) < 1000 and float(info.relative_change[0]) <= 1e-6  # the rule stopped it
    assert abs(objective(codes[0]) - objective(reference)) / objective(reference) < 1e-8
    assert relative(dictionary.synthesize(codes[0]), dictionary.synthesize(reference)) < 1e-4


def test_admm_beats_fista_at_the_same_iteration_count(solved):
    """The reason it ships: 40 ADMM iterations are closer to the optimum than 40 of FISTA."""
    coils, dictionary, lam, op, y, objective, plain_fista, reference = solved
    best = objective(reference)
    admm_40 = objective(ADMM()(admm_problem(dictionary, lam, op, y, coils), 40)[0][0])
    assert admm_40 - best < 0.5 * (objective(plain_fista(40)) - best)


def test_cg_stops_at_its_tolerance():
    torch.manual_seed(0)
    matrix = torch.randn(2, 6, 6, dtype=torch.float64)
    spd = matrix @ matrix.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(2, 6, dtype=torch.float64)
    x, applied = cg_until(lambda v: (spd @ v.unsqueeze(-1)).squeeze(-1), rhs, torch.zeros_like(rhs), 1e-8, 100)
    residual = rhs - (spd @ x.unsqueeze(-1)).squeeze(-1)
    assert (residual.norm(dim=1) <= 1e-8 * rhs.norm(dim=1) * 1.0001).all()
    assert torch.allclose(applied, (spd @ x.unsqueeze(-1)).squeeze(-1), atol=1e-9)  # A x for the next warm start


# ---- the stopping rule ------------------------------------------------------------------------------------------
def _model_scan(coils=4, acceleration=2, noise=0.05):
    torch.manual_seed(0)
    x = phantom(32, 32).unsqueeze(0)
    maps = synthetic_maps(coils, (32, 32))
    maps = (maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()).unsqueeze(0)
    mask = equispaced_line_mask((32, 32), acceleration, 8)
    kspace = (fft2c(maps * x.unsqueeze(1)) + noise * torch.randn(1, coils, 32, 32, dtype=torch.complex64)) * mask
    return kspace, mask, maps


@pytest.mark.parametrize("solver", ["admm", "fista"])
def test_the_rule_stops_an_easy_problem_before_the_cap_and_a_hard_one_at_it(solver):
    kspace, mask, maps = _model_scan()
    dictionary = random_dictionary(8, 5)
    with torch.no_grad():
        easy = CDLLambda(None, scalar_lambda=1.0, iterations=400, solver=solver, tolerance=1e-2)(
            kspace, mask, dictionary, coil_maps=maps, noise_std=0.05)
        hard = CDLLambda(None, scalar_lambda=1.0, iterations=25, solver=solver, tolerance=1e-7)(
            kspace, mask, dictionary, coil_maps=maps, noise_std=0.05)
    assert 1 <= int(easy.iterations_used[0]) < 400
    assert float(easy.final_relative_change[0]) <= 1e-2
    assert int(hard.iterations_used[0]) == 25 and float(hard.final_relative_change[0]) > 1e-7


@pytest.mark.parametrize("solver", ["admm", "fista"])
def test_a_slice_stops_on_its_own_whatever_its_batch(solver):
    """Two slices that converge at different speeds in one batch give each the result it gets alone."""
    kspace, mask, maps = _model_scan()
    other = kspace.flip(-1) * 3.0  # another scan with another SNR: it stops at another iteration
    batch = torch.cat([kspace, other])
    both_maps = torch.cat([maps, maps.flip(-1)])
    model = CDLLambda(None, scalar_lambda=1.0, iterations=300, solver=solver, tolerance=3e-3)
    dictionary = random_dictionary(8, 5)
    with torch.no_grad():
        together = model(batch, mask, dictionary, coil_maps=both_maps, noise_std=0.05)
        alone = [model(batch[i:i + 1], mask, dictionary, coil_maps=both_maps[i:i + 1], noise_std=0.05)
                 for i in range(2)]
    assert together.iterations_used.tolist() == [int(a.iterations_used[0]) for a in alone]
    assert together.iterations_used[0] != together.iterations_used[1]
    for i in range(2):
        assert relative(together.image[i], alone[i].image[0]) < 1e-5


# ---- the model ---------------------------------------------------------------------------------------------------
def _randomised_v3():
    net = LambdaNetV3(base_channels=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_admm_model_is_invariant_to_the_filter_order():
    kspace, mask, maps = _model_scan()
    dictionary = random_dictionary(12, 5, seed=3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    model = CDLLambda(_randomised_v3(), iterations=40, solver="admm", tolerance=1e-3)
    with torch.no_grad():
        out = model(kspace, mask, dictionary, coil_maps=maps, noise_std=0.05)
        permuted = model(kspace, mask, dictionary.permuted(order), coil_maps=maps, noise_std=0.05)
    assert relative(permuted.image, out.image) < 1e-5
    assert torch.equal(permuted.iterations_used, out.iterations_used)
    assert out.lambda_maps.std() > 1e-3


def test_gradients_flow_through_the_admm_solve_with_its_stopping_rule():
    kspace, mask, maps = _model_scan()
    model = CDLLambda(_randomised_v3(), iterations=60, grad_iterations=4, solver="admm", tolerance=1e-2)
    out = model(kspace, mask, random_dictionary(8, 5), coil_maps=maps, noise_std=0.05)
    out.image.abs().pow(2).sum().backward()
    grads = [p.grad for p in model.lambda_net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert int(out.iterations_used[0]) < 60  # the undifferentiated part stopped by the rule, then 4 more


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["admm", "fista"])
def test_every_device_gives_the_float64_image(device, solver):
    """float32 on each device present against a float64 CPU reference (the same maths, another summation order):
    within 1e-4 relative, far below the 1e-2 changes a wrong step would make."""
    kspace, mask, maps = _model_scan()
    dictionary = random_dictionary(8, 5)
    model = CDLLambda(_randomised_v3(), iterations=30, solver=solver, tolerance=0.0)
    with torch.no_grad():
        reference = model.double()(kspace.to(torch.complex128), mask.double(), dictionary,
                                   coil_maps=maps.to(torch.complex128), noise_std=0.05).image
        model = model.float().to(device)
        image = model(kspace.to(device), mask.to(device), dictionary, coil_maps=maps.to(device), noise_std=0.05).image
    assert relative(image.cpu().to(torch.complex128), reference) < 1e-4
