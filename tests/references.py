"""Independent float64 numpy computations that both frameworks' tests compare against: the VICReg
loss written from the paper's definitions, solo-learn's vicreg_loss_func written out, and one LARS
step as facebookresearch/vicreg computes it. Nothing here imports the code under test."""
import numpy as np

VARIANTS = ("solo-learn", "official", "no-eps")


def vicreg_terms(a: np.ndarray, b: np.ndarray, eps: float, variant: str):
    """(invariance, variance, covariance) of two embedding batches [N, D], in float64:
    s = mean (a - b)^2; v(Z) = mean_j relu(1 - sqrt(Var(z_j) + eps)) (unbiased variance), summed
    over both views (official: halved; no-eps: eps 0); c(Z) = sum of squared off-diagonal
    covariances / D, summed over both views."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    n, d = a.shape

    def v(z, e):
        return np.mean(np.maximum(0.0, 1.0 - np.sqrt(np.var(z, axis=0, ddof=1) + e)))

    def c(z):
        zc = z - z.mean(axis=0)
        m = zc.T @ zc / (n - 1)
        return (np.sum(m ** 2) - np.sum(np.diag(m) ** 2)) / d

    if variant == "official":
        variance = (v(a, eps) + v(b, eps)) / 2
    elif variant == "solo-learn":
        variance = v(a, eps) + v(b, eps)
    else:
        variance = v(a, 0.0) + v(b, 0.0)
    return np.mean((a - b) ** 2), variance, c(a) + c(b)


def vicreg_loss(a, b, sim, std, cov, eps, variant):
    """(loss, invariance, variance, covariance): lambda s + mu v + nu c of vicreg_terms."""
    invariance, variance, covariance = vicreg_terms(a, b, eps, variant)
    return sim * invariance + std * variance + cov * covariance, invariance, variance, covariance


def solo_learn_vicreg_loss(z1, z2, sim_loss_weight=25.0, var_loss_weight=25.0,
                           cov_loss_weight=1.0):
    """solo-learn's vicreg_loss_func (solo/losses/vicreg.py) written out in numpy float64: MSE,
    mean(relu(1 - std(z1))) + mean(relu(1 - std(z2))) with std = sqrt(var + 1e-4), and each
    view's squared off-diagonal covariances / D."""
    n, d = z1.shape
    sim_loss = np.mean((z1 - z2) ** 2)
    std_z1, std_z2 = (np.sqrt(z.var(axis=0, ddof=1) + 1e-4) for z in (z1, z2))
    var_loss = np.mean(np.maximum(1 - std_z1, 0)) + np.mean(np.maximum(1 - std_z2, 0))
    off = ~np.eye(d, dtype=bool)
    cov_loss = sum(np.sum(((z - z.mean(axis=0)).T @ (z - z.mean(axis=0)) / (n - 1))[off] ** 2) / d
                   for z in (z1, z2))
    return sim_loss_weight * sim_loss + var_loss_weight * var_loss + cov_loss_weight * cov_loss


def lars_step(p, g, mu, lr, wd, momentum, eta):
    """One LARS step of parameter p with gradient g and momentum mu, as facebookresearch/vicreg:
    1-D parameters (biases, norms) skip the decay and the trust ratio; otherwise g' = g + wd p,
    q = eta ||p|| / ||g'|| (1 where a norm is 0); mu = momentum mu + q g'; p -= lr mu. Returns
    (p, mu)."""
    if p.ndim > 1:
        g = g + wd * p
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        g = g * (eta * pn / gn if (pn > 0 and gn > 0) else 1.0)
    mu = momentum * mu + g
    return p - lr * mu, mu


def unit(x):
    """Rows of x [N, F] scaled to unit length, in float64."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(bank, bank_labels, queries, num_classes: int, k: int, temperature: float):
    """Weighted kNN in float64, one query at a time: s_j = <q / |q|, b_j / |b_j|>; the k largest
    s_j (equal ones in bank order) vote exp(s_j / T) for their label; the class with the largest
    sum wins (equal sums: the lower class). Returns int [M]."""
    bank, labels = unit(bank), np.asarray(bank_labels)
    predictions = []
    for query in unit(queries):
        similarity = bank @ query
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[labels[j]] += np.exp(similarity[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)
