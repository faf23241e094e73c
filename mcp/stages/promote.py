"""`mcp promote`: move the ``champion`` alias of a registered model to a chosen version.

Policy of ``--best``: among the versions a search registered (tag ``mcp.stage=search``),
the highest ``test_accuracy``; ties go to the smaller ``size_bytes_compressed``, then to
the newer version."""

from __future__ import annotations

from mcp import tracking
from mcp.errors import McpError
from mcp.tracking import schema

ALIAS = schema.CHAMPION_ALIAS


def best_version(name: str) -> str:
    versions = tracking.models.list_versions(name)
    if not versions:
        raise McpError(f"registered model {name!r} does not exist or has no versions")
    searched = [(v, tags) for v, tags, _ in versions if tags.get(schema.STAGE) == "search" and "test_accuracy" in tags]
    if not searched:
        raise McpError(f"registered model {name!r} has no version registered by `mcp search`; "
                       f"promote one with --version N")

    def key(item):
        version, tags = item
        return (float(tags["test_accuracy"]), -float(tags.get("size_bytes_compressed", "inf")), int(version))

    return str(max(searched, key=key)[0])


def run_promote(name: str, version: str | None, best: bool) -> tuple[str, str | None]:
    """Move ``champion`` to ``version`` (or the ``--best`` one); returns (new, previous)."""
    if bool(version) == bool(best):
        raise McpError("give exactly one of --version N and --best")
    chosen = best_version(name) if best else str(version)
    known = {str(v) for v, _, _ in tracking.models.list_versions(name)}
    if chosen not in known:
        raise McpError(f"registered model {name!r} has no version {chosen!r}; versions: "
                       f"{', '.join(sorted(known, key=int)) or 'none'}")
    previous = tracking.models.alias_version(name, ALIAS)
    tracking.models.set_alias(name, ALIAS, chosen)
    return chosen, previous
