"""The targets the evaluation checks, on brain-masked SSIM unless said otherwise, keyed by method ids:

* ``cdl_lambda_v3`` ≥ ``zero_filled`` + 0.2 and above ``cdl_scalar``, in distribution, at each σ²;
* its in→out drop smaller than that of ``unrolled`` and of ``unet_ablation``;
* ``cdl_lambda_v3_heldout`` (and ``cdl_lambda_v3_unseen_k``) no more than 0.02 below ``cdl_lambda_v3``;
* ``v1`` loses more than 0.005 when its filters are permuted (``v1_permuted``), V3 does not (|Δ| < 10⁻³).

A method that was not run gives NaN, and its target is MISSED.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdl_lambda.lab.evaluation.methods import Method
from cdl_lambda.lab.evaluation.report import display_name

NOISE_LEVELS = (0.2, 0.3)


@dataclass(frozen=True)
class Target:
    met: bool
    statement: str

    def line(self) -> str:
        return f"{'MET' if self.met else 'MISSED'}: {self.statement}"


def check_targets(by_id: dict[str, Method], noise_levels=NOISE_LEVELS) -> list[Target]:
    """Every target with the measured numbers."""
    def s(method_id, split="test", noise=0.2, key="ssim_mask"):
        v = by_id[method_id].summary(split, noise) if method_id in by_id else {}
        return v.get(key, float("nan"))

    out = []
    v3 = "cdl_lambda_v3"
    for noise in noise_levels:
        gain = s(v3, noise=noise) - s("zero_filled", noise=noise)
        whole = s(v3, noise=noise, key="ssim") - s("zero_filled", noise=noise, key="ssim")
        out.append(Target(gain >= 0.2, f"CDL-Λ ≥ zero-filled + 0.2 SSIM in distribution, σ²={noise}"
                                       f" (gain {gain:+.3f} brain-masked; {whole:+.3f} on the whole image)"))
        diff = s(v3, noise=noise) - s("cdl_scalar", noise=noise)
        whole = s(v3, noise=noise, key="ssim") - s("cdl_scalar", noise=noise, key="ssim")
        out.append(Target(diff > 0, f"CDL-Λ above the best scalar λ, σ²={noise} ({diff:+.3f} "
                                    f"brain-masked; {whole:+.3f} on the whole image)"))
    for other in ("unrolled", "unet_ablation"):
        for noise in noise_levels:
            d_v3 = s(v3, noise=noise) - s(v3, "ood", noise)
            d_o = s(other, noise=noise) - s(other, "ood", noise)
            out.append(Target(d_v3 < d_o, f"in→out SSIM drop of CDL-Λ ({d_v3:+.3f}) smaller than "
                                          f"{display_name(other)} ({d_o:+.3f}), σ²={noise}"))
    for method_id in ("cdl_lambda_v3_heldout", "cdl_lambda_v3_unseen_k"):
        if method_id == "cdl_lambda_v3_unseen_k" and method_id not in by_id:
            continue
        name = display_name(by_id[method_id]) if method_id in by_id else display_name(method_id)
        for split in ("test", "ood"):
            diff = s(method_id, split) - s(v3, split)
            out.append(Target(diff >= -0.02, f"{name} no more than 0.02 SSIM below the "
                                             f"training dictionaries ({split}, σ²=0.2: {diff:+.3f})"))
    v1 = s("v1") - s("v1_permuted")
    v3p = s("cdl_lambda_v3_fixed") - s("cdl_lambda_v3_permuted")
    out.append(Target(v1 > 0.005, f"V1 loses under permutation (−{v1:.3f} SSIM)"))
    out.append(Target(abs(v3p) < 1e-3, f"V3 does not ({-v3p:+.4f} SSIM)"))
    return out
