"""Sample-quality metrics for reward fine-tuning: reward, diversity, prior preservation, mode coverage
and distribution matching. Pure torch / numpy; all results are plain Python floats or numpy arrays.

Definitions (see docs/evaluation.md for the reasoning and the measured Monte-Carlo errors):

- :func:`reward_stats`: mean, std (unbiased), standard error, min, max of the rewards.
- :func:`win_rate`: share of paired samples (same prompt and noise) where one model's sample has the higher utility, ties half.
- :func:`pairwise_diversity`: mean Euclidean distance between all distinct pairs of feature vectors
  (the paper uses DreamSim features; here the digit classifier's penultimate features stand in).
- :func:`frechet_distance`: Fréchet distance between Gaussians fitted to two feature sets
  (FID's formula): ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``,
  computed in float64 with symmetric eigen-decompositions (no complex ``sqrtm``).
- :func:`class_histogram` / :func:`histogram_entropy`: the class frequencies of samples (from labels,
  or the argmax of classifier logits) and their entropy in nats (``log 10`` for uniform digits).
- :func:`ideal_target_histogram`: the class histogram of the ideal fine-tuned distribution
  ``p_base(x) exp(beta r(x)) / Z`` estimated by self-normalised importance sampling from a base-model
  sample, with its delta-method (and optional bootstrap) standard error and effective sample size.
- :func:`total_variation`: ``0.5 * sum |p - q|``; :func:`distribution_matching` adds the Monte-Carlo
  error of the TV between a fine-tuned sample and the estimated target, and the TV expected from
  sampling noise alone when the fine-tuned model matches the target exactly (its noise floor).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence


def _np(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------- reward
def reward_stats(rewards: ArrayLike) -> dict[str, float]:
    """Summary of a batch of rewards: ``mean``, ``std`` (unbiased), ``sem`` (std/sqrt(n)), ``min``, ``max``, ``n``."""
    r = _np(rewards).reshape(-1)
    if r.size == 0:
        raise ValueError("reward_stats got no rewards")
    n = r.size
    std = float(r.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(r.mean()), "std": std, "sem": std / math.sqrt(n), "min": float(r.min()), "max": float(r.max()), "n": n}


# ------------------------------------------------------------------------------------------ diversity
def pairwise_diversity(features: ArrayLike, metric: str = "euclidean") -> float:
    """Mean distance over all ``n(n-1)/2`` distinct pairs of rows of ``features`` (N, D).

    ``metric``: ``"euclidean"`` (default) or ``"cosine"`` (1 - cosine similarity). Higher = more diverse;
    0 for identical samples. A collapsed fine-tuned model (DRaFT/ReFL-style) shows a drop here.
    """
    f = torch.as_tensor(_np(features))
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"pairwise_diversity needs features of shape (N >= 2, D), got {tuple(f.shape)}")
    if metric == "euclidean":
        d = torch.cdist(f, f)
    elif metric == "cosine":
        fn = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = 1 - fn @ fn.T
    else:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    n = f.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


# ------------------------------------------------------------------------------------------- win rate
def win_rate(utility_a: ArrayLike, utility_b: ArrayLike, tie_threshold: float = 0.0) -> dict[str, float]:
    """How often sample a_i beats its paired sample b_i (same prompt and noise) under a utility; a tie (|Δ| <= tie_threshold) counts 1/2.

    Returns ``win_rate`` = (wins + ties / 2) / n, its standard error, and the counts ``wins``, ``ties``, ``losses``, ``n``.
    Pairs from the same initial noise make the comparison paired: a fine-tuned model that changes nothing reads 0.5.
    """
    a, b = _np(utility_a).reshape(-1), _np(utility_b).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"win_rate needs two paired, non-empty sets of utilities of the same length, got {a.shape} and {b.shape}")
    if tie_threshold < 0:
        raise ValueError(f"tie_threshold must be >= 0, got {tie_threshold}")
    d = a - b
    ties = np.abs(d) <= tie_threshold
    wins, losses = (d > 0) & ~ties, (d < 0) & ~ties
    score = wins + 0.5 * ties
    n = a.size
    return {"win_rate": float(score.mean()), "stderr": float(score.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "wins": int(wins.sum()), "ties": int(ties.sum()), "losses": int(losses.sum()), "n": int(n)}


# --------------------------------------------------------------------------------- prior preservation
def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((mat + mat.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu_a: ArrayLike, cov_a: ArrayLike, mu_b: ArrayLike, cov_b: ArrayLike) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    ``tr((S_a^1/2 S_b S_a^1/2)^1/2)`` equals ``tr((S_a S_b)^1/2)`` and is computed from the eigenvalues of
    the symmetric PSD matrix ``S_a^1/2 S_b S_a^1/2`` (clipped at 0): stable for singular covariances.
    """
    mu_a, mu_b, cov_a, cov_b = _np(mu_a), _np(mu_b), _np(cov_a), _np(cov_b)
    sa = _sqrt_psd(cov_a)
    m = sa @ cov_b @ sa
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
    return max(fd, 0.0)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets (N, D), (M, D).

    Prior preservation: fine-tuned samples vs base-model samples in the classifier's feature space
    (0 for identical sets; grows as the fine-tuned model leaves the pretrained distribution). Like FID it
    is biased upwards for small N (two independent base samples of N give FD > 0); compare figures
    computed with the same N, and report :func:`frechet_distance` of two base samples as the floor.
    """
    a, b = _np(feats_a), _np(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs two (N >= 2, D) feature sets with the same D, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# ------------------------------------------------------------------------------------ mode coverage
def class_labels(logits_or_labels: ArrayLike) -> np.ndarray:
    """Integer labels from labels (N,) or the argmax of logits / probabilities (N, C)."""
    x = logits_or_labels.detach().cpu().numpy() if isinstance(logits_or_labels, torch.Tensor) else np.asarray(logits_or_labels)
    if x.ndim == 2:
        return x.argmax(axis=1).astype(np.int64)
    if x.ndim == 1:
        if x.size and not np.all(np.equal(np.mod(x, 1), 0)):
            raise ValueError("class labels must be integers; pass (N, C) logits for soft inputs")
        return x.astype(np.int64)
    raise ValueError(f"expected labels (N,) or logits (N, C), got shape {x.shape}")


def class_histogram(logits_or_labels: ArrayLike, num_classes: int = 10) -> np.ndarray:
    """Class frequencies (sum 1) of samples given labels (N,) or logits (N, C) (argmax)."""
    y = class_labels(logits_or_labels)
    if y.size == 0:
        raise ValueError("class_histogram got no samples")
    if (y < 0).any() or (y >= num_classes).any():
        raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    return np.bincount(y, minlength=num_classes).astype(np.float64) / y.size


def histogram_entropy(hist: ArrayLike) -> float:
    """Shannon entropy (nats) of a histogram (normalised first); ``log C`` when uniform over C classes."""
    p = _np(hist).reshape(-1)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """Total-variation distance ``0.5 * sum_c |p_c - q_c|`` between two histograms (each normalised first)."""
    p, q = _np(p).reshape(-1), _np(q).reshape(-1)
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in length: {p.shape} vs {q.shape}")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


# ----------------------------------------------------------------------------- distribution matching
@dataclass
class TargetHistogram:
    """The class histogram of ``p_base(x) exp(beta r(x)) / Z``, estimated from N base samples.

    Attributes:
        hist: (C,) estimated target class probabilities (self-normalised importance sampling).
        stderr: (C,) delta-method standard errors of ``hist``.
        bootstrap_stderr: (C,) bootstrap standard errors (``None`` unless requested).
        ess: Kish effective sample size ``(sum w)^2 / sum w^2`` (N when beta = 0).
        ess_fraction: ``ess / N``.
        max_weight_fraction: the largest normalised weight (1/N when beta = 0; near 1 = degenerate).
        beta: the inverse temperature; n: the base sample size.
        log_z: log of the normaliser estimate ``log mean_i exp(beta r_i)`` (= log E_base[exp(beta r)]).
    """

    hist: np.ndarray
    stderr: np.ndarray
    ess: float
    ess_fraction: float
    max_weight_fraction: float
    beta: float
    n: int
    log_z: float
    bootstrap_stderr: np.ndarray | None = None

    @property
    def max_stderr(self) -> float:
        return float(np.max(self.stderr))

    @property
    def tv_error(self) -> float:
        """Expected TV between this estimate and the exact target, ``0.5 sqrt(2/pi) sum_c stderr_c``
        (normal approximation): the Monte-Carlo error of the target in the units of the TV metric."""
        return float(0.5 * math.sqrt(2 / math.pi) * self.stderr.sum())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def importance_weights(base_log_rewards: ArrayLike, beta: float) -> tuple[np.ndarray, float]:
    """Normalised self-normalised-IS weights ``w_i ∝ exp(beta r_i)`` (sum 1) and ``log mean_i exp(beta r_i)``."""
    r = _np(base_log_rewards).reshape(-1)
    if not np.all(np.isfinite(r)):
        raise ValueError("base_log_rewards must be finite")
    a = beta * r
    m = a.max()
    w = np.exp(a - m)
    s = w.sum()
    return w / s, float(m + math.log(s / r.size))


def ideal_target_histogram(
    base_class_labels: ArrayLike,
    base_log_rewards: ArrayLike,
    beta: float,
    num_classes: int = 10,
    n_bootstrap: int = 0,
    seed: int = 0,
    min_ess: float = 100.0,
) -> TargetHistogram:
    """Class histogram of the ideal fine-tuned distribution ``p_base(x) exp(beta r(x)) / Z``.

    With base samples ``x_i ~ p_base`` (i = 1..N), classes ``c_i`` and log-rewards ``r_i``, the
    self-normalised importance-sampling estimate is ``q_c = sum_i w_i 1[c_i = c] / sum_i w_i`` with
    ``w_i = exp(beta r_i)``. It is consistent (bias O(1/N)); its delta-method variance is
    ``Var(q_c) ≈ sum_i wbar_i^2 (1[c_i = c] - q_c)^2`` with ``wbar`` the normalised weights, i.e.
    ``q_c (1 - q_c) / ESS`` when the weights do not depend on the class. The effective sample size
    ``ESS = 1 / sum_i wbar_i^2`` measures weight degeneracy: a warning is issued below ``min_ess``;
    then the estimate rests on a handful of samples and its error bars are themselves unreliable.

    Args:
        base_class_labels: (N,) labels or (N, C) logits of the base-model samples (the classifier's).
        base_log_rewards: (N,) log-rewards ``r`` of the same samples.
        beta: inverse temperature (the trainers' ``reward_scale``); ``beta = 0`` gives the plain base
            histogram with multinomial errors.
        n_bootstrap: if > 0, also return bootstrap standard errors (resampling the base sample).
        min_ess: ESS below which a ``RuntimeWarning`` is issued.
    """
    y = class_labels(base_class_labels)
    r = _np(base_log_rewards).reshape(-1)
    if y.shape[0] != r.shape[0]:
        raise ValueError(f"got {y.shape[0]} labels but {r.shape[0]} rewards")
    n = y.shape[0]
    w, log_z = importance_weights(r, beta)
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0
    hist = w @ onehot
    stderr = np.sqrt(((w[:, None] * (onehot - hist[None, :])) ** 2).sum(0))
    ess = float(1.0 / (w ** 2).sum())
    boot = None
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        a = beta * r
        hs = np.empty((n_bootstrap, num_classes))
        for b in range(n_bootstrap):
            idx = rng.integers(0, n, n)
            wb = np.exp(a[idx] - a[idx].max())
            hs[b] = np.bincount(y[idx], weights=wb, minlength=num_classes) / wb.sum()
        boot = hs.std(0, ddof=1)
    if ess < min_ess:
        warnings.warn(
            f"ideal_target_histogram: effective sample size {ess:.1f} of {n} base samples at beta={beta:g} "
            f"(below {min_ess:g}); the importance weights are degenerate, the target histogram and its error "
            "bars are unreliable. Use a larger base sample or a smaller beta.",
            RuntimeWarning,
            stacklevel=2,
        )
    return TargetHistogram(
        hist=hist, stderr=stderr, ess=ess, ess_fraction=ess / n, max_weight_fraction=float(w.max()),
        beta=float(beta), n=n, log_z=log_z, bootstrap_stderr=boot,
    )


@dataclass
class TargetFeatures:
    """Feature statistics of the ideal target ``p_base · exp(β r)`` from a weighted base sample, for judging a
    fine-tuned sample's *features* (not only its class marginal) against the target rather than the base model.

    Attributes:
        mean, cov: the self-normalised-IS weighted mean (D,) and covariance (D, D) of the base features.
        diversity: the expected :func:`pairwise_diversity` of ``eval_size`` samples of the target (resampled).
        fd_floor: the expected Fréchet distance of ``eval_size`` target samples to the target's statistics: what an
            exact sampler of the target reads at that size (resampled from one half of the base sample, the
            statistics from the other half).
        eval_size: the sample size the two expectations are for.
    """

    mean: np.ndarray
    cov: np.ndarray
    diversity: float
    fd_floor: float
    eval_size: int

    def fd(self, features: ArrayLike) -> float:
        """Fréchet distance of ``features`` (N, D) (a Gaussian fit) to the target's feature Gaussian."""
        f = _np(features)
        return frechet_distance_from_stats(f.mean(0), np.cov(f, rowvar=False), self.mean, self.cov)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "cov": self.cov, "diversity": self.diversity, "fd_floor": self.fd_floor, "eval_size": self.eval_size}


def target_features(base_features: ArrayLike, base_log_rewards: ArrayLike, beta: float, eval_size: int, n_resample: int = 20,
                    seed: int = 0) -> TargetFeatures:
    """:class:`TargetFeatures` of ``p_base · exp(β r)`` from base-model features (N, D) and log-rewards (N,).

    The tilted target keeps only part of the base model's modes, so its own diversity and its Fréchet distance to
    the base sample differ from the base model's: a sampler of the target is judged against these figures (the
    diversity ratio to :attr:`TargetFeatures.diversity`, the FD to the target), not against the base model's.
    """
    f = _np(base_features)
    w, _ = importance_weights(base_log_rewards, beta)
    mean = w @ f
    centred = f - mean
    cov = (centred.T * w) @ centred / max(1e-12, 1.0 - (w**2).sum())
    rng = np.random.default_rng(seed)
    # the floor: samples resampled from one half of the base sample against the target statistics of the other half
    # (resampling the very points that define the statistics would read too low)
    half = f.shape[0] // 2
    wa, _ = importance_weights(_np(base_log_rewards)[:half], beta)
    wb, _ = importance_weights(_np(base_log_rewards)[half:], beta)
    fa, fb = f[:half], f[half:]
    mean_a = wa @ fa
    cov_a = ((fa - mean_a).T * wa) @ (fa - mean_a) / max(1e-12, 1.0 - (wa**2).sum())
    divs, fds = [], []
    for _ in range(n_resample):
        idx = rng.choice(f.shape[0], size=eval_size, replace=True, p=w)
        divs.append(pairwise_diversity(f[idx]))
        sample = fb[rng.choice(fb.shape[0], size=eval_size, replace=True, p=wb)]
        fds.append(frechet_distance_from_stats(sample.mean(0), np.cov(sample, rowvar=False), mean_a, cov_a))
    return TargetFeatures(mean=mean, cov=cov, diversity=float(np.mean(divs)), fd_floor=float(np.mean(fds)), eval_size=int(eval_size))


def exact_target_histogram(base_hist: ArrayLike, class_log_reward_mgf: ArrayLike) -> np.ndarray:
    """Exact target histogram when ``E_base[exp(beta r) | c]`` is known per class: ``p(c) m_c / sum p m``.

    ``class_log_reward_mgf[c] = log E[exp(beta r(x)) | c]`` (e.g. ``beta * r_c`` when the reward is a
    function of the class only). Used to check :func:`ideal_target_histogram`.
    """
    p, lm = _np(base_hist).reshape(-1), _np(class_log_reward_mgf).reshape(-1)
    a = np.log(np.clip(p, 1e-300, None)) + lm
    a = np.where(p > 0, a, -np.inf)
    e = np.exp(a - a.max())
    return e / e.sum()


def tv_noise_floor(target_hist: ArrayLike, num_samples: int, n_sim: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of ``TV(empirical histogram of num_samples draws from target, target)``.

    What :func:`total_variation` reads for a model that matches the target *exactly*, from sampling noise
    alone (about ``sqrt(C / (2 pi M))`` for C equiprobable classes and M samples).
    """
    q = _np(target_hist).reshape(-1)
    q = q / q.sum()
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_samples, q, size=n_sim) / num_samples
    tvs = 0.5 * np.abs(counts - q[None, :]).sum(1)
    return float(tvs.mean()), float(tvs.std(ddof=1))


def distribution_matching(
    finetuned_labels: ArrayLike,
    target: TargetHistogram,
    base_class_labels: ArrayLike | None = None,
    base_log_rewards: ArrayLike | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """TV distance between a fine-tuned sample's class histogram and the ideal target, with its errors.

    Returns ``tv``; ``tv_stderr`` (bootstrap over both the M fine-tuned samples and, when the base
    sample is given, the N base samples used for the target: the Monte-Carlo error of the figure);
    ``tv_noise_floor`` / ``tv_noise_floor_std`` (the TV an exact sampler of the target would read with M
    samples, see :func:`tv_noise_floor`); ``target_ess``; ``target_max_stderr``; ``target_tv_error``
    (:attr:`TargetHistogram.tv_error`).
    A model matches the target to within the measurement's resolution when ``tv`` is within a couple of
    ``tv_stderr`` of ``tv_noise_floor``.
    """
    y = class_labels(finetuned_labels)
    c = target.hist.shape[0]
    ft_hist = class_histogram(y, c)
    tv = total_variation(ft_hist, target.hist)
    rng = np.random.default_rng(seed)
    have_base = base_class_labels is not None and base_log_rewards is not None
    if have_base:
        by, br = class_labels(base_class_labels), _np(base_log_rewards).reshape(-1)
        ba = target.beta * br
    tvs = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        fh = np.bincount(y[rng.integers(0, y.size, y.size)], minlength=c) / y.size
        if have_base:
            idx = rng.integers(0, by.size, by.size)
            wb = np.exp(ba[idx] - ba[idx].max())
            th = np.bincount(by[idx], weights=wb, minlength=c) / wb.sum()
        else:  # parametric: perturb the target by its delta-method errors
            th = np.clip(target.hist + rng.normal(0, 1, c) * target.stderr, 0, None)
        tvs[b] = total_variation(fh, th)
    floor, floor_std = tv_noise_floor(target.hist, y.size, seed=seed)
    return {
        "tv": tv,
        "tv_stderr": float(tvs.std(ddof=1)) if n_bootstrap > 1 else float("nan"),
        "tv_noise_floor": floor,
        "tv_noise_floor_std": floor_std,
        "target_ess": target.ess,
        "target_max_stderr": target.max_stderr,
        "target_tv_error": target.tv_error,
    }


# ------------------------------------------------------------------------------------- convenience
@torch.no_grad()
def classifier_outputs(images: torch.Tensor, classifier: torch.nn.Module, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of ``classifier`` (a :class:`~trl_gfn.rewards.digits.DigitClassifier` or anything
    with ``.logits(x)`` / ``.features(x)``) on images in [0, 1] (B, 3, H, W), in batches, without grad."""
    was_training = classifier.training
    classifier.eval()
    logits, feats = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float()
        f = classifier.features(x)
        feats.append(f)
        logits.append(classifier.head(f) if hasattr(classifier, "head") else classifier.logits(x))
    classifier.train(was_training)
    return torch.cat(logits), torch.cat(feats)


def evaluate_samples(
    images: torch.Tensor,
    classifier: torch.nn.Module,
    reward_fn: Callable | None = None,
    prompts: Sequence[str] | None = None,
    prompt_metadata: Sequence[dict] | None = None,
    base_features: ArrayLike | None = None,
    target_histogram: TargetHistogram | ArrayLike | None = None,
    num_classes: int = 10,
    batch_size: int = 512,
) -> dict[str, Any]:
    """All the figures for one set of samples (images in [0, 1], shape (B, 3, H, W)).

    Returns a dict with ``reward_mean``, ``reward_std``, ``reward_sem`` (if ``reward_fn``, a reward with
    the trl-gfn contract, called without grad), ``diversity`` (:func:`pairwise_diversity` of the
    classifier features), ``class_histogram`` (list), ``class_entropy``, ``fd_to_base`` (if
    ``base_features``: :func:`frechet_distance` to the base-model sample's features), and if
    ``target_histogram`` is given (a :class:`TargetHistogram` or a plain histogram): ``tv_to_target``,
    ``tv_noise_floor`` and, for a :class:`TargetHistogram`, ``tv_stderr`` (see :func:`distribution_matching`).
    """
    logits, feats = classifier_outputs(images, classifier, batch_size)
    out: dict[str, Any] = {"num_samples": int(images.shape[0])}
    if reward_fn is not None:
        b = images.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * b
        prompt_metadata = list(prompt_metadata) if prompt_metadata is not None else [{} for _ in range(b)]
        rs = []
        with torch.no_grad():
            for i in range(0, b, batch_size):
                res = reward_fn(images[i:i + batch_size], prompts[i:i + batch_size], prompt_metadata[i:i + batch_size])
                rs.append(res[0] if isinstance(res, tuple) else res)
        st = reward_stats(torch.cat(rs))
        out.update(reward_mean=st["mean"], reward_std=st["std"], reward_sem=st["sem"])
    out["diversity"] = pairwise_diversity(feats)
    hist = class_histogram(logits, num_classes)
    out["class_histogram"] = hist.tolist()
    out["class_entropy"] = histogram_entropy(hist)
    if base_features is not None:
        out["fd_to_base"] = frechet_distance(feats, base_features)
    if target_histogram is not None:
        if isinstance(target_histogram, TargetHistogram):
            dm = distribution_matching(logits, target_histogram)
            out.update(tv_to_target=dm["tv"], tv_stderr=dm["tv_stderr"], tv_noise_floor=dm["tv_noise_floor"], target_ess=dm["target_ess"])
        else:
            out["tv_to_target"] = total_variation(hist, target_histogram)
            out["tv_noise_floor"] = tv_noise_floor(target_histogram, int(images.shape[0]))[0]
    return out
