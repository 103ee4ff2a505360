"""``cdl-lambda-lab train`` under DistributedDataParallel: two CPU processes (``gloo`` on 127.0.0.1, started with
``torch.multiprocessing.spawn`` and the environment variables ``torchrun`` sets) train V3 on tiny data. The
replicas stay identical, each process draws different examples, the loss on a fixed batch falls, and only rank 0
validates and writes a checkpoint."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from cdl_lambda.lab import datasets as data
from cdl_lambda.lab import distributed
from cdl_lambda.lab import train
from cdl_lambda.recon.weights import WeightsRegistry

from support import free_port, phantom, write_training_weights

WORLD, STEPS = 2, 6


def tiny_images(n=4) -> torch.Tensor:
    base = phantom(32, 32).abs().float()
    return torch.stack([torch.rot90(base, i) * (0.7 + 0.1 * i) for i in range(n)])


def tiny_config() -> train.TrainConfig:
    return train.TrainConfig(method="v3", size=32, batch_size=2, steps=STEPS, iterations=6, grad_iterations=3,
                             base_channels=4, stages=1, lr=3e-3, validate_every=3, seed=0, upper_bound=1.0,
                             initial_lambda=0.05)


def fixed_loss(trainer: train.Trainer, batch: data.Batch) -> float:
    with torch.no_grad():
        image = train.reconstruct(trainer.model, batch, trainer.train_dicts[0]).image
        return float(train.image_loss(image, batch.target))


def train_one_rank(rank: int, port: int, folder: str, weights: str) -> None:
    """One process of the group, as ``torchrun --nproc_per_node 2`` would start it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    joined = distributed.setup("gloo")
    trainer = train.Trainer(tiny_config(), device="cpu", images=tiny_images(),
                            validation=data.fixed_examples(tiny_images(2), 0.2), registry=WeightsRegistry(weights))
    first_batch = next(copy.deepcopy(trainer.stream))
    fixed = next(copy.deepcopy(trainer.stream)) if rank == 0 else None
    before = fixed_loss(trainer, fixed) if rank == 0 else None
    history = trainer.run(os.path.join(folder, f"rank{rank}.ckpt"), progress=False)
    result = {"rank": joined.rank, "world": joined.world_size, "first_target": first_batch.target,
              "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
              "history": history, "before": before, "after": fixed_loss(trainer, fixed) if rank == 0 else None,
              "is_ddp": isinstance(trainer.forward_model, torch.nn.parallel.DistributedDataParallel)}
    torch.save(result, os.path.join(folder, f"result{rank}.pt"))
    distributed.teardown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_training_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def results(weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(train_one_rank, args=(free_port(), str(folder), str(weights)), nprocs=WORLD, join=True)
    return folder, [torch.load(folder / f"result{r}.pt", weights_only=True) for r in range(WORLD)]


def test_replicas_stay_identical_and_each_rank_draws_its_own_examples(results):
    _, (zero, one) = results
    assert (zero["rank"], one["rank"], zero["world"]) == (0, 1, WORLD) and zero["is_ddp"] and one["is_ddp"]
    # gloo's all-reduce hands every process the same averaged gradient, and Adam is deterministic on the CPU:
    # the replicas are equal to the bit, not merely close
    for name, value in zero["state"].items():
        assert torch.equal(value, one["state"][name]), name
    assert not torch.allclose(zero["first_target"], one["first_target"])


def test_the_loss_falls_and_only_rank_zero_writes(results):
    folder, (zero, one) = results
    assert zero["after"] < 0.98 * zero["before"], (zero["before"], zero["after"])  # measured: −3.7 % in 6 steps
    assert [h["step"] for h in zero["history"]] == [3, STEPS] and one["history"] == []
    assert (folder / "rank0.ckpt").exists() and not (folder / "rank1.ckpt").exists()


def test_outside_torchrun_nothing_changes(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rank = distributed.setup()
    assert rank == distributed.Rank() and rank.is_main and not rank.distributed
    model = torch.nn.Linear(2, 2)
    assert rank.wrap(model) is model and rank.data_seed(7) == 7 and rank.agree(False) is False
    assert distributed.Rank(1, 2).data_seed(7) != 7
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.from_environment()
