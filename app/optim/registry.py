"""Optimizer names -> implementations, and the catalogue that `GET /v1/optimizers` serves."""

from __future__ import annotations

from typing import Any

from app.optim.adadelta import Adadelta
from app.optim.adafactor import Adafactor
from app.optim.adagrad import Adagrad
from app.optim.adam import Adam, Adamax, AdamW, NAdam, RAdam
from app.optim.asgd import ASGD
from app.optim.base import Optimizer
from app.optim.hparams import SpecError
from app.optim.muon import Muon
from app.optim.rmsprop import RMSprop
from app.optim.rprop import Rprop
from app.optim.sgd import SGD

OPTIMIZERS: dict[str, Optimizer] = {
    opt.name: opt
    for opt in (
        SGD(),
        Adam(),
        AdamW(),
        NAdam(),
        RAdam(),
        Adamax(),
        Adagrad(),
        Adadelta(),
        RMSprop(),
        Rprop(),
        ASGD(),
        Adafactor(),
        Muon(),
    )
}


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
