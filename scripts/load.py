#!/usr/bin/env python3
"""Load-test harness for tokenrelay: one command, loopback only, every step
bounded by a duration or a count. Python 3.11, standard library only.

    DURATION=10 python3 scripts/load.py

What it does (see the printed report, also target/load/report.md):
  1. installs what is missing (wrk, nginx, haproxy, openssl via apt-get) and
     builds tokenrelay --release (or takes TR_BIN);
  2. in a temp dir under target/load/run: a CA + a leaf for 127.0.0.1, an
     nginx TLS "acquirer" on :18443 answering 200 {"approved":true}, nginx as
     a plain reverse proxy on :18081, haproxy on :18082, tokenrelay on :18080
     (admin :19090) with a generated config; start-up time to ready and idle
     RSS of tokenrelay;
  3. provisions one network token and pre-mints single-use cryptogram
     references (http.client, keep-alive, a few threads);
  4. fixed rate (wrk + Lua delay() pacing) and closed loop (wrk) for direct /
     nginx / haproxy / tokenrelay forward (a fresh reference per request),
     wrk against token GET and cryptogram POST, binary size;
  5. raw JSON per step under target/load/, a markdown report;
  6. every process it started is stopped on exit, by PID, also on Ctrl-C,
     SIGTERM or an error.

Environment (defaults):
  DURATION=10           seconds per measured step
  WARMUP=2              seconds of warm-up at the fixed rate before each target
  RATE=2000             fixed-rate target, requests/s
  FIXED_THREADS=2 FIXED_CONNECTIONS=50
  CLOSED_THREADS=2 CLOSED_CONNECTIONS=32
  API_CONNECTIONS=32    wrk connections for token GET / cryptogram POST
                        (OHA_CONNECTIONS, its old name, is read too)
  MINT_THREADS=4        threads minting references
  CLOSED_POOL=          override the closed-loop reference pool size
  PROFILE=1             perf-record tokenrelay during its (first) closed-loop
                        run (target/load/profile.txt)
  QUICK=1               closed loop only, haproxy vs tokenrelay, no report
                        (for before/after comparisons while optimising)
  VAULT=memory          tokenrelay's vault: memory, or sqlite (the product
                        default, a file in the run dir)
  TR_LOG=info           tokenrelay's RUST_LOG
  TR_WORKERS=           tokenrelay's `workers` (unset: one per core); 1
                        compares it with nginx's 1 worker, haproxy's 1 thread
  TR_BIN=               a prebuilt tokenrelay binary (no cargo build)
  TR_BIN_BEFORE=        a second tokenrelay binary, run beside the first
                        (:18084, admin :19094) and measured in the same run:
                        "tokenrelay (before)" in every table
  ROUNDS=1              closed-loop runs of each tokenrelay binary; with
                        TR_BIN_BEFORE the binaries alternate (before first in
                        odd rounds, after first in even ones); the tables use
                        each binary's median round and list every round
  SKIP_INSTALL=0 SKIP_BUILD=0
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import math
import os
import re
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "load"

UP_PORT = 18443
NGINX_PORT = 18081
HAPROXY_PORT = 18082
TR_PORT = 18080
TR_ADMIN_PORT = 19090
TR_BEFORE_PORT = 18084
TR_BEFORE_ADMIN_PORT = 19094

CLK_TCK = os.sysconf("SC_CLK_TCK")

FWD_BODY = (
    '{"amount": "10.00", "currency": "EUR", "card": {"number": "<< number >>", '
    '"expiry_month": "<< expiry_month | unwrap >>", "expiry_year": "<< expiry_year | unwrap >>", '
    '"cryptogram": "<< cryptogram >>", "eci": "<< eci >>"}}'
)
CRYPTOGRAM_BODY = '{"type": "ecom", "mode": "reference", "amount": "10.00", "currency": "EUR"}'
PAN_SOURCE = '{"source": {"type": "pan", "number": "4111111111111111", "expiry_month": 12, "expiry_year": 2030}}'


class Fatal(Exception):
    """A step failed; the message says which and where to look."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived (SIGINT is KeyboardInterrupt)."""


def log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _env_positive(name: str, default: int, fallback: str | None = None) -> int:
    raw = os.environ.get(name) or (os.environ.get(fallback) if fallback else None) or str(default)
    if not raw.isdigit() or int(raw) <= 0:
        raise Fatal(f"{name} must be a positive integer (got '{raw}')")
    return int(raw)


def _env_optional_positive(name: str) -> int | None:
    raw = os.environ.get(name, "")
    return _env_positive(name, 1) if raw else None


def _env_binary(name: str) -> Path | None:
    raw = os.environ.get(name, "")
    if not raw:
        return None
    path = Path(raw).resolve()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise Fatal(f"{name}={raw} is not an executable file")
    return path


@dataclass(frozen=True)
class Settings:
    """Everything the environment sets, validated once at start."""

    duration: int
    warmup: int
    rate: int
    fixed_threads: int
    fixed_connections: int
    closed_threads: int
    closed_connections: int
    api_connections: int
    mint_threads: int
    closed_pool: int | None
    rounds: int
    profile: bool
    quick: bool
    vault: str
    tr_log: str
    tr_workers: int | None
    skip_install: bool
    skip_build: bool
    tr_bin: Path | None
    tr_bin_before: Path | None

    @classmethod
    def from_env(cls) -> Settings:
        vault = os.environ.get("VAULT", "memory")
        if vault not in ("sqlite", "memory"):
            raise Fatal("VAULT must be sqlite or memory")
        return cls(
            duration=_env_positive("DURATION", 10),
            warmup=_env_positive("WARMUP", 2),
            rate=_env_positive("RATE", 2000),
            fixed_threads=_env_positive("FIXED_THREADS", 2),
            fixed_connections=_env_positive("FIXED_CONNECTIONS", 50),
            closed_threads=_env_positive("CLOSED_THREADS", 2),
            closed_connections=_env_positive("CLOSED_CONNECTIONS", 32),
            api_connections=_env_positive("API_CONNECTIONS", 32, fallback="OHA_CONNECTIONS"),
            mint_threads=_env_positive("MINT_THREADS", 4),
            closed_pool=_env_optional_positive("CLOSED_POOL"),
            rounds=_env_positive("ROUNDS", 1),
            profile=_env_flag("PROFILE"),
            quick=_env_flag("QUICK"),
            vault=vault,
            tr_log=os.environ.get("TR_LOG", "info"),
            tr_workers=_env_optional_positive("TR_WORKERS"),
            skip_install=_env_flag("SKIP_INSTALL"),
            skip_build=_env_flag("SKIP_BUILD"),
            tr_bin=_env_binary("TR_BIN"),
            tr_bin_before=_env_binary("TR_BIN_BEFORE"),
        )


# ---------------------------------------------------------------------------
# /proc: process trees, CPU and RSS
# ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [0] state, [1] ppid, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def tree_pids(pid: int) -> list[int]:
    """The process and its direct children (nginx: master + worker)."""
    return [pid, *children_of(pid)]


def cpu_ticks(pids: list[int]) -> int:
    """User + system clock ticks of these processes (all their threads)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[int, int]:
    """(user, system) clock ticks of these processes (all their threads)."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def involuntary_switches(pids: list[int]) -> int:
    """Times the scheduler took the CPU from these processes' threads (each
    thread's nonvoluntary_ctxt_switches: preemptions, not waits)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def status_kib(pid: int, *keys: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB (VmRSS, RssAnon, RssFile)."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                found[key] = int(rest.split()[0])
    except OSError:
        pass
    return found


def rss_kib(pids: list[int]) -> int:
    return sum(status_kib(pid, "VmRSS").get("VmRSS", 0) for pid in pids)


def children_cpu_s() -> float:
    """User + system seconds of this process's waited-for children (wrk)."""
    t = os.times()
    return t.children_user + t.children_system


class RssSampler:
    """Max RSS of a process tree, sampled every 200 ms in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self._max = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_kib(self._pids))
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max_kib(self) -> int | None:
        return self._max or None


# ---------------------------------------------------------------------------
# Process bookkeeping: every process started goes through Processes, and
# stop_all() stops each by PID (also its direct children, e.g. nginx workers).
# ---------------------------------------------------------------------------


@dataclass
class Processes:
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], log_path: Path, *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "wb") as out:
            # Own session: a Ctrl-C reaches only this script, which then stops
            # everything in order instead of racing the children's handlers.
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one process now (and its direct children)."""
        self._stop([proc])
        self.started.remove(proc)

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait for a process that ends by itself (perf); stop it if it does not."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop([proc])
        self.started.remove(proc)

    def stop_all(self) -> None:
        if self.started:
            pids = [p.pid for p in self.started]
            self._stop(list(reversed(self.started)))
            log(f"stopped {len(pids)} processes ({' '.join(map(str, pids))})")
            self.started.clear()

    @staticmethod
    def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
        # Children are listed before their parent goes (they are reparented
        # after), with their start time, so a reused PID is never signalled.
        kids: list[tuple[int, str]] = []
        for proc in procs:
            if proc.poll() is None:
                for kid in children_of(proc.pid):
                    fields = _stat_fields(kid)
                    if fields:
                        kids.append((kid, fields[19]))
                try:
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for kid, started in kids:
            fields = _stat_fields(kid)
            if fields and fields[19] == started:
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------
# HTTP on loopback (http.client; no curl)
# ---------------------------------------------------------------------------


def fetch(method: str, url: str, *, body: str | None = None, headers: dict[str, str] | None = None,
          cafile: Path | None = None, timeout: float = 10) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, u.path or "/", body, headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def answers(url: str, cafile: Path | None = None) -> bool:
    try:
        status, _ = fetch("GET", url, cafile=cafile, timeout=1)
    except (OSError, http.client.HTTPException):
        return False
    return 200 <= status < 400


def wait_http(url: str, timeout_s: float, cafile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(url, cafile):
            return
        time.sleep(0.01)
    raise Fatal(f"{url} not answering after {timeout_s:.0f} s")


def listening_ports() -> set[int]:
    """Ports in LISTEN state on any address (what `ss -ltn` shows)."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A":
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


# ---------------------------------------------------------------------------
# 1. Tools and build
# ---------------------------------------------------------------------------


def install_tools(settings: Settings) -> None:
    wanted = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy", "openssl": "openssl"}
    if not settings.skip_install:
        missing = [pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None]
        if missing:
            log(f"installing: {' '.join(missing)}")
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            subprocess.run([*sudo, "apt-get", "update"], check=True)
            subprocess.run([*sudo, "apt-get", "install", "-y", *missing], check=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    for cmd in wanted:
        if shutil.which(cmd) is None:
            raise Fatal(f"{cmd} not found")


def tokenrelay_binary(settings: Settings) -> Path:
    if settings.tr_bin:
        log(f"TR_BIN: {settings.tr_bin}")
        return settings.tr_bin
    binary = ROOT / "target" / "release" / "tokenrelay"
    if not settings.skip_build:
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    if not os.access(binary, os.X_OK):
        raise Fatal(f"{binary} missing")
    return binary


def new_run_dir() -> Path:
    (OUT / "run").mkdir(parents=True, exist_ok=True)
    for old in [*OUT.glob("*.json"), OUT / "report.md"]:
        old.unlink(missing_ok=True)
    # Previous runs' scratch dirs (tokenrelay's per-request log alone is
    # ~1 GiB at DURATION=10).
    for old_run in (OUT / "run").iterdir():
        if old_run.is_dir():
            shutil.rmtree(old_run)
    run = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=OUT / "run"))
    run.chmod(0o755)
    log(f"run dir: {run}")
    return run


# ---------------------------------------------------------------------------
# 2. Certificates, upstream, proxies
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    leaf: Path
    key: Path


def make_certs(run: Path) -> Certs:
    log("certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=run, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=tokenrelay load-test CA",
            "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "leaf.key", "-out", "leaf.csr")
    (run / "leaf.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                  "extendedKeyUsage=serverAuth\n"
                                  "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "leaf.ext", "-out", "leaf.pem")
    for f in [*run.glob("*.pem"), *run.glob("*.key")]:
        f.chmod(0o644)
    return Certs(ca=run / "ca.pem", leaf=run / "leaf.pem", key=run / "leaf.key")


def _nginx_conf(prefix: Path, server: str, upstream: str = "") -> str:
    temp = "\n".join(f"    {k}_temp_path {prefix}/{d};" for k, d in
                     (("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                      ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    return f"""worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{upstream}{server}
}}
"""


def start_nginx(procs: Processes, prefix: Path, conf: str) -> subprocess.Popen[bytes]:
    (prefix / "logs").mkdir(parents=True)
    (prefix / "nginx.conf").write_text(conf)
    return procs.start(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                       prefix / "logs" / "stdout.log")


def start_upstream_nginx(procs: Processes, run: Path, certs: Certs) -> subprocess.Popen[bytes]:
    """The acquirer stand-in: nginx over TLS answering every request."""
    log(f"starting upstream nginx (TLS :{UP_PORT})")
    prefix = run / "nginx-up"
    server = f"""    server {{
        listen 127.0.0.1:{UP_PORT} ssl;
        ssl_certificate {certs.leaf};
        ssl_certificate_key {certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            default_type application/json;
            return 200 '{{"approved":true}}';
        }}
    }}"""
    return start_nginx(procs, prefix, _nginx_conf(prefix, server))


def start_nginx_proxy(procs: Processes, run: Path, certs: Certs) -> subprocess.Popen[bytes]:
    """nginx as a plain reverse proxy → https upstream, pooled, verified."""
    log(f"starting nginx reverse proxy (:{NGINX_PORT})")
    prefix = run / "nginx-proxy"
    upstream = f"""    upstream acquirer {{
        server 127.0.0.1:{UP_PORT};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
"""
    server = f"""    server {{
        listen 127.0.0.1:{NGINX_PORT};
        location / {{
            proxy_pass https://acquirer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {certs.ca};
            proxy_ssl_verify on;
            proxy_ssl_name 127.0.0.1;
            proxy_ssl_server_name off;
            proxy_ssl_session_reuse on;
        }}
    }}"""
    return start_nginx(procs, prefix, _nginx_conf(prefix, server, upstream))


def start_haproxy(procs: Processes, run: Path, certs: Certs) -> subprocess.Popen[bytes]:
    log(f"starting haproxy (:{HAPROXY_PORT})")
    cfg = run / "haproxy.cfg"
    cfg.write_text(f"""global
    nbthread 1
    maxconn 8000
    log stderr format raw local0 warning
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 300s
    http-reuse always
frontend fe
    bind 127.0.0.1:{HAPROXY_PORT}
    default_backend acquirer
backend acquirer
    server up 127.0.0.1:{UP_PORT} ssl verify required ca-file {certs.ca} verifyhost 127.0.0.1
""")
    if subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], timeout=30).returncode != 0:
        raise Fatal("haproxy config invalid")
    return procs.start(["haproxy", "-db", "-f", str(cfg)], run / "haproxy.log")


# ---------------------------------------------------------------------------
# tokenrelay: config, start-up, token, reference pools
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MintStats:
    requested: int
    minted: int
    unique: int
    seconds: float
    per_second: float
    threads: int
    failures: list[str]
    tokenrelay_rss_kib_after: int


@dataclass
class TokenRelay:
    """One running tokenrelay binary and what the run knows about it."""

    name: str  # target name in JSON file names: tokenrelay, tokenrelay_before
    label: str  # in the report: tokenrelay, tokenrelay (before)
    binary: Path
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    run: Path
    api_key: str
    startup: dict[str, Any]
    binary_info: dict[str, Any]
    token_id: str = ""

    @property
    def suffix(self) -> str:
        return self.name.removeprefix("tokenrelay")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def forward_url(self) -> str:
        return f"{self.api}/api/network/tokens/{self.token_id}/forward"

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise Fatal(f"{self.label} exited; see {self.run / 'tokenrelay.log'}")

    def provision(self) -> None:
        status, body = fetch("POST", f"{self.api}/api/network/tokens", body=PAN_SOURCE,
                             headers={"x-api-key": self.api_key, "content-type": "application/json"})
        if status // 100 != 2:
            raise Fatal(f"{self.label}: provisioning failed: {status} {body[:200]!r}")
        self.token_id = json.loads(body)["id"]
        log(f"{self.label}: token {self.token_id}")

    def mint(self, count: int, threads: int, label: str) -> tuple[list[str], MintStats]:
        """COUNT single-use cryptogram references, keep-alive, THREADS threads."""
        log(f"minting {count} references ({label}, {self.label})")
        path = f"/api/network/tokens/{self.token_id}/cryptograms"
        hdrs = {"x-api-key": self.api_key, "content-type": "application/json"}
        pat = re.compile(rb'"cryptogram_reference"\s*:\s*"([^"]+)"')
        deadline = time.monotonic() + 900
        results: list[list[str]] = [[] for _ in range(threads)]
        failures: list[str] = []

        def work(i: int, n: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                for _ in range(n):
                    if failures or time.monotonic() > deadline:
                        failures.append("stopped: another thread failed or 900 s passed")
                        return
                    conn.request("POST", path, CRYPTOGRAM_BODY, hdrs)
                    resp = conn.getresponse()
                    data = resp.read()
                    m = pat.search(data)
                    if resp.status != 201 or not m:
                        failures.append(f"{resp.status} {data[:200]!r}")
                        return
                    results[i].append(m.group(1).decode())
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
            finally:
                conn.close()

        t0 = time.monotonic()
        per = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
        workers = [threading.Thread(target=work, args=(i, per[i]), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        dt = time.monotonic() - t0
        refs = [r for part in results for r in part]
        stats = MintStats(requested=count, minted=len(refs), unique=len(set(refs)), seconds=round(dt, 2),
                          per_second=round(len(refs) / dt, 1) if dt else 0.0, threads=threads,
                          failures=failures[:5],
                          tokenrelay_rss_kib_after=rss_kib([self.proc.pid]))
        stats_file = OUT / f"mint_{label}{self.suffix}.json"
        write_json(stats_file, asdict(stats))
        if failures or stats.unique != count:
            raise Fatal(f"minting failed: {failures[:5]}; see {stats_file}")
        log(f"  {stats.minted} in {stats.seconds} s ({stats.per_second}/s)")
        return refs, stats

    def sanity(self, ref: str) -> None:
        """One forward end to end, then the same reference again must be 409."""
        hdrs = {"x-api-key": self.api_key, "content-type": "application/json",
                "x-cryptogram-reference": ref, "x-destination-url": destination_url()}
        s1, b1 = fetch("POST", self.forward_url, body=FWD_BODY, headers=hdrs)
        s2, b2 = fetch("POST", self.forward_url, body=FWD_BODY, headers=hdrs)
        log(f"sanity ({self.label}): forward → {s1} {b1.decode(errors='replace')}; "
            f"replay → {s2} {b2.decode(errors='replace')}")
        if (s1, s2) != (200, 409):
            raise Fatal("sanity forward failed (expected 200 then 409)")


def destination_url() -> str:
    return f"https://127.0.0.1:{UP_PORT}/v1/authorizations"


def tokenrelay_config(settings: Settings, run: Path, port: int, admin_port: int, key_hash: str, ca: Path) -> str:
    workers = f"workers = {settings.tr_workers}\n" if settings.tr_workers else ""
    vault_path = f'path = "{run / "vault.db"}"\n' if settings.vault == "sqlite" else ""
    return f"""# Generated by scripts/load.py
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
compliance_level = "saq-d"
reference_ttl = "1h"
cvc_ttl = "15m"
max_body_bytes = 1048576
placeholder_syntax = "angle"
idempotency_ttl = "24h"
max_connections = 4096
header_read_timeout = "10s"
shutdown_grace = "5s"
tsp = "sandbox"
{workers}
[[api_keys]]
name = "load-test"
hash = "{key_hash}"
scopes = ["tokens", "cryptograms", "forward"]

[vault]
backend = "{settings.vault}"
{vault_path}
[references]
backend = "memory"
max_entries = 50000000

[upstream]
connect_timeout = "5s"
response_timeout = "30s"
pool_idle_timeout = "90s"
pool_max_idle_per_host = 64

[[destinations]]
host = "127.0.0.1"
port = {UP_PORT}
scheme = "https"
allow_private = true
ca_file = "{ca}"
"""


def binary_info(binary: Path, run: Path) -> dict[str, Any]:
    """Size as built (profile.release keeps line tables) and stripped."""
    size = binary.stat().st_size
    info: dict[str, Any] = {"path": str(binary), "bytes": size, "mib": round(size / 1048576, 2)}
    if shutil.which("strip"):
        copy = run / "tokenrelay.stripped"
        shutil.copyfile(binary, copy)
        if subprocess.run(["strip", str(copy)], timeout=60).returncode == 0:
            info["stripped_bytes"] = copy.stat().st_size
            info["stripped_mib"] = round(info["stripped_bytes"] / 1048576, 2)
        copy.unlink()
    return info


def start_tokenrelay(procs: Processes, settings: Settings, root_run: Path, certs: Certs, binary: Path,
                     name: str, label: str, port: int, admin_port: int, *, launcher: list[str] | None = None,
                     ready_timeout_s: float = 30) -> TokenRelay:
    """Config, start-up and readiness of one binary. LAUNCHER (e.g. valgrind
    and its options) is put before the `serve` command line only."""
    run = root_run if name == "tokenrelay" else root_run / name
    run.mkdir(exist_ok=True)
    api_key = "load-" + secrets.token_hex(24)
    hashed = subprocess.run([str(binary), "hash-key"], input=api_key.encode(), capture_output=True,
                            check=True, timeout=30)
    conf = run / "tokenrelay.toml"
    conf.write_text(tokenrelay_config(settings, run, port, admin_port, hashed.stdout.decode().strip(), certs.ca))
    env = {**os.environ, "TOKENRELAY_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
           "RUST_LOG": settings.tr_log}
    # With the master key: a SQLite vault's check needs it.
    check = subprocess.run([str(binary), "check-config", "--config", str(conf)], stdout=subprocess.DEVNULL,
                           env=env, timeout=30)
    if check.returncode != 0:
        raise Fatal(f"generated tokenrelay config rejected ({conf})")

    log(f"starting {label} (:{port}, admin :{admin_port})")
    t0 = time.monotonic_ns()
    proc = procs.start([*(launcher or []), str(binary), "serve", "--config", str(conf)], run / "tokenrelay.log",
                       cwd=run, env=env)
    readyz = f"http://127.0.0.1:{admin_port}/readyz"
    while not answers(readyz):  # every 10 ms, ≤ ready_timeout_s
        if proc.poll() is not None:
            raise Fatal(f"{label} exited; see {run / 'tokenrelay.log'}")
        if time.monotonic_ns() - t0 > ready_timeout_s * 1e9:
            raise Fatal(f"{label} not ready after {ready_timeout_s:.0f} s")
        time.sleep(0.01)
    startup_ms = (time.monotonic_ns() - t0) // 1_000_000
    time.sleep(1)
    # RSS counts the binary's clean, shared file pages too (on this kernel the
    # page cache maps them in large folios: ~10 MiB of a 12 MiB text); the
    # process's own memory is the anonymous part.
    st = status_kib(proc.pid, "VmRSS", "RssAnon", "RssFile")
    startup = {"startup_to_ready_ms": startup_ms, "idle_rss_kib": st.get("VmRSS", 0),
               "idle_rss_anon_kib": st.get("RssAnon", 0), "idle_rss_file_kib": st.get("RssFile", 0),
               "method": "spawn → first GET /readyz 200 (http.client every 10 ms); VmRSS, RssAnon, RssFile "
                         "from /proc/<pid>/status 1 s after ready"}
    log(f"{label} ready in {startup_ms} ms, idle RSS {startup['idle_rss_kib']} KiB "
        f"(anonymous {startup['idle_rss_anon_kib']}, file {startup['idle_rss_file_kib']})")
    suffix = name.removeprefix("tokenrelay")
    info = binary_info(binary, run)
    write_json(OUT / f"binary{suffix}.json", info)
    write_json(OUT / f"startup{suffix}.json", startup)
    return TokenRelay(name=name, label=label, binary=binary, port=port, admin_port=admin_port, proc=proc,
                      run=run, api_key=api_key, startup=startup, binary_info=info)


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_total_kib": mem_kib,
            "mem_total_gib": round(mem_kib / 1048576, 1), "kernel": os.uname().release,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


# ---------------------------------------------------------------------------
# 4. wrk driver
# ---------------------------------------------------------------------------

WRK_LUA = r"""
-- One script for every target. Environment:
--   WRK_METHOD/WRK_BODY/WRK_HEADERS (k: v lines), WRK_THREADS
--   WRK_DELAY_MS   if set: delay() pacing, uniform in [0.5, 1.5] × this
--   REF_FILE, REF_COUNT  if set: request() takes the next reference from this
--                        thread's disjoint slice of the pool file
--   WRK_STATIC=1   the same request every time, formatted once (API endpoints)
local function env(name)
  local v = os.getenv(name)
  if v == "" then return nil end
  return v
end
local threads, nthreads = {}, 0
local wanted = tonumber(env("WRK_THREADS") or "1")
local ref_file = env("REF_FILE")
local ref_count = tonumber(env("REF_COUNT") or "0")
local delay_ms = tonumber(env("WRK_DELAY_MS") or "")

wrk.method = env("WRK_METHOD") or "POST"
wrk.body = env("WRK_BODY")
for line in (os.getenv("WRK_HEADERS") or ""):gmatch("[^\n]+") do
  local k, v = line:match("^([^:]+):%s*(.*)$")
  if k then wrk.headers[k] = v end
end

function setup(thread)
  local per = math.floor(ref_count / wanted)
  thread:set("tid", nthreads)
  thread:set("offset", nthreads * per)
  thread:set("slice", per)
  table.insert(threads, thread)
  nthreads = nthreads + 1
end

statuses = {}
exhausted = 0
used = 0
local refs, idx = {}, 0

function init(args)
  math.randomseed(os.time() + (tid or 0) * 7919)
  if ref_file then
    local i, n = 0, 0
    for line in io.lines(ref_file) do
      if i >= offset + slice then break end
      if i >= offset and #line > 0 then n = n + 1; refs[n] = line end
      i = i + 1
    end
  end
end

if delay_ms then
  function delay()
    return math.floor(delay_ms * (0.5 + math.random()) + 0.5)
  end
end

-- Every forward target gets a request built per request with a fresh
-- x-cryptogram-reference, so the generator (on the same cores) does the
-- same work whichever server it measures: the plain proxies get a
-- placeholder of the same length, which they pass through.
if env("WRK_STATIC") == "1" then
  local req
  function request()
    req = req or wrk.format(nil, nil, nil, nil)
    return req
  end
else
  function request()
    idx = idx + 1
    local r
    if ref_file then
      r = refs[idx]
      if r == nil then
        -- Pool slice exhausted: never reuse a reference. Flag and stop.
        exhausted = exhausted + 1
        r = "cref_pool_exhausted"
        wrk.thread:stop()
      else
        used = used + 1
      end
    else
      r = string.format("cref_%043d", idx)
    end
    wrk.headers["x-cryptogram-reference"] = r
    return wrk.format(nil, nil, nil, nil)
  end
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local st, ex, us = {}, 0, 0
  for _, t in ipairs(threads) do
    local s = t:get("statuses") or {}
    for k, v in pairs(s) do st[tostring(k)] = (st[tostring(k)] or 0) + v end
    ex = ex + (t:get("exhausted") or 0)
    us = us + (t:get("used") or 0)
  end
  local parts = {}
  for k, v in pairs(st) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status_ge_400":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99_9":%d},' ..
    '"statuses":{%s},"refs_used":%d,"pool_exhausted":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    table.concat(parts, ","), us, ex))
end
"""


@dataclass(frozen=True)
class Target:
    """Something wrk measures: a URL, the headers to send, the server's PID."""

    name: str
    url: str
    headers: str  # "k: v" lines
    server_pid: int
    method: str = "POST"
    body: str = FWD_BODY
    static: bool = False  # the same request every time (no x-cryptogram-reference)


@dataclass
class WrkRun:
    """One wrk step; to_json() is the raw JSON written under target/load/."""

    name: str
    target: str
    mode: str  # fixed | warm | closed | api
    threads: int
    connections: int
    duration_s: int
    requests: int
    duration_us: int
    bytes: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    statuses: dict[str, int]
    refs_used: int
    pool_exhausted: int
    rps: float
    non_2xx: int
    socket_errors: int
    rss_max_kib: int | None
    cpu_us_per_request: float
    upstream_cpu_us_per_request: float
    generator_cpu_us_per_request: float
    server_user_us_per_request: float
    server_system_us_per_request: float
    server_preemptions_per_request: float
    command: str
    wrk_stdout: str
    rss_of: str = "server process + direct children (/proc/<pid>/status VmRSS, every 200 ms)"
    target_rps: int | None = None
    pacing: str | None = None
    request: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "rss_max_kib"}

    def summary(self) -> str:
        lat = self.latency_us
        return (f"{self.rps:>9} req/s  p50 {lat['p50']:.0f} us  p99 {lat['p99']:.0f} us  "
                f"cpu {self.cpu_us_per_request} us/req (user {self.server_user_us_per_request}, "
                f"sys {self.server_system_us_per_request}, preempted {self.server_preemptions_per_request}/req; "
                f"upstream {self.upstream_cpu_us_per_request}, "
                f"wrk {self.generator_cpu_us_per_request})  non-2xx {self.non_2xx}  "
                f"socket errors {self.socket_errors}  statuses {self.statuses}"
                + (f"  pool_exhausted {self.pool_exhausted}" if self.pool_exhausted else ""))


@dataclass
class Wrk:
    settings: Settings
    run_dir: Path
    upstream_pid: int
    script: Path = field(init=False)

    def __post_init__(self) -> None:
        self.script = self.run_dir / "wrk.lua"
        self.script.write_text(WRK_LUA)

    def run(self, name: str, target: Target, mode: str, threads: int, connections: int, duration: int,
            refs: list[str] | None = None) -> WrkRun:
        delay = round(connections * 1000 / self.settings.rate, 3) if mode in ("fixed", "warm") else None
        ref_file = ""
        if refs is not None:
            ref_file = str(self.run_dir / f"refs_{name}.txt")
            Path(ref_file).write_text("\n".join(refs) + "\n")
        env = {**os.environ, "WRK_THREADS": str(threads), "WRK_METHOD": target.method, "WRK_BODY": target.body,
               "WRK_HEADERS": target.headers, "WRK_DELAY_MS": "" if delay is None else str(delay),
               "REF_FILE": ref_file, "REF_COUNT": str(len(refs) if refs is not None else 0),
               "WRK_STATIC": "1" if target.static else ""}
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
               "-s", str(self.script), target.url]
        server = tree_pids(target.server_pid)
        upstream = tree_pids(self.upstream_pid)
        with RssSampler(server) as rss:
            split0, pre0 = cpu_split(server), involuntary_switches(server)
            cpu0, up0, gen0 = sum(split0), cpu_ticks(upstream), children_cpu_s()
            try:
                done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      timeout=duration + 30)
            except subprocess.TimeoutExpired as e:
                raise Fatal(f"wrk {name} did not finish in {duration + 30} s") from e
            split1, pre1 = cpu_split(server), involuntary_switches(server)
            cpu1, up1, gen1 = sum(split1), cpu_ticks(upstream), children_cpu_s()
        out = done.stdout.decode(errors="replace")
        (self.run_dir / f"wrk_{name}.txt").write_text(out)
        line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
        if done.returncode != 0 or line is None:
            print(out, file=sys.stderr)
            raise Fatal(f"wrk {name} failed")
        r = json.loads(line.removeprefix("WRKJSON "))
        n = max(r["requests"], 1)

        def per_request(ticks: int) -> float:
            return round(ticks / CLK_TCK * 1e6 / n, 1)

        result = WrkRun(
            name=name, target=target.name, mode=mode, threads=threads, connections=connections,
            duration_s=duration, requests=r["requests"], duration_us=r["duration_us"], bytes=r["bytes"],
            errors=r["errors"], latency_us=r["latency_us"], statuses=r["statuses"], refs_used=r["refs_used"],
            pool_exhausted=r["pool_exhausted"], rps=round(r["requests"] / (r["duration_us"] / 1e6), 1),
            non_2xx=sum(v for k, v in r["statuses"].items() if not k.startswith("2")),
            socket_errors=sum(v for k, v in r["errors"].items() if k != "status_ge_400"),
            rss_max_kib=rss.max_kib,
            # CPU per request from /proc/<pid>/stat (user + system): the
            # measured server and, behind every proxy, the upstream nginx; the
            # generator is wrk, a child of this script, with its Lua.
            cpu_us_per_request=per_request(cpu1 - cpu0), upstream_cpu_us_per_request=per_request(up1 - up0),
            generator_cpu_us_per_request=round((gen1 - gen0) * 1e6 / n, 1),
            # The server's split: user and system time, and how often the
            # scheduler preempted one of its threads.
            server_user_us_per_request=per_request(split1[0] - split0[0]),
            server_system_us_per_request=per_request(split1[1] - split0[1]),
            server_preemptions_per_request=round((pre1 - pre0) / n, 2),
            command=" ".join(cmd), wrk_stdout=out)
        if mode == "fixed":
            result.target_rps = self.settings.rate
            result.pacing = (f"wrk delay() per connection, uniform in [0.5,1.5] x {delay} ms "
                             "(= connections*1000/RATE); NOT a coordinated-omission-corrected generator")
        if mode == "api":
            result.request = f"{target.method} {target.url}"
        write_json(OUT / f"{name}.json", result.to_json())
        log("  " + result.summary())
        return result


# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------


@dataclass
class Results:
    fixed: dict[str, WrkRun] = field(default_factory=dict)
    warm: dict[str, WrkRun] = field(default_factory=dict)
    closed: dict[str, WrkRun] = field(default_factory=dict)  # baselines
    rounds: dict[str, list[WrkRun]] = field(default_factory=dict)  # tokenrelay closed loop, per round
    api: dict[str, WrkRun] = field(default_factory=dict)
    mint_fixed: dict[str, MintStats] = field(default_factory=dict)
    mint_closed: dict[str, list[MintStats]] = field(default_factory=dict)
    after: dict[str, dict[str, Any]] = field(default_factory=dict)

    def closed_median(self, relay: str) -> WrkRun:
        runs = sorted(self.rounds[relay], key=lambda r: r.rps)
        return runs[(len(runs) - 1) // 2]


@dataclass
class Harness:
    procs: Processes
    settings: Settings
    run_dir: Path
    wrk: Wrk
    baselines: dict[str, Target]  # direct, nginx, haproxy
    relays: list[TokenRelay]  # the before binary first when there is one
    results: Results = field(default_factory=Results)

    def relay_target(self, relay: TokenRelay) -> Target:
        headers = (f"content-type: application/json\nx-api-key: {relay.api_key}\n"
                   f"x-destination-url: {destination_url()}")
        return Target(name=relay.name, url=relay.forward_url, headers=headers, server_pid=relay.proc.pid)

    def closed_round_order(self, r: int) -> list[TokenRelay]:
        """Binaries alternate: before first in odd rounds (1, 3, …), after first in even ones."""
        return self.relays if r % 2 == 0 else list(reversed(self.relays))

    def closed_tokenrelay(self, baselines: list[str]) -> None:
        """Closed loop against each tokenrelay, ROUNDS times, a fresh reference
        per request, perf-recorded (main binary, first round) when PROFILE=1.

        The pool (unless CLOSED_POOL is set): 1.2 × the best closed-loop rate
        of the baselines × DURATION, + slack (tokenrelay does strictly more
        work per request than those proxies on the same cores). Should it
        still run dry, wrk stops that thread rather than reuse a reference and
        the report says "pool exhausted"."""
        s = self.settings
        best = max(self.results.closed[b].rps for b in baselines)
        pool = s.closed_pool or math.ceil(best * 1.2 * s.duration) + 5000
        for r in range(s.rounds):
            for relay in self.closed_round_order(r):
                tag = f"_r{r + 1}" if s.rounds > 1 else ""
                refs, stats = relay.mint(pool, s.mint_threads, f"closed{tag}")
                self.results.mint_closed.setdefault(relay.name, []).append(stats)
                log(f"  {relay.label} (closed{', round ' + str(r + 1) if s.rounds > 1 else ''})")
                profile = s.profile and r == 0 and relay.name == "tokenrelay"
                perf = self.start_perf(relay) if profile else None
                run = self.wrk.run(f"closed_{relay.name}{tag}", self.relay_target(relay), "closed",
                                   s.closed_threads, s.closed_connections, s.duration, refs)
                self.results.rounds.setdefault(relay.name, []).append(run)
                if perf:
                    self.finish_perf(perf)

    def start_perf(self, relay: TokenRelay) -> subprocess.Popen[bytes] | None:
        if shutil.which("perf") is None:
            log("  PROFILE=1 but perf is not installed: no profile")
            return None
        # Software clock sampling (hardware counters are not always available).
        return self.procs.start(["perf", "record", "-e", "cpu-clock", "-F", "499", "-g", "-p", str(relay.proc.pid),
                                 "-o", str(OUT / "perf.data"), "--", "sleep", str(self.settings.duration)],
                                self.run_dir / "perf.log")

    def finish_perf(self, perf: subprocess.Popen[bytes]) -> None:
        self.procs.wait(perf, timeout=60)
        with open(OUT / "profile.txt", "wb") as out:
            subprocess.run(["perf", "report", "-i", str(OUT / "perf.data"), "--stdio", "--no-children",
                            "--sort", "symbol", "--percent-limit", "1"], stdout=out, stderr=subprocess.DEVNULL,
                           timeout=300)
        log(f"  profile of the closed-loop forward: {OUT / 'profile.txt'}")

    def fixed_rate(self, warm_refs: dict[str, list[str]], run_refs: dict[str, list[str]]) -> None:
        s = self.settings
        log(f"fixed rate: {s.rate} rps, {s.fixed_threads} threads × {s.fixed_connections} connections, "
            f"{s.duration}s each (+{s.warmup}s warm-up)")
        targets = [*self.baselines.values(), *(self.relay_target(r) for r in self.relays)]
        for t in targets:
            log(f"  {t.name} (warm-up {s.warmup}s)")
            self.results.warm[t.name] = self.wrk.run(f"warm_{t.name}", t, "warm", s.fixed_threads,
                                                     s.fixed_connections, s.warmup, warm_refs.get(t.name))
            log(f"  {t.name} (fixed)")
            self.results.fixed[t.name] = self.wrk.run(f"fixed_{t.name}", t, "fixed", s.fixed_threads,
                                                      s.fixed_connections, s.duration, run_refs.get(t.name))

    def closed_baselines(self, names: list[str]) -> None:
        s = self.settings
        for name in names:
            log(f"  {name} (closed)")
            self.results.closed[name] = self.wrk.run(f"closed_{name}", self.baselines[name], "closed",
                                                     s.closed_threads, s.closed_connections, s.duration)

    def api(self) -> None:
        """Token GET and cryptogram POST (reference mode): closed loop, fixed headers."""
        s = self.settings
        for relay in self.relays:
            hdrs = f"x-api-key: {relay.api_key}\ncontent-type: application/json"
            token = f"{relay.api}/api/network/tokens/{relay.token_id}"
            for name, what, target in (
                ("get_token", "GET token details",
                 Target(name=relay.name, url=token, headers=hdrs, server_pid=relay.proc.pid, method="GET",
                        body="", static=True)),
                ("cryptogram", "POST cryptogram (reference mode)",
                 Target(name=relay.name, url=f"{token}/cryptograms", headers=hdrs, server_pid=relay.proc.pid,
                        body=CRYPTOGRAM_BODY, static=True)),
            ):
                log(f"wrk: {what} ({relay.label})")
                self.results.api[f"{name}{relay.suffix}"] = self.wrk.run(
                    f"{name}{relay.suffix}", target, "api", s.closed_threads, s.api_connections, s.duration)

    def collect_after(self) -> None:
        for relay in self.relays:
            relay.alive()
            rss = rss_kib([relay.proc.pid])
            try:
                _, metrics_text = fetch("GET", f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=5)
            except (OSError, http.client.HTTPException):
                metrics_text = b""
            (relay.run / "metrics.txt").write_bytes(metrics_text)
            after = tokenrelay_after(relay, rss, metrics_text.decode(errors="replace"))
            write_json(OUT / f"{relay.name}_after.json", after)
            self.results.after[relay.name] = after


def tokenrelay_after(relay: TokenRelay, rss: int, metrics_text: str) -> dict[str, Any]:
    log_file = relay.run / "tokenrelay.log"
    level = re.compile(r'"level"\s*:\s*"([^"]*)"')
    levels: dict[str, int] = {}
    lines = 0
    with open(log_file, errors="replace") as f:
        for line in f:
            lines += 1
            m = level.search(line) if line.startswith("{") else None
            if m:
                lv = m.group(1)
            else:
                try:
                    lv = json.loads(line).get("level", "?")
                except (ValueError, AttributeError):
                    lv = "non-json"
            levels[lv] = levels.get(lv, 0) + 1
    metrics: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or "_bucket" in line or not line.strip():
            continue
        k, v = line.rsplit(" ", 1)
        metrics[k] = float(v)
    return {"rss_kib_after_all_steps": rss, "log_lines": lines, "log_bytes": log_file.stat().st_size,
            "log_levels": levels, "run_dir": str(relay.run), "metrics": metrics}


# ---------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f}" if kib else "—"


def rounds_table(h: Harness) -> list[str]:
    """Every closed-loop round of every binary, and after/before per round."""
    res, relays = h.results, h.relays
    lines = ["| round | binary | req/s | p50 ms | p99 ms | server CPU µs/req | user / sys µs/req | preempted /req "
             "| non-2xx | pool exhausted |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in range(h.settings.rounds):
        for relay in h.closed_round_order(r):
            run = res.rounds[relay.name][r]
            lines.append(f"| {r + 1} | {relay.label} | {run.rps:.0f} | {_ms(run.latency_us['p50'])} | "
                         f"{_ms(run.latency_us['p99'])} | {run.cpu_us_per_request} | "
                         f"{run.server_user_us_per_request} / {run.server_system_us_per_request} | "
                         f"{run.server_preemptions_per_request} | {run.non_2xx} | "
                         f"{run.pool_exhausted} |")
    if len(relays) == 2:
        before, after = (res.rounds[r.name] for r in relays)
        rps = [a.rps / b.rps for a, b in zip(after, before)]
        cpu = [a.cpu_us_per_request / b.cpu_us_per_request for a, b in zip(after, before) if b.cpu_us_per_request]
        lines.append("")
        lines.append(f"after / before, median of {len(rps)} round(s): req/s {statistics.median(rps):.3f}× "
                     f"(rounds: {', '.join(f'{x:.3f}' for x in rps)})"
                     + (f"; server CPU µs/req {statistics.median(cpu):.3f}×" if cpu else ""))
    return lines


def quick_summary(h: Harness) -> str:
    hp = h.results.closed["haproxy"]
    lines = []
    for relay in h.relays:
        t = h.results.closed_median(relay.name)
        lines.append(f"QUICK closed loop: haproxy {hp.rps:.0f} req/s, {relay.label} {t.rps:.0f} req/s = "
                     f"{t.rps / hp.rps:.2f}x (p50 {t.latency_us['p50']:.0f} us, non-2xx {t.non_2xx}, "
                     f"{t.cpu_us_per_request} us CPU/req)")
    if h.settings.rounds > 1 or len(h.relays) > 1:
        lines.extend(rounds_table(h))
    return "\n".join(lines)


def report(h: Harness, machine: dict[str, Any]) -> str:
    s, res = h.settings, h.results
    out: list[str] = []
    p = out.append
    p(f"# tokenrelay load test — {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    p(f"**Machine:** nproc {machine['nproc']}, {machine['cpu_model']}, {machine['mem_total_gib']} GiB RAM, "
      f"kernel {machine['kernel']}, load avg at start {' '.join(machine['loadavg_at_start'])} "
      "(shared machine: numbers are noisy). Load generator, upstream and proxies all share these cores.\n")
    relay_desc = "; ".join(f"{r.label}: `{r.binary}`" for r in h.relays)
    p("Upstream: nginx (1 worker, TLS, keep-alive) answering `200 {\"approved\":true}` on 127.0.0.1:18443. "
      "Every request is the same POST with a JSON body holding `<< placeholders >>` (rendered by tokenrelay only). "
      "nginx proxy: 1 worker, keep-alive pool 64, proxy_ssl_verify on. haproxy 2.6: nbthread 1, http-reuse always, "
      f"ssl verify required. tokenrelay: {s.vault} vault, memory references, RUST_LOG={s.tr_log} "
      "(at info: one JSON line per request, to a file)"
      + (f", workers = {s.tr_workers}" if s.tr_workers else "") + f". Binaries: {relay_desc}.\n")

    p(f"## Fixed rate — target {s.rate} req/s, {s.duration} s (after {s.warmup} s warm-up), "
      f"wrk -t{s.fixed_threads} -c{s.fixed_connections}\n")
    p("Paced with wrk's Lua `delay()` (per-connection delay = connections×1000/RATE ms, jittered uniformly "
      "×[0.5,1.5]); latency is measured from request write to response, so this is **not** a "
      "coordinated-omission-corrected generator (wrk2/oha -q style): stalls delay the next send instead of "
      "counting as latency. tokenrelay: a fresh pre-minted reference per request.\n")
    p("| target | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | added p50 ms | added p90 ms "
      "| added p99 ms | non-2xx | socket errors | max RSS MiB |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {**{n: n for n in h.baselines}, **{r.name: r.label for r in h.relays}}
    d0 = res.fixed["direct"].latency_us
    for name, r in res.fixed.items():
        lat = r.latency_us

        def add(pct: str) -> str:
            return "—" if name == "direct" else f"{(lat[pct] - d0[pct]) / 1000:+.2f}"

        extra = f" (409: {r.statuses.get('409', 0)})" if name.startswith("tokenrelay") else ""
        p(f"| {labels[name]} | {r.rps:.0f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | "
          f"{_ms(lat['p99_9'])} | {_ms(lat['max'])} | {add('p50')} | {add('p90')} | {add('p99')} | "
          f"{r.non_2xx}{extra} | {r.socket_errors} | {_mib(r.rss_max_kib)} |")

    rounds_note = f", median of {s.rounds} rounds for tokenrelay" if s.rounds > 1 else ""
    p(f"\n## Closed loop — wrk -t{s.closed_threads} -c{s.closed_connections}, {s.duration} s{rounds_note}\n")
    p("| target | req/s | vs nginx | vs haproxy | p50 ms | p99 ms | non-2xx | socket errors | max RSS MiB "
      "| server CPU µs/req | user / sys µs/req | preempted /req | upstream µs/req | wrk µs/req |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    closed = {**res.closed, **{r.name: res.closed_median(r.name) for r in h.relays}}
    ng, hp = closed["nginx"].rps, closed["haproxy"].rps
    for name, r in closed.items():
        lat = r.latency_us
        extra = (f" (409: {r.statuses.get('409', 0)}, pool exhausted: {r.pool_exhausted})"
                 if name.startswith("tokenrelay") else "")
        up = "—" if name == "direct" else r.upstream_cpu_us_per_request
        p(f"| {labels[name]} | {r.rps:.0f} | {r.rps / ng:.2f}× | {r.rps / hp:.2f}× | {_ms(lat['p50'])} | "
          f"{_ms(lat['p99'])} | {r.non_2xx}{extra} | {r.socket_errors} | {_mib(r.rss_max_kib)} "
          f"| {r.cpu_us_per_request} | {r.server_user_us_per_request} / {r.server_system_us_per_request} "
          f"| {r.server_preemptions_per_request} | {up} | {r.generator_cpu_us_per_request} |")
    p("\nRSS = server process + direct children (nginx master+worker), sampled every 200 ms; 'direct' = the "
      "upstream nginx. CPU = user + system time from /proc/<pid>/stat over the run, per request answered: the "
      "server measured, the upstream nginx behind it, and wrk. Preempted = the server's threads' "
      "nonvoluntary_ctxt_switches (/proc/<pid>/task/*/status) per request: the scheduler taking its CPU "
      "away, mostly to a process its own write just woke.\n")
    if s.rounds > 1 or len(h.relays) > 1:
        p("### tokenrelay closed-loop rounds\n")
        out.extend(rounds_table(h))
        p("")

    p(f"## tokenrelay API — wrk -t{s.closed_threads} -c{s.api_connections} -d {s.duration}s (fixed headers)\n")
    p("| request | binary | req/s | p50 ms | p99 ms | non-2xx | socket errors | server CPU µs/req |")
    p("|---|---|---:|---:|---:|---:|---:|---:|")
    for relay in h.relays:
        for n, label in (("get_token", "GET /api/network/tokens/{id}"),
                         ("cryptogram", "POST …/cryptograms (reference)")):
            r = res.api[f"{n}{relay.suffix}"]
            p(f"| {label} | {relay.label} | {r.rps:.0f} | {_ms(r.latency_us['p50'])} | {_ms(r.latency_us['p99'])} "
              f"| {r.non_2xx} | {r.socket_errors} | {r.cpu_us_per_request} |")

    p("\n## tokenrelay process\n")
    p("| metric | " + " | ".join(r.label for r in h.relays) + " |")
    p("|---|" + "---:|" * len(h.relays))

    def row(metric: str, value: Callable[[TokenRelay], str]) -> None:
        p(f"| {metric} | " + " | ".join(value(r) for r in h.relays) + " |")

    def stripped(b: dict[str, Any]) -> str:
        return f"{b['stripped_bytes']} B ({b['stripped_mib']} MiB)" if "stripped_bytes" in b else "—"

    row("start-up to ready (spawn → /readyz 200)", lambda r: f"{r.startup['startup_to_ready_ms']} ms")
    row("idle RSS after start",
        lambda r: f"{r.startup['idle_rss_kib'] / 1024:.1f} MiB ({r.startup['idle_rss_kib']} KiB)")
    row("of which anonymous / file-backed (binary text, shared page cache)",
        lambda r: f"{r.startup['idle_rss_anon_kib'] / 1024:.1f} / {r.startup['idle_rss_file_kib'] / 1024:.1f} MiB")
    row("max RSS, fixed rate", lambda r: f"{_mib(res.fixed[r.name].rss_max_kib)} MiB")
    row("max RSS, closed-loop forward",
        lambda r: f"{_mib(max(x.rss_max_kib or 0 for x in res.rounds[r.name]))} MiB")
    row("RSS after all steps", lambda r: f"{res.after[r.name]['rss_kib_after_all_steps'] / 1024:.1f} MiB")
    row("release binary (as built, line-tables debug info)",
        lambda r: f"{r.binary_info['bytes']} B ({r.binary_info['mib']} MiB)")
    row("release binary stripped (copy)", lambda r: stripped(r.binary_info))

    def minted(r: TokenRelay) -> str:
        mf, mc = res.mint_fixed[r.name], res.mint_closed[r.name]
        return (f"{mf.minted} / {sum(m.minted for m in mc)} (Python, {mf.per_second:.0f} / "
                f"{statistics.median(m.per_second for m in mc):.0f} per s)")

    row("references pre-minted (fixed / closed)", minted)
    row("log lines written during the run",
        lambda r: f"{res.after[r.name]['log_lines']} ({res.after[r.name]['log_bytes'] / 1048576:.1f} MiB)")
    row("RSS after minting the fixed / closed pools",
        lambda r: f"{res.mint_fixed[r.name].tokenrelay_rss_kib_after / 1024:.1f} / "
                  f"{max(m.tokenrelay_rss_kib_after for m in res.mint_closed[r.name]) / 1024:.1f} MiB")
    if all(res.after[r.name]["metrics"] for r in h.relays):
        def mt(r: TokenRelay) -> dict[str, float]:
            return res.after[r.name]["metrics"]

        row("reference cache size at the end (metrics)",
            lambda r: f"{mt(r).get('tokenrelay_reference_cache_size', 0):.0f}")

        def durations(r: TokenRelay) -> str:
            m = mt(r)
            fs, fc = m.get("tokenrelay_forward_duration_seconds_sum"), m.get("tokenrelay_forward_duration_seconds_count")
            us, uc = m.get("tokenrelay_upstream_duration_seconds_sum"), m.get("tokenrelay_upstream_duration_seconds_count")
            return f"{fs / fc * 1000:.3f} / {us / uc * 1000:.3f} ms" if fs and fc and us and uc else "—"

        row("mean forward / upstream duration (metrics, whole run)", durations)

        # Cross-check: every 200 seen by wrk consumed exactly one reference.
        def consumed(r: TokenRelay) -> str:
            runs = [res.warm[r.name], res.fixed[r.name], *res.rounds[r.name]]
            ok200 = sum(int(x.statuses.get("200", 0)) for x in runs) + 1  # +1 sanity
            cons = mt(r).get("tokenrelay_references_consumed_total", 0)
            return f"{ok200} vs {cons:.0f} (diff {cons - ok200:.0f})"

        row("forwards answered 200 seen by wrk (warm-up+fixed+closed, +1 sanity) vs "
            "references_consumed_total (diff: requests in flight when wrk stopped, ≤ connections per run; "
            "wrk does not count them)", consumed)
        row("references_refused_total (1 = the deliberate sanity replay)",
            lambda r: f"{mt(r).get('tokenrelay_references_refused_total', 0):.0f}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def measure(procs: Processes, settings: Settings) -> None:
    install_tools(settings)
    binary = tokenrelay_binary(settings)
    ports = [UP_PORT, NGINX_PORT, HAPROXY_PORT, TR_PORT, TR_ADMIN_PORT]
    if settings.tr_bin_before:
        ports += [TR_BEFORE_PORT, TR_BEFORE_ADMIN_PORT]
    busy = listening_ports().intersection(ports)
    if busy:
        raise Fatal(f"port(s) {' '.join(map(str, sorted(busy)))} already in use")
    run = new_run_dir()

    certs = make_certs(run)
    up = start_upstream_nginx(procs, run, certs)
    nginx = start_nginx_proxy(procs, run, certs)
    haproxy = start_haproxy(procs, run, certs)
    for url in (f"https://127.0.0.1:{UP_PORT}/", f"http://127.0.0.1:{NGINX_PORT}/",
                f"http://127.0.0.1:{HAPROXY_PORT}/"):
        try:
            wait_http(url, 10, certs.ca)
        except Fatal as e:
            raise Fatal(f"{e} (see {run})") from e

    relays = []
    if settings.tr_bin_before:
        relays.append(start_tokenrelay(procs, settings, run, certs, settings.tr_bin_before, "tokenrelay_before",
                                       "tokenrelay (before)", TR_BEFORE_PORT, TR_BEFORE_ADMIN_PORT))
    relays.append(start_tokenrelay(procs, settings, run, certs, binary, "tokenrelay", "tokenrelay",
                                   TR_PORT, TR_ADMIN_PORT))
    machine = machine_info()
    write_json(OUT / "machine.json", machine)

    # 3. Token and reference pools. Fixed-rate pool: warm-up + measured run
    # at RATE, +10 % and a floor of slack (wrk with delay() stays below RATE;
    # this is an upper bound).
    s = settings
    fixed_pool = 10 if s.quick else (s.rate * (s.duration + s.warmup) * 11) // 10 + 2000
    warm_n = (s.rate * s.warmup * 11) // 10 + 500
    plain = "content-type: application/json"
    baselines = {
        "direct": Target("direct", destination_url(), plain, up.pid),
        "nginx": Target("nginx", f"http://127.0.0.1:{NGINX_PORT}/v1/authorizations", plain, nginx.pid),
        "haproxy": Target("haproxy", f"http://127.0.0.1:{HAPROXY_PORT}/v1/authorizations", plain, haproxy.pid),
    }
    h = Harness(procs=procs, settings=s, run_dir=run, wrk=Wrk(s, run, up.pid), baselines=baselines, relays=relays)
    warm_refs: dict[str, list[str]] = {}
    run_refs: dict[str, list[str]] = {}
    for relay in relays:
        relay.provision()
        refs, h.results.mint_fixed[relay.name] = relay.mint(fixed_pool, s.mint_threads, "fixed")
        relay.sanity(refs[0])
        # The fixed pool splits into disjoint warm-up and measured slices.
        warm_refs[relay.name], run_refs[relay.name] = refs[1 : warm_n + 1], refs[warm_n + 1 :]
    for name in ("nginx", "haproxy"):
        status, body = fetch("POST", baselines[name].url, body=FWD_BODY,
                             headers={"content-type": "application/json"}, timeout=5)
        if (status, body) != (200, b'{"approved":true}'):
            raise Fatal(f"{baselines[name].url} answered {status} {body!r}")

    if s.quick:
        log(f"QUICK=1: closed loop only, haproxy vs tokenrelay (vault {s.vault}, RUST_LOG={s.tr_log})")
        h.closed_baselines(["haproxy"])
        h.closed_tokenrelay(["haproxy"])
        for relay in relays:
            relay.alive()
        print(quick_summary(h))
        return

    h.fixed_rate(warm_refs, run_refs)
    log(f"closed loop: {s.closed_threads} threads × {s.closed_connections} connections, {s.duration}s each")
    h.closed_baselines(["direct", "nginx", "haproxy"])
    h.closed_tokenrelay(["nginx", "haproxy"])
    h.api()
    h.collect_after()

    text = report(h, machine)
    (OUT / "report.md").write_text(text)
    print()
    print(text)
    log(f"raw results: {OUT}/*.json; logs: {run}")


def run(measure_with: Callable[[Processes], None]) -> int:
    """Runs MEASURE_WITH with the process table, turns failures and signals into an exit code, and
    stops every process it started, whatever happens (shared with scripts/callgrind.py)."""
    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    procs = Processes()
    try:
        measure_with(procs)
        return 0
    except Fatal as e:
        log(f"FATAL: {e}")
        return 1
    except subprocess.CalledProcessError as e:
        log(f"FATAL: {' '.join(map(str, e.cmd))} exited with {e.returncode}")
        return 1
    except (KeyboardInterrupt, Interrupted):
        log("interrupted")
        return 130
    finally:
        # Signals during the clean-up would leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()


def main() -> int:
    return run(lambda procs: measure(procs, Settings.from_env()))


if __name__ == "__main__":
    sys.exit(main())
