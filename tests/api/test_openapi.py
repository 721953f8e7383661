"""The OpenAPI document: valid OpenAPI 3.1, and accurate about what the handlers read and answer themselves
(safetensors bodies both ways, every refusal as problem+json). tests/api/test_fuzz.py holds the server to
it."""

from __future__ import annotations

from typing import Any

import pytest

from app.main import create_app
from app.settings import Settings

ST = "application/vnd.safetensors"
OCTET = "application/octet-stream"
JSON = "application/json"
PROBLEM = "application/problem+json"
SESSION = "/v1/sessions/{session_id}"

# Every operation and the statuses it documents (success first).
STATUSES: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/sessions"): {201, 400, 401, 406, 408, 413, 415, 422, 429, 503},
    ("get", "/v1/sessions"): {200, 401, 406, 422, 503},
    ("get", SESSION): {200, 401, 404, 406, 422, 503},
    ("delete", SESSION): {204, 401, 404, 422, 503},
    ("post", f"{SESSION}/step"): {200, 400, 401, 404, 406, 408, 409, 413, 415, 422, 503},
    ("get", f"{SESSION}/params"): {200, 401, 404, 406, 422, 503},
    ("put", f"{SESSION}/params"): {200, 400, 401, 404, 406, 408, 413, 415, 422, 503},
    ("get", f"{SESSION}/checkpoint"): {200, 401, 404, 406, 422, 503},
    ("get", f"{SESSION}/history"): {200, 401, 404, 406, 422, 503},
    ("get", f"{SESSION}/schedule"): {200, 401, 404, 406, 422, 503},
    ("get", "/v1/optimizers"): {200, 401, 406, 422},
    ("get", "/v1/schedulers"): {200, 401, 406, 422},
    ("post", "/v1/schedules/preview"): {200, 400, 401, 406, 408, 413, 422, 503},
    ("get", "/healthz"): {200},
    ("get", "/readyz"): {200, 503},
    ("get", "/metrics"): {200},
}
BINARY_REQUESTS = [("post", "/v1/sessions"), ("post", f"{SESSION}/step"), ("put", f"{SESSION}/params")]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    doc: dict[str, Any] = create_app(Settings(store="memory://")).openapi()
    return doc


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, item in document["paths"].items() for method, op in item.items()}


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    assert document["openapi"].startswith("3.1.")
    validator.validate(document, cls=validator.OpenAPIV31SpecValidator)


async def test_the_served_document_is_the_one_the_app_builds(make_client: Any) -> None:
    client = await make_client()
    served = await client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == client.app.openapi()


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_every_operation_documents_exactly_the_statuses_it_answers(document: dict[str, Any]) -> None:
    documented = {key: {int(s) for s in op["responses"]} for key, op in operations(document).items()}
    assert documented == STATUSES


def test_every_refusal_is_a_problem(document: dict[str, Any]) -> None:
    for key, op in operations(document).items():
        for status, answer in op["responses"].items():
            if int(status) >= 400:
                assert answer["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
                    key,
                    status,
                )
                assert answer["description"], (key, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's JSON 422 is not ours
    assert document["paths"]["/v1/sessions"]["post"]["responses"]["401"]["headers"]["WWW-Authenticate"]


@pytest.mark.parametrize(("method", "path"), BINARY_REQUESTS)
def test_binary_request_bodies_are_documented(document: dict[str, Any], method: str, path: str) -> None:
    body = document["paths"][path][method]["requestBody"]
    assert body["required"] is True
    content = body["content"]
    assert set(content) == {JSON, ST}
    assert content[JSON]["schema"]["$ref"].startswith("#/components/schemas/")
    schema = content[ST]["schema"]
    assert schema["type"] == "string"
    assert schema["contentMediaType"] == ST
    assert schema["format"] == "binary"
    assert OCTET in schema["description"]  # read as safetensors, said in words


@pytest.mark.parametrize(
    ("method", "path", "media_types"),
    [
        ("post", f"{SESSION}/step", {JSON, ST}),
        ("get", f"{SESSION}/params", {JSON, ST}),
        ("get", f"{SESSION}/checkpoint", {ST}),
        ("post", "/v1/sessions", {JSON}),
        ("put", f"{SESSION}/params", {JSON}),
    ],
)
def test_success_bodies_document_each_format_served(
    document: dict[str, Any], method: str, path: str, media_types: set[str]
) -> None:
    responses = document["paths"][path][method]["responses"]
    success = next(answer for status, answer in responses.items() if status.startswith("2"))
    assert set(success["content"]) == media_types
    if ST in media_types:
        assert success["content"][ST]["schema"]["contentMediaType"] == ST
    if JSON in media_types:
        assert success["content"][JSON]["schema"]["$ref"].startswith("#/components/schemas/")


def test_created_sessions_document_their_location(document: dict[str, Any]) -> None:
    created = document["paths"]["/v1/sessions"]["post"]["responses"]["201"]
    assert created["headers"]["Location"]["required"] is True


def test_metrics_are_documented_as_text(document: dict[str, Any]) -> None:
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
