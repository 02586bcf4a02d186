"""jax_impl data-parallel training on CPU devices: the step sharded over 2 devices is the one-device
step of the global batch (loss, gradients, LARS update, BN statistics), and a run on 2 devices,
resumed as a job of 2 processes, trains as one device does, end to end.

The checks run in subprocesses, this file being their script: XLA_FLAGS=
--xla_force_host_platform_device_count=2 only acts before jax starts, and each process of a
multi-process job (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) needs its own.
"""
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_impl.distributed import distributed_env
from shared.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# Added to the XLA flags the tests run under (an ISA limit, say), which the subprocesses keep.
TWO_DEVICES = {"XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                   "--xla_force_host_platform_device_count=2"]))}
TIMING = {"pairs_per_s", "images_per_s", "epoch_time_s", "train_time_s", "seconds"}


# ---- the subprocesses' side ----------------------------------------------------------------------

def parity_report() -> dict:
    """The float64 step of the smoke model on a 1-device and a 2-device mesh, from the same weights
    and global batch: max |2 devices - 1 device| / scale of the loss terms, gradients, updated state
    and BN statistics; and whether the 1-device mesh gives the unsharded jit's bits."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    # a third of the compile time; both meshes and the unsharded jit are compiled alike
    jax.config.update("jax_disable_most_optimizations", True)
    from jax_impl.distributed import batch_sharding, data_mesh, global_batch, replicate, replicated
    from jax_impl.model import build_model
    from jax_impl.optim import build_optimizer
    from jax_impl.step import initial_state, make_train_step, step_loss
    from shared.augment import view_params
    from shared.config import make_config
    from shared.loader import batch_at

    cfg = make_config({"preset": "smoke", "precision": "fp32"})
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), dtype=jnp.float64)
    optimizer = build_optimizer(cfg)

    def wide(a):
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    state = jax.tree.map(wide, initial_state(cfg, model=model, optimizer=optimizer))
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    batch = batch_at(images, view_params(cfg, (0.5,) * 3, (0.25,) * 3), 16, 0, 0, 0)
    views = [v.astype(np.float64) for v in (batch.view_a, batch.view_b)]

    def sharded(mesh):
        """(gradients, step's (state, terms)) of one jit over the mesh, views sharded."""
        gradient = jax.grad(lambda p, s, a, b: step_loss(model, p, s, a, b, cfg), has_aux=True)
        step = make_train_step(cfg, model=model, optimizer=optimizer, mesh=mesh)
        whole, rows = replicated(mesh), batch_sharding(mesh)
        both = jax.jit(lambda st, a, b: (gradient(st.params, st.batch_stats, a, b)[0],
                                         step(st, a, b, 0.05)),
                       in_shardings=(whole, rows, rows), out_shardings=whole)
        x_a, x_b = (global_batch(v, rows, 16) for v in views)
        shards = [s.data.shape[0] for s in x_a.addressable_shards]
        return shards, jax.device_get(both(replicate(state, mesh), x_a, x_b))

    one_shards, one = sharded(data_mesh(jax.devices()[:1]))
    two_shards, two = sharded(data_mesh())
    plain = jax.device_get(make_train_step(cfg, model=model, optimizer=optimizer)(
        jax.tree.map(jnp.array, state), *views, 0.05))

    def difference(got, want) -> float:
        pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        scale = max(float(np.max(np.abs(w))) for _, w in pairs)
        return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in pairs) / scale

    grads_1, (state_1, terms_1) = one
    grads_2, (state_2, terms_2) = two
    return {"devices": len(jax.devices()), "shards": [one_shards, two_shards],
            "terms": difference(terms_2, terms_1), "grads": difference(grads_2, grads_1),
            "params": difference(state_2.params, state_1.params),
            "opt_state": difference(state_2.opt_state, state_1.opt_state),
            "batch_stats": difference(state_2.batch_stats, state_1.batch_stats),
            "one_device_mesh_is_unsharded_jit": all(
                np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one[1]),
                                                     jax.tree.leaves(plain)))}


TWO_DEVICE_ERRORS = {
    "no_sync_bn": (["--no-sync-bn"], "--no-sync-bn: jax_impl always normalises over the global "
                   "batch of its 2 devices (the flag is torch_impl's)"),
    "uneven_batch": (["--batch-size", "15"], "--batch-size 15 does not split evenly over 2 "
                     "devices; use a multiple of 2"),
}


def two_device_errors(out: Path) -> dict:
    """name -> (exit status, stderr) of jax_impl.train with each of TWO_DEVICE_ERRORS's flags."""
    from jax_impl import train as jax_train

    results = {}
    for name, (flags, _) in TWO_DEVICE_ERRORS.items():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = jax_train.main(["--preset", "smoke", "--out", str(out / name), *flags])
        results[name] = (status, stderr.getvalue().strip(), (out / name).exists())
    return results


class Interrupted(Exception):
    pass


def train_until_epoch_one(args: list[str]) -> None:
    """jax_impl.train with `args`, dying (every process) once epoch 0's checkpoint is written."""
    from jax_impl import train as jax_train
    from jax_impl.backend import Backend as JaxBackend

    real_step = JaxBackend.train_step

    def epoch_then_crash(self, state, batch, lr):
        if batch.epoch == 1:
            raise Interrupted
        return real_step(self, state, batch, lr)

    JaxBackend.train_step = epoch_then_crash
    try:
        jax_train.main(args)
    except Interrupted:
        return
    raise AssertionError("the run was not interrupted")


# ---- the tests' side -----------------------------------------------------------------------------

# Subprocesses share compiled steps through a disk cache and skip most of XLA's optimisation
# passes: compiling, not training, is what takes time here.
QUICK_COMPILE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def python(*args: str, env: dict, wait: bool = True):
    """This interpreter on `args` in the repository, with `env` added to the environment."""
    command = [sys.executable, *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=900)


def two_process_job(*args: str, env: dict) -> list[tuple[int, str, str]]:
    """`args` run as a job of 2 processes of one CPU device each, as on two machines:
    [(exit status, stdout, stderr)] of process 0 and 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    processes = [python(*args, env={**job, "JAX_PROCESS_ID": str(i)}, wait=False)
                 for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]


def test_job_environment():
    assert distributed_env({}) is None
    assert distributed_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                            "JAX_PROCESS_ID": "3"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_env({"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "node[1-2]"}) == {}
    assert distributed_env({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "node1"}) is None
    for partial in ({"JAX_COORDINATOR_ADDRESS": "h:1"},
                    {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                     "JAX_PROCESS_ID": "0"}):
        with pytest.raises(UserError, match="needs all of JAX_COORDINATOR_ADDRESS"):
            distributed_env(partial)


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory, tiny_data_dir) -> dict:
    """The report of this file run as `two-devices` in a process with 2 CPU devices."""
    folder = tmp_path_factory.mktemp("two-devices")
    result = python(__file__, "two-devices", str(folder),
                    env={**TWO_DEVICES, "VICREG_DATA_DIR": str(tiny_data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "report.json").read_text())


def test_two_devices_take_the_one_device_step(two_devices):
    report = two_devices["parity"]
    assert report["devices"] == 2 and report["shards"] == [[16], [8, 8]]
    compared = ("terms", "grads", "params", "opt_state", "batch_stats")
    print("float64, 2 devices vs 1, max |difference| / scale: "
          + ", ".join(f"{k} {report[k]:.1e}" for k in compared))
    for what in compared:
        assert report[what] < 1e-12, what
    assert report["one_device_mesh_is_unsharded_jit"]


@pytest.mark.parametrize("name", TWO_DEVICE_ERRORS)
def test_settings_two_devices_cannot_run_are_one_line_errors(two_devices, name):
    status, stderr, created = two_devices["errors"][name]
    assert (status, stderr, created) == (2, f"error: {TWO_DEVICE_ERRORS[name][1]}", False)


def metrics_without_timing(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_device_run_resumed_by_a_two_process_job_trains_as_one_device(tiny_data_dir,
                                                                          tmp_path):
    from flax.traverse_util import flatten_dict

    from jax_impl.checkpoint import CHECKPOINT_FILE, load_checkpoint

    smoke = ["--preset", "smoke", "--width", "4", "--data-dir", str(tiny_data_dir), "--epochs", "2",
             "--workers", "1", "--no-probe", "--monitor-bank", "200", "--monitor-test", "100"]
    single, run, alone = tmp_path / "single", tmp_path / "run", tmp_path / "alone"
    quick = {**QUICK_COMPILE, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    # the one-device runs are compiled as the job's processes are: only devices and processes differ
    uninterrupted = python("-m", "jax_impl.train", *smoke, "--out", str(single), env=quick)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    first = python(__file__, "interrupted", *smoke, "--out", str(run), env={**quick, **TWO_DEVICES})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batch 16 over 2 devices" in first.stdout
    assert load_checkpoint(run / CHECKPOINT_FILE)["epoch"] == 1
    shutil.copytree(run, alone)

    # process 0 alone prints, writes and probes; process 1 waits for it at exit
    job = two_process_job("-m", "jax_impl.train", "--resume", "--out", str(run), "--probe",
                          env=quick)
    for status, _, stderr in job:
        assert status == 0, stderr[-3000:]
    (_, out_0, _), (_, out_1, _) = job
    assert out_0.count("cifar10 linear probe: top-1") == 1 and "linear probe" not in out_1
    assert out_0.count("jax_impl: resnet18 width 4") == 1 and "jax_impl:" not in out_1
    assert set(json.loads((run / "summary.json").read_text())["probe"]) == {"cifar10", "gtsrb"}
    resumed = python("-m", "jax_impl.train", "--resume", "--out", str(alone), env=quick)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # One device trains on the same batches: epoch 1 (2 devices) as an uninterrupted one-device
    # run, epoch 2 (2 processes) as one device resumed from the same checkpoint. Each epoch's first
    # step starts from the same weights and differs only by the order of the float32 sums; the
    # steps after it by rounding, which this small net amplifies about tenfold a step (a step's
    # exactness is the float64 test's).
    got, want, want_resumed = (metrics_without_timing(r) for r in (run, single, alone))
    assert [(r["kind"], r["step"], r.get("lr")) for r in got] == \
        [(r["kind"], r["step"], r.get("lr")) for r in want] == \
        [(r["kind"], r["step"], r.get("lr")) for r in want_resumed]
    steps = [i for i, r in enumerate(got) if r["kind"] == "step"]
    reference = {i: want if got[i]["step"] <= 4 else want_resumed for i in steps}
    first_steps = (steps[0], next(i for i in steps if got[i]["step"] == 5))
    assert all(got[i]["loss"] == pytest.approx(reference[i][i]["loss"], rel=1e-5)
               for i in first_steps)
    assert all(got[i]["loss"] == pytest.approx(reference[i][i]["loss"], rel=1e-2) for i in steps)
    # the monitor's points are the kNN of the weights trained: its last, the kNN probe's
    from jax_impl import probe as jax_probe
    assert jax_probe.main(["--run", str(run), "--protocol", "knn", "--probe-subset", "0"]) == 0
    assert json.loads((run / "probe_cifar10_knn.json").read_text())["top1"] == got[-2]["knn_top1"]
    a, b = load_checkpoint(single / CHECKPOINT_FILE), load_checkpoint(run / CHECKPOINT_FILE)
    assert (b["epoch"], b["global_step"]) == (2, 8)
    for key in ("params", "batch_stats", "opt_state"):
        assert flatten_dict(b[key]).keys() == flatten_dict(a[key]).keys()


def test_an_error_on_process_zero_stops_the_whole_job(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "summary.json").write_text("{}")  # a finished run, which only process 0 checks
    job = two_process_job("-m", "jax_impl.train", "--preset", "smoke", "--data-dir",
                          str(tiny_data_dir), "--out", str(run), env={})
    for status, _, stderr in job:
        assert status == 2 and stderr.strip().splitlines()[-1] == (
            f"error: {run} already holds a run; pass --resume to continue it or choose another "
            "--out")


if __name__ == "__main__":
    if sys.argv[1] == "two-devices":
        folder = Path(sys.argv[2])
        report = {"parity": parity_report(), "errors": two_device_errors(folder)}
        (folder / "report.json").write_text(json.dumps(report))
    elif sys.argv[1] == "interrupted":
        train_until_epoch_one(sys.argv[2:])
    sys.exit(0)
