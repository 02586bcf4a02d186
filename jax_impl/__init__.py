"""VICReg in Flax/JAX: the same tool as torch_impl (flags, data, run folder), weights
convertible."""
