"""Between the two implementations: the weight mapping (interop.mapping), the conversion command
(`python -m interop.convert`) and `load_backbone(run, framework)`, which reads a run of either
framework into either. torch_impl and jax_impl never import each other; this package imports
both."""
from interop.api import load_backbone

__all__ = ["load_backbone"]
