"""The Python API: the README's example runs on a smoke run of each framework, and each side's
load_backbone reads either framework's run folder."""
import re
from pathlib import Path

import numpy as np
import pytest

import jax_impl
import torch_impl
from jax_impl import train as jax_train
from shared.errors import UserError
from torch_impl import train as torch_train

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINERS = {"torch": torch_train, "jax": jax_train}


def readme_example() -> str:
    """The python block under the README's "Python API" heading."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module", params=list(TRAINERS))
def smoke_run(request, tiny_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"api-{request.param}") / "run"
    assert TRAINERS[request.param].main(["--preset", "smoke", "--data-dir", str(tiny_data_dir),
                                         "--out", str(run), "--no-probe"]) == 0
    return run


def test_the_readme_example_runs_and_both_frameworks_give_the_same_features(smoke_run):
    namespace: dict = {}
    exec(readme_example().replace('"runs/cpu"', repr(str(smoke_run))), namespace)
    features, jax_features = namespace["features"].numpy(), np.asarray(namespace["jax_features"])
    assert features.shape == jax_features.shape == (8, 64)  # smoke: width 8, resnet18
    assert not namespace["backbone"].training
    scale = np.abs(features).max()
    np.testing.assert_allclose(jax_features, features, rtol=1e-4, atol=1e-4 * scale)


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path):
    for load in (torch_impl.load_backbone, jax_impl.load_backbone):
        with pytest.raises(UserError, match=f"no run folder at {tmp_path}: .*config.json is "
                                            "missing"):
            load(tmp_path)


def test_a_run_without_a_checkpoint_is_one_clear_error(smoke_run, tmp_path):
    (tmp_path / "config.json").write_text((smoke_run / "config.json").read_text())
    for load in (torch_impl.load_backbone, jax_impl.load_backbone):
        with pytest.raises(UserError, match=f"no checkpoint at {tmp_path}/checkpoint"):
            load(tmp_path)
