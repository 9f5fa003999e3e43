"""How many threads torch's CPU kernels use: chosen from the CPUs this process may use and what else runs now.

Why: decoding a small model is many small forward passes, each a few OpenMP parallel regions that end in a
barrier. When another job keeps cores busy, torch's default (one thread per core) puts one of our threads on a busy
core and every region waits for it: on a 2-core machine with one other two-thread job, a particle-filter ``solve``
took 39-92 s with the default and 16-22 s with one thread. So the engine chooses::

    threads = min(torch's default, cgroup quota in cores, CPUs we may use - runnable threads of other processes)

at least 1; a reading lowers the count only when the one before it (a second earlier, in the same thread) chose
fewer too (``_settle``: a burst of another process that fills one reading costs nothing). Idle, that is torch's
default: nothing changes. The machine is read at model load and, at most once a
second per thread, when decoding or scoring starts or goes on (``refresh``, called by ``load_model``, ``generate``,
``capture``, choice scoring, ``LocalBackend`` and the server's scheduler). A reading is a few samples of
``procs_running`` (``/proc/stat``: threads runnable right now, system-wide) minus this process's own runnable threads
(``/proc/self/task/*/stat``), 1 ms apart, median: instant (unlike the load average, which lags a minute and counts
our own past work) and blind to a one-sample blip. A process pinned to some of the CPUs (taskset, a cpuset) reads
instead what other processes ran on those CPUs since the last reading (``Usage``), since ``procs_running`` counts
the whole machine.

Who decides, first that applies:

1. the program, the latest of: ``set_threads(n)`` (the CLI's ``--threads N``; ``set_threads("auto")`` returns to the
   automatic choice) and its own ``torch.set_num_threads`` (a count steerscale did not set, seen at a check after
   import, or at import a count torch never picks by itself, such as 1 on a multi-core machine);
2. ``STEERSCALE_THREADS=N`` (or ``auto``);
3. ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``: torch applied them when it started; steerscale changes nothing;
4. the automatic choice.

torch keeps the count per thread (OpenMP's setting belongs to the calling thread; a new thread starts from the last
count set anywhere), so ``refresh`` applies it in the thread that runs the forward passes, and what it has set is
remembered per thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import SteerscaleError

log = logging.getLogger(__name__)

ENV = "STEERSCALE_THREADS"
TORCH_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's own start-up settings: a user's explicit choice
CHECK_EVERY = 1.0  # seconds between two readings of the machine in one thread: a reading costs ~5 ms (5 samples)
SAMPLES = 5  # samples of the run queue per reading (odd: the median is one of them)
SAMPLE_GAP = 0.001  # seconds between samples: longer than a blip, short enough to stay "now"
FIX = "use a positive integer such as 1 or 2, or auto (steerscale chooses from the free cores)"


@dataclass(frozen=True)
class Machine:
    """One reading of what the choice depends on."""

    cpus: int  # CPUs this process may run on (its affinity mask)
    online: int  # CPUs of the machine
    quota: float | None  # cgroup CPU quota in cores; None: no quota
    others: int  # other processes' threads competing for our CPUs now (see read_machine)


def parse_threads(value, source: str = ENV) -> int | None:
    """A thread setting as a count: a positive integer, or None for ``auto``. ``source`` (the variable or flag it
    came from) is named in the error."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() == "auto":
        return None
    try:
        n = int(text)  # "2.0", "two", True: not counts
    except ValueError:
        raise SteerscaleError(f"{source}={value!r} is not a thread count", FIX) from None
    if n < 1:
        raise SteerscaleError(f"{source}={value!r}: the thread count must be at least 1", FIX)
    return n


def choose(machine: Machine, ceiling: int) -> int:
    """The thread count for ``machine``: the CPUs others leave free, within the quota and ``ceiling`` (torch's
    default: never more threads than torch would use idle; it counts physical cores where MKL is used)."""
    free = machine.cpus - machine.others
    # a quota of 1.5 cores gives 1 thread: a second one would be throttled mid-region and stall the barrier
    quota = max(1, int(machine.quota)) if machine.quota is not None else machine.cpus
    return max(1, min(ceiling, quota, free))


# -- reading the machine ----------------------------------------------------------------------------------------
def procs_running(stat_text: str) -> int:
    """``procs_running`` of ``/proc/stat``: threads running or waiting for a CPU now, on the whole machine."""
    for line in stat_text.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    raise ValueError("no procs_running line")


def task_state(stat_line: str) -> str:
    """The state letter (R running, S sleeping, ...) of a ``/proc/<pid>/task/<tid>/stat`` line; the name before it
    is in parentheses and may itself hold spaces and parentheses."""
    return stat_line[stat_line.rindex(")") + 2]


def running_threads(proc: Path, pid: int | str = "self") -> int:
    """Threads of process ``pid`` that are running or runnable (0 when it is gone)."""
    n = 0
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return 0
    for tid in tids:
        try:
            n += task_state((proc / str(pid) / "task" / tid / "stat").read_text()) == "R"
        except (OSError, IndexError):  # the thread ended between the listing and the read
            continue
    return n


def own_running(proc: Path) -> int:
    """This process's running or runnable threads; at least 1, the caller's own."""
    return max(running_threads(proc), 1)


def others_running(proc: Path = Path("/proc"), samples: int = SAMPLES, gap: float = SAMPLE_GAP,
                   sleep=time.sleep) -> int | None:
    """Runnable threads of other processes: the median over ``samples`` readings; None when ``/proc`` cannot be read
    (not Linux), and then nobody is assumed to compete."""
    counts = []
    for i in range(samples):
        if i:
            sleep(gap)
        try:
            running = procs_running((proc / "stat").read_text())
        except (OSError, ValueError):
            return None
        counts.append(max(0, running - own_running(proc)))
    counts.sort()
    return counts[len(counts) // 2]


def _cpu_max(path: Path) -> float | None:
    """cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") in cores."""
    quota, period = path.read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _cfs(directory: Path) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in cores (quota -1: none)."""
    quota = int((directory / "cpu.cfs_quota_us").read_text())
    return None if quota <= 0 else quota / int((directory / "cpu.cfs_period_us").read_text())


def _ancestors(mount: Path, path: str):
    """``mount/path`` and each of its parents up to ``mount``: a quota anywhere above limits us too. Inside a
    container the mount often starts at our own cgroup, so paths that do not exist are skipped."""
    parts = [p for p in path.strip("/").split("/") if p]
    for i in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:i])


def cgroup_quota(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota (in cores) on this process's cgroup and its ancestors, v2 or v1; None: no quota."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:  # v2: one unified tree, cpu.max in each group
            candidates = [(d / "cpu.max", _cpu_max) for d in _ancestors(cgroup, path)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount (often "cpu,cpuacct")
            mounts = dict.fromkeys([cgroup / controllers, cgroup / "cpu"])
            candidates = [(d, _cfs) for m in mounts for d in _ancestors(m, path)]
        else:
            continue
        for where, read in candidates:
            try:
                q = read(where)
            except (OSError, ValueError, IndexError, ZeroDivisionError):
                continue
            if q is not None:
                quotas.append(q)
    return min(quotas) if quotas else None


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def cpu_ticks(stat_text: str, cpus: set[int]) -> tuple[int, int]:
    """Busy and total clock ticks of ``cpus`` since boot, from the ``cpuN`` lines of ``/proc/stat`` (busy: user,
    nice, system, irq, softirq, steal; total adds idle and iowait)."""
    busy = total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in rest.split()[:8]]
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            total += sum(v)
    return busy, total


def own_ticks(proc: Path) -> int:
    """Clock ticks this process has run (user + system, all its threads), from ``/proc/self/stat``."""
    fields = (proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line


class Usage:
    """What other processes ran on our CPUs between two readings, in cores: their busy ticks there minus ours,
    over the elapsed ticks of one CPU. Used when this process may run on only some of the CPUs: then
    ``procs_running``, which counts the whole machine, says nothing about ours. It measures use, not demand, so
    others that want more than they get still read as about their fair share: enough to step aside from them."""

    FRESH = 10.0  # seconds: an older reading is not "now"; a new window is measured instead
    WINDOW = 0.1  # seconds of a new window (10 ticks a CPU at the usual 100 Hz)

    def __init__(self):
        self.prev: tuple[float, int, int, int] | None = None  # (time, busy, total, own)
        self.lock = threading.Lock()

    def snapshot(self, proc: Path, cpus: set[int], now: float) -> tuple[float, int, int, int]:
        busy, total = cpu_ticks((proc / "stat").read_text(), cpus)
        return now, busy, total, own_ticks(proc)

    def others(self, proc: Path, cpus: set[int], clock=time.monotonic, sleep=time.sleep) -> int | None:
        try:
            with self.lock:
                prev = self.prev
                if prev is None or clock() - prev[0] > self.FRESH:
                    prev = self.snapshot(proc, cpus, clock())
                    sleep(self.WINDOW)
                cur = self.prev = self.snapshot(proc, cpus, clock())
        except (OSError, ValueError, IndexError):
            return None
        per_cpu = (cur[2] - prev[2]) / max(len(cpus), 1)  # elapsed ticks of one CPU
        if per_cpu <= 0:
            return None
        cores = ((cur[1] - prev[1]) - (cur[3] - prev[3])) / per_cpu
        return max(0, int(cores + 0.5))


_usage = Usage()


def read_machine(proc: Path | str = "/proc", cgroup: Path | str = "/sys/fs/cgroup", cpus: set[int] | None = None,
                 online: int | None = None, samples: int = SAMPLES, gap: float = SAMPLE_GAP, sleep=time.sleep,
                 usage: Usage | None = None) -> Machine:
    """Read the machine now (every argument: a stand-in for tests). Others: on a process that may use every CPU,
    the runnable threads of other processes (``others_running``); pinned to some CPUs, the cores' worth of other
    work on those CPUs since the last reading (``Usage``)."""
    proc, cgroup = Path(proc), Path(cgroup)
    cpus = allowed_cpus() if cpus is None else set(cpus)
    online = max(os.cpu_count() or len(cpus), len(cpus)) if online is None else online
    if len(cpus) < online:
        others = (_usage if usage is None else usage).others(proc, cpus, sleep=sleep)
    else:
        others = others_running(proc, samples, gap, sleep)
    return Machine(cpus=len(cpus), online=online, quota=cgroup_quota(proc, cgroup), others=others or 0)


def _physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Physical cores among ``cpus`` (hyper-threads of one core counted once); None when the topology is unreadable."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return None
    return len(cores) or None


def torch_defaults(cpus: set[int] | None = None) -> set[int]:
    """Counts torch picks by itself without OMP_NUM_THREADS: OpenMP's (the CPUs allowed, or all) or MKL's (physical
    cores). A count outside these at import was set by the program."""
    cpus = allowed_cpus() if cpus is None else cpus
    out = {len(cpus), os.cpu_count() or len(cpus)}
    for group in (cpus, set(range(os.cpu_count() or 0))):
        physical = _physical_cores(group) if group else None
        if physical:
            out.add(physical)
    return out


# -- deciding -----------------------------------------------------------------------------------------------------
class _State:
    """Process-wide: the explicit setting, torch's count when steerscale came in, the counts steerscale has set, the
    last decision (for ``status``)."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.lock = threading.Lock()
        self.explicit: int | None = None  # set_threads(n); None with explicit_given: set_threads("auto")
        self.explicit_given = False
        at_import = torch.get_num_threads()
        defaults = torch_defaults()
        torch_env = any(env.get(v, "").strip() for v in TORCH_ENV)
        # e.g. torch.set_num_threads(1) before importing steerscale: a count torch never picks by itself
        self.program = not torch_env and at_import not in defaults
        # the automatic choice never uses more threads than torch would on an idle machine: then it changes nothing.
        # When the count at import is not torch's own (OMP_NUM_THREADS=1 with STEERSCALE_THREADS=auto), the
        # smallest of torch's defaults (physical cores) stands in for it.
        self.ceiling = at_import if not torch_env and at_import in defaults else min(defaults)
        self.ours: set[int] = {at_import}  # counts a thread may hold without the program having set one
        self.last: dict = {}
        # automatic readings, those whose own choice was below the ceiling, and those that applied fewer threads
        self.counts = {"readings": 0, "saw_load": 0, "applied_fewer": 0}


_state = _State()
_local = threading.local()  # per thread: next_check (monotonic seconds), ours (the count steerscale set here),
# chosen (the last reading's choice, see _settle)


def set_threads(value: int | str | None) -> None:
    """Fix torch's thread count for this process (``n``), or return to the automatic choice (``"auto"``/None). It
    wins over STEERSCALE_THREADS and OMP_NUM_THREADS, and over an earlier ``torch.set_num_threads`` (a later one
    wins over it). Applied now in the calling thread, within ``CHECK_EVERY`` seconds in the others."""
    n = parse_threads(value, "--threads")
    with _state.lock:
        _state.explicit, _state.explicit_given, _state.program = n, True, False
    _local.__dict__.pop("next_check", None)
    _local.__dict__.pop("chosen", None)
    if n is not None:
        _apply(n)
    else:
        _local.ours = torch.get_num_threads()  # the count now is not the program's: auto may change it


def policy(env=None) -> tuple[str, int | None, str]:
    """Who decides now: ``("pin", n, source)``, ``("leave", None, source)`` (torch keeps the count it has) or
    ``("auto", None, "auto")``. ``env``: the environment (default ``os.environ``)."""
    env = os.environ if env is None else env
    if _state.program:
        return "leave", None, "torch.set_num_threads"
    if _state.explicit_given:
        return ("pin", _state.explicit, "--threads") if _state.explicit else ("auto", None, "auto")
    if env.get(ENV, "").strip():
        n = parse_threads(env[ENV], ENV)
        return ("pin", n, ENV) if n else ("auto", None, "auto")
    for var in TORCH_ENV:
        if env.get(var, "").strip():
            return "leave", None, var
    return "auto", None, "auto"


def _apply(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _local.ours = n
    with _state.lock:
        _state.ours.add(n)


def _program_changed(current: int) -> bool:
    """Whether the program set torch's count itself since steerscale last looked in this thread (a thread steerscale
    has not seen yet starts from the last count set anywhere: fine when steerscale set it)."""
    mine = getattr(_local, "ours", None)
    return current != mine if mine is not None else current not in _state.ours


def _settle(chosen: int) -> int:
    """The count to apply for this reading's choice: fewer threads only when the previous reading in this thread
    chose fewer too (more at once). A reading is a few milliseconds, so a short burst of another process (a shell
    command, a monitor reading /proc) can fill it; one such reading would cost a second at fewer threads on an
    idle machine, while a real competing job shows in two readings and costs one second at most."""
    previous = getattr(_local, "chosen", None)
    _local.chosen = chosen
    applied = chosen if previous is None else max(chosen, previous)
    with _state.lock:
        _state.counts["readings"] += 1
        _state.counts["saw_load"] += chosen < _state.ceiling
        _state.counts["applied_fewer"] += applied < _state.ceiling
    return applied


def refresh(device=None, force: bool = False) -> int | None:
    """Apply the thread choice in the calling thread; called where forward passes start. Cheap: at most one reading
    of the machine per ``CHECK_EVERY`` seconds per thread, else one clock read. Returns the count in effect, or
    None when nothing was checked (too soon, or ``device`` is not the CPU)."""
    now = time.monotonic()
    if not force and now < getattr(_local, "next_check", 0.0):
        return None
    _local.next_check = now + CHECK_EVERY
    if device is not None and torch.device(device).type != "cpu":  # GPU kernels do not use these threads
        return None
    current = torch.get_num_threads()
    if not _state.program and _program_changed(current):
        _state.program = True  # sticky: the program's torch.set_num_threads wins until set_threads is called
        log.info("torch.set_num_threads(%d) was called outside steerscale: steerscale keeps that count", current)
    mode, n, source = policy()
    machine = read_machine() if mode == "auto" else None
    threads = current if mode == "leave" else n if mode == "pin" else _settle(choose(machine, _state.ceiling))
    if mode != "leave":
        _apply(threads)
    _state.last = {"mode": mode, "source": source, "threads": threads, "was": current, "ceiling": _state.ceiling,
                   "machine": asdict(machine) if machine else None}
    return threads


def status() -> dict:
    """The last decision (mode, source, threads, the machine reading) and the calling thread's count now: what a
    bench or a bug report shows."""
    return {**_state.last, "torch_threads": torch.get_num_threads(), "counts": dict(_state.counts)}
