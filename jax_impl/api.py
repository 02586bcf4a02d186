"""jax_impl's public Python API: a run's trained backbone in one call.

    import jax_impl
    module, variables = jax_impl.load_backbone("runs/cpu")
    features = module.apply(variables, images, train=False)   # [N, S, S, 3] -> [N, F]

The twin of torch_impl.api. It reads jax_impl's checkpoint.msgpack; a run trained by torch_impl is
read by interop.load_backbone(run, framework="jax"), or converted once with interop.convert.
"""
from __future__ import annotations

from pathlib import Path

from jax_impl.checkpoint import load_checkpoint, load_model_state
from jax_impl.model import ResNet, backbone_of, backbone_variables, build_model
from shared.runio import CHECKPOINT_FILES, load_run_config, refuse_stale_checkpoint


def load_backbone(run_dir: str | Path) -> tuple[ResNet, dict]:
    """The trained backbone of the run folder RUN_DIR (its checkpoint.msgpack): (the flax
    module, its {"params", "batch_stats"}), float32; module.apply(variables, x, train=False) maps
    normalised float32 images [N, S, S, 3] (NHWC, CIFAR-10 mean/std, as in pretraining) to
    features [N, F] with BatchNorm's stored statistics. UserError (one line) for a folder that
    is not a run, holds no checkpoint.msgpack (naming the conversion when it holds PyTorch's) or
    holds one older than PyTorch's."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / CHECKPOINT_FILES["jax"]
    stored = load_checkpoint(path)
    refuse_stale_checkpoint(run_dir, "jax")
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width)
    variables = load_model_state(model, stored, path,
                                 cfg.stored_model_description())
    return backbone_of(model), backbone_variables(variables)
