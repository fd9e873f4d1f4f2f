"""Offline checks for the Kubernetes manifests in deploy/k8s and the Grafana
dashboards in deploy/grafana.

Run:  python -m pytest -q deploy/test_manifests.py
(needs the pins in deploy/requirements-test.txt; no cluster, no network,
no kustomize binary).

deploy/k8s holds three modes (MODES), each a kustomization over the shared
deploy/k8s/base: split (also deploy/k8s itself), embedded and scale. Most
tests below run once per mode.

Four layers:

(a) ``render()`` builds a kustomization in pure Python, for exactly the
    kustomize features the modes use (resources that are files or other
    kustomizations, namespace, labels, images, strategic merge patches),
    following kustomize v5's own rules (cited per function). Anything else in
    a kustomization is refused, so the renderer can never silently ignore a
    feature someone adds later. Where a ``kubectl`` with built-in kustomize is
    on PATH, the output for every mode is also compared with the real thing.
(b) Every rendered object of every mode is validated against the Kubernetes
    OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown fields
    are errors; the schemas come with the package, so this needs no network),
    and deliberately broken copies must be rejected, so the validator is known
    to be able to fail. KEDA's objects are custom resources that those schemas
    do not cover; they are validated, just as strictly, against the subset of
    the KEDA v2 API written out below (KEDA_SCHEMAS).
(c) What an operator would trip over: ports, selectors, probes, the wiring
    between the services, the database Secret, the GPU pool, hardening, and
    security: TLS on every server from a mounted Secret, https:// between the
    services with the right CA, the internal token and the worker tokens from
    Secrets, no --insecure/--no-auth, and placeholders that cannot be used.
    Autoscaling: each worker pool has a ScaledObject whose triggers describe
    exactly the task types, versions, labels and slots its workers register
    (read from examples/room-scan), pointed at the executor over TLS. The
    modes: a scheduler in each; the embedded server's database on its volume;
    every `dagmesh executor` advertising its pod IP to the other replicas
    (a standby forwards every call to the lease holder) and checking their
    certificate by the Service's name; the scale mode's executors behind an
    ordinary ClusterIP Service, schedulers, disruption budgets, and
    NetworkPolicies that admit every connection the manifests make (derived
    from the pods' URLs, the executors' advertised URL, KEDA's scalerAddress
    and the scrape annotations) and nothing else into the metastore.
(d) The Grafana dashboards: canonical JSON, unique panel ids, and PromQL that
    names only the metrics dagmesh exports (METRICS), with their own labels.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

HERE = Path(__file__).resolve().parent
K8S = HERE / "k8s"
# The modes, each a kustomization over deploy/k8s/base; deploy/k8s itself is
# the split mode.
MODES = {"split": K8S / "split", "embedded": K8S / "embedded", "scale": K8S / "scale"}
# The modes on PostgreSQL, with a metastore of their own.
PG_MODES = ("split", "scale")
GRAFANA = HERE / "grafana"
ROOM_SCAN = HERE.parent / "examples" / "room-scan"

IMAGE = "ghcr.io/dagmesh/dagmesh"
NAMESPACE = "dagmesh"
PART_OF = ("app.kubernetes.io/part-of", "dagmesh")

# Oldest Kubernetes the manifests claim to support (1.30, a version every
# managed offering still runs) and the newest schema set the pinned
# kubernetes-validate ships.
K8S_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))


# --------------------------------------------------------------------------
# (a) a small kustomize renderer
# --------------------------------------------------------------------------


class UnsupportedKustomization(Exception):
    """The kustomization uses a feature this renderer does not implement."""


SUPPORTED_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "images",
    "patches",
}

# Kinds the renderer knows the scope of. kustomize decides scope from its
# built-in OpenAPI data; we keep an explicit list and refuse anything else
# (a RoleBinding, for instance, would also need its subjects re-namespaced).
CLUSTER_SCOPED_KINDS = {"Namespace"}
# KEDA's custom resources (keda.sh/v1alpha1) are namespaced; kustomize, which
# has no schema for them, treats every kind it does not know as namespaced.
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
NAMESPACED_KINDS = {
    "ConfigMap", "Secret", "Service", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget",
    "NetworkPolicy",
} | KEDA_KINDS

# kustomize's "templateLabels" field specs that apply to these kinds
# (api/konfig/builtinpluginconsts/metadatalabels.go).
TEMPLATE_LABEL_KINDS = {"Deployment"}

# Legacy sort order, the default of `kustomize build` / `kubectl kustomize`
# (api/internal/builtins/SortOrderTransformer.go: defaultOrderFirst/Last).
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition",
    "ServiceAccount", "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding",
    "ClusterRoleBinding", "ConfigMap", "Secret", "Endpoints", "Service",
    "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
TYPE_ORDERS = {
    **{k: -len(ORDER_FIRST) + i for i, k in enumerate(ORDER_FIRST)},
    **{k: 1 + i for i, k in enumerate(ORDER_LAST)},
}


def _group_version(api_version: str) -> tuple[str, str]:
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def _legacy_sort_key(obj: dict) -> tuple:
    """kustomize's legacyIDSorter: kind rank, then group_version_kind, then
    "Kind.version.group|namespace|name"."""
    group, version = _group_version(obj["apiVersion"])
    kind = obj["kind"]
    gvk_sort = "_".join([group or "~G", version or "~V", kind or "~K"])
    gvk_string = ".".join([kind or "[noKind]", version or "[noVer]", group or "[noGrp]"])
    meta = obj.get("metadata", {})
    id_string = "|".join([gvk_string, meta.get("namespace") or "~X", meta.get("name") or "~N"])
    return (TYPE_ORDERS.get(kind, 0), gvk_sort, id_string)


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest), as kustomize's api/image.Split: a ':' before the
    first '/' belongs to a registry host:port, not to a tag."""
    slash = image.find("/")
    offset = slash if slash > 0 else 0
    search = image[offset:]
    at = search.find("@")
    colon = search.find(":")
    if colon < 0 and at < 0:
        return image, "", ""
    if at >= 0 and (colon < 0 or at < colon):
        return image[: offset + at], "", image[offset + at + 1 :]
    if at >= 0:
        return image[: offset + colon], image[offset + colon + 1 : offset + at], image[offset + at + 1 :]
    return image[: offset + colon], image[offset + colon + 1 :], ""


def image_matches(image: str, name: str) -> bool:
    """kustomize's api/image.IsImageMatched: the same name, with any tag and
    digest (kustomize does not escape the name; no name here has regex
    metacharacters other than '.', which matches itself either way)."""
    pattern = "^" + re.escape(name) + r"(:[a-zA-Z0-9_.{}-]*)?(@sha256:[a-zA-Z0-9_.{}-]*)?$"
    return re.match(pattern, image) is not None


def transform_image(image: str, rule: dict) -> str:
    """kustomize's imageTagUpdater.SetImageValue."""
    if not image_matches(image, rule["name"]):
        return image
    name, tag, digest = split_image(image)
    if rule.get("newName"):
        name = rule["newName"]
    new_tag = str(rule["newTag"]) if rule.get("newTag") not in (None, "") else ""
    new_digest = rule.get("digest") or ""
    if new_tag and new_digest:
        tag, digest = new_tag, new_digest
    elif new_tag:
        tag, digest = new_tag, ""
    elif new_digest:
        tag, digest = "", new_digest
    if tag:
        name += ":" + tag
    if digest:
        name += "@" + digest
    return name


def _walk_containers(node, rule: dict) -> None:
    """kustomize's imagetag.LegacyFilter: every `image` of every element of
    any sequence named `containers` or `initContainers`, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            _walk_containers(value, rule)
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = transform_image(container["image"], rule)
    elif isinstance(node, list):
        for item in node:
            _walk_containers(item, rule)


def _load_resource_file(path: Path) -> list[dict]:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            raise UnsupportedKustomization(f"{path}: not a Kubernetes object: {doc!r:.80}")
    return docs


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# --- strategic merge patches ----------------------------------------------
#
# kustomize applies a patch that names its object (apiVersion, kind,
# metadata.name) as a strategic merge patch (kyaml's merge2 with the
# Kubernetes schema): maps merge key by key, `null` removes a field, and a
# list is merged element by element on its patch merge key where the schema
# gives one, and replaced otherwise. This renderer knows the merge keys of the
# lists below only. A patch that would merge into any other list that is
# already there is refused rather than guessed at (a list the object does not
# have yet is simply set, which every strategy agrees on). Directives
# ($patch, $retainKeys, ...) are refused too.

# The field that holds the list -> its patch merge key (x-kubernetes-patch-merge-key).
SMP_MERGE_KEYS = {
    "containers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
# Lists of scalars that a patch replaces whole (no merge strategy in the schema).
SMP_ATOMIC_LISTS = {"args", "command"}


def _without_nulls(value, where: tuple):
    """A patch value for a field the object does not have: nulls dropped (they
    remove nothing), directives refused."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if str(key).startswith("$"):
                raise UnsupportedKustomization(f"patch directive {key} at {'.'.join(where)}")
            if item is not None:
                out[key] = _without_nulls(item, where + (key,))
        return out
    if isinstance(value, list):
        return [_without_nulls(item, where) for item in value]
    return copy.deepcopy(value)


def _merge_list(dest: list, patch: list, where: tuple) -> list:
    field = where[-1]
    if field in SMP_ATOMIC_LISTS:
        return _without_nulls(patch, where)
    key = SMP_MERGE_KEYS.get(field)
    if key is None:
        raise UnsupportedKustomization(
            f"a patch of the list {'.'.join(where)}: this renderer does not know how kustomize merges it")
    # kyaml's order: the patch's elements first (merged into the object's
    # element with the same key, if any), then the object's other elements.
    merged, taken = [], set()
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise UnsupportedKustomization(f"{'.'.join(where)}: every element of the patch needs its {key}")
        match = [i for i, d in enumerate(dest) if isinstance(d, dict) and d.get(key) == item[key]]
        if match:
            taken.add(match[0])
            strategic_merge(dest[match[0]], item, where)
            merged.append(dest[match[0]])
        else:
            merged.append(_without_nulls(item, where))
    return merged + [d for i, d in enumerate(dest) if i not in taken]


def strategic_merge(dest: dict, patch: dict, where: tuple = ()) -> None:
    """Merge `patch` into `dest` in place, as kustomize's strategic merge does
    for the subset described above."""
    for key, value in patch.items():
        if str(key).startswith("$"):
            raise UnsupportedKustomization(f"patch directive {key} at {'.'.join(where) or '.'}")
        here = where + (key,)
        if value is None:
            dest.pop(key, None)
        elif isinstance(value, dict) and isinstance(dest.get(key), dict):
            strategic_merge(dest[key], value, here)
        elif isinstance(value, list) and isinstance(dest.get(key), list):
            dest[key] = _merge_list(dest[key], value, here)
        else:
            dest[key] = _without_nulls(value, here)


def _apply_patches(directory: Path, kfile: Path, entries: list, objects: list[dict]) -> None:
    """kustomize's PatchTransformer, for strategic merge patches without a
    target: each patch document goes to the one object with its apiVersion,
    kind and name (and namespace, if the patch gives one)."""
    for entry in entries:
        extra = set(entry) - {"path", "patch"}
        if extra:
            raise UnsupportedKustomization(f"{kfile}: patches entry with {sorted(extra)} is not supported")
        if ("path" in entry) == ("patch" in entry):
            raise UnsupportedKustomization(f"{kfile}: a patches entry needs one of path or patch")
        if "path" in entry:
            path = (directory / entry["path"]).resolve()
            if not _inside(path, directory) or not path.is_file():
                raise UnsupportedKustomization(f"{kfile}: patch {entry['path']!r} is not a file under {directory}")
            text = path.read_text()
        else:
            text = entry["patch"]
        for patch in (d for d in yaml.safe_load_all(text) if d is not None):
            if not isinstance(patch, dict) or not {"apiVersion", "kind", "metadata"} <= set(patch):
                raise UnsupportedKustomization(
                    f"{kfile}: only strategic merge patches that name their object are supported "
                    f"(not JSON 6902 patches): {patch!r:.80}")
            meta = patch["metadata"]
            targets = [
                o for o in objects
                if o["apiVersion"] == patch["apiVersion"] and o["kind"] == patch["kind"]
                and o["metadata"].get("name") == meta.get("name")
                and meta.get("namespace") in (None, o["metadata"].get("namespace"))
            ]
            if len(targets) != 1:
                raise ValueError(f"{kfile}: patch of {patch['kind']}/{meta.get('name')} "
                                 f"matches {len(targets)} objects")
            strategic_merge(targets[0], patch)


def _check_unique(objects: list[dict]) -> None:
    # kustomize refuses two objects with the same id.
    seen = set()
    for obj in objects:
        ident = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"].get("name"))
        if ident in seen:
            raise ValueError(f"duplicate resource id {ident}")
        seen.add(ident)


def _build(directory: Path, visited: tuple[Path, ...]) -> list[dict]:
    """The objects of the kustomization in `directory`, unsorted."""
    directory = directory.resolve()
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise UnsupportedKustomization(f"{directory}: no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - SUPPORTED_KUSTOMIZATION_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{kfile}: fields not supported by this renderer: {sorted(unknown)}")
    if kust.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedKustomization(f"{kfile}: kind {kust.get('kind')!r}")
    visited = visited + (directory,)

    objects: list[dict] = []
    for entry in kust.get("resources", []):
        if "://" in entry or entry.startswith("git@"):
            raise UnsupportedKustomization(f"{kfile}: resource {entry!r} is not local")
        path = (directory / entry).resolve()
        if path.is_dir():
            # A base may be anywhere (api/loader/fileloader.go), but not in a
            # directory that holds a kustomization already being built:
            # kustomize calls that a cycle ("candidate root ... contains
            # visited root"), so an overlay cannot sit inside its own base.
            for root in visited:
                if _inside(root, path):
                    raise UnsupportedKustomization(f"{kfile}: cycle detected: {path} contains {root}")
            objects.extend(_build(path, visited))
        elif path.is_file():
            # LoadRestrictionsRootOnly, kustomize's default: files only from
            # the kustomization's own directory tree.
            if not _inside(path, directory):
                raise UnsupportedKustomization(f"{kfile}: file {entry!r} is outside {directory}")
            objects.extend(_load_resource_file(path))
        else:
            raise UnsupportedKustomization(f"{kfile}: resource {entry!r} does not exist")

    for obj in objects:
        kind = obj["kind"]
        if kind not in CLUSTER_SCOPED_KINDS | NAMESPACED_KINDS:
            raise UnsupportedKustomization(f"kind {kind} is not supported by this renderer")
        obj.setdefault("metadata", {})
    _check_unique(objects)

    # The builtin transformers, in kustomize's order: patches first, then
    # namespace, labels and images.
    _apply_patches(directory, kfile, kust.get("patches", []), objects)

    # namespace: api/filters/namespace. metadata.namespace on namespaced
    # objects (overwriting any value), and a v1 Namespace is renamed.
    namespace = kust.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] == "Namespace":
                if obj["apiVersion"] == "v1":
                    obj["metadata"]["name"] = namespace
            else:
                obj["metadata"]["namespace"] = namespace

    # labels: kusttarget_configplugin.go. Without includeSelectors the pairs
    # go to metadata.labels of every object and, with includeTemplates, to
    # the pod template labels; selectors are never touched.
    for entry in kust.get("labels", []):
        extra = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
        if extra or entry.get("includeSelectors"):
            raise UnsupportedKustomization(
                f"labels entry {entry!r}: only pairs/includeTemplates are supported")
        pairs = {str(k): str(v) for k, v in entry.get("pairs", {}).items()}
        for obj in objects:
            labels = obj["metadata"].get("labels") or {}
            labels.update(pairs)
            obj["metadata"]["labels"] = labels
            if entry.get("includeTemplates") and obj["kind"] in TEMPLATE_LABEL_KINDS:
                template_meta = obj.setdefault("spec", {}).setdefault("template", {}).setdefault("metadata", {})
                template_labels = template_meta.get("labels") or {}
                template_labels.update(pairs)
                template_meta["labels"] = template_labels

    # images: api/filters/imagetag (the legacy walk; for Deployments the
    # field-spec pass that follows it touches the same fields).
    for rule in kust.get("images", []):
        extra = set(rule) - {"name", "newName", "newTag", "digest"}
        if extra:
            raise UnsupportedKustomization(f"images entry {rule!r}: fields {sorted(extra)} not supported")
        for obj in objects:
            _walk_containers(obj, rule)

    _check_unique(objects)
    return objects


def render(directory: Path) -> list[dict]:
    """Build the kustomization in `directory` the way `kustomize build` would,
    for the supported subset; raise UnsupportedKustomization otherwise. A
    resource may be a file or the directory of another kustomization (a
    base), which is built first with its own transformers."""
    return sorted(_build(directory, ()), key=_legacy_sort_key)


# --- renderer tests --------------------------------------------------------

FIXTURE_KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: prod
labels:
  - pairs: {team: mesh}
    includeTemplates: true
resources:
  - app.yaml
  - ns.yaml
images:
  - name: registry.local:5000/tools/app
    newTag: "2.0"
  - name: busybox
    digest: sha256:abcd
"""

FIXTURE_APP = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: b-app
  namespace: ignored
  labels: {team: old}
spec:
  selector: {matchLabels: {app: b}}
  template:
    metadata: {labels: {app: b}}
    spec:
      initContainers:
        - {name: init, image: "busybox:1.36"}
      containers:
        - {name: app, image: "registry.local:5000/tools/app:1.0@sha256:ffff"}
        - {name: other, image: "registry.local:5000/tools/app-sidecar:1.0"}
---
apiVersion: v1
kind: Service
metadata: {name: z-svc}
spec:
  selector: {app: b}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: a-app}
spec:
  selector: {matchLabels: {app: a}}
  template:
    spec:
      containers: [{name: app, image: registry.local:5000/tools/app}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {k: v}
"""

FIXTURE_NS = """\
apiVersion: v1
kind: Namespace
metadata: {name: whatever}
"""

# What kustomize v5 produces for the fixture: legacy order, namespace set
# (and the Namespace renamed), labels on metadata and templates only, images
# rewritten (a registry port is not a tag; a different repository with the
# same prefix is left alone; a new tag drops an old digest).
FIXTURE_EXPECTED = [
    {"apiVersion": "v1", "kind": "Namespace",
     "metadata": {"name": "prod", "labels": {"team": "mesh"}}},
    {"apiVersion": "v1", "kind": "ConfigMap",
     "metadata": {"name": "cfg", "namespace": "prod", "labels": {"team": "mesh"}},
     "data": {"k": "v"}},
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "z-svc", "namespace": "prod", "labels": {"team": "mesh"}},
     "spec": {"selector": {"app": "b"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    {"apiVersion": "apps/v1", "kind": "Deployment",
     "metadata": {"name": "a-app", "namespace": "prod", "labels": {"team": "mesh"}},
     "spec": {"selector": {"matchLabels": {"app": "a"}},
              "template": {"metadata": {"labels": {"team": "mesh"}},
                           "spec": {"containers": [
                               {"name": "app", "image": "registry.local:5000/tools/app:2.0"}]}}}},
    {"apiVersion": "apps/v1", "kind": "Deployment",
     "metadata": {"name": "b-app", "namespace": "prod", "labels": {"team": "mesh"}},
     "spec": {"selector": {"matchLabels": {"app": "b"}},
              "template": {"metadata": {"labels": {"app": "b", "team": "mesh"}},
                           "spec": {
                               "initContainers": [{"name": "init", "image": "busybox@sha256:abcd"}],
                               "containers": [
                                   {"name": "app", "image": "registry.local:5000/tools/app:2.0"},
                                   {"name": "other", "image": "registry.local:5000/tools/app-sidecar:1.0"}]}}}},
]


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Path:
    (tmp_path / "kustomization.yaml").write_text(FIXTURE_KUSTOMIZATION)
    (tmp_path / "app.yaml").write_text(FIXTURE_APP)
    (tmp_path / "ns.yaml").write_text(FIXTURE_NS)
    return tmp_path


def test_renderer_matches_kustomize_on_fixture(fixture_dir: Path) -> None:
    assert render(fixture_dir) == FIXTURE_EXPECTED


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("nginx", ("nginx", "", "")),
        ("nginx:1.2", ("nginx", "1.2", "")),
        ("nginx@sha256:ab", ("nginx", "", "sha256:ab")),
        ("nginx:1.2@sha256:ab", ("nginx", "1.2", "sha256:ab")),
        ("host:5000/a/b", ("host:5000/a/b", "", "")),
        ("host:5000/a/b:v1", ("host:5000/a/b", "v1", "")),
        ("ghcr.io/dagmesh/dagmesh:0.1.0", ("ghcr.io/dagmesh/dagmesh", "0.1.0", "")),
    ],
)
def test_split_image(image: str, expected: tuple) -> None:
    assert split_image(image) == expected


# A base and an overlay of it: a directory as a resource, transformers at both
# levels, strategic merge patches (from a file and inline) and the kinds the
# scale and embedded modes add.
OVERLAY_FIXTURE = {
    "base/kustomization.yaml": """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: one
labels:
  - pairs: {team: mesh}
    includeTemplates: true
resources:
  - app.yaml
images:
  - name: app
    newTag: "1.0"
""",
    "base/app.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 1
  strategy: {type: Recreate}
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a}}
    spec:
      containers:
        - name: main
          image: app
          args: ["serve", "--fast"]
          env:
            - {name: A, value: "1"}
            - {name: B, value: "2"}
          readinessProbe: {tcpSocket: {port: grpc}, periodSeconds: 5}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
        - name: side
          image: app
      volumes:
        - {name: tmp, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: app}
spec:
  selector: {app: a}
  ports: [{name: grpc, port: 7070}]
""",
    "overlay/kustomization.yaml": """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: two
labels:
  - pairs: {tier: back}
    includeTemplates: true
resources:
  - ../base
  - extra.yaml
patches:
  - path: patch-app.yaml
  - patch: |-
      apiVersion: v1
      kind: Service
      metadata: {name: app}
      spec: {clusterIP: None}
""",
    "overlay/patch-app.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 3
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 0, maxSurge: 1}
  template:
    spec:
      tolerations: [{key: gpu, operator: Exists}]
      containers:
        - name: main
          args: ["serve"]
          env:
            - {name: B, value: "3"}
            - {name: C, value: "4"}
          readinessProbe:
            tcpSocket: null
            httpGet: {path: /, port: metrics}
          volumeMounts:
            - {name: data, mountPath: /data}
        - name: extra
          image: other
          startupProbe: {tcpSocket: null, exec: {command: ["true"]}}
      volumes:
        - {name: data, persistentVolumeClaim: {claimName: data}}
""",
    "overlay/extra.yaml": """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: app}
spec: {maxUnavailable: 1, selector: {matchLabels: {app: a}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
""",
}

# What kustomize v5 (`kubectl kustomize overlay`) produces for it: the base's
# transformers applied to the base's objects only (the overlay's PVC has no
# team label), the overlay's to everything; `null` removes the tcpSocket
# handler; containers, env, volumes and volumeMounts merged by key with the
# patch's elements first; args replaced; a new list (tolerations) set.
OVERLAY_FIXTURE_EXPECTED = """\
apiVersion: v1
kind: Service
metadata: {labels: {team: mesh, tier: back}, name: app, namespace: two}
spec:
  clusterIP: None
  ports: [{name: grpc, port: 7070}]
  selector: {app: a}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {labels: {tier: back}, name: data, namespace: two}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {labels: {team: mesh, tier: back}, name: app, namespace: two}
spec:
  replicas: 3
  selector: {matchLabels: {app: a}}
  strategy:
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
    type: RollingUpdate
  template:
    metadata: {labels: {app: a, team: mesh, tier: back}}
    spec:
      containers:
        - args: [serve]
          env:
            - {name: B, value: "3"}
            - {name: C, value: "4"}
            - {name: A, value: "1"}
          image: app:1.0
          name: main
          readinessProbe:
            httpGet: {path: /, port: metrics}
            periodSeconds: 5
          volumeMounts:
            - {mountPath: /data, name: data}
            - {mountPath: /tmp, name: tmp}
        - image: other
          name: extra
          startupProbe: {exec: {command: ["true"]}}
        - image: app:1.0
          name: side
      tolerations: [{key: gpu, operator: Exists}]
      volumes:
        - {name: data, persistentVolumeClaim: {claimName: data}}
        - {emptyDir: {}, name: tmp}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {labels: {tier: back}, name: app, namespace: two}
spec: {maxUnavailable: 1, selector: {matchLabels: {app: a}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {labels: {tier: back}, name: deny, namespace: two}
spec: {podSelector: {}, policyTypes: [Ingress]}
"""


@pytest.fixture
def overlay_fixture_dir(tmp_path: Path) -> Path:
    for name, text in OVERLAY_FIXTURE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path / "overlay"


def test_renderer_matches_kustomize_on_overlay_fixture(overlay_fixture_dir: Path) -> None:
    assert render(overlay_fixture_dir) == list(yaml.safe_load_all(OVERLAY_FIXTURE_EXPECTED))


@pytest.mark.parametrize(
    ("kustomization", "files", "why"),
    [
        ("resources: []\ncommonLabels: {a: b}\n", {}, "commonLabels"),
        ("resources: []\ncomponents: [../c]\n", {}, "components"),
        ("resources: []\npatchesStrategicMerge: [p.yaml]\n", {}, "patchesStrategicMerge"),
        ("resources: [app.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: Deployment}\n",
         {"p.yaml": "- {op: replace, path: /spec/replicas, value: 2}\n"}, "target"),
        ("resources: [app.yaml]\npatches:\n  - path: p.yaml\n",
         {"p.yaml": "- {op: replace, path: /spec/replicas, value: 2}\n"}, "JSON 6902"),
        ("resources: [app.yaml]\npatches:\n  - path: p.yaml\n",
         {"p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a-app}\n$patch: delete\n"},
         r"\$patch"),
        # initContainers: the renderer does not know how kustomize merges them.
        ("resources: [app.yaml]\npatches:\n  - path: p.yaml\n",
         {"p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b-app}\n"
                    "spec: {template: {spec: {initContainers: [{name: init, image: x}]}}}\n"},
         "initContainers"),
        ("resources: [../outside.yaml]\n", {"../outside.yaml": FIXTURE_NS}, "outside"),
        ("resources: [..]\n", {}, "cycle"),
        ("resources: [https://github.com/x/y//k8s]\n", {}, "not local"),
    ],
    ids=["commonLabels", "components", "patchesStrategicMerge", "patch-target", "json6902",
         "patch-directive", "unknown-list-merge", "file-outside-root", "cycle", "remote"],
)
def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path, kustomization: str, files: dict,
                                                     why: str) -> None:
    """A feature the renderer does not implement fails loudly instead of being
    ignored, and so do layouts kustomize itself refuses."""
    here = tmp_path / "k"
    here.mkdir()
    (here / "kustomization.yaml").write_text(kustomization)
    (here / "app.yaml").write_text(FIXTURE_APP)
    for name, text in files.items():
        (here / name).write_text(text)
    with pytest.raises(UnsupportedKustomization, match=why):
        render(here)


def _kubectl_kustomize(directory: Path) -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        # A kubectl that cannot even report its own version is a broken
        # install, not a finding about the manifests.
        probe = subprocess.run([kubectl, "version", "--client"],
                               capture_output=True, text=True, timeout=60, check=False)
        if probe.returncode != 0 or "Kustomize" not in probe.stdout:
            return None
        proc = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        return None
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


@pytest.mark.parametrize("which", ["fixture", "overlay-fixture", "deploy/k8s", *MODES])
def test_renderer_agrees_with_kubectl_kustomize(which: str, fixture_dir: Path, overlay_fixture_dir: Path) -> None:
    """Cross-check against the real kustomize where a kubectl is installed:
    the fixtures, `deploy/k8s` itself and every mode. Not required: the rest
    of the suite runs on the Python renderer alone."""
    directory = {"fixture": fixture_dir, "overlay-fixture": overlay_fixture_dir, "deploy/k8s": K8S,
                 **MODES}[which]
    real = _kubectl_kustomize(directory)
    if real is None:
        pytest.skip("no kubectl with built-in kustomize on PATH")
    assert render(directory) == real


# --------------------------------------------------------------------------
# the rendered modes
# --------------------------------------------------------------------------


@functools.cache
def rendered_mode(mode: str) -> list[dict]:
    """The objects of one mode (cached: tests read them, never change them)."""
    return render(MODES[mode])


@pytest.fixture(scope="module", params=list(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered(mode: str) -> list[dict]:
    """Every test that takes this runs once per mode."""
    return rendered_mode(mode)


def _by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def _one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _containers(deploy: dict) -> list[dict]:
    pod = deploy["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def _env(container: dict, name: str) -> dict | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var
    return None


def _setting(container: dict, flag: str, env: str) -> str | None:
    """A setting given either as `--flag value` / `--flag=value` in args or
    as a literal env var; the flag wins, as with clap."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    var = _env(container, env)
    if var is not None:
        assert "value" in var, f"{env} must be a literal value"
        return var["value"]
    return None


def _service_url_target(url: str, services: list[dict]) -> tuple[dict, int]:
    """Which Service (and port) a gRPC URL like http://svc:port points at,
    accepting the short name and the namespaced DNS forms."""
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https"), f"{url}: scheme must be http(s)"
    assert parts.port is not None, f"{url}: give the port explicitly"
    host = parts.hostname
    for svc in services:
        name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        forms = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
        if host in forms:
            return svc, parts.port
    raise AssertionError(f"{url}: host {host!r} is not a Service in the rendered mode")


# What every mode has (../base), and what each adds.
COMMON_OBJECTS = {
    ("Namespace", NAMESPACE),
    ("ConfigMap", "dagmesh-telemetry"),
    ("Secret", "dagmesh-tls"),
    ("Secret", "dagmesh-internal-token"),
    ("Secret", "room-scan-worker-tokens"),
    ("Deployment", "room-scan-worker-cpu"),
    ("Deployment", "room-scan-worker-gpu"),
    ("TriggerAuthentication", "dagmesh-executor-scaler"),
    ("ScaledObject", "room-scan-worker-cpu"),
    ("ScaledObject", "room-scan-worker-gpu"),
}
SPLIT_OBJECTS = COMMON_OBJECTS | {
    ("Secret", "dagmesh-database"),
    ("Service", "dagmesh-metastore"),
    ("Deployment", "dagmesh-metastore"),
    ("Service", "dagmesh-executor"),
    ("Deployment", "dagmesh-executor"),
    ("Service", "dagmesh-scheduler"),
    ("Deployment", "dagmesh-scheduler"),
}
MODE_OBJECTS = {
    "split": SPLIT_OBJECTS,
    "embedded": COMMON_OBJECTS | {
        ("PersistentVolumeClaim", "dagmesh-data"),
        ("Service", "dagmesh-executor"),
        ("Deployment", "dagmesh"),
    },
    "scale": SPLIT_OBJECTS | {
        ("PodDisruptionBudget", "dagmesh-executor"),
        ("PodDisruptionBudget", "dagmesh-scheduler"),
        ("NetworkPolicy", "dagmesh-default-deny-ingress"),
        ("NetworkPolicy", "dagmesh-metastore"),
        ("NetworkPolicy", "dagmesh-executor"),
        ("NetworkPolicy", "dagmesh-scheduler"),
        ("NetworkPolicy", "dagmesh-metrics"),
    },
}


def test_mode_contains_its_objects(mode: str, rendered: list[dict]) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in rendered} == MODE_OBJECTS[mode]


def test_deploy_k8s_is_the_split_mode() -> None:
    """`kubectl apply -k deploy/k8s` (in the docs, and in overlays that name
    it as their base) applies the split mode."""
    assert render(K8S) == rendered_mode("split")


def _image_tags() -> dict[str, str]:
    """The image tag each kustomization of deploy/k8s pins, by directory."""
    tags = {}
    for kfile in sorted(K8S.rglob("kustomization.yaml")):
        for rule in yaml.safe_load(kfile.read_text()).get("images", []):
            if rule["name"] == IMAGE:
                tags[str(kfile.parent.relative_to(K8S))] = str(rule["newTag"])
    return tags


def test_modes_pin_one_image_tag() -> None:
    """The split and embedded modes each name the image tag (the scale mode
    and deploy/k8s inherit the split mode's); a release bumps them together."""
    tags = _image_tags()
    assert {"split", "embedded"} <= set(tags), tags
    assert len(set(tags.values())) == 1, f"the modes pin different tags: {tags}"


def test_kustomize_transforms_applied(rendered: list[dict]) -> None:
    (tag,) = set(_image_tags().values())
    assert rendered == sorted(rendered, key=_legacy_sort_key)
    assert rendered[0]["kind"] == "Namespace"
    for obj in rendered:
        meta = obj["metadata"]
        assert meta["labels"][PART_OF[0]] == PART_OF[1], meta["name"]
        if obj["kind"] != "Namespace":
            assert meta["namespace"] == NAMESPACE
    for deploy in _by_kind(rendered, "Deployment"):
        assert deploy["spec"]["template"]["metadata"]["labels"][PART_OF[0]] == PART_OF[1]
        # The part-of label must stay out of selectors (immutable once applied).
        assert PART_OF[0] not in deploy["spec"]["selector"]["matchLabels"]
        for c in _containers(deploy):
            assert c["image"] == f"{IMAGE}:{tag}", deploy["metadata"]["name"]
    for svc in _by_kind(rendered, "Service"):
        assert PART_OF[0] not in svc["spec"]["selector"]


# --------------------------------------------------------------------------
# (b) schema validation
# --------------------------------------------------------------------------


def _objects_of_every_mode() -> list[tuple[str, dict]]:
    """(test id, object) for each distinct object of the modes; one that
    several modes render alike is validated once, its id naming them."""
    seen: dict[str, tuple[list[str], dict]] = {}
    for name in MODES:
        for obj in rendered_mode(name):
            modes, _ = seen.setdefault(json.dumps(obj, sort_keys=True), ([], obj))
            modes.append(name)
    return [(f"{o['kind']}/{o['metadata']['name']}[{','.join(m)}]", o) for m, o in seen.values()]


_BUILTIN_FOR_PARAMS = [(i, o) for i, o in _objects_of_every_mode() if o["kind"] not in KEDA_KINDS]
_KEDA_FOR_PARAMS = [(i, o) for i, o in _objects_of_every_mode() if o["kind"] in KEDA_KINDS]


def test_every_kind_is_validated() -> None:
    """Each kind the modes render has a schema here: the PVC, the budgets and
    the NetworkPolicies too."""
    kinds = {o["kind"] for _, o in _BUILTIN_FOR_PARAMS}
    assert {"PersistentVolumeClaim", "PodDisruptionBudget", "NetworkPolicy", "Deployment"} <= kinds
    assert {o["kind"] for _, o in _KEDA_FOR_PARAMS} == KEDA_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("obj", [o for _, o in _BUILTIN_FOR_PARAMS], ids=[i for i, _ in _BUILTIN_FOR_PARAMS])
def test_object_validates_against_kubernetes_schema(obj: dict, version: str) -> None:
    # strict=True: unknown fields (typos) are errors, as `kubectl apply
    # --validate=strict` would make them. A kind without a schema raises
    # SchemaNotFoundError, which fails the test too.
    kubernetes_validate.validate(obj, version, strict=True)


def _copy(mode: str, kind: str, name: str) -> dict:
    return copy.deepcopy(_one(rendered_mode(mode), kind, name))


def _deployment(objs: list[dict], name: str) -> dict:
    return copy.deepcopy(_one(objs, "Deployment", name))


def _break_port_type(objs):
    d = _deployment(objs, "dagmesh-metastore")
    d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "7071"
    return d, "containerPort"


def _break_field_name(objs):
    d = _deployment(objs, "dagmesh-executor")
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    return d, "readinesProbe"


def _break_probe_shape(objs):
    # A gRPC probe, unlike a TCP one, takes only a port number, not a name.
    d = _deployment(objs, "dagmesh-metastore")
    probe = d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    probe.pop("tcpSocket")
    probe["grpc"] = {"port": "grpc"}
    return d, "port"


def _break_missing_required(objs):
    d = _deployment(objs, "room-scan-worker-cpu")
    del d["spec"]["template"]["spec"]["containers"][0]["name"]
    return d, "name"


def _break_pvc_access_modes(_):
    pvc = _copy("embedded", "PersistentVolumeClaim", "dagmesh-data")
    pvc["spec"]["accessModes"] = "ReadWriteOnce"  # a list in the API
    return pvc, "accessModes"


def _break_network_policy_field(_):
    policy = _copy("scale", "NetworkPolicy", "dagmesh-metastore")
    rule = policy["spec"]["ingress"][0]
    rule["form"] = rule.pop("from")
    return policy, "form"


def _break_pdb_budget_type(_):
    pdb = _copy("scale", "PodDisruptionBudget", "dagmesh-executor")
    pdb["spec"]["maxUnavailable"] = {"pods": 1}  # an int or a percentage
    return pdb, "maxUnavailable"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "breaker",
    [_break_port_type, _break_field_name, _break_probe_shape, _break_missing_required,
     _break_pvc_access_modes, _break_network_policy_field, _break_pdb_budget_type],
    ids=["wrong-type", "misspelled-field", "grpc-probe-named-port", "missing-required",
         "pvc-wrong-type", "networkpolicy-misspelled-field", "pdb-wrong-type"],
)
def test_validator_rejects_broken_copy(breaker, version: str) -> None:
    broken, culprit = breaker(rendered_mode("split"))
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        kubernetes_validate.validate(broken, version, strict=True)
    assert culprit in str(err.value.message) or culprit in [str(p) for p in err.value.path]


# --- KEDA's custom resources ---------------------------------------------
#
# kubernetes-validate has no schemas for CRDs. This is the part of KEDA's v2
# API (keda.sh/v1alpha1, as KEDA 2.11 and later serve it) that ScaledObjects
# and TriggerAuthentications of this kind use, written out by hand, with
# additionalProperties false throughout: a misspelled or unknown field fails
# here, as `kubectl apply --validate=strict` fails on it once KEDA's CRDs are
# installed. Add a field here when the base starts using it.


def _strict(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR = {"type": "string", "minLength": 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META = _strict({"name": _STR, "namespace": _STR, "labels": _STRING_MAP, "annotations": _STRING_MAP},
                       ("name",))

KEDA_SCHEMAS = {
    "ScaledObject": _strict({
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _OBJECT_META,
        "spec": _strict({
            "scaleTargetRef": _strict({"apiVersion": _STR, "kind": _STR, "name": _STR,
                                       "envSourceContainerName": _STR}, ("name",)),
            "pollingInterval": _INT32,
            "cooldownPeriod": _INT32,
            "initialCooldownPeriod": _INT32,
            "idleReplicaCount": _INT32,
            "minReplicaCount": _INT32,
            "maxReplicaCount": _INT32,
            "fallback": _strict({"failureThreshold": _INT32, "replicas": _INT32, "behavior": _STR},
                                ("failureThreshold", "replicas")),
            "advanced": _strict({
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": _strict({"name": _STR, "behavior": {"type": "object"}}),
            }),
            "triggers": {"type": "array", "minItems": 1, "items": _strict({
                "type": _STR,
                "name": _STR,
                # Every value a string: KEDA's CRD types metadata as map[string]string.
                "metadata": _STRING_MAP,
                "authenticationRef": _strict(
                    {"name": _STR, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                    ("name",)),
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "useCachedMetrics": {"type": "boolean"},
            }, ("type", "metadata"))},
        }, ("scaleTargetRef", "triggers")),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "TriggerAuthentication": _strict({
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _OBJECT_META,
        "spec": _strict({
            "secretTargetRef": {"type": "array", "items": _strict(
                {"parameter": _STR, "name": _STR, "key": _STR}, ("parameter", "name", "key"))},
            "configMapTargetRef": {"type": "array", "items": _strict(
                {"parameter": _STR, "name": _STR, "key": _STR}, ("parameter", "name", "key"))},
            "env": {"type": "array", "items": _strict(
                {"parameter": _STR, "name": _STR, "containerName": _STR}, ("parameter", "name"))},
        }),
    }, ("apiVersion", "kind", "metadata", "spec")),
}


def validate_keda(obj: dict) -> None:
    jsonschema.Draft202012Validator(KEDA_SCHEMAS[obj["kind"]]).validate(obj)


@pytest.mark.parametrize("obj", [o for _, o in _KEDA_FOR_PARAMS], ids=[i for i, _ in _KEDA_FOR_PARAMS])
def test_keda_object_validates_against_the_keda_api(obj: dict) -> None:
    validate_keda(obj)


def _break_keda_field_name(objs):
    so = copy.deepcopy(_one(objs, "ScaledObject", "room-scan-worker-cpu"))
    so["spec"]["minReplicas"] = so["spec"].pop("minReplicaCount")  # the HPA's name, not KEDA's
    return so, "minReplicas"


def _break_keda_metadata_type(objs):
    so = copy.deepcopy(_one(objs, "ScaledObject", "room-scan-worker-gpu"))
    so["spec"]["triggers"][0]["metadata"]["tasksPerReplica"] = 1  # unquoted in YAML
    return so, "tasksPerReplica"


def _break_keda_auth_ref(objs):
    ta = copy.deepcopy(_one(objs, "TriggerAuthentication", "dagmesh-executor-scaler"))
    del ta["spec"]["secretTargetRef"][0]["parameter"]
    return ta, "parameter"


@pytest.mark.parametrize(
    "breaker", [_break_keda_field_name, _break_keda_metadata_type, _break_keda_auth_ref],
    ids=["misspelled-field", "metadata-not-a-string", "missing-required"])
def test_keda_validator_rejects_broken_copy(breaker) -> None:
    broken, culprit = breaker(rendered_mode("split"))
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_keda(broken)
    assert culprit in err.value.message or culprit in [str(p) for p in err.value.absolute_path]


# --------------------------------------------------------------------------
# (c) what an operator would notice
# --------------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _services_for(deploy: dict, services: list[dict]) -> list[dict]:
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    return [
        s for s in services
        if s["metadata"]["namespace"] == deploy["metadata"]["namespace"]
        and _selects(s["spec"]["selector"], pod_labels)
    ]


def _port_matches(target, port: dict) -> bool:
    return target == port.get("name") or target == port["containerPort"]


def test_deployment_selector_matches_its_pod_template(rendered: list[dict]) -> None:
    for d in _by_kind(rendered, "Deployment"):
        assert _selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])


def test_deployment_selectors_do_not_overlap(rendered: list[dict]) -> None:
    deployments = _by_kind(rendered, "Deployment")
    for d in deployments:
        for other in deployments:
            if other is not d:
                assert not _selects(d["spec"]["selector"]["matchLabels"],
                                    other["spec"]["template"]["metadata"]["labels"]), (
                    f"{d['metadata']['name']} would adopt pods of {other['metadata']['name']}")


def test_every_service_selects_exactly_one_deployment(rendered: list[dict]) -> None:
    deployments = _by_kind(rendered, "Deployment")
    for svc in _by_kind(rendered, "Service"):
        matched = [d for d in deployments if svc in _services_for(d, [svc])]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} Deployments"


def test_every_service_target_port_is_a_container_port(rendered: list[dict]) -> None:
    deployments = _by_kind(rendered, "Deployment")
    for svc in _by_kind(rendered, "Service"):
        backends = [d for d in deployments if svc in _services_for(d, [svc])]
        for sp in svc["spec"]["ports"]:
            target = sp.get("targetPort", sp["port"])
            for d in backends:
                ports = [p for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
                assert any(_port_matches(target, p) for p in ports), (
                    f"Service {svc['metadata']['name']} targets {target!r}, "
                    f"which {d['metadata']['name']} does not expose")


def test_every_container_port_is_served_by_a_service(rendered: list[dict]) -> None:
    services = _by_kind(rendered, "Service")
    for d in _by_kind(rendered, "Deployment"):
        mine = _services_for(d, services)
        for c in d["spec"]["template"]["spec"]["containers"]:
            for p in c.get("ports", []):
                assert any(
                    _port_matches(sp.get("targetPort", sp["port"]), p)
                    for s in mine for sp in s["spec"]["ports"]
                ), f"{d['metadata']['name']}/{c['name']} port {p} has no Service"


def test_listen_address_matches_the_container_port(rendered: list[dict]) -> None:
    for d in _by_kind(rendered, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            listen = _setting(c, "--listen", "DAGMESH_LISTEN")
            if listen is None:
                continue
            port = int(listen.rsplit(":", 1)[1])
            assert port in [p["containerPort"] for p in c.get("ports", [])], d["metadata"]["name"]
            # 0.0.0.0, not 127.0.0.1: kubelet probes and Services come from outside the pod.
            assert listen.rsplit(":", 1)[0] in ("0.0.0.0", "[::]"), listen


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _probe_port(probe: dict):
    for handler in ("grpc", "httpGet", "tcpSocket"):
        if handler in probe:
            return handler, probe[handler]["port"]
    return None, None


def test_probes_target_an_exposed_port(rendered: list[dict]) -> None:
    checked = 0
    for d in _by_kind(rendered, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            for name in PROBES:
                if name not in c:
                    continue
                handler, port = _probe_port(c[name])
                assert handler is not None, f"{d['metadata']['name']}: {name} is not a network probe"
                assert any(_port_matches(port, p) for p in c.get("ports", [])), (
                    f"{d['metadata']['name']}/{c['name']} {name} targets {port!r}, not exposed")
                checked += 1
    # Every server has its three probes (the workers have none: see worker-cpu.yaml).
    assert checked == len(PROBES) * len(_server_containers(rendered))


def test_tls_servers_use_probes_that_work_with_tls(rendered: list[dict]) -> None:
    """The servers serve TLS, and the kubelet's native gRPC probe has no TLS
    option (it would fail every handshake), nor can a plain-HTTP httpGet
    probe talk to them; the image has no gRPC client for an exec probe. So
    TCP probes on the gRPC port (the one --listen binds), on every server:
    each opens it once it can answer and reports Health SERVING from then
    until shutdown (see split/metastore.yaml). The executors too, standbys
    included: a standby answers on its gRPC port by forwarding to the lease
    holder, so no executor needs a probe elsewhere (the metrics port) to
    count as Ready."""
    for d, c in _server_containers(rendered):
        name = d["metadata"]["name"]
        listen_port = int(_setting(c, "--listen", "DAGMESH_LISTEN").rsplit(":", 1)[1])
        (grpc,) = [p for p in c["ports"] if p["containerPort"] == listen_port]
        for probe in PROBES:
            assert probe in c, f"{name}: no {probe}"
            assert "grpc" not in c[probe], f"{name}: a native gRPC {probe} cannot speak TLS"
            handler, port = _probe_port(c[probe])
            assert handler == "tcpSocket", f"{name}: {probe} should be a tcpSocket probe, not {handler}"
            assert _port_matches(port, grpc), f"{name}: {probe} targets {port!r}, not the gRPC port"
        # The liveness probe must not fire before the startup window is over
        # and should tolerate more than one missed check.
        assert c["livenessProbe"].get("failureThreshold", 3) >= 3


@pytest.mark.parametrize("mode_name", PG_MODES)
def test_metastore_reads_database_url_from_secret(mode_name: str) -> None:
    rendered = rendered_mode(mode_name)
    d = _one(rendered, "Deployment", "dagmesh-metastore")
    c = d["spec"]["template"]["spec"]["containers"][0]
    var = _env(c, "DAGMESH_DATABASE_URL")
    assert var is not None and "value" not in var
    ref = var["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False), "the metastore must not start without its database"
    assert not any(a.startswith("--database") for a in c.get("args", [])), \
        "a --database flag would put the password in the pod spec"
    secret = _one(rendered, "Secret", ref["name"])
    assert secret["metadata"]["namespace"] == d["metadata"]["namespace"]
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert ref["key"] in values
    url = secret["stringData"][ref["key"]]
    assert urlsplit(url).scheme in ("postgres", "postgresql")
    # The base must only ever carry a placeholder: a host under .invalid
    # (RFC 2606) cannot resolve, so a forgotten replacement fails loudly.
    assert urlsplit(url).hostname.endswith(".invalid"), "real credentials do not belong in the base"


@pytest.mark.parametrize("mode_name", PG_MODES)
def test_metastore_runs_exactly_one_replica(mode_name: str) -> None:
    """Not yet built to share a database with a second copy of itself, not
    even in the scale mode."""
    d = _one(rendered_mode(mode_name), "Deployment", "dagmesh-metastore")
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("mode_name", PG_MODES)
def test_executor_points_at_the_metastore_service(mode_name: str) -> None:
    rendered = rendered_mode(mode_name)
    c = _one(rendered, "Deployment", "dagmesh-executor")["spec"]["template"]["spec"]["containers"][0]
    url = _setting(c, "--metastore", "DAGMESH_METASTORE")
    assert url is not None, "the executor needs --metastore / DAGMESH_METASTORE"
    svc, port = _service_url_target(url, _by_kind(rendered, "Service"))
    assert svc["metadata"]["name"] == "dagmesh-metastore"
    assert port in [p["port"] for p in svc["spec"]["ports"]]


@pytest.mark.parametrize("name", ["room-scan-worker-cpu", "room-scan-worker-gpu"])
def test_workers_point_at_the_executor_service(rendered: list[dict], name: str) -> None:
    c = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][0] == "room-scan-worker"
    url = _setting(c, "--server", "DAGMESH_SERVER")
    assert url is not None, f"{name} needs --server / DAGMESH_SERVER"
    svc, port = _service_url_target(url, _by_kind(rendered, "Service"))
    assert svc["metadata"]["name"] == "dagmesh-executor"
    assert port in [p["port"] for p in svc["spec"]["ports"]]
    # In every mode something that runs the executor's engine answers there.
    (backend,) = _backends(rendered, svc)
    assert _command(backend[1]) in ("executor", "up")
    assert _container_port(backend[0], svc, port)["name"] == "grpc"


def test_worker_roles(rendered: list[dict]) -> None:
    for name, role in (("room-scan-worker-cpu", "cpu"), ("room-scan-worker-gpu", "gpu")):
        c = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert _setting(c, "--role", "DAGMESH_ROLE") == role


def test_gpu_pool_lands_on_gpu_nodes(rendered: list[dict]) -> None:
    pod = _one(rendered, "Deployment", "room-scan-worker-gpu")["spec"]["template"]["spec"]
    requests_gpu = any(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
        for c in pod["containers"]
    )
    selects_gpu_nodes = any("gpu" in k or "accelerator" in k for k in pod.get("nodeSelector", {}))
    assert requests_gpu or selects_gpu_nodes
    cpu_pod = _one(rendered, "Deployment", "room-scan-worker-cpu")["spec"]["template"]["spec"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in cpu_pod["containers"])


def test_references_resolve(rendered: list[dict]) -> None:
    """Every ConfigMap, Secret and claim a pod reads is part of the mode."""
    present = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    for d in _by_kind(rendered, "Deployment"):
        for volume in d["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in present
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in present
        for c in _containers(d):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert ("ConfigMap", src["configMapRef"]["name"]) in present
                if "secretRef" in src:
                    assert ("Secret", src["secretRef"]["name"]) in present
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ("ConfigMap", ref["configMapKeyRef"]["name"]) in present
                if "secretKeyRef" in ref:
                    assert ("Secret", ref["secretKeyRef"]["name"]) in present


def test_telemetry_is_configurable_and_off_by_default(rendered: list[dict]) -> None:
    cm = _one(rendered, "ConfigMap", "dagmesh-telemetry")
    assert cm["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    assert "RUST_LOG" in cm["data"]
    for d in _by_kind(rendered, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            refs = [s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s]
            assert "dagmesh-telemetry" in refs, d["metadata"]["name"]
            assert _env(c, "OTEL_EXPORTER_OTLP_ENDPOINT") is None, "would shadow the ConfigMap"


def test_containers_are_hardened_and_sized(rendered: list[dict]) -> None:
    for d in _by_kind(rendered, "Deployment"):
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        # Service env links would inject DAGMESH_*_PORT variables into the
        # same DAGMESH_ namespace the binaries read their flags from.
        assert pod.get("enableServiceLinks") is False, name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in _containers(d):
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
            assert isinstance(sc.get("runAsUser", pod_sc.get("runAsUser")), int), name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), name
            assert "memory" in res.get("limits", {}), name
            # A read-only root needs somewhere to write temporary files.
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), name


def test_graceful_shutdown_windows(rendered: list[dict]) -> None:
    def grace(d: dict) -> int:
        return d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace(_one(rendered, "Deployment", "room-scan-worker-cpu")) >= 60
    assert grace(_one(rendered, "Deployment", "room-scan-worker-gpu")) >= 60
    for d, c in _server_containers(rendered):
        # The executor's engine drains its workers (DAGMESH_DRAIN_TIMEOUT, 30 s).
        least = 60 if _command(c) in ("executor", "up") else 30
        assert grace(d) >= least, d["metadata"]["name"]


# --------------------------------------------------------------------------
# TLS and tokens (issue 8): every server serves TLS and requires tokens
# --------------------------------------------------------------------------

# `dagmesh <command>` that runs a server; each takes --tls-cert/--tls-key,
# --internal-token, --insecure and --no-auth.
SERVER_COMMANDS = {"metastore", "executor", "scheduler", "up"}
# Client-side settings that name another dagmesh service: (flag, env var).
PEER_URL_SETTINGS = (("--metastore", "DAGMESH_METASTORE"), ("--executor", "DAGMESH_EXECUTOR"),
                     ("--server", "DAGMESH_SERVER"))
INSECURE_FLAGS = {"--insecure": "DAGMESH_INSECURE", "--no-auth": "DAGMESH_NO_AUTH"}
TLS_SECRET_TYPE = "kubernetes.io/tls"


def _server_containers(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(Deployment, container) for every container that runs a dagmesh server."""
    found = []
    for d in _by_kind(objs, "Deployment"):
        for c in _containers(d):
            argv = list(c.get("command", [])) + list(c.get("args", []))
            if len(argv) >= 2 and argv[0] == "dagmesh" and argv[1] in SERVER_COMMANDS:
                found.append((d, c))
    return found


def _worker_containers(objs: list[dict]) -> list[tuple[dict, dict]]:
    servers = {id(c) for _, c in _server_containers(objs)}
    return [(d, c) for d in _by_kind(objs, "Deployment") for c in _containers(d)
            if id(c) not in servers and _setting(c, "--server", "DAGMESH_SERVER") is not None]


def _secret_values(objs: list[dict], name: str) -> dict:
    secret = _one(objs, "Secret", name)
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def _secret_env(objs: list[dict], container: dict, name: str) -> tuple[str, str]:
    """(Secret, key) an env var is read from; fails unless it is a required
    secretKeyRef to a key the base's Secret has."""
    var = _env(container, name)
    assert var is not None, f"{container['name']}: {name} is not set"
    assert "value" not in var, f"{name} must come from a Secret, not a literal in the pod spec"
    ref = var.get("valueFrom", {}).get("secretKeyRef")
    assert ref is not None, f"{name} must be a secretKeyRef"
    assert not ref.get("optional", False), f"{name}: a missing Secret must stop the pod"
    assert ref["key"] in _secret_values(objs, ref["name"]), f"{name}: Secret {ref['name']} has no key {ref['key']}"
    return ref["name"], ref["key"]


def _mounted_secret_file(deploy: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret, key) behind a file path in the container: a read-only
    whole-volume mount of a secret volume. A subPath mount is refused: the
    kubelet never updates it, so a renewed certificate would not arrive."""
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix):]
        where = f"{deploy['metadata']['name']}/{container['name']} {path}"
        assert "subPath" not in mount and "subPathExpr" not in mount, f"{where}: subPath mounts are never updated"
        assert mount.get("readOnly") is True, f"{where}: mount it readOnly"
        source = volumes[mount["name"]].get("secret")
        assert source is not None, f"{where}: not from a Secret volume"
        items = source.get("items")
        if items is None:
            return source["secretName"], rel
        keys = [i["key"] for i in items if i["path"] == rel]
        assert keys, f"{where}: the volume's items do not project {rel}"
        return source["secretName"], keys[0]
    raise AssertionError(f"{deploy['metadata']['name']}/{container['name']}: nothing is mounted at {path}")


def _server_tls(objs: list[dict], deploy: dict, container: dict) -> tuple[str, str, str]:
    """(Secret, cert key, key key) a server's certificate and key come from."""
    cert = _setting(container, "--tls-cert", "DAGMESH_TLS_CERT")
    key = _setting(container, "--tls-key", "DAGMESH_TLS_KEY")
    name = deploy["metadata"]["name"]
    assert cert and key, f"{name}: a server on 0.0.0.0 needs DAGMESH_TLS_CERT and DAGMESH_TLS_KEY"
    cert_secret, cert_key = _mounted_secret_file(deploy, container, cert)
    key_secret, key_key = _mounted_secret_file(deploy, container, key)
    assert cert_secret == key_secret, f"{name}: certificate and key from different Secrets"
    assert cert_key in _secret_values(objs, cert_secret) and key_key in _secret_values(objs, key_secret)
    return cert_secret, cert_key, key_key


def test_servers_serve_tls_from_a_mounted_tls_secret(rendered: list[dict]) -> None:
    for d, c in _server_containers(rendered):
        secret, cert_key, key_key = _server_tls(rendered, d, c)
        assert _one(rendered, "Secret", secret)["type"] == TLS_SECRET_TYPE
        assert (cert_key, key_key) == ("tls.crt", "tls.key")
        assert "ca.crt" in _secret_values(rendered, secret), "clients need the CA next to the certificate"


def test_server_private_key_is_readable_by_the_server_only(rendered: list[dict]) -> None:
    """Secret files default to 0644; the key is group-readable for the pod's
    fsGroup (the server's own group) and closed to everyone else."""
    for d, c in _server_containers(rendered):
        pod = d["spec"]["template"]["spec"]
        key_path = _setting(c, "--tls-key", "DAGMESH_TLS_KEY")
        mount = next(m for m in c["volumeMounts"] if key_path.startswith(m["mountPath"].rstrip("/") + "/"))
        source = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
        mode = source.get("defaultMode", 0o644)
        assert mode & 0o007 == 0, f"{d['metadata']['name']}: tls.key readable by others ({mode:o})"
        assert mode & 0o040 and pod["securityContext"].get("fsGroup") == pod["securityContext"]["runAsGroup"], (
            f"{d['metadata']['name']}: user {pod['securityContext']['runAsUser']} could not read tls.key")


def test_nothing_runs_insecure_or_without_auth(rendered: list[dict]) -> None:
    config = {name: value for cm in _by_kind(rendered, "ConfigMap") for name, value in cm.get("data", {}).items()}
    for d in _by_kind(rendered, "Deployment"):
        for c in _containers(d):
            argv = list(c.get("command", [])) + list(c.get("args", []))
            for flag, env in INSECURE_FLAGS.items():
                assert not any(a == flag or a.startswith(flag + "=") for a in argv), f"{d['metadata']['name']}: {flag}"
                assert _env(c, env) is None, f"{d['metadata']['name']}: {env}"
    for env in INSECURE_FLAGS.values():
        assert env not in config, f"{env} in a ConfigMap would reach every pod through envFrom"


# Peer URLs each mode sets: the executor's and the scheduler's (metastore,
# executor) where they run apart, and both worker pools' server.
PEER_URLS = {"split": 5, "embedded": 2, "scale": 5}


def test_inter_service_urls_use_https(mode: str, rendered: list[dict]) -> None:
    services = _by_kind(rendered, "Service")
    checked = 0
    for d in _by_kind(rendered, "Deployment"):
        for c in _containers(d):
            for flag, env in PEER_URL_SETTINGS:
                url = _setting(c, flag, env)
                if url is None:
                    continue
                _service_url_target(url, services)
                assert urlsplit(url).scheme == "https", f"{d['metadata']['name']}: {env}={url} must be https://"
                checked += 1
            # Any other literal that points at one of the services, too.
            for var in c.get("env", []):
                value = var.get("value", "")
                if "://" in value and any(
                        (urlsplit(value).hostname or "").split(".")[0] == s["metadata"]["name"] for s in services):
                    assert urlsplit(value).scheme == "https", f"{d['metadata']['name']}: {var['name']}={value}"
    assert checked == PEER_URLS[mode]


def test_clients_trust_the_ca_of_the_server_they_call(mode: str, rendered: list[dict]) -> None:
    """Whoever calls a service over https:// has DAGMESH_TLS_CA pointing at
    the ca.crt stored with that service's own certificate."""
    services = _by_kind(rendered, "Service")
    deployments = _by_kind(rendered, "Deployment")
    servers = _server_containers(rendered)
    checked = 0
    for d in deployments:
        for c in _containers(d):
            for flag, env in PEER_URL_SETTINGS:
                url = _setting(c, flag, env)
                if url is None:
                    continue
                svc, _ = _service_url_target(url, services)
                backend = [(sd, sc) for sd, sc in servers if svc in _services_for(sd, [svc])]
                assert len(backend) == 1, f"{url}: no single dagmesh server behind it"
                server_secret, _, _ = _server_tls(rendered, *backend[0])
                ca = _setting(c, "--tls-ca", "DAGMESH_TLS_CA")
                assert ca, f"{d['metadata']['name']}: calls {url} without DAGMESH_TLS_CA"
                assert _mounted_secret_file(d, c, ca) == (server_secret, "ca.crt"), (
                    f"{d['metadata']['name']}: DAGMESH_TLS_CA is not the CA of {svc['metadata']['name']}")
                checked += 1
    assert checked == PEER_URLS[mode]


def test_servers_share_the_internal_token_from_a_secret(rendered: list[dict]) -> None:
    refs = set()
    for d, c in _server_containers(rendered):
        argv = list(c.get("command", [])) + list(c.get("args", []))
        assert not any(a.startswith("--internal-token") for a in argv), \
            "a --internal-token flag would put the secret in the pod spec"
        refs.add(_secret_env(rendered, c, "DAGMESH_INTERNAL_TOKEN"))
    # The metastore accepts exactly the token the executor presents.
    assert len(refs) == 1, f"the servers read different internal tokens: {sorted(refs)}"
    (secret, _), = refs
    assert _one(rendered, "Secret", secret)["type"] == "Opaque"


def test_workers_have_their_own_tokens_and_the_ca(rendered: list[dict]) -> None:
    internal = {_secret_env(rendered, c, "DAGMESH_INTERNAL_TOKEN") for _, c in _server_containers(rendered)}
    tls_secrets = {_server_tls(rendered, d, c)[0] for d, c in _server_containers(rendered)}
    tokens = {}
    for d, c in _worker_containers(rendered):
        name = d["metadata"]["name"]
        ref = _secret_env(rendered, c, "DAGMESH_TOKEN")
        assert ref not in internal, f"{name}: workers must not hold the internal token"
        assert _env(c, "DAGMESH_INTERNAL_TOKEN") is None, name
        tokens[name] = ref
        assert _setting(c, "--tls-ca", "DAGMESH_TLS_CA"), f"{name}: no DAGMESH_TLS_CA"
        # Workers get the CA, never the servers' private key.
        for v in d["spec"]["template"]["spec"].get("volumes", []):
            if v.get("secret", {}).get("secretName") in tls_secrets:
                keys = {i["key"] for i in v["secret"].get("items", [{"key": "<all>"}])}
                assert keys == {"ca.crt"}, f"{name}: mounts {sorted(keys)} of the servers' TLS Secret"
    # One token per pool, each limited to that pool's task types.
    assert len(set(tokens.values())) == len(tokens), tokens


def test_services_do_not_claim_cleartext_http2(rendered: list[dict]) -> None:
    cleartext = {"kubernetes.io/h2c", "h2c", "http", "http2", "grpc"}
    for svc in _by_kind(rendered, "Service"):
        for port in svc["spec"]["ports"]:
            assert port.get("appProtocol") not in cleartext, (
                f"Service {svc['metadata']['name']}: appProtocol {port.get('appProtocol')} but the server is TLS")


def test_placeholder_secrets_carry_no_usable_credentials(rendered: list[dict]) -> None:
    """The base ships placeholders only, each one unusable, so that a
    forgotten replacement fails loudly instead of running on a secret that
    is published in this repository."""
    tls = _secret_values(rendered, "dagmesh-tls")
    for key, value in tls.items():
        assert "REPLACE-ME" in value and "-----BEGIN" not in value, f"dagmesh-tls {key}: a real key or certificate"
    internal = _secret_values(rendered, "dagmesh-internal-token")["token"]
    assert "REPLACE-ME" in internal
    # Clients trim the token; a control character left inside it cannot go
    # into a gRPC header, so nobody can ever present this value.
    assert re.search(r"[\x00-\x08\x0a-\x1f\x7f]", internal.strip()), "the placeholder internal token is usable"
    for key, value in _secret_values(rendered, "room-scan-worker-tokens").items():
        assert "REPLACE-ME" in value and not value.startswith("dmt_"), f"room-scan-worker-tokens {key}"


# --------------------------------------------------------------------------
# the image the manifests run
# --------------------------------------------------------------------------

DOCKERFILE = HERE.parent / "Dockerfile"


def test_dockerfile_agrees_with_the_manifests(rendered: list[dict]) -> None:
    text = DOCKERFILE.read_text()
    runtime = text.split("FROM ")[-1]  # the final stage
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", runtime, re.M)
    assert user, "the runtime stage must switch to a numeric non-root user"
    uid = int(user.group(1))
    assert uid != 0
    installed = set(re.findall(r"/usr/local/bin/([\w-]+)", runtime)) | set(
        re.findall(r"/out/([\w-]+)", runtime))
    entrypoint_is_tini = re.search(r'^ENTRYPOINT\s+\["/usr/bin/tini"', runtime, re.M) is not None
    for d in _by_kind(rendered, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        for c in _containers(d):
            assert c.get("securityContext", {}).get("runAsUser", pod["securityContext"]["runAsUser"]) == uid
            if entrypoint_is_tini:
                # `command` would replace tini and lose signal forwarding.
                assert "command" not in c, d["metadata"]["name"]
            program = (c.get("command") or c["args"])[0]
            assert program in installed, f"{d['metadata']['name']} runs {program}, not in the image"


# --------------------------------------------------------------------------
# metrics: every server exposes Prometheus metrics on a port of its own
# --------------------------------------------------------------------------

METRICS_PORT_NAME = "metrics"


def test_servers_serve_metrics_where_prometheus_looks(rendered: list[dict]) -> None:
    """--metrics-listen binds the `metrics` container port on 0.0.0.0, and
    the pod annotations tell Prometheus' kubernetes-pods job that port."""
    for d, c in _server_containers(rendered):
        name = d["metadata"]["name"]
        listen = _setting(c, "--metrics-listen", "DAGMESH_METRICS_LISTEN")
        assert listen is not None, f"{name}: no --metrics-listen"
        host, port = listen.rsplit(":", 1)
        assert host in ("0.0.0.0", "[::]"), f"{name}: Prometheus scrapes from outside the pod ({listen})"
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        assert ports.get(METRICS_PORT_NAME) == int(port), f"{name}: no `metrics` container port {port}"
        assert port != _setting(c, "--listen", "DAGMESH_LISTEN").rsplit(":", 1)[1], (
            f"{name}: metrics share the TLS gRPC port")
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == port, name
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", name


def test_workers_do_not_claim_a_metrics_port(rendered: list[dict]) -> None:
    # room-scan-worker serves no metrics: an annotation would only make
    # Prometheus report a target that is down.
    for d, _ in _worker_containers(rendered):
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        assert "prometheus.io/scrape" not in annotations, d["metadata"]["name"]


# --------------------------------------------------------------------------
# autoscaling: KEDA ScaledObjects on the executor's external push scaler
# --------------------------------------------------------------------------

SCALER_TRIGGER = "external-push"
# scalerMetadata the executor reads (deploy/README.md, Autoscaling). KEDA
# passes the whole trigger metadata, scalerAddress included, to the scaler.
SCALER_REQUIRED_KEYS = {"scalerAddress", "taskType", "version", "tasksPerReplica"}
SCALER_OPTIONAL_KEYS = {"labels"}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def registered_pools() -> dict[str, dict]:
    """What each room-scan worker role registers, read from the example's
    source (examples/room-scan/src/lib.rs, `<role>_worker`): its slots, its
    labels and its task types with their versions."""
    source = (ROOM_SCAN / "src" / "lib.rs").read_text()
    pools = {}
    for match in re.finditer(r"^pub fn (\w+)_worker\(.*?^\}$", source, re.M | re.S):
        body = match.group(0)
        slots = re.findall(r"\.slots\((\d+)\)", body)
        assert len(slots) == 1, f"{match.group(1)}_worker: expected one .slots(N)"
        pools[match.group(1)] = {
            "slots": int(slots[0]),
            "labels": dict(re.findall(r'\.label\("([^"]+)",\s*"([^"]*)"\)', body)),
            "tasks": dict(re.findall(r'\.task\("([^"]+)",\s*"([^"]+)"', body)),
        }
    assert {"cpu", "gpu"} <= set(pools), f"roles found in lib.rs: {sorted(pools)}"
    return pools


def _parse_labels(value: str) -> dict[str, str]:
    pairs = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        assert sep and key.strip() == key and key, f"labels {value!r}: expected k=v,k=v"
        assert key not in pairs, f"labels {value!r}: {key} twice"
        pairs[key] = val
    return pairs


def _scaled_objects(objs: list[dict]) -> dict[str, dict]:
    """ScaledObjects by the name of the Deployment they scale."""
    found = {}
    for so in _by_kind(objs, "ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment", so["metadata"]["name"]
        assert ref.get("apiVersion", "apps/v1") == "apps/v1", so["metadata"]["name"]
        assert ref["name"] not in found, f"two ScaledObjects scale {ref['name']}"
        found[ref["name"]] = so
    return found


def test_every_worker_pool_is_autoscaled(rendered: list[dict]) -> None:
    scaled = _scaled_objects(rendered)
    deployments = {d["metadata"]["name"] for d in _by_kind(rendered, "Deployment")}
    assert set(scaled) <= deployments, f"ScaledObjects for Deployments not in the base: {set(scaled) - deployments}"
    workers = {d["metadata"]["name"] for d, _ in _worker_containers(rendered)}
    assert set(scaled) == workers, "every worker pool, and nothing else, is scaled by KEDA"
    for name, so in scaled.items():
        spec = so["spec"]
        assert so["metadata"]["namespace"] == NAMESPACE
        assert spec["minReplicaCount"] == 0, f"{name}: a pool with nothing to do goes to zero"
        assert spec["maxReplicaCount"] >= 1, name
        assert spec.get("cooldownPeriod", 300) >= 60, f"{name}: flapping to zero between steps"
        # A replica count in the Deployment is written back on every apply
        # and fights the HPA that KEDA creates.
        assert "replicas" not in _one(rendered, "Deployment", name)["spec"], (
            f"{name}: drop spec.replicas, KEDA owns it")


def test_scaler_triggers_describe_what_the_pool_registers(rendered: list[dict]) -> None:
    """One trigger per task type the pool's workers register, each carrying
    that task type's registered version, the pool's labels and its slots: a
    task type without a trigger would never start a pool that is at zero, and
    a wrong version or label set counts tasks the pool cannot take (or misses
    those it can)."""
    pools = registered_pools()
    for name, so in _scaled_objects(rendered).items():
        c = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        role = _setting(c, "--role", "DAGMESH_WORKER_ROLE")
        assert role in pools, f"{name}: role {role!r} has no {role}_worker in examples/room-scan"
        pool = pools[role]
        seen = {}
        for trigger in so["spec"]["triggers"]:
            where = f"{name} trigger {trigger.get('name', trigger['metadata'].get('taskType'))}"
            assert trigger["type"] == SCALER_TRIGGER, f"{where}: the executor is an external *push* scaler"
            meta = trigger["metadata"]
            assert SCALER_REQUIRED_KEYS <= set(meta), f"{where}: missing {SCALER_REQUIRED_KEYS - set(meta)}"
            assert set(meta) <= SCALER_REQUIRED_KEYS | SCALER_OPTIONAL_KEYS, (
                f"{where}: unknown keys {set(meta) - SCALER_REQUIRED_KEYS - SCALER_OPTIONAL_KEYS}")
            task = meta["taskType"]
            assert task in pool["tasks"], f"{where}: {role} workers do not register {task}"
            assert task not in seen, f"{where}: {task} twice"
            seen[task] = meta
            assert SEMVER.match(meta["version"]), f"{where}: version must be an exact semver, not a requirement"
            assert meta["version"] == pool["tasks"][task], (
                f"{where}: the workers register {task}@{pool['tasks'][task]}, not {meta['version']}")
            labels = _parse_labels(meta["labels"]) if "labels" in meta else {}
            assert labels == pool["labels"], f"{where}: labels {labels} but the pool has {pool['labels']}"
            assert meta["tasksPerReplica"].isdigit() and int(meta["tasksPerReplica"]) >= 1, where
            assert int(meta["tasksPerReplica"]) == pool["slots"], (
                f"{where}: tasksPerReplica {meta['tasksPerReplica']} but a worker has {pool['slots']} slots")
        assert set(seen) == set(pool["tasks"]), (
            f"{name}: no trigger for {sorted(set(pool['tasks']) - set(seen))}; queued tasks of those "
            "types would never start the pool from zero")


def test_scaler_address_is_the_executor_over_tls(rendered: list[dict]) -> None:
    """KEDA runs in its own namespace: it needs the namespaced Service name
    (which the certificate names, deploy/README.md), the executor's gRPC
    port, and the CA that signed the executor's certificate."""
    auths = {ta["metadata"]["name"]: ta for ta in _by_kind(rendered, "TriggerAuthentication")}
    for so in _by_kind(rendered, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            address = trigger["metadata"]["scalerAddress"]
            assert "://" not in address, f"{address}: KEDA wants host:port"
            host, port = address.rsplit(":", 1)
            name, _, rest = host.partition(".")
            assert rest in (f"{NAMESPACE}.svc", f"{NAMESPACE}.svc.cluster.local"), (
                f"{address}: use the namespaced name; KEDA's operator is not in {NAMESPACE}")
            svc = _one(rendered, "Service", name)
            # The executor, or `dagmesh up` with the executor inside.
            backends = _backends(rendered, svc)
            assert [_command(c) for _, c in backends] in (["executor"], ["up"]), f"{address} is not the executor"
            (server_secret, _, _) = _server_tls(rendered, *backends[0])
            grpc = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
            assert grpc and grpc[0]["name"] == "grpc", f"{address}: not the executor's gRPC port"
            ref = trigger.get("authenticationRef")
            assert ref is not None, f"{address}: the executor serves TLS; KEDA needs its CA"
            assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
            auth = auths.get(ref["name"])
            assert auth is not None, f"TriggerAuthentication {ref['name']} is not in the base"
            params = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
            assert params.get("caCert") == (server_secret, "ca.crt"), (
                f"{ref['name']}: caCert must be ca.crt of {server_secret}, the executor's certificate")
            # KEDA gets the CA only: no client key, and never the server's key.
            assert set(params) <= {"caCert", "tlsClientCert", "tlsClientKey"}, params
            assert all(key != "tls.key" for _, key in params.values())
            assert "unsafeSsl" not in trigger["metadata"]


def test_trigger_authentication_secrets_resolve(rendered: list[dict]) -> None:
    for auth in _by_kind(rendered, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            assert ref["key"] in _secret_values(rendered, ref["name"]), (
                f"{auth['metadata']['name']}: Secret {ref['name']} has no key {ref['key']}")


# --------------------------------------------------------------------------
# the modes: a scheduler in each, embedded on a volume, scale replicated
# --------------------------------------------------------------------------

# `dagmesh <command>` of the servers each mode runs.
MODE_SERVERS = {
    "split": {"metastore", "executor", "scheduler"},
    "embedded": {"up"},
    "scale": {"metastore", "executor", "scheduler"},
}


def _command(container: dict) -> str:
    return (list(container.get("command", [])) + list(container.get("args", [])))[1]


def _backends(objs: list[dict], svc: dict) -> list[tuple[dict, dict]]:
    """(Deployment, container) of the dagmesh servers behind a Service."""
    return [(d, c) for d, c in _server_containers(objs) if svc in _services_for(d, [svc])]


def _container_port(deploy: dict, svc: dict, port: int) -> dict:
    """The container port a Service port (by number) ends up on."""
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    target = sp.get("targetPort", sp["port"])
    found = [p for c in deploy["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
             if _port_matches(target, p)]
    assert len(found) == 1, f"Service {svc['metadata']['name']} port {port}: {len(found)} container ports"
    return found[0]


def test_all_servers_are_found(mode: str, rendered: list[dict]) -> None:
    assert {_command(c) for _, c in _server_containers(rendered)} == MODE_SERVERS[mode]
    assert {d["metadata"]["name"] for d, _ in _worker_containers(rendered)} == {
        "room-scan-worker-cpu", "room-scan-worker-gpu"}


def test_every_mode_runs_a_scheduler(rendered: list[dict]) -> None:
    """Cron schedules, event triggers and backfills fire only where a
    scheduler runs: `dagmesh scheduler` in the split and scale modes, inside
    `dagmesh up` in the embedded one. Its API (SchedulerService) must be
    reachable through a Service, for the CLI and for backends that publish
    events."""
    services = _by_kind(rendered, "Service")
    scheduling = [(d, c) for d, c in _server_containers(rendered) if _command(c) in ("scheduler", "up")]
    assert scheduling, "no scheduler: schedules, triggers and backfills would never fire"
    for d, c in scheduling:
        assert d["spec"].get("replicas", 1) >= 1
        listen_port = int(_setting(c, "--listen", "DAGMESH_LISTEN").rsplit(":", 1)[1])
        assert any(_container_port(d, s, p["port"])["containerPort"] == listen_port
                   for s in _services_for(d, services) for p in s["spec"]["ports"]), (
            f"{d['metadata']['name']}: no Service reaches its gRPC port")


@pytest.mark.parametrize("mode_name", PG_MODES)
def test_scheduler_calls_the_metastore_and_executor_over_tls(mode_name: str) -> None:
    objs = rendered_mode(mode_name)
    services = _by_kind(objs, "Service")
    d = _one(objs, "Deployment", "dagmesh-scheduler")
    (c,) = d["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["dagmesh", "scheduler"]
    for flag, env, command in (("--metastore", "DAGMESH_METASTORE", "metastore"),
                               ("--executor", "DAGMESH_EXECUTOR", "executor")):
        url = _setting(c, flag, env)
        assert url, f"the scheduler needs {env}"
        assert urlsplit(url).scheme == "https", f"{env}={url}: the {command} serves TLS"
        svc, port = _service_url_target(url, services)
        (backend,) = _backends(objs, svc)
        assert _command(backend[1]) == command, f"{env}={url} reaches `dagmesh {_command(backend[1])}`"
        assert _container_port(backend[0], svc, port)["name"] == "grpc", f"{env}={url}: not the gRPC port"
        server_secret, _, _ = _server_tls(objs, *backend)
        ca = _setting(c, "--tls-ca", "DAGMESH_TLS_CA")
        assert ca and _mounted_secret_file(d, c, ca) == (server_secret, "ca.crt"), (
            f"the scheduler does not trust the CA of the {command}'s certificate")
    assert _secret_env(objs, c, "DAGMESH_INTERNAL_TOKEN") == ("dagmesh-internal-token", "token")


def test_scale_runs_two_schedulers() -> None:
    d = _one(rendered_mode("scale"), "Deployment", "dagmesh-scheduler")
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["type"] == "RollingUpdate"
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] in (0, "0%")


# --- scale: executors -------------------------------------------------------


def test_scale_executors_roll_without_dropping_below_three() -> None:
    d = _one(rendered_mode("scale"), "Deployment", "dagmesh-executor")
    assert d["spec"]["replicas"] == 3
    strategy = d["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0%")
    assert isinstance(strategy["rollingUpdate"]["maxSurge"], int) and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_scale_executors_share_the_partitions() -> None:
    """The scale mode's executors each drive a share of the runs
    (--share-partitions on every replica: a replica without it would wait as a
    standby while the others share); the split mode's one executor drives all."""
    for mode_name, sharing in (("scale", "true"), ("split", None)):
        d = _one(rendered_mode(mode_name), "Deployment", "dagmesh-executor")
        for c in d["spec"]["template"]["spec"]["containers"]:
            if _command(c) == "executor":
                assert _setting(c, "--share-partitions", "DAGMESH_SHARE_PARTITIONS") == sharing, mode_name


@pytest.mark.parametrize("mode_name", PG_MODES)
def test_executors_roll_without_a_gap(mode_name: str) -> None:
    """A rollout starts the new executor (a standby, which forwards to the
    old one) before it stops an old one, which hands the lease over as it
    drains: there is an executor behind the Service all along, one replica
    or three. Recreate would leave none while the new pod starts."""
    d = _one(rendered_mode(mode_name), "Deployment", "dagmesh-executor")
    strategy = d["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0%")
    assert isinstance(strategy["rollingUpdate"]["maxSurge"], int) and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_scale_executor_service_is_an_ordinary_cluster_ip() -> None:
    """Every executor answers on 7070 (a standby forwards to the lease
    holder), so the scale mode keeps the split mode's ClusterIP Service: no
    headless Service, whose clients would have to find the one executor that
    accepts."""
    objs = rendered_mode("scale")
    svc = _one(objs, "Service", "dagmesh-executor")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"].get("clusterIP") != "None", "headless: clients would get the pods' addresses"
    assert "clusterIPs" not in svc["spec"]
    assert svc["spec"] == _one(rendered_mode("split"), "Service", "dagmesh-executor")["spec"]
    assert [_command(c) for _, c in _backends(objs, svc)] == ["executor"]


def _executor_containers(objs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, c) for d, c in _server_containers(objs) if _command(c) == "executor"]


def _pod_ip_var(container: dict, url: str) -> str:
    """The env var behind the host of an advertised URL: `$(VAR)` (or
    `[$(VAR)]`), VAR set from the pod's own IP and listed before the URL,
    since Kubernetes expands $(VAR) only from variables defined above it."""
    host = urlsplit(url).netloc.rsplit(":", 1)[0]
    match = re.fullmatch(r"\[?\$\((\w+)\)\]?", host)
    assert match, f"{url}: the host must be $(VAR) of the pod's IP (a Service name reaches any replica)"
    var = match.group(1)
    names = [v["name"] for v in container.get("env", [])]
    assert var in names, f"{url}: {var} is not set"
    source = _env(container, var)
    assert source.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", (
        f"{var} must come from fieldRef status.podIP")
    assert names.index(var) < names.index("DAGMESH_ADVERTISE_URL"), (
        f"{var} comes after DAGMESH_ADVERTISE_URL: Kubernetes would leave $({var}) unexpanded")
    return var


def test_executors_advertise_their_pod_address(mode: str, rendered: list[dict]) -> None:
    """Every `dagmesh executor` may be a standby (a second replica, or the
    new pod of a rollout), which forwards every call to the lease holder at
    the URL the holder advertises. So each sets DAGMESH_ADVERTISE_URL to its
    own pod IP on its gRPC port, over https (it serves TLS); the default,
    the listen address with 0.0.0.0 read as 127.0.0.1, would send a standby
    to itself."""
    executors = _executor_containers(rendered)
    assert bool(executors) == (mode in PG_MODES), f"{mode}: executors {executors}"
    for d, c in executors:
        name = d["metadata"]["name"]
        argv = list(c.get("command", [])) + list(c.get("args", []))
        assert not any(a.startswith("--advertise-url") for a in argv), (
            f"{name}: a flag would not see the pod IP; use the env var with $(VAR)")
        url = _setting(c, "--advertise-url", "DAGMESH_ADVERTISE_URL")
        assert url, f"{name}: no DAGMESH_ADVERTISE_URL: a standby could not reach the lease holder"
        parts = urlsplit(url)
        assert parts.scheme == "https", f"{name}: {url}: the executor serves TLS"
        assert parts.path in ("", "/") and not parts.query, url
        _pod_ip_var(c, url)
        listen_port = int(_setting(c, "--listen", "DAGMESH_LISTEN").rsplit(":", 1)[1])
        assert parts.port == listen_port, f"{name}: {url} is not the gRPC port {listen_port}"
        assert any(p["containerPort"] == parts.port and p.get("name") == "grpc" for p in c["ports"]), url


def test_executors_check_each_others_certificate(mode: str, rendered: list[dict]) -> None:
    """A standby dials the lease holder at its pod IP, which no certificate
    names: DAGMESH_PEER_TLS_SERVER_NAME is the name it checks instead, the
    executor Service's own (which the certificate holds, since every client
    dials it), and it trusts the CA of the executors' own certificate."""
    services = _by_kind(rendered, "Service")
    for d, c in _executor_containers(rendered):
        name = d["metadata"]["name"]
        peer = _setting(c, "--peer-tls-server-name", "DAGMESH_PEER_TLS_SERVER_NAME")
        assert peer, f"{name}: no DAGMESH_PEER_TLS_SERVER_NAME: the hop to a pod IP would fail its TLS check"
        assert peer in {s["metadata"]["name"] for s in _services_for(d, services)}, (
            f"{name}: {peer} is not the name of the executor's Service")
        assert peer == "dagmesh-executor"
        server_secret, _, _ = _server_tls(rendered, d, c)
        ca = _setting(c, "--tls-ca", "DAGMESH_TLS_CA")
        assert ca and _mounted_secret_file(d, c, ca) == (server_secret, "ca.crt"), (
            f"{name}: the hop must trust the CA of the executors' certificate")


def _selects_pods(selector: dict, deploy: dict) -> bool:
    return _selector_matches(selector, deploy["spec"]["template"]["metadata"]["labels"])


def test_pdb_covers_the_executors_and_allows_one_disruption() -> None:
    objs = rendered_mode("scale")
    deployments = _by_kind(objs, "Deployment")
    executor = _one(objs, "Deployment", "dagmesh-executor")
    (pdb,) = [p for p in _by_kind(objs, "PodDisruptionBudget") if _selects_pods(p["spec"]["selector"], executor)]
    others = [d["metadata"]["name"] for d in deployments
              if d is not executor and _selects_pods(pdb["spec"]["selector"], d)]
    assert not others, f"{pdb['metadata']['name']} also counts the pods of {others}"
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"], (
        "at most one executor may be evicted at a time")
    # A crash-looping executor must not hold up a node drain.
    assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"


def test_every_pdb_can_be_satisfied() -> None:
    """A budget over a single replica, or one that allows no disruption at
    all, blocks every drain of its node: each budget covers one Deployment of
    several replicas and allows one eviction."""
    objs = rendered_mode("scale")
    for pdb in _by_kind(objs, "PodDisruptionBudget"):
        covered = [d for d in _by_kind(objs, "Deployment") if _selects_pods(pdb["spec"]["selector"], d)]
        assert len(covered) == 1, pdb["metadata"]["name"]
        assert covered[0]["spec"].get("replicas", 1) >= 2, f"{pdb['metadata']['name']}: a single replica"
        assert pdb["spec"].get("maxUnavailable", 0) >= 1, pdb["metadata"]["name"]


# --- embedded: one server on a volume ---------------------------------------


def _dockerfile_workdir() -> str:
    runtime = DOCKERFILE.read_text().split("FROM ")[-1]
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)\s*$", runtime, re.M)
    return workdir


def _sqlite_path(container: dict) -> str:
    """The file `dagmesh up` keeps its database in (cli/src/serve.rs, UpArgs):
    --database / DAGMESH_DATABASE_URL, else DATA_DIR/dagmesh.db with
    --data-dir / DAGMESH_DATA_DIR (default .dagmesh, in the image's WORKDIR)."""
    url = _setting(container, "--database", "DAGMESH_DATABASE_URL")
    if url is not None:
        assert url.startswith("sqlite://"), f"the embedded mode runs on SQLite, not {url}"
        path = url.removeprefix("sqlite://").split("?")[0]
    else:
        path = str(Path(_setting(container, "--data-dir", "DAGMESH_DATA_DIR") or ".dagmesh") / "dagmesh.db")
    return path if path.startswith("/") else str(Path(_dockerfile_workdir()) / path)


def test_embedded_runs_exactly_one_server_pod() -> None:
    objs = rendered_mode("embedded")
    servers = _server_containers(objs)
    assert len(servers) == 1, "the embedded mode is one process"
    ((d, c),) = servers
    assert c["args"][:2] == ["dagmesh", "up"]
    assert d["spec"]["replicas"] == 1, "SQLite has one writer"
    # A rolling update would start a second pod while the first holds the volume.
    assert d["spec"]["strategy"] == {"type": "Recreate"}
    # Nobody but the workers' own Deployments runs anything else.
    assert {x["metadata"]["name"] for x in _by_kind(objs, "Deployment")} == {
        d["metadata"]["name"], "room-scan-worker-cpu", "room-scan-worker-gpu"}


def test_embedded_database_is_on_the_claim_and_writable() -> None:
    """The SQLite file lies on the mounted PersistentVolumeClaim (a restart
    keeps every run), the mount is writable, and the root filesystem stays
    read-only, with /tmp and the volume the only writable places."""
    objs = rendered_mode("embedded")
    ((d, c),) = _server_containers(objs)
    pod = d["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    database = _sqlite_path(c)
    config = {k for cm in _by_kind(objs, "ConfigMap") for k in cm.get("data", {})}
    assert "DAGMESH_DATABASE_URL" not in config and "DAGMESH_DATA_DIR" not in config, (
        "a ConfigMap entry would move the database through envFrom")
    mounts = [m for m in c["volumeMounts"] if database.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{database} is on no mounted volume: it would die with the pod"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert not mount.get("readOnly", False), f"{mount['mountPath']}: the database must be writable"
    assert "subPath" not in mount
    claim = volumes[mount["name"]].get("persistentVolumeClaim")
    assert claim is not None, f"{database} is on a {sorted(volumes[mount['name']])} volume, not a claim"
    pvc = _one(objs, "PersistentVolumeClaim", claim["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert not claim.get("readOnly", False)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # User 10001 writes the volume through its group: the kubelet gives it fsGroup.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    writable = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly", False)}
    assert set(writable) == {"/tmp", mount["mountPath"]}, sorted(writable)
    assert "emptyDir" in writable["/tmp"]


# --------------------------------------------------------------------------
# NetworkPolicies (scale mode)
# --------------------------------------------------------------------------
#
# A small evaluator of the NetworkPolicy API (networking.k8s.io/v1): a pod is
# isolated for ingress once any policy of its namespace selects it; then a
# connection is admitted when some rule of a selecting policy admits both
# its source (a peer: podSelector within the policy's namespace,
# namespaceSelector, or both) and its port. ipBlock is refused: whether it
# matches pod traffic depends on the network plugin.


class Pod:
    """A source of connections: its namespace, the namespace's labels and its own."""

    def __init__(self, namespace: str, labels: dict, namespace_labels: dict | None = None, name: str = ""):
        self.namespace = namespace
        self.labels = labels
        self.namespace_labels = {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}
        self.name = name or f"{namespace}/{labels}"

    def __repr__(self) -> str:
        return self.name


# Outside the manifests: KEDA's operator as its Helm chart labels it, in the
# namespace deploy/README.md installs it to; a Prometheus in its own
# namespace; a product backend elsewhere that carries the client label; and
# pods that nobody invited.
KEDA_OPERATOR = Pod("keda", {"app": "keda-operator", "app.kubernetes.io/name": "keda-operator"}, name="keda-operator")
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"}, name="prometheus")
BACKEND = Pod("shop", {"app": "checkout", "dagmesh.io/client": "true"}, name="backend")
STRANGERS = (Pod(NAMESPACE, {"app": "debug"}, name="stranger in the namespace"),
             Pod("shop", {"app": "checkout"}, name="stranger elsewhere"))


def _selector_matches(selector: dict, labels: dict) -> bool:
    """metav1.LabelSelector: matchLabels and matchExpressions; {} matches all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _pod_of(objs: list[dict], deploy: dict) -> Pod:
    ns = deploy["metadata"]["namespace"]
    ns_labels = next((o["metadata"].get("labels", {}) for o in _by_kind(objs, "Namespace")
                      if o["metadata"]["name"] == ns), {})
    return Pod(ns, deploy["spec"]["template"]["metadata"]["labels"], ns_labels, deploy["metadata"]["name"])


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _peer_admits(peer: dict, policy_namespace: str, src: Pod) -> bool:
    assert "ipBlock" not in peer, "ipBlock: whether it matches pod traffic depends on the network plugin"
    ns_selector, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_selector is None:
        in_namespace = src.namespace == policy_namespace
    else:
        in_namespace = _selector_matches(ns_selector, src.namespace_labels)
    return in_namespace and (pod_selector is None or _selector_matches(pod_selector, src.labels))


def _rule_port_admits(rule_port: dict, dest: dict, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port:
        return True
    wanted = rule_port["port"]
    if isinstance(wanted, str):  # a named port of the destination pod
        return any(p.get("name") == wanted and p["containerPort"] == port
                   for c in dest["spec"]["template"]["spec"]["containers"] for p in c.get("ports", []))
    return wanted <= port <= rule_port.get("endPort", wanted)


def admitted(objs: list[dict], src: Pod, dest: dict, port: int) -> bool:
    """Whether the NetworkPolicies in `objs` admit a TCP connection from `src`
    to `port` of the pods of Deployment `dest`."""
    ns = dest["metadata"]["namespace"]
    labels = dest["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in _by_kind(objs, "NetworkPolicy")
                if p["metadata"]["namespace"] == ns and "Ingress" in _policy_types(p)
                and _selector_matches(p["spec"]["podSelector"], labels)]
    if not policies:
        return True
    return any(
        (not rule.get("ports") or any(_rule_port_admits(rp, dest, port) for rp in rule["ports"]))
        and (not rule.get("from") or any(_peer_admits(peer, ns, src) for peer in rule["from"]))
        for p in policies for rule in p["spec"].get("ingress") or [])


def connections(objs: list[dict]) -> list[tuple[Pod, dict, int, str]]:
    """Every connection the manifests make, as (source, destination
    Deployment, container port, why): the peer URLs in the pods' settings,
    KEDA's scalerAddress, Prometheus' scrape annotations, and the product
    backends that deploy/README.md says may call the executor and the
    scheduler."""
    services = _by_kind(objs, "Service")
    found = []

    def to_service(src: Pod, svc: dict, port: int, why: str) -> None:
        backends = [d for d in _by_kind(objs, "Deployment") if svc in _services_for(d, [svc])]
        assert backends, f"{why}: no pod behind Service {svc['metadata']['name']}"
        for dest in backends:
            found.append((src, dest, _container_port(dest, svc, port)["containerPort"], why))

    for d in _by_kind(objs, "Deployment"):
        for c in _containers(d):
            for flag, env in PEER_URL_SETTINGS:
                url = _setting(c, flag, env)
                if url is not None:
                    svc, port = _service_url_target(url, services)
                    to_service(_pod_of(objs, d), svc, port, f"{d['metadata']['name']} {env}={url}")
            # An executor advertises its pod's own address; a standby of the
            # same Deployment forwards every call it gets there.
            advertised = _setting(c, "--advertise-url", "DAGMESH_ADVERTISE_URL")
            if advertised is not None:
                _pod_ip_var(c, advertised)
                found.append((_pod_of(objs, d), d, urlsplit(advertised).port,
                              f"a standby {d['metadata']['name']} forwards to {advertised}"))
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            found.append((PROMETHEUS, d, int(annotations["prometheus.io/port"]),
                          f"Prometheus scrapes {d['metadata']['name']}"))
    for so in _by_kind(objs, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            address = trigger["metadata"]["scalerAddress"]
            svc, port = _service_url_target(f"https://{address}", services)
            to_service(KEDA_OPERATOR, svc, port, f"KEDA for {so['metadata']['name']}: {address}")
    for svc in services:
        for _, c in _backends(objs, svc):
            if _command(c) in ("executor", "scheduler", "up"):
                grpc = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
                to_service(BACKEND, svc, grpc[0], f"a backend calls {svc['metadata']['name']}")
    return found


def test_network_policies_admit_every_connection_the_manifests_make() -> None:
    objs = rendered_mode("scale")
    edges = connections(objs)
    kinds = {(src.name, dest["metadata"]["name"]) for src, dest, _, _ in edges}
    # The wiring these policies exist for, so that a change that drops an
    # edge from the manifests is noticed here too.
    assert {("dagmesh-executor", "dagmesh-metastore"), ("dagmesh-scheduler", "dagmesh-metastore"),
            ("dagmesh-scheduler", "dagmesh-executor"), ("dagmesh-executor", "dagmesh-executor"),
            ("room-scan-worker-cpu", "dagmesh-executor"),
            ("room-scan-worker-gpu", "dagmesh-executor"), ("keda-operator", "dagmesh-executor"),
            ("backend", "dagmesh-executor"), ("backend", "dagmesh-scheduler"),
            ("prometheus", "dagmesh-metastore"), ("prometheus", "dagmesh-executor"),
            ("prometheus", "dagmesh-scheduler")} <= kinds, sorted(kinds)
    refused = [why for src, dest, port, why in edges if not admitted(objs, src, dest, port)]
    assert not refused, f"the NetworkPolicies refuse: {refused}"


def test_network_policies_deny_ingress_by_default() -> None:
    objs = rendered_mode("scale")
    deny = [p for p in _by_kind(objs, "NetworkPolicy")
            if p["spec"]["podSelector"] == {} and _policy_types(p) == ["Ingress"] and not p["spec"].get("ingress")]
    assert deny, "no default-deny policy: pods nobody selects would accept anything"
    for d in _by_kind(objs, "Deployment"):
        for port in [p["containerPort"] for c in _containers(d) for p in c.get("ports", [])] + [8080]:
            for stranger in STRANGERS:
                if port == int(d["spec"]["template"]["metadata"].get("annotations", {}).get(
                        "prometheus.io/port", -1)):
                    continue  # metrics are open to the cluster, on purpose (networkpolicies.yaml)
                assert not admitted(objs, stranger, d, port), f"{stranger} reaches {d['metadata']['name']}:{port}"


def test_nothing_else_reaches_the_metastore() -> None:
    """The system of record takes gRPC from the executors and schedulers only:
    every rule of every policy that selects its pods names its port, and a
    rule on the gRPC port admits pods of this namespace that belong to the
    executor or scheduler Deployments and to no other (the metrics port
    aside)."""
    objs = rendered_mode("scale")
    metastore = _one(objs, "Deployment", "dagmesh-metastore")
    (c,) = metastore["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    callers = {"dagmesh-executor", "dagmesh-scheduler"}
    deployments = _by_kind(objs, "Deployment")
    for policy in _by_kind(objs, "NetworkPolicy"):
        if not _selects_pods(policy["spec"]["podSelector"], metastore):
            continue
        for rule in policy["spec"].get("ingress") or []:
            where = f"NetworkPolicy {policy['metadata']['name']}"
            assert rule.get("ports"), f"{where}: a rule without ports opens every port of the metastore"
            for rp in rule["ports"]:
                if rp.get("port") in (ports["grpc"], "grpc"):
                    assert rule.get("from"), f"{where}: the metastore's gRPC port open to everyone"
                    for peer in rule["from"]:
                        assert set(peer) == {"podSelector"}, f"{where}: {peer} reaches beyond the namespace"
                        picked = {d["metadata"]["name"] for d in deployments
                                  if _selects_pods(peer["podSelector"], d)}
                        assert picked and picked <= callers, f"{where}: {peer} admits {sorted(picked)}"
                else:
                    assert rp.get("port") in (ports[METRICS_PORT_NAME], METRICS_PORT_NAME), (
                        f"{where}: opens port {rp.get('port')} of the metastore")
    sources = [_pod_of(objs, d) for d in deployments] + [KEDA_OPERATOR, PROMETHEUS, BACKEND, *STRANGERS]
    reach = {src.name for src in sources if admitted(objs, src, metastore, ports["grpc"])}
    assert reach == callers, f"the metastore's gRPC port admits {sorted(reach)}"


def test_network_policy_evaluator_can_say_no() -> None:
    """The oracle of the tests above: it must refuse what the API refuses."""
    dest = {"metadata": {"namespace": "a"},
            "spec": {"template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"ports": [{"name": "sql", "containerPort": 5432}]}]}}}}
    policy = {"kind": "NetworkPolicy", "metadata": {"namespace": "a"}, "spec": {
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "api"}}},
                              {"namespaceSelector": {"matchLabels": {"team": "ops"}},
                               "podSelector": {"matchExpressions": [{"key": "debug", "operator": "Exists"}]}}],
                     "ports": [{"port": "sql"}]}]}}
    api_here, api_there = Pod("a", {"role": "api"}), Pod("b", {"role": "api"})
    ops_debug, ops = Pod("c", {"debug": "1"}, {"team": "ops"}), Pod("c", {}, {"team": "ops"})
    assert admitted([], api_there, dest, 5432), "no policy: not isolated"
    assert admitted([policy], api_here, dest, 5432)
    assert not admitted([policy], api_here, dest, 5433), "another port"
    assert not admitted([policy], api_there, dest, 5432), "a podSelector alone stays in the namespace"
    assert admitted([policy], ops_debug, dest, 5432)
    assert not admitted([policy], ops, dest, 5432), "namespaceSelector and podSelector together: both"
    elsewhere = copy.deepcopy(policy)
    elsewhere["metadata"]["namespace"] = "b"
    assert admitted([elsewhere], Pod("z", {}), dest, 5432), "a policy of another namespace selects nothing here"


# --------------------------------------------------------------------------
# the docs name paths that exist
# --------------------------------------------------------------------------

DOCS = (HERE / "README.md", HERE.parent / "README.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(HERE.parent)))
def test_docs_name_kustomizations_and_files_that_exist(doc: Path) -> None:
    """`kubectl apply -k deploy/k8s/...` and every deploy/k8s path the docs
    name must exist, so that a copied command works."""
    text = doc.read_text()
    named = set(re.findall(r"\b(deploy/k8s(?:/[\w.-]+)*)", text))
    assert named, f"{doc.name} names no deploy/k8s path"
    for path in named:
        target = HERE.parent / path
        assert target.exists(), f"{doc.name} names {path}, which does not exist"
    for path in re.findall(r"kubectl (?:apply|delete|kustomize)[^\n`]*?-k\s+(deploy/k8s[\w./-]*)", text) + \
            re.findall(r"kubectl kustomize\s+(deploy/k8s[\w./-]*)", text):
        assert (HERE.parent / path / "kustomization.yaml").is_file(), f"{doc.name}: `-k {path}` is no kustomization"


# --------------------------------------------------------------------------
# (d) the Grafana dashboards
# --------------------------------------------------------------------------

# Every metric dagmesh exports, with its type and labels. The dashboards may
# name these and nothing else; a Rust test checks the same names against a
# live /metrics. Histograms are named by their family: the series are
# NAME_bucket (with `le`), NAME_sum and NAME_count.
METRICS = {
    "dagmesh_runs_started_total": ("counter", {"workflow"}),
    "dagmesh_runs_finished_total": ("counter", {"workflow", "state"}),
    "dagmesh_steps_started_total": ("counter", {"task_type"}),
    "dagmesh_steps_succeeded_total": ("counter", {"task_type"}),
    "dagmesh_steps_failed_total": ("counter", {"task_type"}),
    "dagmesh_steps_retried_total": ("counter", {"task_type"}),
    "dagmesh_steps_lost_total": ("counter", {"task_type"}),
    "dagmesh_store_errors_total": ("counter", {"kind"}),
    "dagmesh_scheduler_ticks_total": ("counter", {"outcome"}),
    "dagmesh_webhook_deliveries_total": ("counter", {"outcome"}),
    "dagmesh_grpc_server_requests_total": ("counter", {"service", "method", "code"}),
    "dagmesh_queue_depth": ("gauge", {"task_type", "version", "labels"}),
    "dagmesh_queue_oldest_age_seconds": ("gauge", {"task_type", "version", "labels"}),
    "dagmesh_worker_slots_used": ("gauge", {"pool", "task_type"}),
    "dagmesh_worker_slots_free": ("gauge", {"pool", "task_type"}),
    "dagmesh_workers_connected": ("gauge", {"pool"}),
    "dagmesh_scaler_wanted_slots": ("gauge", {"task_type"}),
    "dagmesh_executor_partitions_driven": ("gauge", set()),
    "dagmesh_build_info": ("gauge", {"version"}),
    "dagmesh_step_schedule_to_start_seconds": ("histogram", {"task_type"}),
    "dagmesh_step_duration_seconds": ("histogram", {"task_type"}),
    "dagmesh_engine_batch_size": ("histogram", set()),
    "dagmesh_engine_commit_duration_seconds": ("histogram", set()),
    "dagmesh_grpc_server_request_duration_seconds": ("histogram", {"service", "method"}),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
DASHBOARDS = ("dagmesh-queues", "dagmesh-steps", "dagmesh-runs", "dagmesh-engine")
# Grafana's own variables that may appear in a query.
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval"}
RANGE_WINDOWS = {"$__rate_interval", "$__range"}
PROMETHEUS_DS = {"type": "prometheus", "uid": "${datasource}"}


def metric_series(name: str) -> tuple[str, str, set[str]]:
    """(family, type, labels) of a series name; KeyError for an unknown one."""
    if name in METRICS:
        kind, labels = METRICS[name]
        assert kind != "histogram", f"{name}: a histogram is read through {HISTOGRAM_SUFFIXES}"
        return name, kind, labels
    for suffix in HISTOGRAM_SUFFIXES:
        family = name.removesuffix(suffix)
        if family != name and METRICS.get(family, ("",))[0] == "histogram":
            labels = METRICS[family][1] | ({"le"} if suffix == "_bucket" else set())
            return family, "histogram", labels
    raise KeyError(name)


def _strip_strings(expr: str) -> str:
    """The expression with every string literal emptied (label values and
    regexes cannot then pass for names or brackets)."""
    out, i = [], 0
    while i < len(expr):
        ch = expr[i]
        if ch in "\"'`":
            end = i + 1
            while end < len(expr) and expr[end] != ch:
                end += 2 if expr[end] == "\\" and ch != "`" else 1
            assert end < len(expr), f"unterminated string in {expr!r}"
            out.append(ch + ch)
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _closing(text: str, open_at: int) -> int:
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(open_at, len(text)):
        if text[i] in pairs:
            stack.append(pairs[text[i]])
        elif text[i] in pairs.values():
            assert stack and stack.pop() == text[i], f"unbalanced {text[i]!r} at {i} in {text!r}"
            if not stack:
                return i
    raise AssertionError(f"unclosed {text[open_at]!r} in {text!r}")


def check_promql(expr: str, variables: set[str]) -> set[str]:
    """A PromQL sanity check for a dashboard query; returns the metric
    families it reads. Not a parser (promtool, where installed, is: see
    test_dashboard_queries_parse_with_promtool); it catches what a parser
    would not: unknown metrics or labels, a counter read without rate(), a
    quantile without `le`, a fixed window instead of $__rate_interval."""
    assert expr.strip() == expr and expr, f"empty or padded expr {expr!r}"
    code = _strip_strings(expr)
    assert "#" not in code, expr
    # Balanced brackets overall.
    depth = []
    for ch in code:
        if ch in "([{":
            depth.append(ch)
        elif ch in ")]}":
            assert depth and {"(": ")", "[": "]", "{": "}"}[depth.pop()] == ch, f"unbalanced {ch!r} in {expr!r}"
    assert not depth, f"unclosed {depth} in {expr!r}"
    # Names: a series named inside a string would still be found by a
    # scan for dagmesh_ identifiers, so none may be.
    names = re.findall(r"\bdagmesh_\w+", expr)
    assert names, f"{expr!r} reads no dagmesh metric"
    assert sorted(names) == sorted(re.findall(r"\bdagmesh_\w+", code)), f"a metric name inside a string: {expr!r}"
    families, labels_in_scope = set(), set()
    for match in re.finditer(r"\b(dagmesh_\w+)\s*(\{)?", code):
        name = match.group(1)
        try:
            family, kind, labels = metric_series(name)
        except KeyError:
            raise AssertionError(f"{name} is not a dagmesh metric (METRICS)") from None
        families.add(family)
        labels_in_scope |= labels
        after = match.end()
        if match.group(2):
            close = _closing(code, match.start(2))
            matchers = code[match.start(2) + 1:close]
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels, f"{name} has no label {label!r} ({expr!r})"
            after = close + 1
        ranged = code[after:].lstrip().startswith("[")
        if kind == "counter" or family != name:
            assert ranged, f"{name} is cumulative: read it with rate() or increase() ({expr!r})"
    for window in re.findall(r"\[([^\]]*)\]", code):
        assert window in RANGE_WINDOWS, f"window [{window}]: use $__rate_interval (or $__range) ({expr!r})"
    for clause, labels in re.findall(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)", code):
        for label in filter(None, (x.strip() for x in labels.split(","))):
            assert label in labels_in_scope, f"{clause} ({label}): no metric here has it ({expr!r})"
    for match in re.finditer(r"\bhistogram_quantile\s*\(", code):
        inner = code[match.end():_closing(code, match.end() - 1)]
        quantile, _, rest = inner.partition(",")
        assert 0 <= float(quantile) <= 1, expr
        assert re.search(r"\bdagmesh_\w+_bucket\b", rest), f"histogram_quantile over a non-bucket series ({expr!r})"
        grouping = re.search(r"\b(?:by|without)\s*\(([^)]*)\)", rest)
        assert grouping and "le" in [x.strip() for x in grouping.group(1).split(",")], (
            f"histogram_quantile needs the sum kept by le ({expr!r})")
    for var in re.findall(r"\$\{?(\w+)", expr):
        assert var in variables | GRAFANA_BUILTINS, f"${var} is not a variable of the dashboard ({expr!r})"
    return families


def _dashboard_path(name: str) -> Path:
    return GRAFANA / f"{name}.json"


def _load_dashboard(name: str) -> dict:
    return json.loads(_dashboard_path(name).read_text())


def _all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def test_dashboard_files_are_the_four_expected() -> None:
    assert sorted(p.stem for p in GRAFANA.glob("*.json")) == sorted(DASHBOARDS)


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_is_canonical_json(name: str) -> None:
    """Valid JSON, pretty-printed the one way `python3 -m json.tool --indent 2`
    writes it, so that diffs show what changed and nothing else."""
    text = _dashboard_path(name).read_text()
    dashboard = json.loads(text)
    assert text == json.dumps(dashboard, indent=2) + "\n", (
        f"{name}.json: reformat with `python3 -m json.tool --indent 2`")


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_structure(name: str) -> None:
    dashboard = _load_dashboard(name)
    assert dashboard["uid"] == name
    assert dashboard["schemaVersion"] == 39
    assert dashboard["id"] is None, "an exported id would clash on import"
    assert "dagmesh" in dashboard["tags"]
    assert dashboard["title"].startswith("dagmesh")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    panels = _all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert all(titles) and len(titles) == len(set(titles)), f"{name}: empty or duplicate titles"
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in "hwxy") and pos["w"] >= 1 and pos["h"] >= 1
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']}: wider than the grid"
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']}: overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        if "targets" in panel:
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == PROMETHEUS_DS, panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            for t in panel["targets"]:
                assert t["datasource"] == PROMETHEUS_DS, panel["title"]
        else:
            assert panel["type"] == "text", f"{panel['title']}: a panel with no query"
    # Tempo links need a Tempo data source variable.
    if "${tempo}" in json.dumps(dashboard):
        assert variables.get("tempo", {}).get("type") == "datasource"
        assert variables["tempo"]["query"] == "tempo"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_queries_use_only_dagmesh_metrics(name: str) -> None:
    dashboard = _load_dashboard(name)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    read = set()
    for panel in _all_panels(dashboard):
        for target in panel.get("targets", []):
            read |= check_promql(target["expr"], variables)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((dagmesh_\w+),\s*(\w+)\)", var["definition"])
            assert match, f"${var['name']}: {var['definition']!r}"
            assert var["query"]["query"] == var["definition"]
            _, _, labels = metric_series(match.group(1))
            assert match.group(2) in labels, var["definition"]
    assert read, f"{name} reads no metric"


def test_dashboards_cover_every_metric() -> None:
    """A metric no dashboard shows is either dead or forgotten."""
    read = set()
    for name in DASHBOARDS:
        dashboard = _load_dashboard(name)
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        for panel in _all_panels(dashboard):
            for target in panel.get("targets", []):
                read |= check_promql(target["expr"], variables)
    assert read == set(METRICS), f"not on any dashboard: {sorted(set(METRICS) - read)}"


def test_runs_dashboard_links_a_run_to_its_trace() -> None:
    dashboard = _load_dashboard("dagmesh-runs")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["run_id"]["type"] == "textbox"
    links = [link for link in dashboard["links"] if link["type"] == "link"]
    assert links, "no link to Tempo"
    for link in links:
        url = link["url"]
        assert url.startswith("/explore?"), url
        panes = json.loads(re.sub(r"%[0-9A-F]{2}", lambda m: chr(int(m.group(0)[1:], 16)),
                                  url.split("panes=", 1)[1]))
        (pane,) = panes.values()
        assert pane["datasource"] == "${tempo}"
        assert pane["queries"][0]["query"] == "${run_id}", "the trace id is the run id (hex)"
    texts = [p["options"]["content"] for p in _all_panels(dashboard) if p["type"] == "text"]
    assert any("without the dashes" in t for t in texts), "explain how a run id becomes a trace id"


def test_grafana_readme_lists_the_metrics() -> None:
    readme = (GRAFANA / "README.md").read_text()
    named = set(re.findall(r"\bdagmesh_\w+", readme))
    for name in named:
        family = re.sub(r"(_bucket|_sum|_count)$", "", name) if name not in METRICS else name
        assert family in METRICS, f"README.md names {name}, which dagmesh does not export"
    assert set(METRICS) <= named, f"README.md does not list {sorted(set(METRICS) - named)}"
    for name in DASHBOARDS:
        assert f"{name}.json" in readme, name


def test_promql_checker_catches_mistakes() -> None:
    ok = {"task_type"}
    bad = {
        "rate(dagmesh_steps_started[5m])": "not a dagmesh metric",
        "sum(dagmesh_steps_started_total)": "cumulative",
        "sum by (task) (rate(dagmesh_steps_started_total[$__rate_interval]))": "no metric here has it",
        'sum(rate(dagmesh_steps_started_total{task="x"}[$__rate_interval]))': "has no label",
        "sum(rate(dagmesh_steps_started_total[5m]))": "window",
        "histogram_quantile(0.9, sum by (task_type) (rate(dagmesh_step_duration_seconds_bucket[$__rate_interval])))":
            "le",
        "sum(rate(dagmesh_steps_started_total[$__rate_interval])": "unclosed",
        "sum(dagmesh_step_duration_seconds)": "histogram",
        'sum(dagmesh_queue_depth{task_type=~"$nope"})': "not a variable",
    }
    for expr, why in bad.items():
        with pytest.raises(AssertionError, match=why):
            check_promql(expr, ok)
    assert check_promql('sum by (task_type) (dagmesh_queue_depth{task_type=~"$task_type"})', ok) == {
        "dagmesh_queue_depth"}


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Where Prometheus' promtool is installed, every query must parse (the
    Grafana variables replaced by values of the right shape)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool on PATH")
    rules = []
    for name in DASHBOARDS:
        for panel in _all_panels(_load_dashboard(name)):
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "5m").replace("$__range", "6h")
                expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
                rules.append({"record": f"dashboard:query{len(rules)}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
