"""Shared code of bench/run-redirect and bench/run-proxy.

Both tools measure pcproxy against Kamailio 5.6 in one run, with the SIP bench
harness that sits beside the repository (../shared/bench: SIPp scenarios,
run-bench, benchlib.find_max_rate, the Kamailio configs), the same pinning and
the same search, alternating fixed-rate steps between the two systems so a
noisy moment on the machine hits both.

* ``main("redirect", doc)``: INVITE -> 302 -> ACK (bench/run-redirect).
* ``main("proxy", doc)``: INVITE, 100, 180, 200, ACK, pause, BYE, 200 through
  the proxy to a SIPp UAS playing the pool on 127.0.0.1:5270, found through
  DNS (the harness's dnsmasq); plus a memory step (bench/run-proxy).

Only 127.0.0.1 is ever sent traffic; every load step is bounded in calls and
time; only the processes started here are ever stopped, by their PID.
"""

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_HARNESS = os.path.join(REPO, os.pardir, "shared", "bench")
INSTALL_HINT = "apt-get install -y sip-tester kamailio"
DNS_INSTALL_HINT = "apt-get install -y dnsmasq-base"
SCENARIOS = os.path.join(HERE, "scenarios")

SYSTEMS = ("pcproxy", "kamailio")

PROG = ["pcbench"]  # the running tool's name, set by main()


def log(*a):
    print("[%s]" % PROG[0], *a, file=sys.stderr, flush=True)


def die(msg):
    print("%s: %s" % (PROG[0], msg), file=sys.stderr, flush=True)
    sys.exit(2)


# --------------------------------------------------------------------------
# command line
def parse_args(mode, doc, argv=None):
    proxy = mode == "proxy"
    ap = argparse.ArgumentParser(
        prog="run-" + mode, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--harness",
        default=DEFAULT_HARNESS,
        help="the SIPp harness directory (default: ../shared/bench from the repo root)",
    )
    ap.add_argument("--transports", default="udp,tcp", help="comma list of udp,tcp")
    ap.add_argument(
        "--only",
        default="both",
        choices=["pcproxy", "kamailio", "both"],
        help="which systems to measure (default both)",
    )
    ap.add_argument(
        "--step-s",
        type=float,
        default=None,
        help="seconds of load per step (default 5; 2 with --quick)",
    )
    budget = 720.0 if proxy else 900.0
    ap.add_argument(
        "--budget-s",
        type=float,
        default=budget,
        help="total time budget in seconds (default %g); no step starts after it" % budget,
    )
    if proxy:
        quick_help = (
            "smoke run: the 300 calls/s latency step and one 500 calls/s step per "
            "system and transport, a short memory step, no bisection, about a minute"
        )
    else:
        quick_help = (
            "smoke run: the 1000 calls/s latency step and one 5000 calls/s step "
            "per system and transport, no bisection, under a minute"
        )
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--host", default="127.0.0.1", help="listen address (loopback only)")
    ap.add_argument("--pcproxy-port", type=int, default=5290)
    ap.add_argument("--kamailio-port", type=int, default=5260)
    if proxy:
        ap.add_argument(
            "--uas-port",
            type=int,
            default=5270,
            help="port of the SIPp UAS playing the pool (the DNS records point there)",
        )
    ap.add_argument("--pin-target", default="0", help="taskset CPU list for pcproxy and Kamailio")
    ap.add_argument(
        "--pin-sipp",
        default="1",
        help="taskset CPU list for SIPp" + (" (UAC and UAS)" if proxy else ""),
    )
    ap.add_argument(
        "--fixed-rate",
        type=float,
        default=400.0 if proxy else 10000.0,
        help="rate of the fixed steps (calls/s) whose CPU per call gives the ratio",
    )
    ap.add_argument(
        "--fixed-repeats",
        type=int,
        default=2,
        help="fixed steps per system and transport, alternating the systems",
    )
    ap.add_argument(
        "--moderate-rate",
        type=float,
        default=300.0 if proxy else 1000.0,
        help="rate of the latency-traced step (calls/s)",
    )
    ap.add_argument(
        "--start-rate", type=float, default=500.0 if proxy else 5000.0, help="first ladder rate"
    )
    ap.add_argument("--factor", type=float, default=2.0, help="ladder factor")
    ap.add_argument("--max-rate", type=float, default=80000.0, help="highest ladder rate")
    ap.add_argument("--bisect", type=int, default=2, help="bisection steps after the first failure")
    if proxy:
        ap.add_argument(
            "--pause-ms",
            type=int,
            default=None,
            help="call hold time, ACK -> BYE, ms (default 1000, the harness's; 500 with --quick)",
        )
        ap.add_argument(
            "--pool-dns",
            default="srv",
            choices=["srv", "static"],
            help="srv (default): both find the pool through DNS SRV "
            "_sip._udp/_sip._tcp.pcpool.contoso.com at the harness's dnsmasq; static: "
            "pcproxy gets --pool-port (A record only), Kamailio -A POOL_STATIC (no DNS)",
        )
        ap.add_argument(
            "--mem-rate",
            type=float,
            default=None,
            help="memory step: calls/s (default 500)",
        )
        ap.add_argument(
            "--mem-s",
            type=float,
            default=None,
            help="memory step: seconds of call generation (default 4; 1 with --quick)",
        )
        ap.add_argument(
            "--mem-answer-delay-ms",
            type=int,
            default=None,
            help="memory step: how long the pool holds back its 200 after the 180 "
            "(default 6000; 2000 with --quick); must exceed --mem-s by a second",
        )
        ap.add_argument("--no-memory-step", action="store_true", help="skip the memory step")
    ap.add_argument(
        "--pcproxy",
        default=os.path.join(REPO, ".venv", "bin", "pcproxy"),
        help="pcproxy executable (default: the repo's .venv)",
    )
    ap.add_argument("--kamailio-children", type=int, default=1, help="Kamailio -n")
    ap.add_argument(
        "--grace-s",
        type=float,
        default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping a server",
    )
    ap.add_argument("--out", help="JSONL file (default bench/results/%s-<UTC time>.jsonl)" % mode)
    a = ap.parse_args(argv)
    a.mode = mode
    if a.quick:
        if a.step_s is None:
            a.step_s = 2.0
        cap = 2000.0 if proxy else 5000.0
        a.max_rate = min(a.max_rate, cap)
        a.start_rate = min(a.start_rate, cap)
        if proxy:
            a.max_rate = a.start_rate  # one ladder step
        a.bisect = 0
        a.fixed_rate = a.start_rate  # the ladder's first step doubles as the fixed step
        a.fixed_repeats = 0
    if a.step_s is None:
        a.step_s = 5.0
    if proxy:
        if a.pause_ms is None:
            a.pause_ms = 500 if a.quick else 1000
        if a.mem_rate is None:
            a.mem_rate = 500.0
        if a.mem_s is None:
            a.mem_s = 1.0 if a.quick else 4.0
        if a.mem_answer_delay_ms is None:
            a.mem_answer_delay_ms = 2000 if a.quick else 6000
        if a.mem_answer_delay_ms < a.mem_s * 1000 + 1000:
            die("--mem-answer-delay-ms must exceed --mem-s by at least 1000 ms")
    return a


# --------------------------------------------------------------------------
# paths that may be written to the results file
class Scrub:
    """Keeps absolute paths of this machine out of anything we store/print."""

    def __init__(self, harness):
        self.subs = []
        for path, name in (
            (harness, rel_to_repo(harness)),
            (REPO, "."),
            (tempfile.gettempdir(), "$TMPDIR"),
            (os.path.expanduser("~"), "~"),
        ):
            if path and path != "/":
                self.subs.append((os.path.abspath(path).rstrip("/"), name))
        self.harness_parent = os.path.dirname(harness)

    def text(self, s):
        for path, name in self.subs:
            s = s.replace(path + "/", name + "/").replace(path, name)
        return s

    def obj(self, o):
        if isinstance(o, str):
            return self.text(o)
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if k == "scenario" and isinstance(v, str) and not os.path.isabs(v):
                    # run-bench stores it relative to the harness's parent dir
                    v = rel_to_repo(os.path.join(self.harness_parent, v))
                out[k] = self.obj(v)
            return out
        if isinstance(o, (list, tuple)):
            return [self.obj(v) for v in o]
        return o


def rel_to_repo(path):
    return os.path.relpath(os.path.abspath(path), REPO)


# --------------------------------------------------------------------------
# preconditions
def port_free(host, port, proto):
    """True if nothing is bound to host:port/proto (or to the wildcard)."""
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # ignore TIME_WAIT leftovers; a LISTEN socket still makes bind fail
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_media_port(host):
    """SIPp opens RTP-echo sockets at -mp and the ports just above it even
    though the scenario has no media; pick a base where they are free (the
    proxy-mode pool UAS uses base + 100)."""
    for base in range(36000, 40000, 200):
        if all(port_free(host, base + i, "udp") for i in (0, 1, 2, 3, 100, 101, 102, 103)):
            return base
    die("no free UDP port range for SIPp's media sockets in 36000-40000")


def cpulist(s):
    cpus = set()
    for part in s.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def check_preconditions(a, systems):
    proxy = a.mode == "proxy"
    try:
        ip = ipaddress.ip_address(a.host)
        if not ip.is_loopback or ip.version != 4:
            raise ValueError
    except ValueError:
        die(
            "--host must be an IPv4 loopback address (127.x.x.x), got %r: this bench "
            "never sends traffic off the box" % a.host
        )
    if proxy and a.host != "127.0.0.1":
        die("proxy mode: --host must be 127.0.0.1 (the harness's DNS records point there)")
    for t in a.transports:
        if t not in ("udp", "tcp"):
            die("unknown transport %r (udp, tcp)" % t)
    need = ["sipp", "taskset"]
    if "kamailio" in systems:
        need += ["kamailio", "unshare"]
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        die(
            "missing %s; install with:  %s   (taskset/unshare: util-linux)"
            % (", ".join(missing), INSTALL_HINT)
        )
    if proxy and shutil.which("dnsmasq") is None:
        die("missing dnsmasq; install with:  " + DNS_INSTALL_HINT)
    scen = "proxy_uac.xml" if proxy else "redirect_uac.xml"
    files = ["benchlib.py", "run-bench", os.path.join("scenarios", scen)]
    if proxy:
        files += [os.path.join("scenarios", "pool_uas.xml"), os.path.join("dns", "pcpool.conf")]
    if "kamailio" in systems:
        files += [os.path.join("kamailio", "%s.cfg" % a.mode), os.path.join("dns", "resolv.conf")]
    for f in files:
        if not os.path.exists(os.path.join(a.harness, f)):
            die(
                "harness file %s not found under %s (use --harness DIR)"
                % (f, rel_to_repo(a.harness))
            )
    if "pcproxy" in systems and not os.access(a.pcproxy, os.X_OK):
        die(
            "pcproxy executable not found: %s (create the venv, or --pcproxy PATH)"
            % rel_to_repo(a.pcproxy)
        )
    if "kamailio" in systems and os.geteuid() != 0:
        die(
            "run as root to measure Kamailio: the harness runs it in a private mount "
            "namespace (unshare --mount); or use --only pcproxy"
        )
    if proxy and os.geteuid() != 0:
        die("run as root: the harness's dnsmasq answers on 127.0.0.1:53")
    avail = os.sched_getaffinity(0)
    for opt, val in (("--pin-target", a.pin_target), ("--pin-sipp", a.pin_sipp)):
        if not cpulist(val) or not cpulist(val) <= avail:
            die("%s %s: CPUs not available here (have %s)" % (opt, val, sorted(avail)))
    if cpulist(a.pin_target) & cpulist(a.pin_sipp):
        log("warning: --pin-target and --pin-sipp overlap; target and SIPp share a core")
    ports = []
    if "pcproxy" in systems:
        ports.append(a.pcproxy_port)
    if "kamailio" in systems:
        ports.append(a.kamailio_port)
    if len(set(ports)) != len(ports):
        die("--pcproxy-port and --kamailio-port must differ")
    for p in ports:
        for proto in ("udp", "tcp"):
            if not port_free(a.host, p, proto):
                die(
                    "%s:%d/%s is already in use; pick another with --pcproxy-port/"
                    "--kamailio-port" % (a.host, p, proto)
                )
    if proxy:
        if a.uas_port in ports:
            die("--uas-port must differ from the servers' ports")
        for proto in ("udp", "tcp"):
            if not port_free(a.host, a.uas_port, proto):
                die(
                    "%s:%d/%s (pool UAS) is already in use; --uas-port"
                    % (a.host, a.uas_port, proto)
                )
        for proto in ("udp", "tcp"):
            if not port_free("127.0.0.1", 53, proto):
                die(
                    "127.0.0.1:53/%s is already in use: the harness's dnsmasq needs it "
                    "(glibc's resolver, which Kamailio uses, cannot take another port)" % proto
                )


# --------------------------------------------------------------------------
# /proc
def mem_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k + "_kB"] = int(v.split()[0])
    except OSError:
        pass
    return out


def pss_kb(pid):
    """Proportional set size (kB): shared pages divided among the processes
    that map them, so the PSS of Kamailio's processes adds up to its memory
    (their RSS would count the shared-memory pool once per process)."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
        rest = s[s.rfind(")") + 2 :].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, ValueError, IndexError):
        return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def first_line(cmd):
    try:
        cp = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20
        )
        lines = [ln.strip() for ln in cp.stdout.splitlines() if ln.strip()]
        return lines[0] if lines else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def stop_pid(proc, grace):
    """SIGTERM the process we started (by its PID), SIGKILL after grace."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log("pid %d did not exit on SIGTERM, SIGKILL" % proc.pid)
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------
# redirect mode: one-call functional check (UDP, stdlib socket): both must
# answer 302 with the same Contact
def check_302(host, port, timeout=3.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.bind((host, 0))
        lport = s.getsockname()[1]
        branch = "z9hG4bK-check-%d" % os.getpid()
        callid = "check-%d-%d@%s" % (os.getpid(), int(time.time() * 1e6), host)
        common = (
            "Via: SIP/2.0/UDP %s:%d;branch=%s\r\nMax-Forwards: 70\r\n"
            "From: <sip:check@contoso.com>;tag=chk1\r\n" % (host, lport, branch)
        )
        inv = (
            "INVITE sip:ocschat@contoso.com SIP/2.0\r\n"
            + common
            + "To: <sip:ocschat@contoso.com>\r\nCall-ID: %s\r\nCSeq: 1 INVITE\r\n"
            "Contact: <sip:check@%s:%d>\r\nContent-Length: 0\r\n\r\n" % (callid, host, lport)
        )
        s.sendto(inv.encode(), (host, port))
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            data = s.recv(65535).decode(errors="replace")
            status = data.split("\r\n", 1)[0]
            try:
                code = int(status.split()[1])
            except (IndexError, ValueError):
                continue
            if code < 200:
                continue
            hdrs = {}
            for line in data.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
                k, _, v = line.partition(":")
                hdrs.setdefault(k.strip().lower(), v.strip())
            contact = hdrs.get("contact") or hdrs.get("m")
            to = hdrs.get("to") or hdrs.get("t") or "<sip:ocschat@contoso.com>"
            ack = (
                "ACK sip:ocschat@contoso.com SIP/2.0\r\n"
                + common
                + "To: %s\r\nCall-ID: %s\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n" % (to, callid)
            )
            s.sendto(ack.encode(), (host, port))
            return {"status": status, "contact": contact}
        return {"error": "no final response"}
    except OSError as e:
        return {"error": str(e)}
    finally:
        s.close()


# --------------------------------------------------------------------------
class MemSampler(threading.Thread):
    """Samples a process tree's memory every `interval` s while a step runs:
    VmRSS summed over the PIDs (pcproxy's figure) and PSS summed over them
    (Kamailio's: its processes share one memory pool)."""

    def __init__(self, pids, interval=0.1):
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.interval = interval
        self.samples = []  # (monotonic t, rss kB, pss kB)
        self.done = threading.Event()

    def sample(self):
        rss = pss = 0
        for pid in self.pids:
            rss += mem_status(pid).get("VmRSS_kB", 0)
            pss += pss_kb(pid) or 0
        self.samples.append((time.monotonic(), rss, pss))

    def run(self):
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def stop(self):
        self.done.set()
        self.join(5)
        self.sample()


def slope_kb_per_s(points):
    """Least-squares slope of (t, kB) points."""
    if len(points) < 3:
        return None
    mt = statistics.mean(p[0] for p in points)
    mv = statistics.mean(p[1] for p in points)
    den = sum((p[0] - mt) ** 2 for p in points)
    if den == 0:
        return None
    return sum((p[0] - mt) * (p[1] - mv) for p in points) / den


# --------------------------------------------------------------------------
class Runner:
    def __init__(self, a, systems):
        self.a = a
        self.systems = systems
        self.scrub = Scrub(a.harness)
        sys.path.insert(0, a.harness)
        import benchlib  # noqa: E402  (the harness's shared code)

        self.bl = benchlib
        self._orig_run_bench = benchlib.run_bench
        benchlib.run_bench = self._run_bench_retry  # find_max_rate looks it up at call time
        self.ctx = {}
        self.work = tempfile.mkdtemp(prefix="run-%s-" % a.mode)
        self.procs = {}  # system -> Popen
        self.kids = {}  # system -> child PIDs recorded at start-up
        self.logs = {}  # system -> log file
        self.results = {}  # (system, transport) -> dict
        self.mem = []  # memory snapshots
        self.memsteps = {}  # (system, transport) -> memory step result
        self.checks = {}  # (system, transport) -> check result
        self.steps = []  # every load step, tagged with system/phase
        self.dns = None  # the dnsmasq we started (proxy mode)
        self.error = None  # what stopped the run early, if anything
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.budget_s
        self.media_port = pick_media_port(a.host)
        ver = first_line([a.pcproxy, "--version"]) if "pcproxy" in systems else ""
        self.sys_names = {
            "pcproxy": ("pcproxy " + ver.split()[-1]) if ver else "pcproxy",
            "kamailio": "Kamailio 5.6 (-n %d)" % a.kamailio_children,
        }
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.out = a.out or os.path.join(HERE, "results", "%s-%s.jsonl" % (a.mode, stamp))
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        self.outf = open(self.out, "a")

    # ---------------------------------------------------------------- output
    def record(self, obj):
        self.outf.write(json.dumps(self.scrub.obj(obj), separators=(",", ":")) + "\n")
        self.outf.flush()

    def record_step(self, r):
        r = dict(r)
        r.update(self.ctx)
        self.steps.append(r)
        self.record(r)

    def _run_bench_retry(self, *args, **kw):
        """run-bench, retried once when SIPp could not even start (e.g. it
        failed to bind a socket: exit 254, or produced no statistics)."""
        r = self._run_bench_once(*args, **kw)
        if r.get("sipp_rc") == 254 or (r.get("error") and not r.get("calls_created")):
            log(
                "SIPp did not run (rc=%s, %s); retrying this step once"
                % (r.get("sipp_rc"), self.scrub.text(str(r.get("error", "")))[:200])
            )
            bad = dict(r, step_kind="launch-failure", **self.ctx)
            self.record(bad)
            time.sleep(2.0)
            r = self._run_bench_once(*args, **kw)
            r["retried_after_launch_failure"] = True
        return r

    def _run_bench_once(self, *args, **kw):
        return self._orig_run_bench(*args, **kw)

    # ---------------------------------------------------------------- servers
    def target(self, system):
        port = self.a.pcproxy_port if system == "pcproxy" else self.a.kamailio_port
        return "%s:%d" % (self.a.host, port)

    def log_path(self, system, transport):
        return os.path.join(self.work, "%s.log" % system)

    def endpoint_args(self, transport):
        return ["--pool-transport", "tcp"]

    def serve_args(self):
        return ["--mode", "redirect"]  # proxy is the daemon's default

    def kamailio_args(self):
        return []

    def launch(self, system, cmd, cwd, port, transport, settle):
        """Start ``system`` (its log in the run's directory), wait until it
        listens on ``port`` (UDP and TCP), then note its child processes."""
        logf = self.logs[system] = self.log_path(system, transport)
        log("start: " + self.scrub.text(" ".join(cmd)))
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=open(logf, "w"), stderr=subprocess.STDOUT
        )
        self.procs[system] = proc
        if not self.wait_ports(proc, port, 20):
            raise RuntimeError(
                "%s did not listen on %s (udp+tcp):\n%s"
                % (system, self.target(system), self.tail(logf))
            )
        time.sleep(settle)
        self.kids[system] = self.bl.descendants(proc.pid)
        return proc

    def start_pcproxy(self, transport=None):
        a = self.a
        db = os.path.join(self.work, "endpoints%s.db" % ("-" + transport if transport else ""))
        cp = subprocess.run(
            [
                a.pcproxy,
                "endpoint",
                "new",
                "--db",
                db,
                "--sip-address",
                "sip:ocschat@contoso.com",
                "--pool-fqdn",
                "pcpool.contoso.com",
            ]
            + self.endpoint_args(transport),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )
        if cp.returncode != 0:
            raise RuntimeError("pcproxy endpoint new failed:\n" + self.scrub.text(cp.stdout))
        cmd = [
            "taskset",
            "-c",
            a.pin_target,
            a.pcproxy,
            "serve",
            "--config",
            os.path.join(REPO, "bench", "pcproxy-bench.toml"),
            "--workers",
            "1",
            "--db",
            db,
            "--listen",
            "udp:%s:%d" % (a.host, a.pcproxy_port),
            "--listen",
            "tcp:%s:%d" % (a.host, a.pcproxy_port),
        ]
        cmd += self.serve_args() + ["--log-level", "warning"]
        proc = self.launch("pcproxy", cmd, REPO, a.pcproxy_port, transport, settle=0.3)
        log(
            "pcproxy pid %d (%s), %d child processes"
            % (proc.pid, self.scrub.text(cmdline(proc.pid))[:80], len(self.kids["pcproxy"]))
        )

    def start_kamailio(self, transport=None):
        a, bl = self.a, self.bl
        cfg = os.path.join(a.harness, "kamailio", "%s.cfg" % a.mode)
        resolv = os.path.join(a.harness, "dns", "resolv.conf")
        # same command line as the harness's run-kamailio-baseline (-n N)
        kam = [
            "kamailio",
            "-DD",
            "-E",
            "-n",
            str(a.kamailio_children),
            "-m",
            "1024",
            "-M",
            "16",
            "-x",
            "tlsf",
            "-X",
            "tlsf",
            "-A",
            "BENCH_PORT=%d" % a.kamailio_port,
        ]
        if a.host != "127.0.0.1":
            kam += ["-A", "BENCH_IP=%s" % a.host]
        kam += ["-f", bl.rel(cfg)] + self.kamailio_args()
        cmd = [
            "taskset",
            "-c",
            a.pin_target,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"',
            "sh",
            bl.rel(resolv),
        ] + kam
        proc = self.launch("kamailio", cmd, bl.REPO, a.kamailio_port, transport, settle=0.5)
        log("kamailio pid %d, %d child processes" % (proc.pid, len(self.kids["kamailio"])))

    def start_servers(self, transport=None):
        if "pcproxy" in self.systems:
            self.start_pcproxy(transport)
        if "kamailio" in self.systems:
            self.start_kamailio(transport)

    def wait_ports(self, proc, port, timeout):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if proc.poll() is not None:
                return False
            if not port_free(self.a.host, port, "udp") and not port_free(self.a.host, port, "tcp"):
                return True
            time.sleep(0.1)
        return False

    def tail(self, path, n=2000):
        try:
            with open(path, errors="replace") as f:
                return self.scrub.text(f.read()[-n:])
        except OSError:
            return ""

    def stop_all(self, transport=None):
        for system in ("pcproxy", "kamailio"):
            proc = self.procs.get(system)
            if proc is None:
                continue
            was_running = proc.poll() is None
            log("stopping %s pid %d" % (system, proc.pid))
            try:
                self.bl.stop(proc, grace=self.a.grace_s, known_children=self.kids.get(system, ()))
            except Exception as e:  # never leave without trying the others
                log("stopping %s: %s" % (system, e))
            rc = proc.returncode
            info = {
                "kind": "stop",
                "system": system,
                "pid": proc.pid,
                "exit_code": rc,
                "was_running": was_running,
            }
            if transport:
                info["transport"] = transport
            logf = self.logs.get(system) or self.log_path(system, transport)
            try:
                with open(logf, errors="replace") as f:
                    lines = f.readlines()
            except OSError:
                lines = []
            if system == "kamailio":
                errs = [
                    ln
                    for ln in lines
                    if ("ERROR" in ln or "CRITICAL" in ln) and "receive_fd(): EOF" not in ln
                ]
            else:
                errs = [ln for ln in lines if ln.strip()]
            info["log_lines_flagged"] = len(errs)
            if errs:
                info["log_example"] = errs[0].strip()[:300]
                log(
                    "%s log: %d %s lines, e.g. %s"
                    % (
                        system,
                        len(errs),
                        "ERROR" if system == "kamailio" else "warning+",
                        self.scrub.text(errs[0].strip())[:200],
                    )
                )
            if system == "pcproxy" and rc not in (0, None) and was_running:
                log("pcproxy exited with %s after SIGTERM (expected 0)" % rc)
            self.record(info)
            self.procs[system] = None

    def check_alive(self, system):
        proc = self.procs.get(system)
        if proc is None or proc.poll() is not None:
            raise RuntimeError(
                "%s is no longer running (exit %s); log:\n%s"
                % (
                    system,
                    proc.returncode if proc else "?",
                    self.tail(self.logs.get(system) or self.log_path(system, None)),
                )
            )

    # ---------------------------------------------------------------- memory
    def snap_mem(self, when):
        proc = self.procs.get("pcproxy")
        if proc is None:
            return
        m = mem_status(proc.pid)
        for kid in self.kids.get("pcproxy", ()):
            for k, v in mem_status(kid).items():
                m[k] = m.get(k, 0) + v
        m.update({"kind": "memory", "system": "pcproxy", "pid": proc.pid, "when": when})
        self.mem.append(m)
        self.record(m)
        log(
            "pcproxy memory %s: VmRSS %s kB, VmHWM %s kB"
            % (when, m.get("VmRSS_kB"), m.get("VmHWM_kB"))
        )

    # ---------------------------------------------------------------- load
    def time_left(self):
        return self.deadline - time.monotonic()

    def step_cost(self):
        return self.a.step_s + 4.0

    def transport_overhead(self):
        """Seconds each transport costs besides its fixed steps and searches."""
        return 0.0

    def extra(self):
        return ["--media-port", str(self.media_port)]

    def fixed_step(self, system, transport, i):
        a = self.a
        self.check_alive(system)
        self.ctx = {"system": system, "phase": "fixed", "repeat": i}
        proc = self.procs[system]
        r = self.bl.run_bench(
            self.target(system),
            a.mode,
            transport,
            a.fixed_rate,
            a.step_s,
            proc.pid,
            a.pin_sipp,
            latency=False,
            extra=self.extra(),
            label="%s-%s-%s-fixed" % (system, a.mode, transport),
        )
        r["step_kind"] = "fixed"
        self.record_step(r)
        log("  fixed %-8s %s" % (system, self.bl._short(r)))
        time.sleep(0.5)
        return r

    def search(self, system, transport, deadline):
        a = self.a
        self.check_alive(system)
        self.ctx = {"system": system, "phase": "search"}
        proc = self.procs[system]
        s = self.bl.find_max_rate(
            self.target(system),
            a.mode,
            transport,
            proc.pid,
            a.pin_sipp,
            a.step_s,
            a.moderate_rate,
            a.start_rate,
            factor=a.factor,
            max_rate=a.max_rate,
            bisect=a.bisect,
            deadline=deadline,
            extra=self.extra(),
            label="%s-%s-%s" % (system, a.mode, transport),
            record=self.record_step,
        )
        s["last_offered"] = (s.get("first_failing") or s.get("at_max") or {}).get("rate_offered", 0)
        skip = ("at_max", "first_failing", "moderate")
        self.record(
            {"kind": "summary", "system": system, **{k: v for k, v in s.items() if k not in skip}}
        )
        return s

    def meta(self):
        a = self.a
        return {
            "kind": "meta",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "harness": rel_to_repo(a.harness),
            "systems": [self.sys_names[s] for s in self.systems],
            "python_uvloop": first_line(
                [
                    os.path.join(os.path.dirname(a.pcproxy), "python"),
                    "-c",
                    "import sys,uvloop;print(sys.version.split()[0],'uvloop',uvloop.__version__)",
                ]
            )
            if "pcproxy" in self.systems
            else None,
            "kamailio": first_line(["kamailio", "-v"]) if "kamailio" in self.systems else None,
            "sipp": first_line(["sipp", "-v"]),
            "git_head": first_line(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
            # uncommitted changes of the measured code (other people edit the tree)
            "git_dirty": git_dirty(["proxy", "pyproject.toml"]),
            "nproc": os.cpu_count(),
            "media_port": self.media_port,
            "args": {
                k: (rel_to_repo(v) if k in ("harness", "pcproxy", "out") and v else v)
                for k, v in vars(a).items()
                if k != "mode"
            },
        }

    def check_servers(self, transport):
        """Redirect: one INVITE to each system, both must answer 302 with the
        same Contact."""
        a = self.a
        contacts = {}
        for system in self.systems:
            c = check_302(a.host, int(self.target(system).rsplit(":", 1)[1]))
            c.update({"kind": "check", "system": system})
            self.record(c)
            log(
                "check %s: %s / Contact: %s"
                % (system, c.get("status") or c.get("error"), c.get("contact"))
            )
            if not str(c.get("status", "")).startswith("SIP/2.0 302"):
                raise RuntimeError(
                    "%s did not answer the check INVITE with 302: %s"
                    % (system, c.get("status") or c.get("error"))
                )
            contacts[system] = c.get("contact")
        if len(set(contacts.values())) > 1:
            log("warning: the two systems answer with different Contacts: %s" % contacts)

    def memory_steps(self, transport):
        """Proxy mode only."""

    def setup_run(self):
        """Before the first transport (redirect: both servers up for the
        whole run)."""
        self.start_servers()
        self.check_servers(None)
        self.snap_mem("before load")

    def setup_transport(self, transport):
        pass

    def teardown_transport(self, transport):
        pass

    def mem_key(self, what, transport):
        return "after %s %s" % (transport, what)

    def run(self):
        a = self.a
        self.record(self.meta())
        self.setup_run()

        n_fixed_left = len(a.transports) * len(self.systems) * a.fixed_repeats
        n_search_left = len(a.transports) * len(self.systems)
        for ti, transport in enumerate(a.transports):
            log("=== transport %s" % transport)
            self.setup_transport(transport)
            self.memory_steps(transport)
            fixed = {s: [] for s in self.systems}
            for i in range(a.fixed_repeats):
                for system in self.systems if i % 2 == 0 else self.systems[::-1]:
                    n_fixed_left -= 1
                    if self.time_left() < self.step_cost():
                        log("budget spent, skipping fixed step %s/%s" % (system, transport))
                        continue
                    fixed[system].append(self.fixed_step(system, transport, i))
            if a.fixed_repeats:
                self.snap_mem(self.mem_key("fixed steps", transport))
            later = len(a.transports) - ti - 1  # transports still to come
            for system in self.systems:
                left = (
                    self.time_left()
                    - n_fixed_left * self.step_cost()
                    - later * self.transport_overhead()
                )
                if left < 2 * self.step_cost():
                    log("budget spent, skipping the %s/%s search" % (system, transport))
                    n_search_left -= 1
                    self.results[(system, transport)] = {"fixed": fixed[system], "search": None}
                    continue
                deadline = time.monotonic() + left / n_search_left
                n_search_left -= 1
                log(
                    "--- %s %s search (%.0f s of budget)"
                    % (system, transport, deadline - time.monotonic())
                )
                s = self.search(system, transport, deadline)
                self.results[(system, transport)] = {"fixed": fixed[system], "search": s}
                if system == "pcproxy":
                    self.snap_mem(self.mem_key("search", transport))
            self.teardown_transport(transport)
        return self.results

    def finish(self):
        """Stop everything we started (by PID)."""
        if self.procs.get("pcproxy") is not None and self.procs["pcproxy"].poll() is None:
            self.snap_mem("end")
        self.stop_all()


# --------------------------------------------------------------------------
class ProxyRunner(Runner):
    """Proxy mode: the pool is a SIPp UAS (started by run-bench per step), found
    through the harness's dnsmasq; pcproxy gets a table whose entry uses the
    transport under test, so both servers are restarted for each transport
    (which also gives the memory step a fresh process)."""

    def log_path(self, system, transport):
        return os.path.join(self.work, "%s-%s.log" % (system, transport or "run"))

    def endpoint_args(self, transport):
        args = ["--pool-transport", transport, "--mode", "proxy"]
        if self.a.pool_dns == "static":
            args += ["--pool-port", str(self.a.uas_port)]
        return args

    def serve_args(self):
        return ["--mode", "proxy", "--nameserver", "127.0.0.1:53"]

    def kamailio_args(self):
        args = ["-A", 'POOL_HOSTPORT="127.0.0.1:%d"' % self.a.uas_port]
        if self.a.pool_dns == "static":
            args += ["-A", "POOL_STATIC"]
        return args

    def extra(self):
        return [
            "--media-port",
            str(self.media_port),
            "--pause-ms",
            str(self.a.pause_ms),
            "--uas-port",
            str(self.a.uas_port),
        ]

    def step_cost(self):
        return self.a.step_s + self.a.pause_ms / 1000.0 + 5.0

    def mem_cost(self):
        if self.a.no_memory_step:
            return 0.0
        return self.a.mem_answer_delay_ms / 1000.0 + self.a.pause_ms / 1000.0 + 6.0

    def transport_overhead(self):
        return 15.0 + len(self.systems) * self.mem_cost()

    # DNS: dnsmasq with the harness's records, by PID; its CPU is read around
    # every step (it is not on the target's CPU, it shows in other load)
    def start_dns(self):
        a = self.a
        conf = os.path.join(a.harness, "dns", "pcpool.conf")
        if a.uas_port != 5270:
            with open(conf) as f:
                txt = f.read().replace(",5270,", ",%d," % a.uas_port)
            conf = os.path.join(self.work, "pcpool.conf")
            with open(conf, "w") as f:
                f.write(txt)
        cmd = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=" + conf,
            "--pid-file=",
            "--log-facility=-",
        ]
        logf = os.path.join(self.work, "dnsmasq.log")
        log("start: " + self.scrub.text(" ".join(cmd)))
        self.dns = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=open(logf, "w"),
            stderr=subprocess.STDOUT,
        )
        if not self.bl.wait_ports(self.dns, [(53, "udp")], 5):
            raise RuntimeError("dnsmasq did not start:\n" + self.tail(logf))
        log("dnsmasq pid %d on 127.0.0.1:53" % self.dns.pid)

    def _run_bench_once(self, *args, **kw):
        d0 = cpu_ticks(self.dns.pid) if self.dns else None
        r = self._orig_run_bench(*args, **kw)
        d1 = cpu_ticks(self.dns.pid) if self.dns else None
        if d0 is not None and d1 is not None:
            r["dns_cpu_s"] = round((d1 - d0) / CLK_TCK, 3)
        return r

    def setup_run(self):
        self.start_dns()

    def setup_transport(self, transport):
        self.start_servers(transport)
        self.check_servers(transport)
        self.snap_mem("before %s load" % transport)

    def teardown_transport(self, transport):
        if self.procs.get("pcproxy") is not None:
            self.snap_mem("end of %s" % transport)
        self.stop_all(transport)

    def finish(self):
        self.stop_all()
        if self.dns is not None:
            was_running = self.dns.poll() is None
            log("stopping dnsmasq pid %d" % self.dns.pid)
            stop_pid(self.dns, self.a.grace_s)
            self.record(
                {
                    "kind": "stop",
                    "system": "dnsmasq",
                    "pid": self.dns.pid,
                    "exit_code": self.dns.returncode,
                    "was_running": was_running,
                }
            )
            self.dns = None

    def check_servers(self, transport):
        """A handful of real calls through each system (run-bench at 5 calls/s
        for 1 s, 100 ms hold): the INVITE must reach the SIPp pool and every
        call must get its 200 (INVITE) and 200 (BYE)."""
        a = self.a
        for system in self.systems:
            self.check_alive(system)
            wd = os.path.join(self.work, "check-%s-%s" % (system, transport))
            extra = self.extra()
            extra[extra.index("--pause-ms") + 1] = "100"
            r = self._run_bench_once(
                self.target(system),
                "proxy",
                transport,
                5,
                1,
                self.procs[system].pid,
                a.pin_sipp,
                latency=True,
                extra=extra + ["--workdir", wd],
                label="%s-proxy-%s-check" % (system, transport),
            )
            ok = (
                r.get("calls_created") == 5
                and r.get("calls_ok") == 5
                and not r.get("calls_failed")
                and not r.get("error")
            )
            lat = (r.get("latency_us") or {}).get("INVITE") or {}
            c = {
                "kind": "check",
                "system": system,
                "transport": transport,
                "calls_created": r.get("calls_created"),
                "calls_ok": r.get("calls_ok"),
                "calls_failed": r.get("calls_failed"),
                "failed_timeout": r.get("failed_timeout"),
                "failed_unexpected": r.get("failed_unexpected"),
                "invite_200_us_p50": lat.get("p50"),
                "ok": bool(ok),
            }
            if r.get("error"):
                c["error"] = str(r["error"])[-300:]
            self.checks[(system, transport)] = c
            self.record(c)
            log(
                "check %s %s: %s/%s calls completed (INVITE reached the pool, 200 back, "
                "BYE 200)%s"
                % (
                    system,
                    transport,
                    r.get("calls_ok"),
                    r.get("calls_created"),
                    "" if ok else " -- FAILED",
                )
            )
            if not ok:
                detail = self.tail(os.path.join(wd, "uac_errors.log"), 1500) or self.tail(
                    os.path.join(wd, "uac.out"), 1500
                )
                raise RuntimeError(
                    "%s did not carry the check calls over %s (INVITE -> pool -> 200, ACK, "
                    "BYE -> 200): %s\nSIPp client errors:\n%s\n%s log:\n%s"
                    % (
                        system,
                        transport,
                        c,
                        detail,
                        system,
                        self.tail(self.logs.get(system, ""), 1500),
                    )
                )
            shutil.rmtree(wd, ignore_errors=True)

    def memory_steps(self, transport):
        """Memory per pending INVITE transaction.  The pool (a SIPp UAS we start,
        bench/scenarios/pool_uas_answer_delay.xml) answers 180 at once and holds
        its 200 back for --mem-answer-delay-ms; the client sends --mem-rate
        calls/s for --mem-s seconds.  Until the first 200 goes out, no call has
        completed, so every call created so far is one INVITE transaction
        pending in the proxy (server + client side).  The memory of the
        target's processes is sampled every 0.1 s:
          per_tx = (peak before the first 200 - memory just before the step)
                   / calls created
        and, as a cross-check that does not depend on the baseline, the slope
        of memory vs time while calls are being created / the call rate."""
        a = self.a
        if a.no_memory_step:
            return
        for system in self.systems:
            if self.time_left() < self.mem_cost():
                log("budget spent, skipping the %s/%s memory step" % (system, transport))
                continue
            self.memsteps[(system, transport)] = self.memory_step(system, transport)
        if "pcproxy" in self.systems:
            self.snap_mem(self.mem_key("memory step", transport))

    def memory_step(self, system, transport):
        a = self.a
        self.check_alive(system)
        self.ctx = {"system": system, "phase": "memory"}
        proc = self.procs[system]
        delay_ms = a.mem_answer_delay_ms
        uas_xml = os.path.join(SCENARIOS, "pool_uas_answer_delay.xml")
        recv_ms = 5000
        uas_cmd = [
            "taskset",
            "-c",
            a.pin_sipp,
            "sipp",
            "-sf",
            uas_xml,
            "-i",
            a.host,
            "-p",
            str(a.uas_port),
            "-t",
            "u1" if transport == "udp" else "t1",
            "-mp",
            str(self.media_port + 100),
            "-d",
            str(delay_ms),
            "-recv_timeout",
            str(delay_ms + a.pause_ms + 2 * recv_ms),
            "-buff_size",
            "4194304",
            "-max_recv_loops",
            "10000",
            "-nostdin",
        ]
        wd = os.path.join(self.work, "mem-%s-%s" % (system, transport))
        os.makedirs(wd, exist_ok=True)
        uas = subprocess.Popen(
            uas_cmd,
            cwd=wd,
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(wd, "uas-late.out"), "w"),
            stderr=subprocess.STDOUT,
        )
        try:
            t_end = time.monotonic() + 5
            while not self.bl.port_bound(a.uas_port, transport):
                if uas.poll() is not None or time.monotonic() > t_end:
                    raise RuntimeError(
                        "memory step: the late-answering pool UAS did not start:\n%s"
                        % self.tail(os.path.join(wd, "uas-late.out"))
                    )
                time.sleep(0.05)
            pids = [proc.pid] + list(self.bl.descendants(proc.pid))
            sampler = MemSampler(pids)
            sampler.start()
            time.sleep(0.6)  # baseline samples
            t_start = time.monotonic()
            ncalls = int(round(a.mem_rate * a.mem_s))
            extra = self.extra() + [
                "--no-uas",
                "--recv-timeout-ms",
                str(delay_ms + recv_ms),
                "--max-concurrent",
                str(max(1000, 2 * ncalls)),
            ]
            r = self.bl.run_bench(
                self.target(system),
                "proxy",
                transport,
                a.mem_rate,
                a.mem_s,
                proc.pid,
                a.pin_sipp,
                latency=False,
                extra=extra,
                label="%s-proxy-%s-memory" % (system, transport),
                timeout=a.mem_s + delay_ms / 1000.0 + 60,
            )
            sampler.stop()
        finally:
            stop_pid(uas, 3.0)
        which = 1 if system == "pcproxy" else 2  # RSS for pcproxy, PSS for Kamailio
        metric = "VmRSS" if system == "pcproxy" else "PSS (sum over its processes)"
        base = [s[which] for s in sampler.samples if s[0] < t_start]
        # before the first 200 can leave the pool: t_start + delay, with margin
        win_end = t_start + delay_ms / 1000.0 - 0.3
        win = [s[which] for s in sampler.samples if t_start <= s[0] <= win_end]
        ramp = [
            (s[0], s[which])
            for s in sampler.samples
            if t_start + 0.3 <= s[0] <= t_start + a.mem_s - 0.1
        ]
        allv = [s[which] for s in sampler.samples]
        base_kb = statistics.median(base) if base else None
        peak_kb = max(win) if win else None
        created = r.get("calls_created") or 0
        valid = bool(
            created == ncalls
            and r.get("calls_ok") == created
            and not r.get("calls_failed")
            and base_kb is not None
            and peak_kb is not None
        )
        slope = slope_kb_per_s(ramp)
        res = {
            "system": system,
            "transport": transport,
            "metric": metric,
            "rate": a.mem_rate,
            "gen_s": a.mem_s,
            "answer_delay_ms": delay_ms,
            "pending_at_peak": created,
            "base_kB": base_kb,
            "peak_before_first_200_kB": peak_kb,
            "max_during_step_kB": max(allv) if allv else None,
            "growth_kB": (peak_kb - base_kb) if valid else None,
            "per_pending_tx_bytes": round((peak_kb - base_kb) * 1024.0 / created)
            if valid and created
            else None,
            "ramp_slope_bytes_per_tx": round(slope * 1024.0 / a.mem_rate)
            if slope is not None and valid
            else None,
            "samples": len(sampler.samples),
            "valid": valid,
        }
        r["memory"] = res
        r["step_kind"] = "memory"
        self.record_step(r)
        log(
            "  memory %-8s %s: %s -> %s kB before the first 200 (%d calls pending): "
            "%s bytes per pending INVITE transaction (ramp slope: %s); %s"
            % (
                system,
                metric,
                base_kb,
                peak_kb,
                created,
                res["per_pending_tx_bytes"],
                res["ramp_slope_bytes_per_tx"],
                "ok" if valid else "NOT VALID: %s ok of %s" % (r.get("calls_ok"), ncalls),
            )
        )
        shutil.rmtree(wd, ignore_errors=True)
        time.sleep(0.5)
        return res


# --------------------------------------------------------------------------
# the table
def fmt_num(v, nd=4):
    return "n/a" if v is None else ("%.*f" % (nd, v))


def fixed_cpu(a, res):
    """(mean CPU s per 1000 calls over the fixed steps, note)."""
    steps = list(res.get("fixed") or [])
    if a.quick and res.get("search"):
        # quick: the ladder's first step is the fixed-rate step
        s = res["search"]
        for r in (s.get("at_max"), s.get("first_failing")):
            if r and r.get("rate_offered") == a.fixed_rate:
                steps = [r]
                break
    vals = [
        r.get("target_cpu_s_per_1k_calls")
        for r in steps
        if r.get("target_cpu_s_per_1k_calls") is not None
    ]
    if not vals:
        return None, "not measured"
    note = []
    if len(vals) > 1:
        note.append("mean of %d: %s" % (len(vals), ", ".join("%.4f" % v for v in vals)))
    bad = [r for r in steps if not r.get("sustained")]
    if bad:
        note.append("%d of %d steps not sustained" % (len(bad), len(steps)))
    return statistics.mean(vals), "; ".join(note)


def kb_mib(kb):
    return "n/a" if kb is None else "%.1f MiB" % (kb / 1024.0)


def sipp_verdict(s):
    if not s:
        return "n/a"
    g, b = s.get("at_max") or {}, s.get("first_failing") or {}
    if g.get("sipp_saturated"):
        return "yes, at max (SIPp %s cores)" % g.get("sipp_util_ss")
    if b and (b.get("sipp_saturated") or (b.get("sipp_util_ss") or 0) >= 0.9):
        return "yes, at the first failing step %g (SIPp %s cores)" % (
            b.get("rate_offered"),
            b.get("sipp_util_ss"),
        )
    if s.get("ceiling_reached"):
        return "no (no failing step up to %g; SIPp %s cores at max)" % (
            s.get("last_offered", 0),
            g.get("sipp_util_ss", "n/a"),
        )
    return "no (SIPp %s cores at max)" % g.get("sipp_util_ss", "n/a")


def failing_note(s):
    if not s:
        return "search skipped (budget)"
    b = s.get("first_failing")
    g = s.get("at_max") or {}
    parts = []
    if g:
        parts.append("target %s cores at max" % g.get("target_util"))
    if b:
        parts.append(
            "first failing %g: %s failed, %s retrans, p99 %s ms, achieved %s, "
            "target %s / SIPp %s cores"
            % (
                b.get("rate_offered"),
                b.get("calls_failed"),
                b.get("retransmissions"),
                b.get("rt_p99_ms_bucket"),
                b.get("achieved_cps"),
                b.get("target_util"),
                b.get("sipp_util_ss"),
            )
        )
    elif s.get("ceiling_reached"):
        parts.append("ladder ceiling reached")
    else:
        parts.append("budget ended the search")
    oth = max([r.get("other_busy_cores") or 0 for r in (g, b or {})] or [0])
    parts.append("other load ≤ %.2f cores" % oth)
    return "; ".join(parts)


def lat_str(lat, m):
    if not lat:
        return "n/a"
    ls = "%s / %s" % (
        "n/a" if lat.get("p50") is None else "%d" % round(lat["p50"]),
        "n/a" if lat.get("p99") is None else "%d" % round(lat["p99"]),
    )
    if not m.get("sustained"):
        ls += " (step not sustained)"
    return ls


def mem_cell(ms):
    """Proxy mode: the memory step's result as a table cell."""
    if not ms:
        return "not measured"
    if not ms.get("valid"):
        return "not valid (calls failed in the memory step)"
    kind = "RSS" if ms["system"] == "pcproxy" else "PSS"
    return "%.1f KiB (%s +%s for %d pending; ramp slope %.1f KiB)" % (
        ms["per_pending_tx_bytes"] / 1024.0,
        kind,
        kb_mib(ms["growth_kB"]),
        ms["pending_at_peak"],
        (ms.get("ramp_slope_bytes_per_tx") or 0) / 1024.0,
    )


def table(a, runner):
    proxy = a.mode == "proxy"
    rate = "%g" % a.fixed_rate
    if proxy:
        hdr = (
            "| system | transport | max sustained calls/s (0 failures) | CPU s / 1000 calls @max "
            "| CPU s / 1000 calls @%s calls/s | INVITE→200 p50 / p99 µs @%g calls/s "
            "| BYE→200 p50 / p99 µs | SIPp saturated? | memory per pending INVITE transaction "
            "| pcproxy RSS (VmRSS; HWM) | notes |" % (rate, a.moderate_rate)
        )
    else:
        hdr = (
            "| system | transport | max sustained calls/s (0 failures) | CPU s / 1000 calls @max "
            "| CPU s / 1000 calls @%s calls/s | p50 / p99 µs @%g calls/s | SIPp saturated? "
            "| pcproxy RSS (VmRSS; HWM) | notes |" % (rate, a.moderate_rate)
        )
    ncol = hdr.count("|") - 1
    lines = [hdr, "|" + "---|" * ncol]
    mem = {m["when"]: m for m in runner.mem}
    ratios = []
    names = runner.sys_names
    for t in a.transports:
        before = mem.get("before %s load" % t if proxy else "before load", {})
        cpu_fixed = {}
        for system in runner.systems:
            res = runner.results.get((system, t))
            if res is None:
                why = (
                    "not run (budget)" if runner.error is None else "not run (stopped by an error)"
                )
                lines.append(
                    "| %s | %s | %s |%s" % (names[system], t.upper(), why, " |" * (ncol - 3))
                )
                continue
            s = res.get("search")
            g = (s or {}).get("at_max") or {}
            m = (s or {}).get("moderate") or {}
            if s is None:
                mx = "not measured"
            elif s.get("max_sustained_cps") is None:
                mx = "< %g" % (m.get("rate_offered") or a.moderate_rate)
            else:
                mx = "%d" % s["max_sustained_cps"]
                if s.get("ceiling_reached"):
                    mx = "≥ " + mx
            cpk = g.get("target_cpu_s_per_1k_calls")
            fc, fnote = fixed_cpu(a, res)
            cpu_fixed[system] = fc
            fcs = fmt_num(fc) + (" (%s)" % fnote if fnote else "")
            lats = m.get("latency_us") or {}
            ls = lat_str(lats.get("INVITE") or {}, m)
            if system == "pcproxy":
                after = mem.get("after %s search" % t) or mem.get("after %s fixed steps" % t) or {}
                rss = "%s before load → %s after %s (HWM %s)" % (
                    kb_mib(before.get("VmRSS_kB")),
                    kb_mib(after.get("VmRSS_kB")),
                    "search" if ("after %s search" % t) in mem else "fixed steps",
                    kb_mib(after.get("VmHWM_kB")),
                )
            else:
                rss = "—"
            if proxy:
                lines.append(
                    "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"
                    % (
                        names[system],
                        t.upper(),
                        mx,
                        fmt_num(cpk),
                        fcs,
                        ls,
                        lat_str(lats.get("BYE") or {}, m),
                        sipp_verdict(s),
                        mem_cell(runner.memsteps.get((system, t))),
                        rss,
                        failing_note(s),
                    )
                )
            else:
                lines.append(
                    "| %s | %s | %s | %s | %s | %s | %s | %s | %s |"
                    % (
                        names[system],
                        t.upper(),
                        mx,
                        fmt_num(cpk),
                        fcs,
                        ls,
                        sipp_verdict(s),
                        rss,
                        failing_note(s),
                    )
                )
        if len(runner.systems) < 2:
            continue
        if cpu_fixed.get("pcproxy") and cpu_fixed.get("kamailio"):
            p, k = cpu_fixed["pcproxy"], cpu_fixed["kamailio"]
            unsus = [
                sy
                for sy in runner.systems
                if any(not r.get("sustained") for r in fixed_steps(a, runner, sy, t))
            ]
            ratios.append(
                "%s: pcproxy / Kamailio CPU per call at %s calls/s = %.4f / %.4f s per "
                "1000 calls = **%.2f×** (≈ %d µs vs %d µs per call)%s"
                % (
                    t.upper(),
                    rate,
                    p,
                    k,
                    p / k,
                    round(p * 1000),
                    round(k * 1000),
                    unsustained_note(a, runner, t, unsus),
                )
            )
        else:
            ratios.append("%s: ratio not available (a fixed-rate step is missing)" % t.upper())
        common = common_sustained(runner, t)
        if common and common[0] != a.fixed_rate:
            r0, p, k = common
            ratios.append(
                "%s: same ratio at %g calls/s, the highest ladder rate both sustained: "
                "%.4f / %.4f = %.2f×" % (t.upper(), r0, p, k, p / k)
            )
    return "\n".join(lines), ratios


def side_notes(a, runner):
    """Proxy mode: SIPp's and the DNS server's CPU at the fixed rate."""
    out = []
    for t in a.transports:
        for system in runner.systems:
            steps = fixed_steps(a, runner, system, t)
            if not steps:
                continue
            sipp = [r.get("sipp_util_ss") for r in steps if r.get("sipp_util_ss") is not None]
            dns = [
                1000.0 * r["dns_cpu_s"] / r["calls_ok"]
                for r in steps
                if r.get("dns_cpu_s") is not None and r.get("calls_ok")
            ]
            out.append(
                "%s %s at %g calls/s: SIPp UAC+UAS %s cores (CPU %s); dnsmasq %s s per 1000 calls"
                % (
                    t.upper(),
                    runner.sys_names[system],
                    a.fixed_rate,
                    "%.2f" % statistics.mean(sipp) if sipp else "n/a",
                    a.pin_sipp,
                    "%.4f" % statistics.mean(dns) if dns else "n/a",
                )
            )
    return out


def unsustained_note(a, runner, transport, unsus):
    """What the ratio line says when a fixed step was not sustained."""
    if not unsus:
        return ""
    names = " and ".join(runner.sys_names[sy] for sy in unsus)
    if a.mode != "proxy":
        return (
            "; not sustained by %s at this rate (its CPU then includes retransmitted requests)"
            % names
        )
    bad = [
        (sy, r)
        for sy in unsus
        for r in fixed_steps(a, runner, sy, transport)
        if not r.get("sustained")
    ]
    why = [
        "%s: %s failed, %s retrans, p99 %s ms, other load %s cores"
        % (
            runner.sys_names[sy],
            r.get("calls_failed"),
            r.get("retransmissions"),
            r.get("rt_p99_ms_bucket"),
            r.get("other_busy_cores"),
        )
        for sy, r in bad
    ]
    retrans = any(r.get("retransmissions") for _, r in bad)
    return "; a fixed step was not sustained (%s)%s" % (
        "; ".join(why),
        ": its CPU includes retransmitted requests" if retrans else "",
    )


def git_dirty(paths):
    """`git status --porcelain` lines for these paths (empty: clean)."""
    try:
        cp = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--"] + list(paths),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            timeout=20,
        )
        return [ln.rstrip() for ln in cp.stdout.splitlines() if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        return None


def fixed_steps(a, runner, system, transport):
    """The steps at the fixed rate that fixed_cpu() used."""
    return [
        r
        for r in runner.steps
        if r.get("system") == system
        and str(r.get("transport", "")).startswith(transport)
        and r.get("rate_offered") == a.fixed_rate
        and (r.get("step_kind") == "fixed" or (a.quick and r.get("step_kind") == "ladder"))
    ]


def common_sustained(runner, transport):
    """(rate, pcproxy CPU s/1k, Kamailio CPU s/1k) at the highest ladder or
    fixed rate that both systems sustained, or None."""
    per = {}
    for system in ("pcproxy", "kamailio"):
        d = {}
        for r in runner.steps:
            if (
                r.get("system") == system
                and r.get("sustained")
                and str(r.get("transport", "")).startswith(transport)
                and r.get("step_kind") in ("ladder", "fixed")
                and r.get("target_cpu_s_per_1k_calls") is not None
            ):
                d.setdefault(r["rate_offered"], []).append(r["target_cpu_s_per_1k_calls"])
        per[system] = d
    both = set(per["pcproxy"]) & set(per["kamailio"])
    if not both:
        return None
    r0 = max(both)
    return (r0, statistics.mean(per["pcproxy"][r0]), statistics.mean(per["kamailio"][r0]))


# --------------------------------------------------------------------------
def main(mode, doc, argv=None):
    PROG[0] = "run-" + mode
    a = parse_args(mode, doc, argv)
    a.harness = os.path.abspath(a.harness)
    a.transports = [t.strip() for t in a.transports.split(",") if t.strip()]
    a.pcproxy = os.path.abspath(a.pcproxy)
    systems = ("pcproxy", "kamailio") if a.only == "both" else (a.only,)
    check_preconditions(a, systems)

    def on_term(signum, frame):
        raise SystemExit("%s: signal %d, stopping" % (PROG[0], signum))

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    runner = (ProxyRunner if mode == "proxy" else Runner)(a, systems)
    status = 0
    try:
        try:
            runner.run()
        except RuntimeError as e:
            log("error: %s" % runner.scrub.text(str(e)))
            runner.error = str(e)
            runner.record({"kind": "error", "error": str(e)})
            status = 1
        except KeyboardInterrupt:
            log("interrupted")
            status = 130
    finally:
        runner.finish()
        shutil.rmtree(runner.work, ignore_errors=True)

    elapsed = time.monotonic() - runner.t0
    tbl, ratios = table(a, runner)
    notes = side_notes(a, runner) if mode == "proxy" else []
    runner.record(
        {"kind": "end", "elapsed_s": round(elapsed, 1), "status": status, "ratios": ratios}
        | ({"notes": notes} if notes else {})
    )
    runner.outf.close()

    print()
    if mode == "proxy":
        print(
            "Proxy mode, %s; target(s) on CPU %s, SIPp client and pool on CPU %s; pool found "
            "through %s; %g s per step; fixed steps at %g calls/s x %d per system%s; "
            "total %.0f s of a %.0f s budget"
            % (
                "INVITE/100/180/200, ACK, %g s hold, BYE/200 through the proxy"
                % (a.pause_ms / 1000.0),
                a.pin_target,
                a.pin_sipp,
                "DNS SRV (dnsmasq)" if a.pool_dns == "srv" else "a static port (A record only)",
                a.step_s,
                a.fixed_rate,
                a.fixed_repeats,
                " (quick: the %g ladder step)" % a.start_rate if a.quick else "",
                elapsed,
                a.budget_s,
            )
        )
    else:
        print(
            "Redirect mode, %s; target(s) on CPU %s, SIPp on CPU %s; %g s per step; "
            "fixed steps at %g calls/s x %d per system%s; total %.0f s of a %.0f s budget"
            % (
                "INVITE → 302 → ACK",
                a.pin_target,
                a.pin_sipp,
                a.step_s,
                a.fixed_rate,
                a.fixed_repeats,
                " (quick: the 5000 ladder step)" if a.quick else "",
                elapsed,
                a.budget_s,
            )
        )
    print()
    print(tbl)
    print()
    for r in ratios:
        print(r)
    if notes:
        print()
        for n in notes:
            print(n)
    print("\nraw steps: %s" % rel_to_repo(runner.out))
    return status
