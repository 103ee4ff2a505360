"""lab.training_curves: histories read from checkpoints, the plateau verdict, the table and the figure."""

import pytest
import torch

from cdl_lambda.lab import training_curves


def write_run(path, losses, ssims=None):
    history = [{"step": 100 * (i + 1), "seconds": 60.0 * (i + 1), "train_loss": 0.03, "val_loss": v,
                "val_ssim": None if ssims is None else ssims[i]} for i, v in enumerate(losses)]
    torch.save({"step": 100 * len(losses), "history": history}, path)
    return path


def test_a_run_still_falling_has_not_plateaued_and_one_in_its_noise_has(tmp_path):
    """Second halves: a steady fall under scatter (t ≈ −7) against scatter around a level (t ≈ −1.2)."""
    scatter = [0.0004, -0.0003, 0.0002, -0.0004]
    falling = [0.030, 0.026, 0.024, 0.022] + [0.020 - 0.001 * i + e for i, e in enumerate(scatter)]
    flat = [0.030, 0.020, 0.016, 0.015] + [0.0145 + e for e in scatter]
    falling = training_curves.read_curve("falling", write_run(tmp_path / "a.ckpt", falling))
    flat = training_curves.read_curve("flat", write_run(tmp_path / "b.ckpt", flat))
    short = training_curves.read_curve("short", write_run(tmp_path / "c.ckpt", [0.02, 0.01, 0.009, 0.008, 0.0075]))
    assert falling.plateaued is False and falling.slope_t < -2
    assert flat.plateaued is True and -2 < flat.slope_t < 0
    assert short.plateaued is None  # 3 validations in its second half
    assert falling.minutes[:2] == [1.0, 2.0] and falling.steps[-1] == 800


def test_the_table_names_best_step_and_verdict_and_the_figure_is_written(tmp_path):
    losses = [0.0150, 0.0140, 0.0148, 0.0145, 0.0146, 0.0143, 0.0147, 0.0144]
    curve = training_curves.read_curve("run", write_run(tmp_path / "a.ckpt", losses, [0.79] * 7 + [0.795]))
    text = training_curves.table([curve])
    assert f"| run | 800 | 8 | 0.01500 → 0.01400 (200) → 0.01440 | 0.7900 → 0.7950 | yes (t = {curve.slope_t:.1f}) |" \
        in text
    figure = training_curves.plot([curve], tmp_path / "curves.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_without_validations_is_refused_by_name(tmp_path):
    path = tmp_path / "empty.ckpt"
    torch.save({"step": 3, "history": []}, path)
    with pytest.raises(ValueError, match="empty.ckpt: no validation history"):
        training_curves.read_curve("empty", path)


def test_a_fine_tune_is_drawn_after_the_training_it_started_from(tmp_path):
    curve = training_curves.read_curve("fine-tune", write_run(tmp_path / "a.ckpt", [0.02, 0.01]), offset_minutes=50)
    assert curve.minutes == [51.0, 52.0]
