"""torch's CPU thread count (``steerscale.models.threads``): the choice from fake /proc and cgroup readings, who
decides (override precedence), per-thread application and the CLI flag. No model is loaded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from steerscale.cli import _verb, build_parser, main
from steerscale.errors import SteerscaleError
from steerscale.models import threads as th
from steerscale.models.threads import Machine, choose, parse_threads

TORCH_VARS = (th.ENV, *th.TORCH_ENV)


@pytest.fixture
def fresh(monkeypatch):
    """A fresh decision state with no thread settings in the environment, and torch's count restored after."""
    before = torch.get_num_threads()
    for var in TORCH_VARS:
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(2)  # torch's default on a 2-core machine, whatever OMP_NUM_THREADS the suite runs with
    monkeypatch.setattr(th, "torch_defaults", lambda cpus=None: {2})
    monkeypatch.setattr(th, "_state", th._State(env={}))
    monkeypatch.setattr(th, "_local", threading.local())
    yield
    torch.set_num_threads(before)


def machine(monkeypatch, **kw) -> list:
    """Make ``read_machine`` return ``Machine(**kw)``; the list collects one entry per reading."""
    calls = []
    m = Machine(**{"cpus": 2, "online": 2, "quota": None, "others": 0, **kw})
    monkeypatch.setattr(th, "read_machine", lambda *a, **k: calls.append(m) or m)
    return calls


# -- values -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [(None, None), ("auto", None), (" AUTO ", None), ("2", 2), (3, 3)])
def test_parse_threads_accepts_counts_and_auto(value, expected):
    assert parse_threads(value) == expected


@pytest.mark.parametrize("value", ["zero", "0", "-1", "2.0", "", True, 0])
def test_parse_threads_names_the_value_and_the_fix(value):
    with pytest.raises(SteerscaleError) as err:
        parse_threads(value, "STEERSCALE_THREADS")
    assert f"STEERSCALE_THREADS={value!r}" in str(err.value)
    assert "positive integer" in err.value.hint and "auto" in err.value.hint


# -- the choice ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,ceiling,expected", [
    (Machine(2, 2, None, 0), 2, 2),     # idle: torch's default, nothing lost
    (Machine(2, 2, None, 2), 2, 1),     # one other two-thread job on 2 cores: the case
    (Machine(2, 2, None, 1), 2, 1),     # a second thread would share a core and stall every barrier
    (Machine(2, 2, None, 7), 2, 1),     # never below one
    (Machine(8, 8, None, 0), 4, 4),     # never above torch's default (physical cores under MKL)
    (Machine(8, 8, None, 3), 8, 5),
    (Machine(8, 8, 1.5, 0), 8, 1),      # a 1.5-core quota: a second thread would be throttled mid-region
    (Machine(8, 8, 4.0, 1), 8, 4),
    (Machine(4, 64, None, 1), 4, 3),    # pinned to 4 of 64 CPUs: others counts only what runs on those 4
])
def test_choose(m, ceiling, expected):
    assert choose(m, ceiling) == expected


# -- reading /proc and cgroups (fake trees) -----------------------------------------------------------------------
def fake_proc(root: Path, running: int, states: str, cgroup: str = "0::/\n") -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text(f"cpu  1 2 3 4\ncpu0 1 2 3 4\nctxt 99\nprocs_running {running}\nprocs_blocked 0\n")
    for i, state in enumerate(states):
        task = proc / "self" / "task" / str(100 + i)
        task.mkdir(parents=True, exist_ok=True)
        (task / "stat").write_text(f"{100 + i} (py (worker) {i}) {state} 1 2 3\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def test_procs_running_and_task_state_parse():
    assert th.procs_running("cpu 1 2\nprocs_running 7\nprocs_blocked 1\n") == 7
    with pytest.raises(ValueError):
        th.procs_running("cpu 1 2\n")
    assert th.task_state("12 (a) b (c) R 1 2") == "R"  # a name with spaces and parentheses


def test_others_subtract_this_process_own_running_threads(tmp_path):
    proc = fake_proc(tmp_path, running=5, states="RSRS")  # 5 runnable, 2 of them ours
    assert th.others_running(proc, samples=3, gap=0, sleep=lambda s: None) == 3
    assert th.own_running(proc) == 2


def test_others_is_the_median_so_a_blip_does_not_count(tmp_path):
    proc = fake_proc(tmp_path, running=1, states="R")
    readings = iter([1, 4, 1, 1])  # one sample sees three short-lived threads

    def sleep(_):
        (proc / "stat").write_text(f"procs_running {next(readings)}\n")

    assert th.others_running(proc, samples=5, gap=0.001, sleep=sleep) == 0


def test_others_unknown_without_proc(tmp_path):
    assert th.others_running(tmp_path / "nothing", samples=3, gap=0, sleep=lambda s: None) is None


def test_cgroup_v2_quota_is_the_tightest_of_the_group_and_its_ancestors(tmp_path):
    proc = fake_proc(tmp_path, 1, "R", cgroup="0::/user/job\n")
    cg = tmp_path / "cg"
    (cg / "user" / "job").mkdir(parents=True)
    (cg / "user" / "job" / "cpu.max").write_text("max 100000\n")
    (cg / "user" / "cpu.max").write_text("150000 100000\n")
    (cg / "cpu.max").write_text("400000 100000\n")
    assert th.cgroup_quota(proc, cg) == 1.5


def test_cgroup_v1_quota_and_none(tmp_path):
    proc = fake_proc(tmp_path, 1, "R", cgroup="4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    cg = tmp_path / "cg"
    d = cg / "cpu,cpuacct"  # mounted at the container's own group: /docker/abc itself is not there
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    assert th.cgroup_quota(proc, cg) is None
    (d / "cpu.cfs_quota_us").write_text("200000\n")
    assert th.cgroup_quota(proc, cg) == 2.0
    assert th.cgroup_quota(tmp_path / "nothing", cg) is None


def test_read_machine_from_fake_trees(tmp_path):
    proc = fake_proc(tmp_path, running=4, states="RS", cgroup="0::/\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("300000 100000\n")
    m = th.read_machine(proc, cg, cpus={0, 1, 2, 3}, online=4, gap=0, sleep=lambda s: None)
    assert m == Machine(cpus=4, online=4, quota=3.0, others=3)
    assert choose(m, ceiling=4) == 1


def write_ticks(proc: Path, busy: dict[int, int], own: int, idle: int) -> None:
    """A /proc/stat whose cpuN lines have ``busy[N]`` user ticks and ``idle`` idle ticks, and our own ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{n} {b} 0 0 {idle} 0 0 0 0 0 0" for n, b in busy.items()]
    (proc / "stat").write_text("\n".join(lines + ["procs_running 40"]) + "\n")  # 40: busy CPUs elsewhere
    (proc / "self" / "stat").write_text(f"7 (py (x)) R 1 1 1 0 -1 0 0 0 0 0 {own} 0 0 0\n")


def test_cpu_and_own_ticks(tmp_path):
    proc = fake_proc(tmp_path, 1, "R")
    write_ticks(proc, {0: 10, 1: 20, 2: 30}, own=7, idle=5)
    assert th.cpu_ticks((proc / "stat").read_text(), {0, 2}) == (40, 50)
    assert th.own_ticks(proc) == 7


def test_pinned_process_reads_what_others_ran_on_its_cpus(tmp_path):
    """Pinned to CPUs 0-1 of 4: the 40 runnable threads machine-wide do not count, the work on 0-1 does."""
    proc = fake_proc(tmp_path, 1, "R")
    write_ticks(proc, {0: 0, 1: 0, 2: 0, 3: 0}, own=0, idle=0)
    usage, clock = th.Usage(), iter([0.0, 0.0, 1.0, 1.0, 2.0])
    slept = []

    def window(seconds):  # the first reading measures a short window now: 10 idle ticks a CPU pass
        slept.append(seconds)
        write_ticks(proc, {0: 0, 1: 0, 2: 10, 3: 10}, own=0, idle=10)

    assert usage.others(proc, {0, 1}, clock=lambda: next(clock), sleep=window) == 0 and slept == [th.Usage.WINDOW]
    # one second later (100 ticks a CPU): CPUs 0-1 busy 100 ticks each, 95 of them ours -> 1.05 cores of other work;
    # the last reading is fresh, so no new window is measured
    write_ticks(proc, {0: 100, 1: 100, 2: 110, 3: 110}, own=95, idle=10)
    assert usage.others(proc, {0, 1}, clock=lambda: next(clock), sleep=window) == 1 and len(slept) == 1
    assert usage.others(tmp_path / "nothing", {0, 1}) is None
    m = th.read_machine(proc, tmp_path / "cg", cpus={0, 1}, online=4, usage=usage, sleep=lambda s: None)
    assert m.others == 0 and m.cpus == 2  # no tick since the last reading: unknown, so nobody competes


def test_read_machine_here_is_sane():
    m = th.read_machine()
    assert 1 <= m.cpus <= m.online and m.others >= 0


# -- who decides --------------------------------------------------------------------------------------------------
def test_auto_applies_the_choice_and_follows_the_machine(fresh, monkeypatch):
    machine(monkeypatch, others=2)
    assert th.refresh(force=True) == 1 and torch.get_num_threads() == 1
    assert th.status()["mode"] == "auto" and th.status()["machine"]["others"] == 2
    machine(monkeypatch, others=0)  # the other job ended: back to torch's default
    assert th.refresh(force=True) == th._state.ceiling == torch.get_num_threads() == 2


def test_one_busy_reading_between_idle_ones_keeps_the_count(fresh, monkeypatch):
    # a burst of another process that fills one reading (a few ms) must not cost a second at fewer threads; a
    # competing job that shows in two readings in a row does lower it, and a first reading is applied as it is
    machine(monkeypatch, others=0)
    assert th.refresh(force=True) == 2
    machine(monkeypatch, others=1)
    assert th.refresh(force=True) == 2 and torch.get_num_threads() == 2
    machine(monkeypatch, others=0)
    assert th.refresh(force=True) == 2
    machine(monkeypatch, others=1)
    assert th.refresh(force=True) == 2
    assert th.refresh(force=True) == 1 and torch.get_num_threads() == 1
    machine(monkeypatch, others=0)  # the job ended: back at once
    assert th.refresh(force=True) == 2
    assert th.status()["counts"] == {"readings": 6, "saw_load": 3, "applied_fewer": 1}


def test_refresh_is_rate_limited_per_thread(fresh, monkeypatch):
    calls = machine(monkeypatch)
    th.refresh()
    for _ in range(100):
        assert th.refresh() is None
    assert len(calls) == 1


def test_refresh_ignores_gpu_devices(fresh, monkeypatch):
    calls = machine(monkeypatch, others=5)
    assert th.refresh("meta", force=True) is None and not calls


def test_env_pins_and_beats_omp(fresh, monkeypatch):
    calls = machine(monkeypatch, others=0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(th.ENV, "1")
    assert th.policy() == ("pin", 1, th.ENV)
    assert th.refresh(force=True) == 1 and torch.get_num_threads() == 1 and not calls
    monkeypatch.setenv(th.ENV, "auto")  # auto even though OMP_NUM_THREADS is set
    assert th.policy() == ("auto", None, "auto")


def test_omp_num_threads_leaves_torch_alone(fresh, monkeypatch):
    calls = machine(monkeypatch, others=5)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # what torch did at start with OMP_NUM_THREADS=1
    th._state.ours.add(1)
    assert th.policy() == ("leave", None, "OMP_NUM_THREADS")
    assert th.refresh(force=True) == 1 and not calls


def test_bad_env_value_is_a_clear_error(fresh, monkeypatch):
    monkeypatch.setenv(th.ENV, "fast")
    with pytest.raises(SteerscaleError, match=r"STEERSCALE_THREADS='fast' is not a thread count"):
        th.refresh(force=True)


def test_program_torch_set_num_threads_wins_then_set_threads(fresh, monkeypatch):
    machine(monkeypatch, others=0)
    th.refresh(force=True)
    torch.set_num_threads(3)  # the program's own choice, after steerscale set one
    machine(monkeypatch, others=2)
    assert th.refresh(force=True) == 3 and torch.get_num_threads() == 3
    assert th.status()["source"] == "torch.set_num_threads"
    th.set_threads("auto")  # an explicit steerscale setting after it wins again
    assert th.refresh(force=True) == 1
    th.set_threads(2)
    monkeypatch.setenv(th.ENV, "1")  # set_threads beats the environment
    assert th.refresh(force=True) == 2 and th.status()["source"] == "--threads"


def test_count_set_before_import_is_the_programs(monkeypatch):
    monkeypatch.setattr(th, "torch_defaults", lambda cpus=None: {torch.get_num_threads() + 1})
    state = th._State(env={})
    assert state.program  # a count torch never picks by itself
    state = th._State(env={"OMP_NUM_THREADS": "1"})
    assert not state.program and state.ceiling == torch.get_num_threads() + 1  # OMP: ceiling from the hardware


def test_each_thread_gets_its_own_count(fresh, monkeypatch):
    machine(monkeypatch, others=0)
    th.refresh(force=True)
    main_count = torch.get_num_threads()
    machine(monkeypatch, others=2)
    seen = {}

    def worker():  # e.g. the server's scheduler loop
        seen["refresh"] = th.refresh()
        seen["count"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"refresh": 1, "count": 1}
    assert torch.get_num_threads() == main_count == 2 and not th._state.program


# -- the CLI flag -------------------------------------------------------------------------------------------------
def test_cli_threads_before_or_after_the_verb():
    parser = build_parser()
    assert parser.parse_args(["--threads", "2", "solve", "-p", "x"]).threads == "2"
    assert parser.parse_args(["solve", "-p", "x", "--threads", "1"]).threads == "1"
    assert parser.parse_args(["solve", "-p", "x"]).threads is None
    assert _verb(["--debug", "--threads", "1", "demo", "-o", "x"]) == "demo"


def test_cli_bad_threads_names_the_value(fresh, capsys):
    assert main(["--threads", "many", "models"]) == 2
    err = capsys.readouterr().err
    assert "--threads='many' is not a thread count" in err and "auto" in err
