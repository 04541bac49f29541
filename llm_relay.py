#!/usr/bin/env python3
"""llm-relay: a single-file relay for LLM APIs that rewrites requests per model.

Clients (the openai and anthropic SDKs, LangChain, Open WebUI, curl, Claude
Code, Codex CLI) point their base URL at the relay; the relay forwards to the
upstreams (Ollama, vLLM, llama.cpp server, LM Studio, OpenAI) after rewriting
the JSON request body by per-model rules from a JSONC config, and relays
Server-Sent Events line by line as they arrive.  It serves chat completions,
the Anthropic Messages API and the OpenAI Responses API, translating the
latter two onto chat completions for upstreams that speak only that, and
spreads requests over replicas and named keys with limits.

Usage: python3 llm_relay.py --config config.jsonc   (python3 llm_relay.py --demo
to try it with a built-in demo upstream)

Standard library only; runs unmodified on CPython 3.6 to 3.13.  License: MIT.
"""
import argparse
import binascii
import bisect
import collections
import copy
import difflib
import fnmatch
import hashlib
import hmac
import http.client
import http.server
import io
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import select
import selectors
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
__version__ = "1.2.0"


###############################################################################
# Constants ###################################################################
###############################################################################

DEFAULT_CONFIG_PATH = "config.jsonc"
DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_UPSTREAM = "http://localhost:11434/v1"
DEFAULT_UPSTREAM_NAME = "default"
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_READ_TIMEOUT_SECONDS = 600.0  # silence allowed from the upstream
DEFAULT_CLIENT_TIMEOUT_SECONDS = 60.0  # to send a whole request; idle keep-alive
DEFAULT_SHUTDOWN_GRACE_SECONDS = 30.0
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # base64 images are large
DEFAULT_MAX_CONNECTIONS = 512
# A config larger than this is not one (a device such as /dev/zero, a log
# file): reading it whole would take the process's memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

# The longest timeout every socket and wait here can represent: socket
# timeouts overflow past about 9.2e9 s, 32-bit timevals past 2**31 s, and
# threading waits past threading.TIMEOUT_MAX (49 days on Windows).
MAX_TIMEOUT_SECONDS = int(min(threading.TIMEOUT_MAX, 2 ** 31 - 1))
LISTEN_BACKLOG = 1024  # socketserver's default of 5 refuses bursts
POOL_MAX_IDLE_PER_UPSTREAM = 32
POOL_IDLE_SECONDS = 30.0  # idle upstream connections are closed after this
HOUSEKEEPING_INTERVAL_SECONDS = 0.25  # client deadlines, disconnects, pool
CONFIG_POLL_SECONDS = 1.0  # how often reload_on_change looks at the file
ABORT_WAIT_SECONDS = 1.0  # after the grace, for cut requests to end and log
MAX_SSE_LINE_BYTES = 64 * 1024  # longer lines are relayed in pieces
DONE_TAIL_SECONDS = 0.25  # after data: [DONE], for the upstream's end of body
PUMP_SWEEP_SECONDS = 0.05  # how often the stream pump looks at its deadlines
QUEUE_CHECK_SECONDS = 0.25  # a request queued for a slot checks its client
COPY_BLOCK_BYTES = 64 * 1024
MAX_BUFFERED_RESPONSE_BYTES = 16 * 1024 * 1024  # larger bodies stream through
MAX_REQUEST_LINE_BYTES = 65536  # longer request lines are refused with 414
MAX_FIELD_LINE_BYTES = 8192  # one header or trailer line; then 431
MAX_FIELD_LINES = 100  # header or trailer fields in one section; then 431
MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions
MAX_INTERIM_RESPONSES = 16  # 1xx responses an upstream may send first
MAX_REQUEST_ID_CHARS = 128
MAX_JSON_INT_DIGITS = 4300  # CPython 3.11's limit; older ones parse in O(n^2)
MAX_LOGGED_MODEL_CHARS = 200
STALE_RETRY_WINDOW_SECONDS = 1.0  # an idle-closed connection fails at once
MAX_LOGGED_BODY_CHARS = 4000
MODELS_TIMEOUT_SECONDS = 10.0  # silence allowed from an upstream's /models
READY_TIMEOUT_SECONDS = 2.0  # each upstream's /models, for /health/ready
DURATION_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                            5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MAX_MODEL_LABELS = 200  # distinct model label values; then "other"
DEFAULT_MAX_QUEUE = 32  # requests waiting for an upstream's max_concurrent
DEFAULT_QUEUE_TIMEOUT_SECONDS = 30.0  # longest wait in that queue
DEFAULT_EJECT_AFTER = 3  # failures in a row that take a replica out
DEFAULT_COOLDOWN_SECONDS = 10.0  # first time out; doubles while it keeps failing
MAX_COOLDOWN_DOUBLINGS = 5  # so at most 32 x cooldown
RATE_WINDOW_SECONDS = 60.0  # requests_per_minute counts over this window
MAX_AFFINITY_PROMPT_CHARS = 4096  # of a plain prompt, for prompt affinity
AFFINITY_MODES = ("user", "prompt", "header:<name>")
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
LOG_FORMATS = ("text", "json")

# The APIs an upstream may speak natively ("apis" of a named upstream): chat
# completions (with every other /v1 path), Anthropic Messages, OpenAI
# Responses.  Messages and Responses requests routed to an upstream that
# speaks chat but not their API are translated onto chat completions.
UPSTREAM_APIS = ("chat", "messages", "responses")
TRANSLATED_ROUTES = {"/messages": "messages", "/responses": "responses",
                     "/messages/count_tokens": "messages"}
TRANSLATED_PING_SECONDS = 10.0  # silence before a ping on a translated stream

# RFC 9110 §7.6.1: these apply to one connection only and are never relayed,
# in either direction, together with every header named in Connection.
HOP_BY_HOP_HEADERS = frozenset((
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
))

# The relay frames bodies itself, names the upstream host itself and asks for
# identity encoding so that SSE lines stay lines (a gzip stream has none).
REQUEST_HEADERS_SET_BY_RELAY = frozenset((
    "host", "content-length", "accept-encoding", "expect", "x-request-id",
))

# Headers that carry a credential for the upstream; sent only with forward_auth.
CREDENTIAL_HEADERS = frozenset(("authorization", "api-key", "x-api-key"))

# Where an upstream's api_key goes (upstreams.<name>.api_key_header):
# "authorization" as a Bearer token (OpenAI and most servers), "x-api-key"
# (Anthropic's API, which also needs anthropic-version) or "api-key" (Azure).
API_KEY_HEADERS = ("authorization", "x-api-key", "api-key")
ANTHROPIC_VERSION = "2023-06-01"  # sent with an x-api-key when the client sent none

# response_model: which model name answers report (see model_renamer).
RESPONSE_MODEL_CHOICES = ("upstream", "asked")

# Response headers relayed to the client: an allowlist, so that Date, Server and
# framing headers are the relay's own and never duplicated.
RELAYED_RESPONSE_HEADERS = frozenset((
    "content-type", "content-encoding", "content-language",
    "content-disposition", "cache-control", "location", "retry-after",
    "www-authenticate", "etag", "last-modified", "request-id",
))
RELAYED_RESPONSE_HEADER_PREFIXES = ("x-", "openai-", "anthropic-")
# Where upstreams put their own request id: OpenAI and vLLM x-request-id,
# Anthropic request-id.  The first one present reaches the client in
# X-Request-Id, as it would going direct.
UPSTREAM_REQUEST_ID_HEADERS = ("x-request-id", "request-id")

SECRET_KEY_PATTERN = re.compile(
    r"(api[-_]?key|authorization|password|secret|token)$", re.IGNORECASE)
GLOB_CHARACTERS = frozenset("*?[")
_CREDENTIAL_WORDS = re.compile(
    r"((?i:\b(?:bearer|basic)\s+)|\b(?:sk|pk|rk)-)[^\s&;,'\")]+")
SECRET_QUERY_PARAMETER = re.compile(
    r"((?:^|[?&;])[^=&;]*(?:key|token|secret|password|sig)[^=&;]*=)[^&;]*",
    re.IGNORECASE)

# The relay's own endpoints, one row each.  Other paths under /v1 are passed
# through to the upstream unchanged (GET /v1/models/{id} may be an alias).
Route = collections.namedtuple("Route", [
    "path",       # str: client path without the optional /v1 prefix
    "methods",    # tuple of str: the methods allowed; others get 405
    "serve",      # str: the RelayHandler method, (config, route, query)
    "needs_key",  # bool: False for the probes, which need no api_keys key
    "under_v1",   # bool: the path lives under /v1 (its metrics label says so)
])
ROUTES = collections.OrderedDict((route.path, route) for route in (
    Route("/health", ("GET", "HEAD"), "_serve_health", False, False),
    Route("/health/ready", ("GET", "HEAD"), "_serve_readiness", False, False),
    Route("/metrics", ("GET",), "_serve_metrics", True, False),
    Route("/models", ("GET",), "_serve_models", True, True),
    Route("/chat/completions", ("POST",), "_forward", True, True),
    Route("/completions", ("POST",), "_forward", True, True),
    Route("/messages", ("POST",), "_forward", True, True),
    Route("/messages/count_tokens", ("POST",), "_forward", True, True),
    Route("/responses", ("POST",), "_forward", True, True),
))
ENDPOINTS = collections.OrderedDict(
    (path, route.methods) for path, route in ROUTES.items())

# Paths of the OpenAI and Anthropic API references (without /v1) that the
# metrics path label may name besides the relay's endpoints: a request under
# one of them counts as "/v1<path>/*", anything else as "other", so clients
# cannot grow the label set (and every scrape) by inventing paths.
KNOWN_API_PATHS = frozenset((
    "/messages/batches", "/embeddings", "/audio/speech",
    "/audio/transcriptions", "/audio/translations", "/images/generations",
    "/images/edits", "/images/variations", "/files", "/uploads", "/batches",
    "/moderations", "/rerank", "/fine_tuning/jobs", "/vector_stores",
    "/assistants", "/threads", "/realtime", "/conversations", "/containers",
    "/evals", "/responses", "/models", "/messages", "/chat/completions",
    "/completions", "/tokenize", "/detokenize",
))
UNAUTHENTICATED_PATHS = frozenset(
    path for path, route in ROUTES.items() if not route.needs_key)

# The API a request speaks, known from its route alone (see request_protocol):
# it decides the shape of the relay's own errors and of a stream's failure
# event, where token usage is found, and it is named in the access log.
PROTOCOL_CHAT = "chat"                # OpenAI chat completions
PROTOCOL_COMPLETIONS = "completions"  # OpenAI legacy completions
PROTOCOL_MESSAGES = "messages"        # Anthropic Messages API
PROTOCOL_RESPONSES = "responses"      # OpenAI Responses API
PROTOCOL_OTHER = "other"              # everything else (OpenAI error shape)

# Anthropic's error "type" for each status the relay answers with itself
# (Anthropic API reference, "Errors"); the SDKs pick their exception class by
# status.  Other 4xx are invalid_request_error, other 5xx api_error.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error",
    402: "billing_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    502: "api_error", 503: "overloaded_error", 504: "api_error",
    529: "overloaded_error",
}

CORS_ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"

# A socket call that timed out: Python's own timeout, or EAGAIN from a
# blocking socket whose SO_RCVTIMEO/SO_SNDTIMEO expired (set_kernel_timeouts).
SOCKET_TIMEOUT_ERRORS = (socket.timeout, BlockingIOError)

logger = logging.getLogger("llm_relay")


###############################################################################
# Errors ######################################################################
###############################################################################

class ConfigError(Exception):
    """An invalid configuration; its str() is the one-line startup message.

    Attributes: source (file name), line and column (1-based, or None), path
    (the field's path such as "model_rules[1].unset", or None) and message.
    """

    def __init__(self, message, source=None, line=None, column=None, path=None):
        Exception.__init__(self, message)
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        self.path = path

    def __str__(self):
        location = self.source or "<config>"
        if self.line is not None:
            location += ":%d:%d" % (self.line, self.column or 1)
        field = "%s: " % self.path if self.path else ""
        return "%s: %s%s" % (location, field, self.message)


class RelayError(Exception):
    """A failure that becomes an HTTP response in OpenAI's error shape.

    Raised from any step of request handling.  status is the HTTP status;
    error_type and code fill the OpenAI error object; headers is a list of
    (name, value) pairs added to the response; retryable marks an upstream
    failure after which a fallback upstream may be tried (nothing reached the
    client); kind names the failure for logs ("refused", "timeout", ...).
    """

    def __init__(self, status, message, error_type=None, code=None,
                 param=None, headers=(), retryable=False, kind=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.error_type = error_type or (
            "server_error" if status >= 500 else "invalid_request_error")
        self.code = code
        self.param = param
        self.headers = list(headers)
        self.retryable = retryable
        self.kind = kind


class UpstreamAnswer(RelayError):
    """An upstream's non-OK answer to relay to the client as it came."""

    def __init__(self, response, data, upstream):
        RelayError.__init__(self, response.status, "upstream %s answered %d" % (
            upstream.name, response.status))
        self.data = data
        self.response_headers = list(response.getheaders())


class BadMessage(http.client.HTTPException):
    """An HTTP/1.1 message the relay will not read further (RFC 9112).

    reason says what is wrong (never the offending bytes); status is the
    answer to a client that sent it: 400 malformed, 413 a body past its
    limit, 431 a head past its limits, 501 a transfer coding the relay does
    not decode, 505 another HTTP version.  From an upstream it is a 502.
    """

    def __init__(self, reason, status=400):
        http.client.HTTPException.__init__(self, reason)
        self.reason = reason
        self.status = status


class MessageCutShort(http.client.IncompleteRead):
    """The peer closed its connection inside a message head or body."""


class ClientDisconnected(Exception):
    """The client closed its connection while the relay was answering."""


def openai_error(message, error_type="invalid_request_error", code=None,
                 param=None):
    """Return the error body dict of the OpenAI API reference.

    Shape: {"error": {"message": str, "type": str, "param": str|None,
    "code": str|None}}.
    """
    return {"error": {"message": message, "type": error_type,
                      "param": param, "code": code}}


def anthropic_error(message, error_type="invalid_request_error"):
    """Return the error body dict of the Anthropic API reference ("Errors").

    Shape: {"type": "error", "error": {"type": str, "message": str}}.
    """
    return {"type": "error", "error": {"type": error_type, "message": message}}


def anthropic_error_type(status):
    """Return Anthropic's error "type" for an HTTP status (see
    ANTHROPIC_ERROR_TYPES)."""
    return ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500
                                     else "invalid_request_error")


def error_body(protocol, status, message, error_type=None, code=None,
               param=None):
    """Return the body dict of an error the relay makes itself, in the
    request's protocol: Anthropic's shape for PROTOCOL_MESSAGES (its type
    from the status), OpenAI's for every other protocol (error_type, or
    server_error for 5xx and invalid_request_error otherwise).
    """
    if protocol == PROTOCOL_MESSAGES:
        return anthropic_error(message, anthropic_error_type(status))
    return openai_error(message, error_type or (
        "server_error" if status >= 500 else "invalid_request_error"), code, param)


###############################################################################
# JSONC and configuration #####################################################
###############################################################################

_JSON_STRING = r'"(?:[^"\\\n]|\\.)*"'

# A // comment ends at CR, LF or CRLF (JSON5 §6): ending it only at LF
# would let a lone CR hide the next line inside the comment.
_JSONC_COMMENTS = re.compile(
    _JSON_STRING + r"|(//[^\r\n]*|/\*.*?\*/)|(/\*)", re.DOTALL)

# A trailing comma follows a value; one right after "{", "[" or another
# comma ({,} [,] [1,,]) is kept, so that it stays an error as in JSON5.
_JSONC_TRAILING_COMMAS = re.compile(
    _JSON_STRING + r"|[\[{,]\s*,|(,)(?=\s*[\]}])", re.DOTALL)

_NOT_NEWLINE = re.compile(r"[^\r\n]")


def strip_jsonc(text):
    """Turn JSONC text into JSON text with the same lines and columns.

    Removes a leading UTF-8 BOM, replaces // comments (ended by LF, CR or
    CRLF) and /* */ comments with spaces (keeping their line breaks) and
    drops trailing commas before } or ]; a comma with no value before it
    ({,} [,]) is kept, so json.loads refuses it as JSON5 does.  String
    contents are never touched.  Raises ConfigError (with line and column)
    for an unterminated block comment.
    """
    if text.startswith("\ufeff"):
        text = " " + text[1:]

    def blank_comment(match):
        if match.group(2):
            line, column = position_of(text, match.start(2))
            raise ConfigError("unterminated /* comment", line=line,
                              column=column)
        if match.group(1):
            return _NOT_NEWLINE.sub(" ", match.group(1))
        return match.group(0)

    def drop_comma(match):
        return " " if match.group(1) else match.group(0)

    text = _JSONC_COMMENTS.sub(blank_comment, text)
    return _JSONC_TRAILING_COMMAS.sub(drop_comma, text)


def position_of(text, index):
    """Return the 1-based (line, column) of a character index in text."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def locate_json_path(text, path, at_key=False):
    """Return the (line, column) where the value at path starts in JSON text.

    path is a sequence of object keys (str) and array indexes (int); with
    at_key, the position of the last key itself.  Falls back to the deepest
    position found when the path is only partly there.
    """
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    index = key_index = whitespace.match(text, 0).end()
    for step in path:
        found = _find_member(decoder, whitespace, text, index, step)
        if found is None:
            break
        key_index, index = found
    return position_of(text, key_index if at_key else index)


def _find_member(decoder, whitespace, text, index, step):
    """Return (key index, value index) of member step of the object or array
    at index, or None."""
    opener = text[index:index + 1]
    if opener not in ("{", "[") or (opener == "{") != isinstance(step, str):
        return None
    index = whitespace.match(text, index + 1).end()
    position = 0
    while index < len(text) and text[index] not in "}]":
        key, key_index = None, index
        if opener == "{":
            key, index = decoder.raw_decode(text, index)
            index = whitespace.match(text, index).end() + 1  # past ":"
            index = whitespace.match(text, index).end()
        if key == step or (opener == "[" and position == step):
            return key_index, index
        _, index = decoder.raw_decode(text, index)
        index = whitespace.match(text, index).end()
        index = whitespace.match(text, index + 1).end()  # past ","
        position += 1
    return None

Upstream = collections.namedtuple("Upstream", [
    "name",             # str: the name rules refer to ("default" for upstream)
    "url",              # str: base URL as configured, e.g. http://h:11434/v1
    "scheme",           # "http" or "https"
    "host",             # str: host name or IP literal
    "port",             # int
    "base_path",        # str: path prefix without trailing slash, e.g. "/v1"
    "api_key",          # str or None: sent in api_key_header
    "api_key_header",   # one of API_KEY_HEADERS
    "connect_timeout",  # float seconds
    "read_timeout",     # float seconds of upstream silence
    "ssl_context",      # ssl.SSLContext for https, else None
    "apis",             # frozenset of UPSTREAM_APIS names it speaks natively
    "max_concurrent",   # int or None: requests sent at once; more wait
    "max_queue",        # int: requests that may wait for a slot
    "queue_timeout",    # float seconds a request waits for a slot
])

ReplicaGroup = collections.namedtuple("ReplicaGroup", [
    "name",         # str: the name rules refer to
    "members",      # tuple of str: names of upstreams serving the same models
    "affinity",     # None, "user", "prompt" or ("header", lowercase name)
    "eject_after",  # int: failures in a row that take a member out
    "cooldown",     # float seconds out after the first ejection (doubles)
])

ApiKey = collections.namedtuple("ApiKey", [
    "name",                 # str: shown in logs and metrics, never the key
    "secret",               # bytes: what the client sends
    "models",               # tuple of str: allowed names or patterns; () any
    "max_concurrent",       # int or None: requests in flight at once
    "requests_per_minute",  # int or None: requests started per 60 s
])

Rule = collections.namedtuple("Rule", [
    "path",          # str: "model_rules[0]", for messages
    "match_model",   # tuple of str: names or shell-style patterns
    "unset",         # tuple of str: top-level keys to delete
    "defaults",      # dict: top-level keys filled when absent
    "set",           # dict: top-level keys to override
    "extra",         # dict: deep-merged into the body
    "upstreams",     # tuple of str: upstream names, in fallback order
    "response_model",  # one of RESPONSE_MODEL_CHOICES, or None: the top level's
])

RuleIndex = collections.namedtuple("RuleIndex", [
    "exact",     # dict: model name -> (file position, Rule), first rule wins
    "patterns",  # tuple of (file position, compiled regex, Rule)
    "default",   # the "default" Rule or None
])


class ConfigKey(collections.namedtuple("ConfigKey", [
        "name",     # str: the top-level key in the config file
        "field",    # str or tuple of str: the Config field(s) it fills; None
                    # when another key's reader uses it (the upstream group)
        "type",     # str: the Type column of the README's table
        "default",  # the value when the key is absent
        "read",     # function(checker, raw, key) -> value, or None
        "show",     # function(value) -> str for --check-config, or None
])):
    """One top-level config key: its check, default and documentation.

    CONFIG_KEYS is the single list of them; validate_config reads the keys
    in its order (the upstream group before the rules that name upstreams),
    the Config fields come from it and a test holds both READMEs' tables to
    it, so adding a key is one row here plus one row in each README.
    """


def _read_listen(checker, raw, key):
    value = checker.typed(raw, (key.name,), str, "a string", key.default)
    try:
        return parse_listen(value)
    except ValueError as error:
        raise checker.error((key.name,), str(error))


def _read_upstreams(checker, raw, key):
    return checker.upstreams(raw)


def _read_rules(checker, raw, key):
    upstreams, groups = checker.upstreams(raw)
    rules = tuple(checker.rule(rule, (key.name, position), upstreams, groups)
                  for position, rule in enumerate(
                      checker.typed(raw, (key.name,), list, "a list", key.default)))
    checker.warn_shadowed_rules(rules)
    return rules


def _read_bool(checker, raw, key):
    return checker.typed(raw, (key.name,), bool, "true or false", key.default)


def _read_api_keys(checker, raw, key):
    return checker.api_keys(raw)


def _read_positive_integer(checker, raw, key):
    return checker.number(raw, (key.name,), key.default, integer=True)


def _read_seconds(checker, raw, key):
    return checker.number(raw, (key.name,), key.default)


def _read_seconds_or_zero(checker, raw, key):
    return checker.number(raw, (key.name,), key.default, minimum=0)


def _read_string_set(checker, raw, key):
    return frozenset(checker.string_list(raw, (key.name,), key.default))


def _read_log_format(checker, raw, key):
    return checker.choice(raw, (key.name,), LOG_FORMATS, key.default)


def _read_response_model(checker, raw, key):
    return checker.choice(raw, (key.name,), RESPONSE_MODEL_CHOICES, key.default)


def _show_seconds(value):
    return "%g s" % value


CONFIG_KEYS = (
    ConfigKey("listen", ("listen_host", "listen_port"), "string", DEFAULT_LISTEN,
              _read_listen, None),
    ConfigKey("upstream", None, "string", DEFAULT_UPSTREAM, None, None),
    ConfigKey("upstream_api_key", None, "string", None, None, None),
    ConfigKey("upstream_ca_file", None, "string", None, None, None),
    ConfigKey("upstream_tls_verify", None, "bool", True, None, None),
    ConfigKey("connect_timeout", None, "seconds",
              DEFAULT_CONNECT_TIMEOUT_SECONDS, None, None),
    ConfigKey("read_timeout", None, "seconds", DEFAULT_READ_TIMEOUT_SECONDS,
              None, None),
    ConfigKey("upstreams", ("upstreams", "groups"), "object", {}, _read_upstreams,
              None),
    ConfigKey("model_rules", "rules", "list of rules", [], _read_rules, None),
    ConfigKey("forward_auth", "forward_auth", "bool", False, _read_bool,
              lambda value: str(value).lower()),
    ConfigKey("api_keys", "api_keys", "list of strings or objects", [],
              _read_api_keys, lambda keys: ", ".join(
                  describe_api_key(key) for key in keys) or "none (open)"),
    ConfigKey("max_body_bytes", "max_body_bytes", "integer",
              DEFAULT_MAX_BODY_BYTES, _read_positive_integer, str),
    ConfigKey("max_connections", "max_connections", "integer",
              DEFAULT_MAX_CONNECTIONS, _read_positive_integer, str),
    ConfigKey("client_timeout", "client_timeout", "seconds",
              DEFAULT_CLIENT_TIMEOUT_SECONDS, _read_seconds, _show_seconds),
    ConfigKey("shutdown_grace", "shutdown_grace", "seconds",
              DEFAULT_SHUTDOWN_GRACE_SECONDS, _read_seconds_or_zero,
              _show_seconds),
    ConfigKey("cors_origins", "cors_origins", "list of strings", [],
              _read_string_set,
              lambda origins: ", ".join(sorted(origins)) or "none"),
    ConfigKey("metrics", "metrics", "bool", True, _read_bool,
              lambda value: "on" if value else "off"),
    ConfigKey("log_format", "log_format", "string", "text", _read_log_format,
              str),
    ConfigKey("response_model", "response_model", "string", "upstream",
              _read_response_model, str),
    ConfigKey("reload_on_change", "reload_on_change", "bool", False, _read_bool,
              lambda value: str(value).lower()),
)

CONFIG_KEY_DEFAULTS = dict((key.name, key.default) for key in CONFIG_KEYS)

TOP_LEVEL_KEYS = tuple(key.name for key in CONFIG_KEYS)


def _config_fields():
    fields = ["source"]
    for key in CONFIG_KEYS:
        if isinstance(key.field, tuple):
            fields.extend(key.field)
        elif key.field:
            fields.append(key.field)
    return fields + ["rule_index", "created"]


# The validated config: source (the file it came from, or "<defaults>"), one
# field per CONFIG_KEYS entry (listen as listen_host str and listen_port int;
# upstreams an OrderedDict name -> Upstream, "default" first, and groups a
# dict name -> ReplicaGroup; rules a tuple of Rule; api_keys a tuple of
# ApiKey; cors_origins a frozenset, "*" allows any;
# timeouts float seconds), rule_index (RuleIndex) and created (int Unix
# seconds: load time, for alias model entries).
Config = collections.namedtuple("Config", _config_fields())

RULE_KEYS = ("match_model", "unset", "defaults", "set", "extra", "upstream",
             "response_model")

UPSTREAM_KEYS = ("url", "api_key", "api_key_header", "connect_timeout",
                 "read_timeout", "apis", "max_concurrent", "max_queue",
                 "queue_timeout")

GROUP_KEYS = ("replicas", "affinity", "eject_after", "cooldown")

API_KEY_KEYS = ("key", "name", "models", "max_concurrent", "requests_per_minute")

_ENV_REFERENCE = re.compile(
    r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def format_path(path):
    """Return a field path such as model_rules[1].unset from its steps."""
    text = ""
    for step in path:
        text += "[%d]" % step if isinstance(step, int) else (
            "." + step if text else step)
    return text


def load_config(path, environ=None, overrides=None):
    """Read, strip, parse and validate the JSONC config file at path.

    Returns (Config, warnings) where warnings is a list of str.  Raises
    ConfigError naming the file, line, column and field path.
    """
    try:
        with open(path, "rb") as config_file:
            data = config_file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError("cannot read config: %s" % (
            error.strerror or error), source=path)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("cannot read config: it is larger than %d bytes (not "
                          "a config file?)" % MAX_CONFIG_BYTES, source=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, column = position_of(data.decode("latin-1"), error.start)
        raise ConfigError("not valid UTF-8", path, line, column)
    return parse_config_text(text, path, environ, overrides)


def parse_config_text(text, source="<config>", environ=None, overrides=None):
    """Parse and validate JSONC config text; see load_config."""
    duplicates = []

    def keep_last_and_note_duplicates(pairs):
        value = {}
        for key, item in pairs:
            if key in value:
                duplicates.append(key)
            value[key] = item
        return value
    try:
        json_text = strip_jsonc(text)
        raw = json.loads(json_text, parse_constant=_reject_json_constant,
                         object_pairs_hook=keep_last_and_note_duplicates)
    except ConfigError as error:
        error.source = source
        raise
    except ValueError as error:  # json.JSONDecodeError or a constant
        line, column = getattr(error, "lineno", None), getattr(error, "colno", None)
        raise ConfigError(getattr(error, "msg", str(error)), source, line, column)
    config, warnings = validate_config(raw, source, json_text, environ, overrides)
    return config, ["%s: duplicate key %r: the last value is used" % (source, key)
                    for key in duplicates] + warnings


def _reject_json_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def validate_config(raw, source="<config>", text=None, environ=None,
                    overrides=None):
    """Check a parsed config dict and build the immutable Config.

    text (the stripped JSON) lets errors carry a line and column.  ${VAR} and
    ${VAR:-fallback} in string values are replaced from environ (default
    os.environ).  overrides holds override_settings' keyword arguments (the
    command line's --listen, --upstream, --demo).  Returns (Config,
    warnings); raises ConfigError.
    """
    checker = _ConfigChecker(source, text)
    if not isinstance(raw, dict):
        raise checker.error((), "expected a JSON object at the top level")
    raw = checker.expand_environment(raw, (), os.environ if environ is None
                                     else environ)
    if overrides:
        raw = override_settings(raw, **overrides)
    checker.warn_unknown_keys(raw, (), TOP_LEVEL_KEYS)
    values = {"source": source, "created": int(time.time())}
    for key in CONFIG_KEYS:
        if key.read is None:
            continue
        value = key.read(checker, raw, key)
        if isinstance(key.field, tuple):
            values.update(zip(key.field, value))
        else:
            values[key.field] = value
    config = Config(rule_index=index_rules(values["rules"]), **values)
    checker.warnings.extend(security_warnings(config, raw))
    return config, checker.warnings


def security_warnings(config, raw):
    """Return warnings about risky but valid settings, as a list of str."""
    warnings = []
    if config.api_keys and config.forward_auth:
        warnings.append("api_keys and forward_auth are both set: clients' relay "
                        "keys will be sent to the upstream")
    has_upstream_key = any(u.api_key for u in config.upstreams.values())
    if has_upstream_key and not config.api_keys and not is_loopback_host(
            config.listen_host):
        warnings.append("listening on %s without api_keys while an upstream API "
                        "key is set: anyone who can reach the relay spends that "
                        "key" % config.listen_host)
    if raw.get("upstream_tls_verify") is False:
        warnings.append("upstream_tls_verify is false: upstream TLS "
                        "certificates are not checked")
    return warnings


def is_loopback_host(host):
    """Return True for localhost and 127.0.0.0/8 or ::1 literals."""
    return host in ("localhost", "::1") or host.startswith("127.")


class _ConfigChecker(object):
    """Type checks with error positions; collects warnings (list of str)."""

    def __init__(self, source, text):
        self.source = source
        self.text = text
        self.warnings = []
        self._upstreams = None
        self._ssl_context = None

    def error(self, path, message, at_key=False):
        line = column = None
        if self.text is not None:
            try:
                line, column = locate_json_path(self.text, path, at_key)
            except ValueError:
                pass
        return ConfigError(message, self.source, line, column,
                           format_path(path) or None)

    def where(self, path):
        return str(self.error(path, "", at_key=True)).rstrip(": ")

    def expand_environment(self, value, path, environ):
        if isinstance(value, dict):
            return dict((key, self.expand_environment(item, path + (key,), environ))
                        for key, item in value.items())
        if isinstance(value, list):
            return [self.expand_environment(item, path + (position,), environ)
                    for position, item in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value

        def substitute(match):
            if match.group(0) == "$${":
                return "${"
            name, fallback = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if fallback is not None:
                return fallback
            raise self.error(path, "environment variable %s is not set (use "
                                   "${%s:-fallback} for a default)" % (name, name))
        return _ENV_REFERENCE.sub(substitute, value)

    def check_key(self, path, key):
        """A key goes into an HTTP header: visible ASCII only.  The message
        never shows the key (a stray CR from an env file is common)."""
        if not key or not is_visible_ascii(key):
            raise self.error(path, "a key must be non-empty visible ASCII (no "
                                   "spaces or control characters such as a "
                                   "trailing CR)")

    def warn_shadowed_rules(self, rules):
        """Warn about each match_model entry an earlier rule always takes
        first (see shadowing_entry), and about entries listed twice."""
        for position, rule in enumerate(rules):
            where = self.where(("model_rules", position))
            for index, name in enumerate(rule.match_model):
                if name in rule.match_model[:index]:
                    self.warnings.append("%s: %r is listed twice in match_model"
                                         % (where, name))
                    continue
                earlier = shadowing_entry(rules[:position], name)
                if earlier is not None:
                    self.warnings.append(
                        "%s: never applies to %r: %s%s matches it first" % (
                            where, name, earlier[0].path, "" if earlier[1] == name
                            else " (%r)" % earlier[1]))

    def warn_unknown_keys(self, mapping, path, known):
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(key, known, 1)
                hint = " (did you mean %r?)" % close[0] if close else ""
                self.warnings.append("%s: unknown key %r ignored%s" % (
                    self.where(path + (key,)), key, hint))

    def typed(self, mapping, path, kind, description, default):
        value = mapping.get(path[-1], default)
        if path[-1] in mapping and (not isinstance(value, kind) or (
                kind is not bool and isinstance(value, bool))):
            raise self.error(path, "expected %s, got %s" % (
                description, json.dumps(value)[:60]))
        return value

    def string_list(self, mapping, path, default):
        value = mapping.get(path[-1], default)
        if not isinstance(value, list) or not all(
                isinstance(item, str) for item in value):
            raise self.error(path, "expected a list of strings")
        return value

    def choice(self, mapping, path, choices, default):
        value = mapping.get(path[-1], default)
        if value not in choices:
            raise self.error(path, "expected one of %s" % ", ".join(
                json.dumps(choice) for choice in choices))
        return value

    def number(self, mapping, path, default, integer=False, minimum=None):
        value = mapping.get(path[-1], default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or (
                minimum is None and value <= 0) or (
                minimum is not None and value < minimum):
            raise self.error(path, "expected a %s %s" % (
                "non-negative" if minimum == 0 else "positive",
                "integer" if integer else "number of seconds"))
        if not integer and not value <= MAX_TIMEOUT_SECONDS:
            # 1e400 parses as infinity; 1e10 s overflows socket timeouts.
            raise self.error(path, "expected at most %d seconds, the longest "
                             "timeout this platform can represent"
                             % MAX_TIMEOUT_SECONDS)
        return value if integer else float(value)

    def upstreams(self, raw):
        if self._upstreams is not None:
            return self._upstreams
        defaults = CONFIG_KEY_DEFAULTS
        named = self.typed(raw, ("upstreams",), dict, "an object",
                           defaults["upstreams"])
        default = {
            "url": self.typed(raw, ("upstream",), str, "a string",
                              defaults["upstream"]),
            "api_key": raw.get("upstream_api_key"),
            "connect_timeout": raw.get("connect_timeout",
                                       defaults["connect_timeout"]),
            "read_timeout": raw.get("read_timeout", defaults["read_timeout"]),
        }
        if raw.get("upstream_ca_file") is not None:
            self.ssl_context(raw)  # a CA file that cannot be loaded is an error now
        upstreams, group_specs = collections.OrderedDict(), []
        if DEFAULT_UPSTREAM_NAME in named:
            self.warn_shadowed_default(raw, named[DEFAULT_UPSTREAM_NAME])
        if DEFAULT_UPSTREAM_NAME not in named or "upstream" in raw:
            upstreams[DEFAULT_UPSTREAM_NAME] = self.upstream(
                DEFAULT_UPSTREAM_NAME, default, (), raw, top_level=True)
        for name, spec in named.items():
            path = ("upstreams", name)
            if not isinstance(spec, dict):
                raise self.error(path, "expected an object with a \"url\" (an "
                                       "upstream) or \"replicas\" (a group)")
            if "replicas" in spec:
                group_specs.append((name, spec, path))
                continue
            self.warn_unknown_keys(spec, path, UPSTREAM_KEYS)
            merged = dict(default, api_key=None)  # never lend the main key
            merged.update(spec)
            if "url" not in spec:
                raise self.error(path, "missing \"url\" (or \"replicas\" for a "
                                       "group of upstreams)")
            upstreams[name] = self.upstream(name, merged, path, raw)
        groups = dict((name, self.group(name, spec, path, upstreams))
                      for name, spec, path in group_specs)
        self._upstreams = upstreams, groups
        return self._upstreams

    def warn_shadowed_default(self, raw, spec):
        """Warn about top-level upstream settings that upstreams.default makes
        dead: its own "url" wins over "upstream", and "upstream_api_key" is
        never lent to a named upstream (nor to a group's members)."""
        replaces = "upstreams.default defines the default upstream"
        if "upstream" in raw and isinstance(spec, dict) and "replicas" not in spec:
            self.warnings.append("%s: ignored: %s" % (self.where(("upstream",)), replaces))
        if raw.get("upstream_api_key") is not None:
            self.warnings.append("%s: ignored: %s; give it (or its replicas) an "
                                 "\"api_key\"" % (self.where(("upstream_api_key",)),
                                                  replaces))

    def group(self, name, spec, path, upstreams):
        """Check a replica group: {"replicas": [upstream names], ...}."""
        self.warn_unknown_keys(spec, path, GROUP_KEYS)
        if name in upstreams:
            raise self.error(path, "a group cannot be called %r while \"upstream\" "
                             "also defines that upstream" % name, at_key=True)
        members = spec["replicas"]
        if not isinstance(members, list) or not members or not all(
                isinstance(member, str) for member in members):
            raise self.error(path + ("replicas",), "expected a non-empty list of "
                             "upstream names")
        for position, member in enumerate(members):
            if member not in upstreams:
                raise self.error(path + ("replicas", position), "unknown upstream "
                                 "%r (known: %s; a group cannot hold a group)" % (
                                     member, ", ".join(sorted(upstreams))))
            if members.index(member) != position:
                raise self.error(path + ("replicas", position),
                                 "%r is listed twice" % member)
        return ReplicaGroup(name, tuple(members), self.affinity(spec, path),
                            self.number(spec, path + ("eject_after",),
                                        DEFAULT_EJECT_AFTER, integer=True),
                            self.number(spec, path + ("cooldown",),
                                        DEFAULT_COOLDOWN_SECONDS))

    def affinity(self, spec, path):
        value = spec.get("affinity")
        if value is None or value in ("user", "prompt"):
            return value
        if isinstance(value, str) and value.startswith("header:") and re.match(
                r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", value[len("header:"):]):
            return ("header", value[len("header:"):].lower())
        raise self.error(path + ("affinity",), "expected one of %s, such as "
                         "\"header:X-Session-Id\"" % ", ".join(
                             json.dumps(mode) for mode in AFFINITY_MODES))

    def api_keys(self, raw):
        """Check api_keys: strings, or objects with a key, a name and limits."""
        entries = self.typed(raw, ("api_keys",), list, "a list of strings or "
                             "objects", [])
        keys, names, secrets = [], {}, {}
        for position, entry in enumerate(entries):
            path = ("api_keys", position)
            key = self.api_key(entry, path)
            if key.name in names:
                raise self.error(path, "the name %r is used twice (also at "
                                 "api_keys[%d])" % (key.name, names[key.name]))
            if key.secret in secrets:
                raise self.error(path, "the same key is listed twice (also at "
                                 "api_keys[%d])" % secrets[key.secret])
            names[key.name], secrets[key.secret] = position, position
            keys.append(key)
        return tuple(keys)

    def api_key(self, entry, path):
        if isinstance(entry, str):
            self.check_key(path, entry)
            secret = entry.encode("utf-8")
            return ApiKey(key_fingerprint(secret), secret, (), None, None)
        if not isinstance(entry, dict):
            raise self.error(path, "expected a key (a string) or an object with "
                             "\"key\" and \"name\"")
        self.warn_unknown_keys(entry, path, API_KEY_KEYS)
        if not isinstance(entry.get("key"), str):
            raise self.error(path + ("key",) if "key" in entry else path,
                             "expected \"key\": the secret as a string")
        self.check_key(path + ("key",), entry["key"])
        secret = entry["key"].encode("utf-8")
        name = self.typed(entry, path + ("name",), str, "a string",
                          key_fingerprint(secret))
        if not KEY_NAME_PATTERN.match(name):
            raise self.error(path + ("name",), "expected 1 to 64 letters, digits "
                             "or . _ @ + - (it is a log field and a metrics label)")
        models = self.string_list(entry, path + ("models",), [])
        if "models" in entry and not models:
            # An empty list would mean no list: every model.  Whoever wrote
            # it more likely meant none, so it is an error, not an open key.
            raise self.error(path + ("models",), "expected at least one model name "
                             "or pattern (leave \"models\" out to allow every model)")
        if not all(models):
            raise self.error(path + ("models",), "expected non-empty model names "
                             "or patterns")

        def limit(field):
            if field not in entry:
                return None
            return self.number(entry, path + (field,), None, integer=True)
        return ApiKey(name, secret, tuple(models), limit("max_concurrent"),
                      limit("requests_per_minute"))

    def upstream(self, name, spec, path, raw, top_level=False):
        url_path = ("upstream",) if top_level else path + ("url",)
        url = spec["url"]
        if not isinstance(url, str):
            raise self.error(url_path, "expected an http(s) URL string")
        try:
            scheme, host, port, base_path = parse_upstream_url(url)
        except ValueError as error:
            raise self.error(url_path, str(error))
        key_path = ("upstream_api_key",) if top_level else path + ("api_key",)
        api_key = spec.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise self.error(key_path, "expected a string")
        if api_key:
            self.check_key(key_path, api_key)
        key_header = self.choice(spec, path + ("api_key_header",), API_KEY_HEADERS,
                                 API_KEY_HEADERS[0])

        def timeout(key):
            return self.number(spec, (key,) if top_level else path + (key,), None)
        max_concurrent = None
        if spec.get("max_concurrent") is not None:
            max_concurrent = self.number(spec, path + ("max_concurrent",), None,
                                         integer=True)
        for key in ("max_queue", "queue_timeout"):
            if key in spec and max_concurrent is None:
                # The queue exists only behind max_concurrent.
                self.warnings.append("%s: %s has no effect without max_concurrent" % (
                    self.where(path + (key,)), key))
        return Upstream(name, url, scheme, host, port, base_path, api_key or None,
                        key_header,
                        timeout("connect_timeout"), timeout("read_timeout"),
                        self.ssl_context(raw) if scheme == "https" else None,
                        self.apis(spec, path + ("apis",)), max_concurrent,
                        self.number(spec, path + ("max_queue",), DEFAULT_MAX_QUEUE,
                                    integer=True, minimum=0),
                        self.number(spec, path + ("queue_timeout",),
                                    DEFAULT_QUEUE_TIMEOUT_SECONDS))

    def apis(self, spec, path):
        """Return the set of APIs an upstream speaks natively ("apis")."""
        apis = spec.get("apis", list(UPSTREAM_APIS))
        names = ", ".join(json.dumps(api) for api in UPSTREAM_APIS)
        if not isinstance(apis, list) or not apis:
            raise self.error(path, "expected a non-empty list of API names: %s" % names)
        for position, api in enumerate(apis):
            if api not in UPSTREAM_APIS:
                close = difflib.get_close_matches(str(api), UPSTREAM_APIS, 1)
                raise self.error(path + (position,), "unknown API %s%s; the APIs are %s" % (
                    json.dumps(api), " (did you mean %s?)" % json.dumps(close[0])
                    if close else "", names))
        return frozenset(apis)

    def ssl_context(self, raw):
        """Return the one SSL context of all https upstreams, made on first
        use: loading the CA store costs time and memory."""
        if self._ssl_context is None:
            self._ssl_context = self._make_ssl_context(raw)
        return self._ssl_context

    def _make_ssl_context(self, raw):
        verify = self.typed(raw, ("upstream_tls_verify",), bool, "true or false",
                            CONFIG_KEY_DEFAULTS["upstream_tls_verify"])
        ca_file = self.typed(raw, ("upstream_ca_file",), str, "a PEM file path",
                             None)
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise self.error(("upstream_ca_file",), "cannot load CA file %r: %s"
                             % (ca_file, getattr(error, "strerror", None) or error))
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def rule(self, raw_rule, path, upstreams, groups):
        if not isinstance(raw_rule, dict):
            raise self.error(path, "expected an object")
        self.warn_unknown_keys(raw_rule, path, RULE_KEYS)
        match = raw_rule.get("match_model")
        names = [match] if isinstance(match, str) else match
        if not isinstance(names, list) or not names or not all(
                isinstance(name, str) and name for name in names):
            raise self.error(path + ("match_model",) if "match_model" in raw_rule
                             else path, "expected \"match_model\": a model name "
                             "or pattern, or a list of them")
        unset = self.string_list(raw_rule, path + ("unset",), [])
        objects = [self.typed(raw_rule, path + (key,), dict, "an object", {})
                   for key in ("defaults", "set", "extra")]
        for key, values in zip(("defaults", "set"), objects):
            if "model" in values and not isinstance(values["model"], str):
                raise self.error(path + (key, "model"), "expected a model name "
                                 "(a string)")
        chain = raw_rule.get("upstream", DEFAULT_UPSTREAM_NAME)
        chain = [chain] if isinstance(chain, str) else chain
        if not isinstance(chain, list) or not chain or not all(
                isinstance(name, str) for name in chain):
            raise self.error(path + ("upstream",), "expected an upstream name "
                             "or a list of names")
        for position, name in enumerate(chain):
            if name not in upstreams and name not in groups:
                raise self.error(path + ("upstream",) if isinstance(
                    raw_rule.get("upstream"), str) else path + ("upstream", position),
                    "unknown upstream %r (known: %s)" % (
                        name, ", ".join(sorted(list(upstreams) + list(groups)))))
        response_model = raw_rule.get("response_model")
        if response_model is not None:
            response_model = self.choice(raw_rule, path + ("response_model",),
                                         RESPONSE_MODEL_CHOICES, None)
        return Rule(format_path(path), tuple(names), tuple(unset), objects[0],
                    objects[1], objects[2], tuple(chain), response_model)


def parse_listen(value):
    """Split "host:port" (or "[v6]:port") into (host, port int).

    An empty host means every IPv4 interface.  Raises ValueError.
    """
    match = re.match(r"^(?:\[([0-9A-Fa-f:.%\w]+)\]|([^\[\]:]*)):(\d{1,5})$", value)
    if not match or int(match.group(3)) > 65535:
        raise ValueError("expected \"host:port\" (IPv6 as \"[::1]:8080\"), got %r"
                         % value)
    host = match.group(1) or match.group(2) or "0.0.0.0"
    return host, int(match.group(3))


_URL_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def parse_upstream_url(url):
    """Split an upstream base URL into (scheme, host, port, base_path).

    The path prefix is kept without a trailing slash, so "http://h:11434/v1"
    gives base_path "/v1".  Raises ValueError for anything but http(s) URLs
    with a host and without query, fragment or credentials, and for spaces
    or control characters (urlsplit drops some on newer Pythons only, and an
    http.client that does not refuse them would put them in the request line).
    """
    if _URL_SPACE_OR_CONTROL.search(url):
        raise ValueError("an upstream URL must not contain spaces or control "
                         "characters, got %r" % url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError("not a valid URL: %s" % error)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL, got %r" % url)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("the upstream URL must not have a query, fragment or "
                         "credentials (use upstream_api_key), got %r" % url)
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port or default_port, parts.path.rstrip("/")


def default_config(overrides=None):
    """Return the built-in Config used when no config file exists."""
    config, _ = validate_config({}, "<defaults>", overrides=overrides)
    return config


def override_settings(raw, listen=None, upstream=None, every_upstream=False):
    """Return a copy of a raw config dict with command-line settings in place.

    listen ("host:port") replaces "listen"; upstream (a base URL) replaces
    the default upstream's URL (the top-level "upstream", or upstreams.default
    when that names it, which wins; a replica group named "default" becomes
    that one upstream), and with every_upstream the URL of every named
    upstream too (--demo: nothing leaves the machine).  raw is not mutated.
    """
    raw = dict(raw)
    if listen is not None:
        raw["listen"] = listen
    if upstream is None:
        return raw
    named = raw.get("upstreams")
    named = dict(named) if isinstance(named, dict) else None
    for name, spec in (named or {}).items():
        if not isinstance(spec, dict):
            continue
        if "replicas" in spec:
            if name == DEFAULT_UPSTREAM_NAME and not every_upstream:
                named[name] = {"url": upstream}
            continue  # a group's members are overridden as upstreams of their own
        if every_upstream or name == DEFAULT_UPSTREAM_NAME:
            named[name] = dict(spec, url=upstream)
    if named is not None:
        raw["upstreams"] = named
    if not (named and DEFAULT_UPSTREAM_NAME in named) or "upstream" in raw:
        raw["upstream"] = upstream
    return raw


###############################################################################
# Rule engine (pure) ##########################################################
###############################################################################

def is_pattern(name):
    """Return True when a match_model entry uses shell-style wildcards."""
    return not GLOB_CHARACTERS.isdisjoint(name)


def index_rules(rules):
    """Build the RuleIndex that select_rule uses, once per config."""
    exact, patterns, default = {}, [], None
    for position, rule in enumerate(rules):
        for name in rule.match_model:
            if name == "default":
                default = default or rule
            elif is_pattern(name):
                patterns.append((position, re.compile(fnmatch.translate(name)),
                                 rule))
            elif name not in exact:
                exact[name] = (position, rule)
    return RuleIndex(exact, tuple(patterns), default)


def shadowing_entry(earlier_rules, name):
    """Return (Rule, entry) for the first earlier rule that takes every model
    a match_model entry name would match, or None.

    An exact name is taken by the same name or a pattern matching it (gpt-4*
    before gpt-4o-mini); "default" by an earlier "default"; a pattern by the
    same pattern, or by one whose only wildcard is * and that matches it as
    text (such a pattern matches everything the other one does).
    """
    for rule in earlier_rules:
        for entry in rule.match_model:
            if entry == name:
                return rule, entry
            if name == "default" or not is_pattern(entry) or entry == "default":
                continue
            if is_pattern(name) and not GLOB_CHARACTERS.isdisjoint(
                    entry.replace("*", "")):
                continue  # ? and [...] can be narrower than the text they match
            if fnmatch.fnmatchcase(name, entry):
                return rule, entry
    return None


def select_rule(rule_index, model):
    """Return the Rule for a request's model, or None.

    The first rule in file order whose match_model equals the model or
    matches it as a case-sensitive shell pattern wins; the "default" rule
    applies only when no other rule matches, wherever it stands, and also to
    a body without a string "model".
    """
    if not isinstance(model, str):
        return rule_index.default
    position, rule = rule_index.exact.get(model, (sys.maxsize, None))
    for pattern_position, pattern, pattern_rule in rule_index.patterns:
        if pattern_position >= position:
            break
        if pattern.match(model):
            return pattern_rule
    return rule or rule_index.default


def copy_value(value):
    """Return a copy of a JSON value that shares nothing mutable with it
    (strings and numbers need no copy; deepcopy costs microseconds)."""
    if isinstance(value, (dict, list)):
        return copy.deepcopy(value)
    return value


def deep_merge(base, overlay):
    """Return a new dict: overlay merged into base, objects key by key.

    Nested dicts merge recursively; any other overlay value replaces the base
    value (lists are replaced, not concatenated).  Neither input is mutated
    and the result shares no mutable value with overlay.
    """
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy_value(value)
    return merged


def apply_rule(body, rule):
    """Return a new body dict with rule applied: unset, defaults, set, extra.

    unset deletes top-level keys (absent ones are fine), defaults fills
    top-level keys the client did not send, set overrides top-level keys
    (set.model renames the model) and extra deep-merges (see deep_merge).
    The client's key order is kept; body and rule are not mutated.
    """
    result = dict((key, value) for key, value in body.items()
                  if key not in rule.unset) if rule.unset else dict(body)
    for key, value in rule.defaults.items():
        if key not in result:
            result[key] = copy_value(value)
    for key, value in rule.set.items():
        result[key] = copy_value(value)
    return deep_merge(result, rule.extra) if rule.extra else result

_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                 allow_nan=False)

_COMPACT_ASCII_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def serialize_json(value):
    """Return value as compact UTF-8 JSON bytes, non-ASCII kept as is.

    Lone surrogates (valid as JSON \\u escapes, not encodable as UTF-8) are
    kept as \\u escapes instead.
    """
    try:
        return _COMPACT_JSON.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return _COMPACT_ASCII_JSON.encode(value).encode("ascii")


def rewrite_body(raw_body, body, rule):
    """Return (body bytes to send, model as sent) for a parsed request body.

    Without a rule the client's bytes are returned unchanged; with one the
    rewritten body is serialized once (see apply_rule, serialize_json).
    """
    if rule is None:
        return raw_body, body.get("model")
    rewritten = apply_rule(body, rule)
    return serialize_json(rewritten), rewritten.get("model")


###############################################################################
# Request parsing and auth (pure) #############################################
###############################################################################

def parse_json_body(raw_body):
    """Parse a request body that must be a JSON object; return the dict.

    Raises RelayError(400) when it is not UTF-8, not JSON (NaN, Infinity and
    numbers beyond a double are not JSON), nested too deeply, or not an
    object.  Source: RFC 8259 §6 and §8.1.
    """
    try:
        text = raw_body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RelayError(400, "The request body is not valid UTF-8 (invalid "
                              "byte at offset %d)." % error.start,
                         code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_reject_json_constant,
                          parse_float=_parse_finite_float,
                          parse_int=_parse_bounded_int)
    except RecursionError:
        raise RelayError(400, "The request body is nested too deeply.",
                         code="invalid_json")
    except ValueError as error:
        raise RelayError(400, "The request body is not valid JSON: %s" % error,
                         code="invalid_json")
    if not isinstance(body, dict):
        raise RelayError(400, "The request body must be a JSON object.",
                         code="invalid_json")
    return body


def _parse_bounded_int(text):
    if len(text) > MAX_JSON_INT_DIGITS:
        raise ValueError("integer with %d digits is too long" % len(text))
    return int(text)


def _parse_finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError("number %s is out of range" % text[:40])
    return value


_VISIBLE_ASCII = re.compile(r"[!-~]*")


def is_visible_ascii(text):
    """Return True when text is only visible ASCII, "!" to "~" (no space or
    control character): what header values and request targets may hold."""
    return _VISIBLE_ASCII.fullmatch(text) is not None


def new_request_id():
    """Return a new random request id: 32 hex digits, as uuid4().hex has.

    An id only tells requests apart in logs: it needs no cryptographic
    randomness, and random's generator (seeded from the OS at start) spares
    a getrandom() system call per request."""
    return "%032x" % random.getrandbits(128)


def sanitize_request_id(value):
    """Return a client X-Request-Id if usable (printable ASCII), else None."""
    if value and len(value) <= MAX_REQUEST_ID_CHARS and is_visible_ascii(value):
        return value
    return None


def client_credential(authorization, x_api_key):
    """Return the key a client presented (str), or None.

    The OpenAI SDKs and Claude Code's ANTHROPIC_AUTH_TOKEN send
    "Authorization: Bearer <key>"; the Anthropic SDKs and ANTHROPIC_API_KEY
    send "x-api-key: <key>".  A Bearer token wins when both are there.
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def find_api_key(credential, api_keys):
    """Return the ApiKey whose secret is credential (str or None; see
    client_credential), or None.

    Every key is compared in constant time (hmac.compare_digest), and all of
    them always, so the answer's timing tells neither how much of a key
    matched nor which entry did.
    """
    if credential is None:
        return None
    token = credential.encode("utf-8", "surrogateescape")
    found = None
    for api_key in api_keys:
        if hmac.compare_digest(token, api_key.secret):
            found = api_key
    return found


def check_api_key(credential, api_keys):
    """Return True when credential (str or None) is one of api_keys (ApiKey)."""
    return find_api_key(credential, api_keys) is not None


def key_fingerprint(secret):
    """Return the name of a key given as a plain string: "key-" and 8 hex
    digits of its SHA-256, which tell keys apart without revealing them."""
    return "key-" + hashlib.sha256(secret).hexdigest()[:8]


def key_allows_model(api_key, model):
    """Return True when an ApiKey may use model (a str, or None when the
    request names none): any model without a "models" list, else only names
    equal to an entry or matching it as a case-sensitive shell pattern."""
    if not api_key.models:
        return True
    if not isinstance(model, str):
        return False
    return any(fnmatch.fnmatchcase(model, pattern) if is_pattern(pattern)
               else model == pattern for pattern in api_key.models)


def top_level_members_named_twice(raw_body):
    """Return the set of member names that the top-level object of
    raw_body (bytes already accepted by parse_json_body) has more than once.

    json.loads keeps the last of two equal names, while some upstream JSON
    parsers keep the first (RFC 8259 §4 leaves it open): a check made on the
    parsed body must refuse a body in which the two could differ.  The
    outermost object is the last one completed, so the hook's last call
    sees its members.
    """
    outermost = []

    def keep_pairs(pairs):
        outermost[:] = [pairs]
        return {}
    json.loads(raw_body.decode("utf-8"), object_pairs_hook=keep_pairs)
    names, twice = set(), set()
    for name, _ in outermost[0] if outermost else ():
        (twice if name in names else names).add(name)
    return twice


def request_protocol(route, anthropic_version=None):
    """Return the PROTOCOL_* a request speaks, from its route path (without
    the /v1 prefix): /chat/completions, /completions, /messages and every
    path under it (count_tokens, batches), /responses and every path under it.
    /models and /models/{id} speak Anthropic's API (PROTOCOL_MESSAGES) when
    the request has an anthropic-version header (anthropic_version, str).
    """
    if anthropic_version and (route == "/models" or route.startswith("/models/")):
        return PROTOCOL_MESSAGES
    if route == "/chat/completions":
        return PROTOCOL_CHAT
    if route == "/completions":
        return PROTOCOL_COMPLETIONS
    if route == "/messages" or route.startswith("/messages/"):
        return PROTOCOL_MESSAGES
    if route == "/responses" or route.startswith("/responses/"):
        return PROTOCOL_RESPONSES
    return PROTOCOL_OTHER


def split_route(target):
    """Return (route path, query) for a request target.

    The absolute form ("http://elsewhere/v1/x") contributes only its path, so
    a client never chooses where the relay connects.  The optional /v1 prefix
    is removed: "/v1/chat/completions" and "/chat/completions" both give
    "/chat/completions".  Raises RelayError(400) for a target that is not a
    path or whose path has "." or ".." segments, raw or percent-encoded.
    """
    if not is_visible_ascii(target):
        raise RelayError(400, "The request target must be visible ASCII; "
                              "percent-encode other characters.",
                         code="invalid_path")
    path, query = target_path(target)
    if not path.startswith("/"):
        raise RelayError(400, "Invalid request target %s." % loggable_target(
            target)[:200])
    # A dot segment needs a "." in the path, raw or percent-encoded.
    if "." in path or "%" in path:
        segments = urllib.parse.unquote(path).split("/")
        if "." in segments or ".." in segments:
            raise RelayError(400, "The request path must not contain '.' or "
                                  "'..' segments.", code="invalid_path")
    if path == "/v1" or path.startswith("/v1/"):
        path = path[3:] or "/"
    return path, query


def target_path(target):
    """Return (path, query) of a request target, as sent (/v1 kept).

    RFC 9112 §3.2: the origin form is a path and a query, so "//x/y" is the
    path //x/y, never the authority x (urlsplit's reading, which Python 3.6's
    http.server followed); the absolute form contributes its path.
    """
    if target.startswith("/"):
        path, _, query = target.partition("#")[0].partition("?")
        return path, query
    parts = urllib.parse.urlsplit(target)
    return parts.path, parts.query


def target_protocol(target):
    """Return the PROTOCOL_* of a raw request target (see request_protocol),
    for errors answered before the target is routed."""
    path = target.partition("?")[0]
    if path == "/v1" or path.startswith("/v1/"):
        path = path[3:]
    return request_protocol(path)


###############################################################################
# Protocol translators (pure) #################################################
###############################################################################

# Serving the Anthropic Messages API and the OpenAI Responses API from an
# upstream that speaks only chat completions: requests are translated into a
# chat completions body, answers (whole or streamed) back into the client's
# protocol.  Everything here is pure: dropped features are returned as notes
# for the caller to log, never logged here.

TranslatedRequest = collections.namedtuple("TranslatedRequest", [
    "body",            # dict: the chat completions request body
    "notes",           # list of str: what was dropped, for one log line
    "custom_tools",    # frozenset of str: Responses custom tool names
    "stop_sequences",  # tuple of str: Anthropic stop_sequences asked for
])

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Anthropic thinking budgets (tokens) -> chat completions reasoning_effort.
THINKING_BUDGET_EFFORTS = ((4096, "low"), (16384, "medium"))
REASONING_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium",
                     "high": "high", "xhigh": "high", "max": "high"}

# Chat finish_reason -> Anthropic stop_reason (API reference: Messages).
ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens",
                          "tool_calls": "tool_use", "function_call": "tool_use",
                          "content_filter": "refusal"}

ANTHROPIC_PING_EVENT = b'event: ping\ndata: {"type":"ping"}\n\n'

# Sampling fields with the same name and meaning in both request shapes.
MESSAGES_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k")
RESPONSES_SAMPLING_FIELDS = ("temperature", "top_p", "parallel_tool_calls", "user")

STATELESS_MESSAGE = (
    "The relay is stateless: it keeps no stored responses or conversations, "
    "so %s cannot be served from an upstream that speaks only chat "
    "completions. Send \"store\": false and the whole conversation in "
    "\"input\" on every turn (as Codex does).")


DONE = "[DONE]"  # what parse_chat_sse_line returns for the end marker


class UpstreamStreamError(Exception):
    """An error object the upstream sent inside its event stream."""


def translates_to_chat(upstream, api):
    """Return True when a request of api ("messages", "responses") must be
    translated onto chat completions for upstream: it speaks chat
    completions but not that API (see UPSTREAM_APIS)."""
    return api not in upstream.apis and "chat" in upstream.apis


def estimate_input_tokens(body):
    """Return an estimate of a Messages request's input tokens (int): one
    token per 4 bytes of its system, messages and tools as compact JSON,
    the usual rule of thumb for English and code.  Upstreams that speak only
    chat completions have no counter to ask."""
    counted = dict((key, body.get(key)) for key in ("system", "messages", "tools"))
    return max(1, (len(serialize_json(counted)) + 3) // 4)


def upstream_error_message(data, status):
    """Return the message of an upstream's error body (OpenAI's {"error":
    {"message"}}, {"error": "..."}, {"message"} or plain text)."""
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:
        value = None
    if isinstance(value, dict):
        error = value.get("error", value)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    text = data.decode("utf-8", "replace").strip()
    return printable(text)[:1000] or "upstream answered %d" % status


def translated_error_body(api, data, status):
    """Return an upstream's error answer to a translated request as the
    client's protocol has it (bytes): on "messages" always Anthropic's error
    shape; on "responses" the upstream's body when it already is OpenAI's
    ({"error": {...}}), else its message wrapped in that shape, so an HTML
    or plain-text error page never goes out labelled as JSON."""
    if api == "messages":
        return serialize_json(anthropic_error(upstream_error_message(data, status),
                                              anthropic_error_type(status)))
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        return data
    return serialize_json(error_body(PROTOCOL_RESPONSES, status, upstream_error_message(
        data, status), code="upstream_error"))


def new_item_id(prefix):
    """Return an id such as "msg_" + 24 hex digits for a translated answer."""
    return prefix + binascii.hexlify(os.urandom(12)).decode("ascii")


def sse_event(event_type, payload):
    """Return one named SSE event as bytes (WHATWG HTML, server-sent events):
    b"event: <type>\\ndata: <compact JSON>\\n\\n"."""
    return (b"event: " + event_type.encode("ascii") + b"\ndata: " +
            serialize_json(payload) + b"\n\n")


def text_of_blocks(content, notes=None, where="content"):
    """Return the text of a string or a list of text blocks / parts.

    Text of blocks of type text, input_text and output_text is joined with
    blank lines; other blocks are noted as dropped in notes (a list).
    """
    if isinstance(content, str):
        return content
    texts = []
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and block.get("type") in (
                "text", "input_text", "output_text"):
            texts.append(str(block.get("text") or ""))
        elif isinstance(block, str):
            texts.append(block)
        elif notes is not None:
            notes.append("%s block %s" % (where, _block_type(block)))
    return "\n\n".join(texts)


def _block_type(block):
    return str(block.get("type")) if isinstance(block, dict) else type(block).__name__


def _chat_content(parts):
    """Return chat message content: a plain string when every part is text
    (older upstreams accept nothing else), else the list of parts."""
    if all(part["type"] == "text" for part in parts):
        return "\n\n".join(part["text"] for part in parts)
    return parts


def _function_tool(name, description, parameters):
    function = {"name": name, "parameters": parameters if isinstance(
        parameters, dict) else {"type": "object", "properties": {}}}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _tool_call(call_id, name, arguments):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


class _ChatMessages(object):
    """Builds a chat completions messages list: system text gathered at the
    top (chat templates of local models refuse a system message anywhere
    else), consecutive tool calls merged into one assistant message."""

    def __init__(self):
        self.system = []
        self.messages = []

    def add_system(self, text):
        if text:
            self.system.append(text)

    def add(self, role, content):
        self.messages.append({"role": role, "content": content})

    def add_tool_call(self, call_id, name, arguments):
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None}
            self.messages.append(last)
        last.setdefault("tool_calls", []).append(_tool_call(call_id, name, arguments))

    def add_tool_result(self, call_id, text):
        self.messages.append({"role": "tool", "tool_call_id": call_id,
                              "content": text})

    def result(self):
        system = [{"role": "system", "content": "\n\n".join(self.system)}] if \
            self.system else []
        return system + self.messages


def messages_to_chat_request(body):
    """Translate an Anthropic Messages request body into chat completions.

    body is the (rule-rewritten) Messages request dict.  Returns a
    TranslatedRequest.  thinking and redacted_thinking blocks are never sent;
    server tools, unknown blocks and Anthropic-only keys (cache_control,
    context_management, ...) are dropped and noted.  Source: the Anthropic
    API reference (Messages) and the OpenAI API reference (Chat).
    """
    notes = []
    chat = collections.OrderedDict()
    chat["model"] = body.get("model")
    messages = _ChatMessages()
    messages.add_system(text_of_blocks(body.get("system") or "", notes, "system"))
    if not isinstance(body.get("messages") or [], list):
        raise RelayError(400, "messages: must be an array of messages.", param="messages")
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            raise RelayError(400, "messages: each message must be an object.")
        _translate_anthropic_message(message, messages, notes)
    chat["messages"] = messages.result()
    for field in MESSAGES_SAMPLING_FIELDS:
        if body.get(field) is not None:
            chat[field] = body[field]
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise RelayError(400, "stop_sequences: must be an array of strings.",
                         param="stop_sequences")
    if stops:
        chat["stop"] = list(stops)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    effort = anthropic_reasoning_effort(body)
    if effort:
        chat["reasoning_effort"] = effort
    tools = _translate_anthropic_tools(body.get("tools") or (), notes)
    if tools:
        chat["tools"] = tools
        _translate_anthropic_tool_choice(body.get("tool_choice"), chat)
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return TranslatedRequest(dict(chat), notes, frozenset(), tuple(stops))


def anthropic_reasoning_effort(body):
    """Return the chat reasoning_effort for a Messages request, or None.

    thinking {"type": "enabled", "budget_tokens": N} maps by budget (under
    4096 low, under 16384 medium, else high); output_config.effort (sent with
    adaptive thinking) maps by name; disabled thinking gives None.
    """
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    if thinking.get("type") == "disabled":
        return None
    output_config = body.get("output_config")
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    if isinstance(effort, str) and effort in REASONING_EFFORTS:
        return REASONING_EFFORTS[effort]
    budget = thinking.get("budget_tokens")
    if thinking.get("type") == "enabled" and isinstance(budget, int):
        for limit, name in THINKING_BUDGET_EFFORTS:
            if budget < limit:
                return name
        return "high"
    return None


def _translate_anthropic_message(message, messages, notes):
    role, content = message.get("role"), message.get("content")
    if role == "system":  # Claude Code sends some mid-conversation
        messages.add_system(text_of_blocks(content, notes, "system"))
        return
    if isinstance(content, str):
        messages.add("assistant" if role == "assistant" else "user", content)
        return
    parts, tool_images = [], []
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text") or "")})
        elif kind == "image":
            image = anthropic_image_url(block)
            if image:
                parts.append({"type": "image_url", "image_url": {"url": image}})
            else:
                notes.append("image block without a base64 or URL source")
        elif kind == "document" and isinstance(block.get("source"), dict) and \
                block["source"].get("type") == "text":
            parts.append({"type": "text", "text": str(block["source"].get("data") or "")})
        elif kind == "tool_use" and role == "assistant":
            _flush_parts(messages, role, parts)
            parts = []
            messages.add_tool_call(str(block.get("id") or new_item_id("toolu_")),
                                   str(block.get("name") or ""),
                                   serialize_json(block.get("input") or {}).decode("utf-8"))
        elif kind == "tool_result":
            _flush_parts(messages, role, parts)
            parts = []
            tool_images.extend(_translate_tool_result(block, messages, notes))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # never sent upstream: the signature means nothing there
        else:
            notes.append("%s block %s" % (role, _block_type(block)))
    # Chat tool messages hold text only: images a tool returned follow the
    # tool messages in a user message.
    _flush_parts(messages, role, tool_images + parts)


def _flush_parts(messages, role, parts):
    if not parts:
        return
    if role == "assistant":
        last = messages.messages[-1] if messages.messages else None
        text = "\n\n".join(part.get("text", "") for part in parts)
        if last is not None and last["role"] == "assistant" and not last.get("content"):
            last["content"] = text  # text after the calls: one assistant turn
        else:
            messages.add("assistant", text)
    else:
        messages.add("user", _chat_content(parts))


def _translate_tool_result(block, messages, notes):
    """Add a tool message for a tool_result block; return the image parts it
    carried, which chat tool messages cannot hold, for a user message."""
    content = block.get("content")
    images, texts = [], []
    if not isinstance(content, (str, list)) and content is not None:
        content = [content]  # not a content shape: noted as dropped below
    for item in [content] if isinstance(content, str) else (content or ()):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(str(item.get("text") or ""))
        elif isinstance(item, dict) and item.get("type") == "image" and \
                anthropic_image_url(item):
            images.append({"type": "image_url",
                           "image_url": {"url": anthropic_image_url(item)}})
        else:
            notes.append("tool_result block %s" % _block_type(item))
    text = "\n\n".join(texts)
    if block.get("is_error") is True:
        text = "Error: " + text if text else "Error"
    messages.add_tool_result(str(block.get("tool_use_id") or ""), text)
    return images


def anthropic_image_url(block):
    """Return an image block's source as a URL (data: URL for base64), or
    None.  Source shapes: {"type": "base64", "media_type", "data"} and
    {"type": "url", "url"}."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64" and source.get("data"):
        return "data:%s;base64,%s" % (source.get("media_type") or "image/png",
                                      source["data"])
    if source.get("type") == "url" and source.get("url"):
        return str(source["url"])
    return None


def _translate_anthropic_tools(tools, notes):
    translated, dropped = [], []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        # Client tools have no type or "custom"; server tools such as
        # web_search_20250305 or bash_20250124 run at Anthropic only.
        if tool.get("type") in (None, "custom") and tool.get("name"):
            translated.append(_function_tool(tool["name"], tool.get("description"),
                                             tool.get("input_schema")))
        else:
            dropped.append(str(tool.get("name") or tool.get("type")))
    if dropped:
        notes.append("tools %s (not client tools)" % ", ".join(dropped))
    return translated


def _translate_anthropic_tool_choice(choice, chat):
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "tool" and choice.get("name"):
        chat["tool_choice"] = {"type": "function",
                               "function": {"name": choice["name"]}}
    elif kind in ("auto", "none"):
        chat["tool_choice"] = kind
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def responses_to_chat_request(body):
    """Translate an OpenAI Responses request body into chat completions.

    Returns a TranslatedRequest whose custom_tools names the free-form
    (custom) tools, such as Codex's apply_patch, sent upstream as functions
    with one string parameter "input".  Raises RelayError(400) for
    previous_response_id, conversation or store: true, which need state the
    relay does not keep.  Source: the OpenAI API reference (Responses, Chat).
    """
    for field in ("previous_response_id", "conversation"):
        if body.get(field):
            raise RelayError(400, STATELESS_MESSAGE % field, param=field,
                             code="stateless_relay")
    if body.get("store") is True:
        raise RelayError(400, STATELESS_MESSAGE % "\"store\": true", param="store",
                         code="stateless_relay")
    notes = []
    chat = collections.OrderedDict()
    chat["model"] = body.get("model")
    messages = _ChatMessages()
    if isinstance(body.get("instructions"), str):
        messages.add_system(body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        messages.add("user", items)
    else:
        for item in items if isinstance(items, list) else ():
            _translate_input_item(item, messages, notes)
    chat["messages"] = messages.result()
    tools, custom_tools = _translate_responses_tools(body.get("tools") or (), notes)
    if tools:
        chat["tools"] = tools
        _translate_responses_tool_choice(body.get("tool_choice"), chat)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for field in RESPONSES_SAMPLING_FIELDS:
        if body.get(field) is not None and (field != "parallel_tool_calls" or tools):
            chat[field] = body[field]
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if isinstance(effort, str) and effort in REASONING_EFFORTS:
        chat["reasoning_effort"] = REASONING_EFFORTS[effort]
    response_format = responses_text_format(body.get("text"))
    if response_format:
        chat["response_format"] = response_format
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return TranslatedRequest(dict(chat), notes, frozenset(custom_tools), ())


def _translate_input_item(item, messages, notes):
    if not isinstance(item, dict):
        raise RelayError(400, "input: each item must be an object.", param="input")
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        _translate_input_message(item, messages, notes)
    elif kind == "function_call":
        messages.add_tool_call(str(item.get("call_id") or ""), str(item.get("name") or ""),
                               _arguments_text(item.get("arguments")))
    elif kind == "custom_tool_call":
        messages.add_tool_call(str(item.get("call_id") or ""), str(item.get("name") or ""),
                               serialize_json({"input": str(item.get("input") or "")}
                                              ).decode("utf-8"))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        messages.add_tool_result(str(item.get("call_id") or ""), output if isinstance(
            output, str) else text_of_blocks(output, notes, kind))
    elif kind == "reasoning":
        pass  # the upstream's own reasoning is not replayed
    else:
        notes.append("input item %s" % kind)


def _arguments_text(arguments):
    if isinstance(arguments, str):
        return arguments
    return serialize_json(arguments if arguments is not None else {}).decode("utf-8")


def _translate_input_message(item, messages, notes):
    role, content = item.get("role"), item.get("content")
    if role in ("system", "developer"):
        messages.add_system(text_of_blocks(content, notes, role))
        return
    role = "assistant" if role == "assistant" else "user"
    if isinstance(content, str):
        messages.add(role, content)
        return
    parts = []
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        else:
            notes.append("%s content part %s" % (role, _block_type(part)))
    if parts:
        _flush_parts(messages, role, parts)


def custom_tool_parameters(tool):
    """Return the JSON schema of the one-string-parameter function that
    stands for a free-form custom tool; its grammar, if any, is described."""
    description = "The tool's whole input, as free-form text."
    tool_format = tool.get("format") if isinstance(tool.get("format"), dict) else {}
    if tool_format.get("type") == "grammar" and tool_format.get("definition"):
        description += " It must match this %s grammar:\n%s" % (
            tool_format.get("syntax") or "", tool_format["definition"])
    return {"type": "object", "properties": {"input": {
        "type": "string", "description": description}}, "required": ["input"]}


def _translate_responses_tools(tools, notes):
    translated, custom, dropped = [], [], []
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function" and isinstance(tool.get("name"), str) and tool["name"]:
            translated.append(_function_tool(tool["name"], tool.get("description"),
                                             tool.get("parameters")))
        elif kind == "custom" and isinstance(tool.get("name"), str) and tool["name"]:
            custom.append(tool["name"])
            translated.append(_function_tool(tool["name"], tool.get("description"),
                                             custom_tool_parameters(tool)))
        else:
            dropped.append(str(kind if kind != "function" else tool))
    if dropped:
        notes.append("tools of type %s" % ", ".join(dropped))
    return translated, custom


def _translate_responses_tool_choice(choice, chat):
    if choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") in ("function", "custom") \
            and choice.get("name"):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}


def responses_text_format(text):
    """Return the chat response_format for a Responses text.format, or None.

    {"type": "json_schema", "name", "schema", "strict"} becomes {"type":
    "json_schema", "json_schema": {...}}; {"type": "json_object"} is kept.
    """
    text_format = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text_format, dict):
        return None
    if text_format.get("type") == "json_schema":
        schema = collections.OrderedDict((key, text_format[key]) for key in (
            "name", "description", "schema", "strict") if key in text_format)
        return {"type": "json_schema", "json_schema": dict(schema)}
    if text_format.get("type") == "json_object":
        return {"type": "json_object"}
    return None


# -- answers --------------------------------------------------------------------

class ThinkTagSplitter(object):
    """Split streamed answer text into reasoning and text.

    Models served without a reasoning parser write their reasoning inside
    <think>...</think> at the start of the content; the tags may be split
    across chunks.  feed(text) and flush() return lists of (kind, text),
    kind "thinking" or "text".  Tags later in the answer are plain text.
    """

    def __init__(self):
        self.state = "start"  # start, thinking, after (the close tag), text
        self.pending = ""

    def feed(self, text):
        if self.state == "text":
            return [("text", text)] if text else []
        self.pending += text
        pieces = []
        if self.state == "start":
            stripped = self.pending.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.state, self.pending = "thinking", stripped[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(stripped):
                return pieces  # maybe the start of the tag: wait for more
            else:
                self.state = "text"
                text, self.pending = self.pending, ""
                return [("text", text)]
        if self.state == "thinking":
            end = self.pending.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_suffix(self.pending, THINK_CLOSE)
                thought = self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return [("thinking", thought)] if thought else []
            if end:
                pieces.append(("thinking", self.pending[:end]))
            self.state, self.pending = "after", self.pending[end + len(THINK_CLOSE):]
        if self.state == "after":
            self.pending = self.pending.lstrip()  # the blank line after the tag
            if self.pending:
                self.state = "text"
                pieces.append(("text", self.pending))
                self.pending = ""
        return pieces

    def flush(self):
        text, self.pending = self.pending, ""
        if not text:
            return []
        return [("thinking" if self.state == "thinking" else "text", text)]


def _partial_suffix(text, tag):
    """Return the length of the longest end of text that starts tag."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class ChatDeltaReader(object):
    """Read chat completions chunks into answer pieces, in order.

    read(chunk) and flush() return lists of pieces: ("thinking", text),
    ("text", text) or ("tool", number, call_id, name, arguments fragment);
    a new number starts a new tool call.  Handles reasoning_content and
    reasoning fields, <think> tags, several calls in one chunk, calls that
    share an index (told apart by their id), arguments split across chunks
    and arguments sent as objects.  finish_reason, matched_stop (vLLM's
    stop_reason), usage and model keep the last values seen.
    """

    def __init__(self):
        self.splitter = ThinkTagSplitter()
        # index -> [number, upstream id, id, name, pending arguments, arguments]
        self.calls = {}
        self.call_count = 0
        self.finish_reason = None
        self.matched_stop = None
        self.usage = None
        self.model = None

    def read(self, chunk):
        if not isinstance(chunk, dict):
            return []
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        pieces = []
        # An upstream's answer is untrusted: a field of the wrong type is
        # ignored, never a crash that would cut the client's stream.
        for choice in json_list(chunk.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue  # n > 1 has no counterpart in either protocol
            delta = choice.get("delta") or choice.get("message")
            if isinstance(delta, dict):
                self._read_delta(delta, pieces)
            if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
                self.finish_reason = choice["finish_reason"]
            if isinstance(choice.get("stop_reason"), str):
                self.matched_stop = choice["stop_reason"]
        return pieces

    def _read_delta(self, delta, pieces):
        for field in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(field), str) and delta[field]:
                pieces.append(("thinking", delta[field]))
                break
        if isinstance(delta.get("content"), str) and delta["content"]:
            pieces.extend(self.splitter.feed(delta["content"]))
        for position, call in enumerate(json_list(delta.get("tool_calls"))):
            if isinstance(call, dict):
                self._read_tool_call(call, position, pieces)

    def _read_tool_call(self, call, position, pieces):
        index = call.get("index")
        if not isinstance(index, (int, type(None))):
            index = str(index)  # hashable; still tells calls apart
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        upstream_id, name = call.get("id"), function.get("name")
        upstream_id = upstream_id if isinstance(upstream_id, str) else None
        name = name if isinstance(name, str) else None
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            arguments = serialize_json(arguments).decode("utf-8")
        current = self.calls.get(index)
        if current is None or self._starts_new_call(current, upstream_id, name):
            self.call_count += 1
            current = [self.call_count, upstream_id, upstream_id or new_item_id(
                "call_"), None, "", []]
            self.calls[index] = current
        if name and not current[3]:
            current[3] = name
        current[4] += arguments or ""  # emptied as soon as it is passed on
        current[5].append(arguments or "")
        if current[3] and (current[4] or name):
            pieces.extend(self.splitter.flush())
            pieces.append(("tool", current[0], current[2], current[3], current[4]))
            current[4] = ""

    @staticmethod
    def _starts_new_call(current, upstream_id, name):
        """Tell a new call from a piece of the current one at the same index:
        a different id, or (without ids) a name after complete arguments."""
        if upstream_id and current[1]:
            return upstream_id != current[1]
        if not name or not current[3] or upstream_id:
            return False
        try:
            json.loads("".join(current[5]))
        except ValueError:
            return False
        return True

    def flush(self):
        """Return the pieces held back at the end of the answer."""
        pieces = self.splitter.flush()
        for current in sorted(self.calls.values()):
            if current[4] or not current[3]:
                pieces.append(("tool", current[0], current[2], current[3] or "",
                               current[4]))
                current[4] = ""
        return pieces


def json_list(value):
    """Return value when it is a list (a JSON array), else an empty list:
    for fields of an upstream's answer, which may have any type."""
    return value if isinstance(value, list) else []


def chat_message_as_chunk(chat):
    """Return a whole chat completion as one chunk dict for ChatDeltaReader:
    the message becomes the delta and each tool call gets its position as
    index (a whole answer's calls need no index)."""
    choices = []
    for choice in json_list(chat.get("choices")):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        message = dict(message) if isinstance(message, dict) else {}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [dict(call, index=position) for position, call in
                                     enumerate(message["tool_calls"])
                                     if isinstance(call, dict)]
        choices.append(dict(choice, delta=message))
    return dict(chat, choices=choices)


def collect_pieces(pieces):
    """Merge answer pieces into blocks: lists ["thinking", text], ["text",
    text] or ["tool", call id, name, arguments], in order."""
    blocks, tool_numbers = [], {}
    for piece in pieces:
        last = blocks[-1] if blocks else None
        if piece[0] == "tool":
            if last is not None and last[0] == "tool" and tool_numbers.get(
                    piece[1]) is last:
                last[3] += piece[4]
            else:
                block = ["tool", piece[2], piece[3], piece[4]]
                tool_numbers[piece[1]] = block
                blocks.append(block)
        elif last is not None and last[0] == piece[0]:
            last[1] += piece[1]
        else:
            blocks.append([piece[0], piece[1]])
    return blocks


def parse_tool_input(arguments):
    """Return the tool input object of a call's arguments JSON text; text
    that is not a JSON object (a model's slip) is kept under "arguments"."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _count(usage, *path):
    value = usage
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def anthropic_usage(chat_usage, input_estimate=0):
    """Return Anthropic usage from a chat usage object (None: unknown).

    input_tokens excludes the cached prompt tokens, reported as
    cache_read_input_tokens, as Anthropic counts them.
    """
    if not isinstance(chat_usage, dict):
        return {"input_tokens": input_estimate, "output_tokens": 0}
    cached = _count(chat_usage, "prompt_tokens_details", "cached_tokens")
    usage = {"input_tokens": max(_count(chat_usage, "prompt_tokens") - cached, 0),
             "output_tokens": _count(chat_usage, "completion_tokens")}
    if cached:
        usage["cache_read_input_tokens"] = cached
    return usage


def responses_usage(chat_usage):
    """Return Responses usage (input, output and total tokens, with details)
    from a chat usage object; zeros when the upstream sent none."""
    usage = chat_usage if isinstance(chat_usage, dict) else {}
    prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": _count(
                usage, "prompt_tokens_details", "cached_tokens")},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": _count(
                usage, "completion_tokens_details", "reasoning_tokens")},
            "total_tokens": _count(usage, "total_tokens") or prompt + completion}


def anthropic_stop(finish_reason, matched_stop, stop_sequences, sent_tool_use):
    """Return (stop_reason, stop_sequence) from what was actually sent:
    tool_use whenever a tool_use block went out, whatever the upstream
    said; stop_sequence when the upstream names the sequence it matched."""
    if sent_tool_use:
        return "tool_use", None
    if finish_reason == "stop" and matched_stop in stop_sequences:
        return "stop_sequence", matched_stop
    return ANTHROPIC_STOP_REASONS.get(finish_reason, "end_turn"), None


def chat_to_messages_response(chat, model, stop_sequences=(), message_id=None):
    """Translate a whole chat completion into an Anthropic Messages answer.

    model is the name to report when the upstream gave none.  Shape: {"id",
    "type": "message", "role": "assistant", "model", "content": [blocks],
    "stop_reason", "stop_sequence", "usage"} (API reference: Messages).
    """
    reader = ChatDeltaReader()
    blocks = collect_pieces(reader.read(chat_message_as_chunk(chat)) + reader.flush())
    content = []
    for block in blocks:
        if block[0] == "thinking":
            content.append({"type": "thinking", "thinking": block[1], "signature": ""})
        elif block[0] == "text":
            content.append({"type": "text", "text": block[1]})
        else:
            content.append({"type": "tool_use", "id": block[1], "name": block[2],
                            "input": parse_tool_input(block[3])})
    stop_reason, stop_sequence = anthropic_stop(
        reader.finish_reason, reader.matched_stop, stop_sequences,
        any(block[0] == "tool" for block in blocks))
    return {"id": message_id or new_item_id("msg_"), "type": "message",
            "role": "assistant", "model": reader.model or model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": anthropic_usage(reader.usage)}


def parse_chat_sse_line(line):
    """Return the chunk dict of one chat completions SSE line, DONE for the
    end marker, or None for other lines (blank, comments, event names).

    Raises UpstreamStreamError for an {"error": ...} event and ValueError
    for a data line that is not JSON.
    """
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return DONE
    if not payload:
        return None
    chunk = json.loads(payload.decode("utf-8"))
    if isinstance(chunk, dict) and chunk.get("error") is not None:
        error = chunk["error"]
        raise UpstreamStreamError(error.get("message") if isinstance(error, dict) and
                                  error.get("message") else str(error)[:500])
    return chunk


class ChatStreamTranslator(object):
    """The input side the stream translators share: chat completions SSE
    lines read by a ChatDeltaReader (self.reader), until data: [DONE].
    Subclasses turn what the reader found into their protocol's events in
    _write(pieces) -> bytes."""

    def feed_line(self, line):
        """Return the client's events (bytes, maybe b"") for one upstream
        SSE line; nothing after data: [DONE].  Raises UpstreamStreamError
        for an error event and ValueError for a line that is not JSON."""
        chunk = parse_chat_sse_line(line)
        if chunk is DONE:
            self.done = True
            return b""
        if chunk is None or self.done:
            return b""
        return self._write(self.reader.read(chunk))

    def feed_chunk(self, chunk):
        """Return the events for one chat chunk dict (see feed_line)."""
        return self._write(self.reader.read(chunk))


class MessagesStreamTranslator(ChatStreamTranslator):
    """Turn a chat completions SSE stream into Anthropic's event stream.

    start() gives message_start (sent at once); feed_line(line) the events
    for one upstream SSE line; finish() closes the open block and sends
    message_delta (stop_reason, cumulative usage: only now, after the
    upstream's final usage chunk) and message_stop; fail(message) an error
    event.  Blocks are never interleaved and their indexes rise from 0.
    Source: the Anthropic API reference, "Streaming Messages".  No [DONE].
    """

    def __init__(self, model, stop_sequences=(), input_tokens=0, message_id=None):
        self.reader = ChatDeltaReader()
        self.model = model
        self.stop_sequences = stop_sequences
        self.input_tokens = input_tokens
        self.message_id = message_id or new_item_id("msg_")
        self.index = -1
        self.open_block = None  # ("text" | "thinking", None) or ("tool", number)
        self.sent_tool_use = False
        self.done = False

    def start(self):
        return sse_event("message_start", {"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": {"input_tokens": self.input_tokens,
                                             "output_tokens": 0}}})

    def _write(self, pieces):
        events = []
        for piece in pieces:
            kind = piece[0]
            key = (kind, piece[1]) if kind == "tool" else (kind, None)
            if key != self.open_block:
                events.append(self._close_block())
                events.append(self._open_block(key, piece))
            if kind == "tool":
                delta = {"type": "input_json_delta", "partial_json": piece[4]}
            elif kind == "text":
                delta = {"type": "text_delta", "text": piece[1]}
            else:
                delta = {"type": "thinking_delta", "thinking": piece[1]}
            if kind != "tool" or piece[4]:
                events.append(sse_event("content_block_delta", {
                    "type": "content_block_delta", "index": self.index,
                    "delta": delta}))
        return b"".join(events)

    def _open_block(self, key, piece):
        self.index += 1
        self.open_block = key
        if key[0] == "tool":
            self.sent_tool_use = True
            block = {"type": "tool_use", "id": piece[2], "name": piece[3], "input": {}}
        elif key[0] == "text":
            block = {"type": "text", "text": ""}
        else:
            block = {"type": "thinking", "thinking": "", "signature": ""}
        return sse_event("content_block_start", {
            "type": "content_block_start", "index": self.index, "content_block": block})

    def _close_block(self):
        if self.open_block is None:
            return b""
        self.open_block = None
        return sse_event("content_block_stop", {"type": "content_block_stop",
                                                "index": self.index})

    def finish(self):
        events = self._write(self.reader.flush()) + self._close_block()
        stop_reason, stop_sequence = anthropic_stop(
            self.reader.finish_reason, self.reader.matched_stop, self.stop_sequences,
            self.sent_tool_use)
        return events + sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop_reason,
                                               "stop_sequence": stop_sequence},
            "usage": anthropic_usage(self.reader.usage, self.input_tokens)}) + \
            sse_event("message_stop", {"type": "message_stop"})

    @staticmethod
    def fail(message, status=502):
        """Return Anthropic's error event, its type from status."""
        return sse_event("error", anthropic_error(message, anthropic_error_type(status)))

    @staticmethod
    def ping():
        return ANTHROPIC_PING_EVENT


def responses_object(response_id, model, created_at, request, status="completed",
                     output=(), usage=None, error=None):
    """Return a Responses API response object (API reference: Responses).

    request is the client's body, from which the echoed settings come;
    status is completed, incomplete (max_output_tokens), failed or
    in_progress.
    """
    return collections.OrderedDict((
        ("id", response_id), ("object", "response"), ("created_at", created_at),
        ("status", status), ("error", error),
        ("incomplete_details", {"reason": "max_output_tokens"}
         if status == "incomplete" else None),
        ("instructions", request.get("instructions")),
        ("max_output_tokens", request.get("max_output_tokens")),
        ("model", model), ("output", list(output)),
        ("parallel_tool_calls", request.get("parallel_tool_calls", True)),
        ("reasoning", request.get("reasoning")),
        ("store", False),
        ("temperature", request.get("temperature")),
        ("text", request.get("text") or {"format": {"type": "text"}}),
        ("tool_choice", request.get("tool_choice", "auto")),
        ("tools", request.get("tools") or []),
        ("top_p", request.get("top_p")),
        ("usage", usage), ("metadata", request.get("metadata") or {}),
    ))


def responses_output_item(block, custom_tools, item_id=None, status="completed"):
    """Return the Responses output item for one collected answer block:
    reasoning (summary text), message (output_text), function_call, or
    custom_tool_call for a call of one of custom_tools (its input unwrapped
    from the one-string-parameter function)."""
    kind = block[0]
    if kind == "thinking":
        return {"id": item_id or new_item_id("rs_"), "type": "reasoning",
                "summary": [{"type": "summary_text", "text": block[1]}]}
    if kind == "text":
        return {"id": item_id or new_item_id("msg_"), "type": "message",
                "status": status, "role": "assistant", "content": [
                    {"type": "output_text", "text": block[1], "annotations": [],
                     "logprobs": []}]}
    if block[2] in custom_tools:
        return {"id": item_id or new_item_id("ctc_"), "type": "custom_tool_call",
                "status": status, "call_id": block[1], "name": block[2],
                "input": custom_tool_input(block[3])}
    return {"id": item_id or new_item_id("fc_"), "type": "function_call",
            "status": status, "call_id": block[1], "name": block[2],
            "arguments": block[3]}


def custom_tool_input(arguments):
    """Return a custom tool's free-form input from the arguments of the
    function that stood for it ({"input": "..."}); other text as it is."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    return value if isinstance(value, str) else arguments


def responses_status(finish_reason):
    """Return a response's status: incomplete when the upstream stopped at
    the token limit, else completed."""
    return "incomplete" if finish_reason == "length" else "completed"


def chat_to_responses_response(chat, model, request, custom_tools=frozenset(),
                               response_id=None, created_at=None):
    """Translate a whole chat completion into a Responses API response object
    (see responses_object); request is the client's body."""
    reader = ChatDeltaReader()
    blocks = collect_pieces(reader.read(chat_message_as_chunk(chat)) + reader.flush())
    output = [responses_output_item(block, custom_tools) for block in blocks]
    return responses_object(
        response_id or new_item_id("resp_"), reader.model or model,
        created_at or int(time.time()), request,
        responses_status(reader.finish_reason), output,
        responses_usage(reader.usage))


class ResponsesStreamTranslator(ChatStreamTranslator):
    """Turn a chat completions SSE stream into the Responses event stream.

    start() gives response.created and response.in_progress; feed_line(line)
    the events for one upstream SSE line; finish() closes the open item and
    sends response.completed (response.incomplete when the upstream hit the
    token limit) with usage; fail(message) sends response.failed.  Every
    event carries a rising sequence_number; the response reports model (with
    fixed_model false, the upstream's name once known).  Calls of custom_tools become
    custom_tool_call items, their input sent whole once the call is complete
    (the upstream streams it JSON-encoded).  Source: the OpenAI API
    reference, "Streaming events" of the Responses API.
    """

    def __init__(self, model, request, custom_tools=frozenset(), response_id=None,
                 created_at=None, fixed_model=False):
        self.reader = ChatDeltaReader()
        self.model = model
        self.fixed_model = fixed_model
        self.request = request
        self.custom_tools = custom_tools
        self.response_id = response_id or new_item_id("resp_")
        self.created_at = created_at or int(time.time())
        self.sequence = -1
        self.output = []  # finished output items
        self.open_item = None  # [key, item id, collected block, ...]
        self.done = False

    def _event(self, event_type, payload):
        self.sequence += 1
        event = {"type": event_type}
        event.update(payload)
        event["sequence_number"] = self.sequence
        return sse_event(event_type, event)

    def _response(self, status, usage=None, error=None):
        model = self.model if self.fixed_model else self.reader.model or self.model
        return responses_object(self.response_id, model,
                                self.created_at, self.request, status, self.output,
                                usage, error)

    def start(self):
        return self._event("response.created", {
            "response": self._response("in_progress")}) + self._event(
            "response.in_progress", {"response": self._response("in_progress")})

    @staticmethod
    def ping():
        """Return an SSE comment: the Responses API has no ping event, and
        clients skip comments (WHATWG HTML, server-sent events)."""
        return b": ping\n\n"

    def _write(self, pieces):
        events = []
        for piece in pieces:
            key = (piece[0], piece[1]) if piece[0] == "tool" else (piece[0], None)
            if self.open_item is None or self.open_item[0] != key:
                events.append(self._close_item())
                events.append(self._open_item(key, piece))
            events.append(self._delta(piece))
        return b"".join(events)

    def _open_item(self, key, piece):
        if key[0] == "tool":
            block = ["tool", piece[2], piece[3], ""]
        else:
            block = [key[0], ""]
        item = responses_output_item(block, self.custom_tools, status="in_progress")
        if item["type"] == "message":
            item["content"] = []
        elif item["type"] == "reasoning":
            item["summary"] = []
        elif item["type"] == "custom_tool_call":
            item["input"] = ""
        self.open_item = [key, item["id"], block, []]  # [3]: the text's pieces
        events = [self._event("response.output_item.added", {
            "output_index": len(self.output), "item": item})]
        where = {"item_id": item["id"], "output_index": len(self.output)}
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", dict(
                where, content_index=0, part={"type": "output_text", "text": "",
                                              "annotations": []})))
        elif item["type"] == "reasoning":
            events.append(self._event("response.reasoning_summary_part.added", dict(
                where, summary_index=0, part={"type": "summary_text", "text": ""})))
        return b"".join(events)

    def _delta(self, piece):
        block, parts = self.open_item[2], self.open_item[3]
        where = {"item_id": self.open_item[1], "output_index": len(self.output)}
        if piece[0] == "tool":
            parts.append(piece[4])  # joined once the item closes: no O(n^2)
            if block[2] in self.custom_tools or not piece[4]:
                return b""  # sent whole at the end of the call
            return self._event("response.function_call_arguments.delta",
                               dict(where, delta=piece[4]))
        parts.append(piece[1])
        if piece[0] == "text":
            return self._event("response.output_text.delta", dict(
                where, content_index=0, delta=piece[1], logprobs=[]))
        return self._event("response.reasoning_summary_text.delta", dict(
            where, summary_index=0, delta=piece[1]))

    def _close_item(self):
        if self.open_item is None:
            return b""
        key, item_id, block, parts = self.open_item
        self.open_item = None
        block[-1] = "".join(parts)  # the text, or a call's arguments
        item = responses_output_item(block, self.custom_tools, item_id)
        where = {"item_id": item_id, "output_index": len(self.output)}
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self._event("response.output_text.done", dict(
                where, content_index=0, text=part["text"], logprobs=[])))
            events.append(self._event("response.content_part.done", dict(
                where, content_index=0, part=part)))
        elif item["type"] == "reasoning":
            events.append(self._event("response.reasoning_summary_text.done", dict(
                where, summary_index=0, text=block[1])))
            events.append(self._event("response.reasoning_summary_part.done", dict(
                where, summary_index=0, part=item["summary"][0])))
        elif item["type"] == "custom_tool_call":
            events.append(self._event("response.custom_tool_call_input.delta", dict(
                where, delta=item["input"])))
            events.append(self._event("response.custom_tool_call_input.done", dict(
                where, input=item["input"])))
        else:
            events.append(self._event("response.function_call_arguments.done", dict(
                where, name=item["name"], arguments=item["arguments"])))
        events.append(self._event("response.output_item.done", {
            "output_index": len(self.output), "item": item}))
        self.output.append(item)
        return b"".join(events)

    def finish(self):
        events = self._write(self.reader.flush()) + self._close_item()
        status = responses_status(self.reader.finish_reason)
        return events + self._event("response.completed" if status == "completed"
                                    else "response.incomplete", {
            "response": self._response(status, responses_usage(self.reader.usage))})

    def fail(self, message, status=502):
        """Return response.failed with the error (code server_error for a
        5xx status); the open item is left as it is: the answer is cut."""
        code = "server_error" if status >= 500 else "invalid_request"
        return self._event("response.failed", {"response": self._response(
            "failed", error={"code": code, "message": message})})


###############################################################################
# Answers: model names (pure) #################################################
###############################################################################

# A JSON "model" member whose value is a string, wherever it stands; inside a
# JSON string every quote is escaped, so this matches members only.
_MODEL_MEMBER = re.compile(b'"model"[ \t\r\n]*:[ \t\r\n]*"(?:[^"\\\\]|\\\\.)*"')

# The protocols whose answers carry the model name (response_model applies).
MODEL_NAMING_PROTOCOLS = frozenset((PROTOCOL_CHAT, PROTOCOL_COMPLETIONS,
                                    PROTOCOL_MESSAGES, PROTOCOL_RESPONSES))


def model_renamer(model):
    """Return a function(line bytes) -> line bytes that makes the first
    "model" member of an SSE line report model (str).

    The events that carry a model name have it as their first "model"
    member: a chat completion chunk's top-level model, message_start's
    message.model (Anthropic Messages), response.model in the Responses
    events that carry a response object.  Lines without the bytes "model"
    are returned as they are, unparsed.
    """
    member = b'"model":' + serialize_json(model)

    def rename(line):
        if b'"model"' not in line:
            return line
        return _MODEL_MEMBER.sub(lambda match: member, line, 1)
    return rename


def rename_model_in_body(data, model):
    """Return a JSON answer body (bytes) with its top-level "model" set to
    model (str): chat completions, completions, a Messages API message and a
    Responses API response object all carry it there.  A body that is not a
    JSON object with a string model is returned unchanged."""
    try:
        value = json.loads(data.decode("utf-8"),
                           object_pairs_hook=collections.OrderedDict)
    except ValueError:
        return data
    if not isinstance(value, dict) or not isinstance(value.get("model"), str):
        return data
    value["model"] = model
    return serialize_json(value)


###############################################################################
# HTTP framing ################################################################
###############################################################################

# RFC 9110 §5.6.2: a token, the syntax of field names, methods and codings.
_TOKEN = br"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_IS_TOKEN = re.compile(_TOKEN + br"\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_STR_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# RFC 9112 §5: field-name ":" OWS field-value OWS, ended by CRLF (or LF,
# §2.2).  A value is visible ASCII, obs-text, SP and HTAB: never CR, LF, NUL
# or another control character.  The trailing OWS is stripped afterwards.
_FIELD_LINE = re.compile(
    br"(" + _TOKEN + br"):[ \t]*([\t\x20-\x7e\x80-\xff]*)\r?\n\Z")
# The same field line found anywhere in a Latin-1 decoded section (one line
# per match, since a value holds no CR or LF): name, and the value without
# its outer whitespace, which starts and ends with a character that is not
# SP or HTAB (a greedy run backed off to its last such character: a lazy
# one would try the end of the line at every character).
_FIELD_LINE_IN_SECTION = re.compile(
    r"^(" + _TOKEN.decode("ascii") + r"):[ \t]*"
    r"((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)"
    r"[ \t]*\r?\n", re.MULTILINE)
# RFC 9112 §3: method SP request-target SP HTTP-version, single spaces.
_REQUEST_LINE = re.compile(
    br"(" + _TOKEN + br") ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r?\n\Z")
# RFC 9112 §4; the reason phrase may be missing (many servers omit it).
_STATUS_LINE = re.compile(
    br"HTTP/(1\.[01]) ([1-9][0-9]{2})(?: ([\t\x20-\x7e\x80-\xff]*))?\r?\n\Z")
_QUOTED_STRING = br'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, nothing before the size and
# nothing but extensions after it.
_CHUNK_LINE = re.compile(
    br"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN + br"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN + br"|" + _QUOTED_STRING + br"))?)*\r\n\Z")


class FieldList(object):
    """Header fields in arrival order, looked up case-insensitively.

    fields is a list of (name, value) str pairs.  Offers the part of
    email.message.Message's interface that http.server and http.client
    callers use (get, get_all, items, keys, in, []), without its parser,
    and lookups by lowercase name for the relay's own code (values_of,
    first), which skip lowering and copying.
    """

    __slots__ = ("_fields", "_by_name")

    def __init__(self, fields):
        self._fields = fields
        by_name = {}
        for name, value in fields:
            lowered = name.lower()
            if lowered in by_name:
                by_name[lowered].append(value)
            else:
                by_name[lowered] = [value]
        self._by_name = by_name

    def values_of(self, lowercase_name):
        """Return every value of the header lowercase_name, in order: a
        list not to be changed, or () when there is none."""
        return self._by_name.get(lowercase_name, ())

    def first(self, lowercase_name):
        """Return the first value of the header lowercase_name, or None."""
        values = self._by_name.get(lowercase_name)
        return values[0] if values else None

    def get(self, name, default=None):
        values = self._by_name.get(name.lower())
        return values[0] if values else default

    __getitem__ = get

    def get_all(self, name, default=None):
        return list(self._by_name.get(name.lower(), ())) or default

    def items(self):
        return list(self._fields)

    def keys(self):
        return [name for name, _ in self._fields]

    def values(self):
        return [value for _, value in self._fields]

    def __contains__(self, name):
        return name.lower() in self._by_name

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._fields)


def read_field_lines(source, section="header"):
    """Read a field section up to its empty line (RFC 9112 §5, §7.1.2).

    source is a buffered binary file; section names it in messages
    ("header" or "trailer").  Returns a list of (name, value) str pairs
    (values decoded as Latin-1, outer whitespace removed).  Raises
    BadMessage (400 malformed, 431 past MAX_FIELD_LINE_BYTES or
    MAX_FIELD_LINES) or MessageCutShort when the peer closes first.
    """
    # Heads only: a trailer section can be read by a stream's line pump
    # thread while the handler closes the response, and on Python 3.6 a
    # peek racing another thread's close() can read the buffer close() has
    # freed (a segfault, seen in the suite); heads are read and closed by
    # one thread.
    if section == "header":
        fields = read_buffered_field_section(source)
        if fields is not None:
            return fields
    fields = []
    while True:
        line = source.readline(MAX_FIELD_LINE_BYTES + 1)
        match = _FIELD_LINE.match(line)
        if match is None:
            if line == b"\r\n" or line == b"\n":
                return fields
            raise field_line_error(line, section)
        if len(fields) == MAX_FIELD_LINES:
            raise BadMessage("more than %d %s fields" % (MAX_FIELD_LINES, section),
                             431)
        fields.append((match.group(1).decode("ascii"),
                       match.group(2).rstrip(b" \t").decode("latin-1")))


def read_buffered_field_section(source):
    """Return the fields of a section that source (a buffered binary file)
    already holds whole, parsed in one pass as read_field_lines would, and
    consume it; else None, consuming nothing.

    A head usually arrives in one segment: one find and one regular
    expression over it cost far less than a readline, a match and two
    decodes per line.  Sections that are not plainly valid and within the
    limits (an invalid line, a bare-LF empty line, past MAX_FIELD_LINES or
    MAX_FIELD_LINE_BYTES, not all buffered) are left to the line-by-line
    reader, which gives the exact error.  No other thread may close source
    meanwhile (see read_field_lines).
    """
    peek = getattr(source, "peek", None)
    if peek is None:
        return None
    buffered = peek(MAX_FIELD_LINE_BYTES)
    end = buffered.find(b"\r\n\r\n", 0, MAX_FIELD_LINE_BYTES)
    if end < 0 or buffered[:1] in (b"\r", b"\n"):
        return None
    text = buffered[:end + 2].decode("latin-1")
    fields = _FIELD_LINE_IN_SECTION.findall(text)
    # Each match is one whole line: any line left unmatched is invalid.
    if len(fields) != text.count("\n") or len(fields) > MAX_FIELD_LINES:
        return None
    source.read(end + 4)
    return fields


def field_line_error(line, section):
    """Return the exception for a line that is not a valid field line."""
    if not line.endswith(b"\n"):
        if len(line) > MAX_FIELD_LINE_BYTES:
            return BadMessage("a %s line longer than %d bytes" % (
                section, MAX_FIELD_LINE_BYTES), 431)
        return MessageCutShort(b"")
    name, colon, _ = line.partition(b":")
    if line[:1] in (b" ", b"\t"):
        reason = "obsolete line folding (a %s line starting with whitespace)"
    elif not colon:
        reason = "a %s line without a colon"
    elif name != name.rstrip(b" \t"):
        reason = "whitespace between a %s name and its colon"
    elif not _IS_TOKEN.match(name):
        reason = "a %s name that is not a token"
    else:
        reason = "a control character (CR, NUL, ...) in a %s value"
    return BadMessage(reason % section)


def parse_request_line(line):
    """Split a request line into (method, target, version) str.

    RFC 9112 §3: single spaces, a token method, a visible-ASCII target and
    HTTP/1.0 or HTTP/1.1.  Raises BadMessage (400, or 505 for another
    version).
    """
    match = _REQUEST_LINE.match(line)
    if match is None:
        raise BadMessage("a malformed request line (expected \"METHOD "
                         "/path HTTP/1.1\" with single spaces)")
    method, target, version = [part.decode("ascii") for part in match.groups()]
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadMessage("HTTP version %s is not supported; use HTTP/1.1"
                         % version, 505)
    return method, target, version


def list_elements(values):
    """Return the elements of a comma-separated header list (RFC 9110
    §5.6.1): lowercase, SP/HTAB trimmed, empty elements dropped."""
    elements = []
    for value in values:
        for element in value.split(","):
            element = element.strip(" \t")
            if element:
                elements.append(element.lower())
    return elements


def parse_content_length(values):
    """Return the body length from every Content-Length value (a list).

    RFC 9112 §6.3: all values must be the same string of digits (a repeated
    identical value counts once).  Raises BadMessage.
    """
    if len(values) == 1 and "," not in values[0]:
        length = values[0].strip(" \t")  # the usual case: one value
    else:
        lengths = set(element.strip(" \t") for value in values
                      for element in value.split(","))
        if len(lengths) != 1:
            raise BadMessage("differing Content-Length values")
        length = lengths.pop()
    if not _DIGITS.match(length):
        raise BadMessage("an invalid Content-Length")
    if len(length) > 18:
        raise BadMessage("a Content-Length beyond any limit", 413)
    return int(length)


def transfer_codings(values):
    """Return the Transfer-Encoding codings (lowercase) of values (a list).

    Only chunked, once and last, is decoded here.  RFC 9112 §6.1, §6.3.
    Raises BadMessage: 400 when chunked is not the final coding (the length
    is then unknowable) or a coding is not a token, 501 for other codings.
    """
    # Every element must be a token: an empty one ("chunked,") too is
    # refused, as h11 does, though RFC 9110 §5.6.1 lets recipients skip it.
    codings = [element.strip(" \t").lower() for value in values
               for element in value.split(",")]
    if not all(_STR_TOKEN.match(coding) for coding in codings):
        raise BadMessage("an invalid Transfer-Encoding")
    if not codings or codings[-1] != "chunked" or codings.count("chunked") > 1:
        raise BadMessage("Transfer-Encoding must end with chunked, once")
    if len(codings) > 1:
        raise BadMessage("Transfer-Encoding %s is not supported (only chunked)"
                         % ", ".join(codings), 501)
    return codings


def request_body_length(version, fields):
    """Return a request's body length from its head: int bytes, or None for
    a chunked body.  fields is a FieldList.

    RFC 9112 §3.2 (exactly one Host in HTTP/1.1), §6.1 (no
    Transfer-Encoding in HTTP/1.0, none together with Content-Length) and
    §6.3.  Raises BadMessage.
    """
    hosts = fields.values_of("host")
    if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
        raise BadMessage("an HTTP/1.1 request needs exactly one Host header")
    transfer = fields.values_of("transfer-encoding")
    lengths = fields.values_of("content-length")
    if transfer:
        if lengths:
            raise BadMessage("Transfer-Encoding and Content-Length together")
        if version == "HTTP/1.0":
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 request")
        transfer_codings(transfer)
        return None
    return parse_content_length(lengths) if lengths else 0


def read_response_head(source):
    """Read an upstream's response head, skipping interim 1xx responses.

    Returns (version 10 or 11, status int, reason str, FieldList).  RFC 9112 §4 and §5;
    RFC 9110 §15.2 (102 and 103 come before the answer; 101 cannot be
    relayed).  Raises http.client.RemoteDisconnected when nothing came,
    BadMessage or MessageCutShort.
    """
    for _ in range(MAX_INTERIM_RESPONSES):
        line = source.readline(MAX_FIELD_LINE_BYTES + 1)
        if not line:
            raise http.client.RemoteDisconnected("closed without answering")
        match = _STATUS_LINE.match(line)
        if match is None:
            if not line.endswith(b"\n") and len(line) <= MAX_FIELD_LINE_BYTES:
                raise MessageCutShort(b"")
            raise BadMessage("a malformed status line")
        status = int(match.group(2))
        fields = FieldList(read_field_lines(source))
        if status == 101:
            raise BadMessage("an unexpected 101 Switching Protocols")
        if status >= 200:
            return (11 if match.group(1) == b"1.1" else 10, status,
                    (match.group(3) or b"").decode("latin-1").strip(), fields)
    raise BadMessage("more than %d interim responses" % MAX_INTERIM_RESPONSES)


def response_body_framing(method, status, version, fields):
    """Return (length, chunked) for a response body: length in bytes, or
    None when it is chunked or ends at the close.

    RFC 9112 §6.3: no body after HEAD, 204 and 304; Transfer-Encoding
    together with Content-Length, differing lengths, an HTTP/1.0
    Transfer-Encoding or a coding other than chunked are refused (the
    relay forwards only what it can frame).  Raises BadMessage.
    """
    if method == "HEAD" or status in (204, 304):
        return 0, False
    transfer = fields.values_of("transfer-encoding")
    lengths = fields.values_of("content-length")
    if transfer:
        if lengths:
            raise BadMessage("Transfer-Encoding and Content-Length together")
        if version == 10:
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 response")
        transfer_codings(transfer)
        return None, True
    return (parse_content_length(lengths) if lengths else None), False


def source_holds(source):
    """Return how many bytes a buffered source has received and not yet
    handed out, when it can tell: a BufferedReader over a raw file whose
    tell() is the count of bytes received (KernelTimeoutReader); else 0."""
    try:
        return source.raw.received - source.tell()
    except (AttributeError, OSError, ValueError):
        return 0


class NeedMoreBytes(Exception):
    """A read from ArrivedBytes needs bytes that have not arrived yet."""


class ArrivedBytes(object):
    """The bytes of a body that have arrived so far, as the buffered source
    a BodyReader reads (read, read1, readline) for a reader that must never
    wait: the stream pump's.  A read that needs bytes not yet there raises
    NeedMoreBytes; the caller rewinds to its mark() and reads again after
    add().  After ended is set (the peer closed) reads return what is left,
    as a file at its end does.
    """

    __slots__ = ("_data", "_position", "ended")

    def __init__(self, data=b""):
        self._data = data
        self._position = 0
        self.ended = False

    def add(self, data):
        if self._position == len(self._data):
            self._data, self._position = data, 0  # the usual case: all read
        else:
            self._data = self._data[self._position:] + data
            self._position = 0

    def held(self):
        """The count of bytes not read yet."""
        return len(self._data) - self._position

    def arrived(self):
        """Return (the bytes held, the position of the first unread one)."""
        return self._data, self._position

    def holds_chunk_line(self, after_crlf=False):
        """True when reading the next chunk-size line (after the CRLF that
        ends a chunk's data, if after_crlf) would not wait: its LF has
        arrived, or as many bytes as the read takes without one (too long
        a line), or bytes where that CRLF should be that are not one, or
        the source has ended.  Else the read would raise NeedMoreBytes."""
        data, start = self._data, self._position
        if after_crlf:
            if not b"\r\n".startswith(data[start:start + 2]):
                return True  # broken framing: the read fails at once
            start += 2
        limit = MAX_CHUNK_LINE_BYTES + 1  # as BodyReader._next_chunk reads
        return (self.ended or len(data) - start >= limit
                or data.find(b"\n", start, start + limit) >= 0)

    def mark(self):
        return self._position

    def rewind(self, mark):
        self._position = mark

    def read(self, size):
        """Return the next size bytes (fewer only after ended)."""
        start = self._position
        end = start + size
        if end > len(self._data):
            if not self.ended:
                raise NeedMoreBytes()
            end = len(self._data)
        self._position = end
        return self._data[start:end]

    def read1(self, size):
        """Return up to size bytes, at least one unless ended."""
        held = len(self._data) - self._position
        if not held and not self.ended:
            raise NeedMoreBytes()
        return self.read(min(size, held))

    def readline(self, limit):
        """Return up to and including the next LF, at most limit bytes."""
        start = self._position
        end = self._data.find(b"\n", start, start + limit) + 1
        if not end:
            end = min(start + limit, len(self._data))
            if end - start < limit and not self.ended:
                raise NeedMoreBytes()
        self._position = end
        return self._data[start:end]


class BodyReader(object):
    """Read one message body from a buffered binary file by its framing.

    length is the Content-Length (None: chunked, or until the close);
    chunked decodes chunked transfer coding (RFC 9112 §7.1) and reads and
    drops the trailer section (§7.1.2); max_bytes bounds a chunked body.
    read(limit) returns at most limit bytes as soon as any are there,
    readline(limit) at most one line; both b"" at the body's end.  complete
    tells whether the body was read to its framed end.  Raises
    MessageCutShort when the peer closes early, BadMessage for broken
    framing (413 past max_bytes), and the source's own errors (timeouts).
    The one chunked decoder of the relay: client bodies and upstream ones.
    """

    __slots__ = ("_source", "_chunked", "_left", "_crlf_due", "_max_bytes",
                 "total", "complete")

    def __init__(self, source, length=None, chunked=False, max_bytes=None):
        self._source = source
        self._chunked = chunked
        self._left = 0 if chunked else length  # of this chunk, or of the body
        self._crlf_due = False
        self._max_bytes = max_bytes
        self.total = 0  # body bytes announced so far (chunk sizes, or length)
        self.complete = length == 0 and not chunked

    def read(self, limit):
        return self._piece(limit, self._source.read1)

    def readline(self, limit):
        return self._piece(limit, self._source.readline)

    def read_arrived(self, limit):
        """Return what read(limit) returns (waiting for the first bytes),
        then also the body bytes that have arrived after them, across chunk
        boundaries, up to limit bytes in all; it never waits for more."""
        data = self.read(limit)
        while data and len(data) < limit and self._more_arrived():
            more = self.read(limit - len(data))
            if not more:
                break
            data += more
        return data

    def _more_arrived(self):
        """True when the next read cannot wait for the network: the source
        holds more of this chunk, or the end of this chunk's framing, the
        next size line and some of its data."""
        held = source_holds(self._source)
        if not held:
            return False
        if self._left:
            return True
        if not self._chunked or self.complete:
            return False
        framing = self._source.peek(held)[:held]  # buffered bytes: no read
        start = 2 if self._crlf_due else 0
        end = framing.find(b"\n", start) + 1
        if not end or end == len(framing) or framing[:start] != b"\r\n"[:start]:
            return False
        match = _CHUNK_LINE.match(framing[start:end])
        return match is not None and int(match.group(1), 16) > 0

    def continue_from(self, source):
        """Read the rest of the body from source (an ArrivedBytes that was
        given what the old source held unread)."""
        self._source = source

    def read_whole_chunks(self):
        """Return the data of the chunks that have arrived whole, at the
        start of a chunked body's next chunk, from ArrivedBytes: the usual
        case of a stream, where an event is a chunk.  One pass, no
        exception; it stops at anything else (a chunk not all there, the
        last chunk, a line it does not take at a glance), which
        read_without_waiting then reads, and judges, as always."""
        if not self._chunked or self._left or self.complete:
            return b""
        data, start = self._source.arrived()
        pieces = []
        crlf_due = self._crlf_due
        while True:
            line_start = start + 2 if crlf_due else start
            if crlf_due and data[start:line_start] != b"\r\n":
                break
            end = data.find(b"\n", line_start, line_start + MAX_CHUNK_LINE_BYTES) + 1
            match = end and _CHUNK_LINE.match(data, line_start, end)
            if not match:
                break
            size = int(match.group(1), 16)
            if not size or end + size > len(data) or (
                    self._max_bytes is not None and self.total + size > self._max_bytes):
                break
            self.total += size
            pieces.append(data[end:end + size])
            start, crlf_due = end + size, True
        if not pieces:
            return b""
        if data[start:start + 2] == b"\r\n":  # the last chunk's end came too
            start, crlf_due = start + 2, False
        self._crlf_due = crlf_due
        self._source.rewind(start)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_without_waiting(self, limit):
        """read(limit) from a source that never waits (ArrivedBytes):
        bytes, b"" at the body's end, or None when more bytes must arrive
        first; the framing state and the source are then as before."""
        source = self._source
        if not self._left and self._chunked and not self.complete and (
                not source.holds_chunk_line(self._crlf_due)):
            # The next chunk-size line has not arrived whole: the usual case
            # after each event, told without trying (and raising).
            return None
        state = self._left, self._crlf_due, self.total, self.complete
        mark = source.mark()
        try:
            return self.read(limit)
        except NeedMoreBytes:
            self._left, self._crlf_due, self.total, self.complete = state
            source.rewind(mark)
            return None

    def read_to_end(self, max_bytes):
        """Return the rest of the body; when it is longer than max_bytes,
        only its next max_bytes + 1 bytes or more (the rest stays unread)."""
        left = self._left
        if not self._chunked and left is not None and 0 < left <= max_bytes:
            data = self._source.read(left)  # a known length: one read
            if len(data) < left:
                raise MessageCutShort(data, left - len(data))
            self._left, self.complete = 0, True
            return data
        buffered = bytearray()
        while len(buffered) <= max_bytes:
            block = self.read(COPY_BLOCK_BYTES)
            if not block:
                break
            buffered += block
        return bytes(buffered)

    def _piece(self, limit, read):
        if self._left == 0:
            if self.complete or not self._chunked:
                self.complete = True
                return b""
            self._left = self._next_chunk()
            if not self._left:
                return b""
        if self._left is None:  # the body ends at the close
            data = read(limit)
            self.complete = not data
            return data
        data = read(min(limit, self._left))
        if not data:
            raise MessageCutShort(b"", self._left)
        self._left -= len(data)
        return data

    def _next_chunk(self):
        """Read the CRLF after the last chunk's data and the next size line;
        return the size (0: the last chunk, whose trailers are read too)."""
        source = self._source
        if self._crlf_due:
            ending = source.read(2)
            if ending != b"\r\n":
                if b"\r\n".startswith(ending):
                    raise MessageCutShort(b"")
                raise BadMessage("chunk data not ended by CRLF")
        line = source.readline(MAX_CHUNK_LINE_BYTES + 1)
        match = _CHUNK_LINE.match(line)
        if match is None:
            if not line.endswith(b"\n") and len(line) <= MAX_CHUNK_LINE_BYTES:
                raise MessageCutShort(b"")
            raise BadMessage("a malformed chunk-size line")
        size = int(match.group(1), 16)
        self.total += size
        if self._max_bytes is not None and self.total > self._max_bytes:
            raise BadMessage("the chunked body is larger than %d bytes"
                             % self._max_bytes, 413)
        self._crlf_due = size > 0
        if not size:
            read_field_lines(source, "trailer")
            self.complete = True
        return size



def connection_tokens(headers):
    """Return the lowercase header names listed in Connection headers.

    headers is a list of (name, value) pairs.  RFC 9110 §7.6.1.
    """
    tokens = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(token.strip().lower() for token in value.split(","))
    tokens.discard("")
    return tokens


def strip_hop_by_hop(headers):
    """Return headers without hop-by-hop ones and those named in Connection.

    headers is a list of (name, value) pairs.  RFC 9110 §7.6.1.
    """
    return drop_headers(headers, hop_by_hop_names(headers))


def hop_by_hop_names(headers, others=frozenset()):
    """Return the lowercase names (a set) to drop from headers, (name,
    value) pairs, when forwarding them: the hop-by-hop headers, those named
    in Connection, and others (lowercase names)."""
    return HOP_BY_HOP_HEADERS.union(others, connection_tokens(headers))


def drop_headers(headers, lowercase_names):
    """Return the (name, value) pairs of headers whose lowercase name is not
    in lowercase_names (a set), in order: one lowering per header."""
    return [field for field in headers if field[0].lower() not in lowercase_names]


# What upstream_headers never forwards besides hop-by-hop headers, without
# forward_auth.
_REPLACED_OR_CREDENTIAL = REQUEST_HEADERS_SET_BY_RELAY | CREDENTIAL_HEADERS


def upstream_headers(request_headers, upstream, forward_auth, body_length,
                     request_id, chunked=False):
    """Return the (name, value) headers to send to the upstream.

    End-to-end client headers pass, except credentials unless forward_auth
    (then whichever credential headers the client sent; otherwise the
    upstream's api_key, if any: see upstream_credential_headers).  Host is
    the upstream's,
    Accept-Encoding is identity (SSE lines must stay lines), Content-Length
    is the new body's (None: no body; chunked: a body of unknown length,
    sent with Transfer-Encoding: chunked) and X-Request-Id is the relay's.
    """
    headers = [("Host", host_header(upstream))]
    headers.extend(drop_headers(request_headers, hop_by_hop_names(
        request_headers, REQUEST_HEADERS_SET_BY_RELAY if forward_auth
        else _REPLACED_OR_CREDENTIAL)))
    if upstream.api_key and not forward_auth:
        headers.extend(upstream_credential_headers(upstream, headers))
    headers.append(("Accept-Encoding", "identity"))
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    elif body_length is not None:
        headers.append(("Content-Length", str(body_length)))
    headers.append(("X-Request-Id", request_id))
    return headers


def upstream_credential_headers(upstream, headers=()):
    """Return the (name, value) headers that carry an upstream's api_key.

    api_key_header "authorization": Authorization: Bearer <key>; "x-api-key"
    (Anthropic's API reference, "Authentication"): x-api-key, plus
    anthropic-version when headers (those going upstream) carry none;
    "api-key" (Azure OpenAI): api-key.
    """
    if upstream.api_key_header == "authorization":
        return [("Authorization", "Bearer " + upstream.api_key)]
    if upstream.api_key_header == "api-key":
        return [("api-key", upstream.api_key)]
    credential = [("x-api-key", upstream.api_key)]
    if not any(name.lower() == "anthropic-version" for name, _ in headers):
        credential.append(("anthropic-version", ANTHROPIC_VERSION))
    return credential


def host_header(upstream):
    """Return the Host header value for an upstream (RFC 9110 §7.2)."""
    host = "[%s]" % upstream.host if ":" in upstream.host else upstream.host
    default_port = 443 if upstream.scheme == "https" else 80
    return host if upstream.port == default_port else "%s:%d" % (host, upstream.port)


def client_headers(response_headers):
    """Return the upstream response headers to relay to the client.

    response_headers is a list of (name, value) pairs.  Only the allowlist
    (RELAYED_RESPONSE_HEADERS and prefixes) passes, without hop-by-hop or
    framing headers; X-Request-Id is left out, since the relay sends its own
    (see upstream_request_id).
    """
    relayed = []
    dropped = hop_by_hop_names(response_headers, ("x-request-id",))
    for name, value in response_headers:
        lowered = name.lower()
        if lowered in dropped or "\r" in value or "\n" in value:
            continue
        if lowered in RELAYED_RESPONSE_HEADERS or lowered.startswith(
                RELAYED_RESPONSE_HEADER_PREFIXES):
            relayed.append((name, value))
    return relayed


def encode_response_head(version, status, reason, headers):
    """Return a response head as Latin-1 bytes: the status line, the header
    lines of headers ((name, value) str pairs) and the empty line (RFC 9112
    §4, §5).  Raises UnicodeEncodeError for a character beyond Latin-1."""
    return ("%s %d %s\r\n%s\r\n" % (
        version, status, reason,
        "".join(["%s: %s\r\n" % field for field in headers]))).encode("latin-1")


def media_type(content_type):
    """Return the lowercase media type of a Content-Type value ("" if none),
    without its parameters (RFC 9110 §8.3.1)."""
    return (content_type or "").split(";")[0].strip().lower()


def upstream_request_id(response_headers):
    """Return the upstream's own request id (str) or None.

    response_headers is a list of (name, value) pairs; x-request-id (OpenAI,
    vLLM) is preferred to request-id (Anthropic); an id that is not printable
    ASCII of at most MAX_REQUEST_ID_CHARS is ignored.
    """
    found = {}
    for name, value in response_headers:
        lowered = name.lower()
        if lowered in UPSTREAM_REQUEST_ID_HEADERS:
            found[lowered] = value
    for name in UPSTREAM_REQUEST_ID_HEADERS:
        request_id = sanitize_request_id(found.get(name, "").strip())
        if request_id:
            return request_id
    return None


def is_event_stream(content_type):
    """Return True for a text/event-stream Content-Type (WHATWG HTML SSE)."""
    return media_type(content_type) == "text/event-stream"


def is_streamed_body_type(content_type):
    """Return True for request bodies relayed unread: uploads and binary."""
    media = media_type(content_type)
    return media.startswith(("multipart/", "audio/", "image/", "video/")) or \
        media == "application/octet-stream"


def may_be_untyped_json(content_type):
    """Return True for Content-Types under which clients send JSON by
    mistake: none, form encoding (curl -d) and text/plain (a browser's fetch
    with a string body)."""
    media = media_type(content_type)
    return media in ("", "application/x-www-form-urlencoded", "text/plain")


def is_json_type(content_type):
    """Return True for application/json and application/*+json types."""
    media = media_type(content_type)
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json"))


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
           "Nov", "Dec")


def format_http_date(seconds):
    """Return seconds since the epoch as an IMF-fixdate (RFC 9110 §5.6.7),
    "Sun, 06 Nov 1994 08:49:37 GMT", in English whatever the locale."""
    year, month, day, hour, minute, second, weekday = time.gmtime(seconds)[:7]
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[weekday], day, _MONTHS[month - 1], year, hour, minute, second)


class HttpDateCache(object):
    """The Date header value for now, formatted once per second (every
    response carries one, RFC 9110 §6.6.1; formatting it is 3% of a short
    request's CPU).  Safe across threads: the pair is replaced whole."""

    def __init__(self):
        self._cached = (None, "")

    def value(self):
        second = int(time.time())
        cached = self._cached
        if cached[0] != second:
            cached = (second, format_http_date(second))
            self._cached = cached
        return cached[1]


def encode_chunk(data):
    """Return data framed as one HTTP/1.1 chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_error_event(message, error_type="server_error", code=None):
    """Return a final SSE event carrying an OpenAI error object, as bytes.

    Shape: b'data: {"error": {...}}\\n\\n' (WHATWG HTML, server-sent events).
    """
    return b"data: " + serialize_json(openai_error(message, error_type, code)) + b"\n\n"


def stream_failure_event(protocol, status, message, error_type=None, code=None,
                         response=None, sequence_number=None):
    """Return the SSE event that ends a stream its upstream failed mid-way,
    in the request's protocol, as bytes (the status line has gone out).

    PROTOCOL_MESSAGES: "event: error" with Anthropic's error object (Messages
    API, "Streaming messages": error events).  PROTOCOL_RESPONSES:
    "event: response.failed" whose response object (response: the one the
    stream announced, a dict, else a minimal one) has status "failed" and an
    error {"code", "message"} (Responses API, streaming events); its
    sequence_number follows the last event's when known.  Other protocols:
    data: {"error": {...}} as OpenAI's streams carry errors.
    """
    if protocol == PROTOCOL_MESSAGES:
        return b"event: error\ndata: " + serialize_json(anthropic_error(
            message, anthropic_error_type(status))) + b"\n\n"
    if protocol == PROTOCOL_RESPONSES:
        failed = failed_response(response, message, code or (
            "server_error" if status >= 500 else "invalid_request"))
        event = collections.OrderedDict((("type", "response.failed"),))
        if sequence_number is not None:
            event["sequence_number"] = sequence_number
        event["response"] = failed
        return b"event: response.failed\ndata: " + serialize_json(event) + b"\n\n"
    return sse_error_event(message, error_type or (
        "server_error" if status >= 500 else "invalid_request_error"), code)


def failed_response(response, message, code):
    """Return a Responses API response object marked failed: a copy of
    response (dict or None) with status "failed" and error {code, message}.
    A minimal object (id, object, created_at, status, error, output, usage)
    stands in when the stream announced none."""
    failed = collections.OrderedDict(response if isinstance(response, dict) else (
        ("id", "resp_" + new_request_id()), ("object", "response"),
        ("created_at", int(time.time())), ("output", []), ("usage", None)))
    failed["status"] = "failed"
    failed["error"] = {"code": code, "message": message}
    return failed


def event_boundary(last_line):
    """Return the bytes that end the SSE event in progress after last_line,
    so that a following event stands on its own (WHATWG HTML: an event ends
    at a blank line)."""
    if not last_line.strip(b"\r\n"):
        return b""  # the last event already ended
    if last_line.endswith(b"\n"):
        return b"\n"
    return b"\n\n"  # after a bare CR too: its LF would only end that line


def is_done_line(line):
    """Return True for the SSE line that ends an OpenAI stream, data: [DONE]
    (API reference: chat completions, streaming)."""
    return line.rstrip(b"\r\n") in (b"data: [DONE]", b"data:[DONE]")


def iter_upstream_lines(response, limit):
    """Yield an upstream response body line by line, as each line arrives.

    Reads through the response's BodyReader, straight from its buffered
    socket file: http.client's own readline passes every line through
    several Python layers.  A line split across chunks is yielded whole; a
    line longer than limit bytes comes in pieces.  Returns at the framed end
    of the body; raises MessageCutShort when the body stops short,
    BadMessage for broken framing and socket.timeout after read_timeout of
    silence.  A line cut off by a drop is not yielded: it is no event, and a
    half JSON line would only break the client's parser before the relay's
    error event.
    """
    reader = response.body_reader
    pending = b""
    while True:
        piece = reader.readline(limit - len(pending))
        if not piece:
            break
        if not pending and (piece.endswith(b"\n") or len(piece) >= limit):
            yield piece  # the common case: a whole line in one chunk
            continue
        pending += piece
        if pending.endswith(b"\n") or len(pending) >= limit:
            yield pending
            pending = b""
    if pending:
        yield pending


def iter_upstream_batches(response, limit):
    """Yield an upstream response body as it arrives, as runs of whole lines.

    Each run holds every complete line the upstream has sent so far, in one
    bytes object, so the relay sends them in one write (one chunk): one
    receive and one send per upstream read, however the upstream framed
    them.  A partial line waits only for its own end, never for later lines;
    a line longer than limit bytes comes in pieces.  Ends and raises as
    iter_upstream_lines does.
    """
    reader = response.body_reader
    pending = b""
    while True:
        data = reader.read_arrived(limit)
        if not data:
            break
        runs, pending = split_runs(pending + data if pending else data, limit)
        for run in runs:
            yield run
    if pending:
        yield pending


def split_runs(data, limit):
    """Split body bytes that arrived into (runs to send now, the partial
    line to keep for the next bytes).  The runs are all the whole lines in
    one bytes object, then pieces of limit bytes of a longer partial line."""
    end = data.rfind(b"\n") + 1
    if end and end == len(data):
        return [data], b""  # the common case: whole lines only
    runs = [data[:end]] if end else []
    pending = data[end:]
    while len(pending) >= limit:
        runs.append(pending[:limit])
        pending = pending[limit:]
    return runs, pending


class SseForwarder(object):
    """Make each run of whole SSE lines from the upstream the bytes the
    client gets: the model renamed (rename: see model_renamer, or None),
    the usage events shown to watch (a StreamWatch, or None), framed as one
    HTTP/1.1 chunk when chunked.  data: [DONE] ends the stream: after the
    run that holds it, done is True and rest holds what followed it in that
    run.  last_run is the last run as the upstream sent it.
    """

    __slots__ = ("_rename", "_watch", "_marker", "_chunked", "done", "rest",
                 "last_run")

    def __init__(self, chunked, rename=None, watch=None):
        self._rename = rename
        self._watch = watch
        # Only lines with the watch's marker are parsed (the usage events).
        self._marker = watch.marker if watch is not None else None
        self._chunked = chunked
        self.done = False
        self.rest = b""
        self.last_run = b"\n"

    def take(self, run):
        """Return the bytes to send for run (a run of whole lines)."""
        self.last_run = run
        if self._rename is not None and b'"model"' in run:
            run = b"".join(self._rename(line) for line in run.splitlines(True))
        if b"[DONE]" in run:
            done = split_at_done(run)
            if done:
                run, self.rest, done_line = done
                run += event_boundary(done_line)
                self.done = True
        marker = self._marker
        if marker is not None and marker in run:
            for line in run.splitlines(True):
                if marker in line:
                    self._watch.see(line)
        return b"%x\r\n%s\r\n" % (len(run), run) if self._chunked else run


def split_at_done(run):
    """Split a run of SSE lines after its data: [DONE] line; return (up to
    and including that line, the rest, the line), or None without one."""
    position = 0
    for line in run.splitlines(True):
        position += len(line)
        if b"[DONE]" in line and is_done_line(line):
            return run[:position], run[position:], line
    return None


def last_line_of(run):
    """Return the last line of a run of lines (bytes, ends kept)."""
    return run[run.rfind(b"\n", 0, len(run) - 1) + 1:]


###############################################################################
# Traffic: key limits, replica groups, upstream health ########################
###############################################################################

def affinity_key(affinity, body, header):
    """Return the hex digest that ties a request to one replica, or None.

    affinity is a ReplicaGroup.affinity; body the parsed JSON body (dict) or
    None; header(lowercase name) returns a request header or None.  "user" is
    the body's "user" (OpenAI) or "metadata.user_id" (Anthropic); "prompt" is
    the leading part of the conversation (see prompt_prefix), the part an
    upstream prefix cache (vLLM, llama.cpp) keeps between requests.
    """
    if isinstance(affinity, tuple):
        text = header(affinity[1])
    elif not isinstance(body, dict):
        text = None
    elif affinity == "user":
        text = body.get("user")
        metadata = body.get("metadata")
        if not isinstance(text, str) and isinstance(metadata, dict):
            text = metadata.get("user_id")
        text = text if isinstance(text, str) else None
    else:
        text = prompt_prefix(body)
    if not text:
        return None
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def prompt_prefix(body):
    """Return a JSON text of a body's leading prompt part, or None.

    For "messages": the "system" field (Anthropic), the leading system and
    developer messages and the first other message (the first turn).  Else
    the first MAX_AFFINITY_PROMPT_CHARS of "prompt" or "input" (or of their
    first item when they are lists).
    """
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        leading = []
        for message in messages:
            leading.append(message)
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "developer"):
                break
        return json.dumps([body.get("system"), leading], sort_keys=True)
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, list) and value:
            value = value[0]
        if value is not None:
            return json.dumps(value, sort_keys=True)[:MAX_AFFINITY_PROMPT_CHARS]
    return None


def rendezvous_member(key, members):
    """Return the member a key maps to by highest random weight (rendezvous
    hashing, Thaler and Ravishankar 1998): a key keeps its member while that
    member is in the list, and only the keys of a member that leaves move."""
    best, best_weight = None, None
    for member in members:
        weight = hashlib.sha256((member + "\0" + key).encode(
            "utf-8", "surrogateescape")).digest()
        if best_weight is None or weight > best_weight:
            best, best_weight = member, weight
    return best


def key_limit_error(api_key, reason, retry_after_seconds):
    """Return the 429 RelayError for a key over its limit (never the key)."""
    return RelayError(
        429, "Rate limit reached for key %s: %s. Retry after %d s." % (
            api_key.name, reason, max(1, int(math.ceil(retry_after_seconds)))),
        error_type="rate_limit_error", code="rate_limit_exceeded",
        headers=[("Retry-After", str(max(1, int(math.ceil(retry_after_seconds)))))])


def upstream_busy_error(upstream):
    """Return the 429 RelayError for an upstream at max_concurrent whose
    queue is full or whose queue_timeout ran out; a chain moves on."""
    return RelayError(
        429, "Upstream %s is busy: %d requests at once (max_concurrent) and "
        "the queue is full or the wait of %g s (queue_timeout) ran out." % (
            upstream.name, upstream.max_concurrent, upstream.queue_timeout),
        error_type="rate_limit_error", code="upstream_busy",
        headers=[("Retry-After", str(max(1, int(math.ceil(
            upstream.queue_timeout)))))], retryable=True, kind="busy")


class _UpstreamState(object):
    """What Traffic knows of one upstream; guarded by Traffic's lock."""

    def __init__(self, lock):
        self.in_flight = 0   # requests holding a slot
        self.queued = 0      # requests waiting for one (max_concurrent)
        self.sent = 0        # requests that got a slot, ever
        self.failures = 0    # failures in a row
        self.out_until = 0.0  # monotonic seconds: ejected until then
        self.ejected_in_a_row = 0  # ejections since the last success
        self.ejections = 0
        self.last_failure = 0.0
        self.slot_free = threading.Condition(lock)
        self.limit = None    # max_concurrent of the newest config seen


class Traffic(object):
    """The relay process's traffic state, thread-safe: each upstream's
    requests in flight and queued, its health, each replica group's turn, and
    each key's requests in flight and start times.

    State is kept by name, so it carries over a config reload.  Limits are
    per relay process: N relays behind a load balancer each enforce them.
    clock gives the monotonic seconds that cool-downs are measured in.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._upstreams = {}  # upstream name -> _UpstreamState
        self._turns = {}      # group name -> index of the member next in turn
        self._keys = {}       # key name -> [in flight, deque of start times]

    def _state(self, name):
        state = self._upstreams.get(name)
        if state is None:
            state = self._upstreams[name] = _UpstreamState(self._lock)
        return state

    # -- keys ----------------------------------------------------------------

    def admit_key(self, api_key, now=None):
        """Count a request of api_key against its max_concurrent and
        requests_per_minute; raise RelayError 429 (with Retry-After) beyond
        them.  The caller calls release_key when the request ends."""
        now = self.clock() if now is None else now
        with self._lock:
            usage = self._keys.get(api_key.name)
            if usage is None:
                usage = self._keys[api_key.name] = [0, collections.deque()]
            if api_key.max_concurrent is not None and (
                    usage[0] >= api_key.max_concurrent):
                raise key_limit_error(api_key, "%d requests at once "
                                      "(max_concurrent)" % api_key.max_concurrent, 1)
            starts = usage[1]
            if api_key.requests_per_minute is not None:
                while starts and starts[0] <= now - RATE_WINDOW_SECONDS:
                    starts.popleft()
                if len(starts) >= api_key.requests_per_minute:
                    raise key_limit_error(api_key, "%d requests per minute" % (
                        api_key.requests_per_minute),
                        starts[0] + RATE_WINDOW_SECONDS - now)
                starts.append(now)
            usage[0] += 1

    def release_key(self, api_key):
        with self._lock:
            self._keys[api_key.name][0] -= 1

    # -- upstream slots --------------------------------------------------------

    def acquire(self, upstream, client_gone=None):
        """Take a slot on upstream; with max_concurrent, wait in its queue
        (at most max_queue waiting, each up to queue_timeout).  Returns True,
        or False when the queue is full or the wait ran out.

        client_gone, a function () -> bool, is asked every
        QUEUE_CHECK_SECONDS while waiting: a client that left gives its
        place up at once (raises ClientDisconnected) instead of holding it
        until a slot frees or queue_timeout runs out.
        """
        with self._lock:
            return self._acquire_locked(self._state(upstream.name), upstream,
                                        client_gone)

    def _acquire_locked(self, state, upstream, client_gone=None):
        if upstream.max_concurrent != state.limit:
            # A reload changed max_concurrent: the requests already queued
            # wait under the new limit, not the one of their config.
            state.limit = upstream.max_concurrent
            state.slot_free.notify_all()
        if state.limit is not None and state.in_flight >= state.limit:
            if state.queued >= upstream.max_queue:
                return False
            deadline = time.monotonic() + upstream.queue_timeout
            state.queued += 1
            try:
                while state.limit is not None and state.in_flight >= state.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    state.slot_free.wait(min(remaining, QUEUE_CHECK_SECONDS))
                    if client_gone is not None and client_gone():
                        raise ClientDisconnected()
            finally:
                state.queued -= 1
        state.in_flight += 1
        state.sent += 1
        return True

    def release(self, name):
        """Give back a slot taken by acquire or choose."""
        with self._lock:
            state = self._upstreams[name]
            state.in_flight -= 1
            state.slot_free.notify()

    # -- replica groups ----------------------------------------------------------

    def choose(self, group, upstreams, key, tried, client_gone=None):
        """Pick the member of a group for a request and take a slot on it.

        Members out for a cool-down and those in tried are skipped.  With an
        affinity key the member is the key's rendezvous member among those
        up; without, the one with the fewest requests in flight and queued,
        ties taken in turn (round robin).  When every member is out and none
        was tried, the least recently failed one is tried.  upstreams maps
        names to Upstream.  Returns (name, True), (name, False) when its queue
        was full or the wait ran out, or (None, False) when none is left;
        client_gone as for acquire.
        """
        with self._lock:
            now = self.clock()
            candidates = [name for name in group.members if name not in tried]
            up = [name for name in candidates if self._state(name).out_until <= now]
            if not up and candidates and not tried:
                up = [min(candidates, key=lambda name: self._upstreams[name].last_failure)]
            if not up:
                return None, False
            member = (rendezvous_member(key, up) if key is not None
                      else self._least_busy(group, up))
            return member, self._acquire_locked(self._state(member),
                                                upstreams[member], client_gone)

    def _least_busy(self, group, up):
        count = len(group.members)
        turn = self._turns.get(group.name, 0)
        best, best_load = None, None
        for offset in range(count):
            name = group.members[(turn + offset) % count]
            if name in up:
                state = self._upstreams[name]
                load = state.in_flight + state.queued
                if best_load is None or load < best_load:
                    best, best_load = name, load
        self._turns[group.name] = group.members.index(best) + 1
        return best

    def has_candidate(self, group, tried):
        """Return True when a member not in tried is up now."""
        now = self.clock()
        with self._lock:
            return any(self._state(name).out_until <= now
                       for name in group.members if name not in tried)

    def is_up(self, name):
        with self._lock:
            return self._state(name).out_until <= self.clock()

    # -- passive health ------------------------------------------------------------

    def succeeded(self, name):
        """Note an answer below 500 from a member: its failures start over."""
        with self._lock:
            state = self._state(name)
            state.failures = state.ejected_in_a_row = 0

    def failed(self, group, name):
        """Note a failure (refused, timed out before its answer, 5xx) of a
        member.  After group.eject_after in a row (or after one, right after
        a cool-down) it is out for group.cooldown seconds, doubled for each
        ejection since its last success (at most 2**MAX_COOLDOWN_DOUBLINGS
        times).  Returns the cool-down in seconds when it was ejected now."""
        with self._lock:
            now = self.clock()
            state = self._state(name)
            state.failures += 1
            state.last_failure = now
            if state.out_until > now or (state.failures < group.eject_after and
                                         not state.ejected_in_a_row):
                return None
            cooldown = group.cooldown * 2 ** min(state.ejected_in_a_row,
                                                 MAX_COOLDOWN_DOUBLINGS)
            state.out_until = now + cooldown
            state.ejected_in_a_row += 1
            state.ejections += 1
            state.failures = 0
            return cooldown

    def upstream_samples(self):
        """Return [(name, in flight, queued, sent, ejections, up)] by name,
        for the upstreams that are group members or have max_concurrent."""
        now = self.clock()
        with self._lock:
            return [(name, state.in_flight, state.queued, state.sent,
                     state.ejections, 1 if state.out_until <= now else 0)
                    for name, state in sorted(self._upstreams.items())]


###############################################################################
# Upstream exchange ###########################################################
###############################################################################

def readable_sockets(sockets):
    """Return the subset of sockets that are readable now (data or EOF)."""
    ready = set()
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            try:
                selector.register(sock, selectors.EVENT_READ)
            except (ValueError, OSError):  # closed meanwhile: counts as EOF
                ready.add(sock)
        if selector.get_map():
            ready.update(key.fileobj for key, _ in selector.select(0))
    return ready


def is_readable(sock):
    """Return True when one socket is readable now (data or EOF): an idle
    pooled connection the upstream has closed.  One poll() call."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(readable_sockets([sock]))


def shutdown_socket(sock, how=socket.SHUT_RDWR):
    """Shut a socket down from any thread, waking a thread blocked on it.

    Uses the plain socket method on TLS sockets too, which would otherwise
    drop their TLS state under the reading thread.
    """
    try:
        socket.socket.shutdown(sock, how)
    except (OSError, ValueError):
        pass


def set_kernel_timeouts(sock, seconds, receive=True):
    """Make each blocking recv (unless receive is False) and send on sock
    give up after seconds, through SO_RCVTIMEO/SO_SNDTIMEO (socket(7)).

    Python's own timeout polls before every call; the kernel's costs
    nothing per call.  A call that times out fails with EAGAIN, which a
    blocking socket raises only then: BlockingIOError (see
    SOCKET_TIMEOUT_ERRORS, KernelTimeoutReader).  Returns False, changing
    nothing, where the caller must use settimeout instead: TLS sockets (the
    ssl module retries a blocking read that fails with EAGAIN forever),
    Windows (another option format), values out of range.
    """
    if (isinstance(sock, ssl.SSLSocket) or sys.platform.startswith("win")
            or not 0 < seconds < 2 ** 31):
        return False
    whole = int(seconds)
    # 0 s would mean "never": keep at least a microsecond.
    timeval = struct.pack("@ll", whole, max(int((seconds - whole) * 1e6),
                                            0 if whole else 1))
    try:
        if receive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.settimeout(None)
    except (OSError, AttributeError):
        return False
    return True


def set_upstream_timeout(connection, seconds):
    """Bound every read and write on an upstream connection to seconds of
    silence: kernel timeouts on plain TCP, Python's timeout on TLS.  A
    pooled connection keeps them, unless a Python timeout was set meanwhile
    (the short wait for the end of a body after data: [DONE])."""
    if (connection.sock.gettimeout() is None
            and getattr(connection, "relay_timeout", None) == seconds):
        return
    if not set_kernel_timeouts(connection.sock, seconds):
        connection.sock.settimeout(seconds)
    connection.relay_timeout = seconds


class KernelTimeoutReader(io.RawIOBase):
    """The raw reader under an upstream response whose socket has kernel
    timeouts: the socket's own raw file, with an expired SO_RCVTIMEO raised
    as socket.timeout, as Python's own timeout would be.  (The raw file
    returns None for EAGAIN, which a buffered reader takes for the end of
    the data: a silent upstream would look like one that closed.)"""

    def __init__(self, raw):
        io.RawIOBase.__init__(self)
        self._raw = raw
        self.received = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self._raw.readinto(buffer)
        if count is None:
            raise socket.timeout("timed out")
        self.received += count
        return count

    def tell(self):
        """The bytes received so far: the buffered reader above subtracts
        what it holds, so source_holds can tell what has arrived unread."""
        return self.received

    def close(self):
        self._raw.close()  # lets a closed socket release its descriptor
        io.RawIOBase.close(self)


class _KernelTimeoutSocketFile(object):
    """What HTTPResponse needs of a socket (makefile) on a socket with
    kernel timeouts: a buffered KernelTimeoutReader."""

    def __init__(self, sock):
        self._sock = sock

    def makefile(self, mode):
        return io.BufferedReader(KernelTimeoutReader(self._sock.makefile(mode, 0)))


class UpstreamPool(object):
    """Idle keep-alive HTTP/1.1 connections to upstreams, reused LIFO.

    At most max_idle connections per upstream are kept, each for at most
    idle_seconds; one that the upstream closed meanwhile is noticed (its
    socket turns readable) and discarded before reuse.
    """

    def __init__(self, max_idle=POOL_MAX_IDLE_PER_UPSTREAM,
                 idle_seconds=POOL_IDLE_SECONDS):
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle = {}  # pool key -> list of (HTTPConnection, monotonic time)
        self._lock = threading.Lock()

    @staticmethod
    def key(upstream):
        return (upstream.scheme, upstream.host, upstream.port,
                upstream.ssl_context, upstream.connect_timeout)

    def acquire(self, upstream):
        """Return (HTTPConnection, reused bool), connecting if none is idle.

        Raises OSError (refused, DNS, TLS) or socket.timeout from connecting.
        """
        key = self.key(upstream)
        while True:
            with self._lock:
                idle = self._idle.get(key)
                connection, since = idle.pop() if idle else (None, 0)
            if connection is None:
                return open_connection(upstream), False
            if (time.monotonic() - since < self.idle_seconds and connection.sock
                    and not is_readable(connection.sock)):
                set_upstream_timeout(connection, upstream.read_timeout)
                return connection, True
            connection.close()

    def release(self, upstream, connection):
        """Keep a connection whose last response was read to its end."""
        if connection.sock is not None:
            with self._lock:
                idle = self._idle.setdefault(self.key(upstream), [])
                if len(idle) < self.max_idle:
                    idle.append((connection, time.monotonic()))
                    return
        connection.close()

    def prune(self, now=None):
        """Close connections idle for longer than idle_seconds."""
        deadline = (now or time.monotonic()) - self.idle_seconds
        expired = []
        with self._lock:
            for idle in self._idle.values():
                while idle and idle[0][1] < deadline:
                    expired.append(idle.pop(0)[0])
        for connection in expired:
            connection.close()

    def close_all(self):
        with self._lock:
            connections = [item[0] for idle in self._idle.values() for item in idle]
            self._idle.clear()
        for connection in connections:
            connection.close()


class UpstreamResponse(http.client.HTTPResponse):
    """An http.client response whose head and framing the relay reads itself.

    http.client parses heads with the email package, which is lenient by
    design (a malformed line silently ends the header section), and skips
    only 100 among interim responses.  Here the head is read strictly
    (read_response_head, response_body_framing) and body_reader, a
    BodyReader, is the only way the relay reads the body.
    """

    def __init__(self, sock, *args, **kwargs):
        if sock.gettimeout() is None:  # kernel timeouts: set_upstream_timeout
            sock = _KernelTimeoutSocketFile(sock)
        http.client.HTTPResponse.__init__(self, sock, *args, **kwargs)

    def begin(self):
        if self.headers is not None:
            return
        version, status, reason, fields = read_response_head(self.fp)
        self.version, self.code, self.status, self.reason = (
            version, status, status, reason)
        self.headers = self.msg = fields
        self.length, self.chunked = response_body_framing(
            self._method, status, version, fields)
        self.chunk_left = None
        self.body_reader = BodyReader(self.fp, self.length, self.chunked)
        tokens = list_elements(fields.values_of("connection"))
        self.will_close = "close" in tokens or (
            version == 10 and "keep-alive" not in tokens) or (
                self.length is None and not self.chunked)


# What http.client's putheader accepts, for a whole header section at once:
# a name without colon or whitespace, a value without CR or LF (no header
# injection), each line ended by CRLF.
_ENCODABLE_FIELDS = re.compile(r"(?:[^:\s][^:\r\n]*: [^\r\n]*\r\n)*\Z")


def encode_fields(headers):
    """Return header lines as bytes, "Name: value" joined by CRLF (no CRLF
    after the last): Latin-1, as http.client encodes values.

    headers is a list of (name, value) str pairs.  Raises ValueError for a
    name or value that http.client's putheader would refuse.
    """
    text = "".join(["%s: %s\r\n" % field for field in headers])
    if not _ENCODABLE_FIELDS.match(text):
        raise ValueError("an invalid header name or value")
    return text[:-2].encode("latin-1")


class _OneWriteRequest(object):
    """Mixin for HTTPConnection: a request's head and a body of bytes up to
    COPY_BLOCK_BYTES leave in one send.  http.client sends them apart: two
    segments (TCP_NODELAY), two wake-ups of the upstream, per request."""

    _join_body = None
    _body_joined = False

    def put_fields(self, headers):
        """Add every header line of headers, (name, value) pairs, at once
        (see encode_fields): putheader encodes and checks each header in
        turn, a dozen calls per header on every request."""
        if headers:
            self._output(encode_fields(headers))

    def endheaders(self, message_body=None, encode_chunked=False):
        if (isinstance(message_body, bytes) and not encode_chunked
                and 0 < len(message_body) <= COPY_BLOCK_BYTES):
            self._join_body, self._body_joined = message_body, False
        try:
            http.client.HTTPConnection.endheaders(self, message_body,
                                                  encode_chunked=encode_chunked)
        finally:
            self._join_body = None

    def send(self, data):
        body = self._join_body
        if body is not None:
            if data is body and self._body_joined:
                return  # it left with the head
            if not self._body_joined:
                self._body_joined = True
                data = data + body  # the head (http.client sends it first)
        http.client.HTTPConnection.send(self, data)


class UpstreamConnection(_OneWriteRequest, http.client.HTTPConnection):
    pass


class UpstreamTlsConnection(_OneWriteRequest, http.client.HTTPSConnection):
    pass


def open_connection(upstream):
    """Connect to an upstream within its connect_timeout; return the connection.

    The socket then waits at most read_timeout seconds for each read and
    write (set_upstream_timeout), and has TCP_NODELAY so small writes are
    not held back (Nagle vs delayed ACK).
    """
    if upstream.scheme == "https":
        connection = UpstreamTlsConnection(
            upstream.host, upstream.port, timeout=upstream.connect_timeout,
            context=upstream.ssl_context)
    else:
        connection = UpstreamConnection(
            upstream.host, upstream.port, timeout=upstream.connect_timeout)
    connection.response_class = UpstreamResponse
    try:
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_upstream_timeout(connection, upstream.read_timeout)
    except BaseException:
        connection.close()
        raise
    return connection


class RequestBody(object):
    """A request body to forward: bytes, or an iterable of blocks read once.

    length is the byte count (None for blocks of unknown total, which are
    sent chunked); started tells whether any block was consumed, after which
    the body cannot be sent again.
    """

    def __init__(self, data=b"", blocks=None, length=None):
        self.data = data
        self.blocks = blocks
        self.length = len(data) if blocks is None else length
        self.chunked = blocks is not None and length is None
        self.started = False

    @property
    def replayable(self):
        return self.blocks is None or not self.started

    def payload(self):
        if self.blocks is None:
            return self.data or None

        def counted():
            for block in self.blocks:
                self.started = True
                yield block
        return counted()


class ClientRequest(object):
    """What the body step found: body (a RequestBody), parsed (the JSON
    object, or None when the body is not JSON), model (its "model", or
    None) and is_json (the body was parsed as JSON)."""

    __slots__ = ("body", "parsed", "model", "is_json")

    def __init__(self, body, parsed=None, model=None):
        self.body = body
        self.parsed = parsed
        self.model = model
        self.is_json = parsed is not None


def send_upstream_request(pool, upstream, method, target, headers, body,
                          on_connected=None, may_retry=None):
    """Send one request upstream; return (HTTPResponse, connection, socket).

    target is the path and query to request; headers a list of (name, value);
    body a RequestBody; on_connected(socket) is called once connected;
    may_retry() says False when the relay itself cut the connection (its
    client left, or a shutdown), which must never cause a retry.  A
    reused connection that the upstream had closed is retried once on a new
    one, only when no byte of the request can have been processed: a reset
    while sending, or an empty status line within STALE_RETRY_WINDOW_SECONDS
    (an upstream that worked on the request first must not get it twice).
    Raises RelayError: 502 refused/unreachable/invalid, 504 timeout.
    """
    for attempt in (1, 2):
        try:
            connection, reused = pool.acquire(upstream)
        except Exception as error:
            raise upstream_failure(upstream, error, "connect")
        sock = connection.sock
        if on_connected is not None:
            on_connected(sock)
        def retry():
            return reused and attempt == 1 and body.replayable and (
                may_retry is None or may_retry())
        try:
            try:
                connection.putrequest(method, target, skip_host=True,
                                      skip_accept_encoding=True)
                connection.put_fields(headers)
                connection.endheaders(body.payload(), encode_chunked=body.chunked)
            except ConnectionError:
                if retry():
                    connection.close()
                    continue
                # The upstream may have answered (413, 401) and closed before
                # taking the whole body: relay that answer, as curl does.
                response = early_response(connection)
                if response is None:
                    raise
                return response, connection, sock
            sent_at = time.monotonic()
            try:
                response = connection.getresponse()
            except http.client.RemoteDisconnected:
                if time.monotonic() - sent_at < STALE_RETRY_WINDOW_SECONDS and retry():
                    connection.close()
                    continue
                raise
            return response, connection, sock
        except Exception as error:
            connection.close()
            raise upstream_failure(upstream, error, "answer")


def early_response(connection):
    """Return the response an upstream sent before it stopped reading the
    request body, or None.  The connection is never reused afterwards."""
    try:
        response = connection.getresponse()
    except (OSError, http.client.HTTPException):
        return None
    response.will_close = True
    return response


_FAILURE_PHASES = {
    "connect": "while connecting", "answer": "before answering",
    "stream": "mid-stream", "body": "mid-body",
}


def upstream_failure(upstream, error, phase="answer"):
    """Map an exception from talking to an upstream to a RelayError.

    phase says when it happened: "connect", "answer" (before the response
    head), "stream" (between SSE lines) or "body".  A failure gets the same
    words and metric kind in every phase: refused, unreachable, DNS and TLS
    failures are 502 "refused"; silence is 504 "timeout" (connect_timeout
    while connecting, else read_timeout); a close is 502 "dropped"; a
    malformed answer is 502 "invalid".  Only failures before the response
    head are retryable (a fallback upstream may be tried).
    """
    if isinstance(error, RelayError):
        return error
    where = "upstream %s (%s)" % (upstream.name, upstream.url)
    when = _FAILURE_PHASES[phase]
    retryable = phase in ("connect", "answer")
    if isinstance(error, SOCKET_TIMEOUT_ERRORS):
        # The message names the setting to change.
        if phase == "connect":
            message = "%s did not connect within connect_timeout = %g s." % (
                where, upstream.connect_timeout)
        else:
            message = "%s sent nothing for read_timeout = %g s %s." % (
                where, upstream.read_timeout, when)
        return RelayError(504, message, code="upstream_timeout",
                          retryable=retryable, kind="timeout")
    if isinstance(error, BadMessage):
        cause, kind = "sent an invalid HTTP response (%s)" % error.reason, "invalid"
    elif isinstance(error, (http.client.RemoteDisconnected,
                            http.client.IncompleteRead)) or (
            phase != "connect" and isinstance(error, ConnectionError) and
            not isinstance(error, ConnectionRefusedError)):
        cause, kind = "closed the connection", "dropped"
    elif isinstance(error, ConnectionRefusedError):
        cause, kind = "refused the connection", "refused"
    elif isinstance(error, socket.gaierror):
        cause, kind = "could not be resolved (%s)" % error.strerror, "refused"
    elif isinstance(error, ssl.SSLError):
        cause, kind = "failed TLS: %s" % (getattr(error, "reason", None) or error), "refused"
    elif isinstance(error, http.client.HTTPException):
        cause, kind = "sent an invalid HTTP response (%s)" % type(error).__name__, "invalid"
    elif isinstance(error, OSError):
        cause, kind = "is unreachable (%s)" % (error.strerror or error), "refused"
    else:
        raise error
    return RelayError(502, "%s %s %s." % (where, cause, when), code=(
        "upstream_unreachable" if kind == "refused" else "upstream_error"),
        retryable=retryable, kind=kind)


def translated_stream_failure(upstream, error):
    """Map what cut a chat completions stream being translated to a
    RelayError: the upstream's own error event and a data line that is not
    JSON give 502, anything else as upstream_failure in phase "stream"."""
    where = "upstream %s (%s)" % (upstream.name, upstream.url)
    if isinstance(error, UpstreamStreamError):
        return RelayError(502, "%s sent an error mid-stream: %s" % (
            where, printable(error)[:500]), code="upstream_error", kind="5xx")
    if isinstance(error, (ValueError, TypeError, AttributeError, LookupError)):
        # Not JSON, or JSON of a shape the translator could not read.
        return RelayError(502, "%s sent an invalid event mid-stream." % where,
                          code="upstream_error", kind="invalid")
    return upstream_failure(upstream, error, "stream")


def pump_lines(response, sink):
    """Put an upstream body's lines into sink (a queue.Queue) as they come,
    then None at its framed end, or the exception that ended the reading.

    Runs in its own thread, so the handler can send pings while the
    upstream is silent (see iter_upstream_lines).
    """
    try:
        for line in iter_upstream_lines(response, MAX_SSE_LINE_BYTES):
            sink.put(line)
    except Exception as error:
        sink.put(error)
        return
    sink.put(None)


class UpstreamExchange(object):
    """An upstream answer being relayed, and the connection it came on.

    release(complete) gives the connection back: pooled after a complete
    response, else closed at once (so an abandoned generation stops
    upstream), after on_release(None) has stopped watching its socket.  Only
    the first call counts: each relay step calls it just before its last
    write to the client, and a finally calls it with complete=False.
    """

    __slots__ = ("pool", "upstream", "response", "connection", "sock",
                 "_on_release", "released")

    def __init__(self, pool, upstream, response, connection, sock, on_release):
        self.pool = pool
        self.upstream = upstream
        self.response = response
        self.connection = connection
        self.sock = sock
        self._on_release = on_release
        self.released = False

    def release(self, complete):
        if self.released:
            return
        self.released = True
        self._on_release(None)
        finish_upstream_response(self.pool, self.upstream, self.response,
                                 self.connection, complete)


def finish_upstream_response(pool, upstream, response, connection, complete):
    """Return a connection to the pool after a complete response, else close it.

    complete means the body was read to its framed end by the caller.  The
    response object is closed first, which marks it done for http.client
    (the socket stays open with the connection).
    """
    reusable = complete and not response.will_close
    response.close()
    if reusable:
        pool.release(upstream, connection)
    else:
        connection.close()


def read_response_body(response, upstream, max_bytes):
    """Read a whole upstream body (at most max_bytes); return bytes.

    Raises RelayError: 502 when the upstream closes before the end of the
    body, frames it wrongly or sends more than max_bytes; 504 on silence.
    """
    try:
        data = response.body_reader.read_to_end(max_bytes)
    except Exception as error:
        raise upstream_failure(upstream, error, "body")
    if len(data) > max_bytes:
        raise RelayError(502, "upstream %s response is larger than %d bytes." % (
            upstream.name, max_bytes), code="upstream_error", kind="invalid")
    return data


###############################################################################
# Stream pump #################################################################
###############################################################################

# Why one thread relays the streams: a thread per stream costs little while
# it waits, but an LLM server batches its streams, so the next token of
# every stream arrives at about the same moment.  A hundred threads then wake
# at once and hand the GIL to one another several times per token: futex
# calls and context switches cost far more than the relaying (60 us per
# event at 100 streams against 9 us for one stream, most of it in the
# kernel).  Once its head has gone out, a stream from a plain-TCP upstream
# to a plain-TCP client is handed to the server's StreamPump: one thread
# that waits on all such upstream sockets with one selector (epoll on
# Linux), reads what arrived, decodes it with the stream's own BodyReader
# over an ArrivedBytes, and sends every whole line at once with a send that
# never blocks.  The handler thread sleeps on an Event meanwhile and does
# everything else (errors, the end of the response, pooling, metrics) as
# before.  Streams that cannot be pumped (TLS on either side, Windows)
# keep the thread loop of RelayHandler._relay_stream.


class PumpedStream(object):
    """One stream in the pump, from its handler thread to the pump and back.

    Set by the handler: upstream_sock, client_sock (plain sockets), body
    (the response's BodyReader, continued from source), forward (an
    SseForwarder), tracked (the client's TrackedConnection), read_timeout
    and client_timeout (seconds).  Set by the pump before finished is set:
    upstream_error (what cut the upstream side), client_error (what failed
    a send), tail_complete (after data: [DONE], whether the upstream
    ended its body cleanly within DONE_TAIL_SECONDS, so its connection can
    be reused) and failure (an unexpected exception of this stream's work,
    for its handler to raise, as a thread relaying it would have).
    """

    __slots__ = ("upstream_sock", "client_sock", "body", "source", "forward",
                 "tracked", "read_timeout", "client_timeout", "pending",
                 "output", "ending", "deadline", "upstream_error",
                 "client_error", "tail_complete", "failure", "finished")

    def __init__(self, upstream_sock, client_sock, body, held, forward, tracked,
                 read_timeout, client_timeout):
        self.upstream_sock = upstream_sock
        self.client_sock = client_sock
        self.source = ArrivedBytes(held)
        self.body = body
        body.continue_from(self.source)
        self.forward = forward
        self.tracked = tracked
        self.read_timeout = read_timeout
        self.client_timeout = client_timeout
        self.pending = b""  # a partial line waiting for its end
        self.output = b""  # bytes the client has not taken yet
        self.ending = False  # finish once output is sent
        self.deadline = time.monotonic() + read_timeout
        self.upstream_error = None
        self.client_error = None
        self.tail_complete = False
        self.failure = None
        self.finished = threading.Event()


# A send or receive that never blocks, whatever the socket's mode: the
# pump's sockets stay blocking for everything else the relay does with them.
PUMP_FLAGS = (getattr(socket, "MSG_DONTWAIT", None)
              if not sys.platform.startswith("win") else None)


def can_pump(upstream_sock, response, client_sock):
    """True when a stream can go to the StreamPump: both sockets plain TCP
    with kernel timeouts (no Python timeout, no TLS buffer that a selector
    cannot see) and the response read through a KernelTimeoutReader, which
    tells how many bytes it holds."""
    return (PUMP_FLAGS is not None
            and type(upstream_sock) is socket.socket
            and type(client_sock) is socket.socket
            and upstream_sock.gettimeout() is None
            and client_sock.gettimeout() is None
            and isinstance(getattr(response.fp, "raw", None), KernelTimeoutReader))


class StreamPump(object):
    """The thread that relays pumped streams (see the comment above).

    relay(stream) hands a PumpedStream over and returns when the pump is
    done with it.  Per upstream read: one recv, the body decoded (chunked
    or not, as strictly as BodyReader does), the whole lines made the
    client's bytes by the stream's SseForwarder, one send.  A client that
    does not take them stops the reading of its upstream until it does
    (at most client_timeout seconds of no progress).  Deadlines are looked
    at every PUMP_SWEEP_SECONDS.  The thread starts with the first stream
    (again with the next one, after it failed) and stops at close().
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._incoming = []
        self._streams = set()
        self._selector = None
        self._wake = None  # (the pump's end, the others' end) of a socketpair
        self._thread = None
        self._closed = False  # no stream may join: closing, or a pump ending
        self._stopped = False  # close() was called: no new pump either
        self._next_sweep = 0.0

    def relay(self, stream):
        """Relay stream until its body ends, data: [DONE] and the tail
        after it, an upstream or client failure, or the pump's close;
        return stream with its outcome fields set."""
        with self._lock:
            if self._closed:
                stream.upstream_error = ConnectionAbortedError("the relay is closing")
                return stream
            if self._thread is None:
                self._start()
            self._incoming.append(stream)
        try:
            self._wake[1].send(b"\0")
        except BlockingIOError:
            pass  # wake-ups are already waiting to be read
        except OSError:
            pass  # the pump stopped meanwhile: it has ended the stream
        stream.finished.wait()
        return stream

    def close(self):
        """Stop the thread; streams still in it end with an upstream error."""
        with self._lock:
            self._closed = self._stopped = True
            if self._thread is None:
                return
        try:
            self._wake[1].send(b"\0")
        except OSError:
            pass

    def _start(self):
        self._selector = selectors.DefaultSelector()
        self._wake = socket.socketpair()
        for end in self._wake:
            end.setblocking(False)
        self._selector.register(self._wake[0], selectors.EVENT_READ, None)
        thread = threading.Thread(target=self._run, name="llm-relay-stream-pump")
        thread.daemon = True
        try:
            thread.start()
        except BaseException:  # no thread left: the next stream tries again
            self._selector.close()
            for end in self._wake:
                end.close()
            raise
        # Only a running thread counts: streams handed to one that never
        # started would wait for it forever.
        self._thread = thread

    # -- the loop ------------------------------------------------------------

    def _run(self):
        failed = False
        try:
            while self._serve_events():
                pass
        except Exception:  # a bug here must not leave handlers waiting forever
            logger.error("the stream pump failed", exc_info=True)
            failed = True
        finally:
            with self._lock:
                self._closed = True
                left = list(self._streams) + self._incoming
                del self._incoming[:]
            for stream in left:
                if failed:  # the relay's fault: an internal error, as in a thread
                    stream.failure = RuntimeError("the stream pump failed")
                elif stream.upstream_error is None:
                    stream.upstream_error = ConnectionAbortedError("the relay is closing")
                self._finish(stream)
            self._selector.close()
            for end in self._wake:
                end.close()
            with self._lock:
                if not self._stopped:  # a failure: the next stream starts a new pump
                    self._streams = set()
                    self._thread = None
                    self._closed = False

    def _serve_events(self):
        """Wait for what the streams' sockets bring and handle it; return
        False when the pump is closing."""
        timeout = PUMP_SWEEP_SECONDS if self._streams else None
        for key, events in self._selector.select(timeout):
            stream = key.data
            if stream is None:
                if not self._take_incoming():
                    return False
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    self._send_output(stream)
                else:
                    self._read_upstream(stream)
            except Exception as error:
                self._fail(stream, error)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + PUMP_SWEEP_SECONDS
            self._sweep(now)
        return True

    def _take_incoming(self):
        try:
            while self._wake[0].recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
            closed = self._closed
        for stream in incoming:
            self._streams.add(stream)
            try:
                self._selector.register(stream.upstream_sock, selectors.EVENT_READ,
                                        stream)
                self._relay_arrived(stream)  # what came with the response head
            except Exception as error:
                self._fail(stream, error)
        return not closed

    def _fail(self, stream, error):
        """An unexpected exception in one stream's work (a bug, or input
        that breaks a parser, such as a usage event nested too deep for
        json) ends that stream only: the pump goes on with the others."""
        stream.failure = error
        self._finish(stream)

    def _read_upstream(self, stream):
        try:
            data = stream.upstream_sock.recv(COPY_BLOCK_BYTES, PUMP_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            return self._upstream_failed(stream, error)
        if data:
            stream.source.add(data)
        else:
            stream.source.ended = True
        if not stream.forward.done:
            stream.deadline = time.monotonic() + stream.read_timeout
        self._relay_arrived(stream)

    def _relay_arrived(self, stream):
        """Decode the body bytes that arrived and send their whole lines."""
        if stream.tracked.client_gone:
            return self._end(stream)  # housekeeping shut the upstream socket
        data, error = self._decoded(stream.body, stream.source)
        ended = stream.body.complete
        if stream.forward.done:
            return self._take_tail(stream, data, ended, error)
        if data:
            runs, stream.pending = split_runs(
                stream.pending + data if stream.pending else data, MAX_SSE_LINE_BYTES)
        else:
            runs = []
        if ended and stream.pending:
            runs.append(stream.pending)
            stream.pending = b""
        out = []
        forward = stream.forward
        for index, run in enumerate(runs):
            out.append(forward.take(run))
            if forward.done:
                tail = b"".join([forward.rest] + runs[index + 1:] + [stream.pending])
                stream.pending = b""
                stream.deadline = time.monotonic() + DONE_TAIL_SECONDS
                self._send(stream, b"".join(out))
                return self._take_tail(stream, tail, ended, error)
        if out:
            self._send(stream, out[0] if len(out) == 1 else b"".join(out))
        if error is not None:
            self._upstream_failed(stream, error)  # after the lines before it
        elif ended:
            stream.tail_complete = not stream.source.held()
            self._end(stream)

    def _upstream_failed(self, stream, error):
        """The upstream side failed: an error for the client, unless the
        stream had ended with data: [DONE] (then its connection is closed,
        not reused, as after a tail that did not end)."""
        if stream.forward.done:
            stream.tail_complete = False
        else:
            stream.upstream_error = error
        self._end(stream)

    @staticmethod
    def _decoded(body, source):
        """Return (the body bytes that can be decoded now, b"" for none;
        the exception that stopped the decoding after them, or None):
        broken framing, a cut, read by BodyReader, from source (its
        ArrivedBytes), as a thread would."""
        data = body.read_whole_chunks()
        if not (source.held() or source.ended) or body.complete:
            return data, None  # the usual case: whole chunks, all taken
        pieces = [data]
        error = None
        while not body.complete:
            try:
                piece = body.read_without_waiting(COPY_BLOCK_BYTES)
            except Exception as failure:
                error = failure
                break
            if not piece:
                break
            pieces.append(piece)
        return b"".join(pieces), error

    def _take_tail(self, stream, data, ended, error=None):
        """After data: [DONE] only blank lines and the body's end may come;
        anything else cuts the connection (see _read_tail_after_done)."""
        if data.strip(b"\r\n") or error is not None:
            stream.tail_complete = False
            return self._end(stream)
        if ended:
            stream.tail_complete = not stream.source.held()
            return self._end(stream)
        if stream.source.ended:  # closed without ending the body
            return self._end(stream)

    def _send_now(self, stream, data):
        """Send what the client's socket takes of data now; return the count
        of bytes sent, or None when the send failed (the stream is then
        finished, with its client_error)."""
        try:
            return stream.client_sock.send(data, PUMP_FLAGS)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as error:
            stream.client_error = error
            self._finish(stream)
            return None

    def _send(self, stream, data):
        """Send data to the client now, or keep what it does not take and
        stop reading its upstream until it does."""
        if stream.client_error is not None:
            return
        sent = self._send_now(stream, data)
        if sent is None or sent == len(data):
            return
        stream.output = data[sent:]
        stream.deadline = time.monotonic() + stream.client_timeout
        self._selector.unregister(stream.upstream_sock)
        self._selector.register(stream.client_sock, selectors.EVENT_WRITE, stream)

    def _send_output(self, stream):
        """The client can take more of what it was sent."""
        data, stream.output = stream.output, b""
        sent = self._send_now(stream, data)
        if sent is None:
            return
        now = time.monotonic()
        if sent < len(data):
            stream.output = data[sent:]
            if sent:
                stream.deadline = now + stream.client_timeout
            return
        self._selector.unregister(stream.client_sock)
        if stream.ending:
            return self._finish(stream)
        self._selector.register(stream.upstream_sock, selectors.EVENT_READ, stream)
        stream.deadline = now + (DONE_TAIL_SECONDS if stream.forward.done
                                 else stream.read_timeout)

    def _sweep(self, now):
        """End the streams whose deadline passed: a client that took
        nothing for client_timeout, an upstream silent for read_timeout, a
        body not ended DONE_TAIL_SECONDS after data: [DONE]."""
        for stream in [stream for stream in self._streams if stream.deadline <= now]:
            if stream.output:
                # The selector tells a client socket writable only once half
                # of what its send buffer holds has gone, which a client that
                # reads slowly, but reads, may take longer than
                # client_timeout to take: a send that goes through is
                # progress too, as for a thread's blocking send.
                self._send_output(stream)
                if stream.output and stream.deadline <= now and stream in self._streams:
                    stream.client_error = socket.timeout("timed out")
                    self._finish(stream)
            elif stream.forward.done:
                stream.tail_complete = False
                self._end(stream)
            else:
                stream.upstream_error = socket.timeout("timed out")
                self._end(stream)

    def _end(self, stream):
        """The pump is done with the upstream: finish once the client has
        taken what it was sent."""
        if stream.output and stream.client_error is None:
            stream.ending = True
        else:
            self._finish(stream)

    def _finish(self, stream):
        if stream not in self._streams:
            stream.finished.set()  # never registered: the pump is closing
            return
        self._streams.discard(stream)
        for sock in (stream.upstream_sock, stream.client_sock):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        stream.finished.set()


###############################################################################
# Model list ##################################################################
###############################################################################

class NoModelList(Exception):
    """An upstream answered GET /models without an OpenAI model list: it has
    no such endpoint (404, 405) or sent something else with 200 (an HTML
    page).  Its models are left out; the aliases are still listed."""

    def __init__(self, upstream, reason):
        Exception.__init__(self)
        self.message = "upstream %s (%s) has no model list: %s" % (
            upstream.name, upstream.url, reason)


def parse_model_list(status, data):
    """Return the OpenAI model list dict in an upstream's /models answer, or
    None when it holds none.

    status is the HTTP status (int), data the body (bytes).  A list is a 200
    JSON object whose "data" is an array (API reference: Models, list).
    """
    if status != 200:
        return None
    try:
        listing = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if isinstance(listing, dict) and isinstance(listing.get("data"), list):
        return listing
    return None


def fetch_model_list(pool, upstream, headers):
    """Return an upstream's GET <url>/models list dict.

    Waits at most MODELS_TIMEOUT_SECONDS of silence, so one hung upstream
    cannot hold the merged list for read_timeout.  Raises NoModelList for a
    404, 405 or a 200 that is no list; RelayError when unreachable, and
    UpstreamAnswer carrying any other non-200 answer (401, 500) to relay as
    it is.
    """
    upstream = upstream._replace(read_timeout=min(upstream.read_timeout,
                                                  MODELS_TIMEOUT_SECONDS))
    response, connection, _ = send_upstream_request(
        pool, upstream, "GET", upstream.base_path + "/models", headers,
        RequestBody())
    complete = False
    try:
        data = read_response_body(response, upstream, MAX_BUFFERED_RESPONSE_BYTES)
        complete = True
    finally:
        finish_upstream_response(pool, upstream, response, connection, complete)
    listing = parse_model_list(response.status, data)
    if listing is not None:
        return listing
    if response.status in (404, 405):
        raise NoModelList(upstream, "GET /models answered %d" % response.status)
    if response.status == 200:
        raise NoModelList(upstream, "GET /models answered %s, not a model list"
                          % (media_type(response.getheader("Content-Type"))
                             or "an untyped body"))
    raise UpstreamAnswer(response, data, upstream)


def fetch_model_lists(pool, upstreams, headers_for):
    """Fetch several upstreams' model lists at once.

    headers_for(upstream) gives each request's headers.  Returns one result
    per upstream, in order: the list dict, or the NoModelList or RelayError
    it failed with.
    """
    results = [None] * len(upstreams)

    def fetch(position, upstream):
        try:
            results[position] = fetch_model_list(pool, upstream, headers_for(upstream))
        except (NoModelList, RelayError) as error:
            results[position] = error
    if len(upstreams) == 1:
        fetch(0, upstreams[0])
        return results
    threads = [threading.Thread(target=fetch, args=item)
               for item in enumerate(upstreams)]
    for thread in threads:
        thread.daemon = True
        thread.start()
    for thread in threads:
        thread.join()  # each fetch is bounded by its connect and read timeouts
    return results


def chain_upstreams(config, chain):
    """Return the Upstreams a chain of upstream and group names may use, in
    order: a replica group stands for its members."""
    upstreams = []
    for name in chain:
        group = config.groups.get(name)
        if group is None:
            upstreams.append(config.upstreams[name])
        else:
            upstreams.extend(config.upstreams[member] for member in group.members)
    return upstreams


def routed_upstream_names(config, is_up=None):
    """Return the upstream names rules route to, "default" first, each once.

    A replica group stands for one member, since all serve the same models:
    the first for which is_up(name) is true (default: the first member).
    """
    names = []
    for step in [DEFAULT_UPSTREAM_NAME] + [name for rule in config.rules
                                           for name in rule.upstreams]:
        group = config.groups.get(step)
        if group is not None:
            up = [name for name in group.members if is_up is None or is_up(name)]
            step = (up or group.members)[0]
        if step in config.upstreams and step not in names:
            names.append(step)
    return names


def model_entry(model_id, created, owned_by="llm-relay"):
    """Return a model object in OpenAI's shape (API reference: Models)."""
    return {"id": model_id, "object": "model", "created": created,
            "owned_by": owned_by}


def merge_model_lists(listings, config):
    """Merge upstream /models lists and add each plain-name rule alias.

    listings is a list of {"object": "list", "data": [...]} dicts.  Returns
    one such dict: every upstream model once (by id, first listing wins),
    then an entry for each rule match_model that is a plain name, except
    "default", that the upstreams lack.
    """
    merged, seen = [], set()
    for listing in listings:
        for entry in listing["data"]:
            model_id = entry.get("id") if isinstance(entry, dict) else None
            if model_id is not None and model_id not in seen:
                seen.add(model_id)
                merged.append(entry)
    for rule in config.rules:
        for name in rule.match_model:
            if name != "default" and not is_pattern(name) and name not in seen:
                seen.add(name)
                merged.append(model_entry(name, config.created))
    return {"object": "list", "data": merged}


def anthropic_model_entry(entry, created):
    """Return a model object in Anthropic's shape (API reference: Models):
    {"type": "model", "id", "display_name", "created_at" (RFC 3339)}.

    entry is an OpenAI-shaped model object (its "created" Unix seconds, else
    created) or already an Anthropic one, whose fields are kept.
    """
    stamp = entry.get("created")
    if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp < 0:
        stamp = created
    result = collections.OrderedDict((
        ("type", "model"), ("id", entry["id"]),
        ("display_name", entry.get("display_name") or entry["id"]),
        ("created_at", entry.get("created_at") or time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(stamp, 253402300799))))))
    return result


def anthropic_model_page(listing, created, query):
    """Return one page of a merged model list (see merge_model_lists) in
    Anthropic's list shape: {"data": [...], "has_more", "first_id",
    "last_id"}.  query (the request's query string) may hold limit (1 to
    1000, default 20), after_id and before_id, as in Anthropic's API.
    Raises RelayError(400) for a limit out of range.
    """
    parameters = urllib.parse.parse_qs(query)
    limit_text = (parameters.get("limit") or ["20"])[0]
    if not re.match(r"^[0-9]{1,4}$", limit_text) or not 1 <= int(limit_text) <= 1000:
        raise RelayError(400, "limit must be an integer from 1 to 1000.",
                         param="limit")
    limit = int(limit_text)
    entries = [anthropic_model_entry(entry, created) for entry in listing["data"]]
    ids = [entry["id"] for entry in entries]
    start, end = 0, len(entries)
    after, before = parameters.get("after_id"), parameters.get("before_id")
    if after:
        start = ids.index(after[0]) + 1 if after[0] in ids else len(entries)
    if before:
        end = ids.index(before[0]) if before[0] in ids else 0
        start = max(start, end - limit)
    page = entries[start:min(end, start + limit)]
    has_more = (start > 0) if before and not after else start + limit < end
    return collections.OrderedDict((
        ("data", page), ("has_more", has_more),
        ("first_id", page[0]["id"] if page else None),
        ("last_id", page[-1]["id"] if page else None)))


###############################################################################
# Metrics and readiness #######################################################
###############################################################################

def prometheus_label(value):
    """Escape a label value for the Prometheus text format 0.0.4."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace(
        '"', '\\"')


def metrics_path(route):
    """Return the bounded path label for a request route: the relay's
    endpoints as clients spell them (/health, /v1/models), a KNOWN_API_PATHS
    path as /v1<path>, a path under one as /v1<path>/* (the longest), and
    "other" for everything else, whatever clients send."""
    if route is None:
        return "other"
    endpoint = ROUTES.get(route)
    if endpoint is not None:
        return "/v1" + route if endpoint.under_v1 else route
    if route in KNOWN_API_PATHS:
        return "/v1" + route
    parent = route
    while parent.count("/") > 1:
        parent = parent.rsplit("/", 1)[0]
        if parent in KNOWN_API_PATHS:
            return "/v1" + parent + "/*"
    return "other"


class Metrics(object):
    """Request, upstream error and token counters, thread-safe.

    render() gives the Prometheus text exposition format 0.0.4.  Model label
    values are capped at MAX_MODEL_LABELS distinct ones (then "other"), so
    clients cannot grow memory by inventing model names.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = collections.Counter()  # (path, status, model, key) -> count
        self._durations = {}  # path -> [count per bucket..., sum, count]
        self._in_flight = 0
        self._upstream_errors = collections.Counter()  # (upstream, kind) -> count
        self._tokens = collections.Counter()  # (model, kind, key) -> tokens
        self._models = set()

    def _model_label(self, model):
        if model is None:
            return ""
        label = printable(model)[:100]
        if label not in self._models:
            if len(self._models) >= MAX_MODEL_LABELS:
                return "other"
            self._models.add(label)
        return label

    def request_started(self):
        with self._lock:
            self._in_flight += 1

    def request_finished(self, path, status, model, seconds, key_name=None):
        """Count a finished request; key_name is the ApiKey's name or None
        (a config key, so the label stays bounded)."""
        with self._lock:
            self._in_flight -= 1
            self._requests[(path, str(status), self._model_label(model),
                            key_name or "")] += 1
            # One count per bucket (the first bound >= seconds; the last slot
            # before sum and count is +Inf); render() makes them cumulative.
            buckets = self._durations.setdefault(
                path, [0] * (len(DURATION_BUCKETS_SECONDS) + 1) + [0.0, 0])
            buckets[bisect.bisect_left(DURATION_BUCKETS_SECONDS, seconds)] += 1
            buckets[-2] += seconds
            buckets[-1] += 1

    def upstream_error(self, upstream_name, kind):
        """Count a failure of kind refused, timeout, 5xx, dropped or invalid."""
        with self._lock:
            self._upstream_errors[(upstream_name, kind)] += 1

    def add_usage(self, model, usage, protocol=PROTOCOL_CHAT, key_name=None):
        """Add the tokens of a usage object in the protocol's own shape,
        each field as its kind (see USAGE_KINDS); key_name labels them."""
        if not isinstance(usage, dict):
            return
        with self._lock:
            label = self._model_label(model)
            for field, kind in USAGE_KINDS.get(protocol, OPENAI_USAGE_KINDS):
                tokens = usage.get(field)
                if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
                    self._tokens[(label, kind, key_name or "")] += tokens

    def render(self, upstream_samples=()):
        """Return the metrics as Prometheus text format 0.0.4 bytes.

        upstream_samples come from Traffic.upstream_samples.  The key label
        appears only on requests made with a key (api_keys set).
        """
        with self._lock:
            requests = sorted(self._requests.items())
            durations = sorted((path, list(values))
                               for path, values in self._durations.items())
            in_flight = self._in_flight
            errors = sorted(self._upstream_errors.items())
            tokens = sorted(self._tokens.items())
        lines = []

        def family(name, kind, help_text, samples):
            lines.append("# HELP %s %s" % (name, help_text))
            lines.append("# TYPE %s %s" % (name, kind))
            for labels, value in samples:
                label_text = ",".join('%s="%s"' % (key, prometheus_label(item))
                                      for key, item in labels)
                lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text
                                          else "", repr(float(value))
                                          if isinstance(value, float) else value))
        family("llm_relay_requests_total", "counter",
               "Requests answered, by path, status and model alias.",
               [((("path", path), ("status", status), ("model", model)) + (
                   (("key", key),) if key else ()), count)
                for (path, status, model, key), count in requests])
        lines.append("# HELP llm_relay_request_duration_seconds Time from request "
                     "to the end of the response, by path.")
        lines.append("# TYPE llm_relay_request_duration_seconds histogram")
        for path, values in durations:
            label = prometheus_label(path)
            cumulative = 0
            for bound, count in zip(DURATION_BUCKETS_SECONDS, values):
                cumulative += count
                lines.append('llm_relay_request_duration_seconds_bucket{path="%s",'
                             'le="%r"} %d' % (label, bound, cumulative))
            lines.append('llm_relay_request_duration_seconds_bucket{path="%s",'
                         'le="+Inf"} %d' % (label, values[-1]))
            lines.append('llm_relay_request_duration_seconds_sum{path="%s"} %r'
                         % (label, values[-2]))
            lines.append('llm_relay_request_duration_seconds_count{path="%s"} %d'
                         % (label, values[-1]))
        family("llm_relay_requests_in_flight", "gauge",
               "Requests being answered now.", [((), in_flight)])
        family("llm_relay_upstream_errors_total", "counter",
               "Upstream failures by upstream and kind (refused, timeout, 5xx, "
               "dropped, invalid).",
               [((("upstream", name), ("kind", kind)), count)
                for (name, kind), count in errors])
        family("llm_relay_tokens_total", "counter",
               "Tokens reported in upstream usage, by model alias and kind.",
               [((("model", model), ("kind", kind)) + (
                   (("key", key),) if key else ()), count)
                for (model, kind, key), count in tokens])
        if upstream_samples:
            self._render_upstreams(family, upstream_samples)
        return ("\n".join(lines) + "\n").encode("utf-8")

    @staticmethod
    def _render_upstreams(family, samples):
        for column, name, kind, help_text in (
                (1, "llm_relay_upstream_in_flight", "gauge",
                 "Requests holding a slot on an upstream now."),
                (2, "llm_relay_upstream_queued", "gauge",
                 "Requests waiting for a slot (max_concurrent) now."),
                (3, "llm_relay_upstream_requests_total", "counter",
                 "Requests sent to an upstream (the replica each went to)."),
                (4, "llm_relay_upstream_ejections_total", "counter",
                 "Times a replica was taken out for a cool-down."),
                (5, "llm_relay_upstream_up", "gauge",
                 "1 while a replica takes requests, 0 during its cool-down.")):
            family(name, kind, help_text + " Group members and upstreams with "
                   "max_concurrent only.",
                   [((("upstream", sample[0]),), sample[column])
                    for sample in samples])


# Usage fields counted per protocol -> the "kind" label of
# llm_relay_tokens_total.  Chat completions (and embeddings and the rest):
# prompt_tokens, completion_tokens.  Anthropic Messages: input_tokens,
# output_tokens, and the cache reads and writes that input_tokens excludes.
# Responses: input_tokens, output_tokens (cached ones are inside input).
OPENAI_USAGE_KINDS = (("prompt_tokens", "prompt"),
                      ("completion_tokens", "completion"))
USAGE_KINDS = {
    PROTOCOL_MESSAGES: (("input_tokens", "input"), ("output_tokens", "output"),
                        ("cache_read_input_tokens", "cache_read"),
                        ("cache_creation_input_tokens", "cache_write")),
    PROTOCOL_RESPONSES: (("input_tokens", "input"), ("output_tokens", "output")),
}


def usage_from_json(data, protocol=PROTOCOL_CHAT):
    """Return the "usage" object of a JSON answer body (bytes), or None.

    Bodies without the bytes of the protocol's first usage field
    ("prompt_tokens", or "input_tokens" for Messages and Responses) are not
    parsed at all.
    """
    marker = b'"input_tokens"' if protocol in USAGE_KINDS else b'"prompt_tokens"'
    if marker not in data:
        return None
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return value.get("usage") if isinstance(value, dict) else None


# The bytes that mark the few SSE lines StreamWatch parses, per protocol:
# chat's usage chunk; Anthropic's message_start and message_delta (the only
# events with "usage"); Responses events that carry a response object.
STREAM_WATCH_MARKERS = {
    PROTOCOL_MESSAGES: b'"usage"',
    PROTOCOL_RESPONSES: b'"response"',
}


class StreamWatch(object):
    """What a relayed stream tells about itself, learnt without parsing
    every event: the relay loop hands over only lines containing marker.

    usage: the stream's usage in its protocol's shape (dict) or None; for
    Messages, message_start's usage updated by each message_delta's
    cumulative counts (so the last one wins); for Responses, the usage of
    response.completed (or .incomplete, .failed).  response: the Responses
    API response object the stream announced (response.created), for a
    response.failed event of the relay's own.
    """

    def __init__(self, protocol):
        self.protocol = protocol
        self.marker = STREAM_WATCH_MARKERS.get(protocol, b'"prompt_tokens"')
        self.usage = None
        self.response = None

    def see(self, line):
        """Learn from one SSE line that contains marker."""
        if not line.startswith(b"data:"):
            return
        try:
            event = json.loads(line[5:].decode("utf-8"))
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if self.protocol == PROTOCOL_RESPONSES:
            response = event.get("response")
            if isinstance(response, dict):
                if self.response is None:
                    self.response = response
                if isinstance(response.get("usage"), dict):
                    self.usage = response["usage"]
            return
        if self.protocol == PROTOCOL_MESSAGES:
            message = event.get("message")
            usage = (message.get("usage") if isinstance(message, dict)
                     else event.get("usage"))
            if isinstance(usage, dict):
                self.usage = dict(self.usage or {})
                self.usage.update((field, tokens) for field, tokens in usage.items()
                                  if isinstance(tokens, int))
            return
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]


def check_upstream_ready(upstream, timeout_seconds=READY_TIMEOUT_SECONDS):
    """Return None when an upstream answers GET <base>/models with any HTTP
    response within timeout_seconds (a 404 from a server without /models is
    up too), else a short reason (str): refused, timeout, invalid."""
    connection_class = (http.client.HTTPSConnection if upstream.scheme == "https"
                        else http.client.HTTPConnection)
    options = {"context": upstream.ssl_context} if upstream.ssl_context else {}
    connection = connection_class(upstream.host, upstream.port,
                                  timeout=timeout_seconds, **options)
    connection.response_class = UpstreamResponse  # a malformed head: invalid
    headers = {"Host": host_header(upstream), "Accept-Encoding": "identity"}
    if upstream.api_key:
        headers.update(upstream_credential_headers(upstream))
    try:
        connection.request("GET", upstream.base_path + "/models", headers=headers)
        connection.getresponse().close()
        return None
    except Exception as error:
        failure = upstream_failure(upstream, error) if isinstance(
            error, (OSError, http.client.HTTPException)) else error
        return getattr(failure, "kind", None) or type(error).__name__
    finally:
        connection.close()


def route_chains(config):
    """Return {route name: upstream chain} for every route a request can take:
    each rule's chain by its path (model_rules[2]), and "default" for
    requests no rule matches when there is no "default" rule."""
    chains = collections.OrderedDict(
        (rule.path, rule.upstreams) for rule in config.rules)
    if config.rule_index.default is None:
        chains[DEFAULT_UPSTREAM_NAME] = (DEFAULT_UPSTREAM_NAME,)
    return chains


def routes_down(chains, reasons, groups=None):
    """Return the route names (a list) none of whose upstreams is up.

    chains is route_chains' dict; reasons maps upstream name -> None (up)
    or the reason it is down; groups maps replica group names to
    ReplicaGroup, a group being down when all its members are.
    """
    groups = groups or {}

    def down(name):
        group = groups.get(name)
        if group is None:
            return reasons.get(name)
        return all(reasons.get(member) for member in group.members)
    return [route for route, chain in chains.items()
            if all(down(name) for name in chain)]


def check_readiness(config, timeout_seconds=READY_TIMEOUT_SECONDS):
    """Check every configured upstream at once; return {name: reason or None}."""
    results = dict((name, "no answer within %g s" % timeout_seconds)
                   for name in config.upstreams)

    def check(name, upstream):
        results[name] = check_upstream_ready(upstream, timeout_seconds)
    threads = [threading.Thread(target=check, args=item)
               for item in config.upstreams.items()]
    for thread in threads:
        thread.daemon = True
        thread.start()
    deadline = time.monotonic() + timeout_seconds + 0.5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(results)


###############################################################################
# Logging helpers #############################################################
###############################################################################

_LOG_ESCAPES = dict((code, "\\x%02x" % code)
                    for code in list(range(32)) + list(range(127, 160)))
_LOG_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def redact_for_log(value, max_chars=MAX_LOGGED_BODY_CHARS):
    """Return a JSON string of value for debug logs, with secrets masked.

    Values of keys that look like credentials (api_key, token, secret,
    password, authorization) become "***"; long strings (base64 images) are
    shortened; the whole text is cut at max_chars characters.
    """
    def redact(item, depth=0):
        if depth > 20 and isinstance(item, (dict, list)):
            return "...(nested deeper)"
        if isinstance(item, dict):
            return dict((key, "***" if SECRET_KEY_PATTERN.search(str(key))
                         else redact(child, depth + 1)) for key, child in item.items())
        if isinstance(item, list):
            return [redact(child, depth + 1) for child in item]
        if isinstance(item, str) and len(item) > 200:
            return item[:100] + "...(%d chars)" % len(item)
        return item
    text = json.dumps(redact(value), ensure_ascii=False)
    return text if len(text) <= max_chars else text[:max_chars] + "..."


def printable(text):
    """Escape control characters so client-chosen text cannot forge log lines."""
    text = str(text)
    # Every escaped character is one that isprintable() refuses (categories
    # Cc, Zl, Zp), and that test is far cheaper than translate's lookup of
    # each character: most text passes it and is returned as it is.
    return text if text.isprintable() else text.translate(_LOG_ESCAPES)


def loggable_target(target):
    """Return a request target for logs: escaped, cut at 300 characters, and
    with the values of key-like query parameters (api-key=, token=) masked."""
    if "?" in target:
        path, _, query = target.partition("?")
        target = path + "?" + SECRET_QUERY_PARAMETER.sub(r"\1***", query)
    return mask_secrets(printable(target)[:300])


def mask_secrets(text):
    """Mask what looks like a credential in client text bound for a log
    line: key-like parameters (api-key=, token=, ...), Bearer/Basic
    credentials and sk-... style keys."""
    if "=" in text:
        text = SECRET_QUERY_PARAMETER.sub(r"\1***", text)
    return _CREDENTIAL_WORDS.sub(lambda match: match.group(1) + "***", text)


def plural(count, noun):
    """Return "1 rule", "2 rules", "0 rules": a count that reads naturally."""
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def format_model_change(asked, sent):
    """Return "asked→sent" for the access log, or just asked when unchanged."""
    asked = printable(asked)[:MAX_LOGGED_MODEL_CHARS]
    sent = printable(sent)[:MAX_LOGGED_MODEL_CHARS]
    return asked if asked == sent else "%s→%s" % (asked, sent)


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def format_json_log_time(created):
    """Return a record time (seconds since the epoch) as ISO 8601 UTC with
    milliseconds, as JSON log lines carry it."""
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + ".%03dZ" % ((created - int(created)) * 1000))


class JsonLogFormatter(logging.Formatter):
    """Format each log record as one JSON object per line (log_format "json").

    Access lines carry their fields (client, method, path, status,
    duration_ms, stream, model, upstream, error, id); other lines a message.
    """

    def format(self, record):
        entry = collections.OrderedDict((
            ("time", format_json_log_time(record.created)),
            ("level", record.levelname)))
        access = getattr(record, "access", None)
        if access is not None:
            entry["event"] = "request"
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


ACCESS_BASE_FIELDS = ("client", "method", "path", "status", "duration_ms", "id")


def format_access_text(access):
    """Return the text access line's message for access, an OrderedDict of
    client, method, path, status, duration_ms, the request's own fields
    (stream, model, upstream, error...) and id; client-chosen values are
    escaped (the path arrives escaped)."""
    fields = "".join([
        " %s=%s" % (key, ("yes" if value else "no") if key == "stream"
                    else printable(value))
        for key, value in access.items() if key not in ACCESS_BASE_FIELDS])
    return "%s %s %s %s %.1fms%s%s" % (
        access["client"], access["method"], access["path"],
        access["status"] or "-", access["duration_ms"], fields,
        " id=%s" % access["id"] if access.get("id") else "")


class AccessLog(object):
    """Write each request's one access line, text or JSON.

    Without a handler the line is a logging record on "llm_relay" (its
    fields in record.access), which embedders and assertLogs see.  main()
    gives it the handler it configured: the line is then formatted here,
    exactly as that handler would, and written to its stream under its
    lock, skipping the record, the logger walk and the formatter (an eighth
    of a short request's CPU).  Other messages keep logging.  No thread
    waits for another's write (see _write_pending).
    """

    def __init__(self, handler=None, log_format="text"):
        self._handler = handler
        self._json = log_format == "json"
        self._second = None
        self._stamp = ""
        self._pending = collections.deque()  # lines not yet written, in order
        self._writer = threading.Lock()  # held by the thread writing them

    def write(self, access):
        if self._handler is None:
            logger.info("%s", format_access_text(access), extra={"access": access})
            return
        now = time.time()
        if self._json:
            entry = collections.OrderedDict((
                ("time", format_json_log_time(now)), ("level", "INFO"),
                ("event", "request")))
            entry.update(access)
            line = json.dumps(entry, ensure_ascii=False, default=str) + "\n"
        else:
            line = "%s,%03d INFO %s\n" % (self._text_time(now), (now - int(now)) * 1000,
                                          format_access_text(access))
        self._pending.append(line)
        self._write_pending()

    def _write_pending(self):
        """Write every pending line, unless another thread is writing: that
        thread then writes this one too, before it returns.

        Waiting for the handler's lock made a convoy under load: its holder
        lets go of the interpreter lock for the write() system call and
        then waits to get it back, still holding the handler's lock, so at
        c=32 half of all access lines found it taken, each wait two more
        thread switches.  Here a thread that finds a write under way leaves
        its line to the writer, which looks for more lines after letting go
        of _writer: no line waits for a later one, and lines that pile up
        meanwhile leave together, in order, in one write.
        """
        pending = self._pending
        while pending and self._writer.acquire(False):
            try:
                lines = []
                while pending:
                    lines.append(pending.popleft())
                self._write_lines(lines)
            finally:
                self._writer.release()

    def _write_lines(self, lines):
        handler = self._handler
        handler.acquire()  # against other log records on the same stream
        try:
            try:
                handler.stream.write("".join(lines))
            except ValueError:
                # A line the stream cannot encode (a strict encoding): lose
                # that line only, as when each line was written alone.
                for line in lines:
                    try:
                        handler.stream.write(line)
                    except ValueError:
                        pass
            handler.stream.flush()
        except (OSError, ValueError):
            pass  # stderr is gone; nothing else can report it
        finally:
            handler.release()

    def _text_time(self, now):
        """logging's asctime (local time) without the milliseconds, formatted
        once per second."""
        second = int(now)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return self._stamp


def mask_secret(secret):
    """Return a key shown safely: only its last 4 characters, if long enough."""
    if not secret:
        return "-"
    return "****" + secret[-4:] if len(secret) >= 16 else "****"


###############################################################################
# Request handler #############################################################
###############################################################################

class RequestBodyReader(object):
    """Read one request body from the client, as its head framed it.

    rfile is the client's buffered stream; length the Content-Length in
    bytes, or None for chunked transfer coding, decoded by the relay's one
    chunked decoder (BodyReader) and counted against max_body_bytes.
    on_complete() is called when the last byte has arrived; done tells
    whether it has: an answer sent before that must close the connection,
    or the unread bytes would be parsed as the next request.  read()
    returns the whole body; blocks() yields it in blocks of up to
    COPY_BLOCK_BYTES without holding it.  Both raise RelayError (400
    malformed chunking, 413 past max_body_bytes) or ClientDisconnected.
    """

    def __init__(self, rfile, length, max_body_bytes, on_complete=None):
        self.length = length
        self.done = False
        self._rfile = rfile
        self._max_body_bytes = max_body_bytes
        self._on_complete = on_complete

    def read(self):
        if self.length is None:
            body = bytearray()
            for block in self._chunked_blocks():
                body += block
            return bytes(body)
        data = self._rfile.read(self.length) if self.length else b""
        if len(data) < self.length:
            raise ClientDisconnected()
        self._complete()
        return data

    def blocks(self):
        if self.length is None:
            return self._chunked_blocks()
        return self._length_blocks()

    def _complete(self):
        self.done = True
        if self._on_complete is not None:
            self._on_complete()

    def _chunked_blocks(self):
        # Tiny chunks are gathered into blocks, so that each does not cost a
        # send upstream.
        reader = BodyReader(self._rfile, chunked=True, max_bytes=self._max_body_bytes)
        gathered = bytearray()
        try:
            while True:
                piece = reader.read(COPY_BLOCK_BYTES)
                if not piece:
                    break
                gathered += piece
                if len(gathered) >= COPY_BLOCK_BYTES:
                    yield bytes(gathered)
                    gathered = bytearray()
        except BadMessage as error:
            if error.status == 413:
                raise RelayError(413, "The request body exceeds max_body_bytes "
                                 "= %d." % self._max_body_bytes,
                                 code="request_too_large")
            raise RelayError(error.status, "Malformed chunked request body: %s."
                             % error.reason, code="invalid_chunked_body")
        except (MessageCutShort, OSError):  # the client, not the upstream
            raise ClientDisconnected()
        if gathered:
            yield bytes(gathered)
        self._complete()

    def _length_blocks(self):
        remaining = self.length
        while remaining:
            try:
                block = self._rfile.read(min(remaining, COPY_BLOCK_BYTES))
            except OSError:  # reading the client, not the upstream, failed
                block = b""
            if not block:
                raise ClientDisconnected()
            remaining -= len(block)
            yield block
        self._complete()


class ClientBodyWriter(object):
    """Write a response body to the client piece by piece, as it arrives.

    chunked: each write() is one HTTP/1.1 chunk and finish() sends the last
    chunk (RFC 9112 §7.1); else the bytes go as they are (after a
    Content-Length head, or close-delimited for an HTTP/1.0 client).  The
    head was flushed before, so send (the socket's sendall) is called
    directly: one send per piece, no buffer between.  write() raises
    ClientDisconnected once tracked (a TrackedConnection, or None) has seen
    the client leave.
    """

    __slots__ = ("send", "chunked", "_tracked")

    def __init__(self, send, chunked, tracked=None):
        self.send = send
        self.chunked = chunked
        self._tracked = tracked

    def write(self, data):
        if self._tracked is not None and self._tracked.client_gone:
            raise ClientDisconnected()
        if data:
            self.send(encode_chunk(data) if self.chunked else data)

    def finish(self):
        if self.chunked:
            self.send(b"0\r\n\r\n")


class RelayHandler(http.server.BaseHTTPRequestHandler):
    """Answer one client connection: route, authorize, rewrite, relay.

    Methods appear in the order a request meets them.  Expected failures are
    RelayErrors, answered in OpenAI's error shape; once the status line has
    been sent, a stream ends with a final SSE error event instead.
    """

    protocol_version = "HTTP/1.1"
    # A malformed request line still gets a status line and headers.
    default_request_version = "HTTP/1.0"
    server_version = "llm-relay/" + __version__
    http_date = HttpDateCache()
    # Headers and a short body leave in one write; streams flush per line.
    wbufsize = COPY_BLOCK_BYTES
    timeout = None  # setup() bounds the socket; see there

    # -- connection lifecycle -------------------------------------------------

    def setup(self):
        """Prepare a new client connection: bounded writes, TCP_NODELAY (an
        SSE line must not wait for the peer's delayed ACK) and its
        TrackedConnection."""
        http.server.BaseHTTPRequestHandler.setup(self)
        # Reads from the client are bounded by the server's client_timeout
        # deadline (its housekeeping thread shuts overdue sockets down);
        # writes to a client that stopped reading, by the kernel.  Neither
        # costs a poll() before each recv and send, as settimeout would.
        client_timeout = self.server.config.client_timeout
        if not set_kernel_timeouts(self.connection, client_timeout, receive=False):
            self.connection.settimeout(client_timeout)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.tracked = self.server.track_connection(self.connection)
        # True while _serve_request runs: it writes the access line itself,
        # so send_error (http.server's own errors) writes one only outside it.
        self._in_dispatch = False

    def handle_one_request(self):
        """Serve one request of a keep-alive connection with fresh
        per-request state; stop when the server drains."""
        if not self.tracked.wait_for_request():
            self.close_connection = True
            return
        self._reset_request_state()
        try:
            http.server.BaseHTTPRequestHandler.handle_one_request(self)
        except (ConnectionError,) + SOCKET_TIMEOUT_ERRORS:
            # The client is gone while the last bytes were being flushed; the
            # access line already says so.
            self.close_connection = True

    def finish(self):
        try:
            http.server.BaseHTTPRequestHandler.finish(self)
        except OSError:
            pass  # the client is gone; nothing left to flush
        finally:
            self.server.untrack_connection(self.tracked)

    def _reset_request_state(self):
        self._status = None
        self._headers_sent = False
        self._started = time.monotonic()
        self._request_id = None
        self._upstream_request_id = None
        self._route = None
        self._protocol = PROTOCOL_OTHER
        self._rename_model = None  # the model name answers report, if not theirs
        self._stream_watch = None
        self._model_asked = None
        self._api_key = None  # the ApiKey the request came with
        self._key_admitted = False  # counted against the key's limits
        self._slot = None  # name of the upstream whose slot the request holds
        self._affinity = None  # {replica group name: affinity key}
        self.headers = None  # not the previous request's on keep-alive
        self._header_items = None
        self._body = None  # the RequestBodyReader, once the framing is checked
        self._head_body_length = 0  # from the head: bytes, or None (chunked)
        self.command = None
        self.request_version = self.default_request_version
        self.path = None
        self.log_fields = collections.OrderedDict()

    def parse_request(self):
        """Read the request line and header section strictly; True to serve.

        Replaces http.server's parser, which reads headers with the email
        package: lenient by design, a malformed line there silently ends the
        header section and what follows is read as body or as the next
        request.  Here every line must be valid (parse_request_line,
        read_field_lines) and the body framing unambiguous
        (request_body_length, RFC 9112 §6.3); otherwise the answer is 400
        (431, 501 or 505) and the connection closes, so nothing after a bad
        head is ever interpreted.
        """
        self.tracked.request_started()
        self.requestline = ""  # http.server's logging of it is not used
        self.close_connection = True
        line = self.raw_requestline
        if line in (b"\r\n", b"\n"):
            # RFC 9112 §2.2: an empty line before a request is ignored
            # (some clients end a POST body with an extra CRLF).
            line = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
            if not line:
                return False
        try:
            if len(line) > MAX_REQUEST_LINE_BYTES:
                raise BadMessage("a request line longer than %d bytes"
                                 % MAX_REQUEST_LINE_BYTES, 414)
            self.command, self.path, self.request_version = parse_request_line(line)
            fields = FieldList(read_field_lines(self.rfile))
            self._head_body_length = request_body_length(self.request_version,
                                                         fields)
        except BadMessage as error:
            self._refuse_head(line, error)
            return False
        except (MessageCutShort, OSError):
            return False  # the client left or timed out inside the head
        self.headers = fields
        tokens = list_elements(fields.values_of("connection"))
        self.close_connection = "close" in tokens or (
            self.request_version == "HTTP/1.0" and "keep-alive" not in tokens)
        if self.request_version == "HTTP/1.1" and (
                (fields.first("expect") or "").lower() == "100-continue"):
            return self.handle_expect_100()
        return True

    def _refuse_head(self, line, error):
        """Answer a request head that parse_request refused: one access line
        (the target's secrets masked), the error in the shape of its path,
        Connection: close, nothing forwarded."""
        words = line.split(b" ")
        if self.command is None:
            self.command = words[0].decode("latin-1")[:20] if _IS_TOKEN.match(
                words[0]) else None
        if self.path is None and len(words) > 1:
            self.path = words[1].decode("latin-1")
        self._protocol = target_protocol(self.path or "")
        self.server.metrics.request_started()
        self.send_error(error.status, "Bad request: %s." % error.reason
                        if error.status == 400 else error.reason[:1].upper() +
                        error.reason[1:] + ".")
        # Counted under "other": a refused head has no trustworthy route.
        self.server.metrics.request_finished("other", self._status or 0, None,
                                             time.monotonic() - self._started)

    def _header_list(self):
        """Return the request headers as (name, value) pairs, in order."""
        if self._header_items is None:
            self._header_items = self.headers.items() if self.headers else []
        return self._header_items

    def _header_values(self, lowercase_name):
        """Return every value of a request header (a list, maybe empty),
        from the FieldList parse_request built: one dict lookup."""
        return list(self.headers.values_of(lowercase_name)) if (
            self.headers is not None) else []

    def _header(self, lowercase_name):
        """Return the first value of a request header, or None."""
        return self.headers.first(lowercase_name) if (
            self.headers is not None) else None

    def handle_expect_100(self):
        # Answer a doomed request (too large, unauthorized, unknown) with its
        # final status instead of 100 Continue, so the body is never sent
        # (RFC 9110 §10.1.1); _serve_request sends that status.
        try:
            self._precheck(self.server.config)
        except RelayError:
            return True
        self.send_response_only(100)
        self.end_headers()
        self.wfile.flush()
        return True

    # -- dispatch ---------------------------------------------------------------

    def _serve_request(self):
        """Serve one request: the error boundary of the handler (do_*).

        A RelayError becomes its OpenAI-shaped answer and an UpstreamAnswer
        the upstream's own; a client that leaves is logged as 499 with no
        answer.  Anything unexpected is a bug: the client gets a JSON 500
        (never http.server's HTML), the log one line, and the traceback
        appears at debug level only.  Once the head has gone out the status
        cannot change, so the connection closes instead.  The access line
        and the request metrics are written in every case.
        """
        config = self.server.config
        self._in_dispatch = True
        self.server.metrics.request_started()
        try:
            self._route_request(config)
        except UpstreamAnswer as answer:
            self._send_buffered(answer.status, self._client_headers(
                answer.response_headers), answer.data)
        except RelayError as error:
            self._send_relay_error(error)
        except ClientDisconnected:
            self._record_disconnect("client disconnected")
        except ConnectionError as error:
            self._record_disconnect("client disconnected (%s)" % type(error).__name__)
        except SOCKET_TIMEOUT_ERRORS:
            self._record_disconnect("client stopped reading for client_timeout")
        except Exception as error:
            logger.debug("unexpected error", exc_info=True)
            # The exception text could hold a header value; the type is enough.
            self.log_fields["error"] = "internal error: %s (details with -v)" % (
                type(error).__name__)
            if self._headers_sent:
                self.close_connection = True
            else:
                self._send_relay_error(RelayError(500, "Internal relay error.",
                                                  code="internal_error"))
        finally:
            self._in_dispatch = False
            self.tracked.watch(None)
            self._release_holds()
            self._log_access()
            self.server.metrics.request_finished(
                metrics_path(self._route),
                self._status or 0, self._model_asked,
                time.monotonic() - self._started, self._key_name())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = (
        _serve_request)

    def _route_request(self, config):
        """Name the request, check it before any body byte is read (see
        _precheck) and pass it to its endpoint in ROUTES, the alias lookup
        of GET /v1/models/{id}, or the upstream (_forward)."""
        self._request_id = sanitize_request_id(
            self._header("x-request-id")) or new_request_id()
        route, query = self._precheck(config)
        api_key = self._api_key
        if api_key is not None and (api_key.max_concurrent or
                                    api_key.requests_per_minute):
            self.server.traffic.admit_key(api_key)
            self._key_admitted = True
        if not self._declares_body():
            self.tracked.request_read()
        if self.command == "OPTIONS":
            return self._answer_options(config)
        endpoint = ROUTES.get(route)  # _precheck allowed its method
        if endpoint is not None:
            return getattr(self, endpoint.serve)(config, route, query)
        if route.startswith("/models/") and self.command == "GET":
            return self._serve_one_model(config, route, query)
        return self._forward(config, route, query)

    def _precheck(self, config):
        """Route and authorize before any body byte is read.

        Returns (route path, query).  Raises RelayError: 400 bad target, 404
        unknown path, 405 wrong method (with Allow), 401 bad key, 411/413
        missing or too large Content-Length.
        """
        route, query = split_route(self.path)
        self._route = route
        self._protocol = request_protocol(route, self._header("anthropic-version"))
        if route not in ROUTES or ROUTES[route].under_v1:  # not /health, /metrics
            self.log_fields["protocol"] = self._protocol
        allowed = ENDPOINTS.get(route)
        if self.command == "OPTIONS":
            return route, query
        if allowed is None and not self._path_is_under_v1():
            raise RelayError(404, "Unknown path %s %s." % (
                self.command, loggable_target(self.path)[:200]), code="unknown_url")
        if allowed is not None and self.command not in allowed:
            raise RelayError(405, "Method %s is not allowed on %s; use %s." % (
                self.command, printable(target_path(self.path)[0])[:200],
                ", ".join(allowed)),
                code="method_not_allowed", headers=[("Allow", ", ".join(allowed))])
        if config.api_keys and route not in UNAUTHENTICATED_PATHS:
            self._authenticate(config)
        self._request_body(config)
        return route, query

    def _authenticate(self, config):
        """Find the client's key among api_keys; raise RelayError 401 when
        there is none.  The access log gets the key's name, never the key."""
        api_key = find_api_key(self._client_credential(), config.api_keys)
        if api_key is None:
            raise RelayError(401, "Incorrect or missing API key. Send "
                             "'Authorization: Bearer <key>' or 'x-api-key: <key>' "
                             "with one of the relay's api_keys.",
                             code="invalid_api_key",
                             headers=[("WWW-Authenticate", "Bearer")])
        self._api_key = api_key
        self.log_fields["key"] = api_key.name

    def _client_credential(self):
        """Return the key the client sent (str), or None."""
        return client_credential(self._header("authorization"),
                                 self._header("x-api-key"))

    def _key_name(self):
        return self._api_key.name if self._api_key is not None else None

    def _check_model_allowed(self, request):
        """Raise RelayError 403 when the client's key may not use the model
        of request (a ClientRequest).

        A key with a models list must name an allowed model in every request
        with a body; a body whose model the relay does not read (an upload)
        is refused.  The message names the model, never the key.
        """
        api_key = self._api_key
        if not api_key.models:
            return
        if not request.is_json and (request.body.length or request.body.chunked):
            raise RelayError(403, "This API key may use only some models, and "
                             "the relay cannot read the model of this request "
                             "(not a JSON body).", error_type="permission_error",
                             code="model_not_allowed")
        if request.is_json and not key_allows_model(api_key, request.model):
            raise self._model_not_allowed(request.model)
        if request.is_json and "model" in top_level_members_named_twice(
                request.body.data):
            # Checked only for keys with a models list: the body goes
            # upstream as it came, and an upstream that reads the first
            # "model" would serve one the key may not use.
            raise RelayError(400, 'The request body names "model" more than once.',
                             code="invalid_json", param="model")

    def _affinity_keys(self, config, chain, body):
        """Return {group name: affinity key or None} for the chain's groups
        with an affinity (see affinity_key), from the body as the client
        sent it (a dict, or None)."""
        keys = {}
        for name in chain:
            group = config.groups.get(name)
            if group is not None and group.affinity is not None:
                keys[name] = affinity_key(group.affinity, body, self._header)
        return keys

    @staticmethod
    def _model_not_allowed(model):
        return RelayError(403, "This API key may not use the model %s." % (
            printable(json.dumps(model, ensure_ascii=False))[:MAX_LOGGED_MODEL_CHARS]),
            error_type="permission_error", code="model_not_allowed", param="model")

    def _path_is_under_v1(self):
        path = target_path(self.path)[0]
        return path.startswith("/v1/") and path != "/v1/"

    # -- reading the request body -------------------------------------------------

    def _request_body(self, config):
        """Return the request's RequestBodyReader, made on first use, when
        its framing has passed _check_body_length (RelayError if not)."""
        if self._body is None:
            self._body = RequestBodyReader(
                self.rfile, self._check_body_length(config),
                config.max_body_bytes, self.tracked.request_read)
        return self._body

    def _body_unread(self):
        """Return True while a declared request body has not been read whole:
        an answer must then close the connection, or the unread bytes would
        be parsed as the next request."""
        return self._declares_body() and not (
            self._body is not None and self._body.done)

    def _check_body_length(self, config):
        """Return the request body's length in bytes, or None (chunked).

        parse_request has already refused every framing that could be read
        two ways (request_body_length, RFC 9112 §6.1 and §6.3).  Here POST,
        PUT and PATCH need a length (411), and a length over max_body_bytes
        is 413 before any body byte is read.
        """
        length = self._head_body_length  # parse_request refused the rest
        if length is None:
            return None
        if not length and self.command in ("POST", "PUT", "PATCH") and not \
                self._header_values("content-length"):
            raise RelayError(411, "A request body needs Content-Length or "
                                  "chunked Transfer-Encoding.",
                             code="length_required")
        if length > config.max_body_bytes:
            raise RelayError(413, "The request body is %d bytes; the limit is "
                             "max_body_bytes = %d." % (length, config.max_body_bytes),
                             code="request_too_large")
        return length

    # -- local endpoints ----------------------------------------------------------

    def _answer_options(self, config):
        """Answer OPTIONS (CORS preflight included) here; never forwarded."""
        self._drain_body(config)
        headers = [("Allow", CORS_ALLOWED_METHODS)]
        if self._allowed_origin(config) and self._header(
                "access-control-request-method"):
            requested = self._header("access-control-request-headers") or ""
            headers += [
                ("Access-Control-Allow-Methods", CORS_ALLOWED_METHODS),
                ("Access-Control-Allow-Headers", printable(requested)[:1000] or
                 "Authorization, Content-Type"),
                ("Access-Control-Max-Age", "600"),
            ]
        self._send_buffered(204, headers, b"")

    def _drain_body(self, config):
        body = self._request_body(config)
        if not body.done:
            body.read()

    def _serve_health(self, config, route, query):
        self._send_json(200, {"status": "ok"})

    def _serve_readiness(self, config, route, query):
        """Answer GET /health/ready: 200 when every route (see route_chains)
        has an upstream that answers HTTP, else 503 naming the routes without
        one; both name every upstream that is down."""
        results = check_readiness(config, self.server.ready_timeout)
        failing = sorted(name for name, reason in results.items() if reason)
        down = routes_down(route_chains(config), results, config.groups)
        self._send_json(503 if down else 200, {
            "status": "not ready" if down else "ready",
            "upstreams": dict((name, reason or "ok") for name, reason in results.items()),
            "failing": failing, "routes_down": down})

    def _serve_metrics(self, config, route, query):
        """Answer GET /metrics in the Prometheus text format 0.0.4."""
        if not config.metrics:
            raise RelayError(404, "Metrics are turned off (\"metrics\": false).",
                             code="unknown_url")
        self._send_buffered(200, [("Content-Type", "text/plain; version=0.0.4; "
                                   "charset=utf-8")], self.server.metrics.render(
                                       self.server.traffic.upstream_samples()))

    def _serve_models(self, config, route, query):
        """Answer GET /v1/models: the upstreams' lists plus rule aliases, in
        Anthropic's shape for an Anthropic client (anthropic-version)."""
        self._drain_body(config)
        listing = self._merged_model_list(config)
        if self._protocol == PROTOCOL_MESSAGES:
            return self._send_json(200, anthropic_model_page(
                listing, config.created, query))
        self._send_json(200, listing)

    def _merged_model_list(self, config):
        """Return the merged model list (see merge_model_lists) of every
        upstream a rule routes to.  Raises RelayError: the only upstream's
        own answer, or 502 when none answered."""
        upstreams = [config.upstreams[name] for name in routed_upstream_names(
            config, self.server.traffic.is_up)]
        results = fetch_model_lists(self.server.pool, upstreams, lambda upstream:
                                    upstream_headers(self._request_headers(False),
                                                     upstream, config.forward_auth,
                                                     None, self._request_id))
        failures = [result for result in results if isinstance(result, RelayError)]
        if len(results) == 1 and failures:
            raise failures[0]  # the only upstream's own answer, or 502/504
        if len(failures) == len(results):
            raise RelayError(502, "No upstream answered /models: %s" % "; ".join(
                result.message for result in results), code="upstream_unreachable")
        for result in results:
            if not isinstance(result, dict):
                logger.warning("%s models: left out %s", self._request_id,
                               result.message)
        merged = merge_model_lists(
            [result for result in results if isinstance(result, dict)], config)
        if self._api_key is not None and self._api_key.models:
            merged["data"] = [entry for entry in merged["data"] if key_allows_model(
                self._api_key, entry.get("id") if isinstance(entry, dict) else None)]
        return merged

    def _serve_one_model(self, config, route, query):
        """Answer GET /v1/models/{id}: an alias here, other ids upstream.  An
        Anthropic client (anthropic-version) gets the entry of the merged
        list (see _serve_models) in Anthropic's shape, or a 404."""
        model = urllib.parse.unquote(route[len("/models/"):])
        if self._api_key is not None and not key_allows_model(self._api_key, model):
            raise self._model_not_allowed(model)
        if self._protocol == PROTOCOL_MESSAGES:
            return self._serve_one_anthropic_model(config, model)
        if model in config.rule_index.exact and model != "default":
            return self._send_json(200, model_entry(model, config.created))
        return self._forward(config, route, query)

    def _serve_one_anthropic_model(self, config, model):
        self._drain_body(config)
        for entry in self._merged_model_list(config)["data"]:
            if entry.get("id") == model:
                return self._send_json(200, anthropic_model_entry(
                    entry, config.created))
        raise RelayError(404, "Model %r is not served here." % printable(model)[:200],
                         code="model_not_found")

    # -- forwarding ---------------------------------------------------------------

    def _forward(self, config, route, query):
        """Rewrite the body by its model's rule and relay the upstream answer:
        read the body, select the rule and its upstream chain, rewrite, open
        the upstream (along the chain; translated for a chat-only one), relay
        its answer."""
        request = self._read_request_body(config)
        rule, chain = self._select_route(config, request)
        body = self._rewritten(request, rule)
        target_suffix = route + ("?" + query if query else "")
        translated_api = self._translated_api(config, route, chain, request.is_json)
        if translated_api:
            return self._forward_translated(config, translated_api, chain,
                                            target_suffix, body)
        exchange = self._open_upstream(config, chain, target_suffix, body,
                                       request.is_json)
        if route == "/messages/count_tokens" and exchange.response.status in (404, 405):
            return self._answer_token_estimate(exchange, body)
        self._relay_response(exchange)

    def _select_route(self, config, request):
        """Return (rule or None, upstream chain) for a ClientRequest.

        Also what the choice settles for the rest of the request: a named
        key's model allowlist (403 otherwise), the replica affinity keys and
        whether answers report the model the client asked for.
        """
        if self._api_key is not None:
            self._check_model_allowed(request)
        rule = select_rule(config.rule_index, request.model)
        chain = rule.upstreams if rule else (DEFAULT_UPSTREAM_NAME,)
        if config.groups:
            self._affinity = self._affinity_keys(config, chain, request.parsed)
        if isinstance(request.model, str) and self._protocol in MODEL_NAMING_PROTOCOLS and (
                (rule and rule.response_model) or config.response_model) == "asked":
            self._rename_model = request.model
        return rule, chain

    def _answer_token_estimate(self, exchange, body):
        """Answer count_tokens for an upstream without that endpoint (it
        answered 404 or 405) with estimate_input_tokens of the body as sent,
        so that agents do not take the model for broken."""
        response = exchange.response
        complete = False
        try:
            read_response_body(response, exchange.upstream, MAX_BUFFERED_RESPONSE_BYTES)
            complete = True
        except RelayError:
            pass  # its answer is not needed; the connection is just not reused
        finally:
            exchange.release(complete)
        self.log_fields["note"] = "count_tokens estimated (upstream answered %d)" % (
            response.status)
        try:
            sent = json.loads(body.data.decode("utf-8"))
        except ValueError:
            sent = None
        if not isinstance(sent, dict):
            raise RelayError(400, "count_tokens needs a JSON object body.",
                             code="invalid_json")
        self._send_json(200, {"input_tokens": estimate_input_tokens(sent)})

    def _read_request_body(self, config):
        """Read the body; parse it when it is JSON.  Returns a ClientRequest.

        Completions bodies, bodies typed as JSON and untyped or mistyped
        bodies that start with "{" (curl -d sends form encoding) must be JSON
        objects (else 400).  Uploads and binary bodies (multipart/*, audio/*,
        ...) stream through unread; other bodies pass as they are.
        """
        content_type = self._header("content-type")
        reader = self._request_body(config)
        must_be_json = self.command == "POST" and target_path(
            self.path)[0].rstrip("/").split("/")[-1] in (
                "completions", "messages", "responses", "count_tokens")
        if not must_be_json and reader.length != 0 and is_streamed_body_type(
                content_type):
            return ClientRequest(RequestBody(blocks=reader.blocks(),
                                             length=reader.length))
        raw_body = reader.read()
        if not must_be_json and not is_json_type(content_type) and not (
                may_be_untyped_json(content_type) and raw_body.lstrip()[:1] == b"{"):
            return ClientRequest(RequestBody(raw_body))
        parsed = parse_json_body(raw_body)
        self.log_fields["stream"] = parsed.get("stream") is True
        # The metrics of this request count it under the model it asked for.
        self._model_asked = parsed.get("model")
        return ClientRequest(RequestBody(raw_body), parsed, self._model_asked)

    def _rewritten(self, request, rule):
        """Return the RequestBody to send: a JSON body rewritten by rule (see
        rewrite_body), others as they came.  Logs the model asked -> sent."""
        if request.parsed is None:
            return request.body
        # Keep one copy of a large body alive at a time: the client's bytes
        # only when they are sent as they are, the parsed body only until it
        # is serialized.
        raw_body = request.body.data if rule is None else None
        parsed, request.parsed, request.body = request.parsed, None, None
        data, model_sent = rewrite_body(raw_body, parsed, rule)
        parsed = raw_body = None
        if request.model is not None or model_sent is not None:
            self.log_fields["model"] = format_model_change(request.model, model_sent)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s body sent (%s): %s", self._request_id,
                         rule.path if rule else "no rule",
                         redact_for_log(json.loads(data.decode("utf-8"))))
        return RequestBody(data)

    def _open_upstream(self, config, chain, target_suffix, body, is_json,
                       variant=None):
        """Send the request along a fallback chain of upstream and replica
        group names.

        The next step is tried when an upstream refuses, times out before its
        response headers, answers 5xx/429 or is busy (max_concurrent), and
        only while the request body can be sent again.  A group is one step:
        the chain moves on when every member tried for this request failed
        (members are chosen with the keys of _affinity).  is_json: the body
        was parsed as JSON.  variant(upstream), if given, returns the (target
        suffix, RequestBody) for that upstream.  Returns the UpstreamExchange
        of the answer.
        """
        tried = []
        request = (target_suffix, body, is_json, variant)
        for position, name in enumerate(chain):
            last = position == len(chain) - 1
            group = config.groups.get(name) if config.groups else None
            if group is None:
                exchange = self._open_one(config, config.upstreams[name], tried,
                                          request, last)
            else:
                exchange = self._open_group(config, group, tried, request, last)
            if exchange is not None:
                return exchange
        raise AssertionError("empty upstream chain")  # validate_config forbids

    def _open_one(self, config, upstream, tried, request, last):
        """One upstream as a step of the chain; see _try_upstream."""
        if upstream.max_concurrent is not None:
            if not self.server.traffic.acquire(upstream, self._client_left):
                return self._upstream_busy(upstream, upstream.name, tried, not last)
            self._slot = upstream.name
        return self._try_upstream(config, upstream, upstream.name, tried,
                                  request, not last)

    def _open_group(self, config, group, tried, request, last):
        """A replica group as a step of the chain: members chosen by
        Traffic.choose, one after another, until one answers."""
        traffic, members_tried = self.server.traffic, []
        key = (self._affinity or {}).get(group.name)
        while True:
            member, took_slot = traffic.choose(group, config.upstreams, key,
                                               members_tried, self._client_left)
            if member is None:
                break
            members_tried.append(member)
            upstream, label = config.upstreams[member], group.name + "/" + member
            may_move_on = not last or traffic.has_candidate(group, members_tried)
            if not took_slot:
                self._upstream_busy(upstream, label, tried, may_move_on)
                continue
            self._slot = member
            exchange = self._try_upstream(config, upstream, label, tried,
                                          request, may_move_on, group)
            if exchange is not None:
                return exchange
        if last:
            raise RelayError(502, "Every replica of %s failed or is out for a "
                             "cool-down." % group.name, code="upstream_unreachable")
        return None

    def _client_left(self):
        """Return True when the client has closed its connection (asked
        while the request waits in an upstream's queue).  Polled first, so
        that the peek never blocks where MSG_DONTWAIT does not exist."""
        return is_readable(self.connection) and is_peer_closed(self.connection)

    def _upstream_busy(self, upstream, label, tried, may_move_on):
        """A step whose upstream had no free slot: raise 429, or return None
        to move on."""
        tried.append(label + "(busy)")
        self.log_fields["upstream"] = ">".join(tried)
        self._count_upstream_failure(upstream, "busy")
        error = upstream_busy_error(upstream)
        if not may_move_on:
            raise error
        logger.warning("%s %s", self._request_id, error.message)
        return None

    def _try_upstream(self, config, upstream, label, tried, request, may_move_on,
                      group=None):
        """Send the request to one upstream (a slot is held if needed).

        request is (target suffix, RequestBody, is_json, variant); see
        _open_upstream.  Returns the UpstreamExchange, or None when it failed
        and the request may move on (may_move_on, and the body can be sent
        again); else raises the failure or returns the failed answer.
        """
        if upstream.max_concurrent is not None and is_peer_closed(self.connection):
            # It may have waited in the queue: do not make the upstream
            # generate an answer for a client that has gone.
            self._release_slot()
            raise ClientDisconnected()
        target_suffix, body, is_json, variant = request
        if variant is not None:
            target_suffix, body = variant(upstream)
        tried.append(label)
        self.log_fields["upstream"] = ">".join(tried)
        declared_length = body.length if (
            body.length or self.command in ("POST", "PUT", "PATCH")) else None
        headers = upstream_headers(self._request_headers(is_json), upstream,
                                   config.forward_auth, declared_length,
                                   self._request_id, chunked=body.chunked)
        try:
            response, connection, sock = self._send_watched(
                upstream, target_suffix, headers, body)
        except RelayError as error:
            self._count_upstream_failure(upstream, error.kind)
            self._release_slot()
            if group is not None:
                self._note_health(group, upstream, False)
            if not may_move_on or not error.retryable or not body.replayable:
                raise
            logger.warning("%s upstream %s failed, trying the next: %s",
                           self._request_id, label, error.message)
            return None
        logger.debug("%s upstream %s answered %d", self._request_id, label,
                     response.status)
        if response.status >= 500:
            self._count_upstream_failure(upstream, "5xx")
        if group is not None:
            self._note_health(group, upstream, response.status < 500)
        if may_move_on and body.replayable and (
                response.status >= 500 or response.status == 429):
            logger.warning("%s upstream %s answered %d, trying the next",
                           self._request_id, label, response.status)
            connection.close()
            response.close()
            self._release_slot()
            return None
        return UpstreamExchange(self.server.pool, upstream, response,
                                connection, sock, self._upstream_released)

    def _upstream_released(self, sock):
        """UpstreamExchange's on_release: stop watching the upstream socket
        and give back the slot and the key's count (the last bytes to the
        client are about to leave)."""
        self.tracked.watch(sock)
        self._release_holds()

    def _note_health(self, group, upstream, answered):
        """Tell Traffic how a group member did; log an ejection."""
        if answered:
            return self.server.traffic.succeeded(upstream.name)
        cooldown = self.server.traffic.failed(group, upstream.name)
        if cooldown is not None:
            logger.warning("replica %s of %s is out for %g s after failing",
                           upstream.name, group.name, cooldown)

    def _release_slot(self):
        if self._slot is not None:
            self.server.traffic.release(self._slot)
            self._slot = None

    def _release_holds(self):
        """Give back the upstream slot and the key's in-flight count before
        the last bytes of the response leave: a client that sends its next
        request at once must not find its own previous one still counted."""
        if self._slot is not None:
            self._release_slot()
        if self._key_admitted:
            self._key_admitted = False
            self.server.traffic.release_key(self._api_key)

    def _request_headers(self, is_json):
        """Return the client's headers as (name, value) pairs; a body parsed
        as JSON (is_json) is labelled application/json whatever the client
        said."""
        headers = self._header_list()
        if is_json and not is_json_type(
                self._header("content-type")):
            headers = [(name, value) for name, value in headers
                       if name.lower() != "content-type"]
            headers.append(("Content-Type", "application/json"))
        return headers

    def _count_upstream_failure(self, upstream, kind):
        if kind is not None:
            self.server.metrics.upstream_error(upstream.name, kind)

    def _send_watched(self, upstream, target_suffix, headers, body):
        """Send upstream while the housekeeping thread watches the client from
        the moment the upstream connection is there."""
        try:
            return send_upstream_request(
                self.server.pool, upstream, self.command,
                upstream.base_path + target_suffix, headers, body,
                on_connected=self.tracked.watch,
                may_retry=lambda: not (self.tracked.client_gone or self.tracked.aborted))
        except RelayError:
            if self.tracked.client_gone:
                raise ClientDisconnected()
            raise

    # -- translating onto chat completions -----------------------------------------

    def _translated_api(self, config, route, chain, is_json):
        """Return "messages" or "responses" when this request may have to be
        translated for some upstream of its chain, else None (the fast path:
        one dict lookup for every other request)."""
        api = TRANSLATED_ROUTES.get(route)
        if api is None or self.command != "POST" or not is_json:
            return None
        if route == "/messages/count_tokens":
            # Answered here when the first upstream has no counter.
            first = chain_upstreams(config, chain[:1])[0]
            return api if translates_to_chat(first, api) else None
        if any(translates_to_chat(upstream, api)
               for upstream in chain_upstreams(config, chain)):
            return api
        return None

    def _forward_translated(self, config, api, chain, target_suffix, body):
        """Send a Messages or Responses request along its chain: as it is to
        upstreams that speak its API, translated onto chat completions to
        those that speak only chat; answer in the client's protocol."""
        client_body = json.loads(body.data.decode("utf-8"))
        if target_suffix.startswith("/messages/count_tokens"):
            self.log_fields["note"] = "count_tokens estimated (chat-only upstream)"
            return self._send_json(200, {"input_tokens": estimate_input_tokens(
                client_body)})
        translation = {}

        def variant(upstream):
            if not translates_to_chat(upstream, api):
                return target_suffix, body
            if not translation:
                translation.update(self._translate_request(api, client_body))
            return "/chat/completions", translation["body"]
        if client_body.get("stream") is True and all(
                translates_to_chat(upstream, api)
                for upstream in chain_upstreams(config, chain)):
            # Every answer will be translated, so the client's stream may
            # start (and ping) before an upstream has sent its head: llama.cpp
            # and Ollama send it with the first token, after the prefill.
            self.log_fields["translated"] = api + ">chat"
            exchange, stream = self._open_upstream_pinging(
                config, api, chain, target_suffix, body, variant, translation)
            if exchange is None:
                return None  # failed after the stream started; it has ended
        else:
            stream = None
            exchange = self._open_upstream(config, chain, target_suffix, body, True,
                                           variant)
        if not translates_to_chat(exchange.upstream, api):
            return self._relay_response(exchange)
        self.log_fields["translated"] = api + ">chat"
        try:
            self._relay_translated(api, translation, exchange, stream)
        finally:
            if not exchange.released:
                shutdown_socket(exchange.sock)  # wakes the line pump, if one waits
                exchange.release(complete=False)

    def _relay_translated(self, api, translation, exchange, stream):
        """Answer with the translation of a chat completions answer: an error
        as it came (in Anthropic's shape on /v1/messages), a stream event by
        event, a whole answer whole.  stream is the (writer, translator) of
        a client stream already started, or None."""
        response = exchange.response
        if stream is None or (response.status == 200 and is_event_stream(
                response.getheader("Content-Type"))):
            # A translated stream ends itself with its failure event.
            return self._relay_translated_answer(api, translation, exchange, stream)
        try:
            return self._relay_translated_answer(api, translation, exchange, stream)
        except RelayError as error:
            # The client's stream started with the pings: a whole answer
            # that cannot be read or understood can only end it with the
            # failure event now (already counted, hence no upstream).
            return self._fail_translated_stream(None, stream, error)

    def _relay_translated_answer(self, api, translation, exchange, stream):
        upstream, response = exchange.upstream, exchange.response
        if response.status != 200:
            data = self._read_upstream_body(upstream, response)
            exchange.release(complete=True)
            if stream is not None:
                return self._fail_translated_stream(upstream, stream, RelayError(
                    response.status, "upstream %s answered %d: %s" % (
                        upstream.name, response.status,
                        upstream_error_message(data, response.status))))
            return self._send_translated_error(api, response, data)
        if is_event_stream(response.getheader("Content-Type")):
            if stream is None:
                stream = self._start_translated_stream(api, translation, [
                    (name, value) for name, value in self._client_headers(
                        list(response.getheaders())) if name.lower() not in (
                            "content-type", "cache-control")])
            complete = self._relay_translated_stream(api, upstream, response, stream,
                                                     exchange.sock)
            return exchange.release(complete)
        data = self._read_upstream_body(upstream, response)
        exchange.release(complete=True)
        self._send_translated_answer(api, upstream, translation, data, stream)

    def _open_upstream_pinging(self, config, api, chain, target_suffix, body,
                               variant, translation):
        """Open the upstream (see _open_upstream) in a helper thread; when no
        answer has come within TRANSLATED_PING_SECONDS, start the client's
        stream and ping it until one comes.  Returns (exchange, stream):
        stream is the (writer, translator) started, or None; exchange is None
        when the upstream failed after the stream started (the stream has
        ended with the failure event).  Failures before that are raised."""
        answers = queue.Queue()
        abandoned = []
        lock = threading.Lock()

        def open_exchange():
            try:
                answer = self._open_upstream(config, chain, target_suffix, body, True,
                                             variant)
            except Exception as error:
                answer = error
            with lock:
                if not abandoned:
                    return answers.put(answer)
            if isinstance(answer, UpstreamExchange):  # the client has gone
                shutdown_socket(answer.sock)
                answer.release(complete=False)
        opener = threading.Thread(target=open_exchange, name="llm-relay-open")
        opener.daemon = True
        opener.start()
        stream = None
        try:
            while True:
                try:
                    answer = answers.get(timeout=TRANSLATED_PING_SECONDS)
                    break
                except queue.Empty:
                    if not translation:
                        continue  # not sent yet (cannot take long)
                    if stream is None:
                        stream = self._start_translated_stream(api, translation, [])
                    stream[0].write(stream[1].ping())
        except BaseException:
            with lock:
                abandoned.append(True)
                answer = None if answers.empty() else answers.get_nowait()
            if isinstance(answer, UpstreamExchange):
                shutdown_socket(answer.sock)
                answer.release(complete=False)
            raise
        if not isinstance(answer, Exception):
            return answer, stream
        if stream is None or not isinstance(answer, RelayError):
            raise answer
        self._fail_translated_stream(None, stream, answer)
        return None, stream

    def _start_translated_stream(self, api, translation, headers):
        """Send the head of a translated stream and its first event
        (message_start, or response.created); return (writer, translator)."""
        translator = self._stream_translator(api, translation)
        self.log_fields["stream"] = True
        writer = self._start_streamed_response(200, headers + [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")])
        writer.write(translator.start())
        return writer, translator

    def _translate_request(self, api, client_body):
        """Translate the (rewritten) client body; returns a dict with the
        client body, the TranslatedRequest and the RequestBody to send.
        Dropped features are logged in one line."""
        translate = (messages_to_chat_request if api == "messages"
                     else responses_to_chat_request)
        translated = translate(client_body)
        if translated.notes:
            logger.info("%s %s>chat dropped: %s", self._request_id, api,
                        printable("; ".join(translated.notes))[:1000])
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s body translated: %s", self._request_id,
                         redact_for_log(translated.body))
        return {"client": client_body, "request": translated,
                "body": RequestBody(serialize_json(translated.body))}

    def _stream_translator(self, api, translation):
        """Return the stream translator for api; the model it reports is the
        one asked for with response_model "asked", else the upstream's."""
        request, client = translation["request"], translation["client"]
        model = self._rename_model or request.body.get("model")
        if api == "messages":
            return MessagesStreamTranslator(model, request.stop_sequences)
        return ResponsesStreamTranslator(model, client, request.custom_tools,
                                         fixed_model=self._rename_model is not None)

    def _send_translated_error(self, api, response, data):
        """Relay an upstream's error answer in the client's error shape (the
        SDKs and agents read the message from there)."""
        headers = [(name, value) for name, value in self._client_headers(
            list(response.getheaders())) if name.lower() != "content-type"]
        self._send_buffered(response.status, headers + [
            ("Content-Type", "application/json")],
            translated_error_body(api, data, response.status))

    def _send_translated_answer(self, api, upstream, translation, data,
                                stream=None):
        """Translate a whole chat completion (sent as a stream when the
        client asked for one and the upstream answered whole; stream is the
        (writer, translator) of one already started)."""
        try:
            chat = json.loads(data.decode("utf-8"))
            if not isinstance(chat, dict):
                raise ValueError("not an object")
        except ValueError:
            self._count_upstream_failure(upstream, "invalid")
            raise RelayError(502, "upstream %s answered chat completions with "
                             "invalid JSON." % upstream.name, code="upstream_error")
        self._count_translated_usage(api, chat.get("usage"))
        request, client = translation["request"], translation["client"]
        if client.get("stream") is True:
            writer, translator = stream or self._start_translated_stream(
                api, translation, [])
            writer.write(translator.feed_chunk(chat_message_as_chunk(chat)) +
                         translator.finish())
            return writer.finish()
        model = request.body.get("model")
        if api == "messages":
            answer = chat_to_messages_response(chat, model, request.stop_sequences)
        else:
            answer = chat_to_responses_response(chat, model, client,
                                                request.custom_tools)
        if self._rename_model is not None:
            answer["model"] = self._rename_model  # response_model "asked"
        self._send_json(200, answer)

    def _relay_translated_stream(self, api, upstream, response, stream, sock):
        """Translate a chat completions stream event by event into the
        started stream (writer, translator); send a ping after
        TRANSLATED_PING_SECONDS of upstream silence (a CPU box can think for
        minutes).  Returns True when the upstream ended its body normally
        (its connection can be reused).  However it ends, the thread that
        reads the lines has stopped reading the response when it returns."""
        lines = queue.Queue()
        pump = threading.Thread(target=pump_lines, args=(response, lines),
                                name="llm-relay-stream")
        pump.daemon = True
        pump.start()
        complete = False
        try:
            complete = self._translate_lines(api, upstream, stream, lines)
            return complete
        finally:
            # The caller closes the response next: a read in another thread
            # racing that close can crash CPython 3.6.  Unless the body
            # ended, the socket is shut, which ends the read at once.
            if not complete:
                shutdown_socket(sock)
            pump.join(ABORT_WAIT_SECONDS)

    def _translate_lines(self, api, upstream, stream, lines):
        """The loop of _relay_translated_stream over the queue of lines."""
        writer, translator = stream
        while not translator.done:
            try:
                line = lines.get(timeout=TRANSLATED_PING_SECONDS)
            except queue.Empty:
                writer.write(translator.ping())
                continue
            if self.tracked.client_gone:
                raise ClientDisconnected()
            if line is None:
                break
            try:
                if isinstance(line, Exception):
                    raise line
                events = translator.feed_line(line)
            except Exception as error:
                return self._fail_translated_stream(upstream, stream, error)
            if events:
                writer.write(events)
        writer.write(translator.finish())
        writer.finish()
        self._count_translated_usage(api, translator.reader.usage)
        return line is None or self._wait_for_body_end(lines)

    def _count_translated_usage(self, api, chat_usage):
        """Count an upstream's chat usage as the tokens of the client's
        protocol (input and output, as for a native upstream)."""
        if self.server.config.metrics and isinstance(chat_usage, dict):
            if api == "messages":
                self.server.metrics.add_usage(self._model_asked, anthropic_usage(
                    chat_usage), PROTOCOL_MESSAGES, self._key_name())
            else:
                self.server.metrics.add_usage(self._model_asked, responses_usage(
                    chat_usage), PROTOCOL_RESPONSES, self._key_name())

    @staticmethod
    def _wait_for_body_end(lines):
        """After data: [DONE], give the upstream DONE_TAIL_SECONDS to end
        its body; True when it did (and sent nothing more)."""
        try:
            return lines.get(timeout=DONE_TAIL_SECONDS) is None
        except queue.Empty:
            return False

    def _fail_translated_stream(self, upstream, stream, error):
        """End a started translated stream (writer, translator) with the
        protocol's failure event (Anthropic's error event, or
        response.failed) for error, an exception (a RelayError already
        counted when upstream is None); returns False."""
        if self.tracked.client_gone:
            raise ClientDisconnected()
        writer, translator = stream
        if self.tracked.aborted:
            failure = RelayError(503, "The relay is shutting down; the stream was "
                                 "cut.", code="shutting_down")
        elif isinstance(error, RelayError):
            failure = error
        else:
            failure = translated_stream_failure(upstream, error)
        self.log_fields["error"] = failure.message
        if upstream is not None:
            self._count_upstream_failure(upstream, failure.kind)
        logger.warning("%s stream ended early: %s", self._request_id, failure.message)
        writer.write(translator.fail(failure.message, failure.status))
        writer.finish()
        return False

    # -- relaying the response ----------------------------------------------------

    def _relay_response(self, exchange):
        """Relay an upstream answer: SSE line by line, others buffered or
        streamed in blocks.

        Each branch releases the upstream connection (pooled when complete)
        just before its last write to the client, so the client's next
        request finds it in the pool; when a branch fails, the finally
        closes it instead.
        """
        response = exchange.response
        try:
            headers = self._client_headers(list(response.getheaders()))
            content_type = response.getheader("Content-Type")
            if self.command == "HEAD" or response.status in (204, 304):
                self._relay_bodiless(exchange, headers)
            elif is_event_stream(content_type):
                self.log_fields["stream"] = True
                self._relay_stream(exchange, headers)
            elif (response.length is not None and response.length >
                  MAX_BUFFERED_RESPONSE_BYTES) or (
                      response.length is None and not is_json_type(content_type)):
                self._relay_passthrough(exchange, headers)
            else:
                self._relay_buffered(exchange, headers)
        finally:
            exchange.release(complete=False)

    def _client_headers(self, response_headers):
        """Return the upstream headers to relay (see client_headers) and note
        the upstream's own request id: the client gets it in X-Request-Id,
        and the access line carries it beside the relay's."""
        self._upstream_request_id = upstream_request_id(response_headers)
        if self._upstream_request_id not in (None, self._request_id):
            self.log_fields["upstream_id"] = self._upstream_request_id
        return client_headers(response_headers)

    def _relay_buffered(self, exchange, headers):
        """Read a whole upstream answer, then send it with its length; count
        the tokens of its usage.  With response_model "asked", a 200 answer
        reports the model asked for."""
        response = exchange.response
        data = self._read_upstream_body(exchange.upstream, response)
        if len(data) > MAX_BUFFERED_RESPONSE_BYTES:
            # A chunked answer too large to buffer streams through like one
            # with a large Content-Length.
            return self._relay_passthrough(exchange, headers, data)
        exchange.release(complete=True)
        status = response.status
        if status == 200 and self._rename_model is not None:
            data = rename_model_in_body(data, self._rename_model)
        self._send_buffered(status, headers, data)
        if status == 200 and self.server.config.metrics:
            self.server.metrics.add_usage(self._model_asked, usage_from_json(
                data, self._protocol), self._protocol, self._key_name())

    def _read_upstream_body(self, upstream, response):
        """Read an upstream body for a buffered answer, counting a failure
        in the metrics.  Returns bytes: the whole body, or its first part
        when it is longer than MAX_BUFFERED_RESPONSE_BYTES."""
        try:
            return response.body_reader.read_to_end(MAX_BUFFERED_RESPONSE_BYTES)
        except Exception as error:
            failure = upstream_failure(upstream, error, "body")
            self._count_upstream_failure(upstream, failure.kind)
            raise failure

    def _relay_bodiless(self, exchange, headers):
        """Relay a response that has no body (HEAD, 204, 304): the head only,
        with the upstream's Content-Length for HEAD (RFC 9110 §9.3.2)."""
        response = exchange.response
        exchange.release(complete=True)
        if self.command == "HEAD" and response.getheader("Content-Length"):
            headers = headers + [("Content-Length",
                                  response.getheader("Content-Length").strip())]
        self._send_head(response.status, headers)
        self.wfile.flush()

    def _relay_stream(self, exchange, headers):
        """Relay SSE lines as they arrive: every complete line the upstream
        has sent leaves at once, those that arrived together in one write.

        data: [DONE] ends the client's response; the upstream's connection
        is pooled first if its body ends within DONE_TAIL_SECONDS.  An upstream
        failure after the status line ends the stream with a final SSE error
        event (the status cannot change any more).  The lines go through
        the server's StreamPump when both sides are plain TCP, else through
        this thread.
        """
        response = exchange.response
        if not any(name.lower() == "cache-control" for name, _ in headers):
            # No intermediary may cache or hold back a stream.
            headers = headers + [("Cache-Control", "no-cache")]
        writer = self._start_streamed_response(response.status, headers + [
            ("X-Accel-Buffering", "no")])
        # A Responses stream is watched even without metrics: its response
        # object goes into the relay's own response.failed event.
        watch = self._stream_watch = StreamWatch(self._protocol) if (
            self.server.config.metrics or self._protocol == PROTOCOL_RESPONSES) else None
        forward = SseForwarder(writer.chunked, watch=watch, rename=(
            model_renamer(self._rename_model) if self._rename_model is not None
            else None))
        try:
            if can_pump(exchange.sock, response, self.connection):
                self._pump_stream(exchange, forward, writer)
            else:
                self._relay_stream_here(exchange, forward, writer)
        finally:
            if watch is not None and watch.usage and self.server.config.metrics:
                self.server.metrics.add_usage(self._model_asked, watch.usage,
                                              self._protocol, self._key_name())

    def _pump_stream(self, exchange, forward, writer):
        """Relay the stream in the server's StreamPump (see there), then end
        the response here as _relay_stream_here does."""
        response = exchange.response
        held = source_holds(response.fp)
        stream = self.server.stream_pump.relay(PumpedStream(
            exchange.sock, self.connection, response.body_reader,
            response.fp.read(held) if held else b"", forward, self.tracked,
            exchange.upstream.read_timeout, self.server.config.client_timeout))
        if self.tracked.client_gone:
            raise ClientDisconnected()
        if stream.failure is not None:
            raise stream.failure  # unexpected: as if raised in this thread
        if stream.client_error is not None:
            raise stream.client_error
        if stream.upstream_error is not None:
            return self._end_stream_with_error(
                exchange.upstream, stream.upstream_error,
                last_line_of(forward.last_run), writer)
        if forward.done and not stream.tail_complete:
            self.log_fields["note"] = "upstream did not end its body after [DONE]"
        exchange.release(stream.tail_complete)
        writer.finish()

    def _relay_stream_here(self, exchange, forward, writer):
        """Relay the stream in this thread: TLS on either side, Windows."""
        runs = iter_upstream_batches(exchange.response, MAX_SSE_LINE_BYTES)
        tracked, send = self.tracked, writer.send
        while True:
            try:
                run = next(runs, None)
            except Exception as error:
                return self._end_stream_with_error(
                    exchange.upstream, error, last_line_of(forward.last_run), writer)
            if tracked.client_gone:
                raise ClientDisconnected()  # also at a close-delimited end
            if run is None:
                break
            send(forward.take(run))
            if forward.done:
                # Pool before the last client write: an upstream ends its
                # body right after [DONE], and a client that sends its
                # next request on seeing the end must find the connection
                # idle.  One that keeps the stream open delays the end by
                # DONE_TAIL_SECONDS at most, and is closed.
                exchange.release(self._read_tail_after_done(
                    itertools.chain((forward.rest,), runs), exchange.sock))
                writer.finish()
                return
        exchange.release(complete=True)
        writer.finish()

    def _read_tail_after_done(self, lines, sock):
        """After data: [DONE] (sent; the client's response not yet ended),
        wait up to DONE_TAIL_SECONDS for the upstream to end its body; return
        True when it did, so its connection can be reused.  An upstream that keeps the
        stream open, or sends more than blank lines, is cut (closed)."""
        try:
            sock.settimeout(DONE_TAIL_SECONDS)  # the pool restores read_timeout
            for line in lines:
                if line.strip(b"\r\n"):
                    break
            else:
                return True
        except Exception:
            pass
        self.log_fields["note"] = "upstream did not end its body after [DONE]"
        return False

    def _end_stream_with_error(self, upstream, error, last_line, writer):
        """End a started SSE stream that the upstream cut: the status has
        gone out, so the client gets a final SSE error event (after a blank
        line if the last line did not end an event) and the end of the
        chunked body (Go's ReverseProxy does the same).  The failure is
        logged and counted.
        """
        if self.tracked.client_gone:
            raise ClientDisconnected()
        if self.tracked.aborted:
            failure = RelayError(503, "The relay is shutting down; the stream was "
                                 "cut.", code="shutting_down")
        else:
            failure = upstream_failure(upstream, error, "stream")
        self.log_fields["error"] = failure.message
        self._count_upstream_failure(upstream, failure.kind)
        logger.warning("%s stream ended early: %s", self._request_id, failure.message)
        writer.write(event_boundary(last_line) + stream_failure_event(
            self._protocol, failure.status, failure.message, failure.error_type,
            failure.code, response=getattr(self._stream_watch, "response", None)))
        writer.finish()

    def _relay_passthrough(self, exchange, headers, first=b""):
        """Stream a large or unknown-length body through in blocks; first
        holds bytes of it already read."""
        upstream, response = exchange.upstream, exchange.response
        if response.length is not None:
            self._send_head(response.status, headers + [
                ("Content-Length", str(response.length))])
            self.wfile.flush()  # the body goes straight to the socket
            writer = ClientBodyWriter(self.connection.sendall, False, self.tracked)
        else:
            writer = self._start_streamed_response(response.status, headers)
        reader = response.body_reader
        block = first
        while True:
            if block:
                writer.write(block)
            try:
                block = reader.read(COPY_BLOCK_BYTES)
            except Exception as error:
                if self.tracked.client_gone:
                    raise ClientDisconnected()
                return self._cut_passthrough(upstream, error)
            if not block:
                break
        if self.tracked.client_gone:
            raise ClientDisconnected()
        exchange.release(complete=True)
        writer.finish()

    def _cut_passthrough(self, upstream, error):
        """End a body the upstream cut short: the client sees a short body,
        as the connection closes; the cause is logged and counted."""
        failure = upstream_failure(upstream, error, "body")
        self.log_fields["error"] = failure.message
        self._count_upstream_failure(upstream, failure.kind)
        self.close_connection = True

    # -- writing to the client ------------------------------------------------------

    def version_string(self):
        return self.server_version

    def date_time_string(self, timestamp=None):
        if timestamp is None:
            return self.http_date.value()
        return format_http_date(timestamp)

    def _send_head(self, status, headers):
        """Send the status line and headers (not flushed): Server, Date,
        headers plus the request id, CORS headers and, when this connection
        cannot carry another request (draining, closing, or a request body
        left unread), Connection: close.

        The head is formatted and written in one piece (encode_response_head),
        as http.server's send_response, send_header and end_headers would
        write it line by line.
        """
        self._request_id = self._request_id or new_request_id()
        fields = [("Server", self.version_string()),
                  ("Date", self.date_time_string())]
        fields.extend(headers)
        fields.append(("X-Request-Id", self._upstream_request_id or self._request_id))
        fields.extend(self._cors_headers())
        if self.server.draining or self.close_connection or self._body_unread():
            # An unread request body would be parsed as the next request.
            fields.append(("Connection", "close"))
            self.close_connection = True
        self._status = status
        self.wfile.write(encode_response_head(
            self.protocol_version, status, self.responses.get(status, ("",))[0],
            fields))
        self._headers_sent = True

    def _send_buffered(self, status, headers, body):
        """Send a complete response with Content-Length (RFC 9112 §6.3)."""
        self._release_holds()
        if status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            headers = headers + [("Content-Length", str(len(body)))]
        self._send_head(status, headers)
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status, value, headers=()):
        self._send_buffered(status, [("Content-Type", "application/json")] +
                            list(headers), serialize_json(value))

    def _start_streamed_response(self, status, headers):
        """Send the head of a response whose body follows in pieces; return
        its ClientBodyWriter: chunked for HTTP/1.1 clients, close-delimited
        for HTTP/1.0 ones."""
        chunked = self.request_version >= "HTTP/1.1"
        if chunked:
            headers = headers + [("Transfer-Encoding", "chunked")]
        else:
            self.close_connection = True  # the end of the body is the close
        self._send_head(status, headers)
        self.wfile.flush()
        return ClientBodyWriter(self.connection.sendall, chunked, self.tracked)

    def _allowed_origin(self, config):
        origin = self._header("origin")
        if origin and ("*" in config.cors_origins or origin in config.cors_origins):
            return origin
        return None

    def _cors_headers(self):
        if not self.server.config.cors_origins:
            return []
        origin = self._allowed_origin(self.server.config)
        if not origin:
            return []
        return [("Access-Control-Allow-Origin", printable(origin)),
                ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", "X-Request-Id")]

    # -- errors and logging -----------------------------------------------------------

    def _send_relay_error(self, error):
        """Answer a RelayError in the request protocol's error shape (see
        error_body), or end a started stream."""
        if self.tracked.aborted:
            error = RelayError(503, "The relay is shutting down.",
                               code="shutting_down")
        self.log_fields.setdefault("error", error.message)
        if self._headers_sent:
            self.close_connection = True
            return
        if self._body_unread():
            self.close_connection = True  # unread body bytes would be parsed
        headers = list(error.headers)
        self._send_json(error.status, error_body(
            self._protocol, error.status, error.message, error.error_type,
            error.code, error.param), headers)

    def _declares_body(self):
        return self._head_body_length != 0

    def send_error(self, code, message=None, explain=None):
        """Answer http.server's own errors (bad request line, long headers,
        unknown method) as JSON in the protocol's shape (see error_body) once
        the request line named a path, not HTML."""
        self.close_connection = True
        if self._protocol == PROTOCOL_OTHER and self.path:
            self._protocol = target_protocol(self.path)
        phrase = message or self.responses.get(code, ("Error",))[0]
        self._send_relay_error(RelayError(code, phrase, code=None))
        if not self._in_dispatch:
            self._log_access()

    def _record_disconnect(self, cause):
        self.close_connection = True
        self.log_fields["error"] = (
            "closed by the relay's shutdown" if self.tracked.aborted else cause)
        self._status = self._status if self._headers_sent else 499

    def log_request(self, code="-", size="-"):
        pass  # one access line per request comes from _log_access

    def log_message(self, format, *args):
        logger.debug("%s %s", self.client_address[0], mask_secrets(
            printable(format % args)))

    def _log_access(self):
        """Write the request's one access line (see AccessLog)."""
        access = collections.OrderedDict((
            ("client", self.client_address[0]),
            ("method", getattr(self, "command", None) or "-"),
            ("path", loggable_target(self.path or "-")),
            ("status", self._status),
            ("duration_ms", round((time.monotonic() - self._started) * 1000.0, 1))))
        access.update(self.log_fields)
        access["id"] = self._request_id
        self.server.access_log.write(access)


###############################################################################
# Server ######################################################################
###############################################################################

# Connection tracking: why, and the state of each client connection.
#
# Socket timeouts count per operation, so a client that sends one byte every
# few seconds never trips them (pitfall 8), and a thread blocked reading the
# upstream cannot notice that its client has left.  Both jobs fall to one
# housekeeping thread (RelayServer._housekeeping, every
# HOUSEKEEPING_INTERVAL_SECONDS), which learns from each handler thread
# through that connection's TrackedConnection:
#
#   idle --request line--> reading --whole request read--> busy --answered--+
#    ^   (client_timeout)           (client_timeout)    (watch(upstream))   |
#    +----------------------------------------------------------------------+
#
# - idle: handle_one_request calls wait_for_request() before each request;
#   it returns False while the server drains, and the connection closes.
# - reading: parse_request calls request_started(); the head and the body
#   must arrive within client_timeout, else housekeeping shuts the socket.
# - busy: request_read() comes from _route_request for a request without a
#   body, else from the RequestBodyReader when the last body byte arrived
#   (for a streamed upload that is inside http.client's send).
# - While busy, watch(upstream socket) is set by send_upstream_request's
#   on_connected and cleared (watch(None)) when the upstream is released and
#   at the end of _serve_request.  If the client hangs up meanwhile,
#   housekeeping sets client_gone and shuts the upstream socket, so the
#   upstream stops generating; the end of a drain's grace sets aborted.  The
#   handler checks both flags before it writes to the client.
#
# The transitions take no lock, but for one: a request passed through five
# of them, and the server's lock in each was five acquisitions per request
# for nothing (none was ever contended).  One attribute write is atomic
# under the interpreter lock, and every thread sees writes in the order
# they were made; that order keeps the other threads' reads right:
# - A new deadline is written before the phase it belongs to, so
#   housekeeping (which reads the phase first) never sees an idle or
#   reading connection with the deadline of its previous request.
# - wait_for_request marks the connection idle before it looks at draining;
#   drain sets draining before it looks for idle connections.  So one of
#   them always sees the other: the handler stops, or drain shuts the idle
#   socket's reading side, or both.
# - watch(None) takes the connection's own lock, as client_left does: once
#   it has returned, housekeeping can no longer shut down that upstream
#   socket, which may go back to the pool for another request.

PHASE_IDLE, PHASE_READING, PHASE_BUSY = "idle", "reading", "busy"


class TrackedConnection(object):
    """What the server knows of one client connection (see the comment
    above for who writes what, and in which order).

    phase is idle, reading or busy (see the diagram above) and deadline the
    monotonic time by which an idle or reading client must have sent its
    request; upstream_sock is the upstream socket while a response is
    pending; client_gone is set when the client disconnects and aborted when
    a shutdown cuts the request.
    """

    __slots__ = ("sock", "phase", "deadline", "upstream_sock", "client_gone",
                 "aborted", "_server", "_lock")

    def __init__(self, sock, server):
        self.sock = sock
        self._server = server
        self.phase = PHASE_IDLE
        self.deadline = time.monotonic() + server.config.client_timeout
        self.upstream_sock = None
        self.client_gone = False
        self.aborted = False  # cut by the end of the shutdown grace
        self._lock = threading.Lock()  # upstream_sock: watch(None), client_left

    def wait_for_request(self):
        """Start waiting for a request; False when draining (stop serving)."""
        server = self._server
        self.deadline = time.monotonic() + server.config.client_timeout
        self.phase = PHASE_IDLE
        return not server.draining  # only now: see drain

    def request_started(self):
        """A request line arrived: its headers and body get client_timeout."""
        self.deadline = time.monotonic() + self._server.config.client_timeout
        self.phase = PHASE_READING

    def request_read(self):
        """The whole request has arrived: stop its client_timeout deadline."""
        self.phase = PHASE_BUSY

    def watch(self, upstream_sock):
        """While upstream_sock is set, a client disconnect shuts it down, so
        the upstream stops generating (None: stop watching)."""
        if upstream_sock is not None:
            self.upstream_sock = upstream_sock
            return
        with self._lock:  # waits for a client_left under way
            self.upstream_sock = None

    def client_left(self):
        """The client has hung up: mark it gone and shut down the upstream
        socket being watched, if any, so the upstream stops generating."""
        with self._lock:
            if self.upstream_sock is not None:
                self.client_gone = True
                shutdown_socket(self.upstream_sock)


class RelayServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threading HTTP server holding the live Config and upstream pool.

    Beyond http.server it refuses connections past max_connections with a
    503, closes clients that exceed client_timeout, notices clients that
    disconnect while the upstream works, and drains gracefully.
    """

    daemon_threads = True  # a stream must not block exit after the grace
    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(self, config, handler_class=RelayHandler):
        self.config = config
        self.address_family = (socket.AF_INET6 if ":" in config.listen_host
                               else socket.AF_INET)
        self.pool = UpstreamPool()
        self.stream_pump = StreamPump()
        self.metrics = Metrics()
        self.ready_timeout = READY_TIMEOUT_SECONDS  # per upstream, /health/ready
        self.access_log = AccessLog()  # main() writes to its handler directly
        self.config_path = None  # the file reloads read; see watch_config_file
        self.config_overrides = None  # the command line's, kept over reloads
        self._config_signature = None
        self._reload_lock = threading.Lock()
        self._reloads_asked = 0  # reload tickets handed out
        self._reload_applied = 0  # the newest ticket that took effect or failed
        self._next_config_poll = 0.0
        self.traffic = Traffic()
        self.draining = False
        self._grace_deadline = 0.0
        self._grace_ended = False
        self._lock = threading.Condition()
        self._connections = set()
        self._active = 0
        self._stop_housekeeping = threading.Event()
        http.server.HTTPServer.__init__(
            self, (config.listen_host, config.listen_port), handler_class)
        self._housekeeper = threading.Thread(target=self._housekeeping,
                                             name="llm-relay-housekeeping")
        self._housekeeper.daemon = True
        self._housekeeper.start()

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn, which can stall for
        # seconds where reverse DNS is broken (air-gapped hosts).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def port(self):
        return self.server_address[1]

    # -- admission ----------------------------------------------------------------

    def process_request(self, request, client_address):
        with self._lock:
            admitted = self._active < self.config.max_connections
            if admitted:
                self._active += 1
        if not admitted:
            reject_connection(request)
            return
        try:
            socketserver.ThreadingMixIn.process_request(self, request, client_address)
        except BaseException:
            self._connection_done()
            raise

    def process_request_thread(self, request, client_address):
        try:
            socketserver.ThreadingMixIn.process_request_thread(
                self, request, client_address)
        finally:
            self._connection_done()

    def _connection_done(self):
        with self._lock:
            self._active -= 1
            self._lock.notify_all()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError,) + SOCKET_TIMEOUT_ERRORS):
            logger.info("%s connection ended: %s", client_address[0],
                        type(error).__name__)
        else:
            logger.error("%s unexpected error: %s: %s", client_address[0],
                         type(error).__name__, error)
            logger.debug("traceback", exc_info=True)

    # -- connection tracking ----------------------------------------------------------

    def track_connection(self, sock):
        """Return the new TrackedConnection of a client socket (see the
        connection tracking comment above TrackedConnection)."""
        tracked = TrackedConnection(sock, self)
        with self._lock:
            self._connections.add(tracked)
        return tracked

    def untrack_connection(self, tracked):
        with self._lock:
            self._connections.discard(tracked)

    # -- housekeeping --------------------------------------------------------------------

    def _housekeeping(self):
        while not self._stop_housekeeping.wait(HOUSEKEEPING_INTERVAL_SECONDS):
            try:
                self._close_overdue_clients(time.monotonic())
                self._notice_disconnected_clients()
                self.pool.prune()
                self.poll_config_file(time.monotonic())
            except Exception:  # never let housekeeping die
                logger.debug("housekeeping failed", exc_info=True)

    def watch_config_file(self, path, overrides=None):
        """Remember the config file (reloads read it again, with the command
        line's overrides) and its current state for reload_on_change."""
        self.config_path = path
        self.config_overrides = overrides
        self._config_signature = config_file_signature(path)

    def poll_config_file(self, now):
        """With reload_on_change, start a reload (as SIGHUP does) when the
        config file changed since the last look, at most every
        CONFIG_POLL_SECONDS; return True when one was started."""
        if (not self.config.reload_on_change or self.config_path is None
                or now < self._next_config_poll):
            return False
        self._next_config_poll = now + CONFIG_POLL_SECONDS
        signature = config_file_signature(self.config_path)
        if signature == self._config_signature:
            return False
        self._config_signature = signature
        if signature is None:  # gone for a moment (a swap): reload when back
            logger.warning("%s is missing; keeping the running config",
                           self.config_path)
            return False
        logger.info("%s changed; reloading", self.config_path)
        start_reload(self, self.config_path)
        return True

    def _close_overdue_clients(self, now):
        with self._lock:
            overdue = [tracked for tracked in self._connections
                       if tracked.phase != PHASE_BUSY and tracked.deadline < now]
        for tracked in overdue:
            if tracked.phase == PHASE_READING:
                logger.info("closing a client that did not send its request "
                            "within client_timeout = %g s", self.config.client_timeout)
            shutdown_socket(tracked.sock)

    def _notice_disconnected_clients(self):
        with self._lock:
            watched = dict((tracked.sock, tracked) for tracked in self._connections
                           if tracked.upstream_sock is not None)
        if not watched:
            return
        for sock in readable_sockets(list(watched)):
            if is_peer_closed(sock):
                watched[sock].client_left()

    # -- lifecycle --------------------------------------------------------------------------

    def drain(self, grace_seconds):
        """Close idle connections now; wait up to grace_seconds for the others.

        Call after serve_forever() has returned.  The listening socket is
        closed first, so new connections are refused rather than left
        waiting in the backlog.  Returns True when every connection finished
        in time; the rest are then closed.
        """
        self.socket.close()
        with self._lock:
            if not self._grace_ended:  # a second signal may already have come
                self._grace_deadline = time.monotonic() + grace_seconds
            self.draining = True  # before the look at phases: see wait_for_request
            for tracked in self._connections:
                if tracked.phase == PHASE_IDLE:
                    shutdown_socket(tracked.sock, socket.SHUT_RD)
            finished = self._wait_for_connections(lambda: self._grace_deadline)
            leftovers = list(self._connections)
            for tracked in leftovers:
                tracked.aborted = True
        if finished:
            return True
        # Cut the upstream side first: each stream then ends with a final SSE
        # error event and its handler writes its access line.
        for tracked in leftovers:
            if tracked.upstream_sock is not None:
                shutdown_socket(tracked.upstream_sock)
        cut_deadline = time.monotonic() + ABORT_WAIT_SECONDS
        with self._lock:
            self._wait_for_connections(lambda: cut_deadline)
            leftovers = list(self._connections)
        for tracked in leftovers:
            shutdown_socket(tracked.sock)
        final_deadline = time.monotonic() + ABORT_WAIT_SECONDS
        with self._lock:
            self._wait_for_connections(lambda: final_deadline)
        return False

    def _wait_for_connections(self, deadline):
        """Wait (holding the lock) until no connection is left or the time
        deadline() returns has passed; return True when none is left."""
        while self._active and time.monotonic() < deadline():
            self._lock.wait(0.05)
        return not self._active

    def end_grace(self):
        """Stop waiting for running requests (a second SIGTERM/SIGINT)."""
        with self._lock:
            self._grace_ended = True
            self._grace_deadline = 0.0

    def server_close(self):
        self._stop_housekeeping.set()
        self.stream_pump.close()
        http.server.HTTPServer.server_close(self)
        self.pool.close_all()

    def reload_ticket(self):
        """Return the number of a reload being asked for: 1, 2, ..."""
        with self._reload_lock:
            self._reloads_asked += 1
            return self._reloads_asked

    def finish_reload(self, ticket, config):
        """Put config in force (None: that reload failed) unless a newer
        reload has finished already; return False for an overtaken one."""
        with self._reload_lock:
            if ticket < self._reload_applied:
                return False
            self._reload_applied = ticket
            if config is not None:
                self.config = config
            return True

    def active_connections(self):
        with self._lock:
            return self._active


def is_peer_closed(sock):
    """Return True when a readable socket's peer has closed or reset it."""
    try:
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True

_OVERLOADED_BODY = serialize_json(openai_error(
    "The relay is at max_connections; retry shortly.", "server_error",
    "overloaded"))

_OVERLOADED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_OVERLOADED_BODY), _OVERLOADED_BODY))


def reject_connection(sock):
    """Answer a connection beyond max_connections with 503 without a thread."""
    try:
        sock.settimeout(0)
        sock.send(_OVERLOADED_RESPONSE)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)  # unread input would turn the close into a reset
    except OSError:
        pass
    finally:
        sock.close()
    logger.warning("refused a connection: max_connections reached")


def config_file_signature(path):
    """Return what tells a changed config file, or None when it is missing.

    The stat of the resolved path (symlinks followed): inode and device,
    size and mtime in ns.  Kubernetes updates a mounted ConfigMap by
    swapping a symlink to a new directory, so the inode changes even when
    size and mtime do not.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)


def make_server(config):
    """Create a RelayServer bound to config's listen address (port 0: any)."""
    return RelayServer(config)


def start_reload(server, path):
    """Reload the config file in a new thread: the one entry point for
    SIGHUP and reload_on_change, so both reload the same way."""
    threading.Thread(target=reload_config, args=(server, path),
                     name="llm-relay-reload").start()


def reload_config(server, path):
    """Load path again and swap it into server; keep the old config on error.

    The command line's overrides (--listen, --upstream, --demo) apply again.
    Requests already running keep the config they started with.  Reloads
    take effect in the order they were asked for (SIGHUP, a file change):
    one that a newer reload overtook (a slow large file, then a small one)
    is dropped with a log line, so the file's newest content stays in force.
    """
    ticket = server.reload_ticket()
    try:
        config, warnings = load_config(path, overrides=server.config_overrides)
    except ConfigError as error:
        server.finish_reload(ticket, None)
        logger.error("reload failed, keeping the running config: %s", error)
        return False
    old = server.config
    if config.log_format != old.log_format:
        warnings.append("log_format changed to %s; it takes effect only after "
                        "a restart" % config.log_format)
        config = config._replace(log_format=old.log_format)
    if (config.listen_host, config.listen_port) != (old.listen_host, old.listen_port):
        warnings.append("listen changed to %s:%d; it takes effect only after a "
                        "restart" % (config.listen_host, config.listen_port))
        config = config._replace(listen_host=old.listen_host,
                                 listen_port=old.listen_port)
    if not server.finish_reload(ticket, config):
        logger.warning("dropped reload #%d of %s: a newer reload finished first",
                       ticket, path)
        return False
    for warning in warnings:
        logger.warning("%s", warning)
    logger.info("reloaded %s: %s", path, plural(len(config.rules), "rule"))
    return True


###############################################################################
# Demo upstream ###############################################################
###############################################################################

DEMO_MODEL = "llm-relay-demo"


def applied_rule(config, body):
    """Return the first Rule whose effect a rewritten body shows, or None.

    Used by the demo upstream, which sees the body only after the rules: a
    rule fits when it sends the body's model (set.model, or select_rule
    picks it for that model), every key it sets has its value, no key it
    unsets is present and its extra is merged in.
    """
    model = body.get("model")
    for rule in config.rules:
        sends_model = (rule.set.get("model") == model if "model" in rule.set
                       else select_rule(config.rule_index, model) is rule)
        if not sends_model:
            continue
        if all(body.get(key) == value for key, value in rule.set.items()) and \
                not any(key in body for key in rule.unset) and \
                deep_merge(body, rule.extra) == body:
            return rule
    return None


def describe_demo_request(config, body):
    """Return the demo upstream's answer text for a request body (dict): the
    model it was sent, the rule that fits (see applied_rule) and what that
    rule does, and the parameters received."""
    rule = applied_rule(config, body)
    text = "Demo upstream got model %s" % body.get("model")
    if rule is None:
        text += "; no rule changed the request."
    else:
        done = [(verb, ", ".join(keys)) for verb, keys in (
            ("sets", list(rule.set)), ("removes", list(rule.unset)),
            ("merges", list(rule.extra))) if keys]
        text += " from %s (%s), which %s." % (
            rule.path, ", ".join(rule.match_model),
            "; ".join("%s %s" % item for item in done) or "changes nothing")
    parameters = ["%s=%s" % (key, json.dumps(body[key], ensure_ascii=False))
                  for key in sorted(body)
                  if key not in ("model", "messages", "prompt")]
    return text + (" Parameters: %s." % ", ".join(parameters) if parameters else "")


def demo_answer(config, route, body):
    """Return (status, answer dict, stream bool) for a demo request (OpenAI's
    shapes; a 404 on /messages in Anthropic's error shape); route is the path
    after the base URL ("/chat/completions")."""
    if route == "/models":
        names = [DEMO_MODEL] + [rule.set["model"] for rule in config.rules
                                if "model" in rule.set]
        return 200, {"object": "list", "data": [
            model_entry(name, config.created, "llm-relay-demo")
            for name in sorted(set(names), key=names.index)]}, False
    if route not in ("/chat/completions", "/completions"):
        # In the error shape of the client's protocol, as the relay's own
        # errors are: on /v1/messages the Anthropic SDKs read only that one.
        return 404, error_body(request_protocol(route), 404, "The demo upstream "
                               "answers only chat completions, completions and "
                               "models.", code="unknown_url"), False
    text = describe_demo_request(config, body)
    completion_tokens = len(text.split())
    usage = {"prompt_tokens": len(json.dumps(body.get("messages",
                                                      body.get("prompt", ""))).split()),
             "completion_tokens": completion_tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + completion_tokens
    chat = route == "/chat/completions"
    choice = {"index": 0, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return 200, {"id": "demo-" + new_request_id()[:12],
                 "object": "chat.completion" if chat else "text_completion",
                 "created": int(time.time()), "model": body.get("model"),
                 "choices": [choice], "usage": usage}, body.get("stream") is True


def demo_stream_events(answer, include_usage):
    """Yield the SSE events (bytes) that stream a demo answer word by word,
    in OpenAI's chunk shape, through data: [DONE]."""
    chat = answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    words = [word + " " for word in text.split(" ")]
    words[-1] = words[-1].rstrip()
    base = dict(answer, object="chat.completion.chunk" if chat else "text_completion")
    base.pop("usage")

    def event(delta, finish_reason=None):
        if chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta.get("content", ""),
                      "finish_reason": finish_reason, "logprobs": None}
        return b"data: " + serialize_json(dict(base, choices=[choice])) + b"\n\n"
    if chat:
        yield event({"role": "assistant", "content": ""})
    for word in words:
        yield event({"content": word})
    yield event({}, "stop")
    if include_usage:
        yield b"data: " + serialize_json(dict(base, choices=[], usage=answer[
            "usage"])) + b"\n\n"
    yield b"data: [DONE]\n\n"


class DemoUpstreamHandler(http.server.BaseHTTPRequestHandler):
    """Answer as an OpenAI-compatible server would (see demo_answer)."""

    protocol_version = "HTTP/1.1"
    server_version = "llm-relay-demo/" + __version__
    wbufsize = COPY_BLOCK_BYTES  # head and body in one write (no Nagle stall)

    def do_GET(self):
        self._answer(b"")

    def do_POST(self):
        self._answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _answer(self, data):
        try:
            body = json.loads(data.decode("utf-8")) if data else {}
        except ValueError:
            body = None
        route = urllib.parse.urlsplit(self.path).path
        route = route[3:] if route.startswith("/v1/") else route
        if not isinstance(body, dict):
            status, answer, stream = 400, openai_error(
                "The body is not a JSON object.", code="invalid_json"), False
        else:
            status, answer, stream = demo_answer(self.server.relay.config, route, body)
        if stream:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage")
            data = b"".join(demo_stream_events(answer, include_usage is True))
            content_type = "text/event-stream"
        else:
            data, content_type = serialize_json(answer), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # the relay's access line tells the story


class DemoUpstream(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The --demo upstream: in this process, on an ephemeral 127.0.0.1 port,
    so the relay's request path is the real one and nothing leaves the
    machine.  relay is the RelayServer whose config it reads."""

    daemon_threads = True

    def __init__(self):
        self.relay = None
        http.server.HTTPServer.__init__(self, ("127.0.0.1", 0), DemoUpstreamHandler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # no reverse DNS lookup
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        return "http://127.0.0.1:%d/v1" % self.server_address[1]

    def start(self, relay):
        self.relay = relay
        thread = threading.Thread(target=self.serve_forever, name="llm-relay-demo")
        thread.daemon = True
        thread.start()


###############################################################################
# CLI #########################################################################
###############################################################################

def configure_logging(verbose, log_format):
    """Send log records to stderr as text lines or JSON objects; return the
    handler (access lines are written to it directly, see AccessLog)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


def describe_config(config, warnings):
    """Return the --check-config report: effective settings (keys masked) and
    a table of rules (match, upstream, what each removes, fills, sets, merges)."""
    lines = ["config: %s (valid)" % config.source,
             "listen: %s" % describe_listen(config.listen_host, config.listen_port)]
    for name, upstream in config.upstreams.items():
        lines.append("upstream %s: %s (api_key %s, connect_timeout %g s, "
                     "read_timeout %g s)" % (name, upstream.url,
                                             mask_secret(upstream.api_key),
                                             upstream.connect_timeout,
                                             upstream.read_timeout))
        if upstream.max_concurrent:
            lines[-1] = lines[-1][:-1] + (", max_concurrent %d, max_queue %d, "
                                          "queue_timeout %g s)" % (
                                              upstream.max_concurrent,
                                              upstream.max_queue,
                                              upstream.queue_timeout))
        if upstream.apis != frozenset(UPSTREAM_APIS):
            lines[-1] = lines[-1][:-1] + ", apis %s)" % describe_apis(upstream.apis)
    for name, group in sorted(config.groups.items()):
        lines.append("group %s: %s (affinity %s, eject_after %d, cooldown %g s)"
                     % (name, ", ".join(group.members), describe_affinity(
                         group.affinity), group.eject_after, group.cooldown))
    lines += ["%s: %s" % (key.name, key.show(getattr(config, key.field)))
              for key in CONFIG_KEYS if key.show is not None]
    lines.append("rules: %d" % len(config.rules))
    rows = [("#", "match_model", "upstream", "unset", "defaults", "set", "extra")]
    for position, rule in enumerate(config.rules):
        rows.append((str(position), ", ".join(rule.match_model),
                     " > ".join(rule.upstreams), ", ".join(rule.unset) or "-",
                     describe_assignments(rule.defaults),
                     describe_assignments(rule.set),
                     json.dumps(rule.extra, ensure_ascii=False) if rule.extra else "-"))
    if config.rules:
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width
                                   in zip(row, widths)).rstrip() for row in rows]
    lines += ["warning: %s" % warning for warning in warnings]
    return "\n".join(lines) + "\n"


def describe_api_key(api_key):
    """Return a key for --check-config: its name and limits, masked secret."""
    limits = [("models", ", ".join(api_key.models)),
              ("max_concurrent", api_key.max_concurrent),
              ("requests_per_minute", api_key.requests_per_minute)]
    return "%s (%s%s)" % (api_key.name, mask_secret(api_key.secret.decode("utf-8")),
                          "".join("; %s %s" % item for item in limits if item[1]))


def describe_default_route(config):
    """Return where requests without a rule go, for the startup line: the
    default upstream's URL, or its replicas' URLs."""
    if DEFAULT_UPSTREAM_NAME in config.upstreams:
        return config.upstreams[DEFAULT_UPSTREAM_NAME].url
    group = config.groups.get(DEFAULT_UPSTREAM_NAME)
    if group is None:
        return "-"
    return "replicas " + ", ".join(config.upstreams[name].url
                                   for name in group.members)


def describe_affinity(affinity):
    if isinstance(affinity, tuple):
        return "header:" + affinity[1]
    return affinity or "none"


def describe_apis(apis):
    """Return an upstream's "apis" for --check-config, with the APIs the relay
    translates onto its chat completions: "chat; messages, responses
    translated"."""
    spoken = [api for api in UPSTREAM_APIS if api in apis]
    translated = [api for api in UPSTREAM_APIS if api not in apis and api != "chat"]
    if "chat" not in apis or not translated:
        return ", ".join(spoken)
    return "%s; %s translated" % (", ".join(spoken), ", ".join(translated))


def describe_assignments(values):
    return ", ".join("%s=%s" % (key, json.dumps(value, ensure_ascii=False))
                     for key, value in values.items()) or "-"


def build_arg_parser():
    parser = argparse.ArgumentParser(
        prog="llm_relay.py",
        description="OpenAI-compatible relay that rewrites request bodies per "
                    "model from a JSONC config.")
    parser.add_argument(
        "--config", metavar="PATH",
        help="JSONC config file (default: ./%s if it exists, else built-in "
             "defaults: listen %s, upstream %s)" % (
                 DEFAULT_CONFIG_PATH, DEFAULT_LISTEN, DEFAULT_UPSTREAM))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging: rewritten bodies (keys redacted) "
                             "and upstream statuses (default: off)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="listen here instead of the config's \"listen\" "
                             "(IPv6 as [::1]:8080)")
    parser.add_argument("--upstream", metavar="URL",
                        help="send requests to this base URL instead of the "
                             "config's default upstream (default: %s)"
                             % DEFAULT_UPSTREAM)
    parser.add_argument("--demo", action="store_true",
                        help="answer from a built-in demo upstream that echoes "
                             "what the rules did (no model or network needed; "
                             "default config: ./%s, else the one shipped beside "
                             "llm_relay.py)" % DEFAULT_CONFIG_PATH)
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, print the effective settings "
                             "(keys masked) and rules, and exit: 0 valid, 2 not")
    parser.add_argument("--explain", metavar="BODY",
                        help="print the rule, the upstream chain and the "
                             "rewritten body for a request body (JSON text, a "
                             "file, or - for stdin), and exit: 0, or 2 when "
                             "the body or config is invalid")
    parser.add_argument("--version", action="version",
                        version="llm-relay " + __version__)
    return parser


def resolve_config(path, overrides=None, demo=False):
    """Return (Config, warnings, path or None) for the --config argument.

    Without one: ./config.jsonc if it exists, with demo the config.jsonc
    shipped beside llm_relay.py, else the built-in defaults.  Raises
    ConfigError when the file is missing or invalid.
    """
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           DEFAULT_CONFIG_PATH)
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    elif path is None and demo and os.path.exists(shipped):
        path = shipped
    if path is None:
        return default_config(overrides), [], None
    config, warnings = load_config(path, overrides=overrides)
    return config, warnings, path


def command_line_overrides(parser, args):
    """Return override_settings' keyword arguments from --listen and
    --upstream; a malformed value is a usage error (exit 2)."""
    overrides = {}
    for value, check, key in ((args.listen, parse_listen, "listen"),
                              (args.upstream, parse_upstream_url, "upstream")):
        if value is not None:
            try:
                check(value)
            except ValueError as error:
                parser.error("--%s: %s" % (key, error))
            overrides[key] = value
    return overrides


def read_explain_body(argument, stdin, max_bytes):
    """Return the request body bytes --explain names: JSON text (it starts
    with "{"), - for stdin, else a file path.  Raises OSError, or RelayError
    413 beyond max_bytes (the config's max_body_bytes; /dev/zero never ends)."""
    if argument == "-":
        # bytes: no locale decoding
        data = getattr(stdin, "buffer", stdin).read(max_bytes + 1)
        data = data.encode("utf-8") if isinstance(data, str) else data
    elif argument.lstrip().startswith("{"):
        # Python decoded argv with the locale's codec and surrogateescape:
        # this gives back the bytes the shell passed.
        data = argument.encode("utf-8", "surrogateescape")
    else:
        with open(argument, "rb") as body_file:
            data = body_file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RelayError(413, "The request body is larger than max_body_bytes = "
                         "%d." % max_bytes, code="request_too_large")
    return data


def describe_chain_step(config, name):
    """Return one step of a chain for --explain: an upstream with its URL, or
    a replica group with its members' names and URLs."""
    group = config.groups.get(name)
    if group is None:
        return "%s (%s)" % (name, config.upstreams[name].url)
    return "%s (replicas %s)" % (name, ", ".join(
        "%s %s" % (member, config.upstreams[member].url) for member in group.members))


def explain_request(config, body):
    """Return the --explain report (str) for a parsed request body (dict):
    the model asked, the rule that applies and what it does, the upstream
    chain and the body as it would be sent."""
    model = body.get("model")
    rule = select_rule(config.rule_index, model)
    chain = rule.upstreams if rule else (DEFAULT_UPSTREAM_NAME,)
    rewritten = apply_rule(body, rule) if rule else body
    lines = ["model: %s" % json.dumps(model, ensure_ascii=False)]
    if rule is None:
        lines.append("rule: none matches; the body is sent unchanged")
    else:
        lines.append("rule: %s (match_model %s)" % (rule.path, ", ".join(
            json.dumps(name, ensure_ascii=False) for name in rule.match_model)))
        for label, keys in rule_effects(body, rule):
            lines.append("  %s: %s" % (label, ", ".join(keys) or "-"))
    lines.append("upstream: " + " > ".join(
        describe_chain_step(config, name) for name in chain))
    lines.append("model sent: %s" % json.dumps(rewritten.get("model"),
                                                ensure_ascii=False))
    lines.append("body sent:")
    lines.append(json.dumps(rewritten, ensure_ascii=False, indent=2))
    return "\n".join(lines) + "\n"


def rule_effects(body, rule):
    """Return [(label, keys)] for what rule does to body: the keys removed
    (unset and sent), filled in (defaults the client left out), set and
    merged (extra)."""
    return [("removed", [key for key in rule.unset if key in body]),
            ("filled in", [key for key in rule.defaults
                           if key not in body or key in rule.unset]),
            ("set", list(rule.set)),
            ("merged", list(rule.extra))]


def explain(config, argument, stdin):
    """Run --explain; return the exit status (0, or 2 for a bad body)."""
    try:
        body = parse_json_body(read_explain_body(argument, stdin,
                                                 config.max_body_bytes))
    except OSError as error:
        sys.stderr.write("llm_relay: error: --explain: cannot read %s: %s\n" % (
            argument, error.strerror or error))
        return 2
    except RelayError as error:
        sys.stderr.write("llm_relay: error: --explain: %s\n" % error.message)
        return 2
    write_report(explain_request(config, body))
    return 0


def write_report(text):
    """Write text to standard output; characters it cannot encode (an
    ASCII-only terminal, LANG=C on old boxes, or a lone surrogate from a
    JSON escape in the config) go out as backslash escapes."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        sys.stdout.write(text.encode("ascii", "backslashreplace").decode("ascii"))


def describe_listen(host, port):
    """Return the base URL form of a listen address, for messages."""
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def main(argv=None):
    """Run the relay; return the process exit status (0 ok, 2 bad config)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    overrides = command_line_overrides(parser, args)
    if args.demo and args.upstream is not None:
        parser.error("--demo answers in place of every upstream; drop --upstream")
    demo = DemoUpstream() if args.demo and not (
        args.check_config or args.explain is not None) else None
    if demo is not None:
        overrides.update(upstream=demo.url, every_upstream=True)
    try:
        config, warnings, path = resolve_config(args.config, overrides, args.demo)
    except ConfigError as error:
        sys.stderr.write("llm_relay: error: %s\n" % error)
        return 2
    if args.check_config:
        write_report(describe_config(config, warnings))
        return 0
    if args.explain is not None:
        return explain(config, args.explain, sys.stdin)
    log_handler = configure_logging(args.verbose, config.log_format)
    for warning in warnings:
        logger.warning("%s", warning)
    try:
        server = make_server(config)
    except OSError as error:
        sys.stderr.write("llm_relay: error: cannot listen on %s: %s\n" % (
            describe_listen(config.listen_host, config.listen_port),
            error.strerror or error))
        return 1
    server.access_log = AccessLog(log_handler, config.log_format)
    if path is not None:
        server.watch_config_file(path, overrides)
    if demo is not None:
        demo.start(server)
    install_signal_handlers(server, path)
    logger.info("llm-relay %s listening on %s, upstream %s, %s%s",
                __version__, describe_listen(server.config.listen_host, server.port),
                "the built-in demo" if demo else describe_default_route(server.config),
                plural(len(server.config.rules), "rule"),
                ", config " + path if path else ", built-in defaults")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    grace = server.config.shutdown_grace
    logger.info("shutting down: waiting up to %g s for %s", grace,
                plural(server.active_connections(), "connection"))
    if not server.drain(grace):
        logger.warning("shutdown grace ended; closed the remaining connections")
    server.server_close()
    return 0


def install_signal_handlers(server, path):
    """SIGTERM/SIGINT drain and stop; SIGHUP reloads the config file."""
    stopping = []

    def stop(signum, frame):
        if stopping:  # a second signal: stop waiting for streams
            server.end_grace()
            return
        stopping.append(signum)
        threading.Thread(target=server.shutdown, name="llm-relay-stop").start()

    def reload(signum, frame):
        if path is None:
            logger.warning("SIGHUP: no config file to reload")
            return
        start_reload(server, path)

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload)

if __name__ == "__main__":
    sys.exit(main())
