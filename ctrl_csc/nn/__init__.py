"""Pure-torch layers of CSC-CTRL: CSC and sparse deconvolution stages, prox operators, solver."""

from .layers import CSCLayer, SparseDeconvLayer, conv_output_size, transposed_output_padding
from .noise import add_noise
from .prox import prox_elastic_net, shrink
from .solver import (
    StridedConv,
    UnrolledLasso,
    lasso_objective,
    power_iteration,
    unrolled_lasso,
)

__all__ = [
    "CSCLayer",
    "SparseDeconvLayer",
    "StridedConv",
    "UnrolledLasso",
    "add_noise",
    "conv_output_size",
    "lasso_objective",
    "power_iteration",
    "prox_elastic_net",
    "shrink",
    "transposed_output_padding",
    "unrolled_lasso",
]
