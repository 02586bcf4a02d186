"""VICReg in Flax/JAX: the same tool as torch_impl (flags, data, run folder), weights convertible.

Building blocks, each documented with its shapes and dtypes: `vicreg_loss` (the loss of two
embedding batches, jit-able), `Expander` (the MLP after the backbone), `apply_view` (a batch's view
inside a jitted function, from parameters drawn by shared.augment.draw_views); and
`load_backbone`, a run's trained backbone from its folder (either framework's).
"""
from jax_impl.api import load_backbone
from jax_impl.augment import apply_view
from jax_impl.loss import vicreg_loss
from jax_impl.model import Expander

__all__ = ["Expander", "apply_view", "load_backbone", "vicreg_loss"]
