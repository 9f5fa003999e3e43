"""The verifier registry (filled by ``scale/verifiers/__init__.py``) and how a verifier is built from its name.

Kept apart from the package ``__init__`` so that a verifier that wraps another (``diverse``) can look its base up
without importing the package that imports it.
"""

from __future__ import annotations

from ...errors import SteerscaleError
from ...registry import Registry
from .base import Verifier

VERIFIERS: Registry[type[Verifier]] = Registry("verifier")
CONTEXT_OPTIONS = ("reference", "backend")  # given to every verifier by callers; dropped where not accepted


def check_options(name: str, options: dict) -> None:
    """Raise ``SteerscaleError`` for an unknown verifier name or an option it does not accept (cheap: call it
    before loading a model)."""
    cls = VERIFIERS[name]  # unknown: lists the verifiers, "did you mean"
    accepted = cls.options()
    unknown = sorted(k for k in options if k not in accepted and k not in CONTEXT_OPTIONS)
    if unknown:
        opts = sorted(accepted - set(CONTEXT_OPTIONS))
        raise SteerscaleError(f"verifier {name!r} has no option {', '.join(map(repr, unknown))}",
                              f"its options: {', '.join(opts) or '(none)'}")


def get_verifier(name: str | Verifier | None, **options) -> Verifier | None:
    """A verifier by registry name (``None`` stays ``None``; a ``Verifier`` instance is returned as is)."""
    if name is None or isinstance(name, Verifier):
        return name
    check_options(name, options)
    cls = VERIFIERS[name]
    accepted = cls.options()
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(**kwargs)
