"""Tissue fractions and synthesised contrasts (lab.contrasts) on a three-tissue phantom."""

import numpy as np
import pytest
import torch

from cdl_lambda.lab import contrasts


def three_tissue_head() -> np.ndarray:
    t1 = np.zeros((1, 40, 40), np.float32)
    t1[0, 5:35, 5:35] = 0.8     # white matter
    t1[0, 10:30, 10:20] = 0.5   # grey matter
    t1[0, 15:25, 22:28] = 0.2   # CSF
    t1[0, 5:7, 5:35] = 1.0      # scalp fat, brighter than white matter on T1
    return t1


CSF, GM, WM, FAT, BACKGROUND = (0, 20, 25), (0, 20, 15), (0, 12, 30), (0, 6, 20), (0, 0, 0)


def test_t2_weighted_contrast_inverts_csf_and_white_matter():
    t2 = contrasts.t2_weighted(three_tissue_head())
    assert t2[CSF] > t2[GM] > t2[WM] > 0 and t2[BACKGROUND] == 0


def test_fractions_name_each_tissue_and_sum_to_one_inside():
    f = contrasts.tissue_fractions(three_tissue_head())
    assert f.shape == (1, 4, 40, 40)
    for pixel, tissue in ((CSF, 0), (GM, 1), (WM, 2), (FAT, 3)):
        assert f[pixel[0], :, pixel[1], pixel[2]].argmax() == tissue
        assert f[pixel[0], tissue, pixel[1], pixel[2]] > 0.9
    inside = three_tissue_head()[0] > 0
    np.testing.assert_allclose(f[0].sum(0)[inside], 1.0, atol=1e-5)
    assert f[0, :, 0, 0].sum() == 0


@pytest.mark.parametrize("weighting, order", [("t1", ("wm", "gm", "csf")), ("t2", ("csf", "gm", "wm")),
                                              ("flair", ("gm", "wm", "csf"))])
def test_weightings_order_the_tissues_as_on_a_scanner(weighting, order):
    """T1w: WM > GM > CSF; T2w: CSF > GM > WM; FLAIR: CSF nulled below both, GM > WM."""
    fractions = contrasts.tissue_fractions(three_tissue_head())
    for seed in range(5):
        image = contrasts.synthesise(fractions, weighting, np.random.default_rng(seed))[0]
        at = {"csf": image[CSF[1:]], "gm": image[GM[1:]], "wm": image[WM[1:]]}
        assert at[order[0]] > at[order[1]] > at[order[2]], (seed, at)
        assert image[0, 0] == 0 and np.isfinite(image).all()


def test_flair_inversion_nulls_csf():
    fractions = contrasts.tissue_fractions(three_tissue_head())
    image = contrasts.synthesise(fractions, "flair", np.random.default_rng(0))[0]
    assert image[CSF[1:]] < 0.2 * image[GM[1:]]


def test_training_stream_draws_synthetic_contrasts_reproducibly():
    from cdl_lambda.lab import multicoil

    head = np.repeat(three_tissue_head(), 2, axis=0)
    head = np.pad(head, ((0, 0), (4, 4), (4, 4)))  # 48 × 48
    fractions = contrasts.tissue_fractions(head)
    a = multicoil.TrainingStream(head, 2, seed=5, fractions=fractions, synthetic=1.0)
    b = multicoil.TrainingStream(head, 2, seed=5, fractions=fractions, synthetic=1.0)
    first, again = next(a), next(b)
    torch.testing.assert_close(first.target, again.target)
    plain = next(multicoil.TrainingStream(head, 2, seed=5, fractions=None))
    assert not torch.allclose(first.target.abs(), plain.target.abs())


def test_augmentation_keeps_the_object_and_its_scale():
    from cdl_lambda.lab import multicoil

    image = np.pad(three_tissue_head()[0], 12)  # 64 × 64, the object well inside
    out = [multicoil.augment(image, np.random.default_rng(seed)) for seed in range(8)]
    for o in out:
        assert o.shape == image.shape and o.dtype == np.float32 and (o >= 0).all()
        area = (o > 0.1).sum() / (image > 0.1).sum()  # field of view 0.85–1.2×: area ratio 1/1.44 … 1/0.72
        assert 0.6 < area < 1.5
        assert 0.5 < o.max() / image.max() < 2.0  # bias field at most e^±0.3 around its mean
    assert len({o.tobytes() for o in out}) == len(out)
