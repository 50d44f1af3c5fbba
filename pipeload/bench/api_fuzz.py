"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis): valid and invalid requests
to every endpoint, each answer checked against the document.

For every operation of GET /openapi.json, schemathesis generates requests that match the schema
(positive) and requests that break it (negative); each answer must not be a 5xx, must have a
documented status, content type, headers and body schema, an invalid request must be refused
(4xx), and an endpoint behind a key must refuse the request without it. Every request has a
timeout (a hang is a failure), and after the run no model's worker may have died or restarted.

    python -m pipeload.bench.api_fuzz --examples 300              # a server of its own, the tiny chat model
    pipeload bench api_fuzz --examples 300 --model chat.gguf
    python -m pipeload.bench.api_fuzz --url http://127.0.0.1:8080 --key KEY   # a running server

tests/test_server_fuzz.py runs the same with a few examples per operation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# What the server under fuzzing is started with: small limits, so generated requests stay cheap
# (a request of max_tokens 10^9 is refused, not served for minutes) and the limits get fuzzed too.
FUZZ_LIMITS = ["--max-tokens-cap", "4", "--max-n", "2", "--max-prompt-chars", "512", "--max-stop", "4",
               "--max-stop-chars", "16", "--max-request-bytes", "65536"]


@dataclass
class FuzzReport:
    """What a fuzzing run sent and found."""

    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    restarts: int = 0           # worker restarts seen in /health after the run
    models_loaded: bool = True  # every model that was loaded before is still loaded

    @property
    def ok(self) -> bool:
        return not self.failures and self.restarts == 0 and self.models_loaded

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"api fuzz: {self.requests} requests in {self.seconds:.0f} s ({codes}); {len(self.failures)} "
                f"failures; {self.restarts} worker restarts -> {'PASS' if self.ok else 'FAIL'}"
                + "".join(f"\n  {f}" for f in self.failures[:10]))


def _checks(negative: bool) -> list:
    from schemathesis import checks as c

    out = [c.not_a_server_error, c.status_code_conformance, c.content_type_conformance,
           c.response_schema_conformance, c.response_headers_conformance, c.ignored_auth]
    return out + ([c.negative_data_rejection] if negative else [])


def _health(url: str, headers: dict) -> dict:
    import httpx

    return httpx.get(url + "/health", headers=headers, timeout=30).json()


def fuzz_api(url: str, key: str | None = None, examples: int = 20, seed: int = 0, timeout: float = 30.0,
             operations: list[str] | None = None) -> FuzzReport:
    """Fuzz the server at `url` (its /openapi.json) with `examples` positive and `examples`
    negative requests per operation; returns the report (failures are collected, not raised)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    import httpx

    doc = httpx.get(url + "/openapi.json", timeout=30).json()
    # an invalid request may also be refused for its size (413) or with the key missing (401)
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422]}}})
    schema = schemathesis.openapi.from_dict(doc, config=config)
    before = _health(url, headers).get("models", {})
    report = FuzzReport()
    t0 = time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        if operations and label not in operations:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            checks = _checks(mode is GenerationMode.NEGATIVE)

            @settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
                      suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
            @given(case=op.as_strategy(generation_mode=mode))
            def one(case) -> None:
                response = case.call(base_url=url, headers=headers, timeout=timeout)
                report.requests += 1
                report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=checks, headers=headers)

            try:
                one()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                if mode is GenerationMode.POSITIVE:
                    report.failures.append(f"{label}: no valid request could be generated")
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - every check failure is a finding
                report.failures.append(f"{label} ({mode.value}): {type(e).__name__}: {str(e)[:1500]}")
    report.seconds = time.perf_counter() - t0
    after = _health(url, headers).get("models", {})
    report.restarts = sum(m.get("restarts", 0) for m in after.values())
    report.models_loaded = all(after.get(n, {}).get("state") == "loaded"
                               for n, m in before.items() if m.get("state") == "loaded")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `pipeload bench api_fuzz`."""
    p.add_argument("--url", default=None, help="fuzz this running server instead of starting one")
    p.add_argument("--key", default=None, help="its API key (default: $PIPELOAD_API_KEY)")
    p.add_argument("--model", default=None, help="model of the server started here (default: the built-in model)")
    p.add_argument("--examples", type=int, default=300, help="positive and negative examples per operation")
    p.add_argument("--seed", type=int, default=0, help="0: the same examples every run; else random")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--log", default=None, help="server log file")


def run(a: argparse.Namespace) -> int:
    """Run the fuzzer as `pipeload bench api_fuzz` was asked to; exit status 1 on any finding."""
    from .serving import running_server

    key = a.key or os.environ.get("PIPELOAD_API_KEY")
    if a.url:
        report = fuzz_api(a.url.rstrip("/"), key, a.examples, a.seed)
    else:
        from ..api import builtin_model_path

        key = key or "sk-fuzz-" + os.urandom(8).hex()
        path = a.model or str(builtin_model_path())
        with running_server([f"m={path}"], "--api-key", key, *FUZZ_LIMITS,
                            log=Path(a.log) if a.log else None, headers={"Authorization": f"Bearer {key}"}) as url:
            report = fuzz_api(url, key, a.examples, a.seed)
    print(report.summary())
    if a.json:
        Path(a.json).write_text(json.dumps({"requests": report.requests, "statuses": report.statuses,
                                            "failures": report.failures, "seconds": report.seconds,
                                            "restarts": report.restarts, "ok": report.ok}, indent=1))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeload.bench.api_fuzz", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
