#!/usr/bin/env python3
"""Benchmark llm_relay.py: the same loads sent direct to a fake upstream,
through nginx (a reference reverse proxy, when installed) and through the
relay, side by side in one run, with the relay's targets marked PASS or MISS.

Usage:
    python3 bench_llm_relay.py            # full run, about two and a half minutes
    python3 bench_llm_relay.py --quick    # smaller loads, about a minute
    python3 bench_llm_relay.py --json     # one JSON object instead of the table
    python3 bench_llm_relay.py --relay path/to/llm_relay.py
    python3 bench_llm_relay.py --relay-cpus 0   # the relay pinned (taskset -c 0)
    python3 bench_llm_relay.py --start script   # python3 llm_relay.py
    python3 bench_llm_relay.py --no-nginx

Processes, so that none shares a GIL with another:
  * the fake upstream: this script with --serve-upstream, an asyncio
    HTTP/1.1 keep-alive server.  POST /v1/chat/completions answers a small
    chat.completion JSON (Content-Length), or, when the body has
    "stream": true, a chunked text/event-stream: its head at once, then
    after bench_prefill seconds N events, each carrying the time.monotonic()
    at which it was written ("t"); GET /v1/models too.
  * the relay: `sys.executable -m llm_relay --config TMPFILE` from a copy
    in a temporary directory, compiled there first, as the README starts it
    (--start script: the file itself as a script), on a free 127.0.0.1 port, with one model rule that applies to every request
    (so each body is parsed, rewritten and serialized, as in real use).  Its
    memory and CPU come from /proc/PID/status and /proc/PID/stat.
  * nginx, when installed (apt-get install nginx-light): one process,
    proxy_buffering off, proxy_request_buffering off, keep-alive upstream
    connections, an access log, started on a free 127.0.0.1 port from a
    temporary config and stopped at the end.  Its figures are the "nginx"
    column; "vs nginx" is relay / nginx.
  * wrk, when installed (apt-get install wrk), for request throughput
    (one thread); otherwise this script's own client.
  * this process: the load-generating client (a blocking socket at
    concurrency 1, asyncio for concurrent loads), keep-alive.

Figures ("direct" = client -> upstream; "vs direct" = relay / direct;
"added" = relay - direct and "nginx added" = nginx - direct, percentile by
percentile):
  startup               spawn of the relay process until the first 200 from
                        GET /health (median of several spawns).
  idle RSS              relay VmRSS after startup and a few warm-up requests.
  20 MB body            a chat request with a base64 image, send to response
                        (first request, and median of several); the upstream
                        reports length and CRC-32 of what arrived, checked here.
  20 MB RSS growth      relay VmHWM after the first 20 MB request minus VmRSS
                        before it (peak reset through /proc/PID/clear_refs).
  latency c=1 pXX       one non-streamed chat completion on one keep-alive
                        connection, request written to response read; the
                        median over rounds (3) interleaving the peers.
  CPU per request c=1   the proxy's utime+stime over those requests / count.
  throughput c=N        requests per second with N keep-alive connections
                        (wrk -t1 when installed), median of 3 rounds; CPU per
                        request from the c=32 runs.
  stream S: TTFE        request written to first SSE event read (S streams).
  stream S: event delay arrival time at the client minus the upstream's send
                        time embedded in the event (same CLOCK_MONOTONIC).
  events not identical  events not byte-identical to what the upstream sent,
                        plus missing events (rebuilt from their stamp).
  load: ...             the load users have: load_streams concurrent streams,
                        each load_tokens_per_stream token events at
                        load_tokens_per_second after load_prefill seconds,
                        then the next stream on the same connection, plus
                        load_calls_per_second short non-streamed calls, for
                        load_seconds (default 200 streams at 60 tokens/s,
                        200 ms to first token, 50 calls/s, 20 s): per-token
                        delay p50/p99/p99.9, time to first token, short-call
                        latency, the proxy's CPU in cores and per token event.
  RSS per open stream   (relay VmRSS with 500 slow streams open - before) / 500.
  stream as Messages / Responses: added CPU per event
                        relay CPU per upstream event of a stream translated
                        from chat completions (a rule routes its model to the
                        same upstream declared "apis": ["chat"]) minus that of
                        the same stream passed through (sequential streams,
                        events back to back); "of which translation" times the
                        stream translator alone in this process.
  response_model asked  CPU the relay adds per streamed event when it renames
                        the model (response_model "asked"): model_renamer on
                        recorded chat chunk, message_start and Responses
                        event lines, and on a line without a model (the
                        common Messages/Responses delta), minus the loop
                        without renaming; in-process, llm_relay imported from
                        --relay.  Off (the default) it costs one None check.

The header shows the relay's sha256, the load average before and after the
run and a pure-Python calibration time, to tell a slower or busier machine
from a slower relay.

Loads go only to 127.0.0.1, are bounded in count and time, and every child
process is stopped on exit.  Exit status: 0 when the benchmark ran (missed
targets included: it is a report), 1 when relayed bytes differed or calls
failed, 2 when the benchmark itself failed.  Standard library only; Python
3.6+; Linux (/proc).
"""

import argparse
import asyncio
import atexit
import base64
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

try:
    import ctypes
    _LIBC = ctypes.CDLL(None, use_errno=True)
except (ImportError, OSError, AttributeError):
    _LIBC = None

HOST = "127.0.0.1"
MODEL = "bench-model"
TRANSLATED_MODEL = "bench-translated"  # routed to a chat-only upstream
TRANSLATED_UPSTREAM = "chat-only"  # the same fake upstream, "apis": ["chat"]
RELAY_PATH = [None]  # the relay under test, for the in-process translator figure
CREATED = 1700000000
BIG_BODY_BYTES = 20 * 1024 * 1024
SMALL_BODY_LIMIT = 1024 * 1024  # the fake upstream parses bodies below this
OPEN_STREAM_INTERVAL = 0.5  # seconds between events of the held-open streams
CLIENT_TIMEOUT = 30.0  # any single socket wait
HERE = os.path.dirname(os.path.abspath(__file__))

# Loads per mode: counts, durations and stream shapes.
MODES = {
    "full": {
        "startup_runs": 5,
        "rounds": 3,  # c=1 latency and throughput: median of this many rounds
        "c1_requests": 2000,
        "throughput_seconds": 2.0,
        "single_stream_runs": 5,
        "single_stream_events": 200,
        "translated_stream_runs": 20,
        "translated_stream_events": 500,
        "single_stream_interval": 0.002,
        "streams": 100,
        "stream_events": 200,
        "stream_interval": 0.02,
        "big_body_runs": 3,
        "open_streams": 500,
        "load_streams": 200,
        "load_tokens_per_second": 60.0,
        "load_prefill": 0.2,
        "load_tokens_per_stream": 256,
        "load_calls_per_second": 50.0,
        "load_seconds": 20.0,
    },
    "quick": {
        "startup_runs": 2,
        "rounds": 3,
        "c1_requests": 300,
        "throughput_seconds": 1.0,
        "single_stream_runs": 2,
        "single_stream_events": 50,
        "translated_stream_runs": 5,
        "translated_stream_events": 200,
        "single_stream_interval": 0.002,
        "streams": 100,
        "stream_events": 40,
        "stream_interval": 0.02,
        "big_body_runs": 3,
        "open_streams": 500,
        "load_streams": 200,
        "load_tokens_per_second": 60.0,
        "load_prefill": 0.2,
        "load_tokens_per_stream": 120,
        "load_calls_per_second": 50.0,
        "load_seconds": 4.0,
    },
}


class BenchError(Exception):
    """The benchmark itself failed (not a missed target)."""


###############################################################################
# Shared wire format ##########################################################
###############################################################################

COMPLETION_TEMPLATE = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":%d,'
    b'"model":"%s","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello from the fake upstream."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15},'
    % (CREATED, MODEL.encode())) + b'"bench":{"request_bytes":%d,"request_crc32":%d}}'
MODELS_BODY = json.dumps({"object": "list", "data": [{
    "id": MODEL, "object": "model", "created": CREATED, "owned_by": "bench"}]},
    separators=(",", ":")).encode()
DONE_EVENT = b"data: [DONE]\n\n"
STAMP_KEY = b',"t":'


def sse_event(stream_id, index, stamp):
    """Return event number index of a stream; stamp: send time, ASCII bytes.

    The content has multi-byte UTF-8 so that any re-encoding shows up.
    """
    return (b'data: {"id":"chatcmpl-bench-%d","object":"chat.completion.chunk",'
            b'"created":%d,"model":"%s","choices":[{"index":0,"delta":{"content":'
            b'"tok\xc3\xa9n %d \xe2\x9c\x93 "},"finish_reason":null}]%s%s}\n\n'
            % (stream_id, CREATED, MODEL.encode(), index, STAMP_KEY, stamp))


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def request_body(**extra):
    """A compact chat request; the relay's rule sets temperature to the same
    value, so the rewritten body is byte-identical to this one."""
    body = {"model": MODEL, "temperature": 0.5,
            "messages": [{"role": "user", "content": "Say hello."}]}
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


def stream_body(stream_id, events, interval, prefill=0.0):
    return request_body(stream=True, bench_stream_id=stream_id,
                        bench_events=events, bench_interval=interval,
                        bench_prefill=prefill)


def http_request(port, body, path=b"/v1/chat/completions"):
    """Raw HTTP/1.1 keep-alive POST, headers like an OpenAI SDK's."""
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: bench-llm-relay\r\n"
            b"Accept: application/json\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%s"
            % (path, HOST.encode(), port, len(body), body))


def header_value(head, name):
    """Value of header name (lowercase bytes) in a raw head, or None."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def status_of(head):
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise BenchError("bad status line %r" % head[:80])


###############################################################################
# Fake upstream (child process: --serve-upstream) #############################
###############################################################################

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")


def json_response(body, status=b"200 OK"):
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))


def parse_request_head(head):
    lines = head.split(b"\r\n")
    method, target = lines[0].split(b" ")[:2]
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    return method, target, headers


async def upstream_connection(reader, writer):
    """Serve one keep-alive connection until the peer closes it."""
    writer.get_extra_info("socket").setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, headers = parse_request_head(head)
            length = int(headers.get(b"content-length", b"0"))
            body = await reader.readexactly(length) if length else b""
            await upstream_answer(writer, method, target, body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass  # the peer closed the connection
    finally:
        writer.close()


async def upstream_answer(writer, method, target, body):
    if method == b"POST" and target == b"/v1/chat/completions":
        request = json.loads(body.decode()) if len(body) < SMALL_BODY_LIMIT else {}
        if request.get("stream") is True:
            await upstream_stream(writer, request)
        else:
            writer.write(json_response(
                COMPLETION_TEMPLATE % (len(body), zlib.crc32(body))))
    elif method == b"GET" and target == b"/v1/models":
        writer.write(json_response(MODELS_BODY))
    else:
        writer.write(json_response(b'{"error":{"message":"not found"}}',
                                   b"404 Not Found"))


async def upstream_stream(writer, request):
    """Send the head, wait bench_prefill seconds (the model reading the
    prompt), then send bench_events events, bench_interval seconds apart,
    each stamped with time.monotonic() just before it is written."""
    request = bench_parameters(request)
    stream_id = int(request.get("bench_stream_id", 0))
    events = int(request.get("bench_events", 10))
    interval = float(request.get("bench_interval", 0.01))
    prefill = float(request.get("bench_prefill", 0.0))
    loop = asyncio.get_event_loop()
    writer.write(SSE_HEAD)
    start = loop.time() + prefill
    for index in range(events):
        delay = start + index * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(chunk(sse_event(stream_id, index, b"%.6f" % time.monotonic())))
        await writer.drain()  # raises once the peer has gone
    writer.write(chunk(DONE_EVENT) + b"0\r\n\r\n")


def bench_parameters(request):
    """Return a stream request's bench_* parameters: its own fields, or, in
    a request the relay translated from Messages or Responses (which drops
    unknown fields), the JSON object in its "user" field."""
    user = request.get("user")
    if isinstance(user, str) and user.startswith("{"):
        return dict(request, **json.loads(user))
    return request


def serve_upstream():
    """Run the fake upstream; print its port; exit when stdin closes."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(asyncio.start_server(
        upstream_connection, HOST, 0, backlog=2048, limit=1024 * 1024))
    sys.stdout.write("%d\n" % server.sockets[0].getsockname()[1])
    sys.stdout.flush()

    def wait_for_parent():
        sys.stdin.buffer.read()  # EOF: the benchmark ended, however it ended
        os._exit(0)
    threading.Thread(target=wait_for_parent, daemon=True).start()
    loop.run_forever()


###############################################################################
# Child processes and /proc ###################################################
###############################################################################

_CHILDREN = []


def _die_with_parent():
    """preexec_fn: SIGTERM the child when the benchmark dies (Linux prctl)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(argv, cpus=None, **kwargs):
    """Start a child that dies with this process; cpus: pin it (taskset)."""
    def prepare():
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
    process = subprocess.Popen(argv, preexec_fn=prepare, **kwargs)
    _CHILDREN.append(process)
    return process


def stop(process, graceful=True):
    """SIGTERM (SIGKILL unless graceful), then SIGKILL after 3 s; safe to
    call twice."""
    if process.poll() is None:
        process.terminate() if graceful else process.kill()
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream:
            stream.close()


@atexit.register
def stop_children():
    while _CHILDREN:
        stop(_CHILDREN.pop())


def start_upstream(workdir):
    """Start the fake upstream process; return (Popen, port)."""
    log = open(os.path.join(workdir, "upstream.log"), "wb")
    process = spawn([sys.executable, os.path.abspath(__file__), "--serve-upstream"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    log.close()
    line = process.stdout.readline()
    if not line.strip().isdigit():
        raise BenchError("the fake upstream did not start: %r" % line)
    return process, int(line)


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def write_relay_config(workdir, port, upstream_port):
    config = {
        "listen": "%s:%d" % (HOST, port),
        "upstream": "http://%s:%d/v1" % (HOST, upstream_port),
        "shutdown_grace": 0,
        "upstreams": {TRANSLATED_UPSTREAM: {
            "url": "http://%s:%d/v1" % (HOST, upstream_port), "apis": ["chat"]}},
        "model_rules": [{"match_model": MODEL, "set": {"temperature": 0.5}},
                        {"match_model": TRANSLATED_MODEL, "set": {"model": MODEL},
                         "upstream": TRANSLATED_UPSTREAM}],
    }
    path = os.path.join(workdir, "relay-%d.jsonc" % port)
    with open(path, "w") as handle:
        handle.write("// bench_llm_relay.py\n" + json.dumps(config, indent=2))
    return path


RELAY_START = {"cpus": None, "module": True}  # set from the command line


def relay_command(relay_path, workdir):
    """(command line, working directory) of the relay: the script itself, or
    a copy in workdir started as a module from bytecode compiled there
    first, as the README starts it (so the repository gets no __pycache__)."""
    if not RELAY_START["module"]:
        return [sys.executable, relay_path], os.path.dirname(relay_path)
    copy = os.path.join(workdir, "llm_relay.py")
    if not os.path.exists(copy):
        import py_compile
        shutil.copyfile(relay_path, copy)
        py_compile.compile(copy, doraise=True)
    return [sys.executable, "-m", "llm_relay"], workdir


class Relay(object):
    """A relay subprocess on a free port; startup is spawn to first /health."""

    def __init__(self, relay_path, upstream_port, workdir, attempts=3):
        for attempt in range(attempts):
            self.port = free_port()
            config = write_relay_config(workdir, self.port, upstream_port)
            self.log_path = os.path.join(workdir, "relay-%d.log" % self.port)
            command, directory = relay_command(relay_path, workdir)
            with open(self.log_path, "wb") as log:
                started = time.perf_counter()
                self.process = spawn(command + ["--config", config],
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=log,
                                     cwd=directory, cpus=RELAY_START["cpus"])
            if wait_health(self.port, self.process, timeout=10.0):
                self.startup = time.perf_counter() - started
                self.pid = self.process.pid
                self.name = "relay"
                return
            stop(self.process)  # the port was taken meanwhile: try another
        raise BenchError("the relay did not start; its log:\n" + self.log_tail())

    def log_tail(self, lines=20):
        with open(self.log_path, "rb") as log:
            return b"".join(log.readlines()[-lines:]).decode("utf-8", "replace")

    def stop(self, graceful=True):
        stop(self.process, graceful)


class Peer(object):
    """Something the loads are sent to: name, port and the pid whose CPU is
    counted (None: not counted)."""

    def __init__(self, name, port, pid=None):
        self.name, self.port, self.pid = name, port, pid


NGINX_CONFIG = """# bench_llm_relay.py: nginx as a reference reverse proxy
worker_processes 1;
master_process off;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log warn;
worker_rlimit_nofile 8192;
events { worker_connections 4096; }
http {
    access_log %(dir)s/nginx-access.log;
    client_body_temp_path %(dir)s/nginx-body;
    proxy_temp_path %(dir)s/nginx-proxy;
    fastcgi_temp_path %(dir)s/nginx-fastcgi;
    uwsgi_temp_path %(dir)s/nginx-uwsgi;
    scgi_temp_path %(dir)s/nginx-scgi;
    client_max_body_size 64m;
    keepalive_requests 1000000;
    upstream fake {
        server %(host)s:%(upstream_port)d;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen %(host)s:%(port)d;
        location / {
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
"""


def find_program(name):
    """Path of an installed program (also in sbin, where nginx lives), or None."""
    for directory in os.environ.get("PATH", "").split(os.pathsep) + [
            "/usr/sbin", "/usr/local/sbin", "/sbin"]:
        path = os.path.join(directory, name)
        if directory and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def start_nginx(upstream_port, workdir):
    """nginx (one process, proxy_buffering off, keep-alive upstream) on a free
    port; return its Peer, or None when nginx is not installed."""
    program = find_program("nginx")
    if program is None:
        return None
    port = free_port()
    config = os.path.join(workdir, "nginx.conf")
    with open(config, "w") as handle:
        handle.write(NGINX_CONFIG % {"dir": workdir, "host": HOST, "port": port,
                                     "upstream_port": upstream_port})
    log = open(os.path.join(workdir, "nginx-stderr.log"), "wb")
    process = spawn([program, "-p", workdir, "-c", config], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection((HOST, port), timeout=1.0).close()
            return Peer("nginx", port, process.pid)
        except OSError:
            time.sleep(0.01)
    stop(process)
    raise BenchError("nginx did not start; see %s" % config)


def get_health(port):
    """True when GET /health answers 200 (raises OSError before listening)."""
    with socket.create_connection((HOST, port), timeout=2.0) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: %s:%d\r\n"
                     b"Connection: close\r\n\r\n" % (HOST.encode(), port))
        data = b""
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return data.startswith(b"HTTP/1.1 200")


def wait_health(port, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if get_health(port):
                return True
        except OSError:
            pass
        time.sleep(0.001)
    return False


def proc_status(pid):
    """VmRSS, VmHWM (bytes) and Threads of a process from /proc."""
    values = {}
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                values[key] = int(value)
    return values


def proc_cpu_seconds(pid):
    """utime + stime of a process, in seconds (10 ms resolution)."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def reset_peak_rss(pid):
    """Set VmHWM to the current VmRSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def wait_threads(pid, at_most, timeout):
    """Wait until the relay is back to at_most threads (streams finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_status(pid)["Threads"] <= at_most:
            return True
        time.sleep(0.05)
    return False


###############################################################################
# Statistics ##################################################################
###############################################################################

def percentile(values, q):
    """Nearest-rank percentile q (0-100) of values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(math.ceil(q / 100.0 * len(ordered))))
    return ordered[min(rank, len(ordered)) - 1]


def median(values):
    return percentile(values, 50)


###############################################################################
# Client: blocking (concurrency 1, 20 MB body) ################################
###############################################################################

class BlockingClient(object):
    """One keep-alive HTTP/1.1 connection over a plain socket."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def _fill(self):
        data = self.sock.recv(262144)
        if not data:
            raise BenchError("connection closed mid-response")
        self.buffer += data

    def request(self, raw):
        """Send raw request bytes; return (status, body) of a Content-Length
        response."""
        self.sock.sendall(raw)
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        head = bytes(self.buffer[:end])
        del self.buffer[:end + 4]
        length = int(header_value(head, b"content-length") or 0)
        while len(self.buffer) < length:
            self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status_of(head), body

    def close(self):
        self.sock.close()


def latency_sequential(port, count, warmup=100):
    """Latencies (s) of count non-streamed requests on one connection."""
    raw = http_request(port, request_body())
    client = BlockingClient(port)
    latencies = []
    try:
        for number in range(warmup + count):
            started = time.perf_counter()
            status, _ = client.request(raw)
            elapsed = time.perf_counter() - started
            if status != 200:
                raise BenchError("status %d at concurrency 1" % status)
            if number >= warmup:
                latencies.append(elapsed)
    finally:
        client.close()
    return latencies


def make_big_body(total):
    """A chat request of total bytes: a base64 PNG-ish image in messages."""
    prefix = (b'{"model":"%s","temperature":0.5,"messages":[{"role":"user",'
              b'"content":[{"type":"text","text":"What is in this image?"},'
              b'{"type":"image_url","image_url":{"url":"data:image/png;base64,'
              % MODEL.encode())
    suffix = b'"}}]}]}'
    b64_chars = (total - len(prefix) - len(suffix)) // 4 * 4
    image = base64.b64encode(os.urandom(b64_chars // 4 * 3))
    return prefix + image + suffix


def send_big_body(port, raw, body_length, body_crc):
    """Seconds to send one big request and read its answer; checks that the
    upstream received exactly the body that was sent."""
    client = BlockingClient(port)
    try:
        started = time.perf_counter()
        status, answer = client.request(raw)
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    if status != 200:
        raise BenchError("20 MB body: status %d: %s" % (status, answer[:200]))
    received = json.loads(answer.decode())["bench"]
    if (received["request_bytes"], received["request_crc32"]) != (
            body_length, body_crc):
        raise BenchError("20 MB body arrived altered: %r" % received)
    return elapsed


###############################################################################
# Client: asyncio (concurrent loads) ##########################################
###############################################################################

def run_async(coroutine_function, *args, timeout=120.0):
    """Run coroutine_function(*args) in a fresh event loop, bounded in time."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def bounded():
        return await asyncio.wait_for(coroutine_function(*args), timeout)
    try:
        return loop.run_until_complete(bounded())
    finally:
        loop.run_until_complete(asyncio.sleep(0.01))  # let transports close
        loop.close()
        asyncio.set_event_loop(None)


async def connect(port):
    reader, writer = await asyncio.open_connection(HOST, port, limit=1024 * 1024)
    writer.get_extra_info("socket").setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def read_response(reader):
    """Read one Content-Length response; return (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(header_value(head, b"content-length") or 0)
    body = await reader.readexactly(length) if length else b""
    return status_of(head), body


async def keepalive_load(port, concurrency, seconds, max_requests=200000):
    """Run concurrency keep-alive connections for seconds; return
    (latencies, elapsed seconds)."""
    raw = http_request(port, request_body())
    latencies = []
    deadline = time.monotonic() + seconds

    async def worker():
        reader, writer = await connect(port)
        try:
            while time.monotonic() < deadline and len(latencies) < max_requests:
                started = time.perf_counter()
                writer.write(raw)
                status, _ = await read_response(reader)
                if status != 200:
                    raise BenchError("status %d under load" % status)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()
    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies, time.perf_counter() - started


class StreamResult(object):
    """What one client saw of one SSE stream."""

    def __init__(self, stream_id, expected_events):
        self.stream_id = stream_id
        self.expected = expected_events
        self.delays = []  # per event: arrival - upstream send time (s)
        self.ttfe = None
        self.mismatches = 0
        self.done = False

    def add(self, event, arrived, sent):
        if event == DONE_EVENT:
            self.done = True
            return
        index = len(self.delays)
        position = event.rfind(STAMP_KEY)
        stamp = event[position + len(STAMP_KEY):event.rfind(b"}")]
        try:
            delay = arrived - float(stamp)
        except ValueError:
            self.mismatches += 1
            self.delays.append(None)
            return
        if event != sse_event(self.stream_id, index, stamp):
            self.mismatches += 1
        self.delays.append(delay)
        if index == 0:
            self.ttfe = arrived - sent

    def finish(self):
        """Count missing or extra events and a missing [DONE] as mismatches."""
        self.mismatches += abs(self.expected - len(self.delays))
        self.mismatches += 0 if self.done else 1
        self.delays = [delay for delay in self.delays if delay is not None]


async def read_chunk(reader):
    """One chunk of a chunked body; b"" at its end."""
    size = int((await reader.readline()).split(b";", 1)[0], 16)
    if size == 0:
        await reader.readline()  # the empty trailer
        return b""
    return (await reader.readexactly(size + 2))[:-2]


async def read_stream_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    if status_of(head) != 200 or (
            header_value(head, b"transfer-encoding") or b"").lower() != b"chunked":
        raise BenchError("unexpected stream head: %r" % head[:300])


async def run_stream(port, stream_id, events, interval):
    """Request one stream, read it to its end; return its StreamResult."""
    reader, writer = await connect(port)
    result = StreamResult(stream_id, events)
    try:
        sent = time.monotonic()
        writer.write(http_request(port, stream_body(stream_id, events, interval)))
        await read_stream_head(reader)
        pending = b""
        while True:
            data = await read_chunk(reader)
            arrived = time.monotonic()
            if not data:
                break
            pending += data
            end = pending.find(b"\n\n")
            while end >= 0:
                result.add(pending[:end + 2], arrived, sent)
                pending = pending[end + 2:]
                end = pending.find(b"\n\n")
        result.mismatches += 1 if pending else 0
    finally:
        writer.close()
    result.finish()
    return result


async def concurrent_streams(port, count, events, interval):
    return await asyncio.gather(*[run_stream(port, stream_id, events, interval)
                                  for stream_id in range(count)])


async def sequential_streams(port, runs, events, interval):
    return [await run_stream(port, stream_id, events, interval)
            for stream_id in range(runs)]


async def hold_streams(port, count, measure):
    """Open count slow streams, wait for each one's first event, call
    measure() while all are open, then close them; return measure()'s value."""
    ready = []
    all_ready = asyncio.Event()
    release = asyncio.Event()

    async def hold(stream_id):
        reader, writer = await connect(port)
        try:
            writer.write(http_request(port, stream_body(
                stream_id, 100000, OPEN_STREAM_INTERVAL)))
            await read_stream_head(reader)
            await read_chunk(reader)
            ready.append(stream_id)
            if len(ready) == count:
                all_ready.set()
            await release.wait()
        finally:
            writer.close()
    tasks = [asyncio.ensure_future(hold(stream_id)) for stream_id in range(count)]
    try:
        waiter = asyncio.ensure_future(all_ready.wait())
        await asyncio.wait([waiter] + tasks, return_when=asyncio.FIRST_COMPLETED,
                           timeout=CLIENT_TIMEOUT)
        waiter.cancel()
        for task in tasks:
            if task.done() and task.exception():
                raise task.exception()
        if len(ready) < count:
            raise BenchError("only %d of %d streams opened" % (len(ready), count))
        await asyncio.sleep(0.3)  # let the relay's threads settle
        return measure()
    finally:
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)


###############################################################################
# Client: the realistic load (asyncio protocols) ##############################
###############################################################################

class ResponseProtocol(asyncio.Protocol):
    """One keep-alive connection carrying requests one after another.

    Responses are decoded incrementally in data_received (cheaper than
    streams at thousands of events per second): a Content-Length body
    completes the request's future with (status, body); a chunked SSE body
    feeds each event, stamped with its arrival time, to a StreamResult."""

    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.buffer = bytearray()
        self.state = "idle"
        self.need = 0
        self.status = None
        self.result = None
        self.pending = b""
        self.sent = 0.0
        self.done = None

    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def connection_lost(self, error):
        if self.done is not None and not self.done.done():
            self.done.set_exception(BenchError("connection closed mid-response"))

    def request(self, raw, result=None):
        """Send raw; return a future of (status, body), or of result (a
        StreamResult) once its stream has ended."""
        self.result, self.pending, self.state = result, b"", "head"
        self.done = self.loop.create_future()
        self.sent = time.monotonic()
        self.transport.write(raw)
        return self.done

    def _finish(self, value):
        self.state = "idle"
        if not self.done.done():
            self.done.set_result(value)

    def data_received(self, data):
        arrived = time.monotonic()
        buffer = self.buffer
        buffer += data
        while True:
            if self.state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                self.need = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                del buffer[:end + 2]
                self.state = "chunk" if self.need else "trailer"
            elif self.state == "chunk":
                if len(buffer) < self.need + 2:
                    return
                self._events(bytes(buffer[:self.need]), arrived)
                del buffer[:self.need + 2]
                self.state = "size"
            elif self.state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end])
                del buffer[:end + 4]
                self.status = status_of(head)
                chunked = (header_value(head, b"transfer-encoding") or b"").lower()
                if self.result is not None and (
                        self.status != 200 or chunked != b"chunked"):
                    self.done.set_exception(BenchError(
                        "unexpected stream head: %r" % head[:300]))
                    self.transport.close()
                    return
                if chunked == b"chunked":
                    self.state = "size"
                else:
                    self.need = int(header_value(head, b"content-length") or 0)
                    self.state = "body"
            elif self.state == "body":
                if len(buffer) < self.need:
                    return
                body = bytes(buffer[:self.need])
                del buffer[:self.need]
                self._finish((self.status, body))
            elif self.state == "trailer":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[:end + 2]
                if end == 0:
                    if self.pending:
                        self.result.mismatches += 1
                    self._finish(self.result)
            else:
                return  # bytes nobody asked for: the next request reports them

    def _events(self, data, arrived):
        if self.result is None:
            return
        pending = self.pending + data
        end = pending.find(b"\n\n")
        while end >= 0:
            self.result.add(pending[:end + 2], arrived, self.sent)
            pending = pending[end + 2:]
            end = pending.find(b"\n\n")
        self.pending = pending


class LoadResult(object):
    """What the realistic load saw: stream results, call latencies (s), the
    peer's CPU seconds and the wall time of the load."""

    def __init__(self):
        self.streams = []
        self.calls = []
        self.call_errors = 0
        self.cpu = None
        self.wall = 0.0


async def realistic_load(port, mode):
    """load_streams concurrent streams (each load_tokens_per_stream events at
    load_tokens_per_second after load_prefill, then the next on the same
    connection) plus load_calls_per_second short non-streamed calls, for
    load_seconds; return a LoadResult (cpu left for the caller)."""
    loop = asyncio.get_event_loop()
    result = LoadResult()
    rate = mode["load_tokens_per_second"]
    prefill = mode["load_prefill"]
    started = loop.time()
    deadline = started + mode["load_seconds"]
    # Streams start spread over the time of one stream, as users arrive.
    spread = min(mode["load_tokens_per_stream"] / rate, mode["load_seconds"] / 4.0)

    async def stream_slot(slot):
        await asyncio.sleep(spread * slot / mode["load_streams"])
        _, protocol = await loop.create_connection(
            lambda: ResponseProtocol(loop), HOST, port)
        try:
            for number in range(1000000):
                events = min(mode["load_tokens_per_stream"],
                             int((deadline - loop.time() - prefill) * rate))
                if events < 1:
                    break
                stream_id = slot * 10000 + number
                result.streams.append(await protocol.request(
                    http_request(port, stream_body(stream_id, events, 1.0 / rate,
                                                   prefill)),
                    StreamResult(stream_id, events)))
        finally:
            protocol.transport.close()

    idle = []

    async def one_call():
        if idle:
            protocol = idle.pop()
        else:
            _, protocol = await loop.create_connection(
                lambda: ResponseProtocol(loop), HOST, port)
        call_started = time.perf_counter()
        status, _ = await protocol.request(http_request(port, request_body()))
        if status == 200:
            result.calls.append(time.perf_counter() - call_started)
        else:
            result.call_errors += 1
        idle.append(protocol)

    async def calls():
        interval = 1.0 / mode["load_calls_per_second"]
        tasks = []
        for number in range(10 ** 7):
            at = started + number * interval
            if at >= deadline:
                break
            if at > loop.time():
                await asyncio.sleep(at - loop.time())
            tasks.append(asyncio.ensure_future(one_call()))
        await asyncio.gather(*tasks)
        for protocol in idle:
            protocol.transport.close()

    await asyncio.gather(calls(), *[stream_slot(slot)
                                    for slot in range(mode["load_streams"])])
    result.wall = loop.time() - started
    for stream in result.streams:
        stream.finish()
    return result


###############################################################################
# Measurements ################################################################
###############################################################################

TIME_UNITS = ("s", "ms", "us")


class Report(object):
    """Figures, in order, as dicts; see figure()."""

    def __init__(self):
        self.figures = []
        self.section_seconds = {}

    def section(self, name, function, *args):
        """Run function(*args) and remember its wall time under name."""
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.section_seconds[name] = round(time.perf_counter() - started, 2)

    def figure(self, key, label, unit, relay, direct=None, target=None,
               passed=None, scale=1.0, nginx=None):
        """Add one figure.  Values are in base units (s, bytes...) and are
        multiplied by scale for display in unit; target is a text and passed
        True, False or None (no target).  "vs direct" and "vs nginx" are
        relay / direct and relay / nginx; "added" is relay - direct."""
        shown = (lambda value: value if value is None or scale == 1 else value * scale)
        ratio = (relay / direct) if relay is not None and direct else None
        nginx_ratio = (relay / nginx) if relay is not None and nginx else None
        added = nginx_added = None
        if unit in TIME_UNITS and direct is not None:
            added = None if relay is None else relay - direct
            nginx_added = None if nginx is None else nginx - direct
        self.figures.append({
            "key": key, "label": label, "unit": unit, "direct": shown(direct),
            "nginx": shown(nginx), "relay": shown(relay), "ratio": ratio,
            "nginx_ratio": nginx_ratio, "added": shown(added),
            "nginx_added": shown(nginx_added), "target": target, "pass": passed})


class Samples(object):
    """Per peer name, lists of samples of named quantities."""

    def __init__(self):
        self.values = {}

    def add(self, peer, quantity, value):
        if value is not None:
            self.values.setdefault((peer.name, quantity), []).append(value)

    def median(self, name, quantity):
        return median(self.values.get((name, quantity), []))

    def of(self, quantity):
        """(relay, direct, nginx) medians of quantity."""
        return tuple(self.median(name, quantity)
                     for name in ("relay", "direct", "nginx"))


def cpu_seconds(peer):
    return None if peer.pid is None else proc_cpu_seconds(peer.pid)


def cpu_used(peer, before, work):
    """CPU seconds of peer since before, divided by work (None: not counted)."""
    if before is None:
        return None
    return (proc_cpu_seconds(peer.pid) - before) / float(max(1, work))


def measure_startup(relay_path, upstream_port, workdir, runs):
    samples = []
    for _ in range(runs):
        relay = Relay(relay_path, upstream_port, workdir)
        samples.append(relay.startup)
        relay.stop(graceful=False)  # a graceful stop waits for its poll interval
    return samples


def warm_up(port):
    latency_sequential(port, 20, warmup=0)
    run_async(sequential_streams, port, 1, 5, 0.0)


def measure_idle(report, relay, startup_samples, peers):
    startup = median(startup_samples)
    report.figure("startup_ms", "startup to first /health", "ms", startup,
                  target="<= 200 ms", passed=startup <= 0.200, scale=1e3)
    for peer in peers:
        warm_up(peer.port)
    time.sleep(0.3)
    idle = proc_status(relay.pid)["VmRSS"]
    report.figure("idle_rss_mib", "idle RSS", "MiB", idle, target="<= 25 MiB",
                  passed=idle <= 25 * 2 ** 20, scale=2 ** -20)


def measure_big_body(report, relay, upstream_port, runs):
    body = make_big_body(BIG_BODY_BYTES)
    crc = zlib.crc32(body)
    direct = [send_big_body(upstream_port, http_request(upstream_port, body),
                            len(body), crc) for _ in range(runs)]
    raw = http_request(relay.port, body)
    before = proc_status(relay.pid)["VmRSS"]
    exact = reset_peak_rss(relay.pid)
    through = [send_big_body(relay.port, raw, len(body), crc)]
    growth = proc_status(relay.pid)["VmHWM"] - before
    through += [send_big_body(relay.port, raw, len(body), crc)
                for _ in range(runs - 1)]
    took = median(through)
    report.figure("big_body_first_s", "20 MB body, first request", "s",
                  through[0], direct[0])
    report.figure("big_body_s", "20 MB body, median of %d" % runs, "s", took,
                  median(direct), target="< 0.5 s", passed=took < 0.5)
    report.figure("big_body_rss_growth_x", "20 MB body peak RSS growth%s" % (
        "" if exact else " (HWM since start)"), "x body", growth / float(len(body)),
        target="< 3x body", passed=growth < 3 * len(body))


def measure_concurrency_1(report, peers, rounds, count):
    """Latency of one connection, rounds rounds interleaving the peers."""
    samples = Samples()
    warmup = 100
    for _ in range(rounds):
        for peer in peers:
            before = cpu_seconds(peer)
            latencies = latency_sequential(peer.port, count, warmup)
            samples.add(peer, "cpu", cpu_used(peer, before, count + warmup))
            for q in (50, 99):
                samples.add(peer, q, percentile(latencies, q))
    relay, direct, nginx = samples.of(50)
    report.figure("latency_c1_p50_ms", "latency c=1 p50 (median of %d)" % rounds,
                  "ms", relay, direct, target="added <= 0.15 ms",
                  passed=relay - direct <= 0.00015, scale=1e3, nginx=nginx)
    relay, direct, nginx = samples.of(99)
    report.figure("latency_c1_p99_ms", "latency c=1 p99 (median of %d)" % rounds,
                  "ms", relay, direct, scale=1e3, nginx=nginx)
    relay, _, nginx = samples.of("cpu")
    report.figure("cpu_per_request_c1_ms", "CPU per request c=1", "ms", relay,
                  target="<= 0.2 ms", passed=relay <= 0.0002, scale=1e3, nginx=nginx)


WRK_SCRIPT = """-- bench_llm_relay.py: the benchmark's non-streamed chat request
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


def run_wrk(program, script, port, connections, seconds):
    """(requests, seconds) of one wrk run; raises BenchError on any error."""
    seconds = max(1, int(round(seconds)))  # wrk takes whole seconds
    command = [program, "-t1", "-c%d" % connections, "-d%ds" % seconds,
               "-s", script, "http://%s:%d/v1/chat/completions" % (HOST, port)]
    output = subprocess.check_output(command, stderr=subprocess.STDOUT,
                                     timeout=seconds + 30).decode()
    if "Non-2xx" in output or "Socket errors" in output:
        raise BenchError("wrk saw errors:\n" + output)
    for line in output.splitlines():
        words = line.split()
        if len(words) > 3 and words[1:3] == ["requests", "in"]:
            took = words[3].rstrip(",")
            if took.endswith("ms"):
                return int(words[0]), float(took[:-2]) / 1e3
            if took.endswith("m"):
                return int(words[0]), float(took[:-1]) * 60.0
            return int(words[0]), float(took.rstrip("s"))
    raise BenchError("unexpected wrk output:\n" + output)


def run_client(port, connections, seconds):
    """(requests, seconds) from this script's own keep-alive client."""
    latencies, elapsed = run_async(keepalive_load, port, connections, seconds)
    return len(latencies), elapsed


def measure_throughput(report, peers, rounds, seconds, workdir):
    """Requests per second at c=1 and c=32, rounds rounds interleaving the
    peers, with wrk when it is installed (one thread), else this client."""
    program = find_program("wrk")
    script = os.path.join(workdir, "wrk-post.lua")
    with open(script, "w") as handle:
        handle.write(WRK_SCRIPT % request_body().decode())
    if program:
        run = (lambda port, connections: run_wrk(program, script, port,
                                                 connections, seconds))
    else:
        run = (lambda port, connections: run_client(port, connections, seconds))
    client = "wrk -t1" if program else "this script's client"
    samples = Samples()
    for _ in range(rounds):
        for connections in (1, 32):
            for peer in peers:
                before = cpu_seconds(peer)
                requests, elapsed = run(peer.port, connections)
                samples.add(peer, connections, requests / elapsed)
                samples.add(peer, ("cpu", connections),
                            cpu_used(peer, before, requests))
    relay_c1, direct_c1, nginx_c1 = samples.of(1)
    report.figure("throughput_c1_rps", "throughput c=1, %s (median of %d)" % (
        client, rounds), "req/s", relay_c1, direct_c1, nginx=nginx_c1)
    relay, direct, nginx = samples.of(32)
    enough = relay >= relay_c1 and (nginx is None or relay >= 0.08 * nginx)
    report.figure("throughput_c32_rps", "throughput c=32, %s (median of %d)" % (
        client, rounds), "req/s", relay, direct, nginx=nginx,
        target=">= 8% of nginx, >= c=1" if nginx else ">= c=1", passed=enough)
    relay, _, nginx = samples.of(("cpu", 32))
    report.figure("cpu_per_request_c32_ms", "CPU per request c=32", "ms", relay,
                  scale=1e3, nginx=nginx)


def stream_stats(results):
    delays = [delay for result in results for delay in result.delays]
    ttfes = [result.ttfe for result in results if result.ttfe is not None]
    return {"delays": delays, "ttfes": ttfes,
            "mismatches": sum(result.mismatches for result in results),
            "events": sum(len(result.delays) for result in results)}


def report_quantiles(report, key, label, stats, field, quantiles, targets=None):
    """One figure per quantile q of stats[peer][field]; targets: {q: added
    limit in seconds}."""
    targets = targets or {}
    for q in quantiles:
        relay, direct, nginx = (
            percentile(stats[name][field], q) if name in stats else None
            for name in ("relay", "direct", "nginx"))
        limit = targets.get(q)
        report.figure("%s_p%s_ms" % (key, str(q).replace(".", "_")),
                      "%s p%s" % (label, q), "ms", relay, direct, nginx=nginx,
                      target=None if limit is None else "added <= %g ms" % (limit * 1e3),
                      passed=None if limit is None else relay - direct <= limit,
                      scale=1e3)


def measure_streams(report, peers, mode):
    """One stream at a time, then mode["streams"] concurrent streams, per
    peer; return the number of event mismatches."""
    single, many, cpu = {}, {}, {}
    for peer in peers:
        single[peer.name] = stream_stats(run_async(
            sequential_streams, peer.port, mode["single_stream_runs"],
            mode["single_stream_events"], mode["single_stream_interval"]))
    for peer in peers:
        before = cpu_seconds(peer)
        many[peer.name] = stream_stats(run_async(
            concurrent_streams, peer.port, mode["streams"],
            mode["stream_events"], mode["stream_interval"]))
        cpu[peer.name] = cpu_used(peer, before, many[peer.name]["events"])
    report_quantiles(report, "stream_1_ttfe", "stream 1: TTFE", single, "ttfes", (50,))
    report_quantiles(report, "stream_1_event_delay", "stream 1: event delay",
                     single, "delays", (50, 99))
    name = "stream %d" % mode["streams"]
    key = name.replace(" ", "_")
    report_quantiles(report, key + "_ttfe", name + ": TTFE", many, "ttfes", (50, 99))
    report_quantiles(report, key + "_event_delay", name + ": event delay", many,
                     "delays", (50, 99), {99: 0.001})
    report.figure(key + "_cpu_per_event_us", name + ": CPU per event", "us",
                  cpu["relay"], target="<= 30 us", passed=cpu["relay"] <= 30e-6,
                  scale=1e6, nginx=cpu.get("nginx"))
    mismatches = dict((name, single[name]["mismatches"] + many[name]["mismatches"])
                      for name in single)
    report.figure("event_mismatches", "events not byte-identical", "events",
                  mismatches["relay"], mismatches["direct"], target="0",
                  passed=mismatches["relay"] == 0, nginx=mismatches.get("nginx"))
    return sum(mismatches.values())


def measure_realistic(report, peers, mode):
    """The load users have (see realistic_load), per peer; return the number
    of event mismatches and failed calls."""
    stats, cpu, cores, calls, errors = {}, {}, {}, {}, {}
    for peer in peers:
        before = cpu_seconds(peer)
        load = run_async(realistic_load, peer.port, mode,
                         timeout=mode["load_seconds"] + 60.0)
        stats[peer.name] = stream_stats(load.streams)
        used = cpu_used(peer, before, 1)
        cpu[peer.name] = None if used is None else used / max(
            1, stats[peer.name]["events"])
        cores[peer.name] = None if used is None else used / load.wall
        calls[peer.name] = {"latencies": load.calls}
        errors[peer.name] = stats[peer.name]["mismatches"] + load.call_errors
    name = "load"
    report_quantiles(report, "load_token_delay", name + ": token delay", stats,
                     "delays", (50, 99, 99.9), {99: 0.002})
    report_quantiles(report, "load_ttft", name + ": TTFT", stats, "ttfes", (50, 99))
    report_quantiles(report, "load_call", name + ": short call", calls,
                     "latencies", (50, 99))
    report.figure("load_cpu_cores", name + ": CPU", "cores", cores["relay"],
                  nginx=cores.get("nginx"))
    report.figure("load_cpu_per_event_us", name + ": CPU per token event", "us",
                  cpu["relay"], target="<= 30 us", passed=cpu["relay"] <= 30e-6,
                  scale=1e6, nginx=cpu.get("nginx"))
    report.figure("load_events", name + ": token events received", "events",
                  stats["relay"]["events"], stats["direct"]["events"],
                  nginx=stats.get("nginx", {}).get("events"))
    report.figure("load_errors", name + ": events altered + calls failed",
                  "events", errors["relay"], errors["direct"], target="0",
                  passed=errors["relay"] == 0, nginx=errors.get("nginx"))
    return sum(errors.values())


def measure_open_streams(report, relay, count):
    time.sleep(0.3)
    before = proc_status(relay.pid)
    during = run_async(hold_streams, relay.port, count,
                       lambda: proc_status(relay.pid), timeout=60.0)
    per_stream = (during["VmRSS"] - before["VmRSS"]) / float(count)
    report.figure("rss_open_streams_mib", "RSS with %d open streams" % count, "MiB",
                  during["VmRSS"], scale=2 ** -20)
    report.figure("rss_per_stream_kib", "RSS growth per open stream", "KiB",
                  per_stream, target="<= 150 KiB", passed=per_stream <= 150 * 1024,
                  scale=2 ** -10)
    if not wait_threads(relay.pid, before["Threads"] + 2, timeout=10.0):
        raise BenchError("the relay kept threads after its streams closed")


REWRITE_EVENT_LINES = (
    ("chat chunk", b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk",'
     b'"created":1,"model":"qwen3-coder:30b","choices":[{"index":0,"delta":'
     b'{"content":" token"},"finish_reason":null}]}\n'),
    ("message_start", b'data: {"type":"message_start","message":{"id":"msg_1",'
     b'"type":"message","role":"assistant","model":"qwen3-coder:30b","content":[],'
     b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,'
     b'"output_tokens":1}}}\n'),
    ("Responses event", b'data: {"type":"response.in_progress","sequence_number":1,'
     b'"response":{"id":"resp_1","object":"response","created_at":1,"status":'
     b'"in_progress","model":"qwen3-coder:30b","output":[],"usage":null}}\n'),
    ("delta without model", b'data: {"type":"content_block_delta","index":0,'
     b'"delta":{"type":"text_delta","text":" token"}}\n'),
)


def load_relay_module(relay_path):
    """Import llm_relay from relay_path (for in-process measurements)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_llm_relay_target", relay_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_event_rewrite(report, relay_path, events=50000):
    """CPU per streamed event of response_model "asked" (see the docstring)."""
    relay = load_relay_module(relay_path)
    rename = relay.model_renamer("claude-sonnet-4-5-20250929")
    for name, line in REWRITE_EVENT_LINES:
        lines = [line] * events
        off = on = None
        for _ in range(3):  # best of three: the least disturbed run
            started = time.perf_counter()
            for item in lines:
                if None is not None:
                    item = rename(item)
            took = time.perf_counter() - started
            off = took if off is None else min(off, took)
            started = time.perf_counter()
            for item in lines:
                if rename is not None:
                    item = rename(item)
            took = time.perf_counter() - started
            on = took if on is None else min(on, took)
        report.figure("rename_%s_us" % name.replace(" ", "_").lower(),
                      "response_model asked: CPU per %s" % name, "us",
                      max(0.0, on - off) / events, scale=1e6)


SECTIONS = ("startup", "idle", "big_body", "concurrency_1", "throughput",
            "streams", "realistic_load", "open_streams", "translation",
            "event_rewrite")


def run_benchmark(relay_path, mode_name, with_nginx=True, only=SECTIONS):
    """Run the measurements named in only (all by default); return (Report,
    event mismatches, nginx used)."""
    mode = MODES[mode_name]
    report = Report()
    workdir = tempfile.mkdtemp(prefix="bench-llm-relay-")
    upstream, upstream_port = start_upstream(workdir)
    relay = None
    mismatches = 0

    def section(name, function, *args):
        return report.section(name, function, *args) if name in only else 0
    try:
        nginx = start_nginx(upstream_port, workdir) if with_nginx else None
        startup = section("startup", measure_startup, relay_path, upstream_port,
                          workdir, mode["startup_runs"] - 1) or []
        relay = Relay(relay_path, upstream_port, workdir)
        peers = [Peer("direct", upstream_port), relay] + ([nginx] if nginx else [])
        if "idle" in only:
            report.section("idle", measure_idle, report, relay,
                           startup + [relay.startup], peers)
        else:
            for peer in peers:
                warm_up(peer.port)
        section("big_body", measure_big_body, report, relay, upstream_port,
                mode["big_body_runs"])
        section("concurrency_1", measure_concurrency_1, report, peers,
                mode["rounds"], mode["c1_requests"])
        section("throughput", measure_throughput, report, peers,
                mode["rounds"], mode["throughput_seconds"], workdir)
        mismatches += section("streams", measure_streams, report, peers, mode)
        mismatches += section("realistic_load", measure_realistic, report, peers,
                              mode)
        section("open_streams", measure_open_streams, report, relay,
                mode["open_streams"])
        section("translation", measure_translation, report, relay, mode)
        section("event_rewrite", measure_event_rewrite, report, relay_path)
        if relay.process.poll() is not None:
            raise BenchError("the relay exited; its log:\n" + relay.log_tail())
    finally:
        if relay is not None:
            relay.stop()
        stop(upstream)
        stop_children()
        remove_tree(workdir)
    return report, mismatches, nginx is not None


def translated_stream_request(port, api, events):
    """A streamed Messages or Responses request for TRANSLATED_MODEL, whose
    bench parameters survive translation in the user field."""
    parameters = json.dumps({"bench_events": events, "bench_interval": 0})
    if api == "messages":
        body = {"model": TRANSLATED_MODEL, "max_tokens": 1024, "stream": True,
                "metadata": {"user_id": parameters},
                "messages": [{"role": "user", "content": "Say hello."}]}
    else:
        body = {"model": TRANSLATED_MODEL, "stream": True, "store": False,
                "user": parameters, "input": "Say hello."}
    return http_request(port, json.dumps(body, separators=(",", ":")).encode(),
                        path=b"/v1/" + api.encode())


def read_chunked_body(client):
    """Read one chunked response (RFC 9112 §7.1) on client; return
    (status, body bytes)."""
    while True:
        end = client.buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        client._fill()
    head = bytes(client.buffer[:end])
    del client.buffer[:end + 4]
    body = bytearray()
    while True:
        while b"\r\n" not in client.buffer:
            client._fill()
        line_end = client.buffer.find(b"\r\n")
        size = int(bytes(client.buffer[:line_end]).split(b";")[0], 16)
        del client.buffer[:line_end + 2]
        while len(client.buffer) < size + 2:
            client._fill()
        body += client.buffer[:size]
        del client.buffer[:size + 2]
        if not size:
            return status_of(head), bytes(body)


def measure_translation(report, relay, mode):
    """The relay's CPU per streamed event for a chat completions stream
    passed through, and for the same upstream stream translated into the
    Messages and the Responses event grammar (sequential streams, events
    sent back to back), with the translators' own share measured in this
    process."""
    runs, events = mode["translated_stream_runs"], mode["translated_stream_events"]
    cpu = {}
    for api in ("chat", "messages", "responses"):
        raw = (http_request(relay.port, stream_body(0, events, 0)) if api == "chat"
               else translated_stream_request(relay.port, api, events))
        client = BlockingClient(relay.port)
        try:
            client.sock.sendall(raw)  # a warm-up stream
            read_chunked_body(client)
            before = cpu_seconds(relay)
            for _ in range(runs):
                client.sock.sendall(raw)
                status, body = read_chunked_body(client)
                if status != 200 or (api != "chat" and b"error" in body[-300:]):
                    raise BenchError("translated %s stream failed: %d %r" % (
                        api, status, body[-300:]))
            cpu[api] = cpu_used(relay, before, runs * events)
        finally:
            client.close()
    report.figure("stream_passthrough_cpu_per_event_us",
                  "stream passed through: CPU per event", "us", cpu["chat"],
                  scale=1e6)
    for api, label in (("messages", "Messages"), ("responses", "Responses")):
        report.figure("stream_%s_added_cpu_per_event_us" % api,
                      "stream as %s: added CPU per event" % label, "us",
                      cpu[api] - cpu["chat"], scale=1e6)
        report.figure("stream_%s_translator_per_event_us" % api,
                      "  of which translation (in-process)", "us",
                      translator_seconds_per_event(api), scale=1e6)


def translator_seconds_per_event(api, events=2000):
    """Time the relay's stream translator alone on a bench stream's lines."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(RELAY_PATH[0])))
    sys.dont_write_bytecode = True  # no __pycache__ beside the relay
    import llm_relay
    lines = [sse_event(0, index, b"%.6f" % index) for index in range(events)]
    lines = [line for event in lines for line in event.splitlines(True)]
    translators = {"messages": lambda: llm_relay.MessagesStreamTranslator(MODEL),
                   "responses": lambda: llm_relay.ResponsesStreamTranslator(MODEL, {})}
    best = None
    for _ in range(3):
        translator = translators[api]()
        started = time.perf_counter()
        translator.start()
        for line in lines:
            translator.feed_line(line)
        translator.finish()
        elapsed = (time.perf_counter() - started) / events
        best = elapsed if best is None else min(best, elapsed)
    return best


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


###############################################################################
# Output ######################################################################
###############################################################################

def format_value(value):
    if value is None:
        return "-"
    if isinstance(value, int):
        return "%d" % value
    for digits, limit in ((1, 100), (2, 10), (3, 0)):
        if abs(value) >= limit:
            return "%.*f" % (digits, value)
    return "%.3f" % value


def format_ratio(ratio):
    return "-" if ratio is None else "%.2fx" % ratio


def format_added(item, key):
    if item[key] is None:
        return "-"
    return "%+.3f" % item[key]


def format_table(report, header):
    rows = [("figure", "unit", "direct", "nginx", "relay", "vs direct", "vs nginx",
             "added", "nginx added", "target", "result")]
    for item in report.figures:
        result = {True: "PASS", False: "MISS", None: ""}[item["pass"]]
        rows.append((item["label"], item["unit"], format_value(item["direct"]),
                     format_value(item["nginx"]), format_value(item["relay"]),
                     format_ratio(item["ratio"]), format_ratio(item["nginx_ratio"]),
                     format_added(item, "added"), format_added(item, "nginx_added"),
                     item["target"] or "", result))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [header]
    for number, row in enumerate(rows):
        lines.append("  ".join(
            cell.ljust(width) if column in (0, 1, 9, 10) else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def calibration_us():
    """This machine's pure-Python speed: best time of sum(range(1000)), in us
    (to compare runs across machines; lower is faster)."""
    best = float("inf")
    for _ in range(200):
        started = time.perf_counter()
        sum(range(1000))
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def file_digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:12]


def summary(report, mismatches, mode_name, relay_path, wall, load):
    return {
        "mode": mode_name,
        "relay": relay_path,
        "relay_sha256": file_digest(relay_path),
        "load_average_before": load,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "parameters": MODES[mode_name],
        "wall_seconds": round(wall, 2),
        "section_seconds": report.section_seconds,
        "calibration_us": round(calibration_us(), 1),
        "figures": report.figures,
        "targets_missed": sum(1 for item in report.figures if item["pass"] is False),
        "event_mismatches": mismatches,
        "load_average_after": round(os.getloadavg()[0], 2),
    }


###############################################################################
# Command line ################################################################
###############################################################################

def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Benchmark llm_relay.py direct vs through the relay.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller loads (about a minute)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    parser.add_argument("--relay", metavar="PATH",
                        default=os.path.join(HERE, "llm_relay.py"),
                        help="the relay script (default: llm_relay.py beside "
                             "this script)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help="run only these comma-separated sections: "
                             + ", ".join(SECTIONS))
    parser.add_argument("--no-nginx", action="store_true",
                        help="leave nginx out even when it is installed")
    parser.add_argument("--relay-cpus", metavar="CPUS",
                        help="pin the relay to these CPUs, like taskset -c "
                             "(e.g. 0); default: not pinned")
    parser.add_argument("--start", choices=("script", "module"), default="module",
                        help="start the relay as the README does, python3 -m "
                             "llm_relay from precompiled bytecode (module, the "
                             "default), or as python3 llm_relay.py (script)")
    parser.add_argument("--serve-upstream", action="store_true",
                        help=argparse.SUPPRESS)
    return parser


def raise_fd_limit(wanted=8192):
    """500 streams need ~1000 descriptors in the relay (inherits this limit)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    if args.serve_upstream:
        serve_upstream()
        return 0
    if not os.path.isfile(args.relay):
        sys.stderr.write("bench_llm_relay: no relay at %s\n" % args.relay)
        return 2
    unknown = set((args.only or "").split(",")) - set(SECTIONS) - set([""])
    if unknown:
        sys.stderr.write("bench_llm_relay: unknown section(s) %s; known: %s\n" % (
            ", ".join(sorted(unknown)), ", ".join(SECTIONS)))
        return 2
    raise_fd_limit()
    mode_name = "quick" if args.quick else "full"
    relay_path = os.path.abspath(args.relay)
    RELAY_PATH[0] = relay_path
    RELAY_START["cpus"] = parse_cpus(args.relay_cpus)
    RELAY_START["module"] = args.start == "module"
    load = round(os.getloadavg()[0], 2)  # other work on the machine skews figures
    started = time.perf_counter()
    try:
        report, mismatches, with_nginx = run_benchmark(
            relay_path, mode_name, not args.no_nginx,
            args.only.split(",") if args.only else SECTIONS)
    except (BenchError, OSError, asyncio.TimeoutError, ValueError,
            subprocess.SubprocessError) as error:
        sys.stderr.write("bench_llm_relay: benchmark failed: %s: %s\n" % (
            type(error).__name__, error))
        return 2
    wall = time.perf_counter() - started
    result = summary(report, mismatches, mode_name, relay_path, wall, load)
    result["nginx"] = with_nginx
    result["relay_start"] = describe_start(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mode = MODES[mode_name]
        print(format_table(report, (
            "llm_relay benchmark (%s, %.1f s): %s (sha256 %s), Python %s, %d CPUs, "
            "load average before %.2f, after %.2f,\ncalibration sum(range(1000)) = "
            "%.1f us; relay started as %s; nginx %s.\n"
            "streams: %d of %d events every %g ms (1 stream: %d runs of %d events "
            "every %g ms); load: %d streams at %g tokens/s after %g ms, %g short "
            "calls/s, %g s"
            % (mode_name, wall, os.path.basename(relay_path),
               result["relay_sha256"], result["python"], result["cpus"], load,
               result["load_average_after"], result["calibration_us"],
               result["relay_start"],
               "as reference" if with_nginx else "not installed (or --no-nginx)",
               mode["streams"], mode["stream_events"], mode["stream_interval"] * 1e3,
               mode["single_stream_runs"], mode["single_stream_events"],
               mode["single_stream_interval"] * 1e3, mode["load_streams"],
               mode["load_tokens_per_second"], mode["load_prefill"] * 1e3,
               mode["load_calls_per_second"], mode["load_seconds"]))))
        print("targets missed: %d; event mismatches and failed calls "
              "(all peers): %d" % (result["targets_missed"], mismatches))
    return 1 if mismatches else 0


def parse_cpus(text):
    """"0" or "0,1" or "0-1" -> set of CPU numbers; None for no pinning."""
    if not text:
        return None
    cpus = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def describe_start(args):
    start = ("python3 -m llm_relay (bytecode)" if args.start == "module"
             else "python3 llm_relay.py")
    if args.relay_cpus:
        start += ", pinned to CPU %s" % args.relay_cpus
    return start


if __name__ == "__main__":
    sys.exit(main())
