"""Every row of API-CONTRACT.md, through the real app (real model, SQLite, SMTP server)."""

from __future__ import annotations

import dataclasses
import json

import falcon.testing
import numpy as np
import pytest

from service.app import create_app
from service.batcher import Batcher
from service.messages import LINK_TTL
from service.runtime import Runtime
from service.store import OutboxMail, utcnow
from service.validation import MAX_ABS

from .conftest import SHIPPED_VERSION, issue_key, key_in, obtain_key, smtp_config, verify_link

EXPECTED_FORMAT = {"ecg_signal": "array of 1300 float values (10 seconds @ 130Hz)"}
DENOISE = "/api/v1/denoising"


def window(seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    t = np.arange(1300) / 130
    return (np.sin(2 * np.pi * 1.2 * t) + 0.2 * rng.standard_normal(1300)).tolist()


@pytest.fixture
def key(runtime) -> str:
    return issue_key(runtime.store, "owner@example.org")


def queued_mails(runtime) -> int:
    with runtime.store.db.connection_context():
        return OutboxMail.select().count()


def post_raw(client, key: str, body: str | bytes, content_type: str = "application/json"):
    return client.simulate_post(DENOISE, body=body, headers={"x-api-key": key, "Content-Type": content_type})


# -- POST /api/v1/denoising ----------------------------------------------------------------------
def test_missing_api_key_header(client):
    result = client.simulate_post(DENOISE, json={"ecg_signal": window()})
    assert result.status_code == 401
    assert result.json == {"error": "Missing x-api-key header"}


@pytest.mark.parametrize("header", ["not-a-key", "x" * 43])
def test_unknown_key(client, header):
    result = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": header})
    assert result.status_code == 401
    assert result.json == {"error": "Invalid or inactive API key"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"[1, 2]",
        b"null",
        b"{}",
        b'{"ecg": []}',
        b'{"ecg_signal": null}',
    ],
)
def test_body_missing_not_json_or_without_field(client, key, body):
    result = post_raw(client, key, body)
    assert result.status_code == 400
    assert result.json == {"error": "Missing required field: ecg_signal", "expected_format": EXPECTED_FORMAT}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_body_that_is_not_declared_json(client, key, content_type):
    result = post_raw(client, key, json.dumps({"ecg_signal": window()}), content_type=content_type)
    assert result.status_code == 400
    assert result.json == {"error": "Missing required field: ecg_signal", "expected_format": EXPECTED_FORMAT}


def test_form_body_is_not_json(client, key):
    """Falcon parses forms by default; the contract knows JSON bodies only."""
    result = post_raw(client, key, "ecg_signal=1&ecg_signal=2", content_type="application/x-www-form-urlencoded")
    assert result.status_code == 400
    assert result.json["error"] == "Missing required field: ecg_signal"


@pytest.mark.parametrize(
    "content_type", ["APPLICATION/JSON", "Application/Json; Charset=UTF-8", "application/vnd.heartify+json"]
)
def test_media_type_is_case_insensitive(client, key, content_type):
    result = post_raw(client, key, json.dumps({"ecg_signal": window()}), content_type=content_type)
    assert result.status_code == 200


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_bodies_in_the_encodings_the_old_service_read(client, key, encoding):
    """The old Flask service parsed bytes with ``json.loads``, which takes a UTF-8 byte order
    mark and UTF-16 or UTF-32 (with or without theirs) as well as UTF-8."""
    result = post_raw(client, key, json.dumps({"ecg_signal": window()}).encode(encoding))
    assert result.status_code == 200 and len(result.json["denoised_signal"]) == 1300


@pytest.mark.parametrize(
    "text, status",
    [
        (b'"\xed\xa0\x80"', 200),  # a lone surrogate, as UTF-8 bytes: json.loads let it pass
        (b'"\\ud800"', 200),  # the same, escaped
        (b'"\xff"', 400),  # not UTF-8: not JSON
    ],
)
def test_bodies_the_old_service_took_or_refused_for_their_text(client, key, text, status):
    """UTF-8 bodies are parsed as they came, without a decoded copy: what the old service's
    ``json.loads`` took or refused must stay so (orjson alone refuses lone surrogates)."""
    body = b'{"note": %s, "ecg_signal": %s}' % (text, json.dumps(window()).encode())
    result = post_raw(client, key, body)
    assert result.status_code == status
    if status == 400:
        assert result.json["error"] == "Missing required field: ecg_signal"


@pytest.mark.parametrize("value", ["1,2,3", 5, {"a": 1}, True])
def test_signal_not_an_array(client, key, value):
    result = client.simulate_post(DENOISE, json={"ecg_signal": value}, headers={"x-api-key": key})
    assert result.status_code == 400
    assert result.json == {"error": "ecg_signal must be an array"}


@pytest.mark.parametrize("length", [0, 1, 1299, 1301, 2600])
def test_wrong_length(client, key, length):
    result = client.simulate_post(DENOISE, json={"ecg_signal": [0.0] * length}, headers={"x-api-key": key})
    assert result.status_code == 400
    assert result.json["error"] == f"ecg_signal must have exactly 1300 values (got {length})"
    assert result.json["note"]


@pytest.mark.parametrize(
    "literal, index, got",
    [
        ('"7"', 3, "a string"),
        ("null", 0, "null"),
        ("true", 1299, "a boolean"),
        ("false", 5, "a boolean"),
        ("NaN", 17, "NaN"),
        ("Infinity", 2, "Infinity"),
        ("-Infinity", 2, "-Infinity"),
        ("1e400", 9, "Infinity"),
        ("[1]", 4, "an array"),
        ('{"v": 1}', 4, "an object"),
    ],
)
def test_element_not_a_finite_number_names_first_bad_index(client, key, literal, index, got):
    values = ["0.5"] * 1300
    values[index] = literal
    if index < 1299:
        values[1299] = '"later"'  # a later bad element must not be the one named
    result = post_raw(client, key, '{"ecg_signal": [' + ",".join(values) + "]}")
    assert result.status_code == 400
    assert result.json == {"error": f"ecg_signal[{index}] must be a finite number (got {got})"}


def test_values_at_the_magnitude_limit_are_served(client, key):
    """Their sum of squares exceeds MAX_ABS², so the one-pass check cannot settle them: the exact one does."""
    values = [MAX_ABS * (1 if i % 2 else -1) for i in range(1300)]
    result = client.simulate_post(
        DENOISE, json={"ecg_signal": values}, headers={"x-api-key": key}, params={"units": "input"}
    )
    assert result.status_code == 200
    assert np.isfinite(result.json["denoised_signal"]).all()


@pytest.mark.parametrize("digits", [401, 5001])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integers_of_any_length_get_the_magnitude_400(client, key, digits, sign):
    """Beyond 4300 digits Python refuses to convert an integer (a guard against quadratic time):
    such a value is still named as too large, not taken for a body that is not JSON."""
    values = ["0.5"] * 1300
    values[6] = sign + "9" * digits
    result = post_raw(client, key, '{"ecg_signal": [' + ",".join(values) + "]}")
    assert result.status_code == 400
    assert result.json == {"error": f"ecg_signal[6] must be a finite number of magnitude at most {MAX_ABS:g}"}


def test_huge_values_refused_instead_of_overflowing(client, key):
    values = window()
    values[11] = 1e300
    result = client.simulate_post(DENOISE, json={"ecg_signal": values}, headers={"x-api-key": key})
    assert result.status_code == 400
    assert result.json["error"].startswith("ecg_signal[11] must be a finite number of magnitude at most")


def test_model_not_loaded(runtime, engine, key):
    closed = Batcher(engine, 8, 0.0)
    closed.close()
    client = falcon.testing.TestClient(create_app(dataclasses.replace(runtime.deps, batcher=closed)))
    result = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key})
    assert result.status_code == 503
    assert result.json == {"error": "Model not loaded"}


def test_success(client, key, runtime):
    result = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key})
    assert result.status_code == 200
    assert set(result.json) == {"modelVersion", "denoised_signal"}
    assert result.json["modelVersion"] == runtime.deps.model_version == SHIPPED_VERSION
    signal = result.json["denoised_signal"]
    assert len(signal) == 1300 and all(isinstance(v, float) for v in signal)


def test_model_version_from_environment(runtime, key):
    deps = dataclasses.replace(runtime.deps, model_version=7)
    result = falcon.testing.TestClient(create_app(deps)).simulate_post(
        DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key}
    )
    assert result.json["modelVersion"] == 7


def test_constant_window_is_served(client, key):
    """σ = 0 counts as 1, as before: a flat line is valid input, not a division by zero."""
    result = client.simulate_post(DENOISE, json={"ecg_signal": [3] * 1300}, headers={"x-api-key": key})
    assert result.status_code == 200
    assert np.isfinite(result.json["denoised_signal"]).all()


# -- POST /api/v1/api-keys/generation and /deactivation ------------------------------------------
@pytest.mark.parametrize("path", ["/api/v1/api-keys/generation", "/api/v1/api-keys/deactivation"])
@pytest.mark.parametrize("body", [{}, {"email": ""}, {"email": "   "}, {"email": None}, {"mail": "a@b.c"}])
def test_email_missing(client, path, body):
    result = client.simulate_post(path, json=body)
    assert result.status_code == 400
    assert result.json == {"error": "Missing required field: email"}


@pytest.mark.parametrize("path", ["/api/v1/api-keys/generation", "/api/v1/api-keys/deactivation"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_email_body_not_json(client, runtime, path, content_type):
    result = client.simulate_post(path, body="email=a@b.c", headers={"Content-Type": content_type})
    assert result.status_code == 400
    assert result.json == {"error": "Missing required field: email"}
    assert queued_mails(runtime) == 0


@pytest.mark.parametrize("path", ["/api/v1/api-keys/generation", "/api/v1/api-keys/deactivation"])
@pytest.mark.parametrize(
    "address",
    [
        "nobody",
        "no-at.example.org",
        "no-dot@example",
        42,
        "a@b.c\r\nBcc: x@y.z",
        # "@" and "." present, yet no mail could ever be sent, or it would go to several mailboxes
        "john.doe@",
        ".@",
        "a.@example.org",
        "x@y.",
        "a@b@c.d",
        "a@b.c,d@e.f",
        "<a@b.c>",
        '"x"@b.c',
        "x" * 65 + "@example.org",
        "owner@localhost",
        "jürgen@example.com",
        "me@bücher.de",
        # mail software decodes these encoded words to another mailbox, "victim@example.com"
        "=?utf-8?q?victim?=@example.com",
        "=?utf-8?b?dmljdGlt?=@example.com",
        "=?a" * 5000 + "@example.com",  # too long: refused before any pattern runs on it
    ],
)
def test_email_invalid(client, runtime, path, address):
    result = client.simulate_post(path, json={"email": address})
    assert result.status_code == 400
    assert result.json["error"] == "Invalid email format"
    assert set(result.json) <= {"error", "reason"}
    assert queued_mails(runtime) == 0


@pytest.mark.parametrize(
    "address", ["first.last+tag@mail.example.co.uk", "o'brien@example.ie", "a@b.c", "a!#$%&'*+/=?^_`{|}~@example.com"]
)
def test_email_unusual_but_valid(client, address):
    result = client.simulate_post("/api/v1/api-keys/generation", json={"email": address})
    assert result.status_code == 200
    assert result.json["email"] == address


def test_generation_trims_lowercases_and_mails_a_link(client, smtp):
    result = client.simulate_post("/api/v1/api-keys/generation", json={"email": "  Someone@Example.ORG "})
    assert result.status_code == 200
    assert result.json == {
        "message": "Verification email sent. Please check your inbox.",
        "email": "someone@example.org",
    }
    mail = smtp.mailbox.wait_for(1)[0]
    assert mail["To"] == "someone@example.org"
    assert verify_link(mail).startswith("http://testserver/api/v1/api-keys/verify?token=")
    assert mail.get_body(("html",)) is not None


def test_generation_when_a_key_is_active(client, smtp, key):
    result = client.simulate_post("/api/v1/api-keys/generation", json={"email": "OWNER@example.org"})
    assert result.status_code == 409
    assert result.json == {"error": "Email already has an active API key. Please deactivate it first."}


def test_deactivation_without_active_key(client):
    result = client.simulate_post("/api/v1/api-keys/deactivation", json={"email": "nobody@example.org"})
    assert result.status_code == 404
    assert result.json == {"error": "No active API key found for this email"}


def test_deactivation_mails_a_link_then_key_is_refused(client, smtp, key):
    served = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key})
    assert served.status_code == 200  # and the key is now in the service's cache of active keys
    result = client.simulate_post("/api/v1/api-keys/deactivation", json={"email": "owner@example.org"})
    assert result.status_code == 200
    assert result.json == {"message": "Verification email sent. Please check your inbox.", "email": "owner@example.org"}
    link = verify_link(smtp.mailbox.wait_for(1)[-1])
    page = client.simulate_get(link.replace("http://testserver", ""))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "deactivated" in page.text
    assert "deactivated" in smtp.mailbox.wait_for(2)[-1]["Subject"]
    refused = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key})
    assert refused.status_code == 401
    assert refused.json == {"error": "Invalid or inactive API key"}


def test_a_deactivation_link_dies_with_the_key_it_was_for(client, smtp, key):
    """Two deactivation links for one key: the first deactivates it; the second, followed after a
    new key was issued, must not deactivate the new one."""
    for _ in range(2):
        client.simulate_post("/api/v1/api-keys/deactivation", json={"email": "owner@example.org"})
    first, second = (verify_link(m).replace("http://testserver", "") for m in smtp.mailbox.wait_for(2))
    assert client.simulate_get(first).status_code == 200
    smtp.mailbox.wait_for(3)  # the confirmation
    new_key = obtain_key(client, smtp, "owner@example.org")
    stale = client.simulate_get(second)
    assert stale.status_code == 400
    assert stale.json == {"error": "Invalid or expired token"}
    served = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": new_key})
    assert served.status_code == 200


# -- GET /api/v1/api-keys/verify -----------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "token=", "other=1"])
def test_verify_without_token(client, query):
    result = client.simulate_get("/api/v1/api-keys/verify", query_string=query)
    assert result.status_code == 400
    assert result.json == {"error": "Invalid verification link"}


def test_a_link_with_two_tokens_is_invalid_whichever_is_real(client, smtp):
    client.simulate_post("/api/v1/api-keys/generation", json={"email": "twice@example.org"})
    token = verify_link(smtp.mailbox.wait_for(1)[0]).split("token=")[1]
    for query in (f"token=made-up&token={token}", f"token={token}&token=made-up"):
        result = client.simulate_get("/api/v1/api-keys/verify", query_string=query)
        assert result.status_code == 400 and result.json == {"error": "Invalid verification link"}
    same = client.simulate_get("/api/v1/api-keys/verify", query_string=f"token={token}&token={token}")
    assert same.status_code == 200  # the same one twice is still the link that was sent


def test_verify_unknown_token(client):
    result = client.simulate_get("/api/v1/api-keys/verify", params={"token": "made-up"})
    assert result.status_code == 400
    assert result.json == {"error": "Invalid or expired token"}


def test_verify_used_token(client, smtp):
    client.simulate_post("/api/v1/api-keys/generation", json={"email": "twice@example.org"})
    path = verify_link(smtp.mailbox.wait_for(1)[0]).replace("http://testserver", "")
    first = client.simulate_get(path)
    assert first.status_code == 200 and "Email verified" in first.text
    second = client.simulate_get(path)
    assert second.status_code == 400
    assert second.json == {"error": "Invalid or expired token"}
    assert len(smtp.mailbox.wait_for(2)) == 2  # one key only


def test_verify_expired_token(tmp_path, engine, smtp, sqlite_url):
    now = [utcnow()]  # the runtime's clock, which every collaborator reads
    with Runtime(smtp_config(tmp_path, sqlite_url, smtp), engine=engine, clock=lambda: now[0]) as runtime:
        client = falcon.testing.TestClient(create_app(runtime.deps))
        client.simulate_post("/api/v1/api-keys/generation", json={"email": "late@example.org"})
        path = verify_link(smtp.mailbox.wait_for(1)[0]).replace("http://testserver", "")
        now[0] += LINK_TTL
        result = client.simulate_get(path)
    assert result.status_code == 400
    assert result.json == {"error": "Token has expired"}


def test_a_generation_link_dies_when_another_one_issues_the_key(client, smtp):
    """Two generation links requested before either is used: the second one followed issues the
    key and spends the first, so a mail scanner that follows the first later cannot replace it."""
    for _ in range(2):
        client.simulate_post("/api/v1/api-keys/generation", json={"email": "rotate@example.org"})
    first_link, second_link = (verify_link(m).replace("http://testserver", "") for m in smtp.mailbox.wait_for(2))
    assert client.simulate_get(second_link).status_code == 200
    key = key_in(smtp.mailbox.wait_for(3)[-1])
    stale = client.simulate_get(first_link)
    assert stale.status_code == 400
    assert stale.json == {"error": "Invalid or expired token"}
    assert client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key}).status_code == 200
    assert len(smtp.mailbox.messages) == 3  # no second key was mailed


def test_a_new_generation_replaces_the_key_of_its_email(client, smtp, key):
    """A key can be replaced: deactivate it by mail, then a new generation issues another."""
    client.simulate_post("/api/v1/api-keys/deactivation", json={"email": "owner@example.org"})
    assert (
        client.simulate_get(verify_link(smtp.mailbox.wait_for(1)[0]).replace("http://testserver", "")).status_code
        == 200
    )
    smtp.mailbox.wait_for(2)  # the confirmation
    new_key = obtain_key(client, smtp, "owner@example.org")
    assert new_key != key
    old = client.simulate_post(DENOISE, json={"ecg_signal": window()}, headers={"x-api-key": key})
    assert old.status_code == 401


# -- anything else -------------------------------------------------------------------------------
def test_unknown_route_and_method_answer_json(client):
    missing = client.simulate_get("/nothing/here")
    assert missing.status_code == 404 and "error" in missing.json
    wrong = client.simulate_get(DENOISE)
    assert wrong.status_code == 405 and "error" in wrong.json


def test_oversized_body(client, key, runtime):
    limit = runtime.deps.config.max_body_bytes
    result = post_raw(client, key, b" " * (limit + 1))
    assert result.status_code == 413
    assert result.json == {"error": f"Request body too large (limit {limit} bytes)"}
