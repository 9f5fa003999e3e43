"""Start and stop a real ``vllm serve`` from Python (benches, tests, notebooks): a subprocess of the vLLM venv's
interpreter (vLLM's compiled mode and bf16 by default, as a vLLM user runs it), with steerscale's plugin enabled
when vectors are given."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import SteerscaleError

ROOT = Path(__file__).resolve().parents[3]


def vllm_python() -> Path | None:
    """An interpreter with vLLM: this one when it imports vLLM, else the vLLM venv's (``$VLLM_VENV`` or
    ``.venv-vllm`` in the checkout); None without either."""
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    python = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"
    return python if python.exists() else None


def vllm_env() -> dict[str, str]:
    """What vLLM's CPU build needs in its environment here: a KV cache size that fits beside other jobs (it
    otherwise asks for a share of the machine's memory and can fail), unless the caller set one."""
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    """A running ``vllm serve``: ``url`` (ends in /v1), ``stop()``."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def serve_command(model_dir: str, *, name: str, host: str, port: int, vectors: dict | None = None,
                  steer: str | None = None, dtype: str = "bfloat16", eager: bool = False, max_model_len: int | None = None,
                  max_num_seqs: int | None = None, api_key: str | None = None, extra_args: list[str] | None = None,
                  env: dict[str, str] | None = None, plugin: bool = True) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``vllm serve`` with steerscale's plugin (the vLLM venv's interpreter):
    what ``start_vllm`` runs and ``steerscale serve --engine vllm`` runs in the foreground."""
    python = vllm_python()
    if python is None:
        raise SteerscaleError("no vLLM venv found", "build it with `bash scripts/make_vllm_venv.sh`")
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
           "--host", host, "--dtype", dtype, "--served-model-name", name, *(["--enforce-eager"] if eager else []),
           *(["--max-model-len", str(max_model_len)] if max_model_len else []),
           *(["--max-num-seqs", str(max_num_seqs)] if max_num_seqs else []),
           *(["--api-key", api_key] if api_key else []), *(extra_args or [])]
    env = {**os.environ, **vllm_env(), **({"STEERSCALE_VLLM": "1"} if plugin else {}), **(env or {})}
    if vectors:
        env["STEERSCALE_VLLM_VECTORS"] = ",".join(f"{k}={v}" for k, v in vectors.items())
    if steer:
        env["STEERSCALE_VLLM_STEER"] = steer
    return cmd, env


def start_vllm(model_dir: str, *, name: str, log: Path, vectors: dict[str, Path] | None = None,
               max_model_len: int = 512, max_num_seqs: int = 16, timeout: float = 900.0, dtype: str = "bfloat16",
               eager: bool = False, steer: str | None = None, extra_args: list[str] | None = None,
               env: dict[str, str] | None = None, plugin: bool = True) -> VllmServer:
    """``vllm serve model_dir`` as ``name`` on a free local port, waiting until ``/health`` answers; with
    ``vectors`` (name -> file) steerscale's plugin registers them (``STEERSCALE_VLLM_VECTORS``) and ``steer`` is
    engine-wide steering (``STEERSCALE_VLLM_STEER``)."""
    port = _free_port()
    cmd, env = serve_command(model_dir, name=name, host="127.0.0.1", port=port, vectors=vectors, steer=steer,
                             dtype=dtype, eager=eager, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                             extra_args=extra_args, env=env, plugin=plugin)
    server = VllmServer(subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT),
                        f"http://127.0.0.1:{port}/v1", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SteerscaleError(f"vllm serve exited ({server.process.returncode})", f"its log: {log}")
        try:
            with urllib.request.urlopen(server.url[: -len("/v1")] + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    server.stop()
    raise SteerscaleError(f"vllm serve did not start within {timeout:g} s", f"its log: {log}")
