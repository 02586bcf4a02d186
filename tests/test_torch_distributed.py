"""torch_impl data-parallel training on CPU: 2 gloo processes give the single-process step of the
global batch (loss, gradients after DDP's averaging, a LARS step, BN statistics), the gather's
gradient is the official FullGatherLayer's, and a 2-process run and its resume work end to end."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.augment import AugmentParams, view_params
from shared.config import make_config
from shared.errors import UserError
from shared.loader import batch_at, epoch_batches, shard_rows, split_batch
from torch_impl import probe as probe_cli
from torch_impl import train as train_cli
from torch_impl.backend import Backend as TorchBackend
from torch_impl.checkpoint import load_checkpoint
from torch_impl.distributed import (
    FullGatherLayer,
    World,
    data_parallel,
    on_main,
    sync_batch_norm,
    world_from_env,
)
from torch_impl.model import build_model, init_variables
from torch_impl.optim import build_optimizer
from torch_impl.runtime import memory_format, to_channels_last
from torch_impl.step import TrainState, train_step

WORLD = 2
GLOBAL_BATCH = 16
LR = 0.05  # larger than smoke's scheduled lr, so the LARS step moves the weights visibly


# ---- shared.loader: each process's part of the batch ---------------------------------------------

def test_the_parts_of_a_batch_are_the_single_process_batch_byte_for_byte():
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    params = AugmentParams(blur_p=0.5)
    whole = batch_at(images, params, 12, seed=3, epoch=1, step=2)
    for count in (2, 3, 4):
        parts = [batch_at(images, params, 12, 3, 1, 2, shard=(i, count)) for i in range(count)]
        assert all(p.view_a.shape == (12 // count, 32, 32, 3) for p in parts)
        assert np.concatenate([p.view_a for p in parts]).tobytes() == whole.view_a.tobytes()
        assert np.concatenate([p.view_b for p in parts]).tobytes() == whole.view_b.tobytes()
    threaded = list(epoch_batches(images, params, batch_size=12, seed=3, epoch=1, workers=2,
                                  shard=(1, 2)))
    assert threaded[2].view_b.tobytes() == whole.view_b[6:].tobytes()


def test_an_uneven_split_is_a_one_line_error():
    assert shard_rows(12, (2, 3)) == slice(8, 12)
    with pytest.raises(UserError, match="--batch-size 10 does not split evenly over 4 processes; "
                                        "use a multiple of 4"):
        split_batch(10, 4)
    with pytest.raises(UserError, match="over 3 devices"):
        split_batch(16, 3, "devices")


# ---- the process's place in the job --------------------------------------------------------------

def test_world_comes_from_torchrun_environment():
    assert world_from_env({}) == World() and World().is_main and World().shard == (0, 1)
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert world == World(3, 4, 1, parts=4) and not world.is_main and world.shard == (3, 4)


@pytest.mark.parametrize("environ", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "x"},
                                     {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}])
def test_a_broken_torchrun_environment_is_a_one_line_error(environ):
    with pytest.raises(UserError, match="torchrun"):
        world_from_env(environ)


def test_uneven_batch_over_processes_fails_before_the_processes_meet(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = ["--preset", "smoke", "--batch-size", "15", "--out", str(tmp_path / "run")]
    assert train_cli.main(args) == 2
    assert capsys.readouterr().err.strip() == ("error: --batch-size 15 does not split evenly "
                                               "over 2 processes; use a multiple of 2")


def test_sync_batch_norm_keeps_weights_statistics_and_names():
    cfg = make_config({"preset": "smoke"})
    model = init_variables(build_model(cfg.arch, cfg.width, cfg.mlp_dims()), cfg.seed)
    model.backbone.bn1.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = sync_batch_norm(model, torch.device("cpu"))
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert data_parallel(converted, World(), torch.device("cpu")) is converted


# ---- 2 gloo processes against one process --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_views(dtype: torch.dtype, shard=(0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoke preset's first batch (or part `shard` of it), as channels_last tensors."""
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    params = view_params(make_config({"preset": "smoke"}), (0.5,) * 3, (0.25,) * 3)
    batch = batch_at(images, params, GLOBAL_BATCH, seed=0, epoch=0, step=0, shard=shard)
    cpu = torch.device("cpu")
    return (to_channels_last(batch.view_a, cpu).to(dtype),
            to_channels_last(batch.view_b, cpu).to(dtype))


def one_step(world: World, dtype: torch.dtype) -> dict:
    """One train_step of the smoke model from its seed, as world's process: the loss terms, the
    gradients it applied, and the weights and buffers after the LARS step."""
    cfg = make_config({"preset": "smoke", "precision": "fp32"})
    cpu = torch.device("cpu")
    model = init_variables(build_model(cfg.arch, cfg.width, cfg.mlp_dims()), cfg.seed).to(
        cpu, dtype, memory_format=memory_format(cfg.width))
    if world.size > 1:
        model = sync_batch_norm(model, cpu)
    optimizer = build_optimizer(cfg, model=model)
    x_a, x_b = global_views(dtype, world.shard)
    _, terms = train_step(TrainState(data_parallel(model, world, cpu), optimizer), x_a, x_b, LR,
                          cfg=cfg, dtype=dtype)
    return {"terms": {k: v.item() for k, v in terms.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def gather_gradient(rank: int) -> torch.Tensor:
    """x = rank-dependent [2, 3]; L_r = sum(w_r * gather(x)), w_r [4, 3] differs by rank; returns
    dx, which FullGatherLayer makes sum_r dL_r/dx = (w_0 + w_1)[this rank's rows]."""
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = torch.cat(FullGatherLayer.apply(x))
    assert torch.equal(gathered[:2], torch.full((2, 3), 1.0, dtype=torch.float64))
    assert torch.equal(gathered[2:], torch.full((2, 3), 2.0, dtype=torch.float64))
    weights = torch.arange(12, dtype=torch.float64).view(4, 3) * (rank + 1)
    (weights * gathered).sum().backward()
    return x.grad


def error_on_rank_zero(world: World) -> str:
    """The message every rank raises when on_main's action fails on rank 0."""
    def fail():
        raise UserError("only rank 0 saw this")
    try:
        on_main(world, fail)
    except UserError as exc:
        return str(exc)
    return "no error"


def distributed_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        world = World(rank, WORLD, rank)
        results = {dtype: one_step(world, dtype) for dtype in (torch.float64, torch.float32)}
        results["gather_grad"] = gather_gradient(rank)
        results["on_main_error"] = error_on_rank_zero(world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(distributed_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def assert_close_report(got: dict, want: dict, tolerance: float, what: str) -> float:
    """Each tensor within rtol = atol / scale = tolerance, scale = the largest |entry| of them all
    (so an exactly-zero gradient, as that of a bias feeding a BatchNorm, compares its rounding
    noise to the gradients' scale); returns max |got - want| / scale."""
    floats = [k for k in want if want[k].is_floating_point()]
    scale = max(want[k].abs().max().item() for k in floats)
    for k in floats:
        torch.testing.assert_close(got[k].to(want[k].dtype), want[k], rtol=tolerance,
                                   atol=tolerance * scale, msg=lambda m, k=k: f"{what} {k}: {m}")
    return max((got[k].to(want[k].dtype) - want[k]).abs().max().item() for k in floats) / scale


@pytest.fixture(scope="module")
def single_process_step():
    return {dtype: one_step(World(), dtype) for dtype in (torch.float64, torch.float32)}


def test_two_processes_take_the_single_process_step(two_process_step, single_process_step):
    want = single_process_step[torch.float64]
    for rank, results in enumerate(two_process_step):
        got = results[torch.float64]
        for name, value in want["terms"].items():
            assert got["terms"][name] == pytest.approx(value, rel=1e-13), name
        assert got["grads"].keys() == want["grads"].keys()
        grads = assert_close_report(got["grads"], want["grads"], 1e-12, "gradient")
        state = assert_close_report(got["state"], want["state"], 1e-12, "after the step")
        print(f"float64, rank {rank}: max |difference| / scale: gradients {grads:.1e}, weights and "
              f"BN statistics after the LARS step {state:.1e}")
        assert torch.equal(got["state"]["backbone.bn1.num_batches_tracked"],
                           want["state"]["backbone.bn1.num_batches_tracked"])
    # every process holds the same weights after the step
    for name, value in two_process_step[0][torch.float64]["state"].items():
        assert torch.equal(two_process_step[1][torch.float64]["state"][name], value), name


def test_in_float32_two_processes_are_as_close_to_the_exact_step(two_process_step,
                                                                  single_process_step):
    """Compared with the float64 step, because the 1-process float32 step is the less accurate
    one: torch's CPU BatchNorm backward on channels_last float32 tensors is off by ~3e-3 of the
    gradients' scale here (3e-6 on contiguous ones), GlobalBatchNorm's by ~4e-6."""
    exact, single = single_process_step[torch.float64], single_process_step[torch.float32]
    got = two_process_step[0][torch.float32]
    for name, value in single["terms"].items():
        assert got["terms"][name] == pytest.approx(value, rel=1e-5), name
    grads = assert_close_report(got["grads"], exact["grads"], 1e-4, "gradient")
    state = assert_close_report(got["state"], exact["state"], 1e-5, "after the step")
    baseline = {what: assert_close_report(single[what], exact[what], 1e-1, what)
                for what in ("grads", "state")}
    print(f"float32 vs the float64 step, max |difference| / scale: 2 processes: gradients "
          f"{grads:.1e}, after the step {state:.1e}; 1 process: gradients {baseline['grads']:.1e}, "
          f"after the step {baseline['state']:.1e}")


def test_gather_gradient_is_the_sum_over_processes_of_this_process_rows(two_process_step):
    weights = torch.arange(12, dtype=torch.float64).view(4, 3)
    total = weights * 1 + weights * 2  # w_0 + w_1
    assert torch.equal(two_process_step[0]["gather_grad"], total[:2])
    assert torch.equal(two_process_step[1]["gather_grad"], total[2:])


def test_an_error_on_rank_zero_stops_every_rank(two_process_step):
    assert [r["on_main_error"] for r in two_process_step] == ["only rank 0 saw this"] * WORLD


# ---- torchrun end to end -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TIMING = {"pairs_per_s", "images_per_s", "epoch_time_s", "train_time_s", "seconds"}


def torchrun(data_dir: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m torch_impl.train --preset smoke ...` (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "torch_impl.train", "--preset", "smoke",
               "--data-dir", str(data_dir), "--out", str(out), "--workers", "1", *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics_without_timing(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    pass


def interrupted_worker(rank: int, port: int, args: list[str]) -> None:
    """A rank of a 2-process `torch_impl.train` (as torchrun starts it) that dies, as all ranks
    do, when epoch 1's checkpoint is written."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    real_step = TorchBackend.train_step

    def epoch_then_crash(self, state, batch, lr):
        if batch.epoch == 1:
            raise Interrupted
        return real_step(self, state, batch, lr)

    TorchBackend.train_step = epoch_then_crash
    with pytest.raises(Interrupted):
        train_cli.main(args)


def test_two_process_run_resumes_exactly_and_probes_once(tiny_data_dir, tmp_path):
    single, straight, resumed = tmp_path / "single", tmp_path / "straight", tmp_path / "resumed"
    monitor = ["--monitor-bank", "200", "--monitor-test", "100"]
    smoke = ["--preset", "smoke", "--data-dir", str(tiny_data_dir), "--epochs", "2", "--no-probe",
             "--workers", "1", *monitor]
    assert train_cli.main([*smoke, "--out", str(single)]) == 0
    first = torchrun(tiny_data_dir, straight, "--epochs", "2", "--no-probe", *monitor)
    assert first.stdout.count("torch_impl: resnet18 width 8") == 1  # rank 0 alone prints
    assert "batch 16 over 2 processes" in first.stdout
    assert json.loads((straight / "config.json").read_text())["sync_bn"] is True

    mp.spawn(interrupted_worker, args=(free_port(), [*smoke, "--out", str(resumed)]),
             nprocs=WORLD, join=True)
    assert load_checkpoint(resumed / "checkpoint.pt")["epoch"] == 1
    second = torchrun(tiny_data_dir, resumed, "--resume", "--probe")
    assert second.stdout.count("cifar10 linear probe: top-1") == 1  # rank 0 alone probes
    assert set(json.loads((resumed / "summary.json").read_text())["probe"]) == {"cifar10", "gtsrb"}

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert (b["epoch"], b["global_step"]) == (2, 8)
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(b["optimizer"]["state"][key]["mu"], state["mu"])
    assert metrics_without_timing(straight) == metrics_without_timing(resumed)
    # the monitor's points are the kNN of the weights trained: its last, the kNN probe's
    assert probe_cli.main(["--run", str(resumed), "--protocol", "knn", "--probe-subset", "0"]) == 0
    points = [r for r in metrics_without_timing(resumed) if r["kind"] == "knn"]
    assert [p["step"] for p in points] == [4, 8]
    assert json.loads((resumed / "probe_cifar10_knn.json").read_text())["top1"] == \
        points[-1]["knn_top1"]

    # one process trains on the same batches: the same losses, up to float32 rounding (which
    # grows over the steps: the 1-process CPU BatchNorm backward is the less accurate one)
    want, got = metrics_without_timing(single), metrics_without_timing(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
    assert all(g["loss"] == pytest.approx(w["loss"], rel=1e-2) for g, w in zip(got, want)
               if g["kind"] != "knn")
