"""Helm's own Go SDK (helm-python), run in a child process so the test process never loads it.

helm-python loads Helm's Go library into whatever process imports it (at import time), and the
Go runtime then installs its signal handlers there and adds SA_ONSTACK to the ones already
installed. In pytest's process, beside the ONNX Runtime, torch and gRPC threads of the other
tests, a full fresh-clone `make test` died of SIGSEGV with no Python traceback (faulthandler
printed nothing), during the Helm tests (2026-12-06). The cause is not proven, but a Go runtime
sharing signal handling with everything else is the one component of the suite that can do
that. So the chart tests talk to the real SDK through this module: one child process imports
helm-python and answers render / lint / schema / values requests as JSON lines on its own pipe
(fd 1 of the child goes to stderr, so nothing the library prints can corrupt an answer).

The child stays up for every call (the Go library loads once) and is stopped by :func:`close`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


class HelmError(Exception):
    """A helm-python error raised in the child: `kind` is its class name there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class HelmValuesError(HelmError):
    """Values that fail the chart's values.schema.json (helm-python's HelmValuesError)."""


class HelmRenderError(HelmError):
    """A template's `fail` or a render error (helm-python's HelmRenderError)."""


_ERRORS: dict[str, type[HelmError]] = {
    "HelmValuesError": HelmValuesError,
    "HelmRenderError": HelmRenderError,
}


class _Child:
    """The child process and its request/answer pipe (one request at a time)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lock = threading.Lock()

    def call(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        with self.lock:
            self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(timeout=10)
            raise RuntimeError(f"the helm-python child exited ({code}) during {op!r}")
        answer = json.loads(line)
        if "error" in answer:
            kind, message = answer["error"]
            raise _ERRORS.get(kind, HelmError)(kind, message)
        return answer["ok"]

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the child's loop ends at end of input
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


_child: _Child | None = None


def _call(op: str, **args: Any) -> Any:
    global _child
    if _child is None or _child.process.poll() is not None:
        _child = _Child()
    return _child.call(op, **args)


def close() -> None:
    """Stop the child process, if one runs (the next call starts a new one)."""
    global _child
    if _child is not None:
        _child.close()
        _child = None


def render(chart: Path, values: dict[str, Any], *, name: str, namespace: str) -> dict[str, str]:
    """`helm template`: {template path: rendered text}."""
    return _call("render", chart=str(chart), values=values, name=name, namespace=namespace)


def lint(chart: Path, values: dict[str, Any], *, strict: bool, kube_version: str) -> dict:
    """`helm lint`'s report: {"errors": [...], "messages": [{"severity", "error", ...}]}."""
    return _call("lint", chart=str(chart), values=values, strict=strict, kube_version=kube_version)


def schema(chart: Path) -> dict[str, Any] | None:
    """The chart's values.schema.json as Helm loads it (None without one)."""
    return _call("schema", chart=str(chart))


def values_from_yaml(text: str) -> dict[str, Any]:
    """A values document parsed as Helm parses `-f FILE`."""
    return _call("values_from_yaml", text=text)


def _serve() -> None:
    """The child: answer one JSON request per input line until the input ends."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the library prints goes to stderr, not into an answer
    import helm_python as helm

    def handle(request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "render":
            with helm.Chart.load(request["chart"]) as chart:
                return chart.render(
                    request["values"], name=request["name"], namespace=request["namespace"]
                )
        if op == "lint":
            return helm.lint(
                request["chart"],
                request["values"],
                strict=request["strict"],
                kube_version=request["kube_version"],
            )
        if op == "schema":
            with helm.Chart.load(request["chart"]) as chart:
                return chart.schema
        if op == "values_from_yaml":
            return helm.values_from_yaml(request["text"])
        raise ValueError(f"unknown op {op!r}")

    for line in sys.stdin:
        try:
            answer = {"ok": handle(json.loads(line))}
        except Exception as err:  # a helm error, or a bad request: answered, the child lives on
            answer = {"error": [type(err).__name__, str(err)]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
