"""VICReg in PyTorch: the canonical implementation.

Building blocks, each documented with its shapes and dtypes: `vicreg_loss` (the loss of two
embedding batches), `Expander` (the MLP after the backbone), `apply_view` (a batch's view on the
device, from parameters drawn by shared.augment.draw_views); and `load_backbone`, a run's trained
backbone from its folder (either framework's).
"""
from torch_impl.api import load_backbone
from torch_impl.augment import apply_view
from torch_impl.loss import vicreg_loss
from torch_impl.model import Expander

__all__ = ["Expander", "apply_view", "load_backbone", "vicreg_loss"]
