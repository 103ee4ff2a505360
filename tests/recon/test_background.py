"""recon.background: the background weight's two terms solve the problems they claim, vanish with their gains, and are
refused where a solver cannot take them."""

from types import SimpleNamespace

import pytest
import torch

from support import phantom, random_dictionary, synthetic_maps
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.background import WITHDRAW_Z, data_disagreement, kept_where_data_agree, on_coarser_grid
from cdl_lambda.recon.fft import fft2c
from cdl_lambda.recon.lambda_nets import LambdaNetV3, build_lambda_net, set_trained_matrix
from cdl_lambda.recon.lowpass import gradient_normal
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.sampling import equispaced_line_mask
from cdl_lambda.recon.solvers import soft_threshold
from cdl_lambda.recon.weights import WeightsRegistry

SHAPE = (32, 32)


def scan(seed=0):
    """A 4-coil, R = 2 scan of a phantom occupying the middle of the field of view, in noise units."""
    torch.manual_seed(seed)
    x = phantom(*SHAPE)
    x[:6], x[-6:], x[:, :6], x[:, -6:] = 0, 0, 0, 0
    maps = synthetic_maps(4, SHAPE)
    maps = (maps / maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()).unsqueeze(0)
    mask = equispaced_line_mask(SHAPE, 2, 8)
    noise = 0.05 * torch.randn(1, 4, *SHAPE, dtype=torch.complex64)
    return fft2c(maps * (20 * x)[None, None]) * mask + noise * mask, mask, maps


def box_background() -> torch.Tensor:
    """b = 1 on a band along the border (where the phantom is zero), 0 elsewhere."""
    b = torch.ones(1, *SHAPE)
    b[:, 5:-5, 5:-5] = 0
    return b


def test_without_gains_or_weight_the_background_network_reconstructs_as_the_network_alone():
    kspace, mask, maps = scan()
    d = random_dictionary(6, 5)
    plain = LambdaNetV3(base_channels=4, stages=1)
    with_background = LambdaNetV3(base_channels=4, stages=1, background=True)
    with_background.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        with_background.background.raw_lowpass_gain.fill_(-40.0)   # softplus(−40) ≈ 4e−18
        with_background.background.raw_image_gain.fill_(-40.0)
        with_background.background.unet.head.bias.fill_(-40.0)             # b ≈ 4e−18: the final (1 − b) is 1
        a = CDLLambda(plain, iterations=20)(kspace, mask, d, coil_maps=maps, noise_std=0.05)
        b = CDLLambda(with_background, iterations=20)(kspace, mask, d, coil_maps=maps, noise_std=0.05)
    assert a.background is None and b.background.shape == (1, *SHAPE)
    assert ((b.background > 0) & (b.background < 1)).all()
    assert ((a.image - b.image).norm() / a.image.norm()) < 1e-5


def test_both_steps_solve_their_weighted_problems(monkeypatch):
    """x_L satisfies (AᴴA + β∇ᴴ∇ + γ_L b) x_L = Aᴴy, and FISTA's codes are a fixed point of the proximal-gradient map
    of ½‖A(x_L + D s) − y‖² + (γ_R/2)‖√b ⊙ (x_L + D s)‖² + ‖Λ ⊙ s‖₁, the gradient taken by autograd of that
    objective written out directly."""
    kspace, mask, maps = scan(1)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=1500, cg_iterations=200)
    b = box_background()
    terms = SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(5.0),
                            image_gain=torch.tensor(2.0), form="penalty", step="uniform")
    monkeypatch.setattr(model, "background_terms", lambda x0: terms)
    with torch.no_grad():
        s = model._scan_in_noise_units(kspace, mask, maps, 1.0)
        x0 = s.op.adjoint(s.y)
        x_low = model._low_pass(s, x0, terms)
        normal = s.op.normal(x_low) + 2.0 * gradient_normal(x_low) + 5.0 * terms.native * x_low
        assert ((normal - x0).norm() / x0.norm()) < 1e-4
        lam = torch.full((1, d.num_filters, *SHAPE), 0.5)
        codes, _ = model._solve(s, x_low, lam, d, 1500, 0, terms)

    def smooth(c):
        image = x_low + _fft.ifft2(d.synthesize_fourier(_fft.fft2(c)))
        return 0.5 * (s.op.forward(image) - s.y).abs().pow(2).sum() + \
            0.5 * 2.0 * (terms.native * image.abs().pow(2)).sum()

    c = codes.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(smooth(c), c)
    step = 0.1 / d.lipschitz(SHAPE)
    moved = soft_threshold(codes - step * gradient, step * lam)  # autograd gives ∂f/∂s̄ · 2 = Dᴴ(…)
    assert codes.norm() > 0
    assert ((moved - codes).norm() / codes.norm()) < 1e-3


@pytest.mark.parametrize("coils", [4, 1])
def test_the_factor_form_solves_its_problem(monkeypatch, coils):
    """In the factor form FISTA's codes are a fixed point of the proximal-gradient map of
    ½‖A((1 − b) ⊙ (x_L + D s)) − y‖² + ‖Λ ⊙ s‖₁ (gradient by autograd of that objective written out), for several
    coils and for one; b is 1 on the border, ½ on two bands inside it, 0 in the middle."""
    kspace, mask, maps = scan(4)
    if coils == 1:
        kspace, maps = kspace[:, 0], None
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=300, cg_iterations=100)
    b = box_background()
    b[:, 5:8, 5:-5], b[:, -8:-5, 5:-5] = 0.5, 0.5
    terms = SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(5.0),
                            image_gain=torch.tensor(2.0), form="factor", step="uniform")
    monkeypatch.setattr(model, "background_terms", lambda x0: terms)
    keep = 1 - terms.native
    with torch.no_grad():
        s = model._scan_in_noise_units(kspace, mask, maps, 1.0)
        x_low = model._low_pass(s, s.op.adjoint(s.y), terms)
        lam = torch.full((1, d.num_filters, *SHAPE), 0.5)
        codes, _ = model._solve(s, x_low, lam, d, 300, 0, terms)

    def smooth(c):
        image = keep * (x_low + _fft.ifft2(d.synthesize_fourier(_fft.fft2(c))))
        return 0.5 * (s.op.forward(image) - s.y).abs().pow(2).sum()

    c = codes.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(smooth(c), c)
    step = 0.99 / d.lipschitz(SHAPE)
    moved = soft_threshold(codes - step * gradient, step * lam)
    assert codes.norm() > 0
    # 300 steps leave 4e−5 (6e−6 after 600); without the factor on Aᴴy′ the map moves the codes by 2–8e−4
    assert ((moved - codes).norm() / codes.norm()) < 1e-4


@pytest.mark.parametrize("form", ["penalty", "factor"])
def test_only_the_penalty_form_shrinks_the_fista_step(monkeypatch, form):
    """τ = 0.99 / ‖D‖² in the factor form (0 ≤ 1 − b ≤ 1 keeps the Lipschitz bound), 0.99 / ((1 + γ_R)‖D‖²) in the
    penalty form: read from the threshold τΛ the model hands to FISTA."""
    from cdl_lambda.recon import model as model_module

    kspace, mask, maps = scan(5)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=5).eval()
    b = box_background()
    terms = SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(5.0),
                            image_gain=torch.tensor(2.0), form=form, step="uniform")
    monkeypatch.setattr(model, "background_terms", lambda x0: terms)
    thresholds, real = [], model_module.fista
    monkeypatch.setattr(model_module, "fista", lambda step, threshold, *args, **kwargs: (
        thresholds.append(threshold), real(step, threshold, *args, **kwargs))[1])
    with torch.no_grad():
        model(kspace, mask, d, coil_maps=maps, noise_std=1.0)
    expected = 0.99 / d.lipschitz(SHAPE) / (3.0 if form == "penalty" else 1.0)
    assert torch.allclose(thresholds[0], torch.full_like(thresholds[0], expected * 0.5), rtol=1e-5)


def test_the_weight_pulls_the_background_down_and_keeps_the_object():
    kspace, mask, maps = scan(2)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=200)
    with torch.no_grad():
        plain = model(kspace, mask, d, coil_maps=maps, noise_std=0.05).image[0].abs()
    b = box_background()
    terms = SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(5.0),
                            image_gain=torch.tensor(2.0), form="penalty", step="uniform")
    model.background_terms = lambda x0: terms
    with torch.no_grad():
        weighted = model(kspace, mask, d, coil_maps=maps, noise_std=0.05).image[0].abs()
    border, inside = b[0] > 0, torch.zeros(SHAPE, dtype=torch.bool)
    inside[8:-8, 8:-8] = True
    assert weighted[border].mean() < 0.5 * plain[border].mean()
    assert abs(weighted[inside].mean() / plain[inside].mean() - 1) < 0.02


def test_admm_refuses_a_network_with_a_background_weight():
    with pytest.raises(ValueError, match="background weight"):
        CDLLambda(LambdaNetV3(base_channels=4, stages=1, background=True), solver="admm")


def test_the_config_rebuilds_the_background_weight():
    net = LambdaNetV3(base_channels=4, stages=1, background=True)
    rebuilt = build_lambda_net(net.config())
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.background is not None
    assert "background" not in LambdaNetV3(base_channels=4, stages=1).config()
    assert rebuilt.background.form == "penalty" and "background_form" not in net.config()
    factor = build_lambda_net(LambdaNetV3(base_channels=4, stages=1, background=True,
                                          background_form="factor").config())
    assert factor.background.form == "factor"
    with pytest.raises(ValueError, match="unknown background form"):
        LambdaNetV3(base_channels=4, stages=1, background=True, background_form="mask")


def test_the_disagreement_of_pure_noise_is_the_maximum_of_rayleigh_draws():
    """Noise-only data and a zero image: Z is the largest of ~N² box means of complex Gaussian noise scaled to unit
    variance, P(Z > t) = 1 − (1 − exp(−t²))^N² per pixel set; for 64² pixels its median is about √ln(64² / ln 2)."""
    torch.manual_seed(3)
    shape = (64, 64)
    maps = synthetic_maps(4, shape)
    maps = (maps / maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()).unsqueeze(0)
    mask = equispaced_line_mask(shape, 2, 8)
    from cdl_lambda.recon.operators import make_operator
    op = make_operator(mask, maps)
    draws = []
    for _ in range(20):
        noise = torch.randn(1, 4, *shape, dtype=torch.complex64) * mask
        draws.append(float(data_disagreement(op, noise, torch.ones(1, *shape))))  # y − A·0 = noise
    expected = (torch.log(torch.tensor(64.0 * 64 / 0.6931))).sqrt().item()
    assert abs(float(torch.tensor(draws).median()) - expected) < 0.5


def test_a_weight_on_the_object_is_withdrawn_and_one_beside_it_is_kept(monkeypatch):
    kspace, mask, maps = scan(4)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=100).eval()
    with torch.no_grad():
        plain = model(kspace, mask, d, coil_maps=maps, noise_std=0.05)
    outcomes = {}
    for name, b in (("beside", box_background()), ("on the object", torch.zeros(1, *SHAPE))):
        if name == "on the object":
            b[:, 8:16, 8:24] = 1
        terms = SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(10.0),
                                image_gain=torch.tensor(2.0), form="penalty", step="uniform")
        monkeypatch.setattr(model, "background_terms", lambda x0, terms=terms: terms)
        with torch.no_grad():
            outcomes[name] = model(kspace, mask, d, coil_maps=maps, noise_std=0.05)
    beside, on_object = outcomes["beside"], outcomes["on the object"]
    assert not beside.background_withdrawn.any() and beside.background_disagreement < WITHDRAW_Z
    assert on_object.background_withdrawn.all() and on_object.background_disagreement > 2 * WITHDRAW_Z
    assert float(on_object.background_kept[0]) == 0 and float(beside.background_kept[0]) == 1
    assert torch.allclose(on_object.image, plain.image, atol=1e-5 * plain.image.abs().max())
    border = box_background()[0] > 0
    assert beside.image[0].abs()[border].mean() < 0.5 * plain.image[0].abs()[border].mean()


def terms_of(b: torch.Tensor, form: str = "penalty", step: str = "uniform") -> SimpleNamespace:
    return SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(10.0),
                           image_gain=torch.tensor(2.0), form=form, step=step)


def test_a_withdrawn_slice_keeps_the_weight_where_the_data_agree(monkeypatch):
    """b on the empty border and on a patch of the object: the data contradict the patch, so the slice is solved
    without the weight, and the image is that weight-free image on and around the patch but keeps the factor 1 − b
    on the border far from it (0 where b = 1); the share of b > ½ kept is some of the border's (R = 2 folds the
    patch's disagreement onto the border rows half a field of view away, which lose the weight too). With a hard
    edge (FEATHER = 1): the fade's few pixels would cover most of a 32² grid (it has its own tests)."""
    from cdl_lambda.recon import background as background_module

    monkeypatch.setattr(background_module, "FEATHER", 1)
    kspace, mask, maps = scan(4)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=60).eval()
    b = box_background()
    b[:, 12:20, 12:20] = 1
    monkeypatch.setattr(model, "background_terms", lambda x0: terms_of(b))
    with torch.no_grad():
        out = model(kspace, mask, d, coil_maps=maps, noise_std=0.05)
        plain = model(kspace, mask, d, coil_maps=maps, noise_std=0.05, with_background=False).image[0]
    assert out.background_withdrawn.all() and out.background_disagreement > 2 * WITHDRAW_Z
    border = box_background()[0] > 0
    assert 0.2 < float(out.background_kept[0]) < float(border.sum() / (b[0] > 0.5).sum())
    scale = plain.abs().max()
    assert torch.allclose(out.image[0][6:26, 6:26], plain[6:26, 6:26], atol=1e-5 * scale)  # the patch, grown
    side = (slice(8, 24), slice(0, 3))                                                      # border columns beside it
    assert plain[side].abs().mean() > 1e-3 * scale and out.image[0][side].abs().max() < 1e-6 * scale
    applied = out.background_applied[0]                                                    # what the image kept
    assert applied[12:20, 12:20].max() == 0 and torch.equal(applied[side], b[0][side])
    assert float(out.background_kept[0]) == float((applied > 0.5).sum() / (b[0] > 0.5).sum())


def test_the_withdrawal_is_full_within_the_margin_and_fades_out_beyond_it():
    """One disagreeing pixel on a 40² grid: the withdrawal is 1 up to DISAGREE_MARGIN pixels away in each direction,
    then 1 − j / FEATHER at j pixels beyond, 0 from FEATHER pixels beyond on; it never withdraws less than the hard
    margin did, and an even fade width is refused."""
    from cdl_lambda.recon.background import DISAGREE_MARGIN, FEATHER, withdrawal

    core = torch.zeros(1, 40, 40, dtype=torch.bool)
    core[0, 20, 20] = True
    w = withdrawal(core)[0]
    along_row = w[20, 20:]
    expected = [1.0] * (DISAGREE_MARGIN + 1) + [1 - j / FEATHER for j in range(1, FEATHER + 1)]
    assert torch.allclose(along_row[:len(expected)], torch.tensor(expected), atol=1e-6)
    assert along_row[len(expected):].max() == 0
    assert torch.equal(w[20, 10:21].flip(0), w[20, 20:31]) and torch.equal(w, w.T)  # symmetric about the pixel
    hard = withdrawal(core, feather=1)[0]
    assert hard.sum() == (2 * DISAGREE_MARGIN + 1) ** 2 and (w >= hard).all()
    diagonal = torch.tensor([float(w[20 + j, 20 + j]) for j in range(12)])
    assert (diagonal[1:] <= diagonal[:-1]).all() and diagonal[DISAGREE_MARGIN] == 1  # corners fade as well
    with pytest.raises(ValueError, match="odd"):
        withdrawal(core, feather=4)


def test_the_kept_weight_grows_its_withdrawal_until_the_data_agree():
    """An image that fits its data to the noise (the truth, in noise units) and a weight on the empty border and on
    half of the object, with no disagreement to start from: the weight is withdrawn round by round where the data
    show what it removed, until the image passes the check with the object whole and part of the weight kept.
    Allowed no round (the first image fails), the slice falls back to the weight-free image. With a hard edge
    (``feather=1``), as the 32² grid needs."""
    from cdl_lambda.recon import background as background_module
    from cdl_lambda.recon.operators import make_operator

    torch.manual_seed(6)
    truth = phantom(*SHAPE).to(torch.complex64) * 30
    truth[:6], truth[-6:], truth[:, :6], truth[:, -6:] = 0, 0, 0, 0
    maps = synthetic_maps(4, SHAPE)
    maps = (maps / maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()).unsqueeze(0)
    op = make_operator(_fft.to_native(equispaced_line_mask(SHAPE, 2, 8)), _fft.to_native(maps), centred=False)
    plain = _fft.to_native(truth[None])
    y = op.forward(plain) + op.mask * torch.randn(1, 4, *SHAPE, dtype=torch.complex64)
    b = box_background()
    b[:, 6:16, 6:-6] = 1                                                    # half the object
    weight, nothing = _fft.to_native(b), torch.zeros(1, *SHAPE)
    part = kept_where_data_agree(op, y, plain, weight, nothing, feather=1)
    assert float(part.check[0]) <= WITHDRAW_Z and 0 < float(part.kept[0]) < 1
    assert data_disagreement(op, y - op.forward(part.image), part.weight) <= WITHDRAW_Z
    assert torch.equal(_fft.from_native(part.image)[0], truth)  # every pixel of the object back, the border 0
    assert torch.allclose(part.residual, y - op.forward(part.image))
    rounds = background_module.DISAGREE_ROUNDS
    try:
        background_module.DISAGREE_ROUNDS = 0
        none_passes = kept_where_data_agree(op, y, plain, weight, nothing, feather=1)
    finally:
        background_module.DISAGREE_ROUNDS = rounds
    assert float(none_passes.kept[0]) == 0 and torch.equal(none_passes.image, plain)
    assert torch.allclose(none_passes.residual, y - op.forward(plain))


def test_a_kept_weight_fades_back_beside_where_the_data_disagree():
    """On a 64² grid, an image that fits its data and a weight b = 1 on its empty border, a disagreeing box given on
    the border: the weight kept is b ⊙ (1 − withdrawal), 0 on and beside the box and back to b over FEATHER pixels,
    no step along the border larger than one pixel's share of the fade; the image passes the check in the first
    round and is the truth (it is 0 wherever b acts)."""
    from cdl_lambda.recon.background import DISAGREE_MARGIN, FEATHER, withdrawal
    from cdl_lambda.recon.operators import make_operator

    torch.manual_seed(7)
    shape = (64, 64)
    truth = torch.zeros(shape, dtype=torch.complex64)
    truth[12:-12, 12:-12] = phantom(40, 40).to(torch.complex64) * 30
    maps = synthetic_maps(4, shape)
    maps = (maps / maps.abs().pow(2).sum(dim=0, keepdim=True).sqrt()).unsqueeze(0)
    op = make_operator(_fft.to_native(equispaced_line_mask(shape, 2, 8)), _fft.to_native(maps), centred=False)
    plain = _fft.to_native(truth[None])
    y = op.forward(plain) + op.mask * torch.randn(1, 4, *shape, dtype=torch.complex64)
    b = torch.ones(1, *shape)
    b[:, 10:-10, 10:-10] = 0
    core = torch.zeros(1, *shape)
    core[:, 2:5, 30:33] = 10.0                                    # Z above DISAGREE_Z on one 3 × 3 box of the border
    part = kept_where_data_agree(op, y, plain, _fft.to_native(b), _fft.to_native(core))
    kept = _fft.from_native(part.weight)[0]
    assert torch.allclose(kept, b[0] * (1 - withdrawal(core > 3)[0]), atol=1e-6)
    row = kept[3]                                                 # along the border through the box
    assert row[30 - DISAGREE_MARGIN:33 + DISAGREE_MARGIN].max() == 0
    assert torch.allclose(row[33 + DISAGREE_MARGIN:33 + DISAGREE_MARGIN + FEATHER],
                          torch.arange(1, FEATHER + 1) / FEATHER, atol=1e-6)
    assert (row[1:] - row[:-1]).abs().max() <= 1 / FEATHER + 1e-6
    assert float(part.check[0]) <= WITHDRAW_Z and torch.allclose(_fft.from_native(part.image)[0], truth)


def test_in_a_batch_only_the_disagreeing_slice_is_solved_again(monkeypatch):
    """Two slices, the weight beside the object in the first and on it in the second: the first keeps its weighted
    image, the second gets the weight-free one, each as if solved alone."""
    (k1, mask, maps1), (k2, _, maps2) = scan(4), scan(5)
    kspace, maps = torch.cat([k1, k2]), torch.cat([maps1, maps2])
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=60).eval()
    beside, on_object = box_background(), torch.zeros(1, *SHAPE)
    on_object[:, 8:16, 8:24] = 1

    def terms(b):
        return SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(10.0),
                               image_gain=torch.tensor(2.0), form="penalty", step="uniform")

    with torch.no_grad():
        monkeypatch.setattr(model, "background_terms", lambda x0: terms(torch.cat([beside, on_object])))
        both = model(kspace, mask, d, coil_maps=maps, noise_std=0.05)
        monkeypatch.setattr(model, "background_terms", lambda x0: terms(beside))
        first = model(k1, mask, d, coil_maps=maps1, noise_std=0.05)
        monkeypatch.setattr(model, "background_terms", lambda x0: None)
        second = model(k2, mask, d, coil_maps=maps2, noise_std=0.05)
    assert both.background_withdrawn.tolist() == [False, True]
    scale = both.image.abs().max()
    assert torch.allclose(both.image[:1], first.image, atol=1e-5 * scale)
    assert torch.allclose(both.image[1:], second.image, atol=1e-5 * scale)
    assert both.iterations_used.tolist() == [first.iterations_used.item(), second.iterations_used.item()]


def test_solving_without_the_weight_is_how_a_withdrawn_slice_is_solved(monkeypatch):
    """with_background=False (what training's dropout runs) gives a withdrawn slice's image, and no weight."""
    kspace, mask, maps = scan(4)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=40).eval()
    on_object = torch.zeros(1, *SHAPE)
    on_object[:, 8:16, 8:24] = 1
    terms = SimpleNamespace(centred=on_object, native=_fft.to_native(on_object), lowpass_gain=torch.tensor(10.0),
                            image_gain=torch.tensor(2.0), form="penalty", step="uniform")
    monkeypatch.setattr(model, "background_terms", lambda x0: terms)
    with torch.no_grad():
        withdrawn = model(kspace, mask, d, coil_maps=maps, noise_std=0.05)
        without = model(kspace, mask, d, coil_maps=maps, noise_std=0.05, with_background=False)
        weighted = model.train()(kspace, mask, d, coil_maps=maps, noise_std=0.05)  # training: never withdrawn
    assert withdrawn.background_withdrawn.all() and without.background is None
    scale = withdrawn.image.abs().max()
    assert torch.allclose(without.image, withdrawn.image, atol=1e-5 * scale)
    assert (weighted.image - without.image).abs().max() > 0.05 * scale


def test_the_image_is_the_solution_times_one_minus_the_weight(monkeypatch):
    """x = (1 − b) ⊙ (x_L + D s*): where b = ½ half the solution is shown, where b = 0 all of it."""
    kspace, mask, maps = scan(3)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=30).eval()
    b = 0.5 * box_background()
    terms = SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(5.0),
                            image_gain=torch.tensor(2.0), form="penalty", step="uniform")
    monkeypatch.setattr(model, "background_terms", lambda x0: terms)
    with torch.no_grad():
        out = model(kspace, mask, d, coil_maps=maps, noise_std=1.0)
        s = model._scan_in_noise_units(kspace, mask, maps, 1.0)
        x_low = model._low_pass(s, s.op.adjoint(s.y), terms)
        lam = torch.full((1, d.num_filters, *SHAPE), 0.5)
        codes, _ = model._solve(s, x_low, lam, d, 30, 0, terms)
        solution = _fft.from_native((x_low + _fft.ifft2(d.synthesize_fourier(_fft.fft2(codes)))) * s.support)
    assert not out.background_withdrawn.any()
    border = b[0] > 0
    scale = solution.abs().max()
    assert torch.allclose(out.image[0][border], 0.5 * solution[0][border], atol=1e-5 * scale)
    assert torch.allclose(out.image[0][~border], solution[0][~border], atol=1e-5 * scale)
    assert solution[0][border].abs().max() > 1e-3 * scale


def test_a_larger_matrix_gets_the_weight_its_own_field_of_view_gets_at_the_trained_matrix():
    """on_coarser_grid: a band-limited image at 64² (its 32² k-space zero-padded) gets exactly the weights the 32²
    image gets, interpolated, whatever the map; white noise of 1 per pixel stays 1 per pixel on the coarse grid; at
    or below the trained matrix the network runs on the image's own grid."""
    torch.manual_seed(5)
    small = phantom(32, 32).to(torch.complex64) * 7 + torch.randn(32, 32, dtype=torch.complex64)
    big = _fft.ifft2c(torch.nn.functional.pad(fft2c(small[None]), (16, 16, 16, 16)))

    def infer(x):  # any nonlinear map of the image: the test is where it is evaluated
        return torch.sigmoid(x.abs() - 3 + x.real.roll(1, dims=-1))

    expected = torch.nn.functional.interpolate(infer(small[None]).unsqueeze(1), size=(64, 64), mode="bilinear",
                                               align_corners=False).squeeze(1)
    assert torch.allclose(on_coarser_grid(infer, big, 32), expected, atol=1e-5)
    noise = torch.randn(8, 128, 128, dtype=torch.complex64)
    seen = []
    on_coarser_grid(lambda x: seen.append(x) or x.real, noise, 64)
    assert seen[0].shape[-2:] == (64, 64) and abs(float(seen[0].abs().pow(2).mean()) - 1.0) < 0.03  # E|n|² = 1

    network = LambdaNetV3(base_channels=4, stages=1, background=True)
    set_trained_matrix(network, 32)
    weight, x = network.background, small[None] / 10
    assert weight.matrix == 32 and torch.equal(weight(x), weight._infer(x))               # at the trained matrix
    assert torch.allclose(weight(big / 10), on_coarser_grid(weight._infer, big / 10, 32))  # above it
    assert weight(big / 10).shape == (1, 64, 64)


def test_a_shipped_network_infers_its_weight_at_the_matrix_it_was_trained_at():
    loaded = WeightsRegistry().network(None)
    assert loaded.settings["size"] == 128 and loaded.network.background.matrix == 128 and loaded.network.matrix == 128


def test_in_a_batch_only_the_withdrawn_slice_is_solved_again_and_each_residual_is_its_own_images(monkeypatch):
    """A batch of two slices, the weight on the object in the first (withdrawn) and beside it in the second (kept):
    each image and its data residual relative to the noise are those of the slice reconstructed alone."""
    kspace, mask, maps = scan(4)
    d = random_dictionary(6, 5)
    model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=60).eval()
    on_object, beside = torch.zeros(1, *SHAPE), box_background()
    on_object[:, 8:16, 8:24] = 1

    def terms_of(b):
        return SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=torch.tensor(10.0),
                               image_gain=torch.tensor(2.0), form="penalty", step="uniform")

    alone = []
    for b in (on_object, beside):
        monkeypatch.setattr(model, "background_terms", lambda x0, terms=terms_of(b): terms)
        with torch.no_grad():
            alone.append(model(kspace, mask, d, coil_maps=maps, noise_std=0.05))
    monkeypatch.setattr(model, "background_terms", lambda x0: terms_of(torch.cat([on_object, beside])))
    with torch.no_grad():
        both = model(kspace.repeat(2, 1, 1, 1), mask, d, coil_maps=maps.repeat(2, 1, 1, 1), noise_std=0.05)
    assert both.background_withdrawn.tolist() == [True, False]
    for i, single in enumerate(alone):
        assert torch.allclose(both.image[i], single.image[0], atol=1e-5 * single.image.abs().max())
        assert float(both.residual_to_noise[i]) == pytest.approx(float(single.residual_to_noise[0]), rel=1e-4)


def test_the_local_step_majorises_the_penalty_forms_hessian():
    """diag(1/τ) with τ = 1 / (‖D‖² (1 + γ_R b̄)) bounds Dᴴ(AᴴA + γ_R diag b)D: the largest eigenvalue of
    τ^½ H τ^½ (power iteration) is at most 1 (0.75 here); the full step 1/‖D‖² everywhere, ignoring b, is not
    a bound (above 1)."""
    from cdl_lambda.recon.background import local_curvature
    from cdl_lambda.recon.operators import make_operator

    torch.manual_seed(8)
    _, mask, maps = scan(4)
    d = random_dictionary(6, 5)
    op = make_operator(_fft.to_native(mask), _fft.to_native(maps), centred=False)
    b = box_background() * torch.rand(1, *SHAPE).clamp_min(0.5)     # 0.5–1 on the border, 0 inside
    weight, gain = _fft.to_native(b), torch.tensor(2.5)
    d_hat = d.spectra(SHAPE)

    def hessian(codes):
        image = _fft.ifft2(d.synthesize_fourier(_fft.fft2(codes)))
        return _fft.ifft2(d_hat.conj() * _fft.fft2(op.normal(image) + gain * weight * image).unsqueeze(1))

    def largest(step):
        v = torch.randn(1, 6, *SHAPE, dtype=torch.complex64)
        for _ in range(300):
            v = step.sqrt() * hessian(step.sqrt() * v)
            value = v.norm()
            v = v / value
        return float(value)

    local = 1 / (d.lipschitz(SHAPE) * local_curvature(weight, gain, d.kernel_size))
    assert local.shape == (1, 1, *SHAPE) and float(local.max() / local.min()) == pytest.approx(3.5, rel=1e-3)
    assert 0.6 < largest(local) <= 1.0 + 1e-3
    assert largest(torch.full_like(local, 1 / d.lipschitz(SHAPE))) > 1.2


def test_the_local_step_reaches_the_same_image_sooner(monkeypatch):
    """Same objective, same minimiser: after 2000 iterations the images of both steps agree; after 24 the local
    step's image is the closer to it (0.008 against 0.021 relative here)."""
    kspace, mask, maps = scan(4)
    d = random_dictionary(6, 5)
    images = {}
    for step in ("uniform", "local"):
        model = CDLLambda(None, beta=2.0, scalar_lambda=0.5, iterations=2000, cg_iterations=100,
                          withdraw_z=float("inf")).eval()  # the weighted solve itself, never withdrawn
        terms = terms_of(box_background(), step=step)
        monkeypatch.setattr(model, "background_terms", lambda x0, terms=terms: terms)
        with torch.no_grad():
            images[step] = [model(kspace, mask, d, coil_maps=maps, noise_std=0.05, iterations=n).image
                            for n in (24, 2000)]
    (uniform_early, uniform), (local_early, local) = images["uniform"], images["local"]
    assert ((local - uniform).norm() / uniform.norm()) < 5e-4  # float32, FISTA's slow tail: 1.5e-4
    assert (local_early - local).norm() < 0.5 * (uniform_early - uniform).norm()


def test_the_local_step_is_part_of_the_network_and_only_for_the_penalty_form():
    net = LambdaNetV3(base_channels=4, stages=1, background=True, background_step="local")
    rebuilt = build_lambda_net(net.config())
    assert rebuilt.background.step == "local" and net.config()["background_step"] == "local"
    assert "background_step" not in LambdaNetV3(base_channels=4, stages=1, background=True).config()
    with pytest.raises(ValueError, match="penalty form"):
        LambdaNetV3(base_channels=4, stages=1, background=True, background_form="factor", background_step="local")
    with pytest.raises(ValueError, match="unknown background step"):
        LambdaNetV3(base_channels=4, stages=1, background=True, background_step="adaptive")
