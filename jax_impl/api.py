"""jax_impl's public Python API: a run's trained backbone in one call.

    import jax_impl
    module, variables = jax_impl.load_backbone("runs/cpu")
    features = module.apply(variables, images, train=False)   # [N, 32, 32, 3] -> [N, F]

The twin of torch_impl.api. A run trained by torch_impl (checkpoint.pt only) is converted on the
fly, exactly as `python -m jax_impl.convert` would.
"""
from __future__ import annotations

from pathlib import Path

from jax_impl.checkpoint import check_variables, load_checkpoint
from jax_impl.convert import from_torch_state
from jax_impl.model import ResNet, backbone_of, backbone_variables, build_model, variable_shapes
from shared.config import load_run_config
from shared.errors import UserError
from shared.runio import CHECKPOINT_FILES


def load_backbone(run_dir: str | Path) -> tuple[ResNet, dict]:
    """The trained backbone of the run folder RUN_DIR of either framework: (the flax module,
    its {"params", "batch_stats"}), float32; module.apply(variables, x, train=False) maps
    normalised float32 images [N, 32, 32, 3] (NHWC, CIFAR-10 mean/std, as in pretraining) to
    features [N, F] with BatchNorm's stored statistics. UserError (one line) for a folder that
    is not a run or holds no checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    description = f"{cfg.model_description()} (from config.json)"
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims())
    shapes = variable_shapes(model)
    own, other = (run_dir / CHECKPOINT_FILES[fw] for fw in ("jax", "torch"))
    if own.is_file():
        stored = load_checkpoint(own)
        variables = check_variables({"params": stored["params"],
                                     "batch_stats": stored["batch_stats"]}, shapes, own,
                                    description)
    elif other.is_file():
        from torch_impl.checkpoint import load_checkpoint as load_torch_checkpoint

        state = load_torch_checkpoint(other)["model"]
        variables = from_torch_state({k: v.detach().cpu().numpy() for k, v in state.items()},
                                     shapes, other, description)
    else:
        raise UserError(f"no checkpoint in {run_dir} (neither {own.name} nor {other.name})")
    return backbone_of(model), backbone_variables(variables)
