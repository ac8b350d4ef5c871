"""Security promises of the gateway (issue 13, item 4), on an in-process app over the real
exported ONNX model (no Triton needed for these; the bad-input suite runs the full stack).

- every /v1 route (walked from the app's routes and the OpenAPI document, which must agree)
  answers 401 without a key or with a wrong one when keys are configured; nothing else is open
  but the operations and docs routes;
- keys are compared with hmac.compare_digest against every configured key (no early exit);
- the per-key rate limit answers 429 with Retry-After and counts it; another key is unaffected;
- /metrics and /docs (+ /openapi.json, /redoc) exposure follow their settings;
- no log record carries a key or image data;
- the runtime (service/, client/, model_repository/) never unpickles or evaluates anything;
- responses name the model by name and content hash, never a host path;
- the OpenAPI document declares Bearer security only with keys, and documents each route's
  error codes with the ErrorResponse schema.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from starlette.routing import Route

from service.gateway import auth
from service.gateway.app import create_app
from service.gateway.onnx_backend import OnnxBackend
from service.gateway.provenance import load_provenance
from service.settings import Settings
from tests.conftest import REPO_ROOT, assert_error

KEYS = ["first-key-0123456789", "second-key-abcdefghij"]
PUBLIC = {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc"}
PUBLIC |= {"/openapi.json"}
SET_ID = "ps_" + "0" * 32
PROMPT = "three red triangles on a grass background"
CONTRASTIVE = ["two red triangles on a grass background"]


@pytest.fixture(scope="module")
def provenance(exported_repo) -> dict:
    return load_provenance(exported_repo)


@pytest.fixture(scope="module")
def backend(exported_repo) -> OnnxBackend:
    return OnnxBackend(exported_repo, intra_op_threads=1)


@contextmanager
def gateway(exported_repo, provenance, backend, **overrides):
    settings = Settings(tokenizer_file=str(exported_repo / "tokenizer.json"), **overrides)
    app = create_app(settings, backend, provenance)
    with TestClient(app) as client:
        yield client


def png_b64(colour=(200, 30, 30), size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _operations(client: TestClient) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, included routers walked (recursively)."""
    ops: set[tuple[str, str]] = set()

    def walk(routes, prefix: str) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included-router entry
            if inner is not None:
                walk(inner.routes, prefix + route.include_context.prefix)
            elif isinstance(route, APIRoute | Route):
                methods = route.methods or {"GET"}
                ops.update((m.lower(), prefix + route.path) for m in methods if m != "HEAD")
            else:
                raise AssertionError(f"a route kind the walk does not know: {route!r}")

    walk(client.app.routes, "")
    return ops


# -- auth on every /v1 route -----------------------------------------------------------------------
def test_every_v1_route_requires_a_key(exported_repo, provenance, backend):
    with gateway(exported_repo, provenance, backend, api_keys=KEYS) as client:
        ops = _operations(client)
        doc = client.get("/openapi.json").json()
        documented = {(m, p) for p, item in doc["paths"].items() for m in item}
        v1 = {(m, p) for m, p in ops if p.startswith("/v1/")}
        assert v1 and v1 == {(m, p) for m, p in documented if p.startswith("/v1/")}
        assert len(v1) >= 8, v1  # score, group, 5 prompt-set operations, models
        for method, path in ops - v1:
            assert path in PUBLIC, f"{method.upper()} {path} is outside /v1 and not an ops route"
        for method, path in sorted(v1):
            url = path.replace("{set_id}", SET_ID)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):
                r = client.request(method, url, headers=headers, json={})
                assert_error(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
            ok = client.request(
                method, url, headers={"Authorization": f"Bearer {KEYS[1]}"}, json={}
            )
            assert ok.status_code != 401, (method, path, ok.text)
        # Paths that only look like /v1 never reach a route (and so never bypass the check).
        for odd in ("/V1/models", "//v1/models", "/v1//models", "/v1/models/../models"):
            assert client.get(odd).status_code in (401, 404), odd
        assert client.get("/healthz").status_code == 200  # operations stay open
        auth_ok = {"Authorization": f"Bearer {KEYS[0]}"}
        for path, allow in (("/v1/prompt-sets", "GET, POST"), ("/v1/score", "POST")):
            r = client.request("PUT", path, headers=auth_ok)  # Allow: every method of the path
            assert_error(r, 405, "method_not_allowed")
            assert r.headers["allow"] == allow, (path, r.headers)
        r = client.request("PATCH", f"/v1/prompt-sets/{SET_ID}", headers=auth_ok)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = auth.configured_keys(KEYS + ["third-key"])
    assert auth.key_matches(KEYS[0], keys) is True
    assert len(calls) == 3  # no early exit at the first match
    calls.clear()
    assert auth.key_matches("nope", keys) is False and len(calls) == 3
    assert auth.key_matches(None, keys) is False


# -- per-key rate limit ----------------------------------------------------------------------------
def test_per_key_rate_limit_answers_429_with_retry_after(exported_repo, provenance, backend):
    settings = {"api_keys": KEYS, "rate_limit_per_key_rps": 0.5, "rate_limit_burst": 2}
    with gateway(exported_repo, provenance, backend, **settings) as client:
        first = {"Authorization": f"Bearer {KEYS[0]}"}
        assert [client.get("/v1/models", headers=first).status_code for _ in range(2)] == [200] * 2
        r = client.get("/v1/models", headers=first)
        body = assert_error(r, 429, "rate_limited", limit=0.5)
        assert int(r.headers["retry-after"]) >= 1 and KEYS[0] not in r.text
        assert body["error"]["field"] == "Authorization"
        second = {"Authorization": f"Bearer {KEYS[1]}"}
        assert client.get("/v1/models", headers=second).status_code == 200  # its own bucket
        assert client.get("/healthz").status_code == 200  # never limited
        assert client.get("/v1/models").status_code == 401  # auth first: no bucket to drain
        metrics = client.get("/metrics").text
        assert "reward_gateway_rate_limited_total 1.0" in metrics
        assert 'endpoint="/v1/models",method="GET",status="429"' in metrics


# -- exposure settings -----------------------------------------------------------------------------
def test_metrics_and_docs_exposure_follow_the_settings(exported_repo, provenance, backend):
    with gateway(exported_repo, provenance, backend) as client:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 200, path
    closed = {"expose_metrics": False, "expose_docs": False}
    with gateway(exported_repo, provenance, backend, **closed) as client:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert_error(client.get(path), 404, "not_found")
        assert client.get("/healthz").status_code == 200
        assert client.app.openapi()["paths"], "the document still exists for tools, unserved"


# -- logs ------------------------------------------------------------------------------------------
def test_logs_never_carry_keys_or_image_data(exported_repo, provenance, backend, caplog):
    image = png_b64((10, 200, 90))
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300).decode()
    caplog.set_level(logging.DEBUG)
    with gateway(exported_repo, provenance, backend, api_keys=KEYS) as client:
        good = {"Authorization": f"Bearer {KEYS[0]}"}
        item = {"image": image, "prompt": PROMPT, "contrastive": CONTRASTIVE}
        assert client.post("/v1/score", json={"items": [item]}, headers=good).status_code == 200
        bad = {"items": [{**item, "image": corrupt}]}
        assert client.post("/v1/score", json=bad, headers=good).status_code == 422
        wrong = {"Authorization": f"Bearer {KEYS[1]}x"}
        assert client.post("/v1/score", json={"items": [item]}, headers=wrong).status_code == 401
        typed = {"items": [{**item, "prompt": 7}]}
        assert client.post("/v1/score", json=typed, headers=good).status_code == 422
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records, "nothing was logged at all: the check would be empty"
    for secret in (*KEYS, f"{KEYS[1]}x", image[:40], image[-40:], corrupt[:40]):
        assert secret not in text, f"a log record carries {secret[:12]}…"


# -- no unsafe deserialisation in the runtime ------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "torch.load",
    "pandas.read_pickle",
    "pd.read_pickle",
    "numpy.load",
    "np.load",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_uses(path: Path) -> list[str]:
    """Imports of pickle-like modules, eval/exec/compile/__import__ calls, yaml.load,
    torch.load, np.load (any: allow_pickle may come from a variable) in one Python file."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "compile", "__import__") or name in UNSAFE_CALLS:
                found.append(f"{path}:{node.lineno}: {name}(")
            continue
        else:
            continue
        found += [f"{path}:{node.lineno}: import {n}" for n in names if n in UNSAFE_MODULES]
    return found


def test_runtime_never_unpickles_or_evaluates():
    files = [
        p
        for folder in ("service", "client", "model_repository")
        for p in (REPO_ROOT / folder).rglob("*.py")
        if ".egg-info" not in str(p) and "build" not in p.relative_to(REPO_ROOT).parts
    ]
    assert len(files) > 30, files  # the walk really covers the runtime
    problems = [problem for f in files for problem in unsafe_uses(f)]
    assert not problems, "\n".join(problems)
    # A plain-text pass too, for what the AST cannot see (strings handed to a shell, configs).
    pattern = re.compile(r"allow_pickle\s*=\s*True|yaml\.load\(|pickle\.loads?\(")
    for f in files + list((REPO_ROOT / "model_repository").rglob("*.pbtxt")):
        assert not pattern.search(f.read_text(encoding="utf-8")), f


def test_the_unsafe_use_check_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import pickle\nfrom yaml import load\nimport numpy as np\nx = eval('1')\n"
        "np.load('a.npy', allow_pickle=True)\nimport yaml\nyaml.load(s)\nexec('y=1')\n"
    )
    found = unsafe_uses(sample)
    assert len(found) == 5, found  # pickle, eval, np.load, yaml.load, exec
    assert not unsafe_uses(_write(tmp_path / "ok.py", "request.exec()\nyaml.safe_load(s)\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- provenance without host paths -----------------------------------------------------------------
def test_responses_name_models_without_host_paths(exported_repo, provenance, backend):
    with gateway(exported_repo, provenance, backend) as client:
        item = {"image": png_b64(), "prompt": PROMPT, "contrastive": CONTRASTIVE}
        scored = client.post("/v1/score", json={"items": [item]})
        models = client.get("/v1/models")
    assert scored.status_code == 200 and models.status_code == 200, scored.text
    block = scored.json()["provenance"]
    assert block["model"]["source"] == block["model"]["name"] == "shapes-clip"
    assert len(block["model"]["checkpoint_sha256"]) == 64
    assert (
        block["tokenizer"]["file"] == "tokenizer.json" and len(block["tokenizer"]["sha256"]) == 64
    )
    assert models.json()["models"][0]["source"] == "shapes-clip"
    for text in (scored.text, models.text):
        for leak in (str(REPO_ROOT), str(exported_repo), str(Path.home()), "/tmp/"):
            assert leak not in text, f"a response names the host path {leak}"
    # provenance.json keeps the exporter's path for the torch-side tools, plus the public name.
    assert provenance["model"]["name"] == "shapes-clip"


# -- the OpenAPI document --------------------------------------------------------------------------
def _error_codes(op: dict) -> dict[str, dict]:
    return {c: r for c, r in op["responses"].items() if c[0] in "45"}


def test_openapi_declares_security_only_with_keys(exported_repo, provenance, backend):
    with gateway(exported_repo, provenance, backend) as client:
        open_doc = client.get("/openapi.json").json()
    with gateway(exported_repo, provenance, backend, api_keys=KEYS) as client:
        keyed = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_doc.get("components", {})
    assert "HTTPBearer" in keyed["components"]["securitySchemes"]
    for path, item in open_doc["paths"].items():
        for method, op in item.items():
            assert "security" not in op and "401" not in op["responses"], (method, path)
            keyed_op = keyed["paths"][path][method]
            if path.startswith("/v1/"):
                assert keyed_op["security"] == [{"HTTPBearer": []}], (method, path)
                assert "401" in keyed_op["responses"]
            else:
                assert "security" not in keyed_op and "401" not in keyed_op["responses"]


def test_openapi_documents_every_error_with_the_error_schema(exported_repo, provenance, backend):
    with gateway(exported_repo, provenance, backend, api_keys=KEYS) as client:
        doc = client.get("/openapi.json").json()
    ref = "#/components/schemas/ErrorResponse"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    score = doc["paths"]["/v1/score"]["post"]
    assert {"400", "401", "409", "413", "415", "422", "429", "502", "503", "504"} <= set(
        _error_codes(score)
    )
    assert {"404", "401"} <= set(_error_codes(doc["paths"]["/v1/prompt-sets/{set_id}"]["get"]))
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for code, response in _error_codes(op).items():
                if (path, code) == ("/readyz", "503"):
                    continue  # the Readiness body, with the reason
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ref}, (method, path, code)
            for code in ("429", "503"):
                if code in op["responses"] and path != "/readyz":
                    assert "Retry-After" in op["responses"][code]["headers"]
    item_props = doc["components"]["schemas"]["ScoreItem"]["properties"]
    assert item_props["prompt"]["maxLength"] == Settings().max_prompt_chars
    assert doc["components"]["schemas"]["ScoreRequest"]["properties"]["items"]["maxItems"] == (
        Settings().max_items_per_request
    )
    json.dumps(doc)  # serialisable as served


@pytest.mark.parametrize(
    "value, keys",
    [
        ("sk-live-1", ["sk-live-1"]),  # one bare key
        ('"sk-live-1"', ["sk-live-1"]),  # one key, as JSON
        ('["sk-live-1", "sk-live-2"]', ["sk-live-1", "sk-live-2"]),
        ("", []),
        ('{"trainer": "sk-live-1"}', None),  # an object: refused
        ('["sk-live-1", 2]', None),
        ('["sk-live-1"', None),  # broken JSON
        ("sk-live-1,sk-live-2", None),  # not one key: a list goes in JSON
    ],
)
def test_api_keys_from_the_environment_and_errors_that_never_quote_them(monkeypatch, value, keys):
    # A malformed REWARD_API_KEYS printed the key in the settings error (pydantic's
    # input_value), which a crash-looping pod keeps in its logs.
    from pydantic import ValidationError

    monkeypatch.setenv("REWARD_API_KEYS", value)
    if keys is not None:
        assert [k.get_secret_value() for k in Settings().api_keys] == keys
        return
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "api_keys" in str(info.value) and "sk-live" not in str(info.value)


def test_a_misspelt_or_client_side_variable_is_named_at_start(monkeypatch, caplog):
    from service.launcher import warn_ignored_env
    from service.settings import unknown_env

    environ = {"REWARD_API_KEYZ": "k", "REWARD_PORT": "1", "REWARD_URL": "u", "HOME": "/"}
    assert unknown_env(environ) == ["REWARD_API_KEYZ"]
    monkeypatch.setenv("REWARD_API_KEY", "sk-live-1")  # the client's variable, on the server
    monkeypatch.setenv("REWARD_MAX_ITEMS", "8")  # not a setting: max_items_per_request is
    with caplog.at_level(logging.WARNING, logger="service.launcher"):
        warn_ignored_env(Settings())
    text = caplog.text
    assert "REWARD_MAX_ITEMS is not a setting" in text and "REWARD_API_KEYS" in text
    assert "sk-live" not in text
