"""Helpers shared by the benchmark scripts in ``bench/`` (main venv side).

The peer libraries (repeng, steering-vectors) need transformers 4.x and numpy 1.x, so they live in their own
venv (``scripts/make_peer_venv.sh``, default ``.venv-peers`` at the repo root, overridable with ``PEER_VENV``).
Scripts in ``bench/peers/`` run with that venv's python; they receive the dequantized SmolLM2 checkpoint
directory, texts already formatted by us, and vectors as safetensors files, and print one JSON line.
Nothing crosses the process boundary as pickle.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"

# Prompts for decode benchmarks (chat template applied by the caller). Eight, for batch 8.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright when it moves.",
    "Give me three tips for learning a new language.",
    "Describe the water cycle to a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of a detective novel you would like to read.",
    "Why do cats purr? Give a careful answer.",
    "Plan a simple vegetarian dinner for four people.",
]


def peer_venv() -> Path:
    return Path(os.environ.get("PEER_VENV", ROOT / ".venv-peers")).expanduser()


def peer_python() -> Path | None:
    """The peer venv's python, or None when the venv has not been built (``bash scripts/make_peer_venv.sh``)."""
    py = peer_venv() / "bin" / "python"
    return py if py.exists() else None


def model_dir(alias: str = "smollm2-135m-instruct") -> Path:
    """Directory of the dequantized HF checkpoint of a bundled GGUF model (created by a first ``load_model``)."""
    from steerscale.models.cache import gguf_cache_dir
    from steerscale.models.registry import bundled_gguf_path

    path = gguf_cache_dir(bundled_gguf_path(alias))
    if not (path / "config.json").exists():
        import steerscale

        steerscale.load_model(alias)  # writes the cache
    return path


def run_peer(script: str, args: list[str], timeout: float = 3600, threads: int | None = None) -> dict:
    """Run ``bench/peers/<script>`` in the peer venv; return the JSON object on its last stdout line."""
    py = peer_python()
    if py is None:
        raise FileNotFoundError(f"peer venv not found at {peer_venv()} (run: bash scripts/make_peer_venv.sh)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([str(py), str(PEERS / script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"peer script {script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"peer script {script} printed nothing; stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def save_layer_vectors(path: Path, vectors: dict[int, "torch.Tensor"], metadata: dict | None = None) -> Path:  # noqa: F821
    """Per-layer vectors as safetensors, tensor names ``layer.<block index>`` (output of that block)."""
    from safetensors.torch import save_file

    tensors = {f"layer.{i}": v.detach().float().contiguous().cpu() for i, v in vectors.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_layer_vectors(path: Path) -> dict[int, "torch.Tensor"]:  # noqa: F821
    from safetensors.torch import load_file

    return {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}


def write_pairs(path: Path, pairs) -> Path:
    """Write (positive, negative) full texts as JSONL for the peer scripts."""
    with open(path, "w", encoding="utf-8") as f:
        for pos, neg in pairs:
            f.write(json.dumps({"positive": pos, "negative": neg}) + "\n")
    return path


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[("" if c is None else (f"{c:.3f}" if isinstance(c, float) else str(c))) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def paired(a, b) -> dict:
    """``b`` against ``a`` over the same items (``measure.stats.paired_compare``) as a JSON-ready dict, rounded:
    the difference, its 95% interval, n, wins, losses and the permutation p-value."""
    from steerscale.measure.stats import paired_compare

    c = paired_compare(a, b)
    return {"diff": round(c.diff, 4), "lo": round(c.lo, 4), "hi": round(c.hi, 4), "n": c.n, "wins": c.wins,
            "losses": c.losses, "p_perm": round(c.p_permutation, 4)}
