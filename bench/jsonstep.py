"""(e) The JSON step over loopback HTTP against the in-process cost of the same JSON, for 1e4 and 1e5 float32
Adam parameters.

The round trip (timed): the client `orjson.dumps` the request `{"grads": {"w": {"shape", "dtype", "data"}}}`
from a float32 numpy array, posts it with plain `httpx` (Content-Type and Accept application/json) to a real
`optserve serve --store memory://`, and reads the answer back into numpy: `orjson.loads` then
`np.asarray(params["w"]["data"], float32)`.

The baseline (in process, same payloads): the four codec operations a JSON round trip cannot avoid, each
side once: encode the request (`orjson.dumps` of the array), decode it into a float32 array (`orjson.loads`
+ `np.asarray`), encode the response (`orjson.dumps` of a response-shaped object: step, lr, skipped,
grad_norm, params as a float32 array), decode it into a float32 array. The client's half of that is inside
the round trip too; everything else the round trip costs (HTTP, the server's validation, the update, the
store) is what the ratio measures. The SDK with `wire="json"` is shown for information.

Run: `python -m bench.jsonstep`.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import httpx
import numpy as np
import optserve
import orjson

from bench.common import (
    JSON_HEADERS,
    Measure,
    Section,
    Servers,
    Step,
    create_session,
    grads_of,
    interleaved_medians,
    sci,
    section_main,
)

SIZES = (10_000, 100_000)
LIMIT = 2.0
OPTS = orjson.OPT_SERIALIZE_NUMPY
HTTP, SDK = "httpx + orjson → optserve JSON step", "SDK wire=json → optserve JSON step"
BASE, REQ, RESP = "in-process orjson, 4 ops (baseline)", "  of which the request", "  of which the response"
COLUMNS = ["case", "params", "request bytes", "response bytes", "ms", "vs baseline"]


def _request(grads: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"grads": {"w": {"shape": list(grads.shape), "dtype": "float32", "data": grads}}}


def _decode(body: bytes, key: str) -> np.ndarray[Any, Any]:
    return np.asarray(orjson.loads(body)[key]["w"]["data"], dtype=np.float32)


def run(quick: bool = False, servers: Servers | None = None) -> Section:
    own = servers is None
    servers = servers or Servers()
    rows: list[dict[str, Any]] = []
    measures: list[Measure] = []
    try:
        url = servers.optserve().url
        with (
            httpx.Client(base_url=url, timeout=60) as http,
            optserve.Client(url, wire="json") as sdk,
        ):
            for numel in SIZES:
                sid = create_session(http, numel)
                path = f"/v1/sessions/{sid}/step"
                grads = grads_of(numel)
                request = _request(grads)
                answer = http.post(path, content=orjson.dumps(request, option=OPTS), headers=JSON_HEADERS)
                answer.raise_for_status()
                response = orjson.loads(answer.content)
                params = np.asarray(response["params"]["w"]["data"], dtype=np.float32)
                response["params"]["w"]["data"] = params  # response-shaped, the array as the server holds it
                session = sdk.get_session(sid)

                def step(path: str = path, request: dict[str, Any] = request) -> None:
                    body = orjson.dumps(request, option=OPTS)
                    answer = http.post(path, content=body, headers=JSON_HEADERS)
                    answer.raise_for_status()
                    _decode(answer.content, "params")

                def request_codec(request: dict[str, Any] = request) -> None:
                    _decode(orjson.dumps(request, option=OPTS), "grads")

                def response_codec(response: dict[str, Any] = response) -> None:
                    _decode(orjson.dumps(response, option=OPTS), "params")

                def baseline(req: Step = request_codec, resp: Step = response_codec) -> None:
                    req()
                    resp()

                steps: dict[str, Step] = {
                    HTTP: step,
                    SDK: partial(session.step, {"w": grads}),
                    BASE: baseline,
                    REQ: request_codec,
                    RESP: response_codec,
                }
                seconds = interleaved_medians(steps, 5 if quick else max(30, 5_000_000 // numel))
                sizes = {
                    "request bytes": len(orjson.dumps(request, option=OPTS)),
                    "response bytes": len(orjson.dumps(response, option=OPTS)),
                }
                rows += [
                    {
                        "case": name,
                        "params": numel,
                        **sizes,
                        "ms": s * 1e3,
                        "vs baseline": s / seconds[BASE],
                    }
                    for name, s in seconds.items()
                ]
                measures.append(
                    Measure(
                        "e",
                        f"JSON step, {sci(numel)} params",
                        seconds[HTTP] * 1e3,
                        seconds[BASE] * 1e3,
                        "in-process orjson",
                        "ms",
                        LIMIT,
                    )
                )
                http.delete(f"/v1/sessions/{sid}").raise_for_status()
    finally:
        if own:
            servers.close()
    notes = [
        "Baseline = orjson.dumps(request) + orjson.loads + np.asarray(float32) of it, plus the same for a "
        "response-shaped object (step, lr, skipped, grad_norm, params): each payload encoded once and "
        "decoded into a float32 array once, as the two sides of a JSON round trip must. The measured "
        "step includes the client's half (encode the request, decode the answer into numpy).",
    ]
    return Section("e", "JSON step vs in-process orjson", COLUMNS, rows, measures, notes)


if __name__ == "__main__":
    sys.exit(section_main(run))
