"""deploy/kubernetes/: every manifest against the Kubernetes API schema (kubernetes-validate,
strict: an unknown field is an error), then what a schema cannot see: the references
between the manifests, and the ConfigMap's node.yaml parsed by the node's own parser.

Nothing here talks to a cluster. Each cross-reference check is a function that returns its
problems; `test_check_catches` breaks a copy of the manifests for each one and expects it
to say so, so none of them passes vacuously."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from node.config import Config, ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
# The oldest release the manifests claim (README.md there) and the newest the installed
# kubernetes-validate bundles a schema for.
KUBERNETES_VERSIONS = ("1.33", "1.37")
CONFIG_PATH = "/etc/dicom-node/node.yaml"  # where `serve -c` and `drain -c` read node.yaml
SYSTEMD_UNIT = REPO / "systemd" / "dicom-node.service"  # TimeoutStopSec: the stop's budget

Doc = dict[str, Any]


def load(directory: Path = DEPLOY) -> list[tuple[str, Doc]]:
    """(file name, document) for every document of every *.yaml file."""
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


class Manifests:
    """The documents of deploy/kubernetes/, looked up by kind and name."""

    def __init__(self, docs: list[Doc]):
        self.docs = docs

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") == kind]

    def named(self, kind: str, name: str) -> Doc | None:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        return found[0] if len(found) == 1 else None

    @property
    def statefulset(self) -> Doc:
        (sts,) = self.of_kind("StatefulSet")
        return sts

    @property
    def pod(self) -> Doc:
        return self.statefulset["spec"]["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.statefulset["spec"]["template"]["metadata"].get("labels", {})

    @property
    def container(self) -> Doc:
        (container,) = [c for c in self.pod["containers"] if c["name"] == "dicom-node"]
        return container

    def container_port(self, port: str | int) -> Doc | None:
        """The container port a probe or a Service's targetPort names (by name or number)."""
        for p in self.container.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return p
        return None

    def claim_names(self) -> set[str]:
        templates = self.statefulset["spec"].get("volumeClaimTemplates", [])
        return {t["metadata"]["name"] for t in templates}

    def mount_of(self, path: str) -> Doc | None:
        """The volumeMount that holds `path`: the deepest mountPath at or above it."""
        best = None
        for mount in self.container.get("volumeMounts", []):
            if PurePosixPath(path).is_relative_to(mount["mountPath"]) and (
                best is None or len(mount["mountPath"]) > len(best["mountPath"])
            ):
                best = mount
        return best

    def mounted_text(self, path: str) -> tuple[str | None, list[str]]:
        """The text the container sees at `path`, when a ConfigMap provides it."""
        mount = self.mount_of(path)
        if mount is None:
            return None, [f"nothing is mounted at {path}"]
        volumes = [v for v in self.pod.get("volumes", []) if v["name"] == mount["name"]]
        if len(volumes) != 1 or "configMap" not in volumes[0]:
            return None, [f"{path}: volume {mount['name']!r} is not one configMap volume"]
        source = volumes[0]["configMap"]
        cm = self.named("ConfigMap", source["name"])
        if cm is None:
            return None, [f"{path}: no ConfigMap named {source['name']!r} is defined"]
        relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
        if mount.get("subPath"):
            relative = str(PurePosixPath(mount["subPath"]) / relative).removesuffix("/.")
        items = source.get("items")
        keys = [i["key"] for i in items if i["path"] == relative] if items else [relative]
        if len(keys) != 1:
            return None, [f"{path}: no item of configMap {source['name']!r} is {relative!r}"]
        text = cm.get("data", {}).get(keys[0])
        if text is None:
            return None, [f"{path}: ConfigMap {source['name']!r} has no key {keys[0]!r}"]
        return text, []

    def node_yaml(self) -> str:
        text, problems = self.mounted_text(CONFIG_PATH)
        assert text is not None, problems
        return text


def manifests() -> Manifests:
    return Manifests([d for _, d in load()])


def parsed(m: Manifests) -> Config:
    return parse_config(m.node_yaml(), "node.yaml", Path("/"))


def prestop_steps(m: Manifests) -> list[list[str]]:
    """The preStop hook as shell commands, each split into words: `sh -c 'A; B'`."""
    command = m.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if not command:
        return []
    if command[:2] in (["/bin/sh", "-c"], ["sh", "-c"]) and len(command) == 3:
        return [shlex.split(step) for step in re.split(r";|&&", command[2]) if step.strip()]
    return [command]


# --- the schema ---------------------------------------------------------------------------


def _doc_id(value: str | Doc) -> str:
    return value if isinstance(value, str) else f"{value['kind']}/{value['metadata']['name']}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", load(), ids=_doc_id)
def test_schema(name: str, doc: Doc, version: str) -> None:
    # SchemaNotFoundError (an unknown kind or apiVersion) fails the test as well
    assert kubernetes_validate.validate(doc, version, strict=True) == version


def test_the_expected_objects_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in load())
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Service", "Service", "StatefulSet"]


@pytest.mark.parametrize(
    "where,change",
    [
        (("spec", "template", "spec", "containers", 0), {"livenessProbes": {}}),  # a typo
        (("spec",), {"volumeClaimTemplate": []}),
        (("spec", "template", "spec", "containers", 0, "ports", 0), {"containerPort": "11112"}),
    ],
)
def test_schema_is_strict(where: tuple, change: dict) -> None:
    sts = copy.deepcopy(manifests().statefulset)
    target = sts
    for key in where:
        target = target[key]
    target.update(change)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES_VERSIONS[-1], strict=True)


# --- cross-references ---------------------------------------------------------------------


def check_headless_service(m: Manifests) -> list[str]:
    name = m.statefulset["spec"].get("serviceName")
    svc = m.named("Service", name) if name else None
    if svc is None:
        return [f"StatefulSet serviceName {name!r} is no Service defined here"]
    if svc["spec"].get("clusterIP") != "None":
        return [f"Service {name} (the StatefulSet's serviceName) is not headless"]
    return []


def check_selectors(m: Manifests) -> list[str]:
    """Every selector matches the pod template's labels (matchLabels only; anything else is
    reported, not guessed at)."""
    labels = m.pod_labels
    selectors = {f"Service {s['metadata']['name']}": s["spec"].get("selector")
                 for s in m.of_kind("Service")}  # fmt: skip
    selectors["StatefulSet selector"] = m.statefulset["spec"]["selector"]
    selectors |= {f"PodDisruptionBudget {p['metadata']['name']}": p["spec"].get("selector")
                  for p in m.of_kind("PodDisruptionBudget")}  # fmt: skip
    for i, t in enumerate(m.pod.get("topologySpreadConstraints", [])):
        selectors[f"topologySpreadConstraints[{i}]"] = t.get("labelSelector")
    problems = []
    for where, selector in selectors.items():
        if where.startswith("Service"):
            wanted = selector
        elif selector and set(selector) == {"matchLabels"}:
            wanted = selector["matchLabels"]
        else:
            problems.append(f"{where}: expected a matchLabels selector, got {selector!r}")
            continue
        if not wanted or any(labels.get(k) != v for k, v in wanted.items()):
            problems.append(f"{where} {wanted!r} does not select the pod labels {labels!r}")
    return problems


def check_service_ports(m: Manifests) -> list[str]:
    """Each Service port reaches a container port of its protocol; the balancer is a TCP
    LoadBalancer on the DICOM port and nothing else."""
    problems = []
    for svc in m.of_kind("Service"):
        for port in svc["spec"]["ports"]:
            target = m.container_port(port.get("targetPort", port["port"]))
            if target is None:
                problems.append(f"Service {svc['metadata']['name']}: targetPort "
                                f"{port.get('targetPort')!r} is no container port")  # fmt: skip
            elif target.get("protocol", "TCP") != port.get("protocol", "TCP"):
                problems.append(f"Service {svc['metadata']['name']}: {port.get('protocol')} to a "
                                f"{target.get('protocol', 'TCP')} container port")  # fmt: skip
    balancers = [s for s in m.of_kind("Service") if s["spec"].get("type") == "LoadBalancer"]
    if len(balancers) != 1:
        return problems + [f"expected one LoadBalancer Service, found {len(balancers)}"]
    dicom = parsed(m).node.port
    for port in balancers[0]["spec"]["ports"]:
        target = m.container_port(port.get("targetPort", port["port"]))
        reached = None if target is None else target["containerPort"]
        if port.get("protocol", "TCP") != "TCP" or reached != dicom:
            problems.append(f"LoadBalancer port {port!r} is not TCP to the DICOM port {dicom}")
    return problems


def check_config_mount(m: Manifests) -> list[str]:
    """`serve -c` reads a file a ConfigMap defines, mounted read-only, not by subPath (a
    subPath mount never sees the ConfigMap's updates, and the node reloads on them)."""
    command = m.container.get("command", []) + m.container.get("args", [])
    if command[:4] != ["dicom-node", "serve", "-c", CONFIG_PATH]:
        return [f"the container runs {command!r}, not dicom-node serve -c {CONFIG_PATH}"]
    text, problems = m.mounted_text(CONFIG_PATH)
    mount = m.mount_of(CONFIG_PATH)
    if mount is not None and (not mount.get("readOnly") or mount.get("subPath")):
        problems.append(f"{mount['mountPath']}: expected readOnly: true and no subPath")
    return problems


def _probe_port(probe: Doc) -> tuple[str, str | int | None]:
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            return kind, probe[kind].get("port")
    return next(iter(probe), "none"), None


def check_probes(m: Manifests) -> list[str]:
    """Probe ports are container ports; readiness is /healthz on node.yaml's http port;
    liveness and startup never read /healthz (it answers 503 while draining) and liveness
    tolerates a minute at least."""
    config = parsed(m)
    problems = []
    probes = {k: m.container.get(k) for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    for name, probe in probes.items():
        if probe is None:
            if name != "startupProbe":
                problems.append(f"no {name}")
            continue
        kind, port = _probe_port(probe)
        target = m.container_port(port) if port is not None else None
        if target is None:
            problems.append(f"{name}: {kind} port {port!r} is no container port")
            continue
        if name == "readinessProbe":
            if kind != "httpGet" or probe["httpGet"].get("path") != "/healthz":
                problems.append(f"readinessProbe: expected httpGet /healthz, got {probe!r}")
            elif config.http is None or target["containerPort"] != config.http.port:
                problems.append(f"readinessProbe: port {target['containerPort']} is not "
                                f"node.yaml's http port")  # fmt: skip
        elif kind == "httpGet" and probe["httpGet"].get("path", "/").startswith("/healthz"):
            problems.append(f"{name} reads /healthz, which answers 503 while the node drains")
        elif kind == "tcpSocket" and target["containerPort"] != config.node.port:
            problems.append(f"{name}: tcpSocket port {target['containerPort']} is not node.port")
    liveness = probes["livenessProbe"] or {}
    patience = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    if patience < 60:
        problems.append(f"livenessProbe gives up after {patience} s: not generous")
    return problems


def check_node_yaml(m: Manifests) -> list[str]:
    """The node's own parser accepts it; node.name is unset (the host name, i.e. the pod
    name, per pod); ports, http and workers agree with the pod spec."""
    text = m.node_yaml()
    try:
        config = parse_config(text, "node.yaml", Path("/"))
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    problems = []
    if "name" in (yaml.safe_load(text).get("node") or {}):
        problems.append("node.name is set: every pod would have the same name")
    if (m.container_port("dicom") or {}).get("containerPort") != config.node.port:
        problems.append(f"node.port {config.node.port} is not the container port 'dicom'")
    if config.http is None or config.http.host != "0.0.0.0":
        problems.append("http must listen on 0.0.0.0: the kubelet probes from outside the pod")
    elif (m.container_port("http") or {}).get("containerPort") != config.http.port:
        problems.append(f"http.port {config.http.port} is not the container port 'http'")
    cpu = str(m.container.get("resources", {}).get("limits", {}).get("cpu"))
    if not cpu.isdigit() or config.node.workers != int(cpu):
        problems.append(f"node.workers {config.node.workers} is not the CPU limit {cpu!r}")
    return problems


def check_spool_on_claim(m: Manifests) -> list[str]:
    spool = str(parsed(m).node.spool)
    mount = m.mount_of(spool)
    if mount is None or mount["name"] not in m.claim_names():
        where = "no mount" if mount is None else f"volume {mount['name']!r}"
        return [f"the spool {spool} is on {where}, not a volumeClaimTemplate"]
    if mount.get("readOnly") or mount.get("subPath"):
        return [f"the spool's mount {mount['mountPath']} is read-only or a subPath"]
    return []


def check_security(m: Manifests) -> list[str]:
    pod_sc = m.pod.get("securityContext", {})
    sc = m.container.get("securityContext", {})
    problems = []
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
        problems.append("runAsUser 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc["capabilities"].get("add"):
        problems.append("capabilities: expected drop [ALL] and nothing added")
    for mount in m.container.get("volumeMounts", []):
        if not mount.get("readOnly") and mount["name"] not in m.claim_names():
            problems.append(f"{mount['mountPath']} is writable and not the spool's claim")
    return problems


def check_termination(m: Manifests) -> list[str]:
    """preStop: `dicom-node drain -c CONFIG`, then `sleep N`, with N longer than the pod
    takes to turn unready; terminationGracePeriodSeconds covers N plus the stop the systemd
    unit allows (TimeoutStopSec)."""
    steps = prestop_steps(m)
    if not steps or steps[0] != ["dicom-node", "drain", "-c", CONFIG_PATH]:
        return [f"preStop does not start with dicom-node drain -c {CONFIG_PATH}: {steps!r}"]
    if len(steps) != 2 or len(steps[1]) != 2 or steps[1][0] != "sleep" or not steps[1][1].isdigit():
        return [f"preStop: expected the drain, then sleep SECONDS: {steps!r}"]
    wait = int(steps[1][1])
    readiness = m.container.get("readinessProbe", {})
    unready = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    (stop,) = re.findall(r"^TimeoutStopSec=(\d+)$", SYSTEMD_UNIT.read_text(), re.MULTILINE)
    grace = m.pod.get("terminationGracePeriodSeconds", 30)
    problems = []
    if wait <= unready:
        problems.append(f"preStop sleeps {wait} s, not longer than readiness takes ({unready} s)")
    if grace < wait + int(stop):
        problems.append(f"terminationGracePeriodSeconds {grace} < sleep {wait} + stop {stop} s")
    return problems


CHECKS: dict[str, Callable[[Manifests], list[str]]] = {
    f.__name__.removeprefix("check_"): f
    for f in (check_headless_service, check_selectors, check_service_ports, check_config_mount,
              check_probes, check_node_yaml, check_spool_on_claim, check_security,
              check_termination)
}  # fmt: skip


@pytest.mark.parametrize("check", CHECKS)
def test_cross_references(check: str) -> None:
    assert CHECKS[check](manifests()) == []


def test_drain_command_is_one_the_cli_accepts(tmp_path: Path) -> None:
    """The preStop's drain, run here with the ConfigMap's node.yaml: the config loads and the
    command looks for the node's pid file in the spool (there is none: exit 1)."""
    m = manifests()
    config = tmp_path / "node.yaml"
    config.write_text(m.node_yaml())
    argv = prestop_steps(m)[0][1:]
    argv[argv.index(CONFIG_PATH)] = str(config)
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from node.ops.cli import main; sys.exit(main())"]
        + argv,
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert f"no running node found for {parsed(m).node.spool}" in run.stderr


# --- each check can fail ------------------------------------------------------------------


def _replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _edit_node_yaml(m: Manifests, old: str, new: str) -> None:
    cm = m.named("ConfigMap", m.pod["volumes"][0]["configMap"]["name"])
    cm["data"]["node.yaml"] = _replace(cm["data"]["node.yaml"], old, new)


def _service(m: Manifests, kind: str) -> Doc:
    lb = kind == "lb"
    (svc,) = [s for s in m.of_kind("Service") if (s["spec"].get("type") == "LoadBalancer") == lb]
    return svc


def _set_prestop(m: Manifests, script: str) -> None:
    m.container["lifecycle"]["preStop"]["exec"]["command"][2] = script


BREAKAGES: list[tuple[str, str, Callable[[Manifests], None]]] = [
    ("headless_service", "serviceName names no Service",
     lambda m: m.statefulset["spec"].update(serviceName="dicom-node-peers")),
    ("headless_service", "serviceName names the balancer",
     lambda m: m.statefulset["spec"].update(serviceName=_service(m, "lb")["metadata"]["name"])),
    ("selectors", "balancer selects other pods",
     lambda m: _service(m, "lb")["spec"]["selector"].update({"app.kubernetes.io/name": "other"})),
    ("selectors", "headless Service selects other pods",
     lambda m: _service(m, "headless")["spec"].update(selector={"app": "dicom-node"})),
    ("selectors", "pod label renamed",
     lambda m: m.statefulset["spec"]["template"]["metadata"].update(labels={"app": "dicom-node"})),
    ("selectors", "PDB selects other pods",
     lambda m: m.of_kind("PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"].update(
         {"app.kubernetes.io/name": "x"})),
    ("service_ports", "balancer targetPort misspelt",
     lambda m: _service(m, "lb")["spec"]["ports"][0].update(targetPort="dicm")),
    ("service_ports", "balancer to the http port",
     lambda m: _service(m, "lb")["spec"]["ports"][0].update(targetPort="http")),
    ("service_ports", "balancer over UDP",
     lambda m: _service(m, "lb")["spec"]["ports"][0].update(protocol="UDP")),
    ("config_mount", "volume names an undefined ConfigMap",
     lambda m: m.pod["volumes"][0]["configMap"].update(name="dicom-node-cfg")),
    ("config_mount", "item key not in the ConfigMap",
     lambda m: m.pod["volumes"][0]["configMap"]["items"][0].update(key="node.yml")),
    ("config_mount", "item path not the file serve reads",
     lambda m: m.pod["volumes"][0]["configMap"]["items"][0].update(path="config.yaml")),
    ("config_mount", "mounted elsewhere",
     lambda m: m.container["volumeMounts"][1].update(mountPath="/etc/dicom")),
    ("config_mount", "serve reads another file",
     lambda m: m.container["command"].__setitem__(3, "/etc/node.yaml")),
    ("probes", "readiness on a port the container lacks",
     lambda m: m.container["readinessProbe"]["httpGet"].update(port="metrics")),
    ("probes", "readiness on /metrics",
     lambda m: m.container["readinessProbe"]["httpGet"].update(path="/metrics")),
    ("probes", "liveness on /healthz",
     lambda m: m.container.update(livenessProbe={"httpGet": {"path": "/healthz", "port": "http"},
                                                 "failureThreshold": 30})),
    ("probes", "liveness on a port number the container lacks",
     lambda m: m.container["livenessProbe"]["tcpSocket"].update(port=11113)),
    ("probes", "impatient liveness",
     lambda m: m.container["livenessProbe"].update(failureThreshold=1)),
    ("node_yaml", "unknown key in node.yaml",
     lambda m: _edit_node_yaml(m, "spool_min_free:", "spool_minfree:")),
    ("node_yaml", "destination without a host",
     lambda m: _edit_node_yaml(m, "host: pacs.example.org", "hostname: pacs.example.org")),
    ("node_yaml", "node.name set",
     lambda m: _edit_node_yaml(m, "  ae_title: DICOM-NODE",
                               "  name: node-a\n  ae_title: DICOM-NODE")),
    ("node_yaml", "node.port not the container port",
     lambda m: _edit_node_yaml(m, "port: 11112   ", "port: 104   ")),
    ("node_yaml", "http only on loopback",
     lambda m: _edit_node_yaml(m, "http:\n  host: 0.0.0.0", "http:\n  host: 127.0.0.1")),
    ("node_yaml", "workers not the CPU limit",
     lambda m: _edit_node_yaml(m, "workers: 4", "workers: 0")),
    ("spool_on_claim", "spool outside the claim",
     lambda m: _edit_node_yaml(m, "spool: /var/lib/dicom-node/spool", "spool: /srv/spool")),
    ("spool_on_claim", "spool relative (to / with the parser's base)",
     lambda m: _edit_node_yaml(m, "spool: /var/lib/dicom-node/spool", "spool: ./spool")),
    ("spool_on_claim", "claim mounted read-only",
     lambda m: m.container["volumeMounts"][0].update(readOnly=True)),
    ("spool_on_claim", "claim template renamed",
     lambda m: m.statefulset["spec"]["volumeClaimTemplates"][0]["metadata"].update(name="data")),
    ("security", "writable root filesystem",
     lambda m: m.container["securityContext"].update(readOnlyRootFilesystem=False)),
    ("security", "root allowed",
     lambda m: (m.container["securityContext"].pop("runAsNonRoot"),
                m.pod["securityContext"].pop("runAsNonRoot"))),
    ("security", "a writable emptyDir",
     lambda m: m.container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})),
    ("security", "a capability added",
     lambda m: m.container["securityContext"]["capabilities"].update(add=["NET_BIND_SERVICE"])),
    ("termination", "grace period shorter than the wait and the stop",
     lambda m: m.pod.update(terminationGracePeriodSeconds=60)),
    ("termination", "no wait after the drain",
     lambda m: _set_prestop(m, f"dicom-node drain -c {CONFIG_PATH}")),
    ("termination", "wait shorter than readiness takes",
     lambda m: _set_prestop(m, f"dicom-node drain -c {CONFIG_PATH}; sleep 5")),
    ("termination", "drain reads another config",
     lambda m: _set_prestop(m, "dicom-node drain -c /etc/node.yaml; sleep 45")),
    ("termination", "no preStop",
     lambda m: m.container.pop("lifecycle")),
]  # fmt: skip


@pytest.mark.parametrize("check,what,breakage", BREAKAGES, ids=[b[1] for b in BREAKAGES])
def test_check_catches(check: str, what: str, breakage: Callable[[Manifests], None]) -> None:
    broken = Manifests(copy.deepcopy(manifests().docs))
    breakage(broken)
    assert CHECKS[check](broken), f"{check} did not notice: {what}"


def test_every_check_is_broken_at_least_once() -> None:
    assert {b[0] for b in BREAKAGES} == set(CHECKS)
