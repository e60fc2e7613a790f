"""Schemathesis checks shared by the unit (ASGI) and integration (live server) schema runs."""

from __future__ import annotations


def conformance_checks() -> list:
    """Schemathesis' checks that a response is one /openapi.json documents (status, content
    type, body schema, required headers) and not a 5xx."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
            response_headers_conformance]
