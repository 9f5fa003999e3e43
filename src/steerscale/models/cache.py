"""Where dequantized GGUF weights are cached: one safetensors checkpoint per GGUF file hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "STEERSCALE_CACHE"


def cache_root() -> Path:
    """``$STEERSCALE_CACHE``, else ``$XDG_CACHE_HOME/steerscale``, else ``~/.cache/steerscale``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "steerscale"


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file. Memoised on (path, size, mtime) so a cached load does not re-hash 100 MB."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = cache_root() / "digests" / hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)  # atomic: a process loading the same file at once never reads half a digest
    return digest


def gguf_cache_dir(gguf_path: Path) -> Path:
    return cache_root() / "dequantized" / file_digest(gguf_path)[:16]
