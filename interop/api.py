"""A run's trained backbone in either framework, whichever framework trained it.

    import interop
    backbone = interop.load_backbone("runs/cpu-jax", framework="torch")   # as torch_impl's
    module, variables = interop.load_backbone("runs/cpu", framework="jax")  # as jax_impl's

A run that holds the asked framework's checkpoint is read by that framework's load_backbone; one
that holds only the other's, or one whose other checkpoint trained on after a conversion
(runio.outgrown_checkpoint), is converted in memory, as interop.convert would write it.
"""
from __future__ import annotations

from pathlib import Path

import jax_impl
import torch_impl
from interop.weights import flax_variables, torch_network
from jax_impl.model import backbone_of, backbone_variables
from jax_impl.model import build_model as build_jax_model
from shared.errors import UserError
from shared.runio import CHECKPOINT_FILES, FRAMEWORKS, load_run_config, outgrown_checkpoint
from torch_impl.model import backbone_of as torch_backbone_of


def load_backbone(run_dir: str | Path, framework: str = "torch"):
    """The trained backbone of RUN_DIR as `framework` ("torch" or "jax") returns it: torch's
    nn.Module in eval mode (torch_impl.load_backbone), or jax's (module, variables)
    (jax_impl.load_backbone). UserError (one line) for a folder without a checkpoint."""
    if framework not in FRAMEWORKS:
        raise UserError(f"unknown framework {framework!r}; choose one of: {', '.join(FRAMEWORKS)}")
    run_dir = Path(run_dir)
    own = {"torch": torch_impl.load_backbone, "jax": jax_impl.load_backbone}[framework]
    other = next(fw for fw in FRAMEWORKS if fw != framework)
    source, target = run_dir / CHECKPOINT_FILES[other], run_dir / CHECKPOINT_FILES[framework]
    if not source.is_file() or (target.is_file() and not outgrown_checkpoint(run_dir, framework)):
        return own(run_dir)
    cfg = load_run_config(run_dir)
    if framework == "torch":
        model, _ = torch_network(source, cfg)
        return torch_backbone_of(model).eval()
    variables, _ = flax_variables(source, cfg)
    model = build_jax_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width)
    return backbone_of(model), backbone_variables(variables)
