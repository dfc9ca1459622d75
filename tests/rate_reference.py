"""Independent float64 references of the coding-rate quantities (DESIGN §2), written directly with
``torch.logdet`` on d×d matrices and Python loops over classes — the truth the fast batched
implementation in ``ctrl_csc.losses`` is tested against."""

import torch

EPS = 0.5


def ref_R(Z, eps_sq=EPS):
    """½ logdet(I_d + d/(n ε²) ZᵀZ), d×d, torch.logdet, float64."""
    Z = Z.detach().double()
    n, d = Z.shape
    return 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (n * eps_sq) * Z.T @ Z)


def ref_Rc(Z, labels, num_classes, eps_sq=EPS):
    """Σ_j (n_j/n) R(Z_j), absent classes skipped."""
    n = Z.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for j in range(num_classes):
        Zj = Z[labels == j]
        if Zj.shape[0]:
            total = total + Zj.shape[0] / n * ref_R(Zj, eps_sq)
    return total


def ref_pair(Z, Zh, eps_sq=EPS):
    """ΔR(Z, Ẑ) = R(Z ∪ Ẑ) − ½R(Z) − ½R(Ẑ)."""
    return ref_R(torch.cat([Z, Zh]), eps_sq) - 0.5 * ref_R(Z, eps_sq) - 0.5 * ref_R(Zh, eps_sq)
