"""Merging adapters into weights: planning and streaming into a checkpoint (``plan``), one layer's ΔW by the
fastest exact path (``layer``, ``ternary``, ``terms``, ``dora``), torchrun (``distributed``), a live model (``swap``)."""
