"""The gradient-boosted forecasters: LightGBM on named features of ``core.features``.

Two boosters use it: the reported **reference** reads :data:`core.features.RECIPE` (the standard recipe of this
competition: pair lags, target encodings of past months, sale timing, price, ids), and the ensemble's **trees** read
:data:`core.features.BOOSTER` (the recipe and what is known about a launch on its first day). Both are trained
on exactly the Nested LSTM's samples (the windows store's grid of every training month), early-stop on the
validation months and refit with the chosen rounds, like the network, on the same clipped target.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core import features as feature_room
from core.files import write_text_atomic

if TYPE_CHECKING:
    from core.config import ReferenceConfig
    from core.features import FeatureTables
    from core.window_store import WindowStore



@dataclasses.dataclass
class ReferenceFit:
    """One trained booster: the features it reads, what it trained on and how long it took."""

    booster: Any
    rounds: int
    best_validation_rmse: float | None
    train_samples: int
    seconds: float
    features: tuple[str, ...] = feature_room.RECIPE

    def predict(self, x: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
        return np.clip(self.booster.predict(x, num_iteration=self.rounds), *clip).astype(np.float32)

    def predict_samples(self, tables: FeatureTables, samples: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
        """Predictions for ``samples`` ([n, 2]: series index, target month), clipped."""
        return self.predict(feature_room.matrix(tables, samples, self.features), clip)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_text_atomic(Path(path), self.booster.model_to_string(num_iteration=self.rounds))


def _params(cfg: ReferenceConfig, seed: int) -> dict[str, Any]:
    return {
        "objective": "regression",
        "learning_rate": cfg.boost_learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "feature_fraction": cfg.feature_fraction,
        "bagging_fraction": cfg.bagging_fraction,
        "bagging_freq": 1,
        "lambda_l2": cfg.lambda_l2,
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": cfg.boost_threads or os.cpu_count() or 1,
        "verbosity": -1,
    }


def fit_reference(
    store: WindowStore,
    tables: FeatureTables,
    cfg: ReferenceConfig,
    *,
    seed: int,
    before_month: int | None = None,
    rounds: int | None = None,
    validate: bool = False,
    budget: int | None = None,
    features: Sequence[str] = feature_room.RECIPE,
) -> ReferenceFit:
    """Train on the store's training samples before ``before_month`` (None: all of them), reading ``features``.

    ``validate``: early-stop on the validation months' grids (at most ``cfg.max_rounds``) -- the selection
    stage; otherwise train exactly ``rounds`` rounds (the refit with the selected count).
    """
    import lightgbm as lgb

    started = time.perf_counter()
    names = tuple(features)
    clip = tuple(float(v) for v in store.meta["target_clip"])
    samples, weights = store.weighted_training_samples(before_month, seed, budget)
    if samples.shape[0] == 0:
        raise ValueError(f"no training samples before month {before_month}")
    y = store.targets(samples[:, 0], samples[:, 1])
    train = lgb.Dataset(feature_room.matrix(tables, samples, names), y, weight=weights, feature_name=list(names),
                        categorical_feature=feature_room.categorical(names), free_raw_data=True)
    params = _params(cfg, seed)

    def fitted(booster: Any, rounds: int, score: float | None) -> ReferenceFit:
        return ReferenceFit(booster, rounds, score, int(samples.shape[0]), time.perf_counter() - started, names)

    if validate:
        valid_samples = store.validation_index
        if valid_samples.shape[0] == 0:
            raise ValueError("the windows store has no validation month to early-stop on")
        valid = lgb.Dataset(
            feature_room.matrix(tables, valid_samples, names),
            np.clip(store.validation_frame()["actual"].to_numpy(), *clip), reference=train,
        )
        booster = lgb.train(
            params | {"metric": "rmse"}, train, num_boost_round=cfg.max_rounds, valid_sets=[valid],
            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
        )
        return fitted(booster, int(booster.best_iteration) or cfg.max_rounds,
                      float(booster.best_score["valid_0"]["rmse"]))
    if rounds is None or rounds < 1:
        raise ValueError(f"a refit needs the selected number of rounds (>= 1), got {rounds!r}")
    return fitted(lgb.train(params, train, num_boost_round=rounds), rounds, None)


def load_booster(path: str | os.PathLike[str]) -> ReferenceFit:
    """A booster saved by :meth:`ReferenceFit.save`, reading the features it was trained on (by name)."""
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(path))
    names = tuple(booster.feature_name())
    unknown = [name for name in names if name not in feature_room.REGISTRY]
    if unknown:
        raise ValueError(f"{path}: trained on features this version does not declare: {unknown}")
    return ReferenceFit(booster, booster.current_iteration(), None, 0, 0.0, names)
