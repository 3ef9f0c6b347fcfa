"""Distances between two sets of features: Fréchet distance (FID, RadFID), KID, CMMD, k-NN
precision and recall.

All functions take NumPy-compatible float arrays ``(N, D)`` (one row per image) and compute in
float64. They know nothing about the network that made the features; see
:mod:`medvar_bundle.metrics.extractors` for that.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import linalg


def _features(features: ArrayLike, name: str, min_rows: int = 2) -> np.ndarray:
    """``features`` as a float64 ``(N, D)`` array with at least ``min_rows`` rows."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected features of shape (N >= {min_rows}, D), got {x.shape}")
    return x


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, ``N - 1``) of features ``(N, D)``."""
    x = _features(features, "features")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½)``, in squared feature units,
    computed as pytorch-fid does: ``scipy.linalg.sqrtm`` of the product; if that is not finite
    (singular product) ``eps`` is added to both diagonals and it is retried; a complex result
    from round-off is reduced to its real part, unless its diagonal has an imaginary component
    above 1e-3, which means the covariances are not valid and raises ``ValueError``.

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``.
        eps: diagonal offset for the singular case.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features_real: ArrayLike, features_fake: ArrayLike) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``
    (FID with InceptionV3 pool3 features, RadFID with RadImageNet features).

    When the smaller set has ``m ≤ D`` rows its covariance is ``BᵀB`` with ``B`` its centred rows
    ``/ √(m-1)`` ``(m, D)``, and the non-zero eigenvalues of ``Σ_big BᵀB`` are those of the
    ``m × m`` matrix ``B Σ_big Bᵀ``; so ``tr((Σ1 Σ2)^½)`` is the sum of their square roots — the
    same value, minutes faster than a ``D × D`` ``sqrtm`` at D = 2048 (which also needs a diagonal
    offset when ``N < D``). Larger sets use :func:`frechet_distance`.
    """
    x, y = _features(features_real, "features_real"), _features(features_fake, "features_fake")
    big, small = (x, y) if len(x) >= len(y) else (y, x)
    if len(small) > x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    mu_big, sigma_big = feature_statistics(big)
    centred = (small - small.mean(axis=0)) / np.sqrt(len(small) - 1)
    eigenvalues = np.linalg.eigvalsh(centred @ sigma_big @ centred.T)
    diff = mu_big - small.mean(axis=0)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma_big) + np.sum(centred * centred) - 2 * trace_sqrt)


def _poly_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD² of two equal-size samples ``(m, D)`` under ``k(a, b) = (gamma a·b + coef0)^degree``."""
    m = x.shape[0]
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid(
    features_real: ArrayLike,
    features_fake: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float | None]:
    """Kernel Inception Distance (Bińkowski et al. 2018): mean and std of the unbiased MMD²
    under the polynomial kernel ``(gamma a·b + coef0)^degree`` over random subsets.

    Each of ``subsets`` rounds draws ``subset_size`` rows without replacement from each set (as
    torchmetrics / torch-fidelity do). When a set has fewer rows than ``subset_size``, the size
    shrinks to ``min(N, M)`` with a warning. Unbiased: two samples of one distribution give ≈ 0
    (values can be slightly negative). Unitless (squared kernel units).

    Args:
        features_real, features_fake: ``(N, D)`` and ``(M, D)``.
        subsets: number of random subsets averaged.
        subset_size: rows per subset and set.
        degree, gamma, coef0: kernel parameters; ``gamma`` defaults to ``1 / D``.
        seed: seed or generator for the subset draws.

    Returns:
        ``(mean, std)`` over the subsets. The std is None where the subsets cannot vary: one
        subset, or both sets the size of the subset (each subset is then the whole of both, so a
        std of 0 would claim a precision the estimate does not have).
    """
    x, y = _features(features_real, "features_real"), _features(features_fake, "features_fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    n = min(x.shape[0], y.shape[0])
    if subset_size > n:
        warnings.warn(
            f"KID: subset_size {subset_size} exceeds the smaller feature set ({n} rows); using subsets of {n}",
            stacklevel=2,
        )
        subset_size = n
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    whole = subset_size == x.shape[0] == y.shape[0]  # every subset would be both sets, whole
    rng = np.random.default_rng(seed)
    scores = [
        _poly_mmd2(
            x[rng.choice(x.shape[0], subset_size, replace=False)],
            y[rng.choice(y.shape[0], subset_size, replace=False)],
            degree,
            gamma,
            coef0,
        )
        for _ in range(1 if whole else subsets)
    ]
    return float(np.mean(scores)), None if subsets < 2 or whole else float(np.std(scores))


def _mean_rbf(a: np.ndarray, b: np.ndarray, gamma: float, chunk: int = 2048) -> float:
    """Mean of ``exp(-gamma ||a_i - b_j||²)`` over all pairs, ``chunk`` rows of ``a`` at a time."""
    b_sq = (b * b).sum(axis=1)
    total = 0.0
    for start in range(0, a.shape[0], chunk):
        block = a[start : start + chunk]
        sq = (block * block).sum(axis=1)[:, None] + b_sq[None, :] - 2 * block @ b.T
        total += float(np.exp(-gamma * sq).sum())
    return total / (a.shape[0] * b.shape[0])


def cmmd(emb_real: ArrayLike, emb_fake: ArrayLike, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD (Jayasumana et al. 2024): MMD² between CLIP image embeddings under a Gaussian RBF
    kernel ``exp(-||a - b||² / (2 sigma²))``, times ``scale``.

    As in the reference implementation (google-research/cmmd): embeddings are l2-normalised
    first, and the estimator is the biased (V-statistic, minimum-variance) one including the
    diagonal, so identical sets give exactly 0 and a single embedding a side is enough.
    Embeddings that are already normalised are unaffected.

    Args:
        emb_real, emb_fake: ``(N, D)`` and ``(M, D)`` CLIP image embeddings (D = 768 for
            ViT-L/14-336).
        sigma: kernel bandwidth (10 in CMMD).
        scale: output multiplier (1000 in CMMD).
    """
    x, y = _features(emb_real, "emb_real", min_rows=1), _features(emb_fake, "emb_fake", min_rows=1)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    gamma = 1.0 / (2 * sigma**2)
    return scale * (_mean_rbf(x, x, gamma) + _mean_rbf(y, y, gamma) - 2 * _mean_rbf(x, y, gamma))


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``x`` ``(N, D)`` to its ``k``-th nearest other row: ``(N,)``."""
    return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the 1st is the row itself (0)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``points`` inside at least one ball ``(centres, radii)``."""
    inside = [
        (torch.cdist(points[i : i + chunk], centres) <= radii[None]).any(dim=1) for i in range(0, len(points), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def knn_precision(features_real: ArrayLike, features_fake: ArrayLike, k: int = 3) -> float:
    """Improved precision (Kynkäänniemi et al., 2019): the fraction of fake points inside the real manifold.

    The real manifold is the union of balls around the real points, each with radius the distance
    to the point's ``k``-th nearest real neighbour. In [0, 1], higher is better (fidelity);
    Euclidean distances in float64. Only the real set needs more than ``k`` rows: precision is
    defined for any number of fake points (with few of them it moves in coarse steps).

    Args:
        features_real: ``(N, D)``, N > k.
        features_fake: ``(M, D)``, M ≥ 1.
        k: the neighbour that sets the radii (the paper's default is 3).
    """
    x, y = _features(features_real, "features_real"), _features(features_fake, "features_fake", min_rows=1)
    if len(x) <= k:
        raise ValueError(f"k-NN precision with k={k} needs more than {k} rows in the reference set, got {len(x)}")
    real = torch.from_numpy(x)
    return _covered(torch.from_numpy(y), real, _knn_radii(real, k))


def knn_precision_recall(features_real: ArrayLike, features_fake: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of two feature sets.

    Precision: the fraction of fake points inside the real manifold (:func:`knn_precision`,
    fidelity); recall: the fraction of real points inside the fake manifold, i.e. the precision
    with the roles swapped (coverage). Both in [0, 1], higher is better.

    Args:
        features_real, features_fake: ``(N, D)`` and ``(M, D)``, each with more than ``k`` rows.
        k: the neighbour that sets the radii (the paper's default is 3).
    """
    return knn_precision(features_real, features_fake, k), knn_precision(features_fake, features_real, k)
