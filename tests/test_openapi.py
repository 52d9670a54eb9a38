"""The service's OpenAPI document: valid, served, and a superset of the course spec's slice."""

from __future__ import annotations

import json

import pytest
from openapi_spec_validator import validate

from proxy.openapi import document
from tests.support import COURSE_SPEC, Cluster

SLICE = [
    ("/login", "post"),
    ("/user/register", "post"),
    ("/user/get/{id}", "get"),
    ("/user/search", "get"),
    ("/dialog/{user_id}/send", "post"),
    ("/dialog/{user_id}/list", "get"),
]


def test_document_is_valid_openapi() -> None:
    """openapi-spec-validator accepts the document."""
    validate(document())


async def test_document_is_served(cluster: Cluster) -> None:
    """GET /openapi.json returns the document."""
    reply = await cluster.api.request("GET", "/openapi.json")
    assert reply.status == 200 and reply.json == document()


@pytest.mark.parametrize(("path", "method"), SLICE)
def test_superset_of_the_course_spec(path: str, method: str) -> None:
    """Each course operation of the slice exists with the same parameters and required body fields."""
    course = json.loads(COURSE_SPEC.read_text())["paths"][path][method]
    ours = document()["paths"][path][method]
    ours_params = {(p["name"], p["in"]) for p in ours.get("parameters", [])}
    for param in course.get("parameters", []):
        assert (param["name"], param["in"]) in ours_params
    if "requestBody" in course:
        course_schema = course["requestBody"]["content"]["application/json"]["schema"]
        our_schema = ours["requestBody"]["content"]["application/json"]["schema"]
        assert set(course_schema["properties"]) <= set(our_schema["properties"])
        assert set(course_schema.get("required", [])) <= set(our_schema.get("required", []))
    assert "200" in ours["responses"]
    if course.get("security"):
        assert ours.get("security") == course["security"]
