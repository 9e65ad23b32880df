"""Process management and /proc sampling for the ringlb benchmark harness.

Every child is started in its own session (process group) and recorded in a
registry, so the harness can stop exactly the processes it started - by
process-group id - and nothing else.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """Ask the kernel for a free loopback port (bind :0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartError(RuntimeError):
    pass


class Child:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: str, env=None,
                 cpus: str | None = None, capture_stdout: bool = False, cwd=None):
        self.name = name
        if cpus is not None:
            cmd = ["taskset", "-c", cpus] + list(cmd)
        self.cmd = list(cmd)
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else self.log,
            stderr=self.log,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.pgid = self.pid  # start_new_session: the child leads its own group
        self._drain = None
        REGISTRY.add(self)

    # -- stdout helpers (echo backends print their ports on stdout) --
    def read_lines(self, count: int, timeout: float) -> list[str]:
        """Read `count` lines from stdout within `timeout`, then keep draining
        the rest of stdout into the log file in a thread."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while len(lines) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"{self.name}: timed out after {timeout}s waiting for "
                                 f"{count} line(s) on stdout (got {lines!r})")
            r, _, _ = select.select([fd], [], [], min(left, 0.2))
            if not r:
                if self.proc.poll() is not None:
                    raise StartError(f"{self.name}: exited with {self.proc.returncode} "
                                     f"before printing its address; log tail: {self.log_tail()}")
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise StartError(f"{self.name}: stdout closed early; log tail: {self.log_tail()}")
            buf += chunk
            while b"\n" in buf and len(lines) < count:
                line, buf = buf.split(b"\n", 1)
                lines.append(line.decode(errors="replace").strip())
        if buf:
            self.log.write(buf)
            self.log.flush()
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()
        return lines

    def _drain_stdout(self):
        try:
            fd = self.proc.stdout.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                self.log.write(chunk)
                self.log.flush()
        except (OSError, ValueError):
            return

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        try:
            self.log.flush()
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            if self.wait(grace) is None:
                self._signal_group(signal.SIGKILL)
                self.wait(5.0)
        else:
            # The leader is gone; make sure nothing of its group is left.
            self._signal_group(signal.SIGKILL)
        if self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass
        if self._drain is not None:
            self._drain.join(timeout=1.0)
        try:
            self.log.close()
        except OSError:
            pass
        REGISTRY.discard(self)

    def _signal_group(self, sig):
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class _Registry:
    def __init__(self):
        self._children: list[Child] = []
        self._lock = threading.Lock()

    def add(self, c: Child):
        with self._lock:
            self._children.append(c)

    def discard(self, c: Child):
        with self._lock:
            if c in self._children:
                self._children.remove(c)

    def stop_all(self):
        with self._lock:
            children = list(reversed(self._children))
        for c in children:
            c.stop(grace=3.0)


REGISTRY = _Registry()


def wait_tcp(port: int, timeout: float, child: Child | None = None) -> None:
    """Poll a TCP connect to 127.0.0.1:port until it succeeds (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise StartError(f"{child.name} exited with code {child.proc.returncode}; "
                             f"log tail: {child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise StartError(f"port {port} not accepting after {timeout}s ({last})")


# ---------------------------------------------------------------- /proc reads

def _read_stat(pid: int):
    """Return (ppid, cpu_ticks, num_threads, sys_ticks) from /proc/<pid>/stat,
    or None.

    utime+stime in /proc/<pid>/stat already covers every thread of the process;
    stime alone is the kernel's share (system calls, and the softirq TCP work
    that loopback runs inside them).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N-3]
    ppid = int(rest[1])
    utime = int(rest[11])
    stime = int(rest[12])
    threads = int(rest[17])
    return ppid, utime + stime, threads, stime


def descendants(root: int) -> list[int]:
    """root plus all its descendants (scans /proc once)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is None:
            continue
        children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _vmrss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sample_tree(pids: list[int], fds: bool = False) -> dict:
    """CPU seconds (utime+stime), RSS and thread count summed over `pids`."""
    ticks = sys_ticks = threads = rss = nfd = 0
    live = []
    for p in pids:
        st = _read_stat(p)
        if st is None:
            continue
        live.append(p)
        ticks += st[1]
        sys_ticks += st[3]
        threads += st[2]
        rss += _vmrss_kb(p)
        if fds:
            nfd += _fd_count(p)
    out = {"t": time.monotonic(), "cpu_s": ticks / CLK_TCK, "sys_s": sys_ticks / CLK_TCK, "rss_kb": rss,
           "threads": threads, "procs": len(live)}
    if fds:
        out["fds"] = nfd
    return out


def machine_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all CPUs, not idle/iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / CLK_TCK


def foreign_cpu_cores(seconds: float = 1.0) -> float:
    """CPU cores used by the rest of the machine over `seconds`, while the
    harness itself sleeps (call between measurements)."""
    a = machine_cpu_s()
    time.sleep(seconds)
    return (machine_cpu_s() - a) / seconds


def meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def machine_used_kb(samples: int = 5, interval: float = 0.1) -> int:
    """Whole-machine memory in use, as free(1) counts "used":
    MemTotal - MemFree - Buffers - Cached - SReclaimable (kB).  Unlike
    MemTotal - MemAvailable this does not move with page cache (e.g. a
    compiler writing files).  Median of a few reads to damp short spikes."""
    vals = []
    for i in range(samples):
        m = meminfo()
        vals.append(m["MemTotal"] - m["MemFree"] - m.get("Buffers", 0) - m.get("Cached", 0)
                    - m.get("SReclaimable", 0))
        if i + 1 < samples:
            time.sleep(interval)
    vals.sort()
    return vals[len(vals) // 2]


def others_anon_kb(exclude: set[int]) -> int:
    """Sum of RssAnon over every process not in `exclude` (kB): lets the
    whole-machine memory delta be corrected for unrelated processes that
    grew or shrank meanwhile (a compiler, another test)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


BUSY_COMMS = {"rustc", "clippy-driver", "rustdoc", "cc1", "cc1plus", "ld", "collect2"}


def busy_processes() -> list[str]:
    """Builds running on the machine (they would distort every figure)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in BUSY_COMMS:
            out.append(f"{comm}[{name}]")
    return out


def established_on_port(port: int) -> int:
    """Established TCP connections whose local port is `port` (server side)."""
    try:
        out = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return -1
    return sum(1 for line in out.stdout.splitlines() if line.strip())


class Sampler:
    """Samples a set of process trees every `interval` seconds in a thread."""

    def __init__(self, roots: dict[str, list[int]], interval: float = 0.25):
        self.roots = roots  # name -> root pids
        self.interval = interval
        self.samples: dict[str, list[dict]] = {k: [] for k in roots}
        self._stop = threading.Event()
        self.busy_seen: set[str] = set()  # builds seen on the machine while sampling
        self.machine: list[tuple[float, float]] = []  # (t, whole-machine CPU s)
        self._pids = {k: self._expand(v) for k, v in roots.items()}
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _expand(roots):
        pids = []
        for r in roots:
            pids.extend(descendants(r))
        return pids

    def sample_now(self) -> dict:
        return {k: sample_tree(p) for k, p in self._pids.items()}

    def start(self):
        self._take()
        self._thread.start()
        return self

    def _take(self):
        for k, pids in self._pids.items():
            self.samples[k].append(sample_tree(pids))
        self.machine.append((time.monotonic(), machine_cpu_s()))

    def _run(self):
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            if n % 8 == 0:  # pick up late-forked workers, at most every ~2 s
                self._pids = {k: self._expand(v) for k, v in self.roots.items()}
            self._take()
            if n % 4 == 0:
                self.busy_seen.update(busy_processes())

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._take()

    def foreign_cores(self, t0: float, t1: float) -> float | None:
        """Cores used by processes outside the sampled trees during t0..t1."""
        # only while every sampled tree is alive (a tree's CPU after its last
        # live sample would otherwise be counted as foreign)
        for v in self.samples.values():
            alive = [x["t"] for x in v if x["procs"] > 0]
            if alive:
                t1 = min(t1, alive[-1])
        m = [x for x in self.machine if t0 <= x[0] <= t1]
        if len(m) < 2 or m[-1][0] <= m[0][0]:
            return None
        dt = m[-1][0] - m[0][0]
        ours = 0.0
        for k in self.samples:
            w = self.window(k, m[0][0], m[-1][0])
            if w:
                ours += w["cpu_s"]
        return max(0.0, (m[-1][1] - m[0][1] - ours) / dt)

    def window(self, name: str, t0: float, t1: float) -> dict | None:
        """CPU rate (cores) and peak RSS between monotonic times t0..t1,
        using the samples closest to the window edges."""
        s = self.samples.get(name) or []
        # samples taken after the whole tree exited read 0: ignore them
        inside = [x for x in s if t0 <= x["t"] <= t1 and x["procs"] > 0]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        dt = b["t"] - a["t"]
        if dt <= 0:
            return None
        return {"t0": a["t"], "t1": b["t"], "seconds": dt,
                "cpu_s": b["cpu_s"] - a["cpu_s"],
                "cpu_cores": (b["cpu_s"] - a["cpu_s"]) / dt,
                "sys_s": b["sys_s"] - a["sys_s"],
                "sys_cores": (b["sys_s"] - a["sys_s"]) / dt,
                "rss_kb_max": max(x["rss_kb"] for x in inside),
                "threads_max": max(x["threads"] for x in inside)}
