"""Pure-torch layers of CSC-CTRL: its stages, their options and the solver they run.

CSC and sparse deconvolution stages, their geometry and options (:mod:`ctrl_csc.nn.stage`), prox
operators, the unrolled solver (:mod:`ctrl_csc.nn.solver` and the modules beside it).
"""

from .iteration import lasso_objective
from .layers import CSCLayer, SparseDeconvLayer
from .lipschitz import power_iteration
from .noise import add_noise
from .prox import prox_elastic_net, shrink
from .solver import UnrolledLasso, unrolled_lasso
from .stage import (
    DecoderStageOptions,
    EncoderStageOptions,
    code_size,
    conv_output_size,
    transposed_output_padding,
)
from .strided_conv import StridedConv

__all__ = [
    "CSCLayer",
    "DecoderStageOptions",
    "EncoderStageOptions",
    "SparseDeconvLayer",
    "StridedConv",
    "UnrolledLasso",
    "add_noise",
    "code_size",
    "conv_output_size",
    "lasso_objective",
    "power_iteration",
    "prox_elastic_net",
    "shrink",
    "transposed_output_padding",
    "unrolled_lasso",
]
