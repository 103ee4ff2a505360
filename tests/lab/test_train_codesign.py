"""Training through the shipped solver: a fine-tuning run starts from the shipped network and trains with the
configured solver, cap and stopping rule."""

import torch

from cdl_lambda.lab.train import TrainConfig, build_model
from cdl_lambda.recon.weights import WeightsRegistry


def test_fine_tuning_starts_from_the_shipped_network_with_the_configured_solver():
    shipped = WeightsRegistry().network("cdl-lambda-v3-mc-b8")
    config = TrainConfig(method="v3", base_channels=8, stages=2, upper_bound=6.0, solver="admm", tolerance=0.01,
                         iterations=48, init_network="cdl-lambda-v3-mc-b8")
    model = build_model(config)
    assert model.solver == "admm" and model.tolerance == 0.01 and model.iterations == 48
    for name, value in shipped.network.state_dict().items():
        assert torch.equal(model.lambda_net.state_dict()[name], value), name
    assert abs(float(model.split.beta.detach()) - shipped.beta) < 1e-5


def test_a_fresh_run_keeps_the_scalar_lambda_start():
    model = build_model(TrainConfig(method="v3", base_channels=8, stages=2, upper_bound=6.0, initial_lambda=1.0))
    assert model.solver == "fista" and model.tolerance == 0.0
    shipped = WeightsRegistry().network("cdl-lambda-v3-mc-b8")
    assert not torch.equal(model.lambda_net.unet.head.weight, shipped.network.unet.head.weight)
