"""The service's own OpenAPI document (proxy/openapi.yaml), loaded once."""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import yaml


@functools.cache
def document() -> dict[str, Any]:
    return yaml.safe_load(importlib.resources.files("proxy").joinpath("openapi.yaml").read_text(encoding="utf-8"))
