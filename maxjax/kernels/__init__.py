"""Hand-written kernels, below the model math: one dispatch per operation picks the implementation for the
backend (native CPU kernels through the XLA FFI, Pallas on GPU/TPU), each beside its XLA reference."""
