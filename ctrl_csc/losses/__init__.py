"""Coding rate, rate reduction, the CTRL objectives and the distributed gather.

The mathematics: docs/design.md, §6 "Coding rate and rate reduction" and §7 "The CTRL objectives".

Pure torch: features ``Z`` of shape ``(n, d)`` (rows are samples), ``eps_sq`` = ε².
"""

from .distributed import all_gather, all_gather_with_grad, distributed_world_size
from .objective import CTRLObjective, ObjectiveTerms
from .rate import (
    NonFiniteError,
    coding_rate,
    compressed_coding_rate,
    pairwise_rate_reduction,
    rate_reduction,
    samplewise_rate_reduction,
)

__all__ = [
    "CTRLObjective",
    "NonFiniteError",
    "ObjectiveTerms",
    "all_gather",
    "all_gather_with_grad",
    "coding_rate",
    "compressed_coding_rate",
    "distributed_world_size",
    "pairwise_rate_reduction",
    "rate_reduction",
    "samplewise_rate_reduction",
]
