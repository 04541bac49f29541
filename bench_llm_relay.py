#!/usr/bin/env python3
"""Benchmark llm_relay.py: the same loads sent direct to a fake upstream and
through the relay, side by side, with the relay's targets marked PASS or MISS.

Usage:
    python3 bench_llm_relay.py            # full run, under a minute
    python3 bench_llm_relay.py --quick    # smaller loads, under 15 s
    python3 bench_llm_relay.py --json     # one JSON object instead of the table
    python3 bench_llm_relay.py --relay path/to/llm_relay.py

Three processes, so that none shares a GIL with another:
  * the fake upstream: this script with --serve-upstream, an asyncio
    HTTP/1.1 keep-alive server.  POST /v1/chat/completions answers a small
    chat.completion JSON (Content-Length), or, when the body has
    "stream": true, a chunked text/event-stream of N events, each carrying
    the time.monotonic() at which it was written ("t"); GET /v1/models too.
  * the relay: `sys.executable llm_relay.py --config TMPFILE`, listening on a
    free 127.0.0.1 port, with one model rule that applies to every request
    (so each body is parsed, rewritten and serialized, as in real use).  Its
    memory and CPU come from /proc/PID/status and /proc/PID/stat.
  * this process: the load-generating client (a blocking socket at
    concurrency 1, asyncio streams for concurrent loads), keep-alive.

Figures ("direct" = client -> upstream, "relay" = client -> relay -> upstream;
ratio = relay / direct; added = relay - direct, percentile by percentile):
  startup               spawn of the relay process until the first 200 from
                        GET /health (median of several spawns).
  idle RSS              relay VmRSS after startup and a few warm-up requests.
  latency c=N pXX       one non-streamed chat completion, request written to
                        response read, N keep-alive connections in parallel.
  throughput c=32       completed requests per second with 32 connections.
  relay CPU/request     relay utime+stime over the c=32 run / its requests.
  stream S: TTFE        request written to first SSE event read (S streams).
  stream S: event delay arrival time at the client minus the upstream's send
                        time embedded in the event (same CLOCK_MONOTONIC).
  event mismatches      events not byte-identical to what the upstream sent,
                        plus missing events (rebuilt from their stamp).
  20 MB body            a chat request with a base64 image, send to response
                        (first request, and median of several); the upstream
                        reports length and CRC-32 of what arrived, checked here.
  20 MB RSS growth      relay VmHWM after the first 20 MB request minus VmRSS
                        before it (peak reset through /proc/PID/clear_refs).
  RSS per open stream   (relay VmRSS with 500 slow streams open - before) / 500.
  relay CPU per event   relay utime+stime over the 100-stream run / its events.

The header shows the relay's sha256, the load average before the run and a
pure-Python calibration time, to tell a slower machine from a slower relay.

Loads go only to 127.0.0.1, are bounded in count and time, and every child
process is stopped on exit.  Exit status: 0 when the benchmark ran (missed
targets included: it is a report), 1 when relayed bytes differed, 2 when the
benchmark itself failed.  Standard library only; Python 3.6+; Linux (/proc).
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
        "c1_requests": 2000,
        "c32_seconds": 3.0,
        "single_stream_runs": 5,
        "single_stream_events": 200,
        "single_stream_interval": 0.002,
        "streams": 100,
        "stream_events": 200,
        "stream_interval": 0.02,
        "big_body_runs": 3,
        "open_streams": 500,
    },
    "quick": {
        "startup_runs": 2,
        "c1_requests": 300,
        "c32_seconds": 0.8,
        "single_stream_runs": 2,
        "single_stream_events": 50,
        "single_stream_interval": 0.002,
        "streams": 100,
        "stream_events": 40,
        "stream_interval": 0.02,
        "big_body_runs": 3,
        "open_streams": 500,
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


def stream_body(stream_id, events, interval):
    return request_body(stream=True, bench_stream_id=stream_id,
                        bench_events=events, bench_interval=interval)


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
    """Send bench_events events, bench_interval seconds apart, each stamped
    with time.monotonic() just before it is written."""
    stream_id = int(request.get("bench_stream_id", 0))
    events = int(request.get("bench_events", 10))
    interval = float(request.get("bench_interval", 0.01))
    loop = asyncio.get_event_loop()
    writer.write(SSE_HEAD)
    start = loop.time()
    for index in range(events):
        delay = start + index * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(chunk(sse_event(stream_id, index, b"%.6f" % time.monotonic())))
        await writer.drain()  # raises once the peer has gone
    writer.write(chunk(DONE_EVENT) + b"0\r\n\r\n")


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


def spawn(argv, **kwargs):
    process = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kwargs)
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
        "model_rules": [{"match_model": MODEL, "set": {"temperature": 0.5}}],
    }
    path = os.path.join(workdir, "relay-%d.jsonc" % port)
    with open(path, "w") as handle:
        handle.write("// bench_llm_relay.py\n" + json.dumps(config, indent=2))
    return path


class Relay(object):
    """A relay subprocess on a free port; startup is spawn to first /health."""

    def __init__(self, relay_path, upstream_port, workdir, attempts=3):
        for attempt in range(attempts):
            self.port = free_port()
            config = write_relay_config(workdir, self.port, upstream_port)
            self.log_path = os.path.join(workdir, "relay-%d.log" % self.port)
            with open(self.log_path, "wb") as log:
                started = time.perf_counter()
                self.process = spawn([sys.executable, relay_path, "--config", config],
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=log)
            if wait_health(self.port, self.process, timeout=10.0):
                self.startup = time.perf_counter() - started
                self.pid = self.process.pid
                return
            stop(self.process)  # the port was taken meanwhile: try another
        raise BenchError("the relay did not start; its log:\n" + self.log_tail())

    def log_tail(self, lines=20):
        with open(self.log_path, "rb") as log:
            return b"".join(log.readlines()[-lines:]).decode("utf-8", "replace")

    def stop(self, graceful=True):
        stop(self.process, graceful)


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
               passed=None, scale=1.0):
        """Add one figure.  Values are in base units (s, bytes...) and are
        multiplied by scale for display in unit; target is a text and passed
        True, False or None (no target)."""
        shown = (lambda value: value if value is None or scale == 1 else value * scale)
        ratio = (relay / direct) if relay is not None and direct else None
        added = None
        if unit in TIME_UNITS and relay is not None and direct is not None:
            added = relay - direct
        self.figures.append({
            "key": key, "label": label, "unit": unit, "direct": shown(direct),
            "relay": shown(relay), "ratio": ratio, "added": shown(added),
            "target": target, "pass": passed})


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


def measure_idle(report, relay, startup_samples):
    startup = median(startup_samples)
    report.figure("startup_ms", "startup to first /health", "ms", startup,
                  target="<= 200 ms", passed=startup <= 0.200, scale=1e3)
    warm_up(relay.port)
    time.sleep(0.3)
    idle = proc_status(relay.pid)["VmRSS"]
    report.figure("idle_rss_mb", "idle RSS", "MB", idle, target="<= 25 MB",
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


def measure_concurrency_1(report, relay, upstream_port, count):
    direct = latency_sequential(upstream_port, count)
    through = latency_sequential(relay.port, count)
    for q, limit in ((50, 0.0005), (99, 0.002)):
        d, r = percentile(direct, q), percentile(through, q)
        report.figure("latency_c1_p%d_ms" % q, "latency c=1 p%d" % q, "ms", r, d,
                      target="added <= %g ms" % (limit * 1e3),
                      passed=r - d <= limit, scale=1e3)


def measure_concurrency_32(report, relay, upstream_port, seconds):
    run_async(keepalive_load, upstream_port, 32, min(0.3, seconds))
    direct, direct_elapsed = run_async(keepalive_load, upstream_port, 32, seconds)
    run_async(keepalive_load, relay.port, 32, min(0.3, seconds))
    cpu_before = proc_cpu_seconds(relay.pid)
    through, through_elapsed = run_async(keepalive_load, relay.port, 32, seconds)
    cpu = proc_cpu_seconds(relay.pid) - cpu_before
    for q in (50, 99):
        report.figure("latency_c32_p%d_ms" % q, "latency c=32 p%d" % q, "ms",
                      percentile(through, q), percentile(direct, q), scale=1e3)
    direct_rate = len(direct) / direct_elapsed
    relay_rate = len(through) / through_elapsed
    report.figure("throughput_c32_rps", "throughput c=32", "req/s", relay_rate,
                  direct_rate, target=">= 12% of direct",
                  passed=relay_rate >= 0.12 * direct_rate)
    per_request = cpu / len(through)
    report.figure("relay_cpu_per_request_ms", "relay CPU per request", "ms",
                  per_request, target="<= 0.5 ms", passed=per_request <= 0.0005,
                  scale=1e3)


def stream_stats(results):
    delays = [delay for result in results for delay in result.delays]
    ttfes = [result.ttfe for result in results if result.ttfe is not None]
    return {"delays": delays, "ttfes": ttfes,
            "mismatches": sum(result.mismatches for result in results),
            "events": sum(len(result.delays) for result in results)}


def report_streams(report, name, direct, through, delay_target=None):
    """Figures for one stream scenario; delay_target: p99 added limit (s)."""
    ttfe_qs = (50,) if len(direct["ttfes"]) < 20 else (50, 99)
    for q in ttfe_qs:
        report.figure("%s_ttfe_p%d_ms" % (name, q), "%s: TTFE p%d" % (
            name.replace("_", " "), q), "ms", percentile(through["ttfes"], q),
            percentile(direct["ttfes"], q), scale=1e3)
    for q in (50, 99):
        d, r = percentile(direct["delays"], q), percentile(through["delays"], q)
        limit = delay_target if q == 99 else None
        report.figure("%s_event_delay_p%d_ms" % (name, q), "%s: event delay p%d" % (
            name.replace("_", " "), q), "ms", r, d,
            target=None if limit is None else "added <= %g ms" % (limit * 1e3),
            passed=None if limit is None else r - d <= limit, scale=1e3)


def measure_streams(report, relay, upstream_port, mode):
    single = [stream_stats(run_async(
        sequential_streams, port, mode["single_stream_runs"],
        mode["single_stream_events"], mode["single_stream_interval"]))
        for port in (upstream_port, relay.port)]
    report_streams(report, "stream_1", single[0], single[1])
    direct = stream_stats(run_async(
        concurrent_streams, upstream_port, mode["streams"],
        mode["stream_events"], mode["stream_interval"]))
    cpu_before = proc_cpu_seconds(relay.pid)
    through = stream_stats(run_async(
        concurrent_streams, relay.port, mode["streams"],
        mode["stream_events"], mode["stream_interval"]))
    cpu = proc_cpu_seconds(relay.pid) - cpu_before
    report_streams(report, "stream_%d" % mode["streams"], direct, through,
                   delay_target=0.001)
    mismatches = [s["mismatches"] for s in (single[0], direct)], [
        s["mismatches"] for s in (single[1], through)]
    report.figure("event_mismatches", "events not byte-identical", "events",
                  sum(mismatches[1]), sum(mismatches[0]), target="0",
                  passed=sum(mismatches[1]) == 0)
    report.figure("relay_cpu_per_event_us", "relay CPU per streamed event", "us",
                  cpu / max(1, through["events"]), scale=1e6)
    return sum(mismatches[0]) + sum(mismatches[1])


def measure_open_streams(report, relay, count):
    time.sleep(0.3)
    before = proc_status(relay.pid)
    during = run_async(hold_streams, relay.port, count,
                       lambda: proc_status(relay.pid), timeout=60.0)
    per_stream = (during["VmRSS"] - before["VmRSS"]) / float(count)
    report.figure("rss_open_streams_mb", "RSS with %d open streams" % count, "MB",
                  during["VmRSS"], scale=2 ** -20)
    report.figure("rss_per_stream_kb", "RSS growth per open stream", "KB",
                  per_stream, target="<= 150 KB", passed=per_stream <= 150 * 1024,
                  scale=2 ** -10)
    if not wait_threads(relay.pid, before["Threads"] + 2, timeout=10.0):
        raise BenchError("the relay kept threads after its streams closed")


def run_benchmark(relay_path, mode_name):
    """Run every measurement; return (Report, event mismatches)."""
    mode = MODES[mode_name]
    report = Report()
    workdir = tempfile.mkdtemp(prefix="bench-llm-relay-")
    upstream, upstream_port = start_upstream(workdir)
    relay = None
    try:
        startup = report.section("startup", measure_startup, relay_path,
                                 upstream_port, workdir, mode["startup_runs"] - 1)
        relay = Relay(relay_path, upstream_port, workdir)
        report.section("idle", measure_idle, report, relay, startup + [relay.startup])
        report.section("big_body", measure_big_body, report, relay, upstream_port,
                       mode["big_body_runs"])
        report.section("concurrency_1", measure_concurrency_1, report, relay,
                       upstream_port, mode["c1_requests"])
        report.section("concurrency_32", measure_concurrency_32, report, relay,
                       upstream_port, mode["c32_seconds"])
        mismatches = report.section("streams", measure_streams, report, relay,
                                    upstream_port, mode)
        report.section("open_streams", measure_open_streams, report, relay,
                       mode["open_streams"])
        if relay.process.poll() is not None:
            raise BenchError("the relay exited; its log:\n" + relay.log_tail())
    finally:
        if relay is not None:
            relay.stop()
        stop(upstream)
        stop_children()
        remove_tree(workdir)
    return report, mismatches


def remove_tree(path):
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


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


def format_table(report, header):
    rows = [("figure", "unit", "direct", "relay", "ratio", "added", "target", "result")]
    for item in report.figures:
        result = {True: "PASS", False: "MISS", None: ""}[item["pass"]]
        rows.append((item["label"], item["unit"], format_value(item["direct"]),
                     format_value(item["relay"]),
                     "-" if item["ratio"] is None else "%.2fx" % item["ratio"],
                     "-" if item["added"] is None or item["direct"] is None
                     else "%+.3f" % item["added"],
                     item["target"] or "", result))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [header]
    for number, row in enumerate(rows):
        lines.append("  ".join(
            cell.ljust(width) if column in (0, 1, 6, 7) else cell.rjust(width)
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
    }


###############################################################################
# Command line ################################################################
###############################################################################

def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Benchmark llm_relay.py direct vs through the relay.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller loads (under 15 s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    parser.add_argument("--relay", metavar="PATH",
                        default=os.path.join(HERE, "llm_relay.py"),
                        help="the relay script (default: llm_relay.py beside "
                             "this script)")
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
    raise_fd_limit()
    mode_name = "quick" if args.quick else "full"
    relay_path = os.path.abspath(args.relay)
    load = round(os.getloadavg()[0], 2)  # other work on the machine skews figures
    started = time.perf_counter()
    try:
        report, mismatches = run_benchmark(relay_path, mode_name)
    except (BenchError, OSError, asyncio.TimeoutError, ValueError) as error:
        sys.stderr.write("bench_llm_relay: benchmark failed: %s: %s\n" % (
            type(error).__name__, error))
        return 2
    wall = time.perf_counter() - started
    result = summary(report, mismatches, mode_name, relay_path, wall, load)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mode = MODES[mode_name]
        print(format_table(report, (
            "llm_relay benchmark (%s, %.1f s): %s (sha256 %s), Python %s, %d CPUs, "
            "load average before %.2f,\ncalibration sum(range(1000)) = %.1f us; "
            "streams of %d events every %g ms (1 stream: %d runs of %d events "
            "every %g ms)"
            % (mode_name, wall, os.path.basename(relay_path),
               result["relay_sha256"], result["python"], result["cpus"], load,
               result["calibration_us"],
               mode["stream_events"], mode["stream_interval"] * 1e3,
               mode["single_stream_runs"], mode["single_stream_events"],
               mode["single_stream_interval"] * 1e3))))
        print("targets missed: %d; event mismatches (direct+relay): %d" % (
            result["targets_missed"], mismatches))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
