"""Evaluation: reconstruction/feature metrics, dictionary metrics, the evaluation runner and
visualisation.

See :mod:`ctrl_csc.eval.metrics`, :mod:`ctrl_csc.eval.dictionary`, :mod:`ctrl_csc.eval.runner`
and :mod:`ctrl_csc.eval.visualize`.
"""

from ctrl_csc.eval.dictionary import (
    DictionaryProbe,
    csc_stages,
    dictionary_moved,
    dictionary_report,
)
from ctrl_csc.eval.metrics import (
    INCEPTION_WEIGHTS_URL,
    PYTORCH_FID_WEIGHTS_URL,
    FeatureExtractor,
    GaussianStats,
    InceptionFeatureExtractor,
    NetworkFeatureExtractor,
    build_inception_feature_extractor,
    code_density,
    compute_fid,
    compute_inception_score,
    fid_from_features,
    frechet_distance,
    images_to_uint8,
    inception_score_from_logits,
    linear_probe_accuracy,
    nearest_subspace_accuracy,
    psnr,
    ssim,
)
from ctrl_csc.eval.runner import ALL_METRICS, EvaluationResult, evaluate_reconstructions
from ctrl_csc.eval.visualize import (
    dictionary_atoms,
    plot_curves,
    plot_densities,
    plot_dictionary,
    plot_feature_subspaces,
    reconstruction_grid,
    save_image_grid,
)

__all__ = [
    "ALL_METRICS",
    "DictionaryProbe",
    "INCEPTION_WEIGHTS_URL",
    "PYTORCH_FID_WEIGHTS_URL",
    "EvaluationResult",
    "FeatureExtractor",
    "GaussianStats",
    "InceptionFeatureExtractor",
    "NetworkFeatureExtractor",
    "build_inception_feature_extractor",
    "code_density",
    "compute_fid",
    "compute_inception_score",
    "csc_stages",
    "dictionary_atoms",
    "dictionary_moved",
    "dictionary_report",
    "evaluate_reconstructions",
    "fid_from_features",
    "frechet_distance",
    "images_to_uint8",
    "inception_score_from_logits",
    "linear_probe_accuracy",
    "nearest_subspace_accuracy",
    "plot_curves",
    "plot_densities",
    "plot_dictionary",
    "plot_feature_subspaces",
    "psnr",
    "reconstruction_grid",
    "save_image_grid",
    "ssim",
]
