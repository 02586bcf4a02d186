"""torch_impl's public Python API: a run's trained backbone in one call.

    import torch_impl
    backbone = torch_impl.load_backbone("runs/cpu")        # eval mode, float32, CPU
    features = backbone(images)                            # [N, 3, 32, 32] -> [N, F]

The twin of jax_impl.api. A run trained by jax_impl (checkpoint.msgpack only) is converted on
the fly, exactly as `python -m jax_impl.convert` would.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.config import load_run_config
from shared.errors import UserError
from shared.runio import CHECKPOINT_FILES
from torch_impl.checkpoint import load_checkpoint, load_model_state
from torch_impl.model import build_model


def load_backbone(run_dir: str | Path) -> nn.Module:
    """The trained backbone of the run folder RUN_DIR of either framework, in eval mode (its
    BatchNorms use their stored statistics), float32, on the CPU: a module from normalised
    float32 images [N, 3, 32, 32] (CIFAR-10 mean/std, as in pretraining) to features [N, F].
    UserError (one line) for a folder that is not a run or holds no checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    description = f"{cfg.model_description()} (from config.json)"
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.seed)
    own, other = (run_dir / CHECKPOINT_FILES[fw] for fw in ("torch", "jax"))
    if own.is_file():
        state, path = load_checkpoint(own)["model"], own
    elif other.is_file():
        state, path = _converted_from_jax(other, cfg, description), other
    else:
        raise UserError(f"no checkpoint in {run_dir} (neither {own.name} nor {other.name})")
    load_model_state(model, state, path, description)
    return model.backbone.eval()


def _converted_from_jax(path: Path, cfg, description: str) -> dict[str, torch.Tensor]:
    """The torch state_dict of a JAX checkpoint's variables (jax_impl.convert's mapping)."""
    from jax_impl.checkpoint import check_variables
    from jax_impl.checkpoint import load_checkpoint as load_jax_checkpoint
    from jax_impl.convert import to_torch_state
    from jax_impl.model import build_model as build_jax_model
    from jax_impl.model import variable_shapes

    stored = load_jax_checkpoint(path)
    variables = check_variables({"params": stored["params"], "batch_stats": stored["batch_stats"]},
                                variable_shapes(build_jax_model(cfg.arch, cfg.width,
                                                                cfg.mlp_dims())),
                                path, description)
    return {k: torch.from_numpy(np.array(v)) for k, v in to_torch_state(variables).items()}
