"""GPU kernels (Triton). Each kernel module keeps its torch reference beside it."""
