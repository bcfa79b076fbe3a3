"""``/openapi.json`` describes exactly the routes and methods the app serves."""

from __future__ import annotations

from falcon.inspect import inspect_routes

from service.app import create_app


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
