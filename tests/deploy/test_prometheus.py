"""The shipped Prometheus config and Grafana dashboard work against a real server and a real Prometheus.

Prometheus scrapes a `tokenmill serve` with the tiny model (a copy of docker/prometheus/prometheus.yml with the target
rewritten), and every PromQL expression of docker/grafana/tokenmill.json must parse and return data.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.server_harness import REPO, Server, free_port, model_entry, start_server, wait_until, write_registry

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "tokenmill.json"
MODEL = "tiny"
REQUESTS = 20
DEADLINE = 60.0  # seconds any wait below may take
RATE_INTERVAL = "1m"  # what Grafana would put for $__rate_interval; spans every sample of this short test

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the prometheus and promtool binaries are missing (apt-get install -y prometheus; .ci/run installs it)",
)


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body: dict[str, Any] = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def substitute(expr: str) -> str:
    """Replace the dashboard's variables as Grafana would for the tiny model."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    expr = re.sub(r"\$\{model_name(?::\w+)?\}|\$model_name", MODEL, expr)
    assert "$" not in expr, f"an unknown dashboard variable is left in {expr}"
    return expr


def start_prometheus(server: Server, tmp: Path) -> Prometheus:
    """Run Prometheus on 127.0.0.1 with the shipped scrape config pointed at the test server, scraping every second."""
    assert PROMETHEUS is not None
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{server.port}"]
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    cmd = [
        PROMETHEUS,
        f"--config.file={config_path}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()[-4000:]}"
        try:
            return httpx.get(f"{prometheus.url}/-/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, DEADLINE, "prometheus to be ready", interval=0.5)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


@pytest.fixture(scope="module")
def prometheus(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A server that has answered REQUESTS completions, and a Prometheus that has scraped all of them."""
    tmp = tmp_path_factory.mktemp("deploy-prometheus")
    # with speculation on, so its panels have series (a rate of zero where nothing was proposed)
    entry = model_entry(tiny_llama_dir, MODEL, threads=1, speculative={"method": "ngram"})
    server = start_server(write_registry(tmp / "models.yaml", [entry]), tmp, "--metrics-open", ready_timeout=120)
    try:
        prometheus = start_prometheus(server, tmp)
        try:
            # a first scrape before the traffic, so that every counter's rate() sees the traffic as an increase
            wait_until(
                lambda: bool(prometheus.query('up{job="tokenmill"} == 1')["result"]),
                DEADLINE,
                "a first scrape",
                interval=0.5,
            )
            prompt = "The same long prefix, so that later requests hit the prefix cache. " * 3
            with server.client(timeout=60) as client:
                for i in range(REQUESTS):
                    body = {"model": MODEL, "prompt": f"{prompt}{i}", "max_tokens": 4, "ignore_eos": True}
                    assert client.post("/v1/completions", json=body).status_code == 200
            done = f'sum(tokenmill_request_success_total{{model_name="{MODEL}"}})'

            def scraped_all() -> bool:
                result = prometheus.query(done)["result"]
                return bool(result) and float(result[0]["value"][1]) >= REQUESTS

            wait_until(scraped_all, DEADLINE, f"prometheus to see {REQUESTS} finished requests", interval=0.5)
            time.sleep(2.5)  # a few more scrapes, so every rate() has samples on both sides of the traffic
            yield prometheus
        finally:
            prometheus.stop()
    finally:
        server.stop()


def test_shipped_config_passes_promtool() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_target_is_up_and_series_arrive(prometheus: Prometheus) -> None:
    up = prometheus.query('up{job="tokenmill"}')["result"]
    assert [float(sample["value"][1]) for sample in up] == [1.0]
    names = set(httpx.get(f"{prometheus.url}/api/v1/label/__name__/values", timeout=10.0).json()["data"])
    expected = {
        "tokenmill_num_requests_running",
        "tokenmill_num_requests_waiting",
        "tokenmill_kv_cache_usage_perc",
        "tokenmill_prompt_tokens_total",
        "tokenmill_generation_tokens_total",
        "tokenmill_request_success_total",
        "tokenmill_num_preemptions_total",
        "tokenmill_prefix_cache_queries_total",
        "tokenmill_prefix_cache_hits_total",
        "tokenmill_requests_rejected_total",
        "tokenmill_requests_aborted_total",
        "tokenmill_time_to_first_token_seconds_bucket",
        "tokenmill_inter_token_latency_seconds_bucket",
        "tokenmill_e2e_request_latency_seconds_bucket",
        "tokenmill_request_queue_time_seconds_bucket",
        "tokenmill_spec_decode_num_drafts_total",
        "tokenmill_spec_decode_num_draft_tokens_total",
        "tokenmill_spec_decode_num_accepted_tokens_total",
        "tokenmill_spec_decode_num_accepted_tokens_per_pos_total",
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"
    generated = prometheus.query(f'tokenmill_generation_tokens_total{{model_name="{MODEL}"}}')["result"]
    assert float(generated[0]["value"][1]) >= REQUESTS * 4


def test_dashboard_variable_finds_the_model(prometheus: Prometheus) -> None:
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]
    match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
    assert match is not None and variable["name"] == match.group(2) == "model_name"
    values = httpx.get(
        f"{prometheus.url}/api/v1/label/model_name/values", params={"match[]": match.group(1)}, timeout=10.0
    ).json()["data"]
    assert values == [MODEL]


def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    failed = []
    for title, expr in exprs:
        result = prometheus.query(substitute(expr))["result"]
        # after the traffic every panel has a number: a rate of zero, a quantile, a ratio with queries behind it
        if not result or not all(math.isfinite(float(sample["value"][1])) for sample in result):
            failed.append(f"{title}: {expr} -> {result}")
    assert not failed, "queries without data:\n" + "\n".join(failed)
