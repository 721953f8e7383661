"""Helpers for HTTP tests: tensors in both wire forms, and a torch twin of a session."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import torch

from app.wire import safetensors

ST = "application/vnd.safetensors"


def tensor_json(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.ravel().tolist()}


def params_of(answer: httpx.Response) -> dict[str, np.ndarray]:
    """The parameters in a step/params answer, whichever format it came in."""
    assert answer.status_code == 200, answer.text
    if answer.headers["content-type"].startswith(ST):
        tensors, _ = safetensors.decode(answer.content)
        return {k: np.array(v) for k, v in tensors.items()}
    return {
        name: np.array(t["data"], dtype=t["dtype"]).reshape(t["shape"])
        for name, t in answer.json()["params"].items()
    }


async def create(client: httpx.AsyncClient, params: dict[str, np.ndarray], **spec: Any) -> str:
    body = {"params": {k: tensor_json(v) for k, v in params.items()}, **spec}
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/sessions/{r.json()['id']}"
    session_id: str = r.json()["id"]
    return session_id


async def step(
    client: httpx.AsyncClient,
    session_id: str,
    grads: dict[str, np.ndarray],
    fmt: str = "json",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    url = f"/v1/sessions/{session_id}/step"
    if fmt == "safetensors":
        metadata = {k: str(v) for k, v in extra.items()}
        body = safetensors.encode_bytes(grads, metadata)
        return await client.post(url, content=body, headers={"Content-Type": ST, **(headers or {})})
    payload = {"grads": {k: tensor_json(v) for k, v in grads.items()}, **extra}
    return await client.post(url, json=payload, headers=headers)


class TorchTwin:
    """torch.optim's optimizer (and scheduler) on the same initial parameters."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        optimizer: type[torch.optim.Optimizer],
        scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        self.tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
        self.opt = optimizer(list(self.tensors.values()), **kwargs)  # type: ignore[call-arg]
        self.sched = scheduler(self.opt) if scheduler else None

    def step(self, grads: dict[str, np.ndarray]) -> None:
        for name, t in self.tensors.items():
            t.grad = torch.from_numpy(grads[name].copy()) if name in grads else None
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.tensors.items()}

    def lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.opt.param_groups]
