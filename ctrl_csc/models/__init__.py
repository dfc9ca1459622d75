"""Encoders and decoders: CSC-CTRL (stacks of CSC / sparse-deconvolution stages) and baselines.

Every encoder maps images ``(N, C, H, W)`` in ``[-1, 1]`` to features ``(N, feature_dim)`` (on the
unit sphere unless ``normalize=False``); every decoder maps ``(N, feature_dim)`` back to images
``(N, C, H, W)`` in ``[-1, 1]``. Both check their input and raise a ``ValueError`` naming
``dataset.channels`` / ``dataset.image_size`` and the model's setting when they disagree.
``forward_with_codes(x)`` returns the output with every stage's code (``None`` for a stage whose
output is not a code); :func:`code_densities` gives their fractions of non-zeros. The models keep
no state of their last forward. Configs: ``conf/model/*.yaml``.
"""

from ctrl_csc.nn.noise import add_noise

from ._common import code_densities, count_parameters
from .autoencoder import Autoencoder
from .conv_ae import ConvDecoder, ConvEncoder, ConvVAEEncoder
from .csc import CSCDecoder, CSCEncoder
from .dcgan import DCGANDecoder, DCGANEncoder
from .resnet import ResNetDecoder, ResNetEncoder
from .specs import CSCStageSpec, DeconvStageSpec, parse_stages, register_resolvers

register_resolvers()  # the configs' ${csc_stages:...} and ${csc_mirror:...}

__all__ = [
    "Autoencoder",
    "CSCDecoder",
    "CSCEncoder",
    "CSCStageSpec",
    "ConvDecoder",
    "ConvEncoder",
    "ConvVAEEncoder",
    "DCGANDecoder",
    "DCGANEncoder",
    "DeconvStageSpec",
    "ResNetDecoder",
    "ResNetEncoder",
    "add_noise",
    "code_densities",
    "count_parameters",
    "parse_stages",
]
