"""Schemathesis: requests generated from the API's own OpenAPI schema, valid and invalid, sent to
the real api process (on the real emulator). No 5xx but a documented 503, nothing off-schema."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import negative_data_rejection
from schemathesis.generation import GenerationMode

from tests.integration.conftest import Secure

EXAMPLES_PER_OPERATION = 60
RUNS: dict[str, int] = {}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(secure: Secure, mode: GenerationMode):
    """Every generated request gets an answer the schema documents (status, body, type)."""
    schema = schemathesis.openapi.from_url(f"{secure.api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case):
            case.headers = {**(case.headers or {}), "Authorization": "Bearer key-main"}
            response = case.call(timeout=15)
            assert response.status_code < 500 or response.status_code == 503, response.text
            if mode is GenerationMode.NEGATIVE:
                # Its own rejection check does not count 413 (a batch over MAX_BATCH, which the
                # contract calls "too large"): check that invalid input is refused ourselves.
                case.validate_response(response, excluded_checks=[negative_data_rejection])
                assert 400 <= response.status_code < 500, (response.status_code, response.text)
            else:
                case.validate_response(response)
            RUNS[mode.value] = RUNS.get(mode.value, 0) + 1

        try:
            run()
        except Unsatisfiable:  # nothing invalid to send to an endpoint without inputs
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert RUNS[mode.value] >= EXAMPLES_PER_OPERATION


def test_every_status_the_api_gives_is_documented(secure: Secure):
    spec = httpx.get(f"{secure.api.url}/openapi.json").json()
    for path in ("/v1/channels/{channel}/messages", "/v1/messages"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"202", "401", "403", "413", "422", "429", "503"} <= set(responses)
