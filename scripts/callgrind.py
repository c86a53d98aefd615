#!/usr/bin/env python3
"""Deterministic A/B of two tokenrelay binaries: instructions (callgrind Ir)
per forward, instead of wall-clock timings on a noisy machine. Python 3.11,
standard library only; reuses scripts/load.py (certificates, the nginx TLS
"acquirer", the tokenrelay config, start-up, token, reference minting).

    TR_BIN_BEFORE=/path/old TR_BIN=/path/new python3 scripts/callgrind.py

What it does (report: target/load/callgrind.md, raw: target/load/callgrind.json):
  1. in a run dir under target/load/callgrind/: a CA + a leaf for 127.0.0.1 and
     the nginx TLS acquirer on :18443, as load.py makes them;
  2. for each binary in turn (before first): tokenrelay on :18080 (admin
     :19090) with load.py's config, under
       valgrind --tool=callgrind --instr-atstart=no
     (start-up, provisioning and minting run uninstrumented, ~4x faster);
     provisions a token, mints FORWARDS + WARM + 1 single-use references,
     checks one forward (200) and its replay (409), sends WARM forwards over
     one keep-alive connection (connections, pools, caches), then
     `callgrind_control -i on`, exactly FORWARDS forwards on that connection,
     one at a time (load.py's wrk forward: same headers, body, destination,
     a fresh reference each), `callgrind_control -d` (the dump), `-i off`,
     and stops tokenrelay;
  3. Ir per forward = the dump's total Ir (every thread, including the idle
     moments between `-i on`, the forwards and the dump) / FORWARDS, the
     after/before ratio, and the top TOP functions by inclusive Ir per forward
     (callgrind_annotate --inclusive=yes: each function's own entry, not the
     partial ones for the files its inlined code comes from; "'2" marks a
     recursive call level), both binaries side by side;
  4. every step is bounded by a timeout; every process it started is stopped
     on exit, by PID, also on Ctrl-C, SIGTERM or an error.

Why --instr-atstart=no and not --collect-atstart=no: with collection off at
the start, `callgrind_control -i on` collects nothing (it switches
instrumentation, not collection, and callgrind_control cannot switch
collection). The dump is taken while instrumentation is still on: switching
it off first zeroes the running cost callgrind's "summary:" line is made of.
Repeat runs of one binary agree within ~0.5 % (what varies: timestamps and
latencies formatted into the access log, allocator state, timer wheels).

Environment (defaults):
  TR_BIN=               the binary under test ("after")
  TR_BIN_BEFORE=        the binary to compare it with ("before"); either
                        may be given alone, one of them is needed
  FORWARDS=2000         forwards measured per binary
  WARM=200              forwards sent before measuring
  VAULT=sqlite          tokenrelay's vault: sqlite (a file in the run dir)
                        or memory
  TR_WORKERS=1          tokenrelay's `workers` (valgrind runs one thread at
                        a time anyway)
  TR_LOG=info           tokenrelay's RUST_LOG
  MINT_THREADS=4        threads minting references
  TOP=25                functions in the inclusive table
  SKIP_INSTALL=0        1: do not apt-get install nginx/openssl/valgrind
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402
from load import Fatal, Processes  # noqa: E402

TARGET = load.OUT  # target/load
CG_ROOT = TARGET / "callgrind"
REPORT = TARGET / "callgrind.md"
RAW = TARGET / "callgrind.json"

READY_TIMEOUT_S = 600  # start-up under valgrind: debug info of an ~80 MiB binary
CONTROL_TIMEOUT_S = 300  # callgrind_control (a dump writes the whole profile)
ANNOTATE_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 120  # one forward, instrumented
FORWARD_BUDGET_S = 1.0  # per forward, on top of a fixed 120 s, for a whole batch


def log(msg: str) -> None:
    print(f"[callgrind {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Binary:
    """One binary to profile: its role (before / after) and load.py's names."""

    role: str  # before | after
    path: Path

    @property
    def name(self) -> str:  # load.start_tokenrelay's name: its run subdir
        return "tokenrelay" if self.role == "after" else "tokenrelay_before"

    @property
    def label(self) -> str:
        return f"tokenrelay ({self.role})"


@dataclass(frozen=True)
class Settings:
    load: load.Settings  # vault, workers, RUST_LOG, mint threads
    binaries: list[Binary]  # before first
    forwards: int
    warm: int
    top: int
    skip_install: bool

    @classmethod
    def from_env(cls) -> Settings:
        base = load.Settings.from_env()
        base = dataclasses.replace(base, vault=os.environ.get("VAULT") or "sqlite",
                                   tr_workers=base.tr_workers or 1)
        binaries = [Binary(role, path) for role, path in (("before", base.tr_bin_before), ("after", base.tr_bin))
                    if path]
        if not binaries:
            raise Fatal("set TR_BIN and/or TR_BIN_BEFORE to prebuilt tokenrelay binaries")
        return cls(load=base, binaries=binaries, forwards=load._env_positive("FORWARDS", 2000),
                   warm=load._env_positive("WARM", 200), top=load._env_positive("TOP", 25),
                   skip_install=base.skip_install)


def ensure_tools(settings: Settings) -> None:
    wanted = {"nginx": "nginx", "openssl": "openssl", "valgrind": "valgrind",
              "callgrind_control": "valgrind", "callgrind_annotate": "valgrind"}
    missing = list(dict.fromkeys(pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None))
    if missing and not settings.skip_install:
        log(f"installing: {' '.join(missing)}")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "update"], check=True, timeout=600)
        subprocess.run([*sudo, "apt-get", "install", "-y", *missing], check=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    for cmd in wanted:
        if shutil.which(cmd) is None:
            raise Fatal(f"{cmd} not found")


def new_run_dir() -> Path:
    """A fresh dir under target/load/callgrind/ (previous runs' are removed)."""
    CG_ROOT.mkdir(parents=True, exist_ok=True)
    for old in CG_ROOT.iterdir():
        if old.is_dir():
            shutil.rmtree(old)
    run = CG_ROOT / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir()
    run.chmod(0o755)
    log(f"run dir: {run}")
    return run


# ---------------------------------------------------------------------------
# Forwards: load.py's wrk request, with http.client on one keep-alive connection
# ---------------------------------------------------------------------------


class Forwarder:
    """POST …/forward as load.py's wrk Lua script sends it: content-type,
    x-api-key, x-destination-url, a fresh x-cryptogram-reference, FWD_BODY
    (plus Host and Content-Length, as wrk.format adds them; no
    Accept-Encoding, which wrk does not send)."""

    def __init__(self, relay: load.TokenRelay) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=REQUEST_TIMEOUT_S)
        self._path = urllib.parse.urlsplit(relay.forward_url).path
        self._headers = {"content-type": "application/json", "x-api-key": relay.api_key,
                         "x-destination-url": load.destination_url()}
        self._body = load.FWD_BODY.encode()

    def close(self) -> None:
        self._conn.close()

    def send(self, refs: list[str], what: str) -> float:
        """One forward per reference, in order; every one must answer 200 on
        the same connection. Returns the seconds taken."""
        t0 = time.monotonic()
        deadline = t0 + 120 + FORWARD_BUDGET_S * len(refs)
        for i, ref in enumerate(refs):
            if time.monotonic() > deadline:
                raise Fatal(f"{what}: {i} of {len(refs)} forwards after {deadline - t0:.0f} s")
            self._one(ref, what)
        return time.monotonic() - t0

    def _one(self, ref: str, what: str) -> None:
        c = self._conn
        try:
            c.putrequest("POST", self._path, skip_accept_encoding=True)
            for k, v in self._headers.items():
                c.putheader(k, v)
            c.putheader("x-cryptogram-reference", ref)
            c.putheader("content-length", str(len(self._body)))
            c.endheaders(self._body)
            resp = c.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise Fatal(f"{what}: forward failed: {e!r}") from e
        if resp.status != 200:
            raise Fatal(f"{what}: forward answered {resp.status} {data[:200]!r}")
        if resp.will_close:
            raise Fatal(f"{what}: tokenrelay closed the keep-alive connection")


# ---------------------------------------------------------------------------
# callgrind
# ---------------------------------------------------------------------------


def valgrind_launcher(run: Path, role: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={run}/callgrind.{role}.%p",
            f"--log-file={run}/valgrind.{role}.%p.log", "--instr-atstart=no"]


def control(pid: int, *args: str) -> None:
    """callgrind_control ARGS PID; it says "OK." once valgrind has done it."""
    try:
        done = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True,
                              timeout=CONTROL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise Fatal(f"callgrind_control {' '.join(args)} {pid}: no answer in {CONTROL_TIMEOUT_S} s") from e
    if done.returncode != 0 or "OK." not in done.stdout:
        raise Fatal(f"callgrind_control {' '.join(args)} {pid} failed: {done.stdout}{done.stderr}")


def dump_file(run: Path, role: str, pid: int) -> Path:
    """The one dump `callgrind_control -d` wrote: callgrind.ROLE.PID.1."""
    dumps = sorted(run.glob(f"callgrind.{role}.{pid}.*"))
    if len(dumps) != 1:
        raise Fatal(f"expected one dump callgrind.{role}.{pid}.N in {run}, found {[d.name for d in dumps]}")
    return dumps[0]


def total_ir(dump: Path) -> int:
    """The dump's "summary:" line (Ir is the only event collected)."""
    with open(dump, errors="replace") as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise Fatal(f"no summary: line in {dump}")


ANNOTATE_LINE = re.compile(r"^\s*([\d,]+)\s+(\S.*)$")
RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")


def function_key(entry: str, binary: Path) -> str | None:
    """'file:function [object]' → the function, with ' [lib]' unless it is in
    the tokenrelay binary itself (file and legacy Rust hash dropped: the two
    binaries may be built from different paths). None for the entries
    without an object: the partial ones callgrind_annotate makes for the
    lines of a function that come from another file (inlined code), whose
    cost the function's own entry already holds."""
    if not (entry.endswith("]") and " [" in entry):
        return None
    name, obj = entry[:-1].rsplit(" [", 1)
    _, _, func = name.partition(":")
    func = RUST_HASH.sub("", func or name)
    return func if Path(obj) == binary else f"{func} [{Path(obj).name}]"


def inclusive_ir(dump: Path, binary: Path, out: Path) -> dict[str, int]:
    """Inclusive Ir of every function (callgrind_annotate --inclusive=yes).

    Run from /: callgrind_annotate strips its working directory from the
    files of a function's own lines but not from those its callers name,
    which would split a function of a binary built there in two."""
    try:
        done = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no",
                               "--show-percs=no", str(dump)], capture_output=True, text=True, cwd="/",
                              timeout=ANNOTATE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise Fatal(f"callgrind_annotate {dump}: not done in {ANNOTATE_TIMEOUT_S} s") from e
    out.write_text(done.stdout)
    if done.returncode != 0:
        raise Fatal(f"callgrind_annotate {dump} failed: {done.stderr[:500]}")
    lines = done.stdout.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.rstrip().endswith("file:function")) + 2
    except StopIteration as e:
        raise Fatal(f"callgrind_annotate output not understood: {out}") from e
    funcs: dict[str, int] = {}
    for line in lines[start:]:
        m = ANNOTATE_LINE.match(line)
        key = function_key(m.group(2), binary) if m else None
        if m and key:  # the same name twice: monomorphisations, or a function on the stack throughout
            funcs[key] = funcs.get(key, 0) + int(m.group(1).replace(",", ""))
    return funcs


def component(location: str) -> str:
    """The component a `file:function` entry of callgrind_annotate's self-cost list belongs to: the
    crate its file is in (a registry crate, or `tokenrelay/<module>`), libc's memcpy/memmove apart;
    std and core code inlined into a function counts for that function's crate."""
    file, _, func = location.partition(":")
    if m := re.search(r"/registry/src/[^/]+/([^/]+?)-\d[^/]*/", file):
        return m.group(1)
    if "/src/" in file and "/rustc/" not in file and "/registry/" not in file:
        return "tokenrelay/" + file.split("/src/", 1)[1].split("/")[0].removesuffix(".rs")
    if "/rustc/" in file:
        m = re.match(r"<?(?:&mut |&)?([a-z_][a-z0-9_]*)::", func)
        return f"std/core, inlined into {m.group(1) if m else 'generic code'}"
    if "memmove" in func or "memcpy" in func or "memset" in func:
        return "libc: memcpy/memmove/memset"
    if "libc.so" in location or "sysdeps" in file:
        return "libc: other"
    return "other"


def self_by_component(dump: Path, out: Path) -> dict[str, int]:
    """Self Ir summed by [`component`] (callgrind_annotate's self-cost list, every entry)."""
    done = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", str(dump)],
                          capture_output=True, text=True, timeout=ANNOTATE_TIMEOUT_S, cwd="/", check=True)
    out.write_text(done.stdout)
    body = done.stdout.split("file:function", 1)[1].split("\n")[2:]
    groups: dict[str, int] = {}
    for line in body:
        if line.startswith("----"):
            break
        if not (m := re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(\S.*)$", line)):
            continue
        name = component(m.group(2))
        groups[name] = groups.get(name, 0) + int(m.group(1).replace(",", ""))
    return groups


# ---------------------------------------------------------------------------
# One binary
# ---------------------------------------------------------------------------


@dataclass
class Profile:
    binary: Binary
    pid: int
    dump: Path
    ir: int
    forwards: int
    warm_s: float
    measured_s: float
    startup_ms: int
    functions: dict[str, int]
    components: dict[str, int]

    @property
    def ir_per_forward(self) -> float:
        return self.ir / self.forwards

    def per_forward(self, func: str) -> float:
        return self.functions.get(func, 0) / self.forwards


def profile(procs: Processes, settings: Settings, run: Path, certs: load.Certs, binary: Binary) -> Profile:
    s, role = settings, binary.role
    log(f"{binary.label}: {binary.path} under callgrind")
    relay = load.start_tokenrelay(procs, s.load, run, certs, binary.path, binary.name, binary.label,
                                  load.TR_PORT, load.TR_ADMIN_PORT, launcher=valgrind_launcher(run, role),
                                  ready_timeout_s=READY_TIMEOUT_S)
    pid = relay.proc.pid
    relay.provision()
    refs, _ = relay.mint(s.warm + s.forwards + 1, s.load.mint_threads, f"callgrind_{role}")
    relay.sanity(refs[0])
    warm, measured = refs[1 : s.warm + 1], refs[s.warm + 1 :]
    fwd = Forwarder(relay)
    try:
        warm_s = fwd.send(warm, f"{binary.label} warm-up")
        log(f"  {len(warm)} warm-up forwards in {warm_s:.1f} s; instrumentation on")
        control(pid, "-i", "on")
        measured_s = fwd.send(measured, f"{binary.label} measured")
        log(f"  {len(measured)} measured forwards in {measured_s:.1f} s; dump")
        control(pid, "-d")
        control(pid, "-i", "off")
    finally:
        fwd.close()
    relay.alive()
    procs.stop(relay.proc)
    dump = dump_file(run, role, pid)
    ir = total_ir(dump)
    log(f"  {dump.name}: {ir:,} Ir = {ir / s.forwards:,.0f} Ir/forward; annotating")
    funcs = inclusive_ir(dump, binary.path, run / f"annotate.{role}.txt")
    components = self_by_component(dump, run / f"annotate.self.{role}.txt")
    return Profile(binary=binary, pid=pid, dump=dump, ir=ir, forwards=s.forwards, warm_s=round(warm_s, 1),
                   measured_s=round(measured_s, 1), startup_ms=relay.startup["startup_to_ready_ms"],
                   functions=funcs, components=components)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _cell(text: str, width: int = 140) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}×" if before and after else "—"


def _ir(value: float) -> str:
    return f"{value:,.0f}" if value else "—"


def top_functions(profiles: list[Profile], n: int) -> list[str]:
    """The N functions with the highest inclusive Ir/forward in any binary."""
    names = set().union(*(p.functions for p in profiles))
    return sorted(names, key=lambda f: (-max(p.per_forward(f) for p in profiles), f))[:n]


def valgrind_version() -> str:
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or "valgrind"


def report(settings: Settings, profiles: list[Profile], wall_s: float) -> str:
    s = settings
    out: list[str] = []
    p = out.append
    p(f"# tokenrelay callgrind A/B — {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    p(f"Instructions executed (callgrind Ir, every thread of the process) per forward: {s.forwards} "
      f"forwards measured per binary, one at a time on one keep-alive connection, after {s.warm} warm-up "
      f"forwards; each with a fresh single-use reference, the request load.py's wrk sends "
      f"(`POST /api/network/tokens/{{id}}/forward` → nginx TLS acquirer on :{load.UP_PORT}). "
      f"tokenrelay: {s.load.vault} vault, memory references, workers = {s.load.tr_workers}, "
      f"RUST_LOG={s.load.tr_log}; {valgrind_version()} `--tool=callgrind --instr-atstart=no`, "
      "`callgrind_control -i on` … `-d`. Ir counts do not depend on the machine's load: repeat runs "
      "of one binary agree within ~0.5 %. Counts are for valgrind's emulated CPU (the CPU features it "
      "reports pick the crypto code paths).\n")
    p("| binary | path | Ir / forward | Ir measured | measured wall s (under valgrind) | start-up to ready ms |")
    p("|---|---|---:|---:|---:|---:|")
    for pr in profiles:
        p(f"| {pr.binary.role} | `{pr.binary.path}` | {pr.ir_per_forward:,.0f} | {pr.ir:,} | {pr.measured_s} "
          f"| {pr.startup_ms} |")
    if len(profiles) == 2:
        before, after = profiles
        p(f"\n**after / before: {_ratio(after.ir_per_forward, before.ir_per_forward)}** "
          f"({after.ir_per_forward - before.ir_per_forward:+,.0f} Ir per forward)\n")
    p(f"\n## Top {s.top} functions by inclusive Ir per forward\n")
    p("Inclusive = the function and everything it calls (`callgrind_annotate --inclusive=yes`); functions "
      "already on the stack when instrumentation came on (the runtime's loop) are not seen. "
      "`[lib]`: not in the tokenrelay binary; —: no such function in that binary (or never called).\n")
    roles = " | ".join(f"{pr.binary.role} Ir/fwd" for pr in profiles)
    extra = " after/before |" if len(profiles) == 2 else ""
    p(f"| # | function | {roles} |{extra}")
    p("|---:|---|" + "---:|" * len(profiles) + ("---:|" if extra else ""))
    for i, func in enumerate(top_functions(profiles, s.top), 1):
        vals = [pr.per_forward(func) for pr in profiles]
        row = " | ".join(_ir(v) for v in vals)
        ratio = f" {_ratio(vals[1], vals[0])} |" if extra else ""
        p(f"| {i} | `{_cell(func)}` | {row} |{ratio}")
    p("\n## Self Ir per forward by component\n")
    p("Each function's own instructions (`callgrind_annotate`'s self-cost list), summed by the crate its "
      "source file is in; std/core code inlined into a function counts for that function's crate. Rows "
      "above 0.3 % in any binary.\n")
    p(f"| component | {roles} |{extra}")
    p("|---|" + "---:|" * len(profiles) + ("---:|" if extra else ""))
    names = sorted({k for pr in profiles for k in pr.components},
                   key=lambda k: -max(pr.components.get(k, 0) / pr.forwards for pr in profiles))
    for name in names:
        vals = [pr.components.get(name, 0) / pr.forwards for pr in profiles]
        if not any(v >= 0.003 * pr.ir_per_forward for v, pr in zip(vals, profiles)):
            continue
        ratio = f" {_ratio(vals[1], vals[0])} |" if extra else ""
        p(f"| {name} | " + " | ".join(_ir(v) for v in vals) + f" |{ratio}")
    p(f"\nWall time of the whole run: {wall_s:.0f} s. Dumps and `callgrind_annotate` outputs: "
      f"{profiles[0].dump.parent}.")
    return "\n".join(out) + "\n"


def write_raw(profiles: list[Profile], settings: Settings) -> None:
    data = {"forwards": settings.forwards, "warm": settings.warm, "vault": settings.load.vault,
            "workers": settings.load.tr_workers, "rust_log": settings.load.tr_log,
            "binaries": [{"role": pr.binary.role, "path": str(pr.binary.path), "dump": str(pr.dump),
                          "ir": pr.ir, "ir_per_forward": round(pr.ir_per_forward, 1),
                          "warm_s": pr.warm_s, "measured_s": pr.measured_s, "startup_ms": pr.startup_ms}
                         for pr in profiles]}
    load.write_json(RAW, data)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def measure(procs: Processes, settings: Settings) -> None:
    t0 = time.monotonic()
    ensure_tools(settings)
    busy = load.listening_ports().intersection([load.UP_PORT, load.TR_PORT, load.TR_ADMIN_PORT])
    if busy:
        raise Fatal(f"port(s) {' '.join(map(str, sorted(busy)))} already in use")
    run = new_run_dir()
    # load.py writes its side files (binary*.json, startup*.json, mint_*.json)
    # to load.OUT: into this run dir, not over load.py's own results.
    load.OUT = run
    certs = load.make_certs(run)
    load.start_upstream_nginx(procs, run, certs)
    load.wait_http(f"https://127.0.0.1:{load.UP_PORT}/", 10, certs.ca)
    profiles = [profile(procs, settings, run, certs, b) for b in settings.binaries]
    text = report(settings, profiles, time.monotonic() - t0)
    REPORT.write_text(text)
    write_raw(profiles, settings)
    print()
    print(text)
    log(f"report: {REPORT}; wall time {time.monotonic() - t0:.0f} s")


def main() -> int:
    return load.run(lambda procs: measure(procs, Settings.from_env()))


if __name__ == "__main__":
    sys.exit(main())
