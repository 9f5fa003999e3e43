"""steerscale inside real vLLM (the CPU build, float32), against the local engine, in vLLM's compiled mode (with
vLLM's CI setting: dynamo traces the graph once, which is what must not freeze a step's steering, and the eager
backend runs it; inductor's code generation, minutes on this CPU, is run by ``bench/vllm_steer.py``, whose
equivalence and isolation checks pass there too) and in eager mode: offline
(``tests/vllm_checks.py``), tensor parallel 2, and behind ``vllm serve`` with the official client (tenant safety: the
server-side cache salt, 400s for bad specs), a baked checkpoint, and strategies through ``OpenAIBackend``
(``tests/vllm_serve_checks.py``). vLLM lives in its own venv (``bash
scripts/make_vllm_venv.sh``; path ``$VLLM_VENV`` or ``.venv-vllm``): the checks run there and report one JSON line;
without that venv they are skipped. The request format is tested here without vLLM.

The checks are subprocesses that each run a vLLM engine, whose worker binds one core (vLLM's CPU build reserves the
other). So they start in the background when the suite is collected (``conftest.py``; two at a time, the serve
checks first) and overlap the rest of the suite; each test waits for its check's result. Under pytest-xdist one
worker runs them and the others read their results (``start_in_background``). ``STEERSCALE_VLLM_BACKGROUND=0``
runs each check when its test runs instead."""

import json
import os
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from steerscale import SteerscaleError
from steerscale.vllm import cache_salt, format_steer, parse_steer
from steerscale.vllm.frontend import FrontendRegistry, check_admitted
from steerscale.vllm.steering import body_extra_args, check_extra_args, request_salt
from steerscale.vllm.server import vllm_python
from vllm_checks import BAD_SPECS

ROOT = Path(__file__).resolve().parents[1]


CHECKS = ("vllm_checks.py", (), {"VLLM_CPU_CI_ENV": "1"})
SERVE_CHECKS = ("vllm_serve_checks.py", (), {})
CHECK_TIMEOUT = 1200  # seconds one check may run
# Checks run at once in the background: two, so the serve checks (the longest, three servers) run beside the others
# rather than after them (the whole suite under -n 2 here: 803 s with two lanes, 846 s with one); more would only add
# memory (each vLLM engine takes ~4 GB) and contention on a small machine.
LANES = int(os.environ.get("STEERSCALE_VLLM_LANES", "2"))
_background: dict[tuple, object] = {}  # started at collection (``start_in_background``), read by ``run_checks``
_running: list[subprocess.Popen] = []
_stopping = threading.Event()


def _key(script: str, args, env) -> tuple:
    return script, tuple(args), tuple(sorted((env or {}).items()))


def _run(python, script: str, args, env) -> tuple[int, str, str]:
    """Run one check script in the vLLM venv: (return code, stdout, stderr)."""
    if _stopping.is_set():
        return -1, "", "the test session ended before this check ran"
    proc = subprocess.Popen([str(python), str(ROOT / "tests" / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    _running.append(proc)
    try:
        out, err = proc.communicate(timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(killed after {CHECK_TIMEOUT} s)"
    finally:
        _running.remove(proc)
    return proc.returncode, out, err


def run_checks(script: str, *args: str, env: dict | None = None) -> dict:
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM venv: build it with `bash scripts/make_vllm_venv.sh`")
    started = _background.get(_key(script, args, env))
    code, out, err = started.result() if started is not None else _run(python, script, args, env)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and lines, err[-3000:]
    return json.loads(lines[-1])


class _Published:
    """A check another pytest-xdist worker runs: its result appears as a JSON file in the directory the workers
    share (written by ``_publish``)."""

    def __init__(self, path: Path, owner: int):
        self.path, self.owner = path, owner

    def result(self) -> tuple[int, str, str]:
        deadline = time.monotonic() + CHECK_TIMEOUT * 4  # the owner runs a few checks in each lane
        while not self.path.exists():
            if not _alive(self.owner) and not self.path.exists():
                return -1, "", f"the test worker running the vLLM checks (pid {self.owner}) ended without this result"
            if time.monotonic() > deadline:
                return -1, "", f"no result in {self.path} after {CHECK_TIMEOUT * 4} s"
            time.sleep(1)
        return tuple(json.loads(self.path.read_text()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _publish(path: Path, python, script: str, args, env) -> tuple[int, str, str]:
    """Run a check and write its result where the other workers read it (atomically: never half a file)."""
    result = _run(python, script, args, env)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def _shared_dir(config) -> Path | None:
    """Under pytest-xdist, a directory all workers of this run share (under the run's base temp, which pytest
    cleans); None in a plain run."""
    if not hasattr(config, "workerinput"):
        return None
    shared = config._tmp_path_factory.getbasetemp().parent / "vllm-checks"
    shared.mkdir(exist_ok=True)
    return shared


def start_in_background(items, config) -> None:
    """Start the checks the collected ``items`` of this module read, on ``LANES`` background threads
    (``conftest.py`` calls this when collection ends). Under pytest-xdist every worker collects every test, so the
    first worker to claim the run's shared directory runs the checks and publishes each result there; the others
    read them from there (whichever worker runs a test)."""
    python = vllm_python()
    if python is None or os.environ.get("STEERSCALE_VLLM_BACKGROUND", "1") == "0":
        return
    jobs = []
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        job = CHECKS if "checks" in names else SERVE_CHECKS if "serve_checks" in names else \
            family_job(params["family"], params["mode"]) if "family" in params else None
        if job is not None and job not in jobs:
            jobs.append(job)
    if not jobs:
        return
    jobs.sort(key=lambda job: job != SERVE_CHECKS)  # the longest first, in a lane of its own
    shared = _shared_dir(config)
    owner = os.getpid()
    if shared is not None:
        try:
            fd = os.open(shared / "owner", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another worker runs them
            for index, job in enumerate(jobs):
                _background[_key(*job)] = _Published(shared / f"{index}.json", _read_owner(shared / "owner"))
            return
        os.write(fd, str(owner).encode())
        os.close(fd)
    pool = ThreadPoolExecutor(LANES, thread_name_prefix="vllm-checks")
    for index, (script, args, env) in enumerate(jobs):
        future = pool.submit(_run, python, script, args, env) if shared is None else \
            pool.submit(_publish, shared / f"{index}.json", python, script, args, env)
        _background[_key(script, args, env)] = future
    pool.shutdown(wait=False)


def _read_owner(path: Path) -> int:
    for _ in range(100):  # the owner writes its pid right after creating the file
        text = path.read_text().strip()
        if text:
            return int(text)
        time.sleep(0.05)
    raise RuntimeError(f"{path} names no process")


def stop_background(session, interrupted: bool = False) -> None:
    """End the session's checks. In a plain run those not started never start and a running one is killed. Under
    pytest-xdist a worker that finished its own tests waits for the checks it runs, since a test in another worker
    may be waiting for them, unless the session was stopped (interrupted, or ``-x``)."""
    if _shared_dir(session.config) is not None and not (interrupted or session.shouldstop or session.shouldfail):
        for started in _background.values():
            if isinstance(started, Future):  # one this process runs (the others' are _Published)
                started.result()
    _stopping.set()
    for proc in list(_running):
        proc.kill()


@pytest.fixture(scope="module")
def checks():
    script, args, env = CHECKS
    return run_checks(script, *args, env=env)


@pytest.fixture(scope="module")
def serve_checks():
    script, args, env = SERVE_CHECKS
    return run_checks(script, *args, env=env)


def test_vllm_steered_greedy_tokens_equal_the_local_engines(checks):
    assert checks["cases"] == 18 and checks["info"]["compiled"]  # vLLM's default mode: compiled
    assert checks["equivalence_mismatches"] == 0, checks["token_differences"]
    assert checks["steering_changed_outputs"] == 6  # both vectors change every prompt's answer


def test_each_request_gets_its_own_steering_in_a_vllm_batch(checks):
    assert checks["isolation_mismatches"] == 0
    assert checks["prefix_cache_ok"], checks["prefix_cache"]  # no KV reuse across steering
    assert checks["unknown_vector_refused"]
    assert checks["engine_wide_ok"]  # engine-wide steering reaches every request, and is lifted


def test_norm_preserving_vectors_and_front_end_refusals_inside_vllm(checks):
    assert checks["norm_preserving_mismatches"] == 0, checks["norm_preserving_differences"]
    assert checks["norm_preserving_acted"] >= 2  # differs from the plain add of the same vector
    assert checks["front_end_refusals"] == 3  # refused in the front end (offline: an exception), naming the field


def test_ablation_and_set_projection_inside_vllm_equal_the_local_engine(checks):
    assert checks["projection_mismatches"] == 0, checks["projection"]
    assert checks["projection_changed"] >= 6, checks["projection"]


# llama: SmolLM2 above (compiled, one rank). Each check starts its own vLLM engine (~60 s here), so the suite runs
# two that cover the other modes between them: tensor parallel 2 compiled with the static plan, and eager with the
# dynamic one; STEERSCALE_VLLM_ALL_FAMILIES=1 adds qwen3 and mistral (eager, one rank) and gemma (compiled), as the
# bench runs them. Modes: "eager" (else compiled), "tp2" (else one rank), "static": the plan in fixed buffers that
# CUDA graphs replay (STEERSCALE_VLLM_PLAN=static; automatic where graphs run; else the dynamic plan).
FAMILY_MODES = [("qwen2", "tp2-static"), ("gemma3", "tp2-eager")]
if os.environ.get("STEERSCALE_VLLM_ALL_FAMILIES"):
    FAMILY_MODES += [("qwen3", "eager"), ("mistral", "eager"), ("qwen3", "compiled"), ("gemma", "compiled-static")]


def family_job(family: str, mode: str) -> tuple:
    """The check of one family in one mode: (script, args, env)."""
    parts = set(mode.split("-"))
    args = ("--family", family) + (("--eager",) if "eager" in parts else ()) + (("--tp", "2") if "tp2" in parts else ())
    plan = "static" if "static" in parts else "dynamic"
    return "vllm_checks.py", args, {"VLLM_CPU_CI_ENV": "1", "STEERSCALE_VLLM_PLAN": plan}


@pytest.mark.parametrize("family,mode", FAMILY_MODES)
def test_each_family_vllm_serves_is_steered_as_locally(family, mode):
    parts = set(mode.split("-"))
    script, args, env = family_job(family, mode)
    out = run_checks(script, *args, env=env)
    assert out["cases"] == 18 and out["mismatches"] == 0, out["token_differences"]
    assert out["steering_acted"] == 6  # +1 differs from 0 for every prompt and vector
    assert out["compiled"] is ("eager" not in parts) and out["plan"] == env["STEERSCALE_VLLM_PLAN"]
    # under tensor parallel 2 the head vectors sit on both ranks; a refused registration leaves no stale reply
    assert out["refusal_then_info_ok"] and out["tensor_parallel"] == (2 if "tp2" in parts else 1)


def test_vllm_serve_steers_each_openai_request_with_the_plugin(serve_checks):
    assert serve_checks["serve_cases"] == 9 and serve_checks["serve_mismatches"] == 0
    assert serve_checks["serve_steering_acted"] >= 2


def test_the_same_request_body_steers_the_same_on_both_servers(serve_checks):
    # `steerscale serve --engine vllm` and `steerscale serve`: steerscale's "steer" objects, completions and chat
    assert serve_checks["both_servers_same"] == serve_checks["both_servers_bodies"] == 4  # add, scoped, none, set


def test_vllm_serve_keeps_tenants_apart_whatever_the_client_sends(serve_checks):
    assert serve_checks["salt_steering_acted"] and serve_checks["salt_leaks"] == 0
    assert serve_checks["bad_specs_sent"] >= 20 and serve_checks["bad_spec_non_400"] == 0
    assert serve_checks["bad_spec_unnamed_field"] == 0 and serve_checks["alive_after_bad_spec"]


def test_a_baked_checkpoint_under_plain_vllm_serve_equals_the_hooked_vector(serve_checks):
    assert serve_checks["baked_mismatches"] == 0


def test_strategies_run_against_a_real_vllm_server_within_their_budget(serve_checks):
    assert set(serve_checks["strategies"]) == {"majority", "best_of_n", "beam_search", "particle_filter"}
    assert all(s["within_budget"] and s["answer"] is not None for s in serve_checks["strategies"].values())


def test_the_request_format():
    assert parse_steer("a:4, b:-2:generated") == [("a", 4.0, "all"), ("b", -2.0, "generated")]
    assert parse_steer(["a:1.5"]) == parse_steer([("a", 1.5)]) == [("a", 1.5, "all")]
    assert format_steer("a:4") == ["a:4.0:all"]
    assert parse_steer("r:ablate, r:=2.5:generated") == [("r", ("set", 0.0), "all"), ("r", ("set", 2.5), "generated")]
    assert parse_steer(format_steer("r:ablate,r:=2.5")) == parse_steer("r:ablate,r:=2.5")
    for bad, match in [("a", "NAME:OP"), ("a:x", "not a scale"), ("a:1e9", "finite"), ("a:=1e9", "finite"),
                       ("a:1:sometimes", "scope"), ("a/b:1", "bad vector name")]:
        with pytest.raises(SteerscaleError, match=match):
            parse_steer(bad)
    assert cache_salt(None) is None and cache_salt("a:1") != cache_salt("a:2") != cache_salt("a:2:prompt", prompt="x")
    # a scoped entry edits tokens by where the prompt ends: the prompt is part of its salt
    assert cache_salt("a:2:generated", prompt="x") != cache_salt("a:2:generated", prompt="x y")
    with pytest.raises(SteerscaleError, match="needs the prompt"):
        cache_salt("a:2:generated")
    assert cache_salt("a:1", {"a": "x"}) != cache_salt("a:1", {"a": "y"})  # a re-registered vector
    assert len(cache_salt("a:1")) <= 128  # vLLM's limit


class _Request:  # the fields of vLLM's EngineCoreRequest that admission reads and writes
    def __init__(self, extra, prompt=(1, 2, 3), salt=None):
        self.sampling_params = type("P", (), {"extra_args": extra})()
        self.prompt_token_ids, self.cache_salt, self.request_id = list(prompt), salt, "r1"


def test_the_front_end_refuses_every_malformed_spec_and_unsupported_field():
    reg = FrontendRegistry()
    reg.loaded_env = True
    reg.digests = {"formal": "d1"}
    for bad in BAD_SPECS:
        with pytest.raises(SteerscaleError, match=r"vllm_xargs\.steer"):
            reg.admit(_Request({"steer": bad}))
    for key in ["condition", "controller", "logit_contrast", "gate", "strategy", "steering", "scale", "block_corpus"]:
        with pytest.raises(SteerscaleError, match=rf"vllm_xargs\.{key}: .* do not run inside vLLM"):
            reg.admit(_Request({"steer": ["formal:4"], key: "x"}))
    # an SAE feature in Neuronpedia's shape (steerscale serve --sae) is refused with where it runs
    with pytest.raises(SteerscaleError, match=r"steer\[0\]\.index: SAE features are not steered here"):
        body_extra_args({"steer": [{"layer": "res6", "index": 3, "strength": 4, "op": "clamp"}]}, None)
    # so are the entry fields only steerscale serve runs: a token gate, a CAST condition, a controller
    for key in ("gate", "condition", "controller"):
        with pytest.raises(SteerscaleError, match=rf"steer\[0\]\.{key}: .* do not run inside vLLM"):
            body_extra_args({"steer": [{"vector": "formal", key: "x"}]}, None)
    # the steering plan's stages (STEERSCALE_VLLM_STAGES, default 4) bound a request's entries, in either plan
    with pytest.raises(SteerscaleError, match=r"vllm_xargs\.steer: 5 entries .* holds 4 per request"):
        reg.admit(_Request({"steer": ["formal:1"] * 5}))
    ok = _Request({"steer": "formal:4, formal:ablate:generated", "other_plugin": 1})
    reg.admit(ok)  # other plugins' keys pass; the spec is made canonical for the workers
    assert ok.sampling_params.extra_args["steer"] == ["formal:4.0:all", "formal:ablate:generated"]
    assert ok.cache_salt.startswith("steerscale-s-")
    check_admitted(ok)
    unchecked = _Request({"steer": ["formal:4"]}, salt="anything")
    with pytest.raises(SteerscaleError, match="not checked by steerscale's plugin"):
        check_admitted(unchecked)  # the engine process refuses a steered request the front end did not see


def test_the_server_derives_the_cache_salt_whatever_the_client_sends():
    reg = FrontendRegistry()
    reg.loaded_env = True
    reg.digests = {"formal": "d1"}

    def salt(extra, client=None, prompt=(1, 2, 3)):
        r = _Request(extra, prompt, client)
        reg.admit(r)
        return r.cache_salt

    plain, steered = salt({}), salt({"steer": ["formal:4"]})
    assert plain is None and steered.startswith("steerscale-s-")
    assert salt({}, client=steered) != steered  # a plain client cannot send its way into a steered salt
    assert salt({"steer": ["formal:4"]}, client="tenant-b") not in (steered, salt({}, client="tenant-b"))
    assert salt({"steer": ["formal:2"]}) != steered
    assert salt({"steer": ["formal:4:generated"]}) != salt({"steer": ["formal:4:generated"]}, prompt=(1, 2, 3, 4))
    reg.digests["formal"] = "d2"  # re-registered under the same name
    assert salt({"steer": ["formal:4"]}) != steered
    reg.engine_wide = parse_steer("formal:1")  # engine-wide steering salts every request
    assert salt({}) is not None and salt({}).startswith("steerscale-s-")
    assert request_salt([], (), {}, None, None) is None
    assert check_extra_args(None) == [] and check_extra_args({"unrelated": 1}) == []
