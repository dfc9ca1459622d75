"""Independent references for the CSC operators and solvers, shared by the tests: the dense
matrix of a linear map and a high-accuracy coordinate-descent Lasso solver (numpy)."""

import math

import numpy as np
import torch

F64 = torch.float64


def dense_matrix(apply, in_shape):
    """Matrix of a linear map, built column by column from the images of the basis vectors."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=F64).reshape(n, *in_shape)
    return apply(basis).reshape(n, -1).T.detach()


def coordinate_descent(m, u, lmbda, mu, nonnegative, start=None, sweeps=3000, tol=1e-15):
    """Elastic-net Lasso ``min_z ½‖u − m z‖² + λ‖z‖₁ + ½μ‖z‖²`` (``z ≥ 0`` if ``nonnegative``)
    for one sample by cyclic coordinate descent (numpy), from 0 or a warm ``start``, until a
    sweep moves no coordinate by more than ``tol`` (at most ``sweeps`` sweeps)."""
    m, u = m.numpy(), u.numpy()
    gram, corr = m.T @ m, m.T @ u
    z = np.zeros(m.shape[1]) if start is None else start.numpy().copy()
    q = gram @ z
    for _ in range(sweeps):
        biggest = 0.0
        for i in range(len(z)):
            r = corr[i] - q[i] + gram[i, i] * z[i]
            new = max(r - lmbda, 0.0) if nonnegative else np.sign(r) * max(abs(r) - lmbda, 0.0)
            new /= gram[i, i] + mu
            if new != z[i]:
                q += gram[:, i] * (new - z[i])
                biggest = max(biggest, abs(new - z[i]))
                z[i] = new
        if biggest < tol:
            break
    return torch.from_numpy(z)
