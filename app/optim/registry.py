"""Optimizer names -> implementations, and the catalogue that `GET /v1/optimizers` serves."""

from __future__ import annotations

from typing import Any

from app.optim.base import Optimizer
from app.optim.hparams import SpecError
from app.optim.sgd import SGD

OPTIMIZERS: dict[str, Optimizer] = {opt.name: opt for opt in (SGD(),)}


def get_optimizer(name: Any, field: str = "optimizer.name") -> Optimizer:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise SpecError.one(field, f"unknown optimizer {name!r}; allowed: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def optimizer_catalogue() -> list[dict[str, Any]]:
    return [
        {
            "name": opt.name,
            "description": opt.description,
            "hyperparameters": [p.catalogue() for p in opt.hparams],
        }
        for opt in OPTIMIZERS.values()
    ]
