"""``edgewise containers render`` (docker flags, compose, Kubernetes), the committed examples, the
health check command, and the Dockerfile's shape (the podman test builds and runs it for real)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from edgewise.runtime.cli.main import main
from edgewise.runtime.resources.container_profiles import load_profile
from edgewise.runtime.resources.render import (
    CONTAINER_UID,
    INFERENCE_SERVICE,
    RenderOptions,
    docker_args,
    render,
    to_yaml,
)
from tests.containers.k8s_shape import k8s_problems, restricted_violations
from tests.servers import running_server

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"
EXAMPLES = CONTAINERS / "examples"


def test_docker_flags_carry_the_profile() -> None:
    profile = load_profile("batch-large")
    args = docker_args(profile, RenderOptions(image="reg/edgewise:1", models="/srv/models"))
    joined = " ".join(args)
    for flag in (
        "--cpus 8",
        "--memory 8192m",
        "--memory-swap 8192m",
        "--read-only",
        f"--user {CONTAINER_UID}:{CONTAINER_UID}",
        "--cap-drop ALL",
        "--volume /srv/models:/models:ro",
        "--env EDGEWISE_INTRA_OP_THREADS=4",
        "--env EDGEWISE_WORKER_THREADS=2",
        "--publish 8001:8001",
    ):
        assert flag in joined
    assert args[-2:] == ["reg/edgewise:1", "serve"]
    host = docker_args(profile, RenderOptions(network="host"))
    assert "--publish" not in host and "host" in host
    assert "--health-cmd" not in args  # the image's own HEALTHCHECK asks port 8001
    other = docker_args(profile, RenderOptions(port=9001))
    command = json.loads(other[other.index("--health-cmd") + 1])  # exec form: no shell
    assert command == ["edgewise", "containers", "healthcheck", "--server", "127.0.0.1:9001"]


def test_docker_text_is_the_same_command() -> None:
    profile = load_profile("edge-tiny")
    text = render(profile, "docker")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    argv = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    assert argv == ["docker", "run", *docker_args(profile)]
    assert "--cpus 0.5" in text and "--memory 256m" in text


def test_compose_service() -> None:
    document = yaml.safe_load(render(load_profile("edge-small"), "compose"))
    service = document["services"]["edgewise"]
    assert service["cpus"] == 1.0
    assert service["mem_limit"] == service["memswap_limit"] == "512m"
    assert service["read_only"] is True and service["tmpfs"][0].startswith("/tmp:")
    assert service["user"] == f"{CONTAINER_UID}:{CONTAINER_UID}"
    assert service["environment"]["EDGEWISE_REPO"] == "/models"
    assert service["environment"]["EDGEWISE_PORT"] == "8001"  # a string, not a number
    assert service["command"] == ["serve"]
    assert service["mem_reservation"] == service["mem_limit"]  # reserved = limit
    assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]
    health = service["healthcheck"]
    assert health["test"][:4] == ["CMD", "edgewise", "containers", "healthcheck"]
    assert health["test"][-1] == "127.0.0.1:8001"


@pytest.mark.parametrize(
    ("name", "cpu", "memory"),
    [("edge-tiny", "500m", "256Mi"), ("edge-medium", "2", "1Gi"), ("batch-large", "8", "8Gi")],
)
def test_kubernetes_deployment(name: str, cpu: str, memory: str) -> None:
    documents = list(yaml.safe_load_all(render(load_profile(name), "k8s")))
    assert k8s_problems(documents) == []
    deployment, service, budget = documents
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == CONTAINER_UID
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": cpu, "memory": memory}
    assert container["livenessProbe"]["grpc"] == {"port": 8001}
    assert container["startupProbe"]["grpc"] == {"port": 8001}
    assert container["readinessProbe"]["grpc"] == {"port": 8001, "service": INFERENCE_SERVICE}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not restricted_violations(pod)
    assert budget["kind"] == "PodDisruptionBudget"
    assert (
        budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/tmp" in mounts
    env = {e["name"]: e["value"] for e in container["env"]}
    assert all(isinstance(value, str) for value in env.values())
    if name == "batch-large":
        assert env["EDGEWISE_INTRA_OP_THREADS"] == "4"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert (
        deployment["spec"]["template"]["metadata"]["labels"]
        == selector
        == service["spec"]["selector"]
    )


def test_replicas_and_the_disruption_budget() -> None:
    text = render(load_profile("edge-small"), "k8s", RenderOptions(replicas=3))
    deployment, _service, budget = yaml.safe_load_all(text)
    assert deployment["spec"]["replicas"] == 3
    assert budget["spec"]["maxUnavailable"] == 1  # one at a time; never blocks a drain
    assert "minAvailable" not in budget["spec"]


def test_the_shape_checker_finds_problems() -> None:
    """k8s_problems and restricted_violations are what the Kubernetes tests rely on: each finds
    what it is for in a rendering broken on purpose."""
    deployment, service, budget = yaml.safe_load_all(render(load_profile("edge-tiny"), "k8s"))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    del container["image"]
    container["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    container["resources"]["limits"]["memory"] = "512 MB"
    container["readinessProbe"]["grpc"]["port"] = "grpc"
    deployment["spec"]["selector"]["matchLabels"]["extra"] = "x"
    service["spec"]["ports"][0]["targetPort"] = "nope"
    budget["spec"]["minAvailable"] = 1
    found = " | ".join(k8s_problems([deployment, service, budget]))
    for expected in (
        "image",
        "nowhere",
        "512 MB",
        "readinessProbe",
        "matchLabels",
        "targetPort",
        "minAvailable",
    ):
        assert expected in found, (expected, found)
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["securityContext"]["capabilities"]["drop"] = []
    del pod["securityContext"]["seccompProfile"], container["securityContext"]["seccompProfile"]
    assert len(restricted_violations(pod)) == 3


@pytest.mark.parametrize(
    "value",
    [
        "true",
        "no",
        "on",
        "8001",
        "1.5",
        "",
        "a: b",
        "- x",
        "#x",
        "x #y",
        "null",
        "~",
        "it's",
        '"q"',
    ],
)
def test_yaml_scalars_round_trip(value: str) -> None:
    document = {"key": value, "list": [value], "nested": {"k": [{"a": value, "b": 3}]}}
    assert yaml.safe_load(to_yaml(document)) == document


def test_committed_examples_are_current() -> None:
    """containers/examples/ is what `edgewise containers render` writes today (regenerate with
    the commands in containers/README.md)."""
    examples = sorted(EXAMPLES.glob("*"))
    assert len(examples) >= 6
    for path in examples:
        name, fmt, _ = path.name.split(".")
        assert path.read_text() == render(load_profile(name), fmt), path.name


def test_cli_render_and_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["containers", "render", "--profile", "edge-tiny", "--format", "k8s"]) == 0
    out = capsys.readouterr().out
    assert "claimName: edgewise-models" in out and 'cpu: "500m"' in out
    assert main(["containers", "profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("edge-tiny", "edge-small", "edge-medium", "batch-large"):
        assert name in out
    with pytest.raises(SystemExit) as info:
        main(["containers", "render", "--profile", "edge-tiny", "--format", "swarm"])
    assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(
            ["containers", "render", "--profile", "edge-tiny", "--format", "k8s", "--replicas", "0"]
        )
    assert info.value.code == 2
    assert "--replicas: a whole number of at least 1, not '0'" in capsys.readouterr().err
    args = ["containers", "render", "--profile", "edge-tiny", "--format", "k8s", "--replicas", "2"]
    assert main(args) == 0
    assert "replicas: 2" in capsys.readouterr().out


def test_healthcheck_command(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_server(model_repo, tmp_path) as server:
        assert main(["containers", "healthcheck", "--server", server.target]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        code = main(
            ["containers", "healthcheck", "--server", server.target, "--service", INFERENCE_SERVICE]
        )
        assert code == 0
        port = server.port
    capsys.readouterr()
    assert (
        main(["containers", "healthcheck", "--server", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "UNAVAILABLE" in err


def test_dockerfile_shape() -> None:
    """What the issue asks of the Dockerfile, checked on its text; the podman test proves it."""
    text = (CONTAINERS / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert lines[0].startswith("ARG BASE_IMAGE=")  # the base is a build argument
    assert sum(line.startswith("FROM ") for line in lines) == 2  # multi-stage
    assemble = (CONTAINERS / "assemble.sh").read_text()  # the build stage's one RUN
    assert "--no-index --find-links" in assemble and "--require-hashes" in assemble  # air-gapped
    assert f"USER {CONTAINER_UID}:{CONTAINER_UID}" in lines  # numeric, non-root
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert '"edgewise", "containers", "healthcheck"' in text  # exec form: no shell in the base
