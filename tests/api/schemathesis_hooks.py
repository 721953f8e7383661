"""Hooks for the schemathesis command line (`SCHEMATHESIS_HOOKS=tests.api.schemathesis_hooks`)."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook("filter_body").apply_to(method="POST", path="/v1/sessions")
def no_synchronous_rounds(_: Any, body: Any) -> bool:
    """No session with synchronous rounds: a round holds each contribution until it fills or times out (up
    to an hour), so a fuzzer's lone contribution would wait that long. tests/test_rounds.py tests them."""
    aggregation = body.get("aggregation") if isinstance(body, dict) else None
    return not (isinstance(aggregation, dict) and aggregation.get("mode") == "sync")
