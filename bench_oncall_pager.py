#!/usr/bin/env python3
"""Benchmark of oncall-pager: the targets of SPEC section 10, measured in one run on loopback.

Reproduce
    make bench                                  # .venv/bin/python bench_oncall_pager.py
    python bench_oncall_pager.py --quick        # smoke check: 1 repeat, 1 s runs
    python bench_oncall_pager.py --repeat 5 --duration 5 --json /tmp/bench.json

It needs the test extras (`pip install -e '.[test]'`): moto's ThreadedMotoServer plays S3,
aiosmtpd takes the e-mail, and `TwilioFake` from oncall_pager_test.py plays Twilio's REST API.
Nothing leaves the loopback interface. The table goes to stdout (Markdown, ready for the
README), progress to stderr, and every figure with its samples to a JSON file (--json, default
bench_results.json).

What is measured (each figure is the median of --repeat runs)
 1. Requests/s and p50/p99 latency of a signed SMS `WHO` to /msgcontrol/entry, served by
    `oncall_pager.py serve` as a subprocess under waitress, on the file store, on S3 (moto's
    ThreadedMotoServer in this process) and, as the reference, of a trivial WSGI app (a fixed
    small text/xml body) under the same waitress settings. WHO/trivial is the headline ratio.
 2. S3 requests made while answering one WHO, TAKE, C and recording callback, counted by a
    small reverse proxy between the pager and moto.
 3. /public/recordingcb latency, and the time from the callback to the MMS at the Twilio fake.
 4. Resident memory of `serve` after the load, and the time from start to the first 200 from
    /healthz.

Method, so the figures can be trusted
 - Load generator: --clients processes (multiprocessing, spawn), each with one keep-alive
   connection and a minimal HTTP/1.1 client on a raw socket, closed loop, a 0.5 s warm-up and
   then --duration seconds counted. http.client would cost about five times the CPU per
   request, and four such processes nearly fill one core here; the report gives the CPU the
   generator used, so a reader can see it was not the bottleneck.
 - CPU pinning: with two or more CPUs, the server under test runs alone on the first CPU
   (the SPEC's "on one core"), and the generator, moto, the proxy and the fakes share the rest.
   --no-pin turns this off.
 - Every WHO carries its own MessageSid and signature (a pool of 2000 pre-signed bodies per
   client process): the app answers a repeated MessageSid from an in-memory cache of the last
   1000 replies, which would flatter the figure. The trivial app gets the very same bytes.
 - The throughput runs log at WARNING, to a file, so that writing one log line per request is
   not what is measured; the file-store WHO is also run at INFO (the production setting, still
   logging to a file) and reported in its own row. The worker polls once an hour
   ([worker] poll_interval = 3600): it wakes only when the app queues work.
 - All servers of part 1 run side by side and their runs are interleaved, so a slow moment of
   the machine hits the WHO runs and the trivial runs alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import logging
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import oncall_pager as op

HERE = Path(__file__).resolve().parent
APP = HERE / "oncall_pager.py"
TWILIO_SUBSET = HERE / "twilio_api_v2010_subset.json"

SERVER_THREADS = 4            # [server] threads of every server under test
BODIES_PER_CLIENT = 2000      # distinct signed WHO bodies per client process
WARMUP = 0.5                  # seconds of load before counting starts
CALLER = "+15551230000"       # the customer whose voicemail opens the pages
RECORDINGCB_PATH = "/public/recordingcb?caller=" + urllib.parse.quote(CALLER, safe="")
BUCKET_PREFIX = "pager-bench-"

TARGETS = {
    "ratio": 0.5,            # WHO/trivial requests/s, file store
    "who_p99_ms": 20.0,
    "s3_who": 1,             # S3 requests per WHO
    "s3_confirm": 3,         # 1 read + 1 conditional write + 1 audit write
    "recordingcb_p99_ms": 50.0,
    "first_mms_s": 1.0,
    "rss_mb": 100.0,
    "start_s": 2.0,
}


class BenchError(Exception):
    """The benchmark could not measure something (a server did not start, a wait timed out)."""


def note(text: str) -> None:
    """Progress, on stderr so that stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ==============================================================================================
# Small helpers: ports, waits, percentiles, CPU pinning, /proc
# ==============================================================================================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, predicate: Callable[[], Any], timeout: float,
               every: float = 0.01) -> Any:
    """Poll until predicate() is truthy and return its value; BenchError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def plan_cpus(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(CPUs of the server under test, CPUs of everything else); None means unpinned."""
    available = sorted(os.sched_getaffinity(0))
    if not pin or len(available) < 2:
        return None, None
    return available[:1], available[1:]


def pin(pid: int, cpus: list[int] | None) -> None:
    if cpus:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, cpus)


def pin_all_threads(pid: int, cpus: list[int] | None) -> None:
    """Pin every thread of a process (threads started later inherit from their creator)."""
    if not cpus:
        return
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            pin(int(tid), cpus)


def wait_idle(pid: int, window: float = 0.1, timeout: float = 15.0) -> None:
    """Wait until a process used (almost) no CPU for `window` seconds: its worker is done."""
    def idle() -> bool:
        before = cpu_seconds(pid)
        time.sleep(window)
        return cpu_seconds(pid) - before < 0.002

    wait_until(f"process {pid} to go idle", idle, timeout, every=0)


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (10^6 bytes; /proc reports KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ==============================================================================================
# Twilio-shaped requests: signed webhooks as Twilio sends them
# ==============================================================================================


def sms_fields(sender: str, to: str, body: str, account_sid: str) -> dict[str, str]:
    """The fields of a real inbound-SMS webhook (Twilio sends all of these, blanks included):
    the app parses and signs over every one, so the benchmark sends them all."""
    sid = "SM" + uuid.uuid4().hex
    return {"ToCountry": "US", "ToState": "NC", "SmsMessageSid": sid, "NumMedia": "0",
            "ToCity": "RALEIGH", "FromZip": "27601", "SmsSid": sid, "FromState": "NC",
            "SmsStatus": "received", "FromCity": "RALEIGH", "Body": body, "FromCountry": "US",
            "To": to, "ToZip": "", "NumSegments": "1", "MessageSid": sid,
            "AccountSid": account_sid, "From": sender, "ApiVersion": "2010-04-01"}


def raw_post(host_port: str, path: str, form: bytes, signature: str) -> bytes:
    """One HTTP/1.1 keep-alive POST, as bytes on the wire."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"X-Twilio-Signature: {signature}\r\nContent-Length: {len(form)}\r\n\r\n"
            ).encode() + form


@dataclasses.dataclass(frozen=True)
class WhoRequests:
    """The recipe of a pool of signed WHO requests, small enough to hand to a client process,
    which builds the pool itself (a megabyte of pickled bodies through the spawn pipe would
    block the parent for good if the child died before reading it)."""

    port: int                  # the server's public_url is http://127.0.0.1:port
    auth_token: str
    account_sid: str
    sender: str                # a member's phone
    to: str                    # the control number
    count: int = BODIES_PER_CLIENT

    def build(self) -> list[bytes]:
        """`count` WHO requests, each with its own MessageSid and signature."""
        from twilio.request_validator import RequestValidator

        validator = RequestValidator(self.auth_token)
        url = f"http://127.0.0.1:{self.port}/msgcontrol/entry"
        requests = []
        for _ in range(self.count):
            fields = sms_fields(self.sender, self.to, "WHO", self.account_sid)
            signature = validator.compute_signature(url, fields)
            requests.append(raw_post(f"127.0.0.1:{self.port}", "/msgcontrol/entry",
                                     urllib.parse.urlencode(fields).encode(), signature))
        return requests


def signed_post(kit: TestKit, port: int, path: str, fields: dict[str, str],
                timeout: float = 10.0) -> tuple[int, str, float]:
    """POST a signed webhook on a new connection, as Twilio does: (status, body, seconds)."""
    from twilio.request_validator import RequestValidator

    signature = RequestValidator(kit.auth_token).compute_signature(
        f"http://127.0.0.1:{port}{path}", fields)
    form = urllib.parse.urlencode(fields)
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, form, {
            "Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature})
        answer = connection.getresponse()
        body = answer.read().decode("utf-8", "replace")
    finally:
        connection.close()
    return answer.status, body, time.perf_counter() - started


def recording_fields(kit: TestKit, fake: Any, recording_sid: str) -> dict[str, str]:
    return {"AccountSid": kit.account_sid, "CallSid": "CA" + secrets.token_hex(16),
            "RecordingSid": recording_sid, "RecordingUrl": fake.recording_url(recording_sid),
            "RecordingStatus": "completed", "RecordingDuration": "12"}


# ==============================================================================================
# The load generator: client processes with a minimal keep-alive HTTP/1.1 client
# ==============================================================================================


def read_response(reader: Any) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length (what waitress sends)."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    length = -1
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length < 0:
        raise ValueError("response without Content-Length")
    return status, reader.read(length)


def client_process(recipe: WhoRequests, expect: bytes, cpus: list[int] | None,
                   barrier: Any, duration: float, results: Any) -> None:
    """One client process: one keep-alive connection, requests back to back; counts the
    requests started inside the measuring window and their latencies."""
    pin(0, cpus)
    outcome: dict[str, Any] = {"latencies": [], "errors": 0, "cpu": 0.0, "problem": ""}
    try:
        requests = recipe.build()
        sock = socket.create_connection(("127.0.0.1", recipe.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        barrier.wait(60)
        measure_from = time.monotonic() + WARMUP
        stop = measure_from + duration
        cpu_start: float | None = None
        latencies = outcome["latencies"]
        i = 0
        while True:
            started = time.monotonic()
            if started >= stop:
                break
            if cpu_start is None and started >= measure_from:
                cpu_start = time.process_time()
            sock.sendall(requests[i % len(requests)])
            status, body = read_response(reader)
            i += 1
            if started >= measure_from:
                latencies.append(time.monotonic() - started)
                if status != 200 or expect not in body:
                    outcome["errors"] += 1
                    outcome["problem"] = outcome["problem"] or f"{status} {body[:200]!r}"
        outcome["cpu"] = time.process_time() - (cpu_start or time.process_time())
        sock.close()
    except Exception as e:  # reported, never hidden: the run is marked as failed
        outcome["errors"] += 1
        outcome["problem"] = f"{type(e).__name__}: {e}"
    results.put(outcome)


@dataclasses.dataclass
class LoadRun:
    """One closed-loop run against one server."""

    requests: int
    errors: int
    duration: float
    p50_ms: float
    p99_ms: float
    server_cpu: float      # share of one CPU the server process used during the window
    generator_cpu: float   # share of the generator's CPUs its processes used
    lab_cpu: float         # share of one CPU this process used (moto, the proxy, the fakes)
    problem: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration


def run_load(recipe: WhoRequests, pid: int, clients: int, expect: bytes,
             duration: float, cpus: list[int] | None) -> LoadRun:
    """Start `clients` client processes, count for `duration` seconds after the warm-up, and
    gather the figures. Every process is joined or terminated before returning."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients + 1)
    results = context.Queue()
    processes = [context.Process(target=client_process, daemon=True, args=(
        recipe, expect, cpus, barrier, duration, results)) for _ in range(clients)]
    try:
        for process in processes:
            process.start()
        barrier.wait(60)
        time.sleep(WARMUP)
        cpu_before, lab_before = cpu_seconds(pid), time.process_time()
        time.sleep(duration)
        cpu_after, lab_after = cpu_seconds(pid), time.process_time()
        outcomes = [results.get(timeout=30) for _ in processes]
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
    latencies = [t for o in outcomes for t in o["latencies"]]
    generator_cpus = len(cpus) if cpus else os.cpu_count() or 1
    return LoadRun(
        requests=len(latencies), errors=sum(o["errors"] for o in outcomes), duration=duration,
        p50_ms=percentile(latencies, 50) * 1000, p99_ms=percentile(latencies, 99) * 1000,
        server_cpu=(cpu_after - cpu_before) / duration,
        generator_cpu=sum(o["cpu"] for o in outcomes) / duration / generator_cpus,
        lab_cpu=(lab_after - lab_before) / duration,
        problem="; ".join(sorted({o["problem"] for o in outcomes if o["problem"]})))


# ==============================================================================================
# S3: moto, and a counting reverse proxy in front of it
# ==============================================================================================


@dataclasses.dataclass
class S3Request:
    """One request that reached the S3 endpoint, as the proxy saw it."""

    time: float
    method: str
    key: str
    query: str
    conditional: str
    status: int = 0

    def describe(self) -> str:
        params = urllib.parse.parse_qs(self.query)
        if self.method == "GET" and "list-type" in params:
            what = f"LIST {params.get('prefix', [''])[0]}"
        else:
            what = f"{self.method} {self.key}"
        return f"{what}{f' ({self.conditional})' if self.conditional else ''} -> {self.status}"


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "expect"}


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards one request to moto and records it (on arrival, before forwarding)."""

    protocol_version = "HTTP/1.1"   # keep-alive, as boto3 expects
    server: _ProxyServer

    def do_GET(self) -> None:
        self.forward()

    def do_HEAD(self) -> None:
        self.forward()

    def do_PUT(self) -> None:
        self.forward()

    def do_POST(self) -> None:
        self.forward()

    def do_DELETE(self) -> None:
        self.forward()

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        path, _, query = self.path.partition("?")
        key = urllib.parse.unquote(path).split("/", 2)[-1]   # path style: /BUCKET/KEY
        conditional = ", ".join(f"{name} {self.headers[name]}"
                                for name in ("If-Match", "If-None-Match") if name in self.headers)
        record = self.server.proxy.add(S3Request(time.monotonic(), self.command, key, query,
                                                 conditional))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=15)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            record.status = answer.status
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", answer.getheader("Content-Length", "0"))
                data = b""
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            upstream.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the proxy's records are the log."""


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: CountingProxy, upstream: tuple[str, int]):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.proxy = proxy
        self.upstream = upstream


class CountingProxy:
    """A reverse proxy on loopback in front of moto that keeps every request it forwards, so
    the S3 requests of one webhook can be counted at the endpoint, whoever sends them."""

    def __init__(self, upstream_url: str):
        parts = urllib.parse.urlsplit(upstream_url)
        self._server = _ProxyServer(self, (parts.hostname or "127.0.0.1", parts.port or 80))
        self._lock = threading.Lock()
        self._records: list[S3Request] = []
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def add(self, record: S3Request) -> S3Request:
        with self._lock:
            self._records.append(record)
        return record

    def mark(self) -> int:
        with self._lock:
            return len(self._records)

    def since(self, mark: int) -> list[S3Request]:
        with self._lock:
            return list(self._records[mark:])

    def wait_quiet(self, quiet: float = 0.3, timeout: float = 15.0) -> None:
        """Wait until no request has arrived for `quiet` seconds (the worker is done)."""
        def is_quiet() -> bool:
            with self._lock:
                last = self._records[-1].time if self._records else 0.0
            return time.monotonic() - last >= quiet

        wait_until("the S3 endpoint to go quiet", is_quiet, timeout)


# ==============================================================================================
# The lab: what runs in this process (moto, the proxy, the Twilio fake, SMTP), and servers
# ==============================================================================================


@dataclasses.dataclass
class TestKit:
    """What the benchmark borrows from the test module (imported lazily: it pulls in pytest,
    and the client processes, which import this module, do not need it)."""

    module: Any
    account_sid: str
    auth_token: str
    alice: str
    bob: str
    carol: str
    from_phone: str

    @classmethod
    def load(cls) -> TestKit:
        import oncall_pager_test as t

        return cls(t, t.ACCOUNT_SID, t.AUTH_TOKEN, t.ALICE, t.BOB, t.CAROL, t.FROM_PHONE)

    def team_doc(self, smtp_port: int) -> dict:
        return self.module.team_doc(smtp_port)


def write_config(folder: Path, kit: TestKit, *, port: int, store_url: str, api_base_url: str,
                 s3_endpoint_url: str = "", log_level: str = "WARNING") -> Path:
    """A config.ini in the format of the tests' write_config; the worker wakes only when the
    app queues work (poll_interval = 3600), so it does not disturb the measurements."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.ini"
    path.write_text(f"""[server]
host = 127.0.0.1
port = {port}
public_url = http://127.0.0.1:{port}
threads = {SERVER_THREADS}

[store]
url = {store_url}
s3_endpoint_url = {s3_endpoint_url}
region = us-east-1
cache_file = config.cache.json

[twilio]
account_sid = {kit.account_sid}
auth_token = {kit.auth_token}
mode = live
api_base_url = {api_base_url}

[worker]
poll_interval = 3600
retry_base = 1
retry_cap = 5
claim_timeout = 30
smtp_timeout = 5
http_timeout = 5
threads = 4

[log]
level = {log_level}
""")
    path.chmod(0o600)
    return path


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return env


class Server:
    """One server under test as a subprocess, stdout and stderr to a log file (never a pipe
    that nobody reads). stop() always ends it."""

    def __init__(self, name: str, argv: list[str], config: Path, cpus: list[int] | None):
        self.name = name
        self.config = config
        self.port = op.load_app_config(config).port
        self.cpus = cpus
        self.log_path = config.parent / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=subprocess_env(),
                                     cwd=config.parent)
        pin(self.proc.pid, cpus)   # before the interpreter starts any thread

    @classmethod
    def pager(cls, name: str, config: Path, cpus: list[int] | None) -> Server:
        return cls(name, [sys.executable, str(APP), "serve", "-c", str(config)], config, cpus)

    @classmethod
    def trivial(cls, name: str, config: Path, cpus: list[int] | None) -> Server:
        return cls(name, [sys.executable, str(Path(__file__).resolve()), "--serve-trivial",
                          str(config)], config, cpus)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, timeout: float = 20.0) -> float:
        """Seconds from start to the first 200 from /healthz."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                connection.request("GET", "/healthz")
                answer = connection.getresponse()
                answer.read()
                if answer.status == 200:
                    elapsed = time.monotonic() - self.started
                    pin_all_threads(self.pid, self.cpus)
                    return elapsed
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.01)
        raise BenchError(f"{self.name} gave no 200 from /healthz within {timeout} s:\n"
                         f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class Lab:
    """Everything started in this process, and every server started for the benchmark; the
    ExitStack stops all of it, whatever happens."""

    def __init__(self, stack: contextlib.ExitStack, pin_cpus: bool):
        from moto.server import ThreadedMotoServer

        self.kit = TestKit.load()
        self.server_cpus, self.client_cpus = plan_cpus(pin_cpus)
        pin(0, self.client_cpus)   # this process (moto, proxy, fakes) stays off the server's CPU
        self.tmp = Path(tempfile.mkdtemp(prefix="oncall-bench-"))
        self.keep_tmp = False
        stack.callback(self._remove_tmp)

        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto logs every request
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        stack.callback(self.moto.stop)
        host, port = self.moto.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        self.proxy = CountingProxy(self.moto_url)
        self.proxy.start()
        stack.callback(self.proxy.stop)

        self.fake = self.kit.module.TwilioFake(self.kit.account_sid, self.kit.auth_token,
                                               TWILIO_SUBSET)
        self.fake.start()
        stack.callback(self.fake.stop)
        self.smtp = self.kit.module.SMTPSink()   # an aiosmtpd Controller on a loopback port
        self.smtp.start()
        stack.callback(self.smtp.stop)

        import boto3

        self.s3 = boto3.client("s3", endpoint_url=self.moto_url, region_name="us-east-1",
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self._servers: list[Server] = []
        stack.callback(self._stop_servers)

    def _remove_tmp(self) -> None:
        if self.keep_tmp:
            note(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _stop_servers(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop()

    # --- stores with the team's config in them -------------------------------------------------

    def file_store(self, name: str) -> str:
        folder = self.tmp / name / "store"
        op.DirectoryStore(folder).put("oncall_config.json",
                                      op.to_json(self.kit.team_doc(self.smtp.port)))
        return f"file:{folder}"

    def s3_store(self) -> str:
        bucket = BUCKET_PREFIX + uuid.uuid4().hex[:12]
        self.s3.create_bucket(Bucket=bucket)
        self.s3.put_object(Bucket=bucket, Key="oncall_config.json",
                           Body=op.to_json(self.kit.team_doc(self.smtp.port)))
        return f"s3://{bucket}"

    # --- servers ---------------------------------------------------------------------------------

    def config(self, name: str, store_url: str, *, log_level: str = "WARNING",
               s3_endpoint_url: str = "") -> Path:
        if store_url.startswith("s3://") and not s3_endpoint_url:
            s3_endpoint_url = self.moto_url
        folder = self.tmp / name / f"run-{uuid.uuid4().hex[:6]}"
        return write_config(folder, self.kit, port=free_port(), store_url=store_url,
                            api_base_url=self.fake.base_url, s3_endpoint_url=s3_endpoint_url,
                            log_level=log_level)

    def start(self, server: Server) -> Server:
        self._servers.append(server)
        return server

    def pager(self, name: str, config: Path) -> Server:
        return self.start(Server.pager(name, config, self.server_cpus))

    def trivial(self, name: str, config: Path) -> Server:
        return self.start(Server.trivial(name, config, self.server_cpus))

    def stop(self, server: Server) -> None:
        server.stop()
        self._servers.remove(server)


# ==============================================================================================
# The reference: a trivial WSGI app under the same waitress settings as `serve`
# ==============================================================================================

TRIVIAL_BODY = b'<?xml version="1.0" encoding="UTF-8"?><Response />'


def serve_trivial(config: Path) -> None:
    """Serve a fixed small text/xml body for every request, with the waitress settings that
    `oncall_pager.cmd_serve` uses for the same config.ini (host, port, threads, body limit,
    ident) and the same logging set-up, so the two differ only in the application."""
    import waitress

    cfg = op.load_app_config(config)
    op.setup_logging(cfg.log_level)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "text/xml"),
                                  ("Content-Length", str(len(TRIVIAL_BODY)))])
        return [TRIVIAL_BODY]

    waitress.create_server(app, host=cfg.host, port=cfg.port, threads=cfg.threads,
                           max_request_body_size=op.MAX_BODY, ident="oncall-pager").run()


# ==============================================================================================
# Figures and the report
# ==============================================================================================


@dataclasses.dataclass
class Figure:
    """One row of the report: a median over the repeats and the samples it came from."""

    name: str
    value: float
    unit: str                    # "req/s", "ms", "s", "MB", "ratio", "requests"
    target: str = "—"
    ok: bool | None = None       # None: a reference figure, no target
    samples: list[float] = dataclasses.field(default_factory=list)
    detail: str = ""

    @property
    def verdict(self) -> str:
        return "—" if self.ok is None else ("PASS" if self.ok else "FAIL")

    def shown(self) -> str:
        if math.isnan(self.value):
            text = "n/a"
        elif self.unit == "req/s":
            text = f"{self.value:,.0f} req/s"
        elif self.unit == "ratio":
            text = f"{self.value:.2f}"
        elif self.unit == "requests":
            text = f"{self.value:g}"
        elif self.unit == "ms":
            text = f"{self.value:.1f} ms"
        elif self.unit == "s":
            text = f"{self.value:.2f} s"
        else:
            text = f"{self.value:.1f} {self.unit}"
        return f"{text} {self.detail}".strip()


@dataclasses.dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    generator: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    runs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    s3_operations: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def markdown(self) -> str:
        lines = ["| figure | value | target | verdict |", "|---|---|---|---|"]
        lines += [f"| {f.name} | {f.shown()} | {f.target} | {f.verdict} |" for f in self.figures]
        m = self.machine
        lines += ["", f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']} on "
                      f"{m['platform']}; {m['pinning']}.",
                  f"Generator: {self.generator}.",
                  f"Medians of {self.settings['repeat']} runs of {self.settings['duration']:g} s "
                  f"each (after a {WARMUP:g} s warm-up); full run took {self.elapsed_s:.0f} s."]
        if self.s3_operations:
            lines += ["", "S3 requests per webhook, as seen at the endpoint (first run):"]
            for name, runs in self.s3_operations.items():
                ops = runs[0] if runs else []
                lines.append(f"- {name} ({len(ops)}): " + ("; ".join(ops) or "none"))
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        for figure, row in zip(self.figures, doc["figures"], strict=True):
            row["verdict"] = figure.verdict
            row["shown"] = figure.shown()
        return finite(doc)


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinity (a figure that could not be measured) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def machine_facts(server_cpus: list[int] | None, client_cpus: list[int] | None) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pinning = (f"server under test pinned to CPU {server_cpus}, everything else to CPU "
               f"{client_cpus}" if server_cpus else "no CPU pinning")
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.release()}", "pinning": pinning}


# ==============================================================================================
# 1 and 4a. Throughput of WHO against the trivial app; memory after the load
# ==============================================================================================


def measure_throughput(lab: Lab, report: Report, settings: argparse.Namespace) -> None:
    kit = lab.kit
    file_store = lab.file_store("who-file")
    targets = {   # name: (server, what its answer must contain)
        "trivial": (lab.trivial("trivial", lab.config("trivial", file_store)), b"<Response"),
        "who-file": (lab.pager("who-file", lab.config("who-file", file_store)),
                     b"Current on-call engineer"),
        "who-s3": (lab.pager("who-s3", lab.config("who-s3", lab.s3_store())),
                   b"Current on-call engineer"),
        "who-file-info": (lab.pager("who-file-info", lab.config(
            "who-file-info", lab.file_store("who-file-info"), log_level="INFO")),
            b"Current on-call engineer"),
    }
    for server, _ in targets.values():
        server.wait_healthy()
    runs: dict[str, list[LoadRun]] = {name: [] for name in targets}
    for repeat in range(settings.repeat):
        for name, (server, expect) in targets.items():   # interleaved, see the docstring
            recipe = WhoRequests(server.port, kit.auth_token, kit.account_sid, kit.alice,
                                 kit.from_phone)
            run = run_load(recipe, server.pid, settings.clients, expect, settings.duration,
                           lab.client_cpus)
            runs[name].append(run)
            note(f"run {repeat + 1}/{settings.repeat} {name}: {run.rps:,.0f} req/s, "
                 f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms, server CPU "
                 f"{run.server_cpu:.0%}, generator CPU {run.generator_cpu:.0%}, "
                 f"bench process CPU {run.lab_cpu:.0%}, errors {run.errors} {run.problem}")
    report.runs.update({name: [dataclasses.asdict(r) | {"rps": r.rps} for r in rs]
                        for name, rs in runs.items()})

    def rate(name: str, label: str) -> Figure:
        rs = runs[name]
        failed = sum(r.errors for r in rs)
        return report.add(Figure(
            label, median([r.rps for r in rs]), "req/s", samples=[r.rps for r in rs],
            ok=False if failed else None,
            detail=f"(p50 {median([r.p50_ms for r in rs]):.1f} ms, p99 "
                   f"{median([r.p99_ms for r in rs]):.1f} ms; server CPU "
                   f"{median([r.server_cpu for r in rs]):.0%}, "
                   f"{median([r.server_cpu / r.rps * 1e6 for r in rs]):.0f} µs per request"
                   + (f"; {failed} errors" if failed else "") + ")"))

    def ratio(name: str, label: str, target: float | None) -> None:
        ratios = [w.rps / t.rps for w, t in zip(runs[name], runs["trivial"], strict=True)]
        value = median(ratios)
        report.add(Figure(label, value, "ratio", samples=ratios,
                          target=f"≥ {target:g}" if target else "—",
                          ok=value >= target if target else None))

    def p99(name: str, label: str) -> None:
        values = [r.p99_ms for r in runs[name]]
        value = median(values)
        report.add(Figure(label, value, "ms", samples=values,
                          target=f"< {TARGETS['who_p99_ms']:g} ms",
                          ok=value < TARGETS["who_p99_ms"]))

    rate("trivial", "Trivial WSGI app, same waitress settings (reference)")
    rate("who-file", "WHO, file store (log WARNING)")
    ratio("who-file", "**WHO / trivial, file store (log WARNING)**", TARGETS["ratio"])
    p99("who-file", "WHO p99 latency, file store (log WARNING)")
    rate("who-file-info", "WHO, file store (log INFO to a file: production setting)")
    ratio("who-file-info", "WHO / trivial, file store (log INFO)", TARGETS["ratio"])
    p99("who-file-info", "WHO p99 latency, file store (log INFO)")
    rate("who-s3", "WHO, S3 (moto on loopback; log WARNING)")
    ratio("who-s3", "WHO / trivial, S3 (moto on loopback)", None)

    for name, label in (("who-file", "file store"), ("who-s3", "S3")):
        server = targets[name][0]
        value = rss_mb(server.pid)
        report.add(Figure(f"RSS of `serve` after the load, {label}", value, "MB",
                          samples=[value], target=f"< {TARGETS['rss_mb']:g} MB",
                          ok=value < TARGETS["rss_mb"]))
    generator = [r.generator_cpu for rs in runs.values() for r in rs]
    report.notes.append(
        f"The generator's processes used at most {max(generator):.0%} of their CPUs "
        f"(median {median(generator):.0%}); the server under test used the 'server CPU' "
        "share of its one CPU (100% = one core busy).")
    for server, _ in targets.values():
        lab.stop(server)


# ==============================================================================================
# 2. S3 requests per webhook, counted at the endpoint
# ==============================================================================================


def measure_store_requests(lab: Lab, report: Report, settings: argparse.Namespace) -> None:
    """WHO, TAKE, C and a recording callback against a pager whose S3 endpoint is the counting
    proxy. A webhook's count is what reached the endpoint between sending the request and its
    answer arriving; before each one the endpoint is left to go quiet."""
    kit, proxy = lab.kit, lab.proxy
    config = lab.config("s3-count", lab.s3_store(), s3_endpoint_url=proxy.url)
    server = lab.pager("s3-count", config)
    server.wait_healthy()
    members = [kit.alice, kit.bob, kit.carol]
    counts: dict[str, list[float]] = {"WHO": [], "TAKE": [], "C": [], "recording callback": []}
    operations: dict[str, list[list[str]]] = {name: [] for name in counts}

    def count(name: str, path: str, fields: dict[str, str], expect: str) -> None:
        proxy.wait_quiet()
        mark = proxy.mark()
        status, body, _ = signed_post(kit, server.port, path, fields)
        seen = proxy.since(mark)
        if status != 200 or expect not in body:
            raise BenchError(f"{name}: {status} {body[:300]!r}\n{server.log_tail()}")
        counts[name].append(len(seen))
        operations[name].append([r.describe() for r in seen])

    for repeat in range(settings.repeat):
        taker = members[(repeat + 1) % len(members)]   # never the one on call
        count("WHO", "/msgcontrol/entry",
              sms_fields(kit.alice, kit.from_phone, "WHO", kit.account_sid),
              "Current on-call engineer")
        count("TAKE", "/msgcontrol/entry",
              sms_fields(taker, kit.from_phone, "TAKE", kit.account_sid), "reply C to confirm")
        count("C", "/msgcontrol/entry", sms_fields(taker, kit.from_phone, "C", kit.account_sid),
              "you are now on call")
        sid = "RE" + secrets.token_hex(16)
        lab.fake.add_recording(sid, op.SAMPLE_MP3)
        count("recording callback", RECORDINGCB_PATH, recording_fields(kit, lab.fake, sid),
              "<Response")
    proxy.wait_quiet()
    lab.stop(server)

    limits = {"WHO": TARGETS["s3_who"], "C": TARGETS["s3_confirm"]}
    target_text = {"WHO": "≤ 1", "C": "≤ 3 (1 read + 1 cond. write + 1 audit)"}
    for name, values in counts.items():
        value = median(values)
        limit = limits.get(name)
        report.add(Figure(f"S3 requests during one {name}", value, "requests", samples=values,
                          target=target_text.get(name, "—"),
                          ok=None if limit is None else value <= limit))
    both = [t + c for t, c in zip(counts["TAKE"], counts["C"], strict=True)]
    report.add(Figure("S3 requests during TAKE + C (predecessor: 5)", median(both), "requests",
                      samples=both))
    report.s3_operations = operations
    report.notes.append(
        "S3 counts are the requests that reached the endpoint between sending the webhook and "
        "its answer arriving (the worker polls hourly in this benchmark, so it only runs when a "
        "webhook queues work). For C and the recording callback, whatever the woken worker "
        "sent before the answer arrived is included, nothing is subtracted: see the list above.")


# ==============================================================================================
# 3. The recording callback: its latency and the time to the MMS at the Twilio fake
# ==============================================================================================


def measure_recording_callbacks(lab: Lab, report: Report, settings: argparse.Namespace,
                                store: str) -> None:
    """One callback at a time, each with a new RecordingSid, on a fresh pager and store per
    repeat (the hourly outbound budget is 60). Each callback finds the pager idle (the previous
    page's MMS, e-mail and archive done), as a voicemail usually would; its pages stay open
    (their escalation is not due for minutes), so each one finds one more open page."""
    kit, fake = lab.kit, lab.fake
    latencies: list[list[float]] = []
    to_mms: list[list[float]] = []
    for repeat in range(settings.repeat):
        store_url = lab.s3_store() if store == "S3" else lab.file_store(f"rec-{repeat}")
        server = lab.pager(f"rec-{store}", lab.config(f"rec-{store}", store_url))
        server.wait_healthy()
        run_latencies, run_mms = [], []
        for _ in range(settings.callbacks):
            wait_idle(server.pid)
            sid = "RE" + secrets.token_hex(16)
            fake.add_recording(sid, op.SAMPLE_MP3)
            sent = time.time()
            status, body, seconds = signed_post(kit, server.port, RECORDINGCB_PATH,
                                                recording_fields(kit, fake, sid))
            if status != 200:
                raise BenchError(f"recording callback: {status} {body[:300]!r}\n"
                                 f"{server.log_tail()}")
            run_latencies.append(seconds * 1000)

            def mms(sid: str = sid) -> list[Any]:
                return [r for r in fake.messages()
                        if any(sid in url for url in r.params.get("MediaUrl", []))]

            if fake.wait_for(lambda: bool(mms()), timeout=10):
                run_mms.append(mms()[0].time - sent)
            else:
                run_mms.append(math.inf)
        lab.stop(server)
        latencies.append(run_latencies)
        to_mms.append(run_mms)
        tenth = max(1, len(run_mms) // 10)
        note(f"recording callbacks {store} run {repeat + 1}: p50 "
             f"{percentile(run_latencies, 50):.1f} ms, p99 {percentile(run_latencies, 99):.1f}"
             f" ms; to MMS p50 {percentile(run_mms, 50):.3f} s, max {max(run_mms):.3f} s "
             f"(first {tenth}: {median(run_mms[:tenth]):.3f} s, last {tenth}: "
             f"{median(run_mms[-tenth:]):.3f} s)")
    p50s = [percentile(run, 50) for run in latencies]
    p99s = [percentile(run, 99) for run in latencies]   # of 50 callbacks: the slowest
    pooled = [t for run in latencies for t in run]
    report.add(Figure(f"/public/recordingcb latency p99, {store}", median(p99s), "ms",
                      samples=p99s, detail=f"(p50 {median(p50s):.1f} ms; p99 of all "
                                           f"{len(pooled)}: {percentile(pooled, 99):.1f} ms)",
                      target=f"< {TARGETS['recordingcb_p99_ms']:g} ms",
                      ok=median(p99s) < TARGETS["recordingcb_p99_ms"]))
    report.runs[f"recordingcb {store}"] = [{"latency_ms": lat, "to_mms_s": mms}
                                           for lat, mms in zip(latencies, to_mms, strict=True)]
    worst = [max(run) for run in to_mms]
    slowest = sorted({run.index(max(run)) + 1 for run in to_mms})
    typical = [percentile(run, 50) for run in to_mms]
    firsts = [median(run[:max(1, len(run) // 10)]) for run in to_mms]
    lasts = [median(run[-max(1, len(run) // 10):]) for run in to_mms]
    report.add(Figure(f"Callback → MMS at the Twilio fake, worst of {settings.callbacks}, "
                      f"{store}", median(worst), "s", samples=worst,
                      detail=f"(p50 {median(typical):.3f} s; first tenth {median(firsts):.3f} s, "
                             f"last tenth {median(lasts):.3f} s; slowest: callback "
                             f"#{', #'.join(map(str, slowest))} of its run)",
                      target=f"< {TARGETS['first_mms_s']:g} s",
                      ok=median(worst) < TARGETS["first_mms_s"]))


# ==============================================================================================
# 4b. Time from start to the first 200 from /healthz
# ==============================================================================================


def measure_starts(lab: Lab, report: Report, settings: argparse.Namespace, store: str) -> None:
    store_url = lab.s3_store() if store == "S3" else lab.file_store("starts")
    times = []
    for _ in range(settings.starts):
        server = lab.pager(f"start-{store}", lab.config(f"start-{store}", store_url))
        times.append(server.wait_healthy())
        lab.stop(server)
    value = median(times)
    report.add(Figure(f"Start → first 200 from /healthz, {store}", value, "s", samples=times,
                      detail=f"(median of {len(times)} starts; max {max(times):.2f} s)",
                      target=f"< {TARGETS['start_s']:g} s", ok=value < TARGETS["start_s"]))


# ==============================================================================================
# Command line
# ==============================================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark oncall-pager against the targets of SPEC section 10.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds counted per throughput run, after a 0.5 s warm-up")
    parser.add_argument("--clients", type=int, default=4, help="load generator processes")
    parser.add_argument("--callbacks", type=int, default=50,
                        help="recording callbacks per run of part 3")
    parser.add_argument("--starts", type=int, default=5, help="starts timed per store")
    parser.add_argument("--json", type=Path, default=Path("bench_results.json"),
                        help="where to write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 1 repeat, 1 s runs, 20 callbacks, 2 starts")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (configs, stores, server logs)")
    parser.add_argument("--serve-trivial", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.duration, args.callbacks, args.starts = 1, 1.0, 20, 2
    if min(args.repeat, args.clients, args.callbacks, args.starts) < 1 or args.duration <= 0:
        parser.error("--repeat, --clients, --callbacks, --starts and --duration must be positive")
    return args


def run_benchmark(args: argparse.Namespace) -> Report:
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        lab = Lab(stack, pin_cpus=not args.no_pin)
        lab.keep_tmp = args.keep
        report = Report(
            settings={k: v for k, v in vars(args).items() if k != "serve_trivial"}
            | {"json": str(args.json), "server_threads": SERVER_THREADS,
               "bodies_per_client": BODIES_PER_CLIENT, "warmup_s": WARMUP},
            machine=machine_facts(lab.server_cpus, lab.client_cpus),
            generator=(f"{args.clients} client processes (multiprocessing, spawn), one "
                       "keep-alive connection each, minimal HTTP/1.1 client on a raw socket, "
                       f"closed loop, {BODIES_PER_CLIENT} pre-signed WHO bodies per process"))
        note(f"temporary folder {lab.tmp}; {report.machine['pinning']}")
        note("1/4 throughput: WHO (file, S3, file at INFO) and the trivial app")
        measure_throughput(lab, report, args)
        note("2/4 S3 requests per webhook")
        measure_store_requests(lab, report, args)
        note("3/4 recording callbacks")
        for store in ("file store", "S3"):
            measure_recording_callbacks(lab, report, args, store)
        note("4/4 start to /healthz")
        for store in ("file store", "S3"):
            measure_starts(lab, report, args, store)
        report.notes += [
            "Throughput runs log at WARNING to a file, so that one log line per request is not "
            "what is measured; the INFO rows are the production setting (also to a file).",
            "Each WHO has its own MessageSid (the app's reply cache would otherwise answer "
            "repeats); the trivial app gets the same bytes.",
            "The S3 rows run against moto in the benchmark's own process, on the generator's "
            "CPU: they measure the app plus moto on loopback, not AWS.",
        ]
    report.elapsed_s = time.monotonic() - began
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_trivial:
        serve_trivial(Path(args.serve_trivial))
        return 0
    try:
        report = run_benchmark(args)
    except BenchError as e:
        print(f"bench_oncall_pager: {e}", file=sys.stderr)
        return 1
    print(report.markdown())
    args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    print(f"\nJSON: {args.json.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
