"""The OpenAPI document is true: schemathesis fuzzes a real ``python -m service`` from its own
``/openapi.json`` with a valid key, derandomized and bounded, and finds no server error and no
response, status or content type the document does not describe.

``positive_data_acceptance``: a request the document admits must not get a 4xx other than those
that depend on state (401/403/404/409/429, schemathesis's default). The verify link is state too:
only mailed tokens exist, and the contract answers an unknown one with 400 (`Invalid or expired
token`), so 400 is expected there. A recording may also be sent as raw float32 bytes, which the
document can only call a binary string: a byte count that is not a multiple of 4 is schema-valid
and rightly refused, so 400 is expected on that route as well; so is a JSON recording whose
length some rate admits but not its own (the document states what some rate admits).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.service.conftest import service_with_key

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
CONFIG = """
[[operations]]
include-path = "/api/v1/api-keys/verify"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]

[[operations]]
include-path = "/api/v1/denoising/record"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "413", "429"]
"""
EXAMPLES = 20  # per operation: about 130 cases, derandomized


@pytest.mark.slow
def test_schemathesis_finds_no_disagreement(service_process, tmp_path):
    # Small batches: the document follows MAX_BATCH_WINDOWS, and each window generated costs time.
    # Limits off: the fuzzer sends many requests from one client with one key, by design.
    limits_off = {
        "MAIL_LIMIT_PER_EMAIL": "0",
        "MAIL_LIMIT_PER_CLIENT": "0",
        "KEY_REQUESTS_PER_MINUTE": "0",
        "DENOISE_RATE_PER_SECOND": "0",
    }
    service, key = service_with_key(service_process, tmp_path, {"MAX_BATCH_WINDOWS": "2", **limits_off})
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    report = tmp_path / "report.json"
    # A window near the largest accepted value, in input units: outputs beyond it must be described.
    # schemathesis is imported here: only the process that runs this test pays for it.
    import schemathesis
    from schemathesis.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    large = schema["/api/v1/denoising"]["POST"].Case(
        body={"ecg_signal": [9e99 * (-1) ** i for i in range(1300)]},
        query={"units": "input"},
        headers={"x-api-key": key},
    )
    large.call_and_validate(checks=[response_schema_conformance])

    run = subprocess.run(
        [
            *(sys.executable, "-m", "schemathesis.cli"),
            *("--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{service.url}/openapi.json"),
            *("--header", f"x-api-key:{key}", "--checks", f"{CHECKS},positive_data_acceptance"),
            *("--max-examples", str(EXAMPLES), "--generation-deterministic", "--no-color"),
            # The explicit examples and the fuzzing phase; the coverage phase's boundary cases
            # took most of the run's time (about 10 s more), and what it found once (a recording
            # shorter than the schema allowed) the schema's bounds now rule out.
            *("--phases", "examples,fuzzing"),
            # One worker: hypothesis parses lambdas with ast in each worker thread, and concurrent
            # ast.parse calls fail on Python 3.11 ("AST constructor recursion depth mismatch").
            *("--workers", "1"),
            *("--report", "json", "--report-json-path", str(report)),
        ],
        cwd=tmp_path,  # schemathesis keeps a .schemathesis folder in its working directory
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(report.read_text())
    print(
        f"schemathesis: {result['test_cases']['generated']} cases, {len(result['failures'])} failures, {result['running_time']:.1f} s"
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert result["failures"] == [] and result["errors"] == []
    assert result["operations"]["tested"] == result["operations"]["total"] > 0
