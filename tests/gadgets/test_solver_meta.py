"""The image meta says where the solver's stopping rule stopped (and nothing when the outcome does not know)."""

from types import SimpleNamespace

from cdl_lambda.gadgets.image_output import noise_meta


def test_meta_carries_iterations_used_and_final_relative_change():
    outcome = SimpleNamespace(noise_source="noise scan", noise_std=1.0, residual_to_noise=1.02, iterations_used=37,
                              final_relative_change=0.009312)
    meta = noise_meta(outcome)
    assert meta["CDL_IterationsUsed"] == "37"
    assert float(meta["CDL_FinalRelativeChange"]) == 0.00931


def test_meta_leaves_the_keys_out_when_unknown():
    meta = noise_meta(SimpleNamespace(noise_source="", noise_std=None, residual_to_noise=None))
    assert "CDL_IterationsUsed" not in meta and "CDL_FinalRelativeChange" not in meta


def test_meta_says_whether_the_background_weight_was_applied_withdrawn_in_part_or_withdrawn():
    base = dict(noise_source="", noise_std=None, residual_to_noise=None)
    applied = noise_meta(SimpleNamespace(**base, background_disagreement=3.14159, background_withdrawn=False,
                                         background_kept=1.0))
    in_part = noise_meta(SimpleNamespace(**base, background_disagreement=8.25, background_withdrawn=True,
                                         background_kept=0.6789))
    withdrawn = noise_meta(SimpleNamespace(**base, background_disagreement=11.5, background_withdrawn=True,
                                           background_kept=0.0))
    assert applied["CDL_BackgroundWeight"] == "applied" and applied["CDL_BackgroundDisagreement"] == "3.14"
    assert applied["CDL_BackgroundWeightKept"] == "1.00"
    assert in_part["CDL_BackgroundWeight"] == "withdrawn-in-part" and in_part["CDL_BackgroundWeightKept"] == "0.68"
    assert withdrawn["CDL_BackgroundWeight"] == "withdrawn" and withdrawn["CDL_BackgroundDisagreement"] == "11.50"
    assert withdrawn["CDL_BackgroundWeightKept"] == "0.00"
    assert "CDL_BackgroundWeight" not in noise_meta(SimpleNamespace(**base))


def test_meta_says_the_scale_the_dictionary_was_resampled_to():
    base = dict(noise_source="", noise_std=None, residual_to_noise=None)
    assert noise_meta(SimpleNamespace(**base, dictionary_scale=2.0))["CDL_DictionaryScale"] == "2"
    assert noise_meta(SimpleNamespace(**base, dictionary_scale=1.0))["CDL_DictionaryScale"] == "1"
    assert "CDL_DictionaryScale" not in noise_meta(SimpleNamespace(**base))
