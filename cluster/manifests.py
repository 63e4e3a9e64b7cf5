"""Checks for the cluster manifests in cluster/kuberay/ and cluster/launcher/, strict enough to
catch what KubeRay and the launcher let through: a misspelled field (KubeRay's CRD schemas
list fields but do not forbid others, so the API server drops a typo unless asked for strict
field validation), a `serveConfigV2` typo (a plain string to Kubernetes; Ray Serve's schema
ignores unknown keys for forward compatibility), a GPU request without its limit, a
`rayVersion` that is not the image's Ray, an `import_path` that names no module.

The CRD schemas are KubeRay v1.7.0's (`../shared/kuberay/`, no package registry ships them);
the launcher schema ships inside the ray wheel (`ray/autoscaler/ray-schema.json`).
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
AWS_GPU_FAMILIES = ("p3", "p4d", "p4de", "p5", "p5e", "g4dn", "g5", "g6", "g6e")  # EC2 types with NVIDIA GPUs
CLOZE_BUILDER = "pipelines.serve:app_builder"  # `cloze serve`'s app for serveConfigV2
KINDS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}

# ObjectMeta's fields a manifest may set (the API server knows these and nothing else)
OBJECT_META = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "generateName": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def ray_pin(repo: Path = REPO) -> str:
    """The Ray version pyproject.toml pins (`ray[...]==X`)."""
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.strip())
        if m:
            return m.group(2)
    raise ValueError("pyproject.toml pins no ray version")


# ------------------------------------------------------------------ schemas

def strict(node: Any) -> Any:
    """A Kubernetes structural schema (OpenAPI v3 + extensions) as a strict draft-07 JSON
    schema, with the API server's semantics: an object schema without
    x-kubernetes-preserve-unknown-fields accepts only the fields it lists (additionalProperties,
    when given, stays: maps like labels); x-kubernetes-int-or-string is an integer or a string;
    `nullable` admits null. CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict(schema) for name, schema in value.items()}
        elif key in ("enum", "default", "required", "example", "x-kubernetes-list-map-keys"):
            out[key] = value
        else:
            out[key] = strict(value)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (out.get("type") == "object" and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out):
        out["additionalProperties"] = False
    return out


def crd_schema(crd_dir: Path, kind: str) -> dict:
    """The strict schema of a `ray.io/v1` kind from its CRD file."""
    import yaml

    path = Path(crd_dir) / f"ray.io_{KINDS[kind]}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB: C parser, 5x faster
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"].pop("status", None)  # the operator writes it, a manifest never does
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def schema_errors(doc: Any, schema: dict) -> list[str]:
    """Every place `doc` breaks `schema`, as `path: message` lines."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ------------------------------------------------------------------ KubeRay lints

def cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """The RayCluster spec(s) inside a manifest, with where they sit."""
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayCluster":
        yield "spec", spec
    elif doc.get("kind") == "RayJob":
        yield "spec/rayClusterSpec", spec.get("rayClusterSpec", {})
    elif doc.get("kind") == "RayService":
        yield "spec/rayClusterConfig", spec.get("rayClusterConfig", {})


def groups(cluster: dict) -> Iterator[tuple[str, dict]]:
    yield "headGroupSpec", cluster.get("headGroupSpec", {})
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        yield f"workerGroupSpecs/{i}", group


def containers(group: dict) -> Iterator[tuple[int, dict]]:
    yield from enumerate(group.get("template", {}).get("spec", {}).get("containers", []))


def image_ray_version(image: str) -> str | None:
    """`rayproject/ray:2.60.0-py311-gpu` -> "2.60.0"; None for another image."""
    m = re.fullmatch(r"(?:[\w.\-]+/)*ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-[\w.\-]+)?", image)
    return m.group(1) if m else None


def lint_kuberay(doc: dict, repo: Path = REPO) -> list[str]:
    """What the CRD schema cannot say: versions agree, GPUs are limited, the head runs no
    work, token auth is on, and a RayService's serveConfigV2 is a valid, strict Serve config
    whose import_path is a module of this repository."""
    problems = []
    pin = ray_pin(repo)
    for where, cluster in cluster_specs(doc):
        version = cluster.get("rayVersion")
        if version != pin:
            problems.append(f"{where}/rayVersion: {version!r} is not the pinned Ray {pin} (pyproject.toml)")
        if cluster.get("authOptions", {}).get("mode") != "token":
            problems.append(f"{where}/authOptions/mode: must be token (Ray token authentication stays on)")
        for gwhere, group in groups(cluster):
            if gwhere == "headGroupSpec" and group.get("rayStartParams", {}).get("num-cpus") != "0":
                problems.append(f"{where}/headGroupSpec/rayStartParams/num-cpus: must be \"0\" (no work on the head)")
            for i, c in containers(group):
                path = f"{where}/{gwhere}/template/spec/containers/{i}"
                image_version = image_ray_version(c.get("image", ""))
                if image_version is None:
                    problems.append(f"{path}/image: {c.get('image')!r} is not a rayproject/ray:<version> image")
                elif image_version != version:
                    problems.append(f"{path}/image: Ray {image_version} but rayVersion is {version!r}")
                resources = c.get("resources", {})
                requests, limits = resources.get("requests", {}), resources.get("limits", {})
                if GPU in requests and str(requests[GPU]) != str(limits.get(GPU)):
                    problems.append(f"{path}/resources: requests {GPU} = {requests[GPU]} without the same limit "
                                    f"(Kubernetes needs GPU limits)")
                if GPU in limits:
                    tolerations = group.get("template", {}).get("spec", {}).get("tolerations", [])
                    if not any(t.get("key") == GPU for t in tolerations):
                        problems.append(f"{where}/{gwhere}/template/spec/tolerations: GPU pods need a toleration "
                                        f"for the {GPU} taint")
    if doc.get("kind") == "RayService":
        problems += lint_serve_config(doc.get("spec", {}).get("serveConfigV2", ""), repo)
    if doc.get("kind") == "RayJob":
        problems += lint_runtime_env(doc["spec"].get("runtimeEnvYAML", ""), "spec/runtimeEnvYAML", repo)
    return problems


def lint_serve_config(text: str, repo: Path = REPO) -> list[str]:
    """serveConfigV2: YAML, valid for Ray Serve's ServeDeploySchema, no key Serve's models do
    not define (Serve would ignore it), every import_path a module file of this repository,
    every application's runtime_env valid."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"serveConfigV2: not YAML: {e}"]
    problems = unknown_keys(ServeDeploySchema, config, "serveConfigV2")
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError lists every problem
        problems.append(f"serveConfigV2: {e}")
    for i, app in enumerate(config.get("applications", []) if isinstance(config, dict) else []):
        problem = import_path_problem(str(app.get("import_path", "")), repo)
        if problem:
            problems.append(f"serveConfigV2/applications/{i}/import_path: {app.get('import_path')!r}: {problem}")
        elif app.get("import_path") == CLOZE_BUILDER:
            problems += [f"serveConfigV2/applications/{i}/args: {p}" for p in cloze_args_problems(app.get("args"))]
        if "runtime_env" in app:
            problems += lint_runtime_env(app["runtime_env"], f"serveConfigV2/applications/{i}/runtime_env", repo)
    return problems


def cloze_args_problems(args: Any) -> list[str]:
    """The args of cloze's own app builder: `model_dir` and keys of the [serve] table, checked
    by the loader `cloze serve` uses (Serve passes args through unchecked)."""
    from pipelines.config import ConfigError
    from pipelines.serve_config import ServeConfig

    if not isinstance(args, dict) or not args.get("model_dir"):
        return ["needs model_dir (the classifier folder, a path inside the pods)"]
    try:
        ServeConfig.from_dict({k: v for k, v in args.items() if k != "model_dir"})
    except ConfigError as e:
        return [str(e)]
    return []


def import_path_problem(import_path: str, repo: Path = REPO) -> str | None:
    """Why `module:name` names nothing in this repository: no such module file, or no
    top-level `name` in it (read with ast: importing the module would need its dependencies)."""
    import ast

    # Ray Serve takes `module:name` and `module.name`
    module, _, name = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    base = repo / Path(*module.split("."))
    file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not module or not file.is_file():
        return f"no module {module} in this repository"
    tree = ast.parse(file.read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    return None if name in defined else f"{file.relative_to(repo)} defines no {name}"


def unknown_keys(model: type, value: Any, where: str) -> list[str]:
    """Keys of `value` that pydantic `model` (and the models nested in its fields) does not
    define, found through the fields' type annotations; and the values of nested models that
    a field also accepts as a plain dict (e.g. autoscaling_config), which Serve's top-level
    validation lets through unchecked."""
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    problems = [f"{where}/{key}: not a field of Ray Serve's {model.__name__}" for key in value if key not in known]
    for name, field in fields.items():
        inner = value.get(field.alias or name)
        nested = _models(field.annotation)
        if inner is None or len(nested) != 1:
            continue
        items = inner if isinstance(inner, list) else [inner]
        for j, item in enumerate(items):
            sub = f"{where}/{name}/{j}" if isinstance(inner, list) else f"{where}/{name}"
            problems += unknown_keys(nested[0], item, sub)
            if _accepts_dict(field.annotation) and isinstance(item, dict):
                try:
                    nested[0].model_validate(item)
                except Exception as e:  # noqa: BLE001 - pydantic's ValidationError
                    problems.append(f"{sub}: {e}")
    return problems


def _models(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _accepts_dict(annotation: Any) -> bool:
    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    return any(_accepts_dict(arg) for arg in typing.get_args(annotation))


def lint_runtime_env(env: str | dict, where: str, repo: Path = REPO) -> list[str]:
    """A runtime_env (YAML text or a dict): Ray accepts it, code comes from a URI, and its pip
    packages are exactly the pins `cloze submit` installs (constraints, then pyproject's)."""
    import yaml
    from ray.runtime_env import RuntimeEnv

    from .jobs import runtime_packages

    if isinstance(env, str):
        try:
            env = yaml.safe_load(env) or {}
        except yaml.YAMLError as e:
            return [f"{where}: not YAML: {e}"]
    problems = []
    try:
        RuntimeEnv(**env)
    except Exception as e:  # noqa: BLE001 - Ray raises TypeError / ValueError for a bad field
        problems.append(f"{where}: Ray rejects it: {e}")
    if "://" not in str(env.get("working_dir", "")):
        problems.append(f"{where}/working_dir: must be a URI the cluster can fetch (s3://..., https://...zip)")
    packages = (env.get("pip") or {}).get("packages")
    if packages != runtime_packages(repo):
        problems.append(f"{where}/pip/packages: must be {runtime_packages(repo)} (pyproject.toml's pins under "
                        f"constraints.txt), got {packages}")
    return problems


# ------------------------------------------------------------------ launcher lints

def lint_launcher(config: dict, repo: Path = REPO) -> list[str]:
    """The cluster-launcher YAML beyond its schema: the head node type exists and runs no work,
    the docker image's Ray is the pinned one, GPU node types declare their GPUs, and every
    node starts Ray with token authentication."""
    problems = []
    pin = ray_pin(repo)
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type: {head!r} is not one of available_node_types ({', '.join(types)})")
    elif types[head].get("resources", {}).get("CPU") != 0:
        problems.append(f"available_node_types/{head}/resources/CPU: must be 0 (no work on the head)")
    image = config.get("docker", {}).get("image", "")
    if image_ray_version(image) != pin:
        problems.append(f"docker/image: {image!r} is not rayproject/ray:{pin}-... (the pinned Ray)")
    for name, node in types.items():
        instance = str(node.get("node_config", {}).get("InstanceType", ""))
        if instance.split(".")[0] in AWS_GPU_FAMILIES and not node.get("resources", {}).get("GPU"):
            problems.append(f"available_node_types/{name}/resources/GPU: {instance} has GPUs; declare them")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        lines = [c for c in config.get(key, []) if "ray start" in c]
        if not lines or not all("RAY_AUTH_MODE=token" in c for c in lines):
            problems.append(f"{key}: `ray start` must run with RAY_AUTH_MODE=token")
        if key == "head_start_ray_commands" and not any("--num-cpus=0" in c for c in lines):
            problems.append(f"{key}: the head's `ray start` needs --num-cpus=0")
    return problems

