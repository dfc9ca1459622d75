"""Thin Hydra entry points (``ctrl-csc-train``, ``ctrl-csc-eval``)."""
