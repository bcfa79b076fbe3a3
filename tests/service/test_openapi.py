"""``/openapi.json`` describes exactly the routes and methods the app serves, and its email
pattern admits only addresses the service accepts."""

from __future__ import annotations

import math
import re

from falcon.inspect import inspect_routes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import validation
from service.app import create_app
from service.validation import EMAIL_PATTERN

from .conftest import issue_key


def served(app) -> dict[str, set[str]]:
    return {
        route.path: {m.method.lower() for m in route.methods if not m.internal and m.method != "OPTIONS"}
        for route in inspect_routes(app)
    }


def test_document_matches_the_routes(runtime, client):
    document = client.simulate_get("/openapi.json").json
    assert document["openapi"].startswith("3.1")
    described = {path: set(item) for path, item in document["paths"].items()}
    assert described == served(create_app(runtime.deps))


def test_every_operation_documents_its_responses(client):
    document = client.simulate_get("/openapi.json").json
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "200" in operation["responses"], (path, method)
            for response in operation["responses"].values():
                for media in response.get("content", {}).values():
                    ref = media["schema"].get("$ref")
                    if ref:
                        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref


def test_the_recording_bounds_admit_what_the_service_accepts(runtime, client):
    """They were inverted (2000 to 180000 samples): 2 s at 50 Hz and an hour at 1000 Hz are both
    served, and both must be documented as valid."""
    signal = client.simulate_get("/openapi.json").json["components"]["schemas"]["RecordRequest"]["properties"]
    bounds = signal["ecg_signal"]["minItems"], signal["ecg_signal"]["maxItems"]
    assert bounds == (100, int(runtime.deps.config.max_record_seconds * 1000))
    key = issue_key(runtime.store, "bounds@example.org")
    shortest = {"ecg_signal": [math.sin(i / 3) for i in range(100)], "sampling_rate": 50}
    result = client.simulate_post("/api/v1/denoising/record", json=shortest, headers={"x-api-key": key})
    assert result.status_code == 200


@settings(max_examples=120, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.from_regex(EMAIL_PATTERN, fullmatch=True))
def test_every_address_the_email_pattern_admits_is_accepted(address):
    assert len(address) <= 254
    assert validation.email({"email": address}) == address.lower()


def test_the_email_pattern_refuses_what_the_service_refuses():
    pattern = re.compile(EMAIL_PATTERN)
    for address in [
        "a@host.local",
        "a@x.test",
        "a@x.localhost",
        "a@x.onion",
        "a@1.2.3.4",
        "a@[1.2.3.4]",
        '"a b"@x.org',
    ]:
        assert not pattern.match(address), address
    for address in ["me@example.com", "first.last+tag@mail.example.org", "a@x.locals"]:
        assert pattern.match(address), address
