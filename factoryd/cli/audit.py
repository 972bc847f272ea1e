"""`factoryd audit`: the ledger's audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from factoryd.cli.opts import ConfigOption, command_group, fail, get_settings
from factoryd.errors import FactorydError

app = command_group("The ledger's audit trail.")

# A manifest's detached signature sits next to it (`factoryd manifest export` writes both).
MANIFEST_SUFFIX = ".manifest.json"
SIGNATURE_SUFFIX = ".manifest.p7s"


def _signature_path(manifest: Path) -> Path:
    """The detached signature written next to ``manifest``."""
    if manifest.name.endswith(MANIFEST_SUFFIX):
        return manifest.with_name(manifest.name[: -len(MANIFEST_SUFFIX)] + SIGNATURE_SUFFIX)
    return manifest.with_name(manifest.name + ".p7s")


@app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    url: Annotated[str | None, typer.Option(help="Ledger URL (instead of the config's).")] = None,
    manifest: Annotated[
        list[Path] | None,
        typer.Option(
            help="A signed lot manifest whose audit chain heads must still be in the trail (repeatable); "
            "its .p7s signature next to it is checked against --ca.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(help="PEM of the lot's CA (the manifest signer's chain), to check manifest signatures."),
    ] = None,
) -> None:
    """Recompute every audit hash chain; exit 1 naming the chain and first bad entry if tampered with."""
    from factoryd.errors import AuditChainError  # noqa: PLC0415
    from factoryd.ledger import Ledger  # noqa: PLC0415
    from factoryd.ledger.audit import ChainHead, anchors_from_manifest  # noqa: PLC0415
    from factoryd.ledger.core import verify_audit_chains  # noqa: PLC0415
    from factoryd.pki.manifest import ManifestError, verify_manifest  # noqa: PLC0415
    from factoryd.pki.manifest_check import load_chain  # noqa: PLC0415

    manifests = manifest or []
    if manifests and ca is None:
        fail("--manifest needs --ca: a manifest's anchors count only once its signature is checked")
    anchors: list[ChainHead] = []
    sources: list[str] = []
    try:
        trust = load_chain(ca.read_bytes()) if ca is not None else []
        for path in manifests:
            document = verify_manifest(path.read_bytes(), _signature_path(path).read_bytes(), trust)
            found = anchors_from_manifest(document)
            if not found:
                fail(f"manifest {path} anchors no audit chain heads (made before anchoring existed)")
            anchors += found
            sources.append(path.name)
    except (ManifestError, AuditChainError, OSError) as exc:
        fail(f"manifest not usable: {exc}")
    ledger_url = url or get_settings(config).ledger_url
    source = f"the manifest {', '.join(sources)}" if len(sources) == 1 else "a manifest"
    try:
        with Ledger.open(ledger_url) as ledger:
            chains = verify_audit_chains(ledger, anchors, source=source)
    except AuditChainError as exc:
        fail(str(exc), code=1)
    except FactorydError as exc:
        fail(str(exc))
    entries = sum(chain.count for chain in chains.values())
    typer.echo(f"audit chain verified: {entries} entries in {len(chains)} chains")
    for name in sorted(chains):
        typer.echo(f"  {name}: {chains[name].count} entries")
    if anchors:
        typer.echo(f"{len(anchors)} chain heads anchored in {len(sources)} signed manifest(s) hold")
