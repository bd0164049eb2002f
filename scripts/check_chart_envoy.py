"""Check the Envoy config the chart renders (run with the project's .venv).

For every rendered manifest file with the chart's Envoy (ConfigMap + Deployment):

1. The config files in the ConfigMap equal, as data, what scripts/render_envoy.py
   renders for the same listener, admin, upstreams, CORS origins (envoy.grpcWeb) and,
   with upstream TLS, for the paths where the Envoy Deployment mounts its ConfigMap and
   Secrets and the server name the chart chose. So the chart's config is
   deploy/envoy.yaml with only what render_envoy.py changes, and the TLS variant the
   Envoy tests run is the chart's.
2. It is valid for the real Envoy (``envoy --mode validate``): the files are written to a
   temporary folder (their mount paths rewritten to it) next to throwaway certificates
   (tests/certs.py), and Envoy must neither reject an SDS file nor warn of deprecated
   fields. Validate mode does not load SDS files, so their secrets are also validated
   as static secrets of the same config (which loads the certificate files too).

Usage: .venv/bin/python scripts/check_chart_envoy.py --envoy .tools/bin/envoy RENDERED.yaml...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import render_envoy  # noqa: E402  (scripts/ is this script's own folder)

from tests.certs import CertificateAuthority  # noqa: E402

# The chart's volume names in the Envoy pod (templates/envoy-deployment.yaml).
UPSTREAM_CA_VOLUME = "upstream-ca"
CLIENT_CERT_VOLUME = "client-tls"


def first_difference(want: Any, got: Any, path: str = "") -> str | None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in list(want) + [k for k in got if k not in want]:
            if key not in got:
                return f"{path}.{key}: missing (render_envoy.py has {want[key]!r})"
            if key not in want:
                return f"{path}.{key}: only in the chart ({got[key]!r})"
            found = first_difference(want[key], got[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{path}: {len(got)} items, render_envoy.py has {len(want)}"
        for index, (a, b) in enumerate(zip(want, got, strict=True)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    if want != got:
        return f"{path}: chart {got!r}, render_envoy.py {want!r}"
    return None


def envoy_objects(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    configmaps = [d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d.get("data", {})]
    deployments = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and any(c["name"] == "envoy" for c in d["spec"]["template"]["spec"]["containers"])
    ]
    if not configmaps and not deployments:
        return None
    if len(configmaps) != 1 or len(deployments) != 1:
        raise ValueError(
            f"{len(configmaps)} Envoy ConfigMaps and {len(deployments)} Envoy Deployments"
        )
    return configmaps[0], deployments[0]


def secret_file(pod: dict[str, Any], mounts: dict[str, str], volume: str, path: str) -> Path:
    """Where the Envoy container sees ``path`` of the Secret volume ``volume``."""
    if volume not in mounts:
        raise ValueError(f"the Envoy container does not mount the {volume!r} volume")
    spec = next(v for v in pod["volumes"] if v["name"] == volume)
    items = [i["path"] for i in spec["secret"].get("items", [])]
    if items and path not in items:
        raise ValueError(f"volume {volume!r} projects {items}, not {path!r}")
    return Path(mounts[volume]) / path


def expected_files(configmap: dict[str, Any], deployment: dict[str, Any]) -> dict[str, Any]:
    """render_envoy.py's files for the chart's parameters, parsed."""
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "envoy")
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    config_volume = next(
        v["name"]
        for v in pod["volumes"]
        if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]
    )
    config_dir = Path(mounts[config_volume])
    if str(config_dir / "envoy.yaml") not in container.get("args", []):
        raise ValueError(f"Envoy is not started with --config-path {config_dir}/envoy.yaml")

    config = yaml.safe_load(configmap["data"]["envoy.yaml"])
    resources = config["static_resources"]
    listener = render_envoy._named(resources["listeners"], render_envoy.LISTENER, "listener")
    cluster = render_envoy._named(resources["clusters"], render_envoy.CLUSTER, "cluster")
    upstreams = [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    allowed_origins, allowed_origin_regexes = [], []
    for matcher in render_envoy.cors_policy(config).get("allow_origin_string_match", []):
        if set(matcher) == {"exact"}:
            allowed_origins.append(matcher["exact"])
        elif set(matcher) == {"safe_regex"} and set(matcher["safe_regex"]) == {"regex"}:
            allowed_origin_regexes.append(matcher["safe_regex"]["regex"])
        else:
            raise ValueError(f"a CORS origin matcher render_envoy.py does not write: {matcher}")
    tls = None
    socket = cluster.get("transport_socket")
    if socket is not None:
        mtls = CLIENT_CERT_VOLUME in mounts
        tls = render_envoy.UpstreamTls(
            ca=secret_file(pod, mounts, UPSTREAM_CA_VOLUME, "ca.crt"),
            server_name=socket["typed_config"]["sni"],
            client_cert=secret_file(pod, mounts, CLIENT_CERT_VOLUME, "tls.crt") if mtls else None,
            client_key=secret_file(pod, mounts, CLIENT_CERT_VOLUME, "tls.key") if mtls else None,
        )
    files = render_envoy.render_files(
        listener["address"]["socket_address"]["port_value"],
        config["admin"]["address"]["socket_address"]["port_value"],
        upstreams,
        sds_dir=config_dir,
        listen_address=listener["address"]["socket_address"]["address"],
        admin_address=config["admin"]["address"]["socket_address"]["address"],
        upstream_tls=tls,
        allowed_origins=allowed_origins,
        allowed_origin_regexes=allowed_origin_regexes,
    )
    return {
        "config_dir": config_dir,
        "tls": tls,
        "files": files,
        "origins": len(allowed_origins) + len(allowed_origin_regexes),
    }


def validate(envoy: Path, data: dict[str, str], expected: dict[str, Any], work: Path) -> str:
    """The chart's files, paths moved into ``work``, through ``envoy --mode validate``."""
    moves: dict[str, str] = {}
    tls = expected["tls"]
    if tls is not None:
        ca = CertificateAuthority(work / "ca", name="check chart envoy CA")
        (work / "upstream-ca").mkdir()
        (work / "upstream-ca" / tls.ca.name).write_bytes(ca.cert_pem)
        moves[str(tls.ca.parent)] = str(work / "upstream-ca")
        if tls.client_cert is not None and tls.client_key is not None:
            client = ca.issue_client("envoy-client")
            (work / "client").mkdir()
            (work / "client" / tls.client_cert.name).write_bytes(client.cert_pem)
            (work / "client" / tls.client_key.name).write_bytes(client.key_pem)
            moves[str(tls.client_cert.parent)] = str(work / "client")
    config_dir = work / "config"
    config_dir.mkdir()
    moves[f"{expected['config_dir']}/"] = f"{config_dir}/"
    for name, text in data.items():
        moved = text
        for source in sorted(moves, key=len, reverse=True):  # /etc/envoy-tls before /etc/envoy/
            moved = moved.replace(source, moves[source])
        (config_dir / name).write_text(moved, encoding="utf-8")
    problems = [envoy_validate(envoy, config_dir / "envoy.yaml")]
    if tls is not None:
        # Validate mode does not load SDS files it can find: check their content (and
        # the certificates they name) as static secrets of an otherwise equal config.
        inlined = config_dir / "inlined-sds.yaml"
        inlined.write_text(inline_sds(config_dir), encoding="utf-8")
        problems.append(envoy_validate(envoy, inlined))
    return "; ".join(p for p in problems if p)


def inline_sds(config_dir: Path) -> str:
    """envoy.yaml with its file-based SDS secrets turned into static secrets."""
    config = yaml.safe_load((config_dir / "envoy.yaml").read_text(encoding="utf-8"))
    secrets = config["static_resources"].setdefault("secrets", [])
    cluster = render_envoy._named(
        config["static_resources"]["clusters"], render_envoy.CLUSTER, "cluster"
    )
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    references = [common["validation_context_sds_secret_config"]]
    references += common.get("tls_certificate_sds_secret_configs", [])
    for reference in references:
        path = Path(reference.pop("sds_config")["path_config_source"]["path"])
        for resource in yaml.safe_load(path.read_text(encoding="utf-8"))["resources"]:
            if resource.pop("@type") != render_envoy._SECRET_TYPE:
                raise ValueError(f"{path}: not a Secret resource")
            secrets.append(resource)
    return str(yaml.safe_dump(config, sort_keys=False))


def envoy_validate(envoy: Path, config: Path) -> str:
    """ "" when ``envoy --mode validate`` accepts ``config`` cleanly, else why not."""
    command = [str(envoy), "--mode", "validate", "-c", str(config), "--log-level", "warn"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        return f"envoy --mode validate {config.name} failed: {output}"
    for word in ("rejected", "deprecated"):
        if word in output.lower():
            return f"envoy --mode validate {config.name}: {output}"
    return ""


def check(name: str, envoy: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(Path(name).read_text(encoding="utf-8")) if d]
    found = envoy_objects(docs)
    if found is None:
        return []
    configmap, deployment = found
    expected = expected_files(configmap, deployment)
    data = configmap["data"]
    failures = []
    if set(data) != set(expected["files"]):
        failures.append(
            f"ConfigMap keys {sorted(data)}, render_envoy.py {sorted(expected['files'])}"
        )
    for key in sorted(set(data) & set(expected["files"])):
        if not key.endswith((".yaml", ".yml")):
            if data[key] != expected["files"][key]:
                failures.append(f"{key} differs from render_envoy.py's")
            continue
        difference = first_difference(
            yaml.safe_load(expected["files"][key]), yaml.safe_load(data[key]), key
        )
        if difference:
            failures.append(f"differs from render_envoy.py: {difference}")
    with tempfile.TemporaryDirectory() as work:
        problem = validate(envoy, data, expected, Path(work))
        if problem:
            failures.append(problem)
    tls = expected["tls"]
    what = "plaintext upstreams"
    if tls is not None:
        what = "upstream mTLS" if tls.client_cert else "upstream TLS"
    what += f", {expected['origins']} grpc-web origins"
    if not failures:
        sys.stdout.write(
            f"ok   {name}: Envoy config ({what}) = render_envoy.py's, envoy validates it\n"
        )
    return failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envoy", type=Path, required=True)
    parser.add_argument("rendered", nargs="+")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.rendered:
        try:
            failures = check(name, args.envoy)
        except (KeyError, StopIteration, ValueError) as exc:
            failures = [f"cannot read the chart's Envoy objects: {exc!r}"]
        for failure in failures:
            sys.stdout.write(f"FAIL {name}: {failure}\n")
        failed += bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
