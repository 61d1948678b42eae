"""What the Kubernetes API server would refuse in the manifests ``containers render`` writes,
checked without a cluster: kubeconform and kubeval are not installable here (no Debian or PyPI
package; both need JSON schemas fetched from GitHub), so the rules below are the API's own
validation for the fields we write (required fields, name and label syntax, quantities, one
probe handler, mounts that name a volume, a Service's named targetPort, a PodDisruptionBudget's
one of minAvailable/maxUnavailable) and the Pod Security Standards' "restricted" profile."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

API_VERSIONS: Final = {"Deployment": "apps/v1", "Service": "v1", "PodDisruptionBudget": "policy/v1"}
_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_VALUE: Final = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME: Final = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_PORT_NAME: Final = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME
_QUANTITY: Final = re.compile(
    r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"
)
_PROBE_HANDLERS: Final = ("exec", "httpGet", "tcpSocket", "grpc")
_UNITS: Final = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def quantity(text: str) -> float:
    """A resource quantity's value ("500m" -> 0.5, "1Gi" -> 2**30)."""
    match = re.match(r"^([0-9.]+)([A-Za-z]*)$", text)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def _labels(where: str, labels: Any) -> list[str]:
    if not isinstance(labels, Mapping) or not labels:
        return [f"{where}: labels missing"]
    problems = []
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        bad_key = not _LABEL_NAME.match(name) or len(name) > 63
        if prefix and (not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253):
            bad_key = True
        if bad_key:
            problems.append(f"{where}: label key {key!r}")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
            problems.append(f"{where}: label value {value!r}")
    return problems


def _positive_ints(where: str, mapping: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    return [
        f"{where}.{key}: {mapping[key]!r} is not a positive integer"
        for key in keys
        if key in mapping
        and (
            not isinstance(mapping[key], int) or isinstance(mapping[key], bool) or mapping[key] < 1
        )
    ]


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _probe(where: str, probe: Any) -> list[str]:
    if not isinstance(probe, Mapping):
        return [f"{where}: not a mapping"]
    handlers = [h for h in _PROBE_HANDLERS if h in probe]
    if len(handlers) != 1:
        return [f"{where}: needs exactly one handler of {_PROBE_HANDLERS}, has {handlers}"]
    problems = _positive_ints(
        where, probe, ("periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold")
    )
    if handlers[0] == "grpc":
        grpc = probe["grpc"]
        if not _port(grpc.get("port")):  # a gRPC probe's port must be a number, not a name
            problems.append(f"{where}.grpc.port: {grpc.get('port')!r}")
        if not isinstance(grpc.get("service", ""), str):
            problems.append(f"{where}.grpc.service: not a string")
    return problems


def _container(where: str, container: Mapping[str, Any], volumes: set[str]) -> list[str]:
    problems = []
    name = container.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        problems.append(f"{where}: name {name!r}")
    if not isinstance(container.get("image"), str) or not container.get("image"):
        problems.append(f"{where}: image missing")
    names = []
    for port in container.get("ports", []):
        if not _port(port.get("containerPort")):
            problems.append(f"{where}: containerPort {port.get('containerPort')!r}")
        port_name = port.get("name")
        if port_name is not None:
            if not _PORT_NAME.match(port_name) or len(port_name) > 15 or "--" in port_name:
                problems.append(f"{where}: port name {port_name!r}")
            names.append(port_name)
    if len(names) != len(set(names)):
        problems.append(f"{where}: duplicate port names {names}")
    for item in container.get("env", []):
        if not isinstance(item.get("name"), str) or not isinstance(item.get("value", ""), str):
            problems.append(f"{where}: env {item!r} (values must be strings)")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource, value in resources.get(kind, {}).items():
            if not isinstance(value, str) or not _QUANTITY.match(value):
                problems.append(f"{where}.resources.{kind}.{resource}: quantity {value!r}")
    for resource, value in resources.get("requests", {}).items():
        limit = resources.get("limits", {}).get(resource)
        try:
            if limit is not None and quantity(value) > quantity(limit):
                problems.append(f"{where}: {resource} request {value} above its limit {limit}")
        except ValueError:
            pass  # reported above
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            problems += _probe(f"{where}.{probe}", container[probe])
    for mount in container.get("volumeMounts", []):
        if mount.get("name") not in volumes:
            problems.append(f"{where}: volumeMount of {mount.get('name')!r}: no such volume")
        if not str(mount.get("mountPath", "")).startswith("/"):
            problems.append(f"{where}: mountPath {mount.get('mountPath')!r} not absolute")
    context = container.get("securityContext", {})
    for key in ("readOnlyRootFilesystem", "allowPrivilegeEscalation", "privileged", "runAsNonRoot"):
        if key in context and not isinstance(context[key], bool):
            problems.append(f"{where}.securityContext.{key}: not a boolean")
    return problems


def _pod(where: str, pod: Mapping[str, Any]) -> list[str]:
    problems = []
    volumes = []
    for volume in pod.get("volumes", []):
        volumes.append(volume.get("name"))
        sources = [key for key in volume if key != "name"]
        if len(sources) != 1:
            problems.append(f"{where}: volume {volume.get('name')!r} needs one source: {sources}")
    if len(volumes) != len(set(volumes)):
        problems.append(f"{where}: duplicate volume names {volumes}")
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        return [*problems, f"{where}: containers missing"]
    for index, container in enumerate(containers):
        problems += _container(f"{where}.containers[{index}]", container, set(volumes))
    problems += _positive_ints(where, pod, ("terminationGracePeriodSeconds",))
    return problems


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def k8s_problems(documents: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every field of ``documents`` the API server would refuse, and cross-document mistakes (a
    Service or budget selecting no pod, a Service's named targetPort no container has)."""
    problems: list[str] = []
    pods: list[Mapping[str, Any]] = []  # pod templates' metadata and spec
    for doc in documents:
        kind = doc.get("kind")
        if kind not in API_VERSIONS or doc.get("apiVersion") != API_VERSIONS.get(kind):
            problems.append(f"{kind}: apiVersion {doc.get('apiVersion')!r}")
            continue
        name = doc.get("metadata", {}).get("name")
        if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
            problems.append(f"{kind}: metadata.name {name!r}")
        problems += _labels(f"{kind}.metadata", doc["metadata"].get("labels"))
        if kind == "Deployment":
            spec = doc.get("spec", {})
            template = spec.get("template", {})
            selector = spec.get("selector", {}).get("matchLabels")
            template_labels = template.get("metadata", {}).get("labels", {})
            problems += _labels("Deployment.spec.template.metadata", template_labels)
            if not selector or not _selects(selector, template_labels):
                problems.append("Deployment: spec.selector.matchLabels do not select the template")
            replicas = spec.get("replicas", 1)
            if not isinstance(replicas, int) or replicas < 0:
                problems.append(f"Deployment: replicas {replicas!r}")
            problems += _pod("Deployment.spec.template.spec", template.get("spec", {}))
            pods.append(template)
    for doc in documents:
        kind, spec = doc.get("kind"), doc.get("spec", {})
        if kind == "Service":
            selected = [
                p for p in pods if _selects(spec.get("selector", {}), p["metadata"]["labels"])
            ]
            if not spec.get("selector") or not selected:
                problems.append("Service: spec.selector selects no pod")
            named = {
                port.get("name")
                for p in selected
                for c in p.get("spec", {}).get("containers", [])
                for port in c.get("ports", [])
            }
            for port in spec.get("ports", []):
                if not _port(port.get("port")):
                    problems.append(f"Service: port {port.get('port')!r}")
                target = port.get("targetPort")
                if isinstance(target, str) and target not in named:
                    problems.append(f"Service: targetPort {target!r} names no container port")
        elif kind == "PodDisruptionBudget":
            selector = spec.get("selector", {}).get("matchLabels")
            if not selector or not [p for p in pods if _selects(selector, p["metadata"]["labels"])]:
                problems.append("PodDisruptionBudget: spec.selector.matchLabels select no pod")
            given = [key for key in ("minAvailable", "maxUnavailable") if key in spec]
            if len(given) != 1:
                problems.append(f"PodDisruptionBudget: one of minAvailable/maxUnavailable: {given}")
            policy = spec.get("unhealthyPodEvictionPolicy", "IfHealthyBudget")
            if policy not in ("IfHealthyBudget", "AlwaysAllow"):
                problems.append(f"PodDisruptionBudget: unhealthyPodEvictionPolicy {policy!r}")
    return problems


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """What the Pod Security Standards' "restricted" profile refuses in ``pod`` (a pod spec)."""
    found = []
    pod_context = pod.get("securityContext", {})
    for container in pod.get("containers", []):
        context = container.get("securityContext", {})
        name = container.get("name")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if context.get("privileged") is True:
            found.append(f"{name}: privileged")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
    allowed = {"persistentVolumeClaim", "emptyDir", "configMap", "secret", "projected"}
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed:
            found.append(f"volume {volume.get('name')}: {sorted(kinds - allowed)} not allowed")
    return found
