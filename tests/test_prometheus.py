"""The dashboard's and the alert rules' PromQL against a real Prometheus (Debian package `prometheus`) scraping a live
`mtpserve serve`, started through the container entry point with MTPSERVE_* variables, a tiny model and a random
MTP head; promtool checks and unit-tests the rules."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mtp_helpers import save_random_head
from prometheus_client.parser import text_string_to_metric_families
from test_server import free_port

from mtpserve.engine.loader import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "docker" / "prometheus"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "mtpserve.json"
MODEL = "tiny"
WINDOW = "5m"  # longer than the whole test: every rate() spans all of its samples
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NO_PROMETHEUS = "the prometheus binary is not installed (Debian package 'prometheus'; .ci/run installs it)"
METRIC = re.compile(r"\b(mtpserve_[a-z0-9_]+|up)\b")


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    rules = []
    for group in groups:
        rules += group["rules"]
    return rules


def substitute(expr: str) -> str:
    """Grafana's part: the template variables of the dashboard, for one selected model."""
    return expr.replace("$__rate_interval", WINDOW).replace("$model_name", re.escape(MODEL))


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package 'prometheus')")
def test_promtool_checks_config_and_rules():
    checks = (["check", "config", str(PROM_DIR / "prometheus.yml")],
              ["check", "rules", str(PROM_DIR / "alerts.yml")])
    for args in checks:
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package 'prometheus')")
def test_alerts_fire_when_they_should(tmp_path):
    """promtool's rule unit tests on synthetic series: each alert fires for the bad series only, after its `for`.
    Annotations are left out of the copy under test (their templates are checked by `promtool check rules`)."""
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    severity = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}

    def fired(name, eval_time, *label_sets):
        return {"eval_time": eval_time, "alertname": name,
                "exp_alerts": [{"exp_labels": {**labels, "severity": severity[name]}} for labels in label_sets]}

    bad = {"model_name": "bad"}
    target = {"job": "mtpserve", "instance": "mtpserve:8000"}
    series = {
        'up{job="mtpserve", instance="mtpserve:8000"}': "1 1 0x30",
        'mtpserve_spec_drafts_total{model_name="bad"}': "0+100x30",
        'mtpserve_spec_accepted_tokens_total{model_name="bad"}': "0+10x30",   # 1.1 tokens per step
        'mtpserve_spec_drafts_total{model_name="good"}': "0+100x30",
        'mtpserve_spec_accepted_tokens_total{model_name="good"}': "0+150x30",  # 2.5 tokens per step
        'mtpserve_requests_waiting{model_name="bad"}': "3x30",
        'mtpserve_requests_waiting{model_name="good"}': "3 0 " * 15,  # drains between bursts
        'mtpserve_kv_cache_usage_ratio{model_name="bad"}': "0.95x30",
        'mtpserve_kv_cache_usage_ratio{model_name="good"}': "0.6x30",
    }
    spec = {"rule_files": [str(tmp_path / "rules.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v.strip()} for s, v in series.items()],
        "alert_rule_test": [
            fired("MtpserveDown", "2m"), fired("MtpserveDown", "4m", target),
            fired("MtpserveAcceptanceCollapsed", "9m"), fired("MtpserveAcceptanceCollapsed", "14m", bad),
            fired("MtpserveQueueBackingUp", "3m"), fired("MtpserveQueueBackingUp", "7m", bad),
            fired("MtpserveKVCacheNearlyFull", "3m"), fired("MtpserveKVCacheNearlyFull", "7m", bad),
        ],
    }]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec))
    assert {t["alertname"] for t in spec["tests"][0]["alert_rule_test"]} == set(severity)
    done = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def wait_for(check, timeout: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{Path(log).read_text()[-3000:]}")
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}" + (f":\n{Path(log).read_text()[-3000:]}" if log else ""))


def start(argv, log: Path, env=None, cwd=None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """`mtpserve serve` as the container runs it: the entry point, configured by MTPSERVE_* variables only."""
    tmp = tmp_path_factory.mktemp("server")
    head = save_random_head(tmp / "head", load_checkpoint(tiny_llama_dir).config)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTPSERVE_")}
    env.update(MTPSERVE_MODEL=tiny_llama_dir, MTPSERVE_MTP_HEAD=head, MTPSERVE_SERVED_MODEL_NAME=MODEL,
               MTPSERVE_HOST="127.0.0.1", MTPSERVE_PORT=str(port), MTPSERVE_DEVICE="cpu", MTPSERVE_NUM_BLOCKS="64",
               MTPSERVE_SPEC_ADAPTIVE="off", MTPSERVE_SPEC_DRAFT_N_MAX="2")
    log = tmp / "server.log"
    proc = start([sys.executable, str(REPO / "docker" / "entrypoint.py"), "serve"], log, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 90, "mtpserve", proc, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus with the repository's config, pointed at the live server, scraping and evaluating every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mtpserve")
    job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    proc = start([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, 30, "prometheus", proc, log)
        yield url, proc, log
    finally:
        stop(proc)


def query(prom_url: str, expr: str) -> dict:
    body = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}\n{body.get('error')}"
    return body["data"]


def values(data: dict) -> list[float]:
    assert data["resultType"] == "vector"
    return [float(s["value"][1]) for s in data["result"]]


def send_traffic(url: str) -> int:
    """Streaming and non-streaming chat and text completions; returns how many requests finished."""
    bodies = [{"model": MODEL, "max_tokens": 12 + 4 * i, "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1,
               **({"messages": [{"role": "user", "content": f"Tell me a story {i}"}]} if i < 4
                  else {"prompt": f"Once upon a time {i}"})} for i in range(6)]
    with httpx.Client(base_url=url, timeout=60) as c:
        for body in bodies:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            assert r.text.rstrip().endswith("data: [DONE]") if body["stream"] else r.json()["usage"]
    return len(bodies)


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_dashboard_and_alert_queries_on_live_data(server, prometheus):
    prom, proc, log = prometheus
    scraped = 'up{job="mtpserve"} == 1'
    wait_for(lambda: values(query(prom, scraped)), 30, "a first scrape", proc, log)
    finished = send_traffic(server)
    total = f'sum(mtpserve_request_success_total{{model_name="{MODEL}"}})'
    wait_for(lambda: values(query(prom, total)) == [finished], 30, "a scrape after the traffic", proc, log)

    exported = {f.name for f in text_string_to_metric_families(httpx.get(server + "/metrics").text)
                if f.name.startswith("mtpserve_") and not f.name.endswith("_created")}  # client's timestamps
    known = set(httpx.get(prom + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    queries = dashboard_queries()
    used = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names <= known, f"{title}: {names - known} not scraped"
        used |= {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}
        result = values(query(prom, substitute(expr)))
        assert any(math.isfinite(v) for v in result), f"{title}: no data for\n{substitute(expr)}\n{result}"
    assert exported <= used, f"exported but on no panel: {exported - used}"

    board = json.loads(DASHBOARD.read_text())
    variable = next(v for v in board["templating"]["list"] if v["name"] == "model_name")
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
    options = httpx.get(f"{prom}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10).json()
    assert options["data"] == [MODEL]

    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= known, rule["alert"]
        query(prom, rule["expr"])  # parses and evaluates
    rules = httpx.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in loaded.values()), [r.get("lastError") for r in loaded.values()]
