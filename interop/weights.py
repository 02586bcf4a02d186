"""A checkpoint of one framework read as the other's network: what interop.convert writes and
interop.load_backbone returns."""
from __future__ import annotations

from pathlib import Path

import torch

from interop.mapping import from_torch_state, to_torch_state
from jax_impl import checkpoint as jax_checkpoint
from jax_impl.model import build_model as build_jax_model
from jax_impl.model import variable_shapes
from shared.config import Config
from torch_impl import checkpoint as torch_checkpoint
from torch_impl.model import VICReg
from torch_impl.model import build_model as build_torch_model


def flax_variables(path: Path, cfg: Config) -> tuple[dict, dict]:
    """The torch checkpoint at `path` as flax variables {"params", "batch_stats"} for cfg's
    model (checked), and the checkpoint itself."""
    stored = torch_checkpoint.load_checkpoint(path)
    weights = {k: v.detach().cpu().numpy() for k, v in stored["model"].items()}
    model = build_jax_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width)
    what = cfg.stored_model_description()
    variables = from_torch_state(weights, variable_shapes(model), path, what)
    return jax_checkpoint.load_model_state(model, variables, path, what), stored


def torch_network(path: Path, cfg: Config) -> tuple[VICReg, dict]:
    """The JAX checkpoint at `path` as cfg's torch VICReg network (checked), and the checkpoint
    itself."""
    stored = jax_checkpoint.load_checkpoint(path)
    what = cfg.stored_model_description()
    jax_model = build_jax_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width)
    variables = jax_checkpoint.load_model_state(jax_model, stored, path, what)
    model = build_torch_model(cfg.arch, cfg.width, cfg.mlp_dims(), cfg.stem(), cfg.last_width)
    weights = {k: torch.from_numpy(v) for k, v in to_torch_state(variables).items()}
    torch_checkpoint.load_model_state(model, weights, path, what)
    return model, stored
