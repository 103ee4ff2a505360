"""lab.train: gradients reach the network and β, a few steps lower the loss, resume reproduces the run."""

import pytest
import torch

from cdl_lambda.lab import datasets as data
from cdl_lambda.lab import train
from cdl_lambda.recon.weights import WeightsRegistry

from support import phantom, write_training_weights


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A weights folder with two training dictionaries and one held-out dictionary."""
    return WeightsRegistry(write_training_weights(tmp_path_factory.mktemp("weights")))


def tiny_images(n=4) -> torch.Tensor:
    base = phantom(32, 32).abs().float()
    return torch.stack([torch.rot90(base, i) * (0.7 + 0.1 * i) for i in range(n)])


def config(method="v3", **kw):
    settings = dict(method=method, size=32, batch_size=2, steps=4, iterations=6, grad_iterations=3, base_channels=4,
                    stages=1, lr=3e-3, validate_every=2, seed=0, dictionary="a", upper_bound=1.0,
                    initial_lambda=0.05)
    settings.update(kw)
    return train.TrainConfig(**settings)


def make_trainer(registry, method="v3", **kw):
    torch.set_num_threads(1)
    validation = data.fixed_examples(tiny_images(2), 0.2)
    return train.Trainer(config(method, **kw), device="cpu", images=tiny_images(), validation=validation,
                         registry=registry)


@pytest.mark.parametrize("method", ["v3", "v1", "ablation", "unrolled"])
def test_gradients_reach_every_parameter(registry, method):
    trainer = make_trainer(registry, method)
    trainer.train_step()
    for name, parameter in trainer.model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    if method in ("v3", "v1"):
        assert trainer.model.split.raw_beta.grad.abs() > 0
        assert trainer.model.lambda_net.unet.head.weight.grad.abs().sum() > 0


def test_steps_on_one_batch_lower_the_loss(registry):
    trainer = make_trainer(registry, "v3")
    batch = next(trainer.stream)
    dictionary = trainer.train_dicts[0]

    @torch.no_grad()
    def loss():
        return float(train.image_loss(train.reconstruct(trainer.model, batch, dictionary).image, batch.target))

    before = loss()
    for _ in range(5):
        trainer.optimizer.zero_grad()
        train.image_loss(train.reconstruct(trainer.model, batch, dictionary).image, batch.target).backward()
        trainer.optimizer.step()
    assert loss() < before


def test_v3_uses_training_dictionaries_and_validates_on_held_out(registry):
    trainer = make_trainer(registry, "v3")
    assert sorted(d.name for d in trainer.train_dicts) == ["a", "b"]
    assert [d.name for d in trainer.val_dicts] == ["c"]


def test_resume_reproduces_the_run(registry, tmp_path):
    straight = make_trainer(registry, "v3")
    straight.run(progress=False)

    first = make_trainer(registry, "v3", steps=2)
    first.run(tmp_path / "run.ckpt", progress=False)
    resumed = make_trainer(registry, "v3")
    resumed.load(tmp_path / "run.ckpt")
    assert resumed.step == 2
    resumed.run(progress=False)

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [h["step"] for h in resumed.history] == [2, 4]


def test_export_writes_a_loadable_network(registry, tmp_path):
    trainer = make_trainer(registry, "v3", steps=1)
    trainer.run(tmp_path / "run.ckpt", progress=False)
    root = tmp_path / "weights"
    entry = train.export(tmp_path / "run.ckpt", "tiny-v3", root, set_default=True)
    loaded = WeightsRegistry(root).network("default")
    assert loaded.name == "tiny-v3" and entry["training"]["steps"] == 1
    assert loaded.beta == pytest.approx(float(trainer.model.split.beta.detach()), rel=1e-4)


def test_a_campaign_records_its_total_steps_and_the_solver_it_was_validated_for(registry, tmp_path):
    """Fine-tuning from an exported network adds its steps and minutes to the new entry's totals; the entry names
    the solver, cap (the validation cap) and tolerance the network is deployed with."""
    import shutil

    root = tmp_path / "weights"
    shutil.copytree(registry.root, root)
    first = make_trainer(registry, "v3", steps=2, validate_every=1)
    first.run(tmp_path / "first.ckpt", progress=False)
    train.export(tmp_path / "first.ckpt", "start", root)
    second = make_trainer(WeightsRegistry(root), "v3", steps=3, validate_every=1, init_network="start",
                          weights_dir=str(root), val_iterations=5)
    second.run(tmp_path / "second.ckpt", progress=False)
    entry = train.export(tmp_path / "second.ckpt", "more", root)
    assert entry["training"]["fine_tuned_from"] == "start" and entry["training"]["total_steps"] == 5
    assert entry["training"]["total_cpu_minutes"] >= entry["training"]["cpu_minutes"]
    assert entry["solver"] == {"solver": "fista", "iterations": 5, "tolerance": 0.0}
    assert WeightsRegistry(root).network("more").solver_settings()["iterations"] == 5
    assert "val_ssim" in second.history[-1] and 0 < second.history[-1]["val_ssim"] <= 1


def test_a_network_trained_in_two_lambda_passes_is_deployed_with_them(registry, tmp_path):
    """--lambda-passes 2: the exported entry's solver names the passes and the deployed model runs them (a network
    trained without them names none and runs one)."""
    import shutil

    from cdl_lambda.recon.model import CDLLambda

    root = tmp_path / "weights"
    shutil.copytree(registry.root, root)
    trainer = make_trainer(registry, "v3", steps=1, validate_every=1, lambda_passes=2)
    assert trainer.model.lambda_passes == 2
    trainer.run(tmp_path / "two.ckpt", progress=False)
    entry = train.export(tmp_path / "two.ckpt", "two", root)
    assert entry["solver"]["lambda_passes"] == 2 and entry["training"]["lambda_passes"] == 2
    assert CDLLambda.deployed(WeightsRegistry(root).network("two")).lambda_passes == 2
    make_trainer(registry, "v3", steps=1, validate_every=1).run(tmp_path / "one.ckpt", progress=False)
    assert "lambda_passes" not in train.export(tmp_path / "one.ckpt", "one", root)["solver"]
    assert CDLLambda.deployed(WeightsRegistry(root).network("one")).lambda_passes == 1


def weights_with_plain_network(registry, tmp_path):
    """A copy of the test weights folder with a V3 network "plain" (no background weight, no context) trained one
    step and exported into it."""
    import shutil

    root = tmp_path / "weights"
    shutil.copytree(registry.root, root)
    make_trainer(registry, "v3", steps=1).run(tmp_path / "first.ckpt", progress=False)
    train.export(tmp_path / "first.ckpt", "plain", root)
    return root


def test_a_background_weight_trains_from_a_network_without_one(registry, tmp_path):
    """--background on a shipped network without the weight: the Λ network's weights carry over, the new weight
    starts near 0 (the network reconstructs as before) and its supervision reaches every new parameter."""
    root = weights_with_plain_network(registry, tmp_path)
    second = make_trainer(WeightsRegistry(root), "v3", init_network="plain", weights_dir=str(root), background=True,
                          background_supervision=0.1)
    plain = WeightsRegistry(root).network("plain").network
    for name, value in plain.state_dict().items():
        assert torch.equal(second.model.lambda_net.state_dict()[name], value), name
    batch = next(second.stream)
    output = train.reconstruct(second.model, batch, second.train_dicts[0])
    assert output.background.max() < 0.01
    second.train_step()
    for name, parameter in second.model.lambda_net.background.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    second.save(tmp_path / "background.ckpt")
    entry = train.export(tmp_path / "background.ckpt", "with-background", root)
    assert entry["training"]["background"] == {"supervision": 0.1, "pretrain_steps": 0, "pretrain_lr": 1e-3,
                                               "dropout": 0.0, "form": "penalty", "step": "uniform",
                                               "frozen": False}
    exported = WeightsRegistry(root).network("with-background")
    assert exported.network.config()["background"] is True
    assert exported.settings["matrix"] == 32 and exported.network.background.matrix == 32  # b at its trained matrix
    with pytest.raises(ValueError, match="architecture"):
        make_trainer(WeightsRegistry(root), "v3", init_network="plain", weights_dir=str(root), stages=2)


@pytest.mark.parametrize("base_channels", [4, 8])
def test_filter_context_trains_from_a_network_without_it(registry, tmp_path, base_channels):
    """--context (and a wider U-Net) on a shipped network without it: the network starts where that one is (the
    same Λ), its new input weights receive gradients, and it exports and loads with the context; the reverse and a
    narrower network are refused."""
    root = weights_with_plain_network(registry, tmp_path)
    second = make_trainer(WeightsRegistry(root), "v3", init_network="plain", weights_dir=str(root), context=True,
                          base_channels=base_channels)
    plain = WeightsRegistry(root).network("plain").network
    batch = next(second.stream)
    dictionary = second.train_dicts[0]
    x0 = torch.randn(2, 32, 32, dtype=torch.complex64)
    with torch.no_grad():
        torch.testing.assert_close(second.model.lambda_net(x0, dictionary), plain(x0, dictionary), rtol=0, atol=1e-6)
    first_conv = second.model.lambda_net.unet.down[0][0].weight
    assert first_conv.shape[:2] == (base_channels, 5) and not first_conv[:4, 2:].any()
    train.image_loss(train.reconstruct(second.model, batch, dictionary).image, batch.target).backward()
    assert first_conv.grad[:, 2:].abs().sum() > 0
    second.save(tmp_path / "context.ckpt")
    train.export(tmp_path / "context.ckpt", "with-context", root)
    assert WeightsRegistry(root).network("with-context").network.config()["context"] is True
    for narrower in (dict(base_channels=base_channels), dict(context=True, base_channels=base_channels // 2)):
        with pytest.raises(ValueError, match="architecture"):
            make_trainer(WeightsRegistry(root), "v3", init_network="with-context", weights_dir=str(root), **narrower)


def test_pretraining_the_background_weight_lowers_its_cross_entropy(registry):
    trainer = make_trainer(registry, "v3", background=True, background_lr=1e-2)
    losses = trainer.pretrain_background(30)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="needs --background"):
        make_trainer(registry, "v3").pretrain_background(1)


def test_background_dropout_trains_some_steps_as_a_withdrawn_slice_is_solved(registry, monkeypatch):
    """--background-dropout p: about a share p of the steps run without the weight (so its network gets no
    gradient there, the Λ network does), the rest with it; out-of-range or weight-less settings are refused."""
    trainer = make_trainer(registry, "v3", background=True, background_dropout=0.5)
    calls, real = [], train.reconstruct

    def recording(*args, **kwargs):
        calls.append(kwargs.get("with_background"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "reconstruct", recording)
    without_grad = 0
    for _ in range(12):
        trainer.train_step()
        unet = trainer.model.lambda_net.background.unet
        if calls[-1] is False:
            assert all(p.grad is None for p in unet.parameters())
            without_grad += 1
        else:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert 2 <= without_grad <= 10 and set(calls) == {True, False}
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        make_trainer(registry, "v3", background=True, background_dropout=1.0)
    with pytest.raises(ValueError, match="needs --background"):
        make_trainer(registry, "v3", background_dropout=0.2)


def test_a_frozen_background_weight_stays_as_it_started_while_the_lambda_network_trains(registry):
    """--freeze-background: after training steps b's network and gains are bit for bit the starting ones (so the
    weight and its data check are the starting network's), while Λ's network and β have moved."""
    trainer = make_trainer(registry, "v3", background=True, freeze_background=True, background_supervision=0.05)
    weight = trainer.model.lambda_net.background
    before = {name: p.detach().clone() for name, p in weight.named_parameters()}
    lambda_before = trainer.model.lambda_net.unet.head.weight.detach().clone()
    beta_before = float(trainer.model.split.beta.detach())
    for _ in range(3):
        trainer.train_step()
    assert before and all(torch.equal(before[name], p) for name, p in weight.named_parameters())
    assert (trainer.model.lambda_net.unet.head.weight - lambda_before).abs().max() > 0
    assert float(trainer.model.split.beta.detach()) != beta_before
    with pytest.raises(ValueError, match="needs --background"):
        make_trainer(registry, "v3", freeze_background=True)


def registry_with_a_weighted_network(registry, tmp_path, name: str):
    """A copy of the test weights folder holding ``name``: a penalty-form network with a background weight,
    trained one step and exported; returns the folder."""
    import shutil

    root = tmp_path / "weights"
    shutil.copytree(registry.root, root)
    first = make_trainer(registry, "v3", steps=1, background=True)
    first.run(tmp_path / "first.ckpt", progress=False)
    train.export(tmp_path / "first.ckpt", name, root)
    return root


def test_background_only_trains_the_weight_and_keeps_the_lambda_network_and_beta(registry, tmp_path):
    """--background-only from a shipped network with a weight: after training steps Λ's network and β are bit for
    bit the starting ones while b's network has moved; without --init-network, or with --freeze-background or
    --background-dropout (nothing, or batches with nothing, to train), it is refused."""
    root = registry_with_a_weighted_network(registry, tmp_path, "with-weight")
    trainer = make_trainer(WeightsRegistry(root), "v3", init_network="with-weight", weights_dir=str(root),
                           background=True, background_only=True, background_supervision=0.05, lr=1e-2)
    network = trainer.model.lambda_net
    weight_before = {name: p.detach().clone() for name, p in network.background.named_parameters()}
    rest_before = {name: p.detach().clone() for name, p in network.named_parameters()
                   if not name.startswith("background.")}
    beta_before = trainer.model.split.raw_beta.detach().clone()
    for _ in range(3):
        trainer.train_step()
    assert rest_before and all(torch.equal(rest_before[name], p) for name, p in network.named_parameters()
                               if name in rest_before)
    assert torch.equal(trainer.model.split.raw_beta, beta_before)
    assert max(float((weight_before[name] - p.detach()).abs().max())
               for name, p in network.background.named_parameters()) > 0
    with pytest.raises(ValueError, match="needs --background and --init-network"):
        make_trainer(registry, "v3", background=True, background_only=True)
    for other in ({"freeze_background": True}, {"background_dropout": 0.2}):
        with pytest.raises(ValueError, match="nothing to train"):
            make_trainer(WeightsRegistry(root), "v3", init_network="with-weight", weights_dir=str(root),
                         background=True, background_only=True, **other)


def test_a_penalty_network_fine_tunes_into_the_factor_form(registry, tmp_path):
    """--background-form factor from a shipped penalty-form network: every weight carries over, the form is
    recorded in the network's config and the manifest, γ_R gets no gradient (unused in that form) while b's
    network does; a form without the weight, or an unknown one, is refused."""
    root = registry_with_a_weighted_network(registry, tmp_path, "penalty")
    second = make_trainer(WeightsRegistry(root), "v3", init_network="penalty", weights_dir=str(root),
                          background=True, background_form="factor", background_supervision=0.1)
    penalty = WeightsRegistry(root).network("penalty").network
    assert penalty.background.form == "penalty" and second.model.lambda_net.background.form == "factor"
    for name, value in penalty.state_dict().items():
        assert torch.equal(second.model.lambda_net.state_dict()[name], value), name
    second.train_step()
    weight = second.model.lambda_net.background
    assert weight.raw_image_gain.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in weight.unet.parameters())
    second.save(tmp_path / "factor.ckpt")
    entry = train.export(tmp_path / "factor.ckpt", "factor", root)
    assert entry["training"]["background"]["form"] == "factor"
    assert WeightsRegistry(root).network("factor").network.background.form == "factor"
    with pytest.raises(ValueError, match="needs --background"):
        make_trainer(registry, "v3", background_form="factor")
    with pytest.raises(ValueError, match="must be one of"):
        make_trainer(registry, "v3", background=True, background_form="mask")


def test_a_penalty_network_fine_tunes_into_the_local_step(registry, tmp_path):
    """--background-step local from a shipped network: every weight carries over, the training solves with the
    local step (a step per code pixel), and the step is recorded in the exported network's
    config and manifest; without the penalty form's weight it is refused."""
    from cdl_lambda.recon import model as model_module

    root = registry_with_a_weighted_network(registry, tmp_path, "penalty")
    second = make_trainer(WeightsRegistry(root), "v3", init_network="penalty", weights_dir=str(root),
                          background=True, background_step="local", background_supervision=0.1)
    assert second.model.lambda_net.background.step == "local"
    curvatures, real = [], model_module.local_curvature
    model_module.local_curvature = lambda *args: curvatures.append(real(*args)) or curvatures[-1]
    try:
        second.train_step()
    finally:
        model_module.local_curvature = real
    assert curvatures and curvatures[0].ndim == 4 and curvatures[0].shape[1] == 1  # per code pixel, every filter
    second.save(tmp_path / "local.ckpt")
    entry = train.export(tmp_path / "local.ckpt", "local", root)
    assert entry["training"]["background"]["step"] == "local"
    assert WeightsRegistry(root).network("local").network.background.step == "local"
    with pytest.raises(ValueError, match="penalty form"):
        make_trainer(registry, "v3", background=True, background_form="factor", background_step="local")
    with pytest.raises(ValueError, match="must be one of"):
        make_trainer(registry, "v3", background=True, background_step="adaptive")


def test_held_out_scans_keep_the_best_checkpoint_beside_the_last(registry, tmp_path, monkeypatch):
    """--held-out-scans: every validation scores the product's scans of the validation person, records SSIM, NRMSE
    and score, and writes NAME-best.ckpt whenever the score is the lowest so far (here 0.5, 0.3, 0.4: the best is
    step 2's, the last step 3's); the scoring itself is the protocol's on each scan."""
    trainer = make_trainer(registry, "v3", steps=3, validate_every=1, held_out_scans=1, val_iterations=4)
    real = train.score_held_out
    first = real(trainer.model, trainer_scans(trainer), trainer.registry.dictionary(None), 4, 0.1)
    assert 0 < first["ssim"] < 1 and first["nrmse"] > 0
    unweighted = real(trainer.model, trainer.held_out, trainer.registry.dictionary(None), 4, 0.0)
    assert first["score"] - unweighted["score"] == pytest.approx(0.1 * (1 - first["ssim"]), rel=1e-4)
    assert unweighted["score"] >= first["nrmse"] ** 2  # the mean of squares, not less than the squared mean
    scores = iter([0.5, 0.3, 0.4])
    monkeypatch.setattr(train, "score_held_out", lambda *args: {"ssim": 0.9, "nrmse": 0.1, "score": next(scores),
                                                                "by_size": {32: (0.9, 0.1)}})
    trainer.run(tmp_path / "run.ckpt", progress=False)
    assert [r["held_out_score"] for r in trainer.history] == [0.5, 0.3, 0.4]
    best = torch.load(train.best_checkpoint_path(tmp_path / "run.ckpt"), weights_only=True)
    last = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert best["step"] == 2 and last["step"] == 3
    assert train.best_checkpoint_path(tmp_path / "run.ckpt").name == "run-best.ckpt"
    with pytest.raises(ValueError, match="needs --method v3"):
        make_trainer(registry, "v1", held_out_scans=1)


def test_the_warmup_raises_both_learning_rates_linearly_and_resumes_where_it_was(registry, tmp_path):
    """--warmup-steps 4: steps 1-4 run at 1/4 … 4/4 of --lr and --beta-lr, later steps at the full rates, and a
    resumed run continues the ramp from its step; without it every step runs at the full rates."""
    trainer = make_trainer(registry, "v3", warmup_steps=4, lr=2e-3, beta_lr=1e-2)
    seen = []
    for _ in range(2):
        trainer.train_step()
        seen.append([group["lr"] for group in trainer.optimizer.param_groups])
    trainer.save(tmp_path / "warm.ckpt")
    resumed = make_trainer(registry, "v3", warmup_steps=4, lr=2e-3, beta_lr=1e-2)
    resumed.load(tmp_path / "warm.ckpt")
    for _ in range(3):
        resumed.train_step()
        seen.append([group["lr"] for group in resumed.optimizer.param_groups])
    expected = [rate * f for f in (0.25, 0.5, 0.75, 1.0, 1.0) for rate in (2e-3, 1e-2)]
    assert [rate for step in seen for rate in step] == pytest.approx(expected)
    plain = make_trainer(registry, "v3", lr=2e-3, beta_lr=1e-2)
    plain.train_step()
    assert [group["lr"] for group in plain.optimizer.param_groups] == pytest.approx([2e-3, 1e-2])


def test_held_out_scans_are_drawn_at_every_matrix_the_run_trains_at(registry):
    """With --mixed-size the held-out scans are the product's scans at --size and at --mixed-size, the same slices
    and settings at each, and the score reports each matrix's means (whose mean is the whole mean: equal counts)."""
    trainer = make_trainer(registry, "v3", held_out_scans=1, mixed_size=48, val_iterations=2)
    shapes = [tuple(scan.kspace.shape[-2:]) for _, _, scan in trainer_scans(trainer)]
    assert len(shapes) % 2 == 0 and shapes[:len(shapes) // 2] == [(32, 32)] * (len(shapes) // 2)
    assert shapes[len(shapes) // 2:] == [(48, 48)] * (len(shapes) // 2)
    scores = train.score_held_out(trainer.model, trainer.held_out, trainer.registry.dictionary(None), 2, 0.0)
    assert sorted(scores["by_size"]) == [32, 48]
    assert scores["ssim"] == pytest.approx(sum(s for s, _ in scores["by_size"].values()) / 2)


def trainer_scans(trainer):
    """The trainer's held-out scans, simulated as its first validation would."""
    trainer.held_out_record({})
    return trainer.held_out


@pytest.mark.parametrize("method", ["ablation", "unrolled"])
def test_a_baseline_fine_tunes_from_its_shipped_weights_and_adds_up_its_budget(registry, tmp_path, method):
    """--init-network names a shipped baseline: the run starts from its weights, the export records the whole
    budget, and a baseline of another kind is refused by name."""
    import shutil

    root = tmp_path / "weights"
    shutil.copytree(registry.root, root)
    first = make_trainer(registry, method, steps=2, validate_every=1)
    first.run(tmp_path / "first.ckpt", progress=False)
    train.export(tmp_path / "first.ckpt", "start", root)
    second = make_trainer(WeightsRegistry(root), method, steps=3, validate_every=1, init_network="start",
                          weights_dir=str(root))
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    second.run(tmp_path / "second.ckpt", progress=False)
    entry = train.export(tmp_path / "second.ckpt", "more", root)
    assert entry["training"]["fine_tuned_from"] == "start" and entry["training"]["total_steps"] == 5
    other = "unrolled" if method == "ablation" else "ablation"
    with pytest.raises(ValueError, match=f"no shipped {other} baseline"):
        make_trainer(WeightsRegistry(root), other, init_network="start", weights_dir=str(root))


def test_retiring_a_model_removes_its_entry_and_file_but_never_a_default(registry, tmp_path):
    import shutil

    import yaml

    from cdl_lambda.lab.manifest import retire, update_manifest

    root = tmp_path / "weights"
    shutil.copytree(registry.root, root)
    trainer = make_trainer(registry, "ablation", steps=1)
    trainer.run(tmp_path / "run.ckpt", progress=False)
    train.export(tmp_path / "run.ckpt", "old-ablation", root)
    assert (root / "baselines" / "old-ablation.pt").exists()
    retire(root, "baselines", "old-ablation")
    assert "old-ablation" not in WeightsRegistry(root).baselines
    assert not (root / "baselines" / "old-ablation.pt").exists()
    with pytest.raises(ValueError, match="no baselines entry named 'old-ablation'"):
        retire(root, "baselines", "old-ablation")
    entry = next(e for e in yaml.safe_load((root / "manifest.yaml").read_text())["dictionaries"] if e["name"] == "a")
    update_manifest(root, "dictionaries", entry, default={"dictionary": "a"})
    with pytest.raises(ValueError, match="'a' is a default"):
        retire(root, "dictionaries", "a")
    assert WeightsRegistry(root).dictionary().name == "a"


def tiny_images_at(n: int, count: int = 4) -> torch.Tensor:
    base = torch.nn.functional.interpolate(phantom(32, 32).abs().float()[None, None], size=(n, n),
                                           mode="bilinear")[0, 0]
    return torch.stack([torch.rot90(base, i) for i in range(count)])


def make_mixed_trainer(registry, **kw):
    torch.set_num_threads(1)
    return train.Trainer(config("v3", mixed_size=24, mixed_fraction=0.5, **kw), device="cpu", images=tiny_images(),
                         mixed_images=tiny_images_at(24), validation=data.fixed_examples(tiny_images(2), 0.2),
                         registry=registry)


def test_mixed_sizes_train_on_both_matrices_and_resume_exactly(registry, tmp_path):
    """--mixed-size: batches come from both matrix sizes in the asked share, drawn by (seed, step), so a resumed
    run is the straight run; a checkpoint of another stream layout is refused with a message."""
    from cdl_lambda.lab import multicoil

    trainer = make_mixed_trainer(registry)
    sizes = [next(trainer.stream).target.shape[-1] for _ in range(40)]
    assert set(sizes) == {32, 24} and 10 <= sizes.count(24) <= 30

    straight = make_mixed_trainer(registry)
    straight.run(progress=False)
    first = make_mixed_trainer(registry, steps=2)
    first.run(tmp_path / "mixed.ckpt", progress=False)
    resumed = make_mixed_trainer(registry)
    resumed.load(tmp_path / "mixed.ckpt")
    resumed.run(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert resumed.stream.state() == straight.stream.state()

    with pytest.raises(ValueError, match="same --mixed-size"):  # a one-size checkpoint resumed with two sizes
        make_mixed_trainer(registry).stream.set_state(make_trainer(registry, "v3").stream.state())
    with pytest.raises(ValueError, match="same --mixed-size"):  # and the other way round
        make_trainer(registry, "v3").stream.set_state(straight.stream.state())
    assert isinstance(straight.stream, multicoil.MixedStream)

    entry = train.export(tmp_path / "mixed.ckpt", "tiny-mixed", tmp_path / "weights")
    assert "32x32 and 24x24 (50% of batches)" in entry["training"]["data"]
