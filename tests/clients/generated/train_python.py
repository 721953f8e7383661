"""Trains y = 2x + 1 with the Python client openapi-python-client generated, unedited, from optserve's live
OpenAPI document (package `optserve_api`, on PYTHONPATH): an API key, an Idempotency-Key retry and a 409,
then prints the fit as JSON. Run by tests/clients/test_generated.py: `python train_python.py <url> <key>`."""

from __future__ import annotations

import json
import sys

from optserve_api import AuthenticatedClient
from optserve_api.api.sessions import create_session, delete_session, step
from optserve_api.models import (
    CreateSession,
    CreateSessionParams,
    OptimizerName,
    OptimizerSpec,
    Problem,
    Session,
    Step,
    StepGrads,
    StepResult,
)


def main(url: str, key: str) -> None:
    client = AuthenticatedClient(base_url=url, token=key)
    xs = [(i - 10) / 10 for i in range(21)]
    params = CreateSessionParams()
    params["w"], params["b"] = [0.0], [0.0]
    optimizer = OptimizerSpec(name=OptimizerName.SGD)
    optimizer["lr"] = 0.1
    created = create_session.sync_detailed(
        client=client, body=CreateSession(optimizer=optimizer, params=params)
    )
    assert created.status_code == 201, created.content
    assert isinstance(created.parsed, Session)
    session_id = created.parsed.id
    w = b = 0.0
    steps = 300
    for t in range(steps):
        residuals = [(w * x + b - (2 * x + 1), x) for x in xs]
        grads = StepGrads()
        grads["w"] = [sum(2 * r * x for r, x in residuals) / len(xs)]
        grads["b"] = [sum(2 * r for r, _ in residuals) / len(xs)]
        body = Step(grads=grads, step=t)
        answer = step.sync_detailed(session_id, client=client, body=body, idempotency_key=f"step-{t}")
        assert answer.status_code == 200, answer.content
        assert isinstance(answer.parsed, StepResult)
        if t == 5:  # the answer was "lost": the same request again is answered again, and applies nothing
            again = step.sync_detailed(session_id, client=client, body=body, idempotency_key=f"step-{t}")
            assert again.headers["idempotent-replayed"] == "true", again.headers
            assert isinstance(again.parsed, StepResult)
            assert again.parsed.step == t + 1
        assert answer.parsed.params
        w, b = answer.parsed.params["w"].data[0], answer.parsed.params["b"].data[0]
    stale = step.sync_detailed(session_id, client=client, body=Step(grads=StepGrads(), step=0))
    assert stale.status_code == 409, stale.content
    assert isinstance(stale.parsed, Problem)
    assert stale.parsed.current_step == steps
    assert delete_session.sync_detailed(session_id, client=client).status_code == 204
    print(json.dumps({"w": w, "b": b, "steps": steps}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
