"""Validate rendered Kubernetes manifests, one document at a time, offline.

Every document is checked with kubernetes-validate's *strict* schemas (unknown
fields rejected) for each requested Kubernetes version. A document whose kind has
no bundled schema FAILS, with one exception: the custom resources in
``CRD_SUBSET_SCHEMAS`` (the Prometheus Operator's ServiceMonitor). Their CRDs are
not part of Kubernetes, so they are checked against a hand-written subset schema
here instead (the fields the chart emits, strictly), and reported as such.

Usage (with the .tools venv, which has kubernetes-validate)::

    helm template charts/llm-stream | .tools/venv/bin/python scripts/validate_manifests.py \
        -k 1.29 -k newest -

Exit status: 0 all valid; 1 any document invalid or without a schema.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-not-found,import-untyped,unused-ignore]
import yaml  # type: ignore[import-untyped,unused-ignore]
from kubernetes_validate import utils as kv  # type: ignore[import-not-found,import-untyped,unused-ignore]

# Prometheus duration, as the ServiceMonitor CRD defines it.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
    r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}

# (apiVersion, kind) -> a strict subset of the CRD's schema: what the chart emits.
CRD_SUBSET_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": _NAME,
                    "namespace": _NAME,
                    "labels": _LABELS,
                    "annotations": _LABELS,
                },
            },
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matchLabels": _LABELS,
                            "matchExpressions": {"type": "array"},
                        },
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                            },
                        },
                    },
                    "jobLabel": {"type": "string"},
                },
            },
        },
    },
}


def documents(texts: Iterable[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for origin, text in texts:
        for index, doc in enumerate(yaml.safe_load_all(text)):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                raise ValueError(f"{origin} document {index}: not a Kubernetes object")
            docs.append((origin, doc))
    return docs


def drain_invariant(doc: dict[str, Any]) -> str | None:
    """For a Deployment running llm-stream (it sets LLM_STREAM_DRAIN_GRACE): "" when
    terminationGracePeriodSeconds > preStop sleep + drain grace, else why not (streams
    would be cut on rollouts); None for anything else."""
    if doc.get("kind") != "Deployment":
        return None
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []):
        env = {e.get("name"): e.get("value") for e in container.get("env", [])}
        if "LLM_STREAM_DRAIN_GRACE" not in env:
            continue
        drain = float(env["LLM_STREAM_DRAIN_GRACE"])
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        pre_stop = float(command[1]) if command and command[0] == "sleep" else 0.0
        grace = float(pod.get("terminationGracePeriodSeconds", 30))
        if not grace > pre_stop + drain:
            return (
                f"terminationGracePeriodSeconds {grace:g} <= preStop sleep {pre_stop:g}"
                f" + drain grace {drain:g}"
            )
        return ""
    return None


def resolve_version(text: str) -> str:
    newest = str(kv.latest_version())
    if text == "newest":
        return newest
    return text.removeprefix("v")


def check(doc: dict[str, Any], version: str) -> tuple[bool, str]:
    """(ok, what was checked or why it failed)."""
    api_kind = (str(doc["apiVersion"]), str(doc["kind"]))
    subset = CRD_SUBSET_SCHEMAS.get(api_kind)
    if subset is not None:
        errors = sorted(
            jsonschema.Draft202012Validator(subset).iter_errors(doc), key=lambda e: list(e.path)
        )
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.path)
            return False, f"CRD subset schema: {where}: {first.message}"
        return True, "CRD: not in the Kubernetes schemas; checked against the chart's subset schema"
    try:
        validated = kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        return False, f"{where}: {exc.message}"
    except kv.SchemaNotFoundError:
        return False, f"no Kubernetes {version} schema for {api_kind[0]} {api_kind[1]}"
    except kv.VersionNotSupportedError:
        return False, f"kubernetes-validate bundles no schemas for Kubernetes {version}"
    return True, f"strict schema {validated}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-k",
        "--kubernetes-version",
        action="append",
        default=None,
        help="e.g. 1.29 or newest (repeatable; default: newest)",
    )
    parser.add_argument("files", nargs="+", help="manifest files; - is stdin")
    args = parser.parse_args(argv)
    versions = [resolve_version(v) for v in (args.kubernetes_version or ["newest"])]
    texts = [
        ("<stdin>", sys.stdin.read())
        if name == "-"
        else (name, Path(name).read_text(encoding="utf-8"))
        for name in args.files
    ]
    try:
        docs = documents(texts)
    except (ValueError, yaml.YAMLError) as exc:
        sys.stderr.write(f"validate_manifests: {exc}\n")
        return 1
    if not docs:
        sys.stderr.write("validate_manifests: no documents\n")
        return 1
    failures = 0
    for origin, doc in docs:
        problem = drain_invariant(doc)
        name = doc.get("metadata", {}).get("name", "?")
        if problem:
            failures += 1
            sys.stdout.write(f"FAIL drain {doc['kind']}/{name}: {problem} ({origin})\n")
        elif problem is not None:
            sys.stdout.write(f"ok   drain {doc['kind']}/{name}: grace > preStop + drain grace\n")
    for version in versions:
        for origin, doc in docs:
            ok, detail = check(doc, version)
            name = doc.get("metadata", {}).get("name", "?")
            line = f"{'ok  ' if ok else 'FAIL'} k8s {version} {doc['kind']}/{name}: {detail}"
            if not ok:
                failures += 1
                line += f" ({origin})"
            sys.stdout.write(line + "\n")
    summary = f"{len(docs)} documents x {len(versions)} versions ({', '.join(versions)})"
    if failures:
        sys.stdout.write(f"validate_manifests: {failures} failed of {summary}\n")
        return 1
    sys.stdout.write(f"validate_manifests: all valid, {summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
