"""torch_impl's public Python API: a run's trained backbone in one call.

    import torch_impl
    backbone = torch_impl.load_backbone("runs/cpu")        # eval mode, float32, CPU
    features = backbone(images)                            # [N, 3, S, S] -> [N, F]

The twin of jax_impl.api. It reads torch_impl's checkpoint.pt; a run trained by jax_impl is read
by interop.load_backbone(run, framework="torch"), or converted once with interop.convert.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from shared.runio import CHECKPOINT_FILES, load_run_config, refuse_stale_checkpoint
from torch_impl.checkpoint import load_checkpoint, load_model_state
from torch_impl.model import backbone_of, build_model


def load_backbone(run_dir: str | Path) -> nn.Module:
    """The trained backbone of the run folder RUN_DIR (its checkpoint.pt), in eval mode (its
    BatchNorms use their stored statistics), float32, on the CPU: a module from normalised
    float32 images [N, 3, S, S] (CIFAR-10 mean/std, as in pretraining) to features [N, F].
    UserError (one line) for a folder that is not a run, holds no checkpoint.pt (naming the
    conversion when it holds JAX's) or holds one older than JAX's."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / CHECKPOINT_FILES["torch"]
    stored = load_checkpoint(path)
    refuse_stale_checkpoint(run_dir, "torch")
    model = build_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width)
    load_model_state(model, stored["model"], path, cfg.stored_model_description())
    return backbone_of(model).eval()
