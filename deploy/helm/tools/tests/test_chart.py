"""The IndexRelay chart: renders for the default values and every ci/*-values.yaml, passes
`kubernetes-validate --strict`, holds together (selectors, ports, volumes, names, probes),
uses only flags the binaries have, and refuses bad values.

The flag check runs the real binaries' --help: set INDEXRELAY_BIN_DIR to the folder with
`coordinator` and `worker` (deploy/helm/check.sh and .ci/run do).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helmlite import Chart, ChartError

HERE = Path(__file__).resolve().parent
CHART_DIR = HERE.parent.parent / "indexrelay"
CASES = [None] + sorted(str(p.relative_to(CHART_DIR)) for p in (CHART_DIR / "ci").glob("*-values.yaml"))
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion: gRPC probes are GA in 1.27)
# and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
LONG_RELEASE = "team-search-production-indexrelay-deepseek-v32-large"


def render(case, release="indexrelay", kube="1.31.0", namespace="inference"):
    files = [CHART_DIR / case] if case else []
    return Chart(CHART_DIR).render(files, release=release, namespace=namespace, kube_version=kube)


def values_of(case):
    return Chart(CHART_DIR).values([CHART_DIR / case] if case else [])


def by_kind(r, kind):
    return [m.obj for m in r.manifests if m.obj["kind"] == kind]


def kubernetes_validate(paths, version):
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True)


# ---------------------------------------------------------------------------------------
# Rendering and schema validation of the output
# ---------------------------------------------------------------------------------------


def test_cases_include_default_and_multi_replica():
    assert None in CASES and "ci/multi-replica-values.yaml" in CASES


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_renders_and_passes_kubernetes_validate_strict(case, kube, tmp_path):
    r = render(case, kube=kube)
    kinds = sorted({m.obj["kind"] for m in r.manifests})
    assert {"Deployment", "Service", "StatefulSet"} <= set(kinds)
    out = tmp_path / "manifests.yaml"
    out.write_text(r.as_yaml())
    res = kubernetes_validate([out], kube)
    assert res.returncode == 0, f"kubernetes-validate failed:\n{res.stdout}\n{res.stderr}\n--- manifests ---\n{out.read_text()}"


@pytest.mark.parametrize(
    "breakage",
    ["unknown container field", "replicas as text", "probe without an action"],
)
def test_kubernetes_validate_rejects_broken_manifests(breakage, tmp_path):
    """The validator is live: a manifest broken after rendering fails it."""
    r = render(None)
    docs = [copy.deepcopy(m.obj) for m in r.manifests]
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("worker-0"))
    container = sts["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown container field":
        container["gpus"] = 1
    elif breakage == "replicas as text":
        sts["spec"]["replicas"] = "two"
    else:
        container["startupProbe"] = {"grpc": {"port": "grpc"}}  # gRPC probes need a number
    out = tmp_path / "broken.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    res = kubernetes_validate([out], KUBE_VERSIONS[-1])
    assert res.returncode != 0, res.stdout


@pytest.mark.parametrize("case", CASES)
def test_notes_render(case):
    r = render(case)
    v = values_of(case)
    assert "port-forward svc/indexrelay " in r.notes
    assert f"{int(v['pipeline']['stages'])} stage(s)" in r.notes
    assert "<no value>" not in r.notes


# ---------------------------------------------------------------------------------------
# Topology: what the chart promises
# ---------------------------------------------------------------------------------------


def args_of(container):
    """Flag -> value(s) of a container's args (flags given as `--f v` or `--f=v`)."""
    out, args, i = {}, container.get("args", []), 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            out[a] = nxt
            i += 1 if nxt is not None else 0
        i += 1
    return out


@pytest.mark.parametrize("case", CASES)
def test_one_coordinator_and_one_worker_statefulset_per_pipeline(case):
    v = values_of(case)
    r = render(case)
    replicas, stages = int(v["pipeline"]["replicas"]), int(v["pipeline"]["stages"])
    workers = [s for s in by_kind(r, "StatefulSet") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    coords = by_kind(r, "Deployment")
    assert len(workers) == replicas and len(coords) == replicas
    prefixes = set()
    for p in range(replicas):
        sts = next(s for s in workers if s["metadata"]["labels"]["indexrelay.io/pipeline"] == str(p))
        dep = next(d for d in coords if d["metadata"]["labels"]["indexrelay.io/pipeline"] == str(p))
        assert sts["spec"]["replicas"] == stages, "one pod per stage"
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        w = args_of(sts["spec"]["template"]["spec"]["containers"][0])
        c = args_of(dep["spec"]["template"]["spec"]["containers"][0])
        assert c["--stages"] == str(stages)
        # Coordinator and workers of one pipeline meet under one etcd prefix; pipelines differ.
        assert w["--etcd-prefix"] == c["--etcd-prefix"] and w["--etcd"] == c["--etcd"]
        prefixes.add(w["--etcd-prefix"])
        assert w["--model-name"] == c["--served-model-name"] == v["model"]["servedName"]
        assert w.get("--index-pattern") == c.get("--index-pattern") == (v["model"]["indexPattern"] or None)
        assert w["--kv-blocks"] == str(int(v["workers"]["kvBlocks"]))
        assert w["--device"] == v["workers"]["device"]
        assert float(w["--gpu-memory-fraction"]) == float(v["workers"]["gpuMemoryFraction"])
        if v["pipeline"]["split"]:
            assert c["--split"] == ",".join(str(int(x)) for x in v["pipeline"]["split"])
        if v["model"]["source"] == "embedded":
            assert "--model" not in w and "--model" not in c
        else:
            assert w["--model"] == c["--model"] == v["model"]["mountPath"]
    assert len(prefixes) == replicas


@pytest.mark.parametrize("case", CASES)
def test_gpu_resources(case):
    v = values_of(case)
    gpus = int(v["workers"]["gpu"]["count"])
    for sts in by_kind(render(case), "StatefulSet"):
        if sts["metadata"]["labels"]["app.kubernetes.io/component"] != "worker":
            continue
        res = sts["spec"]["template"]["spec"]["containers"][0]["resources"]
        got = res.get("limits", {}).get(v["workers"]["gpu"]["resourceName"])
        assert got == (gpus if gpus else None)


@pytest.mark.parametrize("case", CASES)
def test_etcd_endpoints(case):
    v = values_of(case)
    r = render(case)
    etcd_sts = [s for s in by_kind(r, "StatefulSet") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "etcd"]
    dep = by_kind(r, "Deployment")[0]
    endpoints = args_of(dep["spec"]["template"]["spec"]["containers"][0])["--etcd"].split(",")
    if v["etcd"]["enabled"]:
        assert len(etcd_sts) == 1
        n = int(v["etcd"]["replicas"])
        assert etcd_sts[0]["spec"]["replicas"] == n and len(endpoints) == n
        svc = etcd_sts[0]["spec"]["serviceName"]
        for i, url in enumerate(endpoints):
            assert url == f"http://{etcd_sts[0]['metadata']['name']}-{i}.{svc}.inference.svc.{v['clusterDomain']}:2379"
    else:
        assert not etcd_sts
        assert endpoints == v["etcd"]["external"]["endpoints"]


@pytest.mark.parametrize("case", CASES)
def test_probes_never_kill_a_loading_worker(case):
    for sts in by_kind(render(case), "StatefulSet"):
        if sts["metadata"]["labels"]["app.kubernetes.io/component"] != "worker":
            continue
        c = sts["spec"]["template"]["spec"]["containers"][0]
        port = c["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}
        s = c["startupProbe"]
        assert s["periodSeconds"] * s["failureThreshold"] >= 1800, "start-up budget under 30 minutes"
    for dep in by_kind(render(case), "Deployment"):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert "grpc" in c["livenessProbe"], "a stage being down must not restart the coordinator"


# ---------------------------------------------------------------------------------------
# Internal consistency Kubernetes schemas do not check
# ---------------------------------------------------------------------------------------

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def pod_templates(r):
    for m in r.manifests:
        if m.obj["kind"] in ("Deployment", "StatefulSet"):
            yield m.obj, m.obj["spec"]["template"]


@pytest.mark.parametrize("release", ["indexrelay", LONG_RELEASE])
@pytest.mark.parametrize("case", CASES)
def test_consistency(case, release):
    r = render(case, release=release)
    templates = list(pod_templates(r))
    services = by_kind(r, "Service")
    names = [(m.obj["kind"], m.obj["metadata"]["name"]) for m in r.manifests]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for kind, name in names:
        assert len(name) <= 63 and DNS1123_LABEL.match(name), name
        if kind == "Service":
            assert DNS1035_LABEL.match(name), name
    for obj, tmpl in templates:
        labels = tmpl["metadata"]["labels"]
        sel = obj["spec"]["selector"]["matchLabels"]
        assert all(labels.get(k) == v for k, v in sel.items()), f"{obj['metadata']['name']}: selector misses its pods"
        if obj["kind"] == "StatefulSet":
            # Pods get a controller-revision-hash label of <name>-<10 chars>: at most 63.
            assert len(obj["metadata"]["name"]) <= 52
            last_pod = f"{obj['metadata']['name']}-{obj['spec']['replicas'] - 1}"
            assert len(last_pod) <= 63 and DNS1123_LABEL.match(last_pod)
            svc = next(s for s in services if s["metadata"]["name"] == obj["spec"]["serviceName"])
            assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        spec = tmpl["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            for vm in c.get("volumeMounts", []):
                assert vm["name"] in volumes, f"{c['name']}: mount of unknown volume {vm['name']}"
            env = {e["name"] for e in c.get("env", [])}
            for ref in re.findall(r"\$\((\w+)\)", " ".join(c.get("args", []) + c.get("command", []))):
                assert ref in env, f"{c['name']}: $({ref}) is not defined in env, Kubernetes would not expand it"
    secrets = {s["metadata"]["name"]: s for s in by_kind(r, "Secret")}
    external = values_of(case)["coordinator"]["admin"]["existingSecret"]
    for _, tmpl in templates:
        for c in tmpl["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] != external:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], f"env {e['name']}: no such Secret key"
    for svc in services:
        pods = [t for _, t in templates if all(t["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            named = {p["name"] for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in named, f"{svc['metadata']['name']}: no container port {port['targetPort']}"


# ---------------------------------------------------------------------------------------
# Flags: every flag the chart passes exists in the binaries
# ---------------------------------------------------------------------------------------


def bin_dir():
    d = os.environ.get("INDEXRELAY_BIN_DIR")
    if not d:
        pytest.fail("set INDEXRELAY_BIN_DIR to the folder holding the coordinator and worker binaries "
                     "(deploy/helm/check.sh does), e.g. target/debug after `cargo build -p coordinator -p worker`")
    return Path(d)


def help_flags(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", out))


@pytest.mark.parametrize("case", CASES)
def test_flags_exist_in_the_binaries(case):
    d = bin_dir()
    coordinator, worker = d / "coordinator", d / "worker"
    for b in (coordinator, worker):
        assert b.exists(), f"{b} is missing: build with `cargo build -p coordinator -p worker`"
    coord_flags = help_flags(str(coordinator), "--help")
    serve_flags = help_flags(str(worker), "serve", "--help")
    assert {"--etcd", "--stages"} <= coord_flags and {"--etcd", "--advertise"} <= serve_flags, "help parsing broke"
    v = values_of(case)
    extra = set(v["coordinator"]["extraArgs"]) | set(v["workers"]["extraArgs"])
    for obj, tmpl in pod_templates(render(case)):
        c = tmpl["spec"]["containers"][0]
        comp = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        if comp == "etcd":
            continue
        args = c["args"]
        if comp == "worker":
            assert args[0] == "serve"
            args = args[1:]
        known = serve_flags if comp == "worker" else coord_flags
        used = {a.split("=")[0] for a in args if a.startswith("--") and a not in extra}
        assert used <= known, f"{comp}: flags the binary does not have: {sorted(used - known)}"


# ---------------------------------------------------------------------------------------
# Bad values fail (values.schema.json, or a template `fail` for cross-field rules)
# ---------------------------------------------------------------------------------------

BAD_VALUES = [
    ("stages < 1", "pipeline: {stages: 0}", "pipeline.stages"),
    ("stages not a number", "pipeline: {stages: two}", "pipeline.stages"),
    ("replicas < 1", "pipeline: {replicas: 0}", "pipeline.replicas"),
    ("unknown top-level key", "worker: {port: 7001}", "'worker' was unexpected"),
    ("unknown nested key", "workers: {gpus: 1}", "'gpus' was unexpected"),
    ("required section removed", "workers: null", "'workers' is a required property"),
    ("required field removed", "coordinator: {grpcPort: null}", "'grpcPort' is a required property"),
    ("unknown model source", "model: {source: s3}", "model.source"),
    ("hostPath without a path", "model: {source: hostPath}", "model.hostPath.path"),
    ("pvc without a claim", "model: {source: pvc}", "model.pvc.claimName"),
    ("download without urls", "model: {source: download}", "model.download.urls"),
    ("pattern starting with S", "model: {indexPattern: SFFF}", "model.indexPattern"),
    ("pattern with other letters", "model: {indexPattern: FXS}", "model.indexPattern"),
    ("external etcd without endpoints", "etcd: {enabled: false}", "etcd.external.endpoints"),
    ("etcd over TLS", "etcd: {enabled: false, external: {endpoints: ['https://e:2379']}}", "etcd.external.endpoints.0"),
    ("even etcd cluster", "etcd: {replicas: 2}", "etcd.replicas"),
    ("port out of range", "workers: {port: 70000}", "workers.port"),
    ("zero KV blocks", "workers: {kvBlocks: 0}", "workers.kvBlocks"),
    ("negative GPUs", "workers: {gpu: {count: -1}}", "workers.gpu.count"),
    ("unknown device", "workers: {device: gpu0}", "workers.device"),
    ("GPU memory fraction above 1", "workers: {gpuMemoryFraction: 1.5}", "workers.gpuMemoryFraction"),
    ("GPU memory fraction of 0", "workers: {gpuMemoryFraction: 0}", "workers.gpuMemoryFraction"),
    ("probe that never fails", "workers: {probes: {startup: {failureThreshold: 0}}}", "workers.probes.startup.failureThreshold"),
    ("admin token given twice", "coordinator: {admin: {existingSecret: s, token: t}}", "coordinator.admin"),
    ("bad OTLP endpoint", "tracing: {otlpEndpoint: collector:4317}", "tracing.otlpEndpoint"),
    # Cross-field rules, enforced by `fail` in templates/_helpers.tpl.
    ("split does not match stages", "pipeline: {stages: 3, split: [4]}", "pipeline.split has 1 boundaries"),
    ("same port twice", "coordinator: {grpcPort: 8000}", "must differ"),
    ("GPU set twice", "workers: {resources: {limits: {nvidia.com/gpu: 2}}}", "workers.gpu.count"),
]


@pytest.mark.parametrize("what,override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_fail(what, override, message, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(override + "\n")
    with pytest.raises(ChartError) as e:
        Chart(CHART_DIR).render([f])
    assert message in str(e.value), str(e.value)


def test_good_neighbours_of_the_bad_values_render(tmp_path):
    """The bad cases fail for the field they change: the same fields set right render."""
    good = [
        "pipeline: {stages: 1}", "pipeline: {replicas: 2}", "model: {source: hostPath, hostPath: {path: /m}}",
        "model: {source: pvc, pvc: {claimName: c}}", "model: {source: download, download: {urls: ['https://x/c.json']}}",
        "model: {indexPattern: FSSF}", "etcd: {enabled: false, external: {endpoints: ['http://e:2379']}}",
        "etcd: {replicas: 3}", "workers: {port: 7002, kvBlocks: 1, gpu: {count: 0}}",
        "tracing: {otlpEndpoint: 'http://collector:4317'}", "pipeline: {stages: 3, split: [4, 8]}",
        "coordinator: {grpcPort: 8001}", "workers: {resources: {limits: {memory: 1Gi}}}",
        "coordinator: {admin: {existingSecret: s}}", "coordinator: {admin: {token: t}}",
    ]
    for i, override in enumerate(good):
        f = tmp_path / f"good{i}.yaml"
        f.write_text(override + "\n")
        assert Chart(CHART_DIR).render([f]).manifests, override
