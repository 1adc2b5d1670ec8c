"""Teacher ``alp_gmm``: Portelas et al. 2019, "Teacher algorithms for curriculum learning of
Deep RL in continuously parameterized environments" (CoRL), ALP-GMM.

* **ALP** of a new (task, reward): ``|reward − reward of the nearest earlier task|`` in task
  space (0 while at most ``min_history`` tasks are known), nearest by scikit-learn's
  ``NearestNeighbors``.
* Every ``fit_rate`` tasks after a ``bootstrap`` of uniform tasks, Gaussian mixtures of
  2 … ``k_max`` components (scikit-learn, full covariances) are fitted to the last ``window``
  points (task, ALP); the one with the lowest AIC is kept.
* ``sample``: with probability ``random_ratio`` (and during the bootstrap) a uniform task;
  otherwise a component chosen in proportion to its mean ALP, a point drawn from it, its ALP
  coordinate dropped, clipped to the box.

As the authors' code (flowersteam/teachDeepRL ``alp_gmm.py``: the same ALP, AIC over
2…10 components, 20% random tasks, proportional choice) with their defaults scaled down:
``fit_rate`` and ``bootstrap`` are 250 there, tens of episodes here (a few hundred training
steps in all), and the window is a parameter rather than equal to ``fit_rate``.
"""
from __future__ import annotations

import warnings

import numpy as np

from lib.curricula.teachers import TEACHERS
from lib.curricula.teachers._base import BoxTeacher


def absolute_learning_progress(tasks: np.ndarray, rewards: np.ndarray, task, reward: float, min_history: int = 5) -> float:
    """``|reward − rewards[nearest earlier task]|`` (Euclidean, scikit-learn's NearestNeighbors);
    0 while at most ``min_history`` earlier tasks are known (the reference's ``> 5`` rule)."""
    from sklearn.neighbors import NearestNeighbors

    if len(tasks) <= min_history:
        return 0.0
    nn = NearestNeighbors(n_neighbors=1).fit(np.asarray(tasks, dtype=float))
    (idx,), = nn.kneighbors(np.asarray(task, dtype=float).reshape(1, -1), return_distance=False)
    return float(abs(reward - rewards[idx]))


def best_mixture(points: np.ndarray, k_max: int, seed: int):
    """The Gaussian mixture (2 … k_max components, full covariances) with the lowest AIC on ``points``;
    component counts above the number of points are skipped."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    best, best_aic = None, np.inf
    for k in range(2, max(2, min(k_max, len(points))) + 1):
        with warnings.catch_warnings(), np.errstate(under="ignore"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm = GaussianMixture(n_components=k, covariance_type="full", random_state=seed, reg_covar=1e-6).fit(points)
        aic = gmm.aic(points)
        if aic < best_aic:
            best, best_aic = gmm, aic
    return best


@TEACHERS.register("alp_gmm", paper="Portelas et al. 2019, ALP-GMM (CoRL)", url="https://arxiv.org/abs/1910.07224", random=True)
class ALPGMMTeacher(BoxTeacher):
    def __init__(self, bounds, rng: np.random.Generator, *, fit_rate: int = 20, bootstrap: int = 20, window: int = 60,
                 k_max: int = 10, random_ratio: float = 0.2, min_history: int = 5):
        super().__init__(bounds, rng)
        if min(fit_rate, bootstrap, window) < 1 or k_max < 2 or not 0 <= random_ratio <= 1:
            raise ValueError("alp_gmm needs fit_rate, bootstrap, window >= 1, k_max >= 2 and random_ratio in [0, 1]; got "
                             f"fit_rate={fit_rate}, bootstrap={bootstrap}, window={window}, k_max={k_max}, random_ratio={random_ratio}")
        self.fit_rate, self.bootstrap, self.window = int(fit_rate), int(bootstrap), int(window)
        self.k_max, self.random_ratio, self.min_history = int(k_max), float(random_ratio), int(min_history)
        self.alps: list[float] = []
        self.gmm = None
        self.fits: list[dict] = []  # what the mixture looked like at each fit (for the figures)

    def update(self, task, reward: float) -> None:
        tasks = np.array([t for t, _ in self.history]).reshape(-1, self.dim)
        rewards = np.array([r for _, r in self.history])
        self.alps.append(absolute_learning_progress(tasks, rewards, task, reward, self.min_history))
        super().update(task, reward)
        n = len(self.history)
        if n >= self.bootstrap and n % self.fit_rate == 0:
            recent = np.array([np.append(t, a) for (t, _), a in zip(self.history[-self.window:], self.alps[-self.window:])])
            self.gmm = best_mixture(recent, self.k_max, seed=int(self.rng.integers(2**31 - 1)))
            self.fits.append({"at": n, "means": self.gmm.means_.copy(), "weights": self.gmm.weights_.copy()})

    def sample(self) -> np.ndarray:
        if self.gmm is None or self.rng.random() < self.random_ratio:
            return self.uniform()
        alp = np.clip(self.gmm.means_[:, -1], 0, None)
        # No progress anywhere: a component at random, as the reference's proportional_choice.
        k = self.rng.choice(len(alp), p=alp / alp.sum()) if alp.sum() > 0 else self.rng.integers(len(alp))
        point = self.rng.multivariate_normal(self.gmm.means_[k], self.gmm.covariances_[k])
        return self.clip(point[:-1])
