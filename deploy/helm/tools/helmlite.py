"""`helm template` for one chart without dependencies, on top of gotemplate.py.

What it reproduces from Helm 3: Chart.yaml checks (apiVersion v2, name, SemVer version,
a `>=` kubeVersion constraint), values files read the way Helm reads them (numbers become
float64, `null` in a later file deletes a default), deep merge of -f files, validation of
the merged values against values.schema.json (draft-07, as Helm does), the top-level
objects (.Values, .Release, .Chart, .Capabilities, .Template), rendering every file under
templates/ in one template namespace, skipping `_*` partials, rendering NOTES.txt apart,
removing "<no value>", and splitting the output into YAML documents the way Helm's
releaseutil does. .Files, subcharts and --set are not supported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from gofuncs import FUNCS, GoStruct, TemplateError
from goexec import Template


class ChartError(Exception):
    """The chart or its values are wrong (what `helm template` would refuse)."""


class _GoYamlLoader(yaml.SafeLoader):
    """SafeLoader adjusted toward go-yaml (what sigs.k8s.io/yaml uses): timestamps stay
    strings, and `1e3` is a float (YAML 1.1 in PyYAML wants a dot)."""


_GoYamlLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_GoYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def _go_values(v):
    """YAML -> JSON -> interface{}: map keys are strings, every number is a float64."""
    if isinstance(v, dict):
        return {str(k): _go_values(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_go_values(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    raise ChartError(f"unsupported YAML value {v!r}")


def read_values(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_GoYamlLoader)
    except yaml.YAMLError as e:
        raise ChartError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ChartError(f"{path}: values must be a mapping")
    return _go_values(data)


def coalesce(base: dict, over: dict) -> dict:
    """Helm's merge of a values file over the defaults (a null deletes the key)."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = coalesce(out[k], v)
        else:
            out[k] = v
    return out


_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
_CHART_FIELDS = {
    "apiVersion": "APIVersion", "name": "Name", "version": "Version", "appVersion": "AppVersion",
    "description": "Description", "type": "Type", "kubeVersion": "KubeVersion", "home": "Home",
    "icon": "Icon", "keywords": "Keywords", "sources": "Sources", "maintainers": "Maintainers",
    "annotations": "Annotations", "deprecated": "Deprecated",
}


@dataclass
class Manifest:
    source: str  # e.g. indexrelay/templates/worker-statefulset.yaml
    text: str
    obj: dict


@dataclass
class Rendered:
    manifests: list
    notes: str

    def as_yaml(self) -> str:
        return "".join(f"---\n# Source: {m.source}\n{m.text}\n" for m in self.manifests)


class Chart:
    """A chart directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_path = self.path / "Chart.yaml"
        meta = yaml.safe_load(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ChartError(f"{meta_path}: not a mapping")
        for key in ("apiVersion", "name", "version"):
            if not meta.get(key):
                raise ChartError(f"{meta_path}: {key} is required")
        if meta["apiVersion"] != "v2":
            raise ChartError(f"{meta_path}: apiVersion must be v2")
        if not _SEMVER.match(str(meta["version"])):
            raise ChartError(f"{meta_path}: version {meta['version']!r} is not SemVer")
        unknown = set(meta) - set(_CHART_FIELDS) - {"dependencies"}
        if unknown:
            raise ChartError(f"{meta_path}: unknown fields {sorted(unknown)}")
        self.meta = meta
        self.name = meta["name"]
        schema_path = self.path / "values.schema.json"
        self.schema = json.loads(schema_path.read_text()) if schema_path.exists() else None
        if self.schema is not None:
            jsonschema.Draft7Validator.check_schema(self.schema)

    def values(self, value_files=()) -> dict:
        """Defaults merged with `value_files` in order, validated against the schema."""
        vals = read_values(self.path / "values.yaml")
        for f in value_files:
            vals = coalesce(vals, read_values(Path(f)))
        if self.schema is not None:
            errors = sorted(jsonschema.Draft7Validator(self.schema).iter_errors(vals), key=lambda e: list(e.path))
            if errors:
                lines = [f"- {'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}" for e in errors]
                raise ChartError("values don't meet the specifications of the schema(s):\n" + "\n".join(lines))
        return vals

    def _check_kube_version(self, kube_version: str):
        constraint = self.meta.get("kubeVersion")
        if not constraint:
            return
        m = re.fullmatch(r">=\s*v?(\d+)\.(\d+)\.(\d+)(-0)?", str(constraint).strip())
        if not m:
            raise ChartError(f"kubeVersion {constraint!r}: only '>= X.Y.Z-0' is supported here")
        have = tuple(int(x) for x in _SEMVER.match(kube_version).groups()[:3])
        if have < tuple(int(x) for x in m.groups()[:3]):
            raise ChartError(f"chart requires kubeVersion {constraint} which is incompatible with {kube_version}")

    def render(self, value_files=(), release: str = "indexrelay", namespace: str = "default",
               kube_version: str = "1.31.0") -> Rendered:
        if not _SEMVER.match(kube_version):
            raise ChartError(f"bad Kubernetes version {kube_version!r}")
        self._check_kube_version(kube_version)
        values = self.values(value_files)
        major, minor = _SEMVER.match(kube_version).groups()[:2]
        chart = GoStruct("*chart.Metadata", {go: self.meta.get(k) for k, go in _CHART_FIELDS.items()})
        api_versions = _builtin_api_versions()
        caps = GoStruct("*chartutil.Capabilities", {
            "KubeVersion": GoStruct("chartutil.KubeVersion", {
                "Version": f"v{kube_version.lstrip('v')}", "Major": major, "Minor": minor,
                "GitVersion": f"v{kube_version.lstrip('v')}",
            }),
            "APIVersions": GoStruct("chartutil.VersionSet", {"Has": lambda v: v in api_versions}),
        })
        release_obj = {"Name": release, "Namespace": namespace, "IsUpgrade": False, "IsInstall": True,
                       "Revision": 1, "Service": "Helm"}
        tmpl_dir = self.path / "templates"
        files = sorted(p for p in tmpl_dir.rglob("*") if p.is_file())
        t = Template(dict(FUNCS))
        names = {}
        for p in files:
            name = f"{self.name}/{p.relative_to(self.path).as_posix()}"
            names[p] = name
            t.add(name, p.read_text())
        manifests, notes = [], ""
        for p in files:
            name = names[p]
            if p.name.startswith("_"):
                continue
            top = {
                "Values": values, "Release": release_obj, "Chart": chart, "Capabilities": caps,
                "Template": {"Name": name, "BasePath": f"{self.name}/templates"},
            }
            try:
                out = t.execute_file(name, top).replace("<no value>", "")
            except TemplateError as e:
                raise ChartError(f"{name}: {e}") from None
            if p.name == "NOTES.txt":
                notes = out
                continue
            for doc in split_manifests(out):
                try:
                    obj = yaml.load(doc, Loader=_StrictLoader)
                except yaml.YAMLError as e:
                    raise ChartError(f"YAML parse error on {name}: {e}\n--- rendered ---\n{doc}") from None
                if obj is None:
                    continue
                if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
                    raise ChartError(f"{name}: a rendered document is not a Kubernetes object:\n{doc}")
                manifests.append(Manifest(name, doc, obj))
        order = {k: i for i, k in enumerate(INSTALL_ORDER)}
        manifests.sort(key=lambda m: order.get(m.obj["kind"], len(order)))  # stable, like Helm
        return Rendered(manifests, notes)


class _StrictLoader(yaml.SafeLoader):
    """Rejects duplicate keys in rendered manifests (the Kubernetes API's YAML decoder does)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Helm's releaseutil.InstallOrder: the order `helm template` prints kinds in.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole", "ClusterRoleList",
    "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList",
    "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
]

_SPLIT = re.compile(r"(?:^|\s*\n)---\s*")


def split_manifests(text: str) -> list:
    """releaseutil.SplitManifests: documents with content, trimmed."""
    return [d.strip() for d in _SPLIT.split(text) if d.strip()]


def _builtin_api_versions() -> set:
    return {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1"}
