"""Tests for llm_relay.py: pure units first, then real sockets.

Run from the repository root:  python3 -m unittest -v

Every HTTP test starts the relay and a fake upstream on ephemeral 127.0.0.1
ports and talks to them over real sockets with http.client.  Steps that must
happen in order are synchronised with threading.Event, never with sleep; every
wait has a timeout so a failure cannot hang the run.  Runs on CPython 3.6+;
the tests with the official openai package are skipped where it is missing.
"""

import collections
import gzip
import http.client
import http.server
import io
import json
import logging
import os
import random
import re
import select
import shutil
import shlex
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest

import llm_relay

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT_SECONDS = 10.0  # upper bound for any wait; a test fails, never hangs

# The relay logs through "llm_relay"; keep test output clean (assertLogs
# still captures, since it installs its own handler).
logging.getLogger("llm_relay").addHandler(logging.NullHandler())
logging.getLogger("llm_relay").propagate = False

try:
    import openai
except ImportError:  # pragma: no cover - depends on the environment
    openai = None
    OPENAI_MISSING = "the openai package is not installed (.ci/run installs it)"
else:
    OPENAI_MISSING = ""


###############################################################################
# Pure units ##################################################################
###############################################################################

def config_from(raw, environ=None):
    """Validate a config dict; return the Config."""
    config, _ = llm_relay.validate_config(raw, "test.jsonc", None, environ or {})
    return config


def config_error(text, environ=None):
    """Return the ConfigError raised for JSONC text."""
    try:
        llm_relay.parse_config_text(text, "bad.jsonc", environ or {})
    except llm_relay.ConfigError as error:
        return error
    raise AssertionError("no ConfigError for %r" % text)


class StripJsoncTest(unittest.TestCase):

    def strip_and_load(self, text):
        return json.loads(llm_relay.strip_jsonc(text))

    def test_line_and_block_comments_are_removed(self):
        text = '{\n  // a comment\n  "a": 1, /* inline */ "b": /* x */ 2\n}'
        self.assertEqual(self.strip_and_load(text), {"a": 1, "b": 2})

    def test_comment_markers_inside_strings_are_data(self):
        text = '{"url": "http://host/v1", "s": "a /* b */ c", "t": "x // y"}'
        self.assertEqual(self.strip_and_load(text), {
            "url": "http://host/v1", "s": "a /* b */ c", "t": "x // y"})

    def test_escaped_quote_and_backslash_before_closing_quote(self):
        text = r'{"q": "say \"hi\" // no", "b": "C:\\", "c": "\\\"/*"} // end'
        self.assertEqual(self.strip_and_load(text), {
            "q": 'say "hi" // no', "b": "C:\\", "c": '\\"/*'})

    def test_trailing_commas_even_before_a_comment(self):
        text = '{"a": [1, 2, // two\n], "b": {"c": 3,},}'
        self.assertEqual(self.strip_and_load(text), {"a": [1, 2], "b": {"c": 3}})

    def test_comma_inside_string_before_bracket_is_kept(self):
        self.assertEqual(self.strip_and_load('{"a": ",]"}'), {"a": ",]"})

    def test_bom_is_accepted(self):
        self.assertEqual(self.strip_and_load('\ufeff{"a": 1}'), {"a": 1})

    def test_lines_and_columns_survive(self):
        text = '{\n /* one\n two */ "a": 1, // x\n "b": 2\n}'
        stripped = llm_relay.strip_jsonc(text)
        self.assertEqual(stripped.count("\n"), text.count("\n"))
        self.assertEqual(len(stripped), len(text))
        self.assertEqual(stripped.index('"b"'), text.index('"b"'))

    def test_unterminated_block_comment_is_an_error_with_position(self):
        error = config_error('{"a": 1,\n  /* never closed\n}')
        self.assertEqual((error.line, error.column), (2, 3))
        self.assertIn("unterminated", str(error))

    def test_json_error_points_at_the_right_line(self):
        error = config_error('// header\n{\n  /* c */ "a": 1\n  "b": 2\n}')
        self.assertEqual(error.line, 4)
        self.assertTrue(str(error).startswith("bad.jsonc:4:"), str(error))


class ConfigValidationTest(unittest.TestCase):

    def test_defaults(self):
        config = config_from({})
        self.assertEqual((config.listen_host, config.listen_port), ("0.0.0.0", 8080))
        upstream = config.upstreams["default"]
        self.assertEqual(upstream.url, "http://localhost:11434/v1")
        self.assertEqual((upstream.host, upstream.port, upstream.base_path),
                         ("localhost", 11434, "/v1"))
        self.assertEqual((upstream.connect_timeout, upstream.read_timeout),
                         (10.0, 600.0))
        self.assertFalse(config.forward_auth)
        self.assertEqual(config.rules, ())
        self.assertEqual(config.api_keys, ())
        self.assertEqual(config.max_body_bytes, 32 * 1024 * 1024)
        self.assertEqual(config.max_connections, 512)
        self.assertEqual(config.client_timeout, 60.0)
        self.assertEqual(config.shutdown_grace, 30.0)

    def test_shipped_example_config_is_valid_without_warnings(self):
        config, warnings = llm_relay.load_config(os.path.join(HERE, "config.jsonc"))
        self.assertEqual(warnings, [])
        self.assertEqual([rule.match_model for rule in config.rules],
                         [("gpt-3.5-turbo",), ("default",)])
        self.assertEqual(config.rules[0].set["model"], "qwen2.5-72b-instruct")

    def assert_config_error(self, text, path, message_part, line=None):
        error = config_error(text)
        self.assertEqual(error.path, path)
        self.assertIn(message_part, str(error))
        self.assertIn("bad.jsonc:", str(error))
        if line is not None:
            self.assertEqual(error.line, line, str(error))
        return error

    def test_type_errors_name_the_field_path_and_position(self):
        self.assert_config_error(
            '{"model_rules": [\n {"match_model": "a"},\n {"match_model": "b", '
            '"unset": "x"}\n]}', "model_rules[1].unset",
            "model_rules[1].unset: expected a list of strings", line=3)
        self.assert_config_error('{"listen": "8080"}', "listen", "host:port", 1)
        self.assert_config_error('{"listen": "h:99999"}', "listen", "host:port")
        self.assert_config_error('{"upstream": "ftp://x"}', "upstream", "http")
        self.assert_config_error('{"upstream": "localhost:11434"}', "upstream",
                                 "http")
        self.assert_config_error('{"model_rules": {}}', "model_rules", "a list")
        self.assert_config_error('{"model_rules": [{"set": {}}]}', "model_rules[0]",
                                 "match_model")
        self.assert_config_error('{"model_rules": [{"match_model": 3}]}',
                                 "model_rules[0].match_model", "match_model")
        self.assert_config_error('{"model_rules": [{"match_model": "a", "set": []}]}',
                                 "model_rules[0].set", "an object")
        self.assert_config_error(
            '{"model_rules": [{"match_model": "a", "extra": "x"}]}',
            "model_rules[0].extra", "an object")
        self.assert_config_error('{"forward_auth": "yes"}', "forward_auth",
                                 "true or false")
        self.assert_config_error('{"max_body_bytes": -1}', "max_body_bytes",
                                 "positive integer")
        self.assert_config_error('{"read_timeout": true}', "read_timeout",
                                 "positive number")
        self.assert_config_error('{"api_keys": "k"}', "api_keys", "list of strings")

    def test_every_rule_entry_an_earlier_pattern_takes_is_reported(self):
        _, warnings = llm_relay.parse_config_text(
            '{"model_rules": [{"match_model": ["gpt-4*", "x", "x"]},\n'
            '{"match_model": "gpt-4o-mini"},\n'
            '{"match_model": ["gpt-4o*", "gpt-3.5-turbo"]},\n'
            '{"match_model": ["gpt-?", "llama3"]},\n'
            '{"match_model": ["gpt-3", "gpt-4", "qwen*"]}]}', "c.jsonc", {})
        self.assertEqual(warnings, [
            "c.jsonc:1:18: model_rules[0]: 'x' is listed twice in match_model",
            "c.jsonc:2:1: model_rules[1]: never applies to 'gpt-4o-mini': "
            "model_rules[0] ('gpt-4*') matches it first",
            "c.jsonc:3:1: model_rules[2]: never applies to 'gpt-4o*': "
            "model_rules[0] ('gpt-4*') matches it first",
            "c.jsonc:5:1: model_rules[4]: never applies to 'gpt-3': "
            "model_rules[3] ('gpt-?') matches it first",
            "c.jsonc:5:1: model_rules[4]: never applies to 'gpt-4': "
            "model_rules[0] ('gpt-4*') matches it first"])
        shadow = llm_relay.shadowing_entry
        rules = config_from({"model_rules": [{"match_model": ["a?", "b[xy]", "*z"]}]}).rules
        self.assertIsNone(shadow(rules, "a*"))  # a? is narrower than a*
        self.assertIsNone(shadow(rules, "bx*"))
        self.assertEqual(shadow(rules, "y*z")[1], "*z")
        self.assertEqual(shadow(rules, "bx")[1], "b[xy]")
        self.assertIsNone(shadow(rules, "default"))

    def test_likely_mistakes_are_errors_or_warnings(self):
        _, warnings = llm_relay.parse_config_text(
            '{"listen": "127.0.0.1:1", "listen": "127.0.0.1:2", "model_rules": ['
            '{"match_model": ["a", "default"]}, {"match_model": "default"},\n'
            '{"match_model": ["b", "a"]}]}', "c.jsonc", {})
        self.assertIn("c.jsonc: duplicate key 'listen': the last value is used",
                      warnings)
        self.assertTrue(any("c.jsonc:2:1: model_rules[2]: never applies to 'a': "
                            "model_rules[0] matches it first" in w for w in warnings),
                        warnings)
        self.assertTrue(any("model_rules[1]: never applies to 'default'" in w
                            for w in warnings), warnings)
        self.assertFalse(any(": model_rules[0]:" in w for w in warnings), warnings)
        error = config_error('{"model_rules": [{"match_model": "a", "set": '
                             '{"model": 5}}]}')
        self.assertEqual(error.path, "model_rules[0].set.model")
        error = config_error('{"upstream": "http://h/v1", "upstream_ca_file": '
                             '"/nonexistent.pem"}')
        self.assertEqual(error.path, "upstream_ca_file")

    def test_a_misspelt_api_is_named_with_a_hint(self):
        error = config_error('{"upstreams": {"a": {"url": "http://x/v1",\n'
                             '  "apis": ["chat", "message"]}}}')
        self.assertEqual((error.path, error.line, error.column),
                         ("upstreams.a.apis[1]", 2, 20))
        self.assertIn('unknown API "message" (did you mean "messages"?); the APIs are '
                      '"chat", "messages", "responses"', str(error))
        error = config_error('{"upstreams": {"a": {"url": "http://x/v1", "apis": []}}}')
        self.assertEqual(error.path, "upstreams.a.apis")
        self.assertIn("expected a non-empty list of API names", str(error))

    def test_top_level_must_be_an_object(self):
        self.assertIn("top level", str(config_error("[1, 2]")))

    def test_unknown_keys_are_warnings_with_a_hint(self):
        _, warnings = llm_relay.parse_config_text(
            '{"lisen": "1.2.3.4:1",\n "model_rules": [{"match_model": "a", '
            '"sett": {}}]}', "c.jsonc", {})
        self.assertEqual(len(warnings), 2)
        self.assertIn("c.jsonc:1:2: lisen: unknown key 'lisen' ignored "
                      "(did you mean 'listen'?)", warnings[0])
        self.assertIn("model_rules[0].sett", warnings[1])

    def test_parse_listen(self):
        self.assertEqual(llm_relay.parse_listen("127.0.0.1:80"), ("127.0.0.1", 80))
        self.assertEqual(llm_relay.parse_listen("[::1]:8080"), ("::1", 8080))
        self.assertEqual(llm_relay.parse_listen("localhost:0"), ("localhost", 0))
        self.assertEqual(llm_relay.parse_listen(":9000"), ("0.0.0.0", 9000))
        for bad in ("8080", "::1:8080", "host:", "host:port", "[::1]", "a:70000"):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError, msg=bad):
                    llm_relay.parse_listen(bad)

    def test_upstream_url_keeps_its_path_prefix(self):
        self.assertEqual(llm_relay.parse_upstream_url("http://h:11434/v1/"),
                         ("http", "h", 11434, "/v1"))
        self.assertEqual(llm_relay.parse_upstream_url("https://api.openai.com/v1"),
                         ("https", "api.openai.com", 443, "/v1"))
        self.assertEqual(llm_relay.parse_upstream_url("http://[::1]:8000"),
                         ("http", "::1", 8000, ""))
        for bad in ("http://", "h:1/v1", "http://u:p@h/v1", "http://h/v1?x=1",
                    "http://h:notaport/", "http://a b/v1", "http://h/v 1",
                    "http://h/v1\n", "http://h/v1\r\nX-Injected: 1"):
            with self.assertRaises(ValueError, msg=bad):
                llm_relay.parse_upstream_url(bad)

    def test_environment_variables_are_substituted(self):
        config = config_from({
            "upstream_api_key": "${KEY}", "api_keys": ["${A:-fallback}", "$${LIT}"],
            "upstream": "http://${HOST:-localhost}:1/v1"}, {"KEY": "sk-env"})
        self.assertEqual(config.upstreams["default"].api_key, "sk-env")
        self.assertEqual([key.secret for key in config.api_keys], [b"fallback", b"${LIT}"])
        self.assertEqual(config.upstreams["default"].host, "localhost")

    def test_unset_environment_variable_is_an_error_naming_it(self):
        error = config_error('{"model_rules": [{"match_model": "a",\n'
                             ' "set": {"k": "${NOPE}"}}]}')
        self.assertEqual(error.path, "model_rules[0].set.k")
        self.assertIn("NOPE", error.message)
        self.assertEqual(error.line, 2)

    def test_load_config_reports_missing_and_non_utf8_files(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with self.assertRaises(llm_relay.ConfigError) as caught:
            llm_relay.load_config(os.path.join(directory, "missing.jsonc"))
        self.assertIn("missing.jsonc", str(caught.exception))
        path = os.path.join(directory, "latin.jsonc")
        with open(path, "wb") as handle:
            handle.write(b'{\n"a": "\xe9"}')
        with self.assertRaises(llm_relay.ConfigError) as caught:
            llm_relay.load_config(path)
        self.assertIn("UTF-8", str(caught.exception))
        self.assertEqual(caught.exception.line, 2)
        with open(path, "wb") as handle:
            handle.write(b'{"listen": "127.0.0.1:1"}' + b" " * 100)
        self.addCleanup(setattr, llm_relay, "MAX_CONFIG_BYTES", llm_relay.MAX_CONFIG_BYTES)
        llm_relay.MAX_CONFIG_BYTES = 100
        with self.assertRaises(llm_relay.ConfigError) as caught:
            llm_relay.load_config(path)
        self.assertIn("larger than 100 bytes", str(caught.exception))
        if os.path.exists("/dev/zero"):  # endless: read up to the limit only
            with self.assertRaises(llm_relay.ConfigError) as caught:
                llm_relay.load_config("/dev/zero")
            self.assertIn("larger than 100 bytes", str(caught.exception))

    def test_a_queue_without_max_concurrent_is_a_warning(self):
        _, warnings = llm_relay.validate_config({"upstreams": {
            "a": {"url": "http://h/v1", "max_queue": 5, "queue_timeout": 3},
            "b": {"url": "http://h/v1", "max_concurrent": 2, "max_queue": 5}}},
            "c", None, {})
        self.assertEqual([w for w in warnings if "max_concurrent" in w], [
            "c: upstreams.a.max_queue: max_queue has no effect without max_concurrent",
            "c: upstreams.a.queue_timeout: queue_timeout has no effect without "
            "max_concurrent"])

    def test_security_warnings(self):
        _, warnings = llm_relay.validate_config(
            {"api_keys": ["k"], "forward_auth": True}, "c", None, {})
        self.assertTrue(any("forward_auth" in w for w in warnings), warnings)
        _, warnings = llm_relay.validate_config(
            {"listen": "0.0.0.0:1", "upstream_api_key": "sk"}, "c", None, {})
        self.assertTrue(any("without api_keys" in w for w in warnings), warnings)
        _, warnings = llm_relay.validate_config(
            {"listen": "127.0.0.1:1", "upstream_api_key": "sk"}, "c", None, {})
        self.assertEqual(warnings, [])
        _, warnings = llm_relay.validate_config(
            {"upstream_tls_verify": False}, "c", None, {})
        self.assertTrue(any("upstream_tls_verify" in w for w in warnings), warnings)

    def test_ca_file_that_cannot_be_read_is_an_error(self):
        error = config_error('{"upstream": "https://h/v1",\n "upstream_ca_file": '
                             '"/nonexistent.pem"}')
        self.assertEqual(error.path, "upstream_ca_file")
        self.assertEqual(error.line, 2)

    def test_named_upstreams_and_unknown_names(self):
        config = config_from({"upstreams": {"gpu": {"url": "http://g:1/v1",
                                                    "read_timeout": 5}},
                              "upstream_api_key": "main-key",
                              "model_rules": [{"match_model": "m",
                                               "upstream": ["gpu", "default"]}]})
        self.assertEqual(list(config.upstreams), ["default", "gpu"])
        self.assertEqual(config.upstreams["gpu"].read_timeout, 5.0)
        self.assertIsNone(config.upstreams["gpu"].api_key)  # never lent
        self.assertEqual(config.rules[0].upstreams, ("gpu", "default"))
        error = config_error('{"model_rules": [{"match_model": "m",\n'
                             ' "upstream": "nope"}]}')
        self.assertEqual(error.path, "model_rules[0].upstream")
        self.assertIn("unknown upstream 'nope'", error.message)
        error = config_error('{"upstreams": {"x": {"url": 1}}}')
        self.assertEqual(error.path, "upstreams.x.url")

    def test_config_is_immutable_and_values_are_copied(self):
        raw = {"model_rules": [{"match_model": "a", "extra": {"o": {"k": 1}}}]}
        config = config_from(raw)
        with self.assertRaises(AttributeError):
            config.forward_auth = True
        body = llm_relay.apply_rule({"o": {"j": 2}}, config.rules[0])
        body["o"]["k"] = 99
        self.assertEqual(config.rules[0].extra, {"o": {"k": 1}})


def rule(match_model, **fields):
    names = (match_model,) if isinstance(match_model, str) else tuple(match_model)
    return llm_relay.Rule("model_rules[x]", names, tuple(fields.get("unset", ())),
                          fields.get("defaults", {}), fields.get("set", {}),
                          fields.get("extra", {}), ("default",), None)


class SelectRuleTest(unittest.TestCase):

    def select(self, rules, model):
        return llm_relay.select_rule(llm_relay.index_rules(rules), model)

    def test_first_exact_match_wins(self):
        first, second = rule("a", set={"n": 1}), rule("a", set={"n": 2})
        self.assertIs(self.select([first, second], "a"), first)

    def test_default_applies_only_when_nothing_else_matches(self):
        default, named = rule("default"), rule("a")
        self.assertIs(self.select([default, named], "a"), named)
        self.assertIs(self.select([default, named], "b"), default)
        self.assertIsNone(self.select([named], "b"))

    def test_body_without_string_model_gets_the_default(self):
        default = rule("default")
        self.assertIs(self.select([rule("a"), default], None), default)
        self.assertIs(self.select([rule("a"), default], 3), default)
        self.assertIsNone(self.select([rule("a")], None))

    def test_match_is_exact_and_case_sensitive(self):
        self.assertIsNone(self.select([rule("gpt-4")], "GPT-4"))
        self.assertIsNone(self.select([rule("gpt-4")], "gpt-4 "))

    def test_lists_and_shell_patterns_in_file_order(self):
        listed = rule(["x", "y"])
        pattern = rule("gpt-4*")
        exact_later = rule("gpt-4o")
        rules = [listed, pattern, exact_later, rule("*-embedding-?")]
        self.assertIs(self.select(rules, "y"), listed)
        self.assertIs(self.select(rules, "gpt-4o"), pattern)  # earlier wins
        self.assertIs(self.select(rules, "text-embedding-3"), rules[3])
        self.assertIsNone(self.select(rules, "text-embedding-33"))
        self.assertIsNone(self.select(rules, "GPT-4o"))
        early_exact = [rule("gpt-4o"), rule("gpt-4*")]
        self.assertIs(self.select(early_exact, "gpt-4o"), early_exact[0])


class ApplyRuleTest(unittest.TestCase):

    def test_order_is_unset_defaults_set_extra(self):
        body = {"model": "a", "drop": 1, "temperature": 0.1, "opts": {"x": 1}}
        result = llm_relay.apply_rule(body, rule(
            "a", unset=["drop", "absent", "temperature"],
            defaults={"temperature": 0.5, "top_p": 0.9, "model": "ignored"},
            set={"model": "b", "top_p": 0.95}, extra={"opts": {"y": 2}, "top_p": 1}))
        self.assertEqual(result, {"model": "b", "opts": {"x": 1, "y": 2},
                                  "temperature": 0.5, "top_p": 1})

    def test_client_value_wins_over_defaults(self):
        result = llm_relay.apply_rule({"max_tokens": 5}, rule(
            "a", defaults={"max_tokens": 100, "stop": ["\n"]}))
        self.assertEqual(result, {"max_tokens": 5, "stop": ["\n"]})

    def test_key_order_is_kept(self):
        body = {"model": "a", "messages": [], "stream": True, "top_p": 1}
        result = llm_relay.apply_rule(body, rule("a", set={"model": "b", "new": 1}))
        self.assertEqual(list(result), ["model", "messages", "stream", "top_p", "new"])

    def test_inputs_are_not_mutated(self):
        body = {"model": "a", "opts": {"x": 1}, "gone": 1}
        the_rule = rule("a", unset=["gone"], set={"s": {"deep": [1]}},
                        extra={"opts": {"y": {"z": 1}}})
        before_body, before_rule = json.dumps(body), repr(the_rule)
        result = llm_relay.apply_rule(body, the_rule)
        result["opts"]["y"]["z"] = 2
        result["s"]["deep"].append(2)
        self.assertEqual(json.dumps(body), before_body)
        self.assertEqual(repr(the_rule), before_rule)


class DeepMergeTest(unittest.TestCase):

    def test_objects_merge_recursively_and_other_values_replace(self):
        base = {"a": {"b": 1, "c": {"d": 1}}, "l": [1, 2], "s": "x", "o": {"k": 1}}
        overlay = {"a": {"c": {"e": 2}}, "l": [3], "s": {"now": "object"}, "o": 5}
        self.assertEqual(llm_relay.deep_merge(base, overlay), {
            "a": {"b": 1, "c": {"d": 1, "e": 2}}, "l": [3],
            "s": {"now": "object"}, "o": 5})

    def test_neither_input_is_mutated_and_nothing_is_shared_with_overlay(self):
        base, overlay = {"a": {"b": 1}}, {"a": {"c": [1]}, "n": {"m": 1}}
        merged = llm_relay.deep_merge(base, overlay)
        merged["a"]["c"].append(2)
        merged["n"]["m"] = 2
        self.assertEqual(base, {"a": {"b": 1}})
        self.assertEqual(overlay, {"a": {"c": [1]}, "n": {"m": 1}})


class RewriteBodyTest(unittest.TestCase):

    def test_no_rule_returns_the_client_bytes_unchanged(self):
        raw = b'{ "model" : "m",  "x": 1.50 }'
        data, model = llm_relay.rewrite_body(raw, json.loads(raw.decode()), None)
        self.assertIs(data, raw)
        self.assertEqual(model, "m")

    def test_rewritten_body_is_compact_utf8(self):
        raw = '{"model": "a", "content": "héllo ✓"}'.encode("utf-8")
        data, model = llm_relay.rewrite_body(raw, json.loads(raw.decode()),
                                             rule("a", set={"model": "b"}))
        self.assertEqual(data, '{"model":"b","content":"héllo ✓"}'.encode("utf-8"))
        self.assertEqual(model, "b")

    def test_lone_surrogate_escapes_survive(self):
        body = llm_relay.parse_json_body(b'{"model": "a", "t": "\\ud800x"}')
        data, _ = llm_relay.rewrite_body(b"", body, rule("a", set={"k": 1}))
        self.assertEqual(json.loads(data.decode("ascii"))["t"], "\ud800x")


class ParseJsonBodyTest(unittest.TestCase):

    def assert_rejected(self, raw, message_part):
        with self.assertRaises(llm_relay.RelayError) as caught:
            llm_relay.parse_json_body(raw)
        self.assertEqual(caught.exception.status, 400)
        self.assertIn(message_part, caught.exception.message)

    def test_valid_object(self):
        self.assertEqual(llm_relay.parse_json_body(b'{"a": [1, 2.5]}'),
                         {"a": [1, 2.5]})

    def test_bad_bodies_are_400(self):
        self.assert_rejected(b'{"a": "\xff"}', "UTF-8")
        self.assert_rejected(b"{'a': 1}", "not valid JSON")
        self.assert_rejected(b"", "not valid JSON")
        self.assert_rejected(b"[1]", "JSON object")
        self.assert_rejected(b'"x"', "JSON object")
        self.assert_rejected(b'{"a": NaN}', "not valid JSON")
        self.assert_rejected(b'{"a": -Infinity}', "not valid JSON")
        self.assert_rejected(b'{"a": 1e999}', "not valid JSON")
        self.assert_rejected(b"[" * 100000 + b"]" * 100000, "nested")
        self.assert_rejected(b'\xef\xbb\xbf{"a": 1}', "not valid JSON")


class HeadersTest(unittest.TestCase):

    def upstream(self, **changes):
        return config_from({"upstream": "http://up.example:8000/v1"}).upstreams[
            "default"]._replace(**changes)

    def test_strip_hop_by_hop_includes_connection_tokens(self):
        headers = [("Connection", "keep-alive, X-Secret-Hop"), ("Keep-Alive", "5"),
                   ("X-Secret-Hop", "1"), ("TE", "trailers"), ("Trailer", "x"),
                   ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
                   ("Proxy-Connection", "x"), ("Proxy-Authorization", "Basic x"),
                   ("Proxy-Authenticate", "x"), ("Content-Type", "text/plain")]
        self.assertEqual(llm_relay.strip_hop_by_hop(headers),
                         [("Content-Type", "text/plain")])
        self.assertEqual(llm_relay.connection_tokens(headers),
                         {"keep-alive", "x-secret-hop"})

    def test_upstream_headers_without_forward_auth(self):
        client = [("Host", "relay"), ("Authorization", "Bearer client"),
                  ("X-Api-Key", "k"), ("Content-Length", "999"),
                  ("Accept-Encoding", "gzip"), ("Connection", "close"),
                  ("OpenAI-Organization", "org"), ("Content-Type", "application/json")]
        headers = llm_relay.upstream_headers(
            client, self.upstream(api_key="sk-up"), False, 12, "rid")
        self.assertEqual(headers, [
            ("Host", "up.example:8000"), ("OpenAI-Organization", "org"),
            ("Content-Type", "application/json"), ("Authorization", "Bearer sk-up"),
            ("Accept-Encoding", "identity"), ("Content-Length", "12"),
            ("X-Request-Id", "rid")])

    def test_upstream_headers_with_forward_auth(self):
        headers = dict(llm_relay.upstream_headers(
            [("Authorization", "Bearer client")], self.upstream(api_key="sk-up"),
            True, None, "rid"))
        self.assertEqual(headers["Authorization"], "Bearer client")
        self.assertNotIn("Content-Length", headers)

    def test_host_header(self):
        self.assertEqual(llm_relay.host_header(self.upstream(port=80)), "up.example")
        self.assertEqual(llm_relay.host_header(self.upstream(host="::1")),
                         "[::1]:8000")

    def test_client_headers_allowlist(self):
        upstream = [("Content-Type", "text/event-stream"), ("Date", "x"),
                    ("Server", "uvicorn"), ("Content-Length", "5"),
                    ("Transfer-Encoding", "chunked"), ("Connection", "x-ratelimit-a"),
                    ("x-ratelimit-a", "hop"), ("x-ratelimit-remaining-requests", "9"),
                    ("openai-processing-ms", "3"), ("x-request-id", "req_up"),
                    ("Set-Cookie", "a=b"), ("Content-Encoding", "gzip")]
        self.assertEqual(llm_relay.client_headers(upstream), [
            ("Content-Type", "text/event-stream"),
            ("x-ratelimit-remaining-requests", "9"),
            ("openai-processing-ms", "3"), ("Content-Encoding", "gzip")])
        self.assertEqual(llm_relay.client_headers([("X-Request-Id", "same")]), [])

    def test_upstream_request_id_prefers_x_request_id_and_needs_printable(self):
        self.assertEqual(llm_relay.upstream_request_id(
            [("request-id", "req_anthropic"), ("X-Request-Id", "req_openai")]),
            "req_openai")
        self.assertEqual(llm_relay.upstream_request_id(
            [("Request-Id", "req_anthropic")]), "req_anthropic")
        self.assertEqual(llm_relay.upstream_request_id(
            [("X-Request-Id", "bad id"), ("request-id", "ok")]), "ok")
        self.assertIsNone(llm_relay.upstream_request_id(
            [("X-Request-Id", "x" * 129), ("Content-Type", "a/b")]))

    def test_event_stream_and_json_types(self):
        self.assertTrue(llm_relay.is_event_stream("Text/Event-Stream; charset=utf-8"))
        self.assertFalse(llm_relay.is_event_stream("application/json"))
        self.assertFalse(llm_relay.is_event_stream(None))
        self.assertTrue(llm_relay.is_json_type("application/json; charset=utf-8"))
        self.assertTrue(llm_relay.is_json_type("application/problem+json"))
        self.assertFalse(llm_relay.is_json_type("multipart/form-data; boundary=x"))


class SmallHelpersTest(unittest.TestCase):

    def test_openai_error_shape(self):
        self.assertEqual(llm_relay.openai_error("m", "t", "c", "p"),
                         {"error": {"message": "m", "type": "t", "param": "p",
                                    "code": "c"}})

    def test_encode_chunk_and_sse_error_event(self):
        self.assertEqual(llm_relay.encode_chunk(b"data: x\n"), b"8\r\ndata: x\n\r\n")
        self.assertEqual(llm_relay.encode_chunk(b"a" * 26)[:4], b"1a\r\n")
        event = llm_relay.sse_error_event("gone", "server_error", "upstream_error")
        self.assertTrue(event.startswith(b"data: ") and event.endswith(b"\n\n"))
        self.assertEqual(json.loads(event[6:].decode()), llm_relay.openai_error(
            "gone", "server_error", "upstream_error"))

    def test_check_api_key(self):
        keys = config_from({"api_keys": ["k1", "k2"]}).api_keys

        def check(authorization, x_api_key=None):
            return llm_relay.check_api_key(llm_relay.client_credential(
                authorization, x_api_key), keys)
        self.assertTrue(check("Bearer k2"))
        self.assertTrue(check("bearer  k1 "))
        self.assertTrue(check(None, "k1"))
        self.assertTrue(check("Basic k3", " k2 "))
        for bad in (None, "", "k1", "Basic k1", "Bearer k3", "Bearer k", "Bearer "):
            with self.subTest(bad=bad):
                self.assertFalse(check(bad), bad)
        for bad in (None, "", " ", "k3", "Bearer k1"):
            with self.subTest(bad=bad):
                self.assertFalse(check(None, bad), bad)
        self.assertFalse(check("Bearer wrong", "k1"))  # the Bearer token wins
        self.assertEqual(llm_relay.client_credential("Bearer a", "b"), "a")
        self.assertIsNone(llm_relay.client_credential("Bearer  ", " "))

    def test_split_route(self):
        self.assertEqual(llm_relay.split_route("/v1/chat/completions?x=1"),
                         ("/chat/completions", "x=1"))
        self.assertEqual(llm_relay.split_route("/chat/completions"),
                         ("/chat/completions", ""))
        self.assertEqual(llm_relay.split_route(
            "http://elsewhere:9/v1/models"), ("/models", ""))
        self.assertEqual(llm_relay.split_route("/v1x/models"), ("/v1x/models", ""))
        for bad in ("/v1/../admin", "/v1/%2e%2e/x", "/v1/./x", "/v1/a/%2E",
                    "*", "elsewhere/v1/models"):
            with self.assertRaises(llm_relay.RelayError, msg=bad) as caught:
                llm_relay.split_route(bad)
            self.assertEqual(caught.exception.status, 400)

    def test_sanitize_request_id(self):
        self.assertEqual(llm_relay.sanitize_request_id("abc-123"), "abc-123")
        for bad in (None, "", "a b", "x\r\nInjected: 1", "é", "a" * 129):
            with self.subTest(bad=bad):
                self.assertIsNone(llm_relay.sanitize_request_id(bad), bad)

    def test_redact_for_log(self):
        text = llm_relay.redact_for_log({"model": "m", "api_key": "sk-1",
                                         "nested": {"Authorization": "Bearer x",
                                                    "token": "t"},
                                         "image": "A" * 5000})
        self.assertNotIn("sk-1", text)
        self.assertNotIn("Bearer x", text)
        self.assertNotIn('"t"', text)
        self.assertIn("5000 chars", text)
        self.assertLess(len(llm_relay.redact_for_log(["x" * 150] * 100)), 4100)

    def test_printable_escapes_control_characters(self):
        self.assertEqual(llm_relay.printable("a\r\nb\x1b\x85"), "a\\x0d\\x0ab\\x1b\\x85")
        self.assertEqual(llm_relay.printable("a\u2028b\u2029"), "a\\u2028b\\u2029")

    def test_keys_with_control_characters_are_config_errors_without_the_key(self):
        error = config_error('{"upstream_api_key": "${K}"}', {"K": "sk-SECRET\r"})
        self.assertEqual(error.path, "upstream_api_key")
        self.assertNotIn("SECRET", str(error))
        self.assertEqual(config_error('{"api_keys": ["ok", "a b"]}').path, "api_keys[1]")

    def test_merge_model_lists(self):
        config = config_from({"model_rules": [
            {"match_model": ["alias", "up-1"]}, {"match_model": "gpt-*"},
            {"match_model": "default"}]})
        merged = llm_relay.merge_model_lists([
            {"data": [{"id": "up-1", "object": "model"}, {"id": "up-2"}]},
            {"data": [{"id": "up-2", "other": True}, "junk", {"id": "up-3"}]}],
            config)
        self.assertEqual([entry["id"] for entry in merged["data"]],
                         ["up-1", "up-2", "up-3", "alias"])
        self.assertEqual(merged["data"][3], {"id": "alias", "object": "model",
                                             "created": config.created,
                                             "owned_by": "llm-relay"})
        self.assertEqual(merged["object"], "list")

    def test_error_event_after_a_bare_cr_is_its_own_event(self):
        self.assertEqual(llm_relay.event_boundary(b"data: xxx\r"), b"\n\n")
        self.assertEqual(llm_relay.event_boundary(b"data: x\r\n"), b"\n")
        self.assertEqual(llm_relay.event_boundary(b"\r\n"), b"")
        self.assertEqual(llm_relay.event_boundary(b"data: x"), b"\n\n")


class RequestBodyReaderTest(unittest.TestCase):
    """The request body reader over a BytesIO: no server, no socket."""

    def reader(self, data, length, max_body_bytes=1000):
        self.completed = []
        return llm_relay.RequestBodyReader(
            io.BytesIO(data), length, max_body_bytes,
            lambda: self.completed.append(True))

    def test_a_length_framed_body_is_read_whole_and_completes_once(self):
        reader = self.reader(b'{"a": 1}next request', 8)
        self.assertFalse(reader.done)
        self.assertEqual(reader.read(), b'{"a": 1}')
        self.assertTrue(reader.done)
        self.assertEqual(self.completed, [True])

    def test_a_short_body_is_a_disconnect_and_stays_unread(self):
        reader = self.reader(b"abc", 8)
        self.assertRaises(llm_relay.ClientDisconnected, reader.read)
        self.assertFalse(reader.done)
        self.assertEqual(self.completed, [])

    def test_chunked_bodies_decode_whatever_the_chunk_sizes(self):
        cases = {
            "one chunk": b"5\r\nhello\r\n0\r\n\r\n",
            "one-byte chunks": b"".join(b"1\r\n%s\r\n" % bytes([c])
                                        for c in b"hello") + b"0\r\n\r\n",
            "extension and trailer": b"5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n",
        }
        for name, data in cases.items():
            with self.subTest(name):
                reader = self.reader(data + b"GET / HTTP/1.1", None)
                self.assertEqual(reader.read(), b"hello")
                self.assertTrue(reader.done)

    def test_chunked_blocks_gather_tiny_chunks(self):
        data = b"".join(b"1\r\nx\r\n" for _ in range(3000)) + b"0\r\n\r\n"
        reader = self.reader(data, None, max_body_bytes=10000)
        blocks = list(reader.blocks())
        self.assertEqual(b"".join(blocks), b"x" * 3000)
        self.assertEqual(len(blocks), 1, "3000 one-byte chunks, one block")
        self.assertEqual(self.completed, [True])

    def test_malformed_or_oversized_chunking_is_refused_unread(self):
        cases = {
            "not hex": (b"zz\r\nhello\r\n0\r\n\r\n", 400),
            "bare LF": (b"5\nhello\n0\n\n", 400),
            "no CRLF after the data": (b"5\r\nhelloX0\r\n\r\n", 400),
            "overlong size line": (b"1" * 5000 + b"\r\n", 400),
            "past max_body_bytes": (b"3e9\r\n" + b"x" * 1001, 413),
        }
        for name, (data, status) in cases.items():
            with self.subTest(name):
                reader = self.reader(data, None)
                with self.assertRaises(llm_relay.RelayError) as caught:
                    reader.read()
                self.assertEqual(caught.exception.status, status)
                self.assertFalse(reader.done)

    def test_a_chunked_body_cut_short_is_a_disconnect(self):
        reader = self.reader(b"5\r\nhel", None)
        self.assertRaises(llm_relay.ClientDisconnected, reader.read)


class ClientBodyWriterTest(unittest.TestCase):
    """The client body writer over a BytesIO: no server, no socket."""

    def test_chunked_writes_are_one_chunk_each_then_the_last_chunk(self):
        out = io.BytesIO()
        writer = llm_relay.ClientBodyWriter(out.write, True)
        writer.write(b"data: 1\n")
        writer.write(b"")  # nothing to send is not the last chunk
        writer.finish()
        self.assertEqual(out.getvalue(), b"8\r\ndata: 1\n\r\n0\r\n\r\n")

    def test_unchunked_writes_go_as_they_are(self):
        out = io.BytesIO()
        writer = llm_relay.ClientBodyWriter(out.write, False)
        writer.write(b"abc")
        writer.finish()
        self.assertEqual(out.getvalue(), b"abc")

    def test_a_client_that_left_is_not_written_to(self):
        class Gone(object):
            client_gone = True
        out = io.BytesIO()
        writer = llm_relay.ClientBodyWriter(out.write, True, Gone())
        self.assertRaises(llm_relay.ClientDisconnected, writer.write, b"x")
        self.assertEqual(out.getvalue(), b"")


# -- Protocol translators ------------------------------------------------------

def chat_chunk(delta=None, finish_reason=None, usage=None, choices=True, **extra):
    """Return one chat completions chunk dict as an upstream streams it."""
    chunk = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
             "model": "qwen3-coder"}
    chunk["choices"] = [dict({"index": 0, "delta": delta or {},
                              "finish_reason": finish_reason}, **extra)] if choices else []
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_sse(chunks, done=True):
    """Return the SSE lines (bytes) of a chat completions stream."""
    lines = []
    for chunk in chunks:
        lines += [b"data: " + json.dumps(chunk).encode("utf-8") + b"\n", b"\n"]
    return lines + ([b"data: [DONE]\n", b"\n"] if done else [])


def parse_sse_events(data):
    """Return [(event name, data dict)] from SSE bytes with named events."""
    events = []
    for block in data.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        if "data" in fields:  # else a comment (": ping")
            events.append((fields.get("event"), json.loads(fields["data"])))
    return events


def run_translator(translator, lines):
    """Feed SSE lines to a stream translator; return its parsed events."""
    data = translator.start()
    for line in lines:
        data += translator.feed_line(line)
    return parse_sse_events(data + translator.finish())


# A recorded-shape stream with every pitfall: reasoning in both field names,
# <think> tags split across chunks, text, two calls in one chunk, a call that
# shares index 0 with the first (told apart by its id), arguments split
# across chunks, "stop" although calls went out, usage after the finish.
PITFALL_STREAM = [
    chat_chunk({"role": "assistant", "content": ""}),
    chat_chunk({"reasoning_content": "Plan: "}),
    chat_chunk({"reasoning": "read first."}),
    chat_chunk({"content": "I will "}),
    chat_chunk({"content": "look."}),
    chat_chunk({"tool_calls": [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "Read", "arguments": "{\"path\": "}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"a.txt\"}"}}]}),
    chat_chunk({"tool_calls": [
        {"index": 0, "id": "call_b", "type": "function",
         "function": {"name": "Bash", "arguments": "{\"command\": \"ls\"}"}},
        {"index": 1, "id": "call_c", "type": "function",
         "function": {"name": "Grep", "arguments": ""}}]}),
    chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{\"q\":"}}]}),
    chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": " 1}"}}]}),
    chat_chunk({}, finish_reason="stop"),
    chat_chunk(choices=False, usage={"prompt_tokens": 120, "completion_tokens": 42,
                                     "total_tokens": 162}),
]


def assert_anthropic_grammar(test, events):
    """Check the Anthropic streaming grammar: message_start first; blocks
    start, get deltas of their own kind and stop, one at a time, indexes
    0, 1, ...; then message_delta and message_stop last (pings anywhere)."""
    events = [event for event in events if event[0] != "ping"]
    test.assertEqual(events[0][0], "message_start")
    test.assertEqual([name for name, _ in events[-2:]], ["message_delta", "message_stop"])
    delta_kinds = {"text": "text_delta", "thinking": "thinking_delta",
                   "tool_use": "input_json_delta"}
    open_block, next_index = None, 0
    for name, data in events[1:-2]:
        test.assertEqual(name, data["type"])
        if name == "content_block_start":
            test.assertIsNone(open_block, "blocks interleaved")
            test.assertEqual(data["index"], next_index)
            open_block = data["content_block"]["type"]
        elif name == "content_block_delta":
            test.assertEqual(data["index"], next_index)
            test.assertEqual(data["delta"]["type"], delta_kinds[open_block])
        else:
            test.assertEqual(name, "content_block_stop")
            test.assertEqual(data["index"], next_index)
            open_block, next_index = None, next_index + 1
    test.assertIsNone(open_block)


def anthropic_blocks(events):
    """Rebuild the content blocks a client would assemble from events."""
    blocks = []
    for name, data in events:
        if name == "content_block_start":
            block = dict(data["content_block"])
            if block["type"] == "tool_use":
                block["partial"] = ""
            blocks.append(block)
        elif name == "content_block_delta":
            delta, block = data["delta"], blocks[data["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                block["partial"] += delta["partial_json"]
    for block in blocks:
        if block["type"] == "tool_use":
            block["input"] = json.loads(block.pop("partial") or "{}")
    return blocks


class MessagesRequestTranslationTest(unittest.TestCase):
    """Anthropic Messages request -> chat completions request."""

    def translate(self, body):
        return llm_relay.messages_to_chat_request(body)

    def test_claude_code_conversation(self):
        body = {
            "model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code."},
                       {"type": "text", "text": "Be brief.",
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "list files",
                                              "cache_control": {"type": "ephemeral"}}]},
                {"role": "system", "content": "# Environment\ncwd: /w"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "xyz"},
                    {"type": "text", "text": "Running two tools."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                     "input": {"command": "ls"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "Read",
                     "input": {"file_path": "/w/a.png"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1",
                     "content": "a.png\nb.txt", "cache_control": {"type": "ephemeral"}},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "too big"},
                                 {"type": "image", "source": {
                                     "type": "base64", "media_type": "image/png",
                                     "data": "iVBOR"}}]},
                    {"type": "text", "text": "<system-reminder>go on</system-reminder>"}]},
            ],
            "tools": [{"name": "Bash", "description": "Run a command",
                       "input_schema": {"type": "object", "properties": {
                           "command": {"type": "string"}}},
                       "cache_control": {"type": "ephemeral"}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "metadata": {"user_id": "user-7"},
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"},
            "context_management": {"edits": []},
            "stop_sequences": ["</answer>"], "temperature": 0.2, "top_k": 40,
        }
        translated = self.translate(body)
        chat = translated.body
        self.assertEqual(chat["messages"], [
            {"role": "system", "content":
             "You are Claude Code.\n\nBe brief.\n\n# Environment\ncwd: /w"},
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": "Running two tools.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {
                    "name": "Bash", "arguments": "{\"command\":\"ls\"}"}},
                {"id": "toolu_2", "type": "function", "function": {
                    "name": "Read", "arguments": "{\"file_path\":\"/w/a.png\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "a.png\nb.txt"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: too big"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                {"type": "text", "text": "<system-reminder>go on</system-reminder>"}]},
        ])
        self.assertEqual(chat["tools"], [{"type": "function", "function": {
            "name": "Bash", "description": "Run a command", "parameters": {
                "type": "object", "properties": {"command": {"type": "string"}}}}}])
        self.assertEqual(chat["tool_choice"], "auto")
        self.assertIs(chat["parallel_tool_calls"], False)
        self.assertEqual(chat["stop"], ["</answer>"])
        self.assertEqual(translated.stop_sequences, ("</answer>",))
        self.assertEqual((chat["max_tokens"], chat["temperature"], chat["top_k"],
                          chat["user"], chat["reasoning_effort"]),
                         (32000, 0.2, 40, "user-7", "medium"))
        self.assertEqual(chat["stream_options"], {"include_usage": True})
        for key in ("system", "metadata", "thinking", "output_config",
                    "context_management", "stop_sequences"):
            self.assertNotIn(key, chat)
        self.assertNotIn("cache_control", json.dumps(chat))
        self.assertEqual(translated.notes, ["tools web_search (not client tools)"])

    def test_tool_choice_and_thinking_budgets(self):
        tools = [{"name": "f", "input_schema": {"type": "object"}}]
        cases = [({"type": "any"}, "required"), ({"type": "none"}, "none"),
                 ({"type": "tool", "name": "f"},
                  {"type": "function", "function": {"name": "f"}})]
        for choice, expected in cases:
            chat = self.translate({"model": "m", "messages": [], "tools": tools,
                                   "tool_choice": choice}).body
            self.assertEqual(chat["tool_choice"], expected)
        for budget, effort in ((1024, "low"), (8000, "medium"), (32000, "high")):
            chat = self.translate({"model": "m", "messages": [], "thinking": {
                "type": "enabled", "budget_tokens": budget}}).body
            self.assertEqual(chat["reasoning_effort"], effort)
        chat = self.translate({"model": "m", "messages": [],
                               "thinking": {"type": "disabled"}}).body
        self.assertNotIn("reasoning_effort", chat)
        self.assertNotIn("stream", chat)

    def test_image_url_and_string_content(self):
        chat = self.translate({"model": "m", "system": "sys", "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "url",
                                             "url": "https://x/cat.jpg"}}]},
            {"role": "assistant", "content": "a cat"}]}).body
        self.assertEqual(chat["messages"], [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.jpg"}}]},
            {"role": "assistant", "content": "a cat"}])

    def test_unknown_blocks_are_noted(self):
        translated = self.translate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "search_result", "x": 1},
                                         {"type": "text", "text": "hi"}]}]})
        self.assertEqual(translated.body["messages"], [{"role": "user", "content": "hi"}])
        self.assertEqual(translated.notes, ["user block search_result"])


class MessagesAnswerTranslationTest(unittest.TestCase):
    """Chat completions answers -> Anthropic Messages answers."""

    def answer(self, message, finish_reason="stop", usage=None, **choice):
        chat = {"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen3",
                "choices": [dict({"index": 0, "message": message,
                                  "finish_reason": finish_reason}, **choice)]}
        if usage is not None:
            chat["usage"] = usage
        return chat

    def test_reasoning_text_and_tool_calls(self):
        chat = self.answer({"role": "assistant", "reasoning_content": "think",
                            "content": "Let me check.", "tool_calls": [
                                {"id": "call_1", "type": "function", "function": {
                                    "name": "Bash", "arguments": "{\"command\":\"ls\"}"}},
                                {"id": "call_2", "type": "function", "function": {
                                    "name": "Read", "arguments": "not json"}}]},
                           usage={"prompt_tokens": 50, "completion_tokens": 9,
                                  "total_tokens": 59,
                                  "prompt_tokens_details": {"cached_tokens": 20}})
        message = llm_relay.chat_to_messages_response(chat, "claude-x", message_id="msg_1")
        self.assertEqual(message, {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "qwen3",
            "content": [
                {"type": "thinking", "thinking": "think", "signature": ""},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "Bash",
                 "input": {"command": "ls"}},
                {"type": "tool_use", "id": "call_2", "name": "Read",
                 "input": {"arguments": "not json"}}],
            # "stop" from the upstream, but tool_use blocks went out
            "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": 30, "output_tokens": 9,
                      "cache_read_input_tokens": 20}})

    def test_think_tags_in_content(self):
        chat = self.answer({"role": "assistant",
                            "content": "<think>\nstep 1\n</think>\n\nThe answer."})
        content = llm_relay.chat_to_messages_response(chat, "m")["content"]
        self.assertEqual(content, [{"type": "thinking", "thinking": "\nstep 1\n",
                                    "signature": ""},
                                   {"type": "text", "text": "The answer."}])

    def test_stop_reasons_and_missing_usage(self):
        length = llm_relay.chat_to_messages_response(self.answer(
            {"role": "assistant", "content": "cut"}, "length"), "m")
        self.assertEqual(length["stop_reason"], "max_tokens")
        self.assertEqual(length["usage"], {"input_tokens": 0, "output_tokens": 0})
        matched = llm_relay.chat_to_messages_response(self.answer(
            {"role": "assistant", "content": "x"}, "stop", stop_reason="END"), "m",
            stop_sequences=("END",))
        self.assertEqual((matched["stop_reason"], matched["stop_sequence"]),
                         ("stop_sequence", "END"))
        plain = llm_relay.chat_to_messages_response(self.answer(
            {"role": "assistant", "content": None}, "stop"), "asked")
        self.assertEqual((plain["stop_reason"], plain["content"], plain["model"]),
                         ("end_turn", [], "qwen3"))


class ThinkTagSplitterTest(unittest.TestCase):
    def split(self, pieces):
        splitter = llm_relay.ThinkTagSplitter()
        out = []
        for piece in pieces:
            out += splitter.feed(piece)
        return llm_relay.collect_pieces(out + splitter.flush())

    def test_tags_split_at_every_position(self):
        text = "<think>a<b</think>\n\nanswer <think> kept"
        for cut in range(1, len(text)):
            self.assertEqual(self.split([text[:cut], text[cut:]]),
                             [["thinking", "a<b"], ["text", "answer <think> kept"]],
                             "cut at %d" % cut)
        self.assertEqual(self.split(list(text)),
                         [["thinking", "a<b"], ["text", "answer <think> kept"]])

    def test_text_without_tags_and_unclosed_reasoning(self):
        self.assertEqual(self.split(["  <thi", "nk", "ing is fun"]),
                         [["text", "  <thinking is fun"]])
        self.assertEqual(self.split(["<think>never closed</th"]),
                         [["thinking", "never closed</th"]])
        self.assertEqual(self.split(["<", "t"]), [["text", "<t"]])


class MessagesStreamTranslationTest(unittest.TestCase):
    """Chat completions SSE -> the Anthropic event grammar."""

    def translator(self, **options):
        options.setdefault("message_id", "msg_1")
        return llm_relay.MessagesStreamTranslator("claude-x", **options)

    def test_pitfall_stream(self):
        events = run_translator(self.translator(input_tokens=7), chat_sse(PITFALL_STREAM))
        assert_anthropic_grammar(self, events)
        start = events[0][1]["message"]
        self.assertEqual((start["id"], start["model"], start["content"], start["usage"]),
                         ("msg_1", "claude-x", [], {"input_tokens": 7, "output_tokens": 0}))
        self.assertEqual(anthropic_blocks(events), [
            {"type": "thinking", "thinking": "Plan: read first.", "signature": ""},
            {"type": "text", "text": "I will look."},
            {"type": "tool_use", "id": "call_a", "name": "Read", "input": {"path": "a.txt"}},
            {"type": "tool_use", "id": "call_b", "name": "Bash", "input": {"command": "ls"}},
            {"type": "tool_use", "id": "call_c", "name": "Grep", "input": {"q": 1}}])
        self.assertEqual(events[-2][1], {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"input_tokens": 120, "output_tokens": 42}})
        self.assertEqual(events[-1][1], {"type": "message_stop"})
        self.assertNotIn(b"[DONE]", json.dumps(events).encode())

    def test_every_line_split_keeps_grammar(self):
        """Calls without ids at one index, tags split, text after a call."""
        chunks = [chat_chunk({"content": "<th"}), chat_chunk({"content": "ink>x</thi"}),
                  chat_chunk({"content": "nk>hi"}),
                  chat_chunk({"tool_calls": [{"index": 0, "function": {
                      "name": "a", "arguments": "{}"}}]}),
                  chat_chunk({"tool_calls": [{"index": 0, "function": {
                      "name": "b", "arguments": "{\"k\""}}]}),
                  chat_chunk({"tool_calls": [{"index": 0, "function": {
                      "arguments": ": 2}"}}]}),
                  chat_chunk({"content": " done"}, finish_reason="tool_calls")]
        events = run_translator(self.translator(), chat_sse(chunks, done=False))
        assert_anthropic_grammar(self, events)
        blocks = anthropic_blocks(events)
        self.assertEqual([(b["type"], b.get("name"), b.get("input")) for b in blocks], [
            ("thinking", None, None), ("text", None, None), ("tool_use", "a", {}),
            ("tool_use", "b", {"k": 2}), ("text", None, None)])
        self.assertEqual((blocks[0]["thinking"], blocks[1]["text"], blocks[4]["text"]),
                         ("x", "hi", " done"))
        self.assertTrue(blocks[2]["id"].startswith("call_"))
        self.assertNotEqual(blocks[2]["id"], blocks[3]["id"])
        self.assertEqual(events[-2][1]["usage"], {"input_tokens": 0, "output_tokens": 0})

    def test_message_delta_waits_for_the_usage_chunk(self):
        translator = self.translator()
        translator.start()
        lines = chat_sse([chat_chunk({"content": "hi"}),
                          chat_chunk({}, finish_reason="length")])
        emitted = b"".join(translator.feed_line(line) for line in lines)
        self.assertNotIn(b"message_delta", emitted)
        self.assertTrue(translator.done)
        events = parse_sse_events(translator.finish())
        self.assertEqual([name for name, _ in events],
                         ["content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(events[1][1]["delta"]["stop_reason"], "max_tokens")

    def test_stop_sequence_and_upstream_error(self):
        events = run_translator(self.translator(stop_sequences=("###",)), chat_sse([
            chat_chunk({"content": "a"}), chat_chunk({}, "stop", stop_reason="###")]))
        self.assertEqual(events[-2][1]["delta"],
                         {"stop_reason": "stop_sequence", "stop_sequence": "###"})
        translator = self.translator()
        with self.assertRaises(llm_relay.UpstreamStreamError) as caught:
            translator.feed_line(b'data: {"error": {"message": "out of memory"}}\n')
        self.assertEqual(str(caught.exception), "out of memory")
        self.assertEqual(parse_sse_events(translator.fail("cut")), [
            ("error", {"type": "error", "error": {"type": "api_error",
                                                  "message": "cut"}})])
        self.assertEqual(parse_sse_events(translator.ping()), [("ping", {"type": "ping"})])
        with self.assertRaises(ValueError):
            translator.feed_line(b"data: {not json\n")

    def test_comments_and_blank_lines_are_ignored(self):
        translator = self.translator()
        for line in (b": keep-alive\n", b"\n", b"event: x\n", b"data:\n"):
            self.assertEqual(translator.feed_line(line), b"")


class ResponsesRequestTranslationTest(unittest.TestCase):
    """OpenAI Responses request -> chat completions request."""

    APPLY_PATCH = {"type": "custom", "name": "apply_patch",
                   "description": "Edit files with a patch.",
                   "format": {"type": "grammar", "syntax": "lark",
                              "definition": "start: begin_patch hunk+ end_patch"}}

    def test_codex_turn(self):
        body = {
            "model": "gpt-5-codex", "instructions": "You are Codex.", "store": False,
            "stream": True, "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "abc", "parallel_tool_calls": False,
            "reasoning": {"effort": "high", "summary": "auto"},
            "input": [
                {"type": "message", "role": "developer", "content": [
                    {"type": "input_text", "text": "sandbox: workspace-write"}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "fix the bug"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [],
                 "encrypted_content": "xx"},
                {"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": "Looking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "shell",
                 "arguments": "{\"command\":[\"ls\"]}"},
                {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch",
                 "input": "*** Begin Patch\n*** End Patch\n"},
                {"type": "function_call_output", "call_id": "call_1", "output": "a.py"},
                {"type": "custom_tool_call_output", "call_id": "call_2",
                 "output": "Done!"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [{"type": "function", "name": "shell", "description": "Run",
                       "strict": False, "parameters": {"type": "object", "properties": {
                           "command": {"type": "array"}}}},
                      self.APPLY_PATCH, {"type": "web_search"},
                      {"type": "local_shell"}],
            "tool_choice": "auto", "max_output_tokens": 4096,
            "text": {"format": {"type": "json_schema", "name": "out", "strict": True,
                                "schema": {"type": "object"}}},
            "temperature": 0.1, "top_p": 0.9, "user": "u1",
        }
        translated = llm_relay.responses_to_chat_request(body)
        chat = translated.body
        self.assertEqual(chat["messages"], [
            {"role": "system", "content": "You are Codex.\n\nsandbox: workspace-write"},
            {"role": "user", "content": [
                {"type": "text", "text": "fix the bug"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
            {"role": "assistant", "content": "Looking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "shell", "arguments": "{\"command\":[\"ls\"]}"}},
                {"id": "call_2", "type": "function", "function": {
                    "name": "apply_patch",
                    "arguments": "{\"input\":\"*** Begin Patch\\n*** End Patch\\n\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a.py"},
            {"role": "tool", "tool_call_id": "call_2", "content": "Done!"},
            {"role": "user", "content": "thanks"}])
        self.assertEqual([tool["function"]["name"] for tool in chat["tools"]],
                         ["shell", "apply_patch"])
        patch_parameters = chat["tools"][1]["function"]["parameters"]
        self.assertEqual(patch_parameters["required"], ["input"])
        self.assertIn("start: begin_patch hunk+ end_patch",
                      patch_parameters["properties"]["input"]["description"])
        self.assertEqual(translated.custom_tools, frozenset(["apply_patch"]))
        self.assertEqual(translated.notes, ["tools of type web_search, local_shell"])
        self.assertEqual(chat["response_format"], {"type": "json_schema", "json_schema": {
            "name": "out", "schema": {"type": "object"}, "strict": True}})
        self.assertEqual((chat["max_tokens"], chat["reasoning_effort"], chat["tool_choice"],
                          chat["parallel_tool_calls"], chat["temperature"], chat["top_p"],
                          chat["user"]), (4096, "high", "auto", False, 0.1, 0.9, "u1"))
        self.assertEqual((chat["stream"], chat["stream_options"]),
                         (True, {"include_usage": True}))
        for key in ("input", "instructions", "store", "include", "prompt_cache_key",
                    "reasoning", "text", "max_output_tokens"):
            self.assertNotIn(key, chat)

    def test_string_input_and_named_tool_choice(self):
        chat = llm_relay.responses_to_chat_request({
            "model": "m", "input": "hi", "tools": [self.APPLY_PATCH],
            "tool_choice": {"type": "custom", "name": "apply_patch"},
            "text": {"format": {"type": "text"}}}).body
        self.assertEqual(chat["messages"], [{"role": "user", "content": "hi"}])
        self.assertEqual(chat["tool_choice"], {"type": "function",
                                               "function": {"name": "apply_patch"}})
        self.assertNotIn("response_format", chat)
        self.assertNotIn("stream", chat)

    def test_state_is_refused(self):
        for extra, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                             ({"store": True}, "store"),
                             ({"conversation": "conv_1"}, "conversation")):
            with self.assertRaises(llm_relay.RelayError) as caught:
                llm_relay.responses_to_chat_request(dict({"model": "m", "input": "x"},
                                                         **extra))
            self.assertEqual((caught.exception.status, caught.exception.param),
                             (400, param))
            self.assertIn("stateless", caught.exception.message)


class ResponsesAnswerTranslationTest(unittest.TestCase):
    """Chat completions answers -> Responses API objects and events."""

    REQUEST = {"model": "gpt-5-codex", "input": "x", "tools": []}

    def test_whole_answer(self):
        chat = {"id": "c", "model": "qwen3", "choices": [{"index": 0, "finish_reason":
                "tool_calls", "message": {
                    "role": "assistant", "content": "<think>why</think>Patching.",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {
                            "name": "apply_patch",
                            "arguments": "{\"input\": \"*** Begin Patch\\n\"}"}},
                        {"id": "call_2", "type": "function", "function": {
                            "name": "shell", "arguments": "{\"command\": [\"ls\"]}"}}]}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        response = llm_relay.chat_to_responses_response(
            chat, "gpt-5-codex", self.REQUEST, frozenset(["apply_patch"]),
            response_id="resp_1", created_at=5)
        self.assertEqual((response["id"], response["object"], response["status"],
                          response["model"], response["created_at"]),
                         ("resp_1", "response", "completed", "qwen3", 5))
        output = [dict((key, value) for key, value in item.items() if key != "id")
                  for item in response["output"]]
        self.assertEqual(output, [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "why"}]},
            {"type": "message", "status": "completed", "role": "assistant", "content": [
                {"type": "output_text", "text": "Patching.", "annotations": [],
                 "logprobs": []}]},
            {"type": "custom_tool_call", "status": "completed", "call_id": "call_1",
             "name": "apply_patch", "input": "*** Begin Patch\n"},
            {"type": "function_call", "status": "completed", "call_id": "call_2",
             "name": "shell", "arguments": "{\"command\": [\"ls\"]}"}])
        self.assertEqual(response["usage"], {
            "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 15})

    def test_length_is_incomplete(self):
        chat = {"choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "cut"}}]}
        response = llm_relay.chat_to_responses_response(chat, "m", self.REQUEST)
        self.assertEqual((response["status"], response["incomplete_details"]),
                         ("incomplete", {"reason": "max_output_tokens"}))
        self.assertEqual(response["usage"]["total_tokens"], 0)

    def assert_responses_grammar(self, events):
        self.assertEqual([data["sequence_number"] for _, data in events],
                         list(range(len(events))))
        self.assertEqual([name for name, _ in events[:2]],
                         ["response.created", "response.in_progress"])
        open_item, next_index = None, 0
        for name, data in events:
            self.assertEqual(name, data["type"])
            if name == "response.output_item.added":
                self.assertIsNone(open_item)
                self.assertEqual(data["output_index"], next_index)
                open_item = data["item"]["id"]
            elif name == "response.output_item.done":
                self.assertEqual(data["item"]["id"], open_item)
                open_item, next_index = None, next_index + 1
            elif "item_id" in data:
                self.assertEqual((data["item_id"], data["output_index"]),
                                 (open_item, next_index))
        self.assertIsNone(open_item)

    def test_stream(self):
        chunks = PITFALL_STREAM[:4] + [
            chat_chunk({"tool_calls": [{"index": 2, "id": "call_p", "function": {
                "name": "apply_patch", "arguments": "{\"input\": \"*** Begin"}}]}),
            chat_chunk({"tool_calls": [{"index": 2, "function": {
                "arguments": " Patch\\n\"}"}}]})] + PITFALL_STREAM[5:]
        translator = llm_relay.ResponsesStreamTranslator(
            "gpt-5-codex", self.REQUEST, frozenset(["apply_patch"]), "resp_1", 5)
        events = run_translator(translator, chat_sse(chunks))
        self.assert_responses_grammar(events)
        names = [name for name, _ in events]
        self.assertEqual(names[-1], "response.completed")
        self.assertIn("response.custom_tool_call_input.done", names)
        self.assertEqual(names[2:6], ["response.output_item.added",
                                      "response.reasoning_summary_part.added",
                                      "response.reasoning_summary_text.delta",
                                      "response.reasoning_summary_text.delta"])
        final = events[-1][1]["response"]
        self.assertEqual([(item["type"], item.get("name")) for item in final["output"]], [
            ("reasoning", None), ("message", None), ("custom_tool_call", "apply_patch"),
            ("function_call", "Read"), ("function_call", "Bash"), ("function_call", "Grep")])
        self.assertEqual(final["output"][1]["content"][0]["text"], "I will ")
        self.assertEqual(final["output"][2]["input"], "*** Begin Patch\n")
        self.assertEqual(final["output"][3]["arguments"], "{\"path\": \"a.txt\"}")
        self.assertEqual(final["usage"]["total_tokens"], 162)
        done = [data for name, data in events if name.endswith("output_item.done")]
        self.assertEqual([item["item"] for item in done], final["output"])
        arguments = "".join(data["delta"] for name, data in events if name ==
                            "response.function_call_arguments.delta" and
                            data["item_id"] == final["output"][5]["id"])
        self.assertEqual(arguments, "{\"q\": 1}")
        text = [data for name, data in events if name == "response.output_text.done"]
        self.assertEqual(text[0]["text"], "I will ")
        self.assertEqual(events[0][1]["response"]["status"], "in_progress")

    def test_incomplete_and_failed(self):
        translator = llm_relay.ResponsesStreamTranslator("m", self.REQUEST)
        events = run_translator(translator, chat_sse([
            chat_chunk({"content": "a"}), chat_chunk({}, "length")]))
        self.assertEqual(events[-1][0], "response.incomplete")
        self.assertEqual(events[-1][1]["response"]["status"], "incomplete")
        translator = llm_relay.ResponsesStreamTranslator("m", self.REQUEST)
        translator.start()
        translator.feed_line(chat_sse([chat_chunk({"content": "a"})])[0])
        failed = parse_sse_events(translator.fail("upstream dropped"))
        self.assertEqual(failed[0][0], "response.failed")
        self.assertEqual(failed[0][1]["sequence_number"], 5)
        self.assertEqual(failed[0][1]["response"]["error"],
                         {"code": "server_error", "message": "upstream dropped"})
        self.assertEqual(failed[0][1]["response"]["status"], "failed")


SHIPPED_RULES = [
    {"match_model": "gpt-3.5-turbo", "unset": ["presence_penalty"],
     "set": {"model": "qwen2.5-72b-instruct", "temperature": 0.7, "top_p": 0.9},
     "extra": {"custom_param": "value"}},
    {"match_model": "default", "set": {"temperature": 0.7, "top_p": 0.95}}]


class CommandLineUnitsTest(unittest.TestCase):
    """--listen, --upstream, --explain and the demo upstream, without sockets."""

    def test_override_settings_replaces_listen_and_the_default_upstream(self):
        override = llm_relay.override_settings
        raw = {"listen": "0.0.0.0:8080", "upstream": "http://a/v1",
               "upstreams": {"b": {"url": "http://b/v1"}}}
        self.assertEqual(override(raw, "127.0.0.1:9", "http://x/v1"), {
            "listen": "127.0.0.1:9", "upstream": "http://x/v1",
            "upstreams": {"b": {"url": "http://b/v1"}}})
        self.assertEqual(raw["upstream"], "http://a/v1")  # not mutated
        self.assertEqual(override(raw, upstream="http://x/v1", every_upstream=True)[
            "upstreams"], {"b": {"url": "http://x/v1"}})
        named_default = {"upstreams": {"default": {"url": "http://d/v1",
                                                   "read_timeout": 5}}}
        self.assertEqual(override(named_default, upstream="http://x/v1"), {
            "upstreams": {"default": {"url": "http://x/v1", "read_timeout": 5}}})
        self.assertEqual(override({}, upstream="http://x/v1"), {"upstream": "http://x/v1"})
        both = dict(named_default, upstream="http://a/v1")
        self.assertEqual(override(both, upstream="http://x/v1")["upstreams"], {
            "default": {"url": "http://x/v1", "read_timeout": 5}})
        group = {"upstreams": {"g1": {"url": "http://g1/v1"},
                               "default": {"replicas": ["g1"]}}}
        self.assertEqual(override(group, upstream="http://x/v1")["upstreams"], {
            "g1": {"url": "http://g1/v1"}, "default": {"url": "http://x/v1"}})
        self.assertEqual(override(group, upstream="http://x/v1", every_upstream=True)[
            "upstreams"], {"g1": {"url": "http://x/v1"}, "default": {"replicas": ["g1"]}})
        config = llm_relay.default_config({"listen": "127.0.0.1:0",
                                           "upstream": "https://x:8443/v1"})
        self.assertEqual((config.listen_host, config.listen_port), ("127.0.0.1", 0))
        upstream = config.upstreams["default"]
        self.assertEqual((upstream.scheme, upstream.host, upstream.port,
                          upstream.base_path), ("https", "x", 8443, "/v1"))

    def test_explain_names_the_rule_its_effects_the_chain_and_the_body(self):
        config = config_from({"upstreams": {"gpu": {"url": "http://gpu/v1"}},
                              "model_rules": [dict(SHIPPED_RULES[0], defaults={
                                  "max_tokens": 64, "seed": 1},
                                  upstream=["gpu", "default"])]})
        report = llm_relay.explain_request(config, {
            "model": "gpt-3.5-turbo", "presence_penalty": 1, "seed": 7})
        self.assertEqual(report, "\n".join([
            'model: "gpt-3.5-turbo"',
            'rule: model_rules[0] (match_model "gpt-3.5-turbo")',
            "  removed: presence_penalty", "  filled in: max_tokens",
            "  set: model, temperature, top_p", "  merged: custom_param",
            "upstream: gpu (http://gpu/v1) > default (http://localhost:11434/v1)",
            'model sent: "qwen2.5-72b-instruct"', "body sent:",
            json.dumps({"model": "qwen2.5-72b-instruct", "seed": 7, "max_tokens": 64,
                        "temperature": 0.7, "top_p": 0.9, "custom_param": "value"},
                       indent=2)]) + "\n")
        report = llm_relay.explain_request(config, {"model": "llama3"})
        self.assertIn("rule: none matches; the body is sent unchanged\n"
                      "upstream: default (http://localhost:11434/v1)\n", report)

    def test_explain_names_the_members_of_a_replica_group(self):
        config = config_from({"upstreams": {
            "gpu1": {"url": "http://gpu1/v1"}, "gpu2": {"url": "http://gpu2/v1"},
            "pool": {"replicas": ["gpu1", "gpu2"]}, "default": {"replicas": ["gpu2"]}},
            "model_rules": [{"match_model": "qwen*", "upstream": ["pool", "gpu1"]}]})
        self.assertIn("upstream: pool (replicas gpu1 http://gpu1/v1, gpu2 http://gpu2/v1)"
                      " > gpu1 (http://gpu1/v1)\n",
                      llm_relay.explain_request(config, {"model": "qwen3"}))
        self.assertIn("upstream: default (replicas gpu2 http://gpu2/v1)\n",
                      llm_relay.explain_request(config, {"model": "llama3"}))

    def test_demo_text_tells_what_the_rule_did(self):
        config = config_from({"model_rules": SHIPPED_RULES})
        describe = llm_relay.describe_demo_request
        self.assertEqual(describe(config, {
            "model": "qwen2.5-72b-instruct", "messages": [], "temperature": 0.7,
            "top_p": 0.9, "custom_param": "value"}),
            "Demo upstream got model qwen2.5-72b-instruct from model_rules[0] "
            "(gpt-3.5-turbo), which sets model, temperature, top_p; removes "
            "presence_penalty; merges custom_param. Parameters: "
            'custom_param="value", temperature=0.7, top_p=0.9.')
        self.assertEqual(describe(config, {"model": "llama3", "temperature": 0.7,
                                           "top_p": 0.95}),
                         "Demo upstream got model llama3 from model_rules[1] "
                         "(default), which sets temperature, top_p. Parameters: "
                         "temperature=0.7, top_p=0.95.")
        self.assertEqual(describe(config_from({}), {"model": "m", "prompt": "x"}),
                         "Demo upstream got model m; no rule changed the request.")

    def test_demo_answers_in_openai_shapes(self):
        config = config_from({"model_rules": SHIPPED_RULES})
        status, listing, stream = llm_relay.demo_answer(config, "/models", {})
        self.assertEqual((status, stream, [entry["id"] for entry in listing["data"]]),
                         (200, False, ["llm-relay-demo", "qwen2.5-72b-instruct"]))
        status, answer, stream = llm_relay.demo_answer(
            config, "/chat/completions", {"model": "llama3", "messages": []})
        self.assertEqual((status, stream, answer["object"], answer["model"],
                          answer["choices"][0]["message"]["role"],
                          answer["choices"][0]["finish_reason"]),
                         (200, False, "chat.completion", "llama3", "assistant", "stop"))
        self.assertEqual(set(answer["usage"]), {"prompt_tokens", "completion_tokens",
                                                "total_tokens"})
        events = list(llm_relay.demo_stream_events(answer, include_usage=True))
        self.assertEqual(events[-1], b"data: [DONE]\n\n")
        chunks = [json.loads(event[6:].decode()) for event in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant",
                                                            "content": ""})
        self.assertEqual("".join(chunk["choices"][0]["delta"].get("content", "")
                                 for chunk in chunks[:-1]),
                         answer["choices"][0]["message"]["content"])
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual((chunks[-1]["choices"], chunks[-1]["usage"]),
                         ([], answer["usage"]))
        self.assertTrue(all(chunk["object"] == "chat.completion.chunk"
                            for chunk in chunks))
        status, answer, stream = llm_relay.demo_answer(
            config, "/completions", {"model": "m", "prompt": "hi", "stream": True})
        self.assertEqual((answer["object"], stream), ("text_completion", True))
        events = list(llm_relay.demo_stream_events(answer, include_usage=False))
        texts = [json.loads(event[6:].decode())["choices"][0]["text"]
                 for event in events[:-1]]
        self.assertEqual("".join(texts), answer["choices"][0]["text"])
        status, error, _ = llm_relay.demo_answer(config, "/embeddings", {})
        self.assertEqual((status, error["error"]["code"]), (404, "unknown_url"))

    def test_config_file_signature_sees_a_swapped_file_with_equal_size_and_mtime(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        first, second = os.path.join(directory, "a"), os.path.join(directory, "b")
        for path in (first, second):
            with open(path, "w") as handle:
                handle.write("{}")
            os.utime(path, (1000000000, 1000000000))
        signature = llm_relay.config_file_signature
        self.assertNotEqual(signature(first), signature(second))
        self.assertEqual(signature(first), signature(first))
        self.assertIsNone(signature(os.path.join(directory, "missing")))


###############################################################################
# Fake upstream ###############################################################
###############################################################################

class Recorded(object):
    """One request as the fake upstream received it."""

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def chat_completion(model="m", content="hello"):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant",
                                                     "content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def reply_json(handler, value, status=200, headers=()):
    data = value if isinstance(value, bytes) else json.dumps(value).encode("utf-8")
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    for name, header_value in headers:
        handler.send_header(name, header_value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def start_chunked(handler, status=200, content_type="text/event-stream",
                  headers=()):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()


def write_chunk(handler, data):
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


def end_chunks(handler):
    handler.wfile.write(b"0\r\n\r\n")
    handler.wfile.flush()


def sse_events(count, model="m"):
    """Return the SSE lines of a chat completion stream with count tokens."""
    lines = []
    for index in range(count):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                 "model": model, "choices": [{"index": 0, "delta": {
                     "content": "tok%d " % index}, "finish_reason": None}]}
        lines += [b"data: " + json.dumps(chunk).encode() + b"\n", b"\n"]
    done = {"id": "c", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [{"index": 0, "delta": {},
                                         "finish_reason": "stop"}]}
    return lines + [b"data: " + json.dumps(done).encode() + b"\n", b"\n",
                    b"data: [DONE]\n", b"\n"]


def reply_sse(handler, lines):
    start_chunked(handler)
    for line in lines:
        write_chunk(handler, line)
    end_chunks(handler)


def openai_like(handler, recorded):
    """Default behaviour: answer like an OpenAI-compatible server."""
    if recorded.method == "GET" and recorded.path.endswith("/models"):
        return reply_json(handler, {"object": "list", "data": [
            {"id": "qwen2.5-72b-instruct", "object": "model", "created": 1,
             "owned_by": "upstream"}]})
    body = recorded.json() if recorded.body else {}
    if body.get("stream"):
        return reply_sse(handler, sse_events(3, body.get("model")))
    if recorded.path.endswith("/completions") and "/chat/" not in recorded.path:
        return reply_json(handler, {"id": "cmpl-1", "object": "text_completion",
                                    "created": 1, "model": body.get("model"),
                                    "choices": [{"index": 0, "text": "done",
                                                 "finish_reason": "stop",
                                                 "logprobs": None}]})
    reply_json(handler, chat_completion(body.get("model"), "hello"))


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        http.server.BaseHTTPRequestHandler.setup(self)
        self.server.fake.connection_opened(self)

    def finish(self):
        try:
            http.server.BaseHTTPRequestHandler.finish(self)
        except OSError:
            pass
        self.server.fake.connection_closed(self)

    def log_message(self, format, *args):
        pass

    def _any(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        recorded = Recorded(self.command, self.path, self.headers, body)
        fake = self.server.fake
        fake.record(recorded)
        try:
            fake.behaviour(self, recorded)
            self.wfile.flush()
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any


class _FakeServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        pass


class FakeUpstream(object):
    """An OpenAI-compatible upstream on 127.0.0.1:0 that records requests.

    Each test sets behaviour(handler, recorded) to script the answer.
    """

    def __init__(self, test, behaviour=openai_like):
        self.behaviour = behaviour
        self.requests = []
        self.lock = threading.Lock()
        self.open_connections = 0
        self.connections_opened = 0
        self.connection_closed_event = threading.Event()
        self.sockets = set()
        self.server = _FakeServer(("127.0.0.1", 0), _FakeHandler)
        self.server.fake = self
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()
        test.addCleanup(self.stop)

    @property
    def port(self):
        return self.server.server_address[1]

    @property
    def url(self):
        return "http://127.0.0.1:%d/v1" % self.port

    def record(self, recorded):
        with self.lock:
            self.requests.append(recorded)

    def connection_opened(self, handler):
        with self.lock:
            self.open_connections += 1
            self.connections_opened += 1
            self.sockets.add(handler.connection)

    def connection_closed(self, handler):
        with self.lock:
            self.open_connections -= 1
            self.sockets.discard(handler.connection)
        self.connection_closed_event.set()

    def last(self):
        with self.lock:
            return self.requests[-1]

    def stop(self):
        """Stop listening and close every open connection (as a crash would)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(WAIT_SECONDS)
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


###############################################################################
# Relay fixture ###############################################################
###############################################################################

class RelayTestCase(unittest.TestCase):
    """Starts a fake upstream and helps each test start a relay before it."""

    def setUp(self):
        self.upstream = FakeUpstream(self)

    def start_relay(self, **raw):
        """Start a relay with config raw (listen and upstream filled in)."""
        raw.setdefault("listen", "127.0.0.1:0")
        raw.setdefault("upstream", self.upstream.url)
        config, _ = llm_relay.validate_config(raw, "test", None, {})
        return self.start_server(config)

    def start_server(self, config):
        self.relay = llm_relay.make_server(config)
        thread = threading.Thread(target=self.relay.serve_forever,
                                  kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()

        def stop():
            self.relay.shutdown()
            self.relay.server_close()
            thread.join(WAIT_SECONDS)
        self.addCleanup(stop)
        return self.relay

    def connect(self, timeout=WAIT_SECONDS):
        connection = http.client.HTTPConnection("127.0.0.1", self.relay.port,
                                                timeout=timeout)
        self.addCleanup(connection.close)
        return connection

    def request(self, method, path, body=None, headers=None, connection=None):
        """Send one request; return (status, headers dict lowercased, bytes)."""
        connection = connection or self.connect()
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, dict((k.lower(), v) for k, v in
                                     response.getheaders()), data

    def chat(self, body, headers=None, path="/v1/chat/completions", connection=None):
        return self.request("POST", path, body, headers, connection)

    def raw_exchange(self, data, read_until_close=True):
        """Send raw bytes on a new socket; return everything read back."""
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        sock.sendall(data)
        chunks = []
        while read_until_close:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def wait_for_log(self, logs, text):
        """Wait for a log line containing text; the access line of a request
        is written just after its response has been sent."""
        self.assertTrue(wait_until(lambda: any(text in line for line in logs.output)),
                        "no log line with %r in %r" % (text, logs.output))

    def assert_ok(self, status, data=b"", expected=200):
        """Assert a status, showing the body (the relay's error) if not."""
        self.assertEqual(status, expected, "status %s, expected %s; body: %r" % (
            status, expected, data[:2000]))

    def assert_status_line(self, reply, expected):
        """Assert the status of a raw reply, showing its start if not."""
        self.assertTrue(reply.startswith(b"HTTP/1.1 %d " % expected),
                        "expected %d, got: %r" % (expected, reply[:300]))

    def assert_openai_error(self, status, data, expected_status, code=None):
        self.assertEqual(status, expected_status, data)
        error = json.loads(data.decode("utf-8"))["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertTrue(error["message"])
        if code is not None:
            self.assertEqual(error["code"], code)
        return error


def handler_thread_count():
    """Threads alive, without the stream pump's (it lives as long as its
    server, like the housekeeping thread)."""
    return sum(1 for thread in threading.enumerate()
               if thread.name != "llm-relay-stream-pump")


def wait_until(predicate, timeout=WAIT_SECONDS):
    """Poll predicate until it is true or timeout seconds pass; return it."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def wait_readable(sock, timeout):
    """Return True when sock has data (or its peer's close) within timeout."""
    return bool(select.select([sock], [], [], timeout)[0])


def say_nothing_until_hang_up(handler, release=None):
    """Keep a fake upstream's answer pending: return when the relay closes
    the connection, when release (an Event) is set, or after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not (release is not None and release.is_set()) and \
            time.monotonic() < deadline:
        if wait_readable(handler.connection, 0.05) and \
                handler.connection.recv(1, socket.MSG_PEEK) == b"":
            return


# The head of a streamed upload (audio/* is relayed unread), for raw requests.
UPLOAD_HEAD = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: audio/wav\r\n")


def read_sse_lines(response):
    """Read an SSE response line by line until its end; return the lines."""
    lines = []
    while True:
        line = response.readline()
        if not line:
            return lines
        lines.append(line)


###############################################################################
# HTTP behaviour ##############################################################
###############################################################################

class RelayEndpointsTest(RelayTestCase):

    def test_health_does_not_touch_the_upstream(self):
        self.start_relay()
        status, headers, data = self.request("GET", "/health")
        self.assertEqual((status, json.loads(data.decode())), (200, {"status": "ok"}))
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(self.upstream.requests, [])
        status, headers, data = self.request("HEAD", "/health")
        self.assertEqual((status, data), (200, b""))

    def test_chat_completion_is_rewritten_and_relayed(self):
        self.start_relay(model_rules=[{
            "match_model": "gpt-3.5-turbo", "unset": ["presence_penalty"],
            "set": {"model": "qwen", "temperature": 0.7}, "extra": {"opts": {"a": 1}}}])
        status, headers, data = self.chat({
            "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "é"}],
            "presence_penalty": 1, "opts": {"b": 2}})
        self.assert_ok(status, data)
        self.assertEqual(json.loads(data.decode())["choices"][0]["message"]["content"],
                         "hello")
        sent = self.upstream.last()
        self.assertEqual(sent.path, "/v1/chat/completions")
        self.assertEqual(sent.body, '{"model":"qwen","messages":[{"role":"user",'
                         '"content":"é"}],"opts":{"b":2,"a":1},"temperature":0.7}'
                         .encode("utf-8"))
        self.assertEqual(sent.headers["Content-Length"], str(len(sent.body)))
        self.assertEqual(headers["content-length"], str(len(data)))

    def test_unmatched_request_is_forwarded_byte_for_byte(self):
        self.start_relay(model_rules=[{"match_model": "other", "set": {"x": 1}}])
        raw = b'{ "model" : "m",\n "messages": [], "t": 1.50 }'
        status, _, data = self.chat(raw, {"Content-Type": "application/json"})
        self.assert_ok(status, data)
        self.assertEqual(self.upstream.last().body, raw)

    def test_paths_without_v1_prefix_and_completions(self):
        self.start_relay(model_rules=[{"match_model": "default",
                                       "set": {"model": "base"}}])
        status, _, data = self.request("POST", "/completions", {"model": "x",
                                                                "prompt": "hi"})
        self.assert_ok(status, data)
        self.assertEqual(json.loads(data.decode())["object"], "text_completion")
        self.assertEqual(self.upstream.last().path, "/v1/completions")
        self.assertEqual(self.upstream.last().json()["model"], "base")
        status, _, _ = self.chat({"model": "x", "messages": []},
                                 path="/chat/completions")
        self.assertEqual((status, self.upstream.last().path),
                         (200, "/v1/chat/completions"))

    def test_upstream_path_prefix_and_query_are_kept(self):
        self.start_relay(upstream="http://127.0.0.1:%d/openai/deployments/x"
                         % self.upstream.port)
        self.chat({"model": "m", "messages": []},
                  path="/v1/chat/completions?api-version=2024-06-01")
        self.assertEqual(self.upstream.last().path,
                         "/openai/deployments/x/chat/completions?api-version=2024-06-01")

    def test_models_lists_upstream_models_and_aliases(self):
        self.start_relay(model_rules=[
            {"match_model": "gpt-3.5-turbo", "set": {"model": "qwen2.5-72b-instruct"}},
            {"match_model": "qwen2.5-72b-instruct"}, {"match_model": "default"}])
        for path in ("/v1/models", "/models"):
            status, _, data = self.request("GET", path)
            self.assert_ok(status, data)
            listing = json.loads(data.decode())
            self.assertEqual(listing["object"], "list")
            self.assertEqual([m["id"] for m in listing["data"]],
                             ["qwen2.5-72b-instruct", "gpt-3.5-turbo"])
            for entry in listing["data"]:
                with self.subTest(entry=entry):
                    self.assertEqual(set(entry), {"id", "object", "created", "owned_by"})
                    self.assertEqual(entry["object"], "model")
        self.assertEqual(self.upstream.last().path, "/v1/models")

    def test_models_relays_an_upstream_error_and_502_when_unreachable(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"error": {"message": "bad key"}}, 401)
        self.start_relay()
        status, _, data = self.request("GET", "/v1/models")
        self.assertEqual((status, json.loads(data.decode())),
                         (401, {"error": {"message": "bad key"}}))
        self.upstream.stop()
        status, _, data = self.request("GET", "/v1/models")
        self.assert_openai_error(status, data, 502, "upstream_unreachable")

    def test_models_without_an_upstream_list_still_lists_the_aliases(self):
        answers = [
            (404, "application/json", b'{"detail": "Not Found"}', "answered 404"),
            (405, "text/plain", b"Method Not Allowed", "answered 405"),
            (200, "text/html", b"<html><body>llama.cpp web UI</body></html>",
             "answered text/html, not a model list"),
            (200, "application/json", b'{"models": [{"name": "llama3"}]}',
             "answered application/json, not a model list")]
        current = []

        def answer(handler, recorded):
            status, content_type, body = current[-1][:3]
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        self.upstream.behaviour = answer
        self.start_relay(model_rules=[{"match_model": ["gpt-3.5-turbo", "gpt-4*"]},
                                      {"match_model": "default"}])
        for item in answers:
            with self.subTest(item=item):
                current.append(item)
                with self.assertLogs("llm_relay", "WARNING") as logs:
                    status, headers, data = self.request("GET", "/v1/models")
                self.assertEqual((status, headers["content-type"]),
                                 (200, "application/json"), data)
                self.assertEqual(json.loads(data.decode("utf-8"))["data"], [
                    {"id": "gpt-3.5-turbo", "object": "model",
                     "created": self.relay.config.created, "owned_by": "llm-relay"}])
                warnings = [line for line in logs.output if "WARNING" in line]
                self.assertEqual(len(warnings), 1, warnings)
                self.assertIn("has no model list: GET /models " + item[3], warnings[0])

    def test_parse_model_list_accepts_only_an_openai_list(self):
        self.assertEqual(llm_relay.parse_model_list(200, b'{"data": []}'), {"data": []})
        for status, data in ((200, b"<html>"), (200, b'{"data": {}}'), (200, b"[]"),
                             (404, b'{"data": []}'), (200, b"\xff")):
            self.assertIsNone(llm_relay.parse_model_list(status, data), data)

    def test_unknown_path_is_404_and_wrong_method_405_in_openai_shape(self):
        self.start_relay()
        status, _, data = self.request("GET", "/nope")
        self.assert_openai_error(status, data, 404)
        status, headers, data = self.request("GET", "/v1/chat/completions")
        error = self.assert_openai_error(status, data, 405)
        self.assertEqual(headers["allow"], "POST")
        self.assertIn("GET is not allowed on /v1/chat/completions", error["message"])
        status, headers, data = self.request("POST", "/health", b"{}")
        self.assert_openai_error(status, data, 405)
        self.assertEqual(headers["allow"], "GET, HEAD")
        self.assertEqual(self.upstream.requests, [])

    def test_malformed_request_line_gets_json_not_html(self):
        self.start_relay()
        reply = self.raw_exchange(b"GARBAGE\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply)
        self.assertIn(b'"error"', reply)
        self.assertNotIn(b"<html", reply.lower())
        self.assertRegex(reply, b"X-Request-Id: [0-9a-f]{32}\r\n")
        reply = self.raw_exchange(b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 501"), reply)
        self.assertIn(b'"error"', reply)


class RelayErrorsTest(RelayTestCase):

    def test_invalid_bodies_are_400_and_never_forwarded(self):
        self.start_relay()
        for raw in (b"not json", b"[1,2]", b'{"a": NaN}', b'{"a": "\xff\xfe"}',
                    b"[" * 50000 + b"]" * 50000, b'{"a": Infinity}', b""):
            status, _, data = self.chat(raw, {"Content-Type": "application/json"})
            self.assert_openai_error(status, data, 400, "invalid_json")
        self.assertEqual(self.upstream.requests, [])
        status, _, data = self.chat({"model": "m", "messages": []})
        self.assert_ok(status, data)

    def test_upstream_error_status_and_body_reach_the_client_unchanged(self):
        body = b'{"error": {"message": "model not found", "type": "x"}}'
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, body, 404, [("x-ratelimit-remaining-requests", "7")])
        self.start_relay()
        for stream in (False, True):
            with self.subTest(stream=stream):
                status, headers, data = self.chat({"model": "m", "stream": stream})
                self.assertEqual((status, data), (404, body))
                self.assertEqual(headers["x-ratelimit-remaining-requests"], "7")

    def test_upstream_refused_is_502_naming_the_upstream(self):
        self.start_relay()
        self.upstream.stop()
        status, _, data = self.chat({"model": "m"})
        error = self.assert_openai_error(status, data, 502, "upstream_unreachable")
        self.assertIn("127.0.0.1:%d" % self.upstream.port, error["message"])
        self.assertIn("refused", error["message"])

    def test_dns_failure_is_502(self):
        self.start_relay(upstream="http://does-not-exist.invalid:1/v1")
        status, _, data = self.chat({"model": "m"})
        self.assert_openai_error(status, data, 502, "upstream_unreachable")

    def test_upstream_silence_beyond_read_timeout_is_504(self):
        release = threading.Event()
        self.addCleanup(release.set)

        def silent(handler, recorded):
            release.wait(WAIT_SECONDS)
        self.upstream.behaviour = silent
        self.start_relay(read_timeout=0.3)
        status, _, data = self.chat({"model": "m"})
        error = self.assert_openai_error(status, data, 504, "upstream_timeout")
        self.assertIn("0.3", error["message"])

    def test_an_unexpected_error_is_a_json_500_with_the_traceback_at_debug(self):
        def broken(*args):
            raise RuntimeError("secret-in-exception-text")
        original = llm_relay.rewrite_body
        llm_relay.rewrite_body = broken
        self.addCleanup(setattr, llm_relay, "rewrite_body", original)
        self.start_relay()
        with self.assertLogs("llm_relay", "DEBUG") as logs:
            status, headers, data = self.chat({"model": "m"})
            self.wait_for_log(logs, " 500 ")
        error = self.assert_openai_error(status, data, 500, "internal_error")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertNotIn("secret", error["message"])
        records = [(record.levelno, record.exc_info is not None) for record in
                   logs.records]
        # The traceback only at debug level; the access line names the type.
        self.assertIn((logging.DEBUG, True), records)
        self.assertNotIn((logging.INFO, True), records)
        shown = [record.getMessage() for record in logs.records
                 if record.levelno >= logging.INFO]
        self.assertTrue(any("internal error: RuntimeError" in line
                            for line in shown), shown)
        self.assertFalse(any("secret" in line for line in shown), shown)
        llm_relay.rewrite_body = original
        self.assert_ok(*self.chat({"model": "m"})[::2])

    def test_malformed_numbers_and_targets_are_400_not_500(self):
        self.start_relay()
        cases = [
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: \xb9\r\n\r\nx",
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: " + b"9" * 5000 +
            b"\r\n\r\n",
            b"POST /v1/chat/completions?\xe9 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"POST /v1/emb\x01x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\n"
            b"Content-Length: 30\r\n\r\n" b'{"n": 1' + b"0" * 4400 + b"}",
        ]
        for raw in cases:
            with self.subTest(raw=raw[:60]):
                if b'"n"' in raw:
                    body = raw.split(b"\r\n\r\n", 1)[1]
                    raw = raw.replace(b"Content-Length: 30", b"Content-Length: %d"
                                      % len(body))
                reply = self.raw_exchange(raw)
                self.assertRegex(reply[:12], b"HTTP/1.1 4[01][0-9]", raw[:60])
        self.assertEqual(self.upstream.requests, [])


class StreamingTest(RelayTestCase):

    def test_each_event_reaches_the_client_before_the_next_is_sent(self):
        lines = sse_events(4)
        gates = [threading.Event() for _ in lines]

        def gated(handler, recorded):
            start_chunked(handler)
            for line, gate in zip(lines, gates):
                write_chunk(handler, line)
                if not gate.wait(WAIT_SECONDS):
                    return  # the test failed; stop streaming
            end_chunks(handler)
        self.upstream.behaviour = gated
        self.start_relay()
        connection = self.connect(timeout=5)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "stream": True}), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(response.getheader("X-Accel-Buffering"), "no")  # nginx
        for line, gate in zip(lines, gates):
            # The upstream holds the next line until this one has arrived.
            self.assertEqual(response.readline(), line)
            gate.set()
        self.assertEqual(response.read(), b"")
        # The same connection serves the next request (keep-alive).
        status, _, data = self.chat({"model": "m"}, connection=connection)
        self.assert_ok(status, data)

    def test_stream_is_relayed_byte_exact_through_done(self):
        self.start_relay()
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "stream": True}), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(read_sse_lines(response), sse_events(3, "m"))

    def test_stream_gets_cache_control_no_cache_unless_the_upstream_set_one(self):
        cache_control = []

        def answer(handler, recorded):
            if not recorded.json().get("stream"):
                return reply_json(handler, chat_completion())
            reply_sse_with = [("Cache-Control", value) for value in cache_control]
            start_chunked(handler, headers=reply_sse_with)
            write_chunk(handler, b"data: [DONE]\n\n")
            end_chunks(handler)
        self.upstream.behaviour = answer
        self.start_relay()
        _, headers, data = self.chat({"model": "m", "stream": True})
        self.assertEqual((headers["cache-control"], data),
                         ("no-cache", b"data: [DONE]\n\n"))
        cache_control.append("no-store")
        _, headers, _ = self.chat({"model": "m", "stream": True})
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertNotIn("cache-control", self.chat({"model": "m"})[1])

    def test_stream_ends_at_done_when_the_upstream_keeps_it_open(self):
        upstream_saw_close = threading.Event()

        def done_but_open(handler, recorded):
            start_chunked(handler)
            for line in sse_events(2)[:-1]:  # through "data: [DONE]\n", no blank line
                write_chunk(handler, line)
            handler.connection.settimeout(WAIT_SECONDS)
            try:
                if handler.connection.recv(1) == b"":
                    upstream_saw_close.set()
            except OSError:
                upstream_saw_close.set()
            handler.close_connection = True
        self.upstream.behaviour = done_but_open
        self.start_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            connection = self.connect()
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                {"model": "m", "stream": True}),
                headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            lines = read_sse_lines(response)  # returns at the end of the body
            self.wait_for_log(logs, "did not end its body after [DONE]")
        self.assertEqual(lines, sse_events(2))  # the event is ended for the client
        self.assertTrue(upstream_saw_close.wait(WAIT_SECONDS))
        self.assertEqual(response.status, 200)
        # The client's connection stays usable, the upstream's is not reused.
        self.upstream.behaviour = openai_like
        self.assert_ok(*self.chat({"model": "m"}, connection=connection)[::2])

    def test_the_next_request_after_a_stream_finds_the_upstream_connection_pooled(self):
        # The upstream ends its body only after the client has read [DONE]:
        # the client must see the end of the response after the connection
        # went back to the pool, so its next request reuses it.
        client_read_done = threading.Event()

        def ends_after_the_client_read_done(handler, recorded):
            body = recorded.json()
            if not body.get("stream"):
                return openai_like(handler, recorded)
            start_chunked(handler)
            for line in sse_events(2):
                write_chunk(handler, line)
            client_read_done.wait(WAIT_SECONDS)
            end_chunks(handler)
        self.upstream.behaviour = ends_after_the_client_read_done
        self.start_relay()
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "stream": True}), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        lines = []
        while not lines or lines[-1] != b"data: [DONE]\n":
            lines.append(response.readline())
            self.assertTrue(lines[-1], "stream ended before data: [DONE]: %r" % lines)
        client_read_done.set()
        self.assertEqual(response.read(), b"\n")  # then the end of the body
        # Pooled before the client saw the end, not some time after it.
        self.assertEqual(sum(len(idle) for idle in self.relay.pool._idle.values()), 1)
        self.assert_ok(*self.chat({"model": "m"})[::2])
        self.assertEqual(self.upstream.connections_opened, 1)

    def test_http10_client_gets_a_close_delimited_stream(self):
        self.start_relay()
        body = b'{"model": "m", "stream": true}'
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.0\r\n"
                                  b"Content-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head, _, payload = reply.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(payload, b"".join(sse_events(3, "m")))

    def test_upstream_drop_mid_stream_ends_with_an_error_event(self):
        def dropping(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, sse_events(1)[0])
            write_chunk(handler, b"\n")
            write_chunk(handler, b"data: {\"partial")
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        self.upstream.behaviour = dropping
        self.start_relay()
        connection = self.connect()
        with self.assertLogs("llm_relay", "INFO") as logs:
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                {"model": "m", "stream": True}),
                headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            lines = read_sse_lines(response)
            self.wait_for_log(logs, "POST /v1/chat/completions")
        self.assertEqual(response.status, 200)
        # The cut-off line is not an event: it is dropped, and a clean error
        # event follows the last whole line.
        self.assertEqual(lines[:2], [sse_events(1)[0], b"\n"])
        self.assertEqual(lines[3:], [b"\n"])
        error = json.loads(lines[2][len(b"data: "):].decode())["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertIn("mid-stream", error["message"])
        self.assertTrue(any("mid-stream" in line for line in logs.output), logs.output)
        status, _, data = self.chat({"model": "m"})  # the relay keeps serving
        self.assert_ok(status, data)

    def test_upstream_silence_mid_stream_ends_with_an_error_event(self):
        release = threading.Event()
        self.addCleanup(release.set)

        def stalls(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, b"data: {}\n")
            write_chunk(handler, b"\n")
            release.wait(WAIT_SECONDS)
        self.upstream.behaviour = stalls
        self.start_relay(read_timeout=0.3)
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", body=b'{"stream":true}',
                           headers={"Content-Type": "application/json"})
        lines = read_sse_lines(connection.getresponse())
        self.assertEqual(lines[:2], [b"data: {}\n", b"\n"])
        error = json.loads(lines[2][6:].decode())["error"]
        self.assertEqual(error["code"], "upstream_timeout")
        self.assertIn("sent nothing for read_timeout = 0.3 s mid-stream",
                      error["message"])
        status, _, data = self.chat({"model": "m"})  # the relay keeps serving
        self.assert_ok(status, data)

    def test_client_disconnect_closes_the_upstream_connection(self):
        self.check_client_disconnect(close_delimited=False)

    def test_client_disconnect_during_a_close_delimited_stream(self):
        self.check_client_disconnect(close_delimited=True)

    def check_client_disconnect(self, close_delimited):
        stop = threading.Event()
        self.addCleanup(stop.set)
        first_sent = threading.Event()

        def endless(handler, recorded):
            if close_delimited:
                handler.send_response(200)
                handler.send_header("Content-Type", "text/event-stream")
                handler.send_header("Connection", "close")
                handler.end_headers()
                handler.close_connection = True
            else:
                start_chunked(handler)
            while not stop.is_set():
                line = b"data: {\"tick\": 1}\n\n"
                if close_delimited:
                    handler.wfile.write(line)
                    handler.wfile.flush()
                else:
                    write_chunk(handler, line)
                first_sent.set()
                stop.wait(0.05)
        self.upstream.behaviour = endless
        self.start_relay()
        threads_before = handler_thread_count()
        sock = socket.create_connection(("127.0.0.1", self.relay.port))
        body = b'{"model":"m","stream":true}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(first_sent.wait(WAIT_SECONDS))
        self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 200"))
        self.upstream.connection_closed_event.clear()
        with self.assertLogs("llm_relay", "INFO") as logs:
            sock.close()
            # The upstream sees its connection closed within a second.
            self.assertTrue(self.upstream.connection_closed_event.wait(1.0))
            wait_until(lambda: handler_thread_count() <= threads_before)
            self.wait_for_log(logs, "client disconnected")
        # Fewer is fine: threads of earlier tests may end meanwhile.
        self.assertLessEqual(handler_thread_count(), threads_before)

    def test_client_leaving_before_the_upstream_answers_closes_the_upstream(self):
        release = threading.Event()
        self.addCleanup(release.set)
        received = threading.Event()

        def silent(handler, recorded):
            received.set()
            say_nothing_until_hang_up(handler, release)
        self.upstream.behaviour = silent
        self.start_relay()
        sock = socket.create_connection(("127.0.0.1", self.relay.port))
        body = b'{"model": "m"}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(received.wait(WAIT_SECONDS))
        self.upstream.connection_closed_event.clear()
        with self.assertLogs("llm_relay", "INFO") as logs:
            sock.close()
            self.assertTrue(self.upstream.connection_closed_event.wait(1.0))
            # 499: the client left before the answer started.
            self.wait_for_log(logs, " 499 ")
        self.assertTrue(any("error=client disconnected" in line
                            for line in logs.output), logs.output)
        release.set()

    def stream_reply(self, raw_tail):
        def behaviour(handler, recorded):
            handler.wfile.write(raw_tail)
            handler.close_connection = True
        self.upstream.behaviour = behaviour
        status, _, data = self.chat({"model": "m", "stream": True})
        self.assert_ok(status, data)
        return data

    def test_cut_streams_end_with_a_separate_error_event_and_no_half_line(self):
        self.start_relay()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        cases = [
            # Content-Length framing, cut in the middle of a line
            (head + b"Content-Length: 100\r\n\r\ndata: {\"a\":1}\n\ndata: {\"b\":",
             b'data: {"a":1}\n\n'),
            # chunked, cut between the two newlines that end an event
            (head + b"Transfer-Encoding: chunked\r\n\r\nf\r\ndata: {\"a\":1}\n\r\n",
             b'data: {"a":1}\n\n'),
            # chunked, cut after a whole event
            (head + b"Transfer-Encoding: chunked\r\n\r\n10\r\ndata: {\"a\":1}\n\n\r\n",
             b'data: {"a":1}\n\n'),
        ]
        for raw, kept in cases:
            with self.subTest(raw=raw[len(head):len(head) + 40]):
                data = self.stream_reply(raw)
                self.assertTrue(data.startswith(kept), data)
                rest = data[len(kept):]
                self.assertTrue(rest.startswith(b"data: {\"error\":"), data)
                self.assertTrue(rest.endswith(b"\n\n") and rest.count(b"\n") == 2, data)


# -- Streams side by side: the stream pump and the handler thread -------------

def dechunk(data):
    """Decode a chunked body without extensions or trailers, independently
    of the relay's own decoder."""
    pieces, position = [], 0
    while True:
        end = data.index(b"\r\n", position)
        size = int(data[position:end], 16)
        if not size:
            return b"".join(pieces)
        pieces.append(data[end + 2:end + 2 + size])
        position = end + 2 + size + 2


def read_raw_response(sock):
    """Read a chunked response to its last chunk; return (head, body)."""
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    return head, dechunk(body)


def flooded_stream_with_a_small_receive_buffer(test, client_timeout):
    """Make test's upstream stream 64 kB events without end (up to 130 MB,
    far beyond socket buffers) and start a relay with client_timeout;
    return (a client socket connected to it with a 4 kB receive buffer, an
    Event that stops the upstream)."""
    stop = threading.Event()
    test.addCleanup(stop.set)
    line = b"data: " + b"x" * 65000 + b"\n\n"

    def flood(handler, recorded):
        start_chunked(handler)
        for _ in range(2000):
            if stop.is_set():
                return
            write_chunk(handler, line)
    test.upstream.behaviour = flood
    test.start_relay(client_timeout=client_timeout)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT_SECONDS)
    sock.connect(("127.0.0.1", test.relay.port))
    test.addCleanup(sock.close)
    return sock, stop


class StreamRelayTest(RelayTestCase):
    """Streams relayed side by side, each whole and none held up by another.
    They go through the stream pump here, and through their handler thread
    in StreamRelayInHandlerThreadTest."""

    def post_stream(self, sock, body):
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def test_a_client_that_does_not_read_holds_up_only_its_own_stream(self):
        big_events = [b"data: %03d %s\n\n" % (number, b"x" * 65000)
                      for number in range(100)]  # 6.5 MB: beyond any buffer
        small_events = [b"data: %d\n\n" % number for number in range(5)]

        def answer(handler, recorded):
            start_chunked(handler)
            slow = recorded.json().get("user") == "slow"
            for event in big_events if slow else small_events:
                write_chunk(handler, event)
            end_chunks(handler)
        self.upstream.behaviour = answer
        self.start_relay()
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(WAIT_SECONDS)
        slow.connect(("127.0.0.1", self.relay.port))
        self.addCleanup(slow.close)
        self.post_stream(slow, b'{"model":"m","stream":true,"user":"slow"}')
        first = slow.recv(12)
        self.assertEqual(first, b"HTTP/1.1 200")
        # While that client reads nothing more, other streams go through.
        for _ in range(3):
            status, _, data = self.chat({"model": "m", "stream": True})
            self.assert_ok(status, data)
            self.assertEqual(data, b"".join(small_events))
        # Then the first client reads its stream, whole and in order.
        head, body = read_raw_response(slow)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(body, b"".join(big_events))

    def test_concurrent_streams_each_get_exactly_their_own_events(self):
        def answer(handler, recorded):
            start_chunked(handler)
            user = recorded.json()["user"].encode()
            for number in range(20):
                write_chunk(handler, b"data: %s %d\n\n" % (user, number))
                time.sleep(0.001)  # the streams' events interleave
            write_chunk(handler, b"data: [DONE]\n\n")
            end_chunks(handler)
        self.upstream.behaviour = answer
        self.start_relay()
        results = {}

        def client(user):
            connection = http.client.HTTPConnection("127.0.0.1", self.relay.port,
                                                    timeout=WAIT_SECONDS)
            try:
                for _ in range(2):  # the second on the same connection
                    connection.request("POST", "/v1/chat/completions", body=json.dumps(
                        {"model": "m", "stream": True, "user": user}))
                    response = connection.getresponse()
                    results.setdefault(user, []).append(response.read())
            finally:
                connection.close()
        users = ["user%d" % number for number in range(16)]
        threads = [threading.Thread(target=client, args=(user,)) for user in users]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_SECONDS)
        for user in users:
            expected = b"".join([b"data: %s %d\n\n" % (user.encode(), number)
                                 for number in range(20)] + [b"data: [DONE]\n\n"])
            self.assertEqual(results.get(user), [expected, expected], user)

    def test_a_client_that_reads_slowly_is_not_cut_as_one_that_stopped(self):
        sock, stop = flooded_stream_with_a_small_receive_buffer(self, client_timeout=1.0)
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.post_stream(sock, b'{"model":"m","stream":true}')
            started = time.monotonic()
            # About 100 kB/s, for several times client_timeout: far less
            # than the relay's send buffer holds, but never a pause.
            while time.monotonic() - started < 2.5:
                self.assertTrue(sock.recv(1000))
                time.sleep(0.01)
            sock.close()
            stop.set()
            self.wait_for_log(logs, "POST /v1/chat/completions 200")
        self.assertNotIn("client stopped reading", "\n".join(logs.output))

    def test_an_event_that_breaks_the_relay_fails_only_its_own_stream(self):
        # json raises RecursionError, not ValueError, for a usage event nested
        # this deep: unexpected, so the stream ends as after any internal
        # error (the connection closes), and later streams are relayed.
        deep = (b'data: {"usage":{"prompt_tokens":1},"x":' + b"[" * 50000 +
                b"]" * 50000 + b"}\n\n")

        def answer(handler, recorded):
            start_chunked(handler)
            if recorded.json().get("user") == "deep":
                write_chunk(handler, deep)
            write_chunk(handler, b"data: 1\n\ndata: [DONE]\n\n")
            end_chunks(handler)
        self.upstream.behaviour = answer
        self.start_relay(metrics=True)
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.post_stream(sock, b'{"model":"m","stream":true,"user":"deep"}')
            reply = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
            self.wait_for_log(logs, "internal error: RecursionError")
        self.assert_status_line(reply, 200)
        self.assertEqual(reply.partition(b"\r\n\r\n")[2], b"")  # the head only
        for _ in range(2):
            status, _, data = self.chat({"model": "m", "stream": True})
            self.assert_ok(status, data)
            self.assertEqual(data, b"data: 1\n\ndata: [DONE]\n\n")


def relay_streams_in_the_handler_thread(test):
    """Make test's relays stream in their handler threads, as they do where
    the stream pump cannot take a stream (TLS, Windows)."""
    saved = llm_relay.can_pump
    llm_relay.can_pump = lambda upstream_sock, response, client_sock: False
    test.addCleanup(setattr, llm_relay, "can_pump", saved)


class StreamRelayInHandlerThreadTest(StreamRelayTest):

    def setUp(self):
        StreamRelayTest.setUp(self)
        relay_streams_in_the_handler_thread(self)


class StreamingInHandlerThreadTest(StreamingTest):

    def setUp(self):
        StreamingTest.setUp(self)
        relay_streams_in_the_handler_thread(self)


class StreamPumpTest(RelayTestCase):

    def test_the_pump_thread_starts_with_the_first_stream_and_ends_with_its_server(self):
        self.start_relay()
        self.assertIsNone(self.relay.stream_pump._thread)
        self.chat({"model": "m"})
        self.assertIsNone(self.relay.stream_pump._thread)  # no stream yet
        status, _, data = self.chat({"model": "m", "stream": True})
        self.assertEqual(data, b"".join(sse_events(3, "m")))
        thread = self.relay.stream_pump._thread
        self.assertTrue(thread.is_alive())
        self.relay.server_close()
        thread.join(WAIT_SECONDS)
        self.assertFalse(thread.is_alive())

    def test_a_pump_thread_that_cannot_start_fails_one_stream_not_all(self):
        start = threading.Thread.start
        refused = []

        def start_unless_the_first_pump(thread):
            if thread.name == "llm-relay-stream-pump" and not refused:
                refused.append(thread)
                raise RuntimeError("can't start new thread")  # as CPython says
            return start(thread)
        threading.Thread.start = start_unless_the_first_pump
        self.addCleanup(setattr, threading.Thread, "start", start)
        self.start_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            with self.assertRaises(http.client.IncompleteRead):
                self.chat({"model": "m", "stream": True})
            self.wait_for_log(logs, "internal error: RuntimeError")
        self.assertEqual(len(refused), 1)
        status, _, data = self.chat({"model": "m", "stream": True})
        self.assertEqual(data, b"".join(sse_events(3, "m")))
        self.assertTrue(self.relay.stream_pump._thread.is_alive())

    def test_a_pump_that_fails_ends_its_streams_and_the_next_one_starts_anew(self):
        release = threading.Event()
        self.addCleanup(release.set)

        def one_then_wait(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, b"data: 1\n\n")
            release.wait(WAIT_SECONDS)
            write_chunk(handler, b"data: [DONE]\n\n")
            end_chunks(handler)
        self.upstream.behaviour = one_then_wait
        self.start_relay()
        pump = self.relay.stream_pump
        sweep = pump._sweep
        failures = []

        def sweep_that_fails_with_a_stream_in(now):
            if pump._streams and not failures:
                failures.append(now)
                raise RuntimeError("a bug in the loop itself")
            return sweep(now)
        pump._sweep = sweep_that_fails_with_a_stream_in
        with self.assertLogs("llm_relay", "INFO") as logs:
            with self.assertRaises(http.client.IncompleteRead):
                self.chat({"model": "m", "stream": True})
            self.wait_for_log(logs, "the stream pump failed")
            self.wait_for_log(logs, "internal error: RuntimeError")
        release.set()
        self.assertTrue(wait_until(lambda: pump._thread is None))  # ended
        status, _, data = self.chat({"model": "m", "stream": True})
        self.assertEqual(data, b"data: 1\n\ndata: [DONE]\n\n")
        self.assertTrue(pump._thread.is_alive())

    def test_a_stream_handed_over_as_the_pump_stops_ends_with_an_error(self):
        pump = llm_relay.StreamPump()
        lock = pump._lock
        test_thread = threading.current_thread()

        class StopOnHandOver(object):
            """The pump's lock: when relay() lets it go with its stream
            queued, the pump thread stops (closing its wake-up socket) before
            relay() goes on to wake it."""

            def __enter__(self):
                lock.acquire()

            def __exit__(self, *exc_info):
                lock.release()
                if pump._incoming and threading.current_thread() is test_thread:
                    pump._lock = lock  # once
                    pump.close()
                    pump._thread.join(WAIT_SECONDS)
        pump._lock = StopOnHandOver()
        upstream, upstream_peer = socket.socketpair()
        client, client_peer = socket.socketpair()
        for sock in (upstream, upstream_peer, client, client_peer):
            self.addCleanup(sock.close)
        tracked = types.SimpleNamespace(client_gone=False)
        stream = llm_relay.PumpedStream(
            upstream, client, llm_relay.BodyReader(None, None, True), b"",
            llm_relay.SseForwarder(True), tracked, WAIT_SECONDS, WAIT_SECONDS)
        self.assertIs(pump.relay(stream), stream)  # raises nothing
        self.assertTrue(stream.finished.is_set())
        self.assertIsInstance(stream.upstream_error, ConnectionAbortedError)
        self.assertFalse(pump._thread.is_alive())


class ArrivedBytesDecodingTest(unittest.TestCase):
    """The stream pump decodes the bytes that arrived with a BodyReader over
    ArrivedBytes, read_without_waiting: however they are split, it must
    give what a BodyReader over a file gives."""

    BODIES = (
        # (raw body, Content-Length, chunked)
        (b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n", None, True),
        (b"1\r\na\r\n0\r\n\r\n", None, True),
        (b"3\r\nhel\r\n2\r\nlo\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n", None, True),
        (b"hello world", 11, False),
        (b"hello world", None, False),  # until the close
    )

    def decode_from_file(self, raw, length, chunked):
        """Return (body, exception type or None) as a thread reads it."""
        body = llm_relay.BodyReader(io.BufferedReader(io.BytesIO(raw)), length, chunked)
        pieces = []
        try:
            while True:
                piece = body.read(7)
                if not piece:
                    return b"".join(pieces), None
                pieces.append(piece)
        except Exception as error:
            return b"".join(pieces), type(error)

    def decode_arriving(self, pieces, length, chunked, close=True):
        """Return (body, exception type or None) for pieces arriving one by
        one and then (if close) the close, as the stream pump reads them."""
        source = llm_relay.ArrivedBytes()
        body = llm_relay.BodyReader(source, length, chunked)
        decoded = []
        for piece in list(pieces) + ([None] if close else []):
            if piece is None:
                source.ended = True
            else:
                source.add(piece)
            data, error = llm_relay.StreamPump._decoded(body, source)
            decoded.append(data)
            if error is not None:
                return b"".join(decoded), type(error)
        return b"".join(decoded), None

    def check_every_split(self, raw, length, chunked):
        expected = self.decode_from_file(raw, length, chunked)
        for first in range(len(raw) + 1):
            for second in range(first, len(raw) + 1):
                pieces = (raw[:first], raw[first:second], raw[second:])
                self.assertEqual(self.decode_arriving(pieces, length, chunked),
                                 expected, pieces)
        byte_by_byte = [raw[index:index + 1] for index in range(len(raw))]
        self.assertEqual(self.decode_arriving(byte_by_byte, length, chunked), expected)
        return expected

    def test_whole_bodies_decode_alike_however_they_arrive(self):
        for raw, length, chunked in self.BODIES:
            with self.subTest(raw=raw):
                body, error = self.check_every_split(raw, length, chunked)
                self.assertIsNone(error)
                self.assertEqual(body, b"hello world" if len(body) > 1 else b"a")

    def test_broken_and_cut_bodies_fail_alike_however_they_arrive(self):
        for raw, length, chunked, error in (
                (b"5\r\nhello\r\nzz\r\n", None, True, llm_relay.BadMessage),
                (b"5\r\nhelloXX6\r\n", None, True, llm_relay.BadMessage),
                (b"5\r\nhello\r\n6 ;\r\n world\r\n", None, True, llm_relay.BadMessage),
                (b"5\r\nhello\r\n" + b"1" * 17 + b"\r\n", None, True,
                 llm_relay.BadMessage),
                (b"5\r\nhello\r\n6\r\n wo", None, True, llm_relay.MessageCutShort),
                (b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", None, True,
                 llm_relay.BadMessage),
                (b"hello", 11, False, llm_relay.MessageCutShort)):
            with self.subTest(raw=raw):
                self.assertEqual(self.check_every_split(raw, length, chunked)[1], error)

    def test_broken_framing_fails_once_it_has_arrived_not_at_the_close(self):
        # The pump must not wait for more after broken framing: an upstream
        # may go on sending, and a size line without a LF would grow in
        # memory without end.
        too_long = b"1" + b"0" * llm_relay.MAX_CHUNK_LINE_BYTES  # and no LF
        for raw in (b"5\r\nhelloXX", b"5\r\nhello\r\n" + too_long, too_long):
            with self.subTest(raw=raw[:20]):
                expected = self.decode_from_file(raw, None, True)
                self.assertEqual(expected[1], llm_relay.BadMessage)
                for split in range(len(raw) + 1):
                    pieces = (raw[:split], raw[split:])
                    self.assertEqual(self.decode_arriving(
                        pieces, None, True, close=False), expected, split)

    def test_a_read_that_waits_for_bytes_leaves_everything_as_it_was(self):
        source = llm_relay.ArrivedBytes(b"5\r\nhel")
        body = llm_relay.BodyReader(source, None, True)
        self.assertEqual(body.read_without_waiting(100), b"hel")
        self.assertIsNone(body.read_without_waiting(100))
        source.add(b"lo\r")
        self.assertEqual(body.read_without_waiting(100), b"lo")
        self.assertIsNone(body.read_without_waiting(100))  # CR of the CRLF only
        self.assertEqual(source.held(), 1)
        source.add(b"\n0\r\n\r\n")
        self.assertEqual(body.read_without_waiting(100), b"")
        self.assertTrue(body.complete)
        self.assertEqual(body.total, 5)


class SseForwardingTest(unittest.TestCase):

    def test_split_runs_sends_whole_lines_and_keeps_the_partial_one(self):
        for data in (b"a\nb\n", b"a\nb", b"abc", b"", b"a\n" + b"x" * 25,
                     b"x" * 30 + b"\n", b"\n\n\n"):
            with self.subTest(data=data):
                runs, pending = llm_relay.split_runs(data, 10)
                self.assertEqual(b"".join(runs) + pending, data)
                self.assertLess(len(pending), 10)
                self.assertFalse(b"\n" in pending)
                whole = [run for run in runs if run.endswith(b"\n")]
                self.assertLessEqual(len(whole), 1)  # one run, one write
                for run in runs:
                    self.assertTrue(run.endswith(b"\n") or len(run) == 10, run)

    def test_the_forwarder_frames_each_run_as_one_chunk(self):
        forward = llm_relay.SseForwarder(chunked=True)
        self.assertEqual(forward.take(b"data: 1\n\n"), b"9\r\ndata: 1\n\n\r\n")
        self.assertFalse(forward.done)
        plain = llm_relay.SseForwarder(chunked=False)
        self.assertEqual(plain.take(b"data: 1\n\n"), b"data: 1\n\n")

    def test_the_forwarder_ends_at_done_and_keeps_what_followed(self):
        forward = llm_relay.SseForwarder(chunked=False)
        self.assertEqual(forward.take(b"data: 1\n\ndata: [DONE]\n\nx\n"),
                         b"data: 1\n\ndata: [DONE]\n\n")
        self.assertTrue(forward.done)
        self.assertEqual(forward.rest, b"\nx\n")  # the blank line ends [DONE]
        self.assertEqual(forward.last_run, b"data: 1\n\ndata: [DONE]\n\nx\n")
        forward = llm_relay.SseForwarder(chunked=False)
        # The event that [DONE] starts is ended for the client.
        self.assertEqual(forward.take(b"data: [DONE]\n"), b"data: [DONE]\n\n")

    def test_the_forwarder_renames_the_model_and_shows_usage_to_its_watch(self):
        watch = llm_relay.StreamWatch(llm_relay.PROTOCOL_CHAT)
        forward = llm_relay.SseForwarder(
            chunked=False, rename=llm_relay.model_renamer("asked"), watch=watch)
        sent = forward.take(b'data: {"model":"real","choices":[]}\n\n'
                            b'data: {"model":"real","choices":[],"usage":'
                            b'{"prompt_tokens":3,"completion_tokens":4}}\n\n')
        self.assertEqual(sent.count(b'"model":"asked"'), 2)
        self.assertNotIn(b"real", sent)
        self.assertEqual(watch.usage.get("prompt_tokens"), 3)


class HeadersOverHttpTest(RelayTestCase):

    def test_hop_by_hop_headers_do_not_cross_in_either_direction(self):
        def answer(handler, recorded):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Connection", "X-Up-Hop")
            handler.send_header("X-Up-Hop", "secret")
            handler.send_header("Keep-Alive", "timeout=5")
            handler.send_header("Upgrade", "h2c")
            handler.send_header("x-request-id", "req_123")
            handler.send_header("openai-processing-ms", "12")
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            handler.wfile.write(b"{}")
        self.upstream.behaviour = answer
        self.start_relay()
        status, headers, data = self.chat({"model": "m"}, {
            "Connection": "keep-alive, X-Client-Hop", "X-Client-Hop": "1",
            "Keep-Alive": "300", "TE": "trailers", "Upgrade": "websocket",
            "Proxy-Authorization": "Basic eA==", "Proxy-Connection": "keep-alive",
            "Authorization": "Bearer client-key", "X-Custom": "passes",
            "Accept-Encoding": "gzip, br"})
        sent = self.upstream.last().headers
        for name in ("X-Client-Hop", "Keep-Alive", "TE", "Upgrade",
                     "Proxy-Authorization", "Proxy-Connection", "Authorization"):
            self.assertIsNone(sent.get(name), name)
        self.assertNotIn("keep-alive", (sent.get("Connection") or "").lower())
        self.assertEqual(sent["Host"], "127.0.0.1:%d" % self.upstream.port)
        self.assertEqual(sent["Accept-Encoding"], "identity")
        self.assertEqual(sent["X-Custom"], "passes")
        self.assertEqual((status, data), (200, b"{}"))
        for name in ("x-up-hop", "keep-alive", "upgrade"):
            with self.subTest(name=name):
                self.assertNotIn(name, headers)
        self.assertEqual(headers["openai-processing-ms"], "12")
        self.assertNotIn("x-upstream-request-id", headers)

    def test_forward_auth_true_sends_the_client_authorization(self):
        self.start_relay(forward_auth=True)
        self.chat({"model": "m"}, {"Authorization": "Bearer client-key"})
        self.assertEqual(self.upstream.last().headers["Authorization"],
                         "Bearer client-key")

    def test_upstream_api_key_is_sent_when_not_forwarding(self):
        self.start_relay(upstream_api_key="sk-relay")
        self.chat({"model": "m"}, {"Authorization": "Bearer client-key"})
        self.assertEqual(self.upstream.last().headers["Authorization"],
                         "Bearer sk-relay")

    def test_compressed_upstream_body_reaches_the_client_intact(self):
        compressed = gzip.compress(json.dumps(chat_completion()).encode())
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, compressed, headers=[("Content-Encoding", "gzip")])
        self.start_relay()
        status, headers, data = self.chat({"model": "m"})
        self.assertEqual((status, headers["content-encoding"]), (200, "gzip"))
        self.assertEqual(data, compressed)
        self.assertEqual(json.loads(gzip.decompress(data).decode()), chat_completion())

    def test_keep_alive_reuses_one_client_connection(self):
        self.start_relay()
        connection = self.connect()
        for _ in range(3):
            self.assert_ok(*self.chat({"model": "m"}, connection=connection)[::2])
            self.assertEqual(self.request("GET", "/health", connection=connection)[0],
                             200)
        status, _, data = self.chat(b"bad", connection=connection)
        self.assert_ok(status, data, expected=400)
        self.assert_ok(*self.chat({"model": "m"}, connection=connection)[::2])
        self.assertEqual(self.relay.active_connections(), 1)


class RequestFramingTest(RelayTestCase):
    """How a request body is framed (RFC 9112 §6.3, §7.1), so that no body
    can be read two ways or carry a second, smuggled request."""

    def test_a_body_on_a_local_endpoint_cannot_smuggle_a_request(self):
        self.start_relay(model_rules=[{"match_model": "alias"}])
        smuggled = b"DELETE /v1/files/file-1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        for target in (b"/health", b"/v1/models/alias", b"/health/ready", b"/metrics"):
            with self.subTest(target=target):
                reply = self.raw_exchange(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: %d\r\n\r\n" % len(smuggled)
                                          + smuggled)
                self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply)
                self.assertIn(b"Connection: close", reply)
        self.assertEqual([r.method for r in self.upstream.requests
                          if r.method == "DELETE"], [])

    def test_folded_and_doubled_framing_headers(self):
        self.start_relay()
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"X-Fold: a\r\n Transfer-Encoding: chunked\r\n"
                                  b"Content-Length: 2\r\n\r\n{}")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply)
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\nTransfer-Encoding: "
                                  b"identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply)
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: gzip, chunked\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 501"), reply)
        self.assertEqual(self.upstream.requests, [])

    def test_content_length_with_chunked_upload_is_refused(self):
        self.start_relay()
        smuggled = b"GET /v1/models?smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        body = b"3\r\nabc\r\n0\r\n\r\n" + smuggled
        reply = self.raw_exchange(UPLOAD_HEAD + b"Content-Length: %d\r\nTransfer-"
                                  b"Encoding: chunked\r\n\r\n%s" % (len(body), body))
        self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply)
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply)
        self.assertIn(b"Connection: close", reply)
        self.assertEqual(self.upstream.requests, [])

    def test_an_overlong_chunk_size_line_is_refused(self):
        # Read as 4096-byte lines, the size line below ends early; its tail
        # then passes for the chunk data, and the real data ends the body and
        # carries a second request.  A reader of whole lines sees one body.
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {})
        self.start_relay()
        smuggled = b"GET /v1/models?smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        smuggled = smuggled.replace(b"smuggled", b"smuggled" + b"x" * (52 - len(smuggled)))
        real_data = b"\r\n0\r\n\r\n" + smuggled
        self.assertEqual(len(real_data), 0x3b)
        size_line = b"3b;e=" + b"a" * (4096 + 0x3b - 7) + b"\r\n"
        for head in (UPLOAD_HEAD, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"):
            with self.subTest(head=head[:30]):
                reply = self.raw_exchange(head + b"Transfer-Encoding: chunked\r\n\r\n" +
                                          size_line + real_data + b"\r\n0\r\n\r\n")
                self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply[:100])
                self.assertEqual(reply.count(b"HTTP/1.1 "), 1, reply)
        self.assertNotIn("smuggled", " ".join(r.path for r in self.upstream.requests))

    def test_one_byte_chunks_decode_whole_parsed_or_streamed(self):
        # Each chunk is its own size line, data and CRLF: the decoder must
        # not cost a send or a syscall per chunk, nor lose one.
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {})
        self.start_relay()
        json_body = b'{"model": "m", "pad": "' + b"x" * 5000 + b'"}'
        cases = [("parsed JSON", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                  json_body),
                 ("streamed upload", UPLOAD_HEAD, bytes(range(256)) * 40)]
        for name, head, body in cases:
            with self.subTest(name):
                chunks = b"".join(b"1\r\n%s\r\n" % body[i:i + 1]
                                  for i in range(len(body)))
                reply = self.raw_exchange(head + b"Transfer-Encoding: chunked\r\n"
                                          b"Connection: close\r\n\r\n" + chunks +
                                          b"0\r\n\r\n")
                self.assert_status_line(reply, 200)
                self.assertEqual(self.upstream.last().body, body)


###############################################################################
# Hardening: access, secrets, limits, faults ##################################
###############################################################################

class AccessControlTest(RelayTestCase):

    def test_api_keys_are_required_except_on_health(self):
        self.start_relay(api_keys=["relay-key-1", "relay-key-2"])
        for path, method, body in (("/v1/chat/completions", "POST", {"model": "m"}),
                                   ("/v1/models", "GET", None),
                                   ("/v1/embeddings", "POST", {"model": "m"})):
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "relay-key-1"},
                            {"Authorization": "Basic cmVsYXkta2V5LTE="}):
                status, response_headers, data = self.request(method, path, body,
                                                              headers)
                self.assert_openai_error(status, data, 401, "invalid_api_key")
                self.assertEqual(response_headers["www-authenticate"], "Bearer")
        self.assertEqual(self.upstream.requests, [])
        self.assert_ok(*self.request("GET", "/health")[::2])
        status, _, data = self.chat({"model": "m"}, {"Authorization": "Bearer relay-key-2"})
        self.assert_ok(status, data)
        self.assertIsNone(self.upstream.last().headers.get("Authorization"))

    def test_relay_key_is_not_sent_upstream_but_upstream_key_is(self):
        self.start_relay(api_keys=["relay-key"], upstream_api_key="sk-upstream")
        self.chat({"model": "m"}, {"Authorization": "Bearer relay-key"})
        self.assertEqual(self.upstream.last().headers["Authorization"],
                         "Bearer sk-upstream")

    def test_no_secret_appears_in_any_log_line(self):
        secrets = ["relay-secret-1", "sk-upstream-secret", "wrong-secret-xyz",
                   "body-secret-123", "x-api-secret-9"]
        self.upstream.behaviour = lambda handler, recorded: (
            reply_json(handler, {"error": {"message": "no"}}, 500)
            if b"fail" in recorded.body else openai_like(handler, recorded))
        self.start_relay(api_keys=["relay-secret-1"], upstream_api_key="sk-upstream-secret",
                         model_rules=[{"match_model": "m", "set": {"k": 1}}])
        logger = logging.getLogger("llm_relay")
        with self.assertLogs("llm_relay", "DEBUG") as logs:
            self.assertEqual(logger.getEffectiveLevel(), logging.DEBUG)
            good = {"Authorization": "Bearer relay-secret-1", "X-Api-Key": secrets[4]}
            self.chat({"model": "m", "api_key": "body-secret-123"}, good)
            self.chat({"model": "m", "stream": True, "token": "body-secret-123"}, good)
            self.chat({"model": "m", "fail": True, "secret": "body-secret-123"}, good)
            self.chat({"model": "m"}, {"Authorization": "Bearer wrong-secret-xyz"})
            self.request("GET", "/v1/models", None, good)
            self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: "
                              b"Bearer relay-secret-1\r\nContent-Length: 5\r\n"
                              b"Connection: close\r\n\r\n{bad}")
        text = "\n".join(logs.output)
        self.assertIn("body sent", text)  # the verbose body log was exercised
        for secret in secrets:
            with self.subTest(secret=secret):
                self.assertNotIn(secret, text)

    def test_upstream_redirect_is_relayed_not_followed(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"moved": True}, 307, [("Location", "http://127.0.0.1:1/v1/x")])
        self.start_relay()
        status, headers, data = self.chat({"model": "m"})
        self.assertEqual((status, headers["location"]), (307, "http://127.0.0.1:1/v1/x"))
        self.assertEqual(json.loads(data.decode()), {"moved": True})
        self.assertEqual(len(self.upstream.requests), 1)

    def test_absolute_form_target_does_not_change_the_destination(self):
        self.start_relay()
        body = b'{"model": "m"}'
        reply = self.raw_exchange(
            b"POST http://elsewhere.invalid:9/v1/chat/completions HTTP/1.1\r\n"
            b"Host: elsewhere.invalid\r\nContent-Length: %d\r\nConnection: close\r\n"
            b"\r\n%s" % (len(body), body))
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply)
        self.assertEqual(self.upstream.last().path, "/v1/chat/completions")
        self.assertEqual(self.upstream.last().headers["Host"],
                         "127.0.0.1:%d" % self.upstream.port)

    def test_secrets_in_queries_and_huge_model_names_are_kept_out_of_logs(self):
        self.start_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.request("GET", "/v1/models?api-key=sk-CLIENTKEY&x=1")
            self.chat({"model": "m" * 100000})
            self.wait_for_log(logs, "mmmm")
            self.wait_for_log(logs, "GET /v1/models")  # written after its answer
        text = "\n".join(logs.output)
        self.assertNotIn("sk-CLIENTKEY", text)
        self.assertIn("api-key=***&x=1", text)
        self.assertLess(max(len(line) for line in logs.output), 2000)

    def test_verbose_logging_survives_deep_bodies(self):
        self.start_relay(model_rules=[{"match_model": "default", "set": {"k": 1}}])
        deep = b'{"model": "m", "x": ' + b"[" * 400 + b"]" * 400 + b"}"
        with self.assertLogs("llm_relay", "DEBUG"):
            status, _, data = self.chat(deep, {"Content-Type": "application/json"})
        self.assert_ok(status, data)


def make_certificate(directory):
    """Create a self-signed certificate for 127.0.0.1; return (cert, key)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.check_call(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


@unittest.skipUnless(shutil.which("openssl"), "the openssl command is needed to "
                     "make a test certificate")
class TlsUpstreamTest(RelayTestCase):

    def setUp(self):
        RelayTestCase.setUp(self)
        import ssl
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.cert, key = make_certificate(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.upstream.server.socket = context.wrap_socket(
            self.upstream.server.socket, server_side=True,
            do_handshake_on_connect=False)
        self.url = "https://127.0.0.1:%d/v1" % self.upstream.port

    def test_certificates_are_verified_by_default(self):
        self.start_relay(upstream=self.url)
        status, _, data = self.chat({"model": "m"})
        error = self.assert_openai_error(status, data, 502)
        self.assertIn("TLS", error["message"])

    def test_private_ca_file(self):
        self.start_relay(upstream=self.url, upstream_ca_file=self.cert)
        status, _, data = self.chat({"model": "m", "stream": True})
        self.assertEqual((status, data), (200, b"".join(sse_events(3, "m"))))

    def test_verification_can_be_turned_off_with_a_warning(self):
        config, warnings = llm_relay.validate_config(
            {"listen": "127.0.0.1:0", "upstream": self.url,
             "upstream_tls_verify": False}, "t", None, {})
        self.assertTrue(any("upstream_tls_verify" in w for w in warnings))
        self.start_server(config)
        self.assert_ok(*self.chat({"model": "m"})[::2])


class LimitsTest(RelayTestCase):

    def test_oversized_content_length_is_413_before_the_body_is_read(self):
        self.start_relay(max_body_bytes=1000)
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 5000\r\n\r\n")  # no body sent
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply)
        self.assertIn(b"max_body_bytes", reply)
        self.assertEqual(self.upstream.requests, [])

    def test_post_without_length_is_411(self):
        self.start_relay()
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 411"), reply)

    def test_chunked_request_body_is_decoded_and_counted(self):
        self.start_relay(max_body_bytes=100)
        body = b'{"model": "m", "messages": []}'
        chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part)
                           for part in (body[:7], body[7:])) + b"0\r\nX-T: 1\r\n\r\n"
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\nConnection: close"
                                  b"\r\n\r\n" + chunked)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply)
        self.assertEqual(self.upstream.last().body, body)
        self.assertEqual(self.upstream.last().headers["Content-Length"], str(len(body)))
        too_big = b"40\r\n" + b"x" * 64 + b"\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n"
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n" + too_big)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply)
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply)

    def post_after_100_continue(self, body):
        """Send a request head with Expect: 100-continue, check the interim
        100, send body; return the final response (begun)."""
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: "
                     b"100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        self.assertEqual(sock.recv(1024), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response

    def test_expect_100_continue(self):
        self.start_relay(max_body_bytes=1000)
        body = b'{"model": "m"}'
        response = self.post_after_100_continue(body)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.last().body, body)
        reply = self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply)  # no 100 first

    def test_an_error_after_100_continue_is_still_answered(self):
        # The interim 100 is not the answer's head: an upstream failure
        # after it still gets its status and JSON error.
        self.start_relay()
        self.upstream.stop()
        response = self.post_after_100_continue(b'{"model": "m"}')
        self.assert_openai_error(response.status, response.read(), 502,
                                 "upstream_unreachable")

    def test_connections_beyond_max_connections_get_503(self):
        self.start_relay(max_connections=2)
        held = [self.connect(), self.connect()]
        for connection in held:  # both are accepted and served, then idle
            self.assertEqual(self.request("GET", "/health", connection=connection)[0],
                             200)
        reply = self.raw_exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 503"), reply)
        self.assertIn(b"Retry-After: 1", reply)
        self.assertIn(b'"overloaded"', reply)
        held[0].close()
        deadline = time.monotonic() + WAIT_SECONDS
        while self.relay.active_connections() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assert_ok(*self.request("GET", "/health")[::2])

    def test_a_burst_of_500_connections_is_not_refused(self):
        self.start_relay()
        self.assertGreaterEqual(self.relay.request_queue_size, 500)
        sockets = []
        try:
            for _ in range(500):
                sockets.append(socket.create_connection(
                    ("127.0.0.1", self.relay.port), timeout=WAIT_SECONDS))
            sockets[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(sockets[-1].recv(100).startswith(b"HTTP/1.1 200"))
        finally:
            for sock in sockets:
                sock.close()

    def test_slow_and_idle_clients_are_closed_after_client_timeout(self):
        self.start_relay(client_timeout=0.5)
        slow = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(slow.close)
        idle = self.connect()
        self.assert_ok(*self.request("GET", "/health", connection=idle)[::2])
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        started = time.monotonic()
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.assertEqual(slow.recv(100), b"")  # closed by the relay
            self.wait_for_log(logs, "client_timeout")
        self.assertLess(time.monotonic() - started, WAIT_SECONDS)
        self.assertEqual(idle.sock.recv(100), b"")
        self.assertEqual(self.upstream.requests, [])

    def test_client_timeout_covers_streamed_upload_bodies(self):
        self.start_relay(client_timeout=0.5)
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100\r\n\r\n--x")
        started = time.monotonic()
        data, closed = b"", False
        with self.assertLogs("llm_relay", "INFO") as logs:
            while not closed and time.monotonic() - started < WAIT_SECONDS:
                try:
                    sock.sendall(b"a")  # one byte now and then: a slow drip
                    chunk = sock.recv(1000) if wait_readable(sock, 0.2) else None
                except OSError:
                    chunk = b""
                closed = chunk == b""
                data += chunk or b""
            self.wait_for_log(logs, "client_timeout")
        self.assertTrue(closed, "the relay kept a slow-drip upload open")
        self.assertFalse(data.startswith(b"HTTP/1.1 2"), data)

    def test_chunked_upload_over_the_limit_is_413(self):
        self.start_relay(max_body_bytes=100)
        reply = self.raw_exchange(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"40\r\n" + b"a" * 64 + b"\r\n40\r\n" + b"b" * 64 + b"\r\n0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply[:200])

    def test_chunked_upload_is_not_cut_by_client_timeout_while_upstream_works(self):
        release = threading.Event()
        self.addCleanup(release.set)

        def slow(handler, recorded):
            release.wait(1.0)  # longer than client_timeout
            reply_json(handler, {"ok": True})
        self.upstream.behaviour = slow
        self.start_relay(client_timeout=0.4)
        reply = self.raw_exchange(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"audio/wav\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:200])


def listen_but_never_accept():
    """Return a listening socket whose backlog is full: connects time out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    # A connecting socket turns writable when its handshake is done; once
    # one is, the accept queue (backlog 0) is full and new SYNs are dropped.
    if not select.select([], fillers, [], WAIT_SECONDS)[1]:
        raise AssertionError("no filler connection completed its handshake")
    return server, fillers


class UpstreamFaultsTest(RelayTestCase):

    def assert_relay_still_serves(self):
        self.upstream.behaviour = openai_like
        status, _, data = self.chat({"model": "m", "messages": []})
        self.assertEqual(status, 200, data)

    def test_connect_timeout_is_504(self):
        server, fillers = listen_but_never_accept()
        for sock in [server] + fillers:
            self.addCleanup(sock.close)
        self.start_relay(upstream="http://127.0.0.1:%d/v1" % server.getsockname()[1],
                         connect_timeout=0.3)
        status, _, data = self.chat({"model": "m"})
        error = self.assert_openai_error(status, data, 504, "upstream_timeout")
        self.assertIn("did not connect within connect_timeout = 0.3 s",
                      error["message"])

    def test_upstream_that_accepts_but_never_answers_is_504(self):
        release = threading.Event()
        self.addCleanup(release.set)
        self.upstream.behaviour = lambda handler, recorded: release.wait(WAIT_SECONDS)
        self.start_relay(read_timeout=0.3)
        error = self.assert_openai_error(*self.chat({"model": "m"})[::2],
                                         expected_status=504)
        self.assertIn("sent nothing for read_timeout = 0.3 s before answering.",
                      error["message"])
        release.set()
        self.assert_relay_still_serves()

    def test_garbage_that_is_not_http_is_502(self):
        def garbage(handler, recorded):
            handler.wfile.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            handler.close_connection = True
        self.upstream.behaviour = garbage
        self.start_relay()
        status, _, data = self.chat({"model": "m"})
        error = self.assert_openai_error(status, data, 502)
        self.assertIn("invalid HTTP", error["message"])
        self.assert_relay_still_serves()

    def test_upstream_closing_mid_body_is_502(self):
        def short_body(handler, recorded):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "100")
            handler.end_headers()
            handler.wfile.write(b'{"id": "x", ')
            handler.close_connection = True

        def short_chunked(handler, recorded):
            start_chunked(handler, content_type="application/json")
            write_chunk(handler, b'{"id": ')
            handler.close_connection = True
        for behaviour in (short_body, short_chunked):
            with self.subTest(behaviour=behaviour):
                self.upstream.behaviour = behaviour
                if not hasattr(self, "relay"):
                    self.start_relay()
                status, _, data = self.chat({"model": "m"})
                error = self.assert_openai_error(status, data, 502, "upstream_error")
                self.assertIn("closed the connection mid-body", error["message"])
                self.assert_relay_still_serves()

    def test_sse_framing_variants_are_relayed_byte_exact(self):
        pieces = [b"retry: 1000\r\n", b": ping\r\n", b"\r\n",
                  b"event: message\r\ndata: first line\r\ndata: second line\r\n\r\n",
                  b'data: {"content": "caf', "é 漢".encode("utf-8")[:2],
                  "é 漢".encode("utf-8")[2:6], "é 漢".encode("utf-8")[6:] +
                  b'"}\n\n', b"data: " + b"x" * 100000 + b"\n\n", b"data: [DONE]\n\n"]

        def fragmented(handler, recorded):
            handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.flush()
            for piece in pieces:  # close-delimited, one TCP write each
                handler.connection.sendall(piece)
                time.sleep(0.01)
            handler.close_connection = True
        self.upstream.behaviour = fragmented
        self.start_relay()
        status, headers, data = self.chat({"model": "m", "stream": True})
        self.assert_ok(status, data)
        self.assertEqual(headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(data, b"".join(pieces))
        self.assert_relay_still_serves()

    def test_a_fault_in_one_request_does_not_disturb_another(self):
        gate = threading.Event()
        self.addCleanup(gate.set)

        def mixed(handler, recorded):
            if recorded.json().get("model") == "slow":
                start_chunked(handler)
                write_chunk(handler, b"data: 1\n\n")
                gate.wait(WAIT_SECONDS)
                write_chunk(handler, b"data: [DONE]\n\n")
                end_chunks(handler)
            else:
                handler.wfile.write(b"garbage\r\n\r\n")
                handler.close_connection = True
        self.upstream.behaviour = mixed
        self.start_relay()
        streaming = self.connect()
        streaming.request("POST", "/v1/chat/completions", body=b'{"model": "slow"}',
                          headers={"Content-Type": "application/json"})
        response = streaming.getresponse()
        self.assertEqual(response.readline(), b"data: 1\n")
        self.assert_ok(*self.chat({"model": "bad"})[::2], expected=502)
        self.assertEqual(self.request("POST", "/v1/chat/completions", b"{")[0], 400)
        gate.set()
        self.assertEqual(response.read(), b"\ndata: [DONE]\n\n")

    def test_interim_1xx_responses_are_skipped_not_taken_as_the_answer(self):
        def early_hints(handler, recorded):
            handler.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; "
                                b"rel=preload\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n")
            handler.wfile.flush()
            reply_json(handler, {"answer": recorded.json()["model"]})
        self.upstream.behaviour = early_hints
        self.start_relay()
        for model in ("a", "b"):
            with self.subTest(model=model):
                status, _, data = self.chat({"model": model})
                self.assertEqual((status, json.loads(data.decode())),
                                 (200, {"answer": model}))

        def switching(handler, recorded):
            handler.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            handler.close_connection = True
        self.upstream.behaviour = switching
        self.assert_openai_error(*self.chat({"model": "c"})[::2], expected_status=502)

    def test_conflicting_upstream_content_lengths_are_502(self):
        def conflicting(handler, recorded):
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                b"Content-Length: 7\r\n\r\n{}{}{}{}")
            handler.close_connection = True
        self.upstream.behaviour = conflicting
        self.start_relay()
        self.assert_openai_error(*self.chat({"model": "m"})[::2], expected_status=502)


###############################################################################
# Lifecycle: the real process, signals, reload ################################
###############################################################################

class RelayProcess(object):
    """python3 llm_relay.py --config PATH as a child process on port 0.

    With config_text None there is no config file: the relay runs in an
    empty directory with extra_args only.
    """

    def __init__(self, test, config_text, extra_args=()):
        self.directory = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.directory, True)
        self.config_path = os.path.join(self.directory, "config.jsonc")
        config_args = []
        if config_text is not None:
            self.write_config(config_text)
            config_args = ["--config", self.config_path]
        self.lines = []
        self.lines_changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "llm_relay.py")] + config_args +
            list(extra_args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.directory)
        test.addCleanup(self.kill)
        reader = threading.Thread(target=self._read_stderr)
        reader.daemon = True
        reader.start()
        self.port = None
        line = self.wait_for_line("listening on http://")
        if line is None:
            test.fail("the relay did not start; its stderr:\n%s" % (
                self.stderr_text()[-3000:] or "(empty)"))
        self.port = int(line.split("listening on http://")[1].split(",")[0]
                        .rsplit(":", 1)[1])

    def write_config(self, text):
        with open(self.config_path, "w") as handle:
            handle.write(text)

    def _read_stderr(self):
        for raw in self.process.stderr:
            with self.lines_changed:
                self.lines.append(raw.decode("utf-8", "replace"))
                self.lines_changed.notify_all()
        with self.lines_changed:
            self.lines.append(None)  # end of output
            self.lines_changed.notify_all()

    def wait_for_line(self, text, start=0):
        """Return the first stderr line from index start containing text."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self.lines_changed:
            while time.monotonic() < deadline:
                for line in self.lines[start:]:
                    if line is None:
                        return None
                    if text in line:
                        return line
                self.lines_changed.wait(0.1)
        return None

    def stderr_text(self):
        with self.lines_changed:
            return "".join(line for line in self.lines if line)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_SECONDS)
        self.process.stdout.close()
        self.process.stderr.close()


def config_text(upstream_url, **extra):
    raw = {"listen": "127.0.0.1:0", "upstream": upstream_url}
    raw.update(extra)
    return "// test config\n" + json.dumps(raw, indent=2) + "\n"


class LifecycleTest(RelayTestCase):

    def open_stream(self, port, model="m"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": model, "stream": True}), headers={"Content-Type": "application/json"})
        return connection.getresponse()

    def gated_stream(self):
        gate = threading.Event()
        self.addCleanup(gate.set)

        def behaviour(handler, recorded):
            if not recorded.json().get("stream"):
                return openai_like(handler, recorded)
            start_chunked(handler)
            write_chunk(handler, b"data: before\n\n")
            gate.wait(WAIT_SECONDS)
            write_chunk(handler, b"data: after\n\n")
            write_chunk(handler, b"data: [DONE]\n\n")
            end_chunks(handler)
        self.upstream.behaviour = behaviour
        return gate

    def test_sigterm_lets_streams_finish_and_closes_idle_connections_at_once(self):
        gate = self.gated_stream()
        relay = RelayProcess(self, config_text(self.upstream.url))
        idle = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=WAIT_SECONDS)
        self.addCleanup(idle.close)
        idle.request("GET", "/health")
        self.assertEqual(idle.getresponse().read(), b'{"status":"ok"}')
        stream = self.open_stream(relay.port)
        self.assertEqual(stream.readline(), b"data: before\n")
        relay.process.send_signal(signal.SIGTERM)
        self.assertIsNotNone(relay.wait_for_line("shutting down"))
        self.assertEqual(idle.sock.recv(10), b"")  # closed at once, not after grace
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()
        gate.set()
        self.assertEqual(stream.read(), b"\ndata: after\n\ndata: [DONE]\n\n")
        self.assertEqual(relay.process.wait(WAIT_SECONDS), 0)
        self.assertNotIn("Traceback", relay.stderr_text())

    def test_idle_keep_alive_connections_never_delay_the_exit(self):
        relay = RelayProcess(self, config_text(self.upstream.url, shutdown_grace=60))
        idle = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=WAIT_SECONDS)
        self.addCleanup(idle.close)
        idle.request("GET", "/health")
        idle.getresponse().read()
        relay.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        self.assertEqual(relay.process.wait(WAIT_SECONDS), 0)
        self.assertNotIn("Traceback", relay.stderr_text())

    def test_grace_period_ends_streams_that_do_not_finish(self):
        self.gated_stream()
        relay = RelayProcess(self, config_text(self.upstream.url, shutdown_grace=0.5))
        self.check_cut_stream(relay, [signal.SIGTERM])

    def test_a_second_signal_stops_waiting(self):
        self.gated_stream()
        relay = RelayProcess(self, config_text(self.upstream.url, shutdown_grace=60))
        self.check_cut_stream(relay, [signal.SIGTERM, signal.SIGTERM])

    def check_cut_stream(self, relay, signals):
        stream = self.open_stream(relay.port)
        self.assertEqual(stream.readline(), b"data: before\n")
        for number in signals:
            relay.process.send_signal(number)
            self.assertIsNotNone(relay.wait_for_line("shutting down"))
        rest = stream.read()  # the stream ends properly, with an error event
        self.assertEqual(relay.process.wait(WAIT_SECONDS), 0)
        self.assertTrue(rest.startswith(b"\ndata: {"), rest)
        error = json.loads(rest[len(b"\ndata: "):].decode())["error"]
        self.assertEqual(error["code"], "shutting_down")
        self.assertIsNotNone(relay.wait_for_line("grace ended"))
        access = relay.wait_for_line("POST /v1/chat/completions")
        self.assertIn("error=The relay is shutting down", access)
        self.assertNotIn("Traceback", relay.stderr_text())

    def test_sighup_reloads_rules_without_disturbing_streams(self):
        gate = self.gated_stream()
        relay = RelayProcess(self, config_text(self.upstream.url, model_rules=[
            {"match_model": "m", "set": {"model": "old"}}]))
        stream = self.open_stream(relay.port)
        self.assertEqual(stream.readline(), b"data: before\n")
        relay.write_config(config_text(self.upstream.url, model_rules=[
            {"match_model": "m", "set": {"model": "new"}}]))
        seen = len(relay.lines)
        relay.process.send_signal(signal.SIGHUP)
        self.assertIsNotNone(relay.wait_for_line("reloaded", seen))
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "m"}',
                           headers={"Content-Type": "application/json"})
        connection.getresponse().read()
        self.assertEqual(self.upstream.last().json()["model"], "new")
        gate.set()
        self.assertEqual(stream.read(), b"\ndata: after\n\ndata: [DONE]\n\n")

        relay.write_config('{"model_rules": [{"match_model": 1}]}')
        seen = len(relay.lines)
        relay.process.send_signal(signal.SIGHUP)
        line = relay.wait_for_line("reload failed", seen)
        self.assertIn("model_rules[0].match_model", line)
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "m"}',
                           headers={"Content-Type": "application/json"})
        connection.getresponse().read()
        self.assertEqual(self.upstream.last().json()["model"], "new")

        relay.write_config(config_text(self.upstream.url).replace(
            "127.0.0.1:0", "127.0.0.1:1"))
        seen = len(relay.lines)
        relay.process.send_signal(signal.SIGHUP)
        self.assertIsNotNone(relay.wait_for_line("restart", seen))
        relay.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.process.wait(WAIT_SECONDS), 0)


class TrackedConnectionTest(unittest.TestCase):
    """The transitions a handler thread makes without a lock, and the one
    that takes the connection's lock (see the comment above
    TrackedConnection)."""

    def setUp(self):
        self.server = types.SimpleNamespace(
            draining=False, config=types.SimpleNamespace(client_timeout=60.0))
        self.client, client_peer = socket.socketpair()
        self.upstream, self.upstream_peer = socket.socketpair()
        for sock in (self.client, client_peer, self.upstream, self.upstream_peer):
            self.addCleanup(sock.close)
        self.upstream_peer.settimeout(WAIT_SECONDS)
        self.tracked = llm_relay.TrackedConnection(self.client, self.server)

    def test_each_waiting_phase_gets_a_new_deadline(self):
        for transition, phase in ((self.tracked.wait_for_request, llm_relay.PHASE_IDLE),
                                  (self.tracked.request_started,
                                   llm_relay.PHASE_READING)):
            with self.subTest(phase=phase):
                earliest = time.monotonic() + 60.0
                transition()
                self.assertEqual(self.tracked.phase, phase)
                self.assertGreaterEqual(self.tracked.deadline, earliest)
        self.tracked.request_read()
        self.assertEqual(self.tracked.phase, llm_relay.PHASE_BUSY)

    def test_a_draining_server_serves_no_further_request(self):
        self.assertTrue(self.tracked.wait_for_request())
        self.server.draining = True
        self.assertFalse(self.tracked.wait_for_request())

    def test_a_client_leaving_shuts_the_watched_upstream_socket(self):
        self.tracked.watch(self.upstream)
        self.tracked.client_left()
        self.assertTrue(self.tracked.client_gone)
        self.assertEqual(self.upstream_peer.recv(1), b"")

    def test_an_upstream_socket_no_longer_watched_is_left_alone(self):
        self.tracked.watch(self.upstream)
        self.tracked.watch(None)
        self.tracked.client_left()
        self.assertFalse(self.tracked.client_gone)
        self.upstream.sendall(b"x")
        self.assertEqual(self.upstream_peer.recv(1), b"x")


class ReloadOnChangeTest(RelayTestCase):
    """reload_on_change: the file is polled and reloaded as SIGHUP does."""

    def setUp(self):
        RelayTestCase.setUp(self)
        saved = llm_relay.CONFIG_POLL_SECONDS
        llm_relay.CONFIG_POLL_SECONDS = 0.05
        self.addCleanup(setattr, llm_relay, "CONFIG_POLL_SECONDS", saved)
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        # The file's own upstream is wrong: the command line's one must win,
        # before and after every reload.
        self.overrides = {"listen": "127.0.0.1:0", "upstream": self.upstream.url}

    def config_text(self, model, reload_on_change=True):
        return json.dumps({"upstream": "http://127.0.0.1:1/v1",
                           "reload_on_change": reload_on_change,
                           "model_rules": [{"match_model": "m",
                                            "set": {"model": model}}]})

    def write(self, path, text):
        with open(path, "w") as handle:
            handle.write(text)

    def start_watching(self, path):
        config, _ = llm_relay.load_config(path, overrides=self.overrides)
        self.start_server(config)
        self.relay.watch_config_file(path, self.overrides)

    def model_sent(self):
        self.assert_ok(*self.chat({"model": "m"})[::2])
        return self.upstream.last().json()["model"]

    def test_an_edited_file_is_reloaded_with_the_command_line_settings(self):
        path = os.path.join(self.directory, "config.jsonc")
        self.write(path, self.config_text("old"))
        self.start_watching(path)
        self.assertEqual(self.model_sent(), "old")
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.write(path, self.config_text("newer"))
            self.assertTrue(wait_until(
                lambda: self.relay.config.rules[0].set["model"] == "newer"))
            self.wait_for_log(logs, "reloaded %s: 1 rule" % path)
        self.assertIn("%s changed; reloading" % path, "\n".join(logs.output))
        self.assertEqual(self.model_sent(), "newer")
        self.assertEqual(self.relay.config.upstreams["default"].url, self.upstream.url)
        # Missing for a moment (a non-atomic replace): reloaded once it is back.
        with self.assertLogs("llm_relay", "INFO") as logs:
            os.remove(path)
            self.wait_for_log(logs, "%s is missing; keeping the running config" % path)
            self.assertEqual(self.model_sent(), "newer")
            self.write(path, self.config_text("back"))
            self.assertTrue(wait_until(
                lambda: self.relay.config.rules[0].set["model"] == "back"))

    def test_a_kubernetes_configmap_symlink_swap_is_noticed(self):
        # Kubernetes mounts config.jsonc -> ..data/config.jsonc, ..data ->
        # ..<timestamp>/ and updates by pointing ..data at a new directory.
        for version, model in (("..2026_a", "old"), ("..2026_b", "new")):
            os.mkdir(os.path.join(self.directory, version))
            target = os.path.join(self.directory, version, "config.jsonc")
            self.write(target, self.config_text(model))
            os.utime(target, (1000000000, 1000000000))  # same mtime, same size
        os.symlink("..2026_a", os.path.join(self.directory, "..data"))
        path = os.path.join(self.directory, "config.jsonc")
        os.symlink(os.path.join("..data", "config.jsonc"), path)
        self.start_watching(path)
        self.assertEqual(self.model_sent(), "old")
        os.symlink("..2026_b", os.path.join(self.directory, "..data_tmp"))
        os.rename(os.path.join(self.directory, "..data_tmp"),
                  os.path.join(self.directory, "..data"))
        self.assertTrue(wait_until(
            lambda: self.relay.config.rules[0].set["model"] == "new"))
        self.assertEqual(self.model_sent(), "new")

    def test_off_by_default_and_turned_on_by_the_reload_that_reads_it(self):
        path = os.path.join(self.directory, "config.jsonc")
        self.write(path, self.config_text("old", reload_on_change=False))
        self.start_watching(path)
        self.write(path, self.config_text("new", reload_on_change=False) + " ")
        self.assertFalse(self.relay.poll_config_file(time.monotonic() + 60))
        self.assertEqual(self.model_sent(), "old")
        self.write(path, self.config_text("on"))
        self.assertTrue(llm_relay.reload_config(self.relay, path))  # as SIGHUP
        self.assertEqual(self.model_sent(), "on")
        self.write(path, self.config_text("polled"))
        self.assertTrue(wait_until(
            lambda: self.relay.config.rules[0].set["model"] == "polled"))


class EnvironmentAndWarningsTest(RelayTestCase):

    def test_keys_from_the_environment_reach_the_upstream_and_risks_are_warned(self):
        os.environ["LLM_RELAY_TEST_KEY"] = "sk-from-env-1234"
        self.addCleanup(os.environ.pop, "LLM_RELAY_TEST_KEY", None)
        relay = RelayProcess(self, config_text(
            self.upstream.url, listen="0.0.0.0:0",
            upstream_api_key="${LLM_RELAY_TEST_KEY}",
            model_rules=[{"match_model": "m", "set": {
                "user": "${LLM_RELAY_TEST_USER:-fallback-user}"}}]))
        self.assertIsNotNone(relay.port)
        self.assertIn("without api_keys", relay.stderr_text())
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "m"}')
        self.assertEqual(connection.getresponse().status, 200)
        self.assertEqual(self.upstream.last().headers["Authorization"],
                         "Bearer sk-from-env-1234")
        self.assertEqual(self.upstream.last().json()["user"], "fallback-user")
        self.assertNotIn("sk-from-env-1234", relay.stderr_text())
        relay.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.process.wait(WAIT_SECONDS), 0)


class CommandLineTest(unittest.TestCase):

    def run_relay(self, args, cwd=None):
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_relay.py")]
                                   + args, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=cwd or HERE)
        out, err = process.communicate(timeout=WAIT_SECONDS)
        return process.returncode, out.decode(), err.decode()

    def test_invalid_config_exits_2_with_one_line_before_binding(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "broken.jsonc")
        with open(path, "w") as handle:
            handle.write('{\n  "listen": "127.0.0.1:0",\n  "upstream": "x" "y"\n}\n')
        status, out, err = self.run_relay(["--config", path])
        self.assertEqual(status, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("broken.jsonc:3:19: Expecting ',' delimiter", err)
        self.assertNotIn("listening", err)
        with open(path, "w") as handle:
            handle.write('{"model_rules": [{"match_model": "a"}, {"match_model": "b",'
                         '\n "unset": "x"}]}')
        status, out, err = self.run_relay(["--config", path])
        self.assertEqual(status, 2)
        self.assertIn("broken.jsonc:2:11: model_rules[1].unset: expected a list of "
                      "strings", err)

    def test_missing_config_file_exits_2(self):
        status, out, err = self.run_relay(["--config", "/nonexistent/relay.jsonc"])
        self.assertEqual(status, 2)
        self.assertIn("/nonexistent/relay.jsonc", err)
        self.assertNotIn("Traceback", err)

    def test_version_and_help(self):
        status, out, err = self.run_relay(["--version"])
        self.assertEqual((status, out.strip()), (0, "llm-relay " + llm_relay.__version__))
        status, out, err = self.run_relay(["--help"])
        self.assertEqual(status, 0)
        for option in ("--config", "--verbose", "--version", "config.jsonc"):
            with self.subTest(option=option):
                self.assertIn(option, out)

    def test_port_in_use_is_a_clear_error(self):
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "c.jsonc")
        with open(path, "w") as handle:
            handle.write('{"listen": "127.0.0.1:%d"}' % holder.getsockname()[1])
        status, out, err = self.run_relay(["--config", path])
        self.assertEqual(status, 1)
        self.assertIn("cannot listen", err)
        self.assertNotIn("Traceback", err)


class CommandLineSettingsTest(unittest.TestCase):
    """--listen, --upstream and --explain from the command line."""

    run_relay = CommandLineTest.run_relay

    def write(self, text):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "c.jsonc")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def empty_directory(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        return directory

    def chat_through(self, relay):
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "m"}',
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status

    def test_listen_and_upstream_need_no_config_file(self):
        upstream = FakeUpstream(self)
        relay = RelayProcess(self, None, ["--listen", "127.0.0.1:0",
                                          "--upstream", upstream.url])
        self.assertIsNotNone(relay.port, relay.stderr_text())
        self.assertEqual(self.chat_through(relay), 200)
        self.assertEqual(upstream.last().path, "/v1/chat/completions")
        self.assertIn("upstream %s, 0 rules, built-in defaults" % upstream.url,
                      relay.stderr_text())

    def test_listen_and_upstream_override_the_config_file(self):
        upstream = FakeUpstream(self)
        relay = RelayProcess(self, config_text("http://127.0.0.1:1/v1",
                                               listen="127.0.0.1:1"),
                             ["--listen", "127.0.0.1:0", "--upstream", upstream.url])
        self.assertIsNotNone(relay.port, relay.stderr_text())
        self.assertNotEqual(relay.port, 1)
        self.assertEqual(self.chat_through(relay), 200)
        self.assertEqual(len(upstream.requests), 1)
        status, out, err = self.run_relay(
            ["--check-config", "--listen", "[::1]:9", "--upstream",
             "http://gpu:8000/v1"], cwd=self.empty_directory())
        self.assertEqual(status, 0, err)
        self.assertIn("config: <defaults> (valid)\nlisten: http://[::1]:9\n"
                      "upstream default: http://gpu:8000/v1 ", out)

    def test_upstream_overrides_upstreams_default_even_beside_upstream(self):
        # Both forms at once: upstreams.default is the one in force, so
        # --upstream must replace its URL (it used to change only the ignored
        # top-level "upstream"); the config's dead settings are warned about.
        upstream = FakeUpstream(self)
        path = self.write(json.dumps({
            "listen": "127.0.0.1:0", "upstream": "http://127.0.0.1:1/v1",
            "upstream_api_key": "sk-never-sent",
            "upstreams": {"default": {"url": "http://127.0.0.1:1/v1", "apis": ["chat"]}}}))
        relay = RelayProcess(self, None, ["--config", path, "--upstream", upstream.url])
        self.assertIsNotNone(relay.port, relay.stderr_text())
        self.assertEqual(self.chat_through(relay), 200)
        self.assertEqual(len(upstream.requests), 1)
        self.assertNotIn("authorization", [name.lower() for name in upstream.last().headers])
        stderr = relay.stderr_text()
        self.assertIn("c.jsonc:1:27: upstream: ignored: upstreams.default defines the default "
                      "upstream", stderr)
        self.assertIn("upstream_api_key: ignored: upstreams.default defines the default "
                      "upstream; give it (or its replicas) an \"api_key\"", stderr)

    def test_malformed_listen_or_upstream_is_a_usage_error(self):
        for args, message in ((["--listen", "8080"], "--listen: expected \"host:port\""),
                              (["--upstream", "ftp://x"], "--upstream: expected an "
                               "http:// or https:// URL")):
            status, out, err = self.run_relay(args, cwd=self.empty_directory())
            self.assertEqual(status, 2, err)
            self.assertIn(message, err)
            self.assertNotIn("Traceback", err)

    def test_demo_takes_a_config_and_replaces_every_upstream(self):
        path = self.write(json.dumps({
            "upstreams": {"gpu": {"url": "http://127.0.0.1:1/v1"}},
            "model_rules": [{"match_model": "fast", "upstream": "gpu",
                             "set": {"model": "llama3-8b"}}]}))
        relay = RelayProcess(self, None, ["--demo", "--config", path,
                                          "--listen", "127.0.0.1:0"])
        self.assertIsNotNone(relay.port, relay.stderr_text())
        self.assertIn("upstream the built-in demo, 1 rule, config " + path,
                      relay.stderr_text())
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "fast"}',
                           headers={"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read().decode())
        self.assertEqual(answer["choices"][0]["message"]["content"],
                         "Demo upstream got model llama3-8b from model_rules[0] "
                         "(fast), which sets model.")
        status, out, err = self.run_relay(["--demo", "--upstream", "http://x/v1"])
        self.assertEqual(status, 2)
        self.assertIn("--demo answers in place of every upstream", err)

    def explain(self, args, stdin=b""):
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "llm_relay.py"),
                                    "--explain"] + args, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=HERE)
        out, err = process.communicate(stdin, timeout=WAIT_SECONDS)
        return process.returncode, out.decode("utf-8"), err.decode("utf-8")

    def test_explain_reads_text_a_file_or_stdin(self):
        body = '{"model": "gpt-3.5-turbo", "presence_penalty": 1}'
        expected = llm_relay.explain_request(llm_relay.load_config(
            os.path.join(HERE, "config.jsonc"))[0], json.loads(body))
        self.assertIn("rule: model_rules[0]", expected)
        for args, stdin in (([body], b""), ([self.write(body)], b""),
                            (["-"], body.encode())):
            self.assertEqual(self.explain(args, stdin), (0, expected, ""))
        status, out, err = self.explain(["{\"model\": ", "--upstream",
                                         "http://gpu:8000/v1"])
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("llm_relay: error: --explain: The request body is not valid "
                      "JSON", err)
        status, out, err = self.explain(["/nonexistent/body.json"])
        self.assertEqual(status, 2)
        self.assertIn("--explain: cannot read /nonexistent/body.json", err)
        status, out, err = self.explain(["[1]"])
        self.assertEqual(status, 2)
        with self.assertRaises(llm_relay.RelayError) as caught:
            llm_relay.read_explain_body(self.write(body), None, len(body) - 1)
        self.assertEqual(caught.exception.status, 413)
        self.assertEqual(llm_relay.read_explain_body(self.write(body), None,
                                                     len(body)), body.encode())
        if os.path.exists("/dev/zero"):  # endless: read up to the limit only
            with self.assertRaises(llm_relay.RelayError) as caught:
                llm_relay.read_explain_body("/dev/zero", None, 1000)
            self.assertIn("max_body_bytes = 1000", caught.exception.message)
        status, out, _ = self.explain(["-", "--upstream", "http://gpu:8000/v1"],
                                      b'{"model": "llama3"}')
        self.assertIn("rule: model_rules[1] (match_model \"default\")\n", out)
        self.assertIn("upstream: default (http://gpu:8000/v1)\n", out)


###############################################################################
# Upstream connection reuse ###################################################
###############################################################################

class UpstreamPoolTest(RelayTestCase):

    def test_upstream_connections_are_reused(self):
        self.start_relay()
        for body in ({"model": "m"}, {"model": "m", "stream": True}, {"model": "m"}):
            with self.subTest(body=body):
                self.assert_ok(*self.chat(body)[::2])
        self.assert_ok(*self.request("GET", "/v1/models")[::2])
        self.assertEqual(self.upstream.connections_opened, 1)
        self.assertEqual(len(self.upstream.requests), 4)

    def test_connection_closed_by_the_upstream_while_idle_is_not_reused(self):
        self.start_relay()
        self.assert_ok(*self.chat({"model": "m"})[::2])
        with self.upstream.lock:
            sockets = list(self.upstream.sockets)
        self.upstream.connection_closed_event.clear()
        for sock in sockets:
            sock.shutdown(socket.SHUT_RDWR)
        self.assertTrue(self.upstream.connection_closed_event.wait(WAIT_SECONDS))
        self.assert_ok(*self.chat({"model": "m"})[::2])
        self.assertEqual(self.upstream.connections_opened, 2)
        self.assertEqual(len(self.upstream.requests), 2)

    def test_stale_connection_is_retried_once_on_a_fresh_one(self):
        def closes_second_request_on_a_connection(handler, recorded):
            served = getattr(handler, "served", 0)
            handler.served = served + 1
            if served == 1:  # as if the keep-alive timer fired: no answer
                handler.close_connection = True
                return
            openai_like(handler, recorded)
        self.upstream.behaviour = closes_second_request_on_a_connection
        self.start_relay()
        self.assert_ok(*self.chat({"model": "m"})[::2])
        self.assert_ok(*self.chat({"model": "m"})[::2])
        self.assertEqual(self.upstream.connections_opened, 2)
        self.assertEqual(len(self.upstream.requests), 3)

    def test_a_fresh_connection_is_never_retried(self):
        def never_answers(handler, recorded):
            handler.close_connection = True
        self.upstream.behaviour = never_answers
        self.start_relay()
        status, _, data = self.chat({"model": "m"})
        self.assert_openai_error(status, data, 502)
        self.assertEqual(len(self.upstream.requests), 1)

    def test_environment_proxy_variables_are_ignored(self):
        self.start_relay()
        saved = dict((name, os.environ.get(name)) for name in (
            "http_proxy", "HTTP_PROXY", "https_proxy", "ALL_PROXY"))
        try:
            for name in saved:
                os.environ[name] = "http://127.0.0.1:9"  # nothing listens there
            self.assert_ok(*self.chat({"model": "m"})[::2])
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.assertEqual(len(self.upstream.requests), 1)

    def test_a_request_the_upstream_worked_on_is_not_sent_twice(self):
        def slow_then_closes(handler, recorded):
            served = getattr(handler, "served", 0)
            handler.served = served + 1
            if served == 1:
                time.sleep(llm_relay.STALE_RETRY_WINDOW_SECONDS + 0.2)
                handler.close_connection = True
                return
            openai_like(handler, recorded)
        self.upstream.behaviour = slow_then_closes
        self.start_relay()
        self.assert_ok(*self.chat({"model": "m"})[::2])
        self.assert_ok(*self.chat({"model": "m"})[::2], expected=502)
        self.assertEqual(len(self.upstream.requests), 2)

    def test_a_client_leaving_never_makes_the_relay_send_a_request_twice(self):
        received = threading.Event()

        def silent_after_first(handler, recorded):
            served = getattr(handler, "served", 0)
            handler.served = served + 1
            if served == 0:
                return openai_like(handler, recorded)
            received.set()
            say_nothing_until_hang_up(handler)
        self.upstream.behaviour = silent_after_first
        self.start_relay()
        self.assert_ok(*self.chat({"model": "m"})[::2])  # pools a connection
        sock = socket.create_connection(("127.0.0.1", self.relay.port))
        body = b'{"model": "m"}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(received.wait(WAIT_SECONDS))
        with self.assertLogs("llm_relay", "INFO") as logs:
            sock.close()
            # The access line comes after the relay gave up on the request;
            # a wrong retry would have reached the upstream (and been
            # recorded, then answered on its new connection) before it.
            self.wait_for_log(logs, " 499 ")
        self.assertEqual([r.path for r in self.upstream.requests],
                         ["/v1/chat/completions"] * 2)


###############################################################################
# Soak ########################################################################
###############################################################################

def open_descriptors():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return None


@unittest.skipUnless(os.environ.get("LLM_RELAY_SOAK") == "1",
                     "the soak runs with LLM_RELAY_SOAK=1 (.ci/run sets it once)")
class SoakTest(RelayTestCase):
    """200 concurrent streams and 2,000 buffered requests, some abandoned.

    It takes about 12 s, so it runs only with LLM_RELAY_SOAK=1: .ci/run sets
    it for one run (the README's test command), not for each interpreter.
    """

    STREAMS = 200
    BUFFERED = 2000
    CLIENTS = 8

    def test_soak(self):
        stream_lines = sse_events(20)
        expected_stream = b"".join(stream_lines)
        expected_json = json.dumps(chat_completion("m", "x" * 200)).encode()

        def behaviour(handler, recorded):
            if b'"stream": true' in recorded.body:
                start_chunked(handler)
                for line in stream_lines:
                    write_chunk(handler, line)
                    time.sleep(0.002)
                end_chunks(handler)
            else:
                reply_json(handler, expected_json)
        self.upstream.behaviour = behaviour
        self.start_relay(max_connections=1000)
        gc_settle()
        threads_before, fds_before = threading.active_count(), open_descriptors()
        failures, completed = [], [0, 0]
        lock = threading.Lock()
        rng = random.Random(7)
        abandon_streams = set(rng.sample(range(self.STREAMS), 10))
        abandon_buffered = set(rng.sample(range(self.BUFFERED), 20))
        deadline = time.monotonic() + 50

        def stream_client(index):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.relay.port,
                                                        timeout=30)
                connection.request("POST", "/v1/chat/completions",
                                   body=b'{"model": "m", "stream": true}')
                response = connection.getresponse()
                if index in abandon_streams:
                    response.readline()
                    connection.sock.shutdown(socket.SHUT_RDWR)
                    connection.close()
                    return
                data = response.read()
                connection.close()
                if data != expected_stream:
                    raise AssertionError("stream %d differs" % index)
                with lock:
                    completed[0] += 1
            except Exception as error:
                with lock:
                    failures.append("stream %d: %r" % (index, error))

        def buffered_client(indexes):
            connection = http.client.HTTPConnection("127.0.0.1", self.relay.port,
                                                    timeout=30)
            for index in indexes:
                if time.monotonic() > deadline:
                    failures.append("soak ran out of time")
                    return
                try:
                    connection.request("POST", "/v1/chat/completions",
                                       body=b'{"model": "m"}')
                    if index in abandon_buffered:
                        connection.close()  # before reading the answer
                        continue
                    response = connection.getresponse()
                    data = response.read()
                    if response.status != 200 or data != expected_json:
                        raise AssertionError("status %d" % response.status)
                    with lock:
                        completed[1] += 1
                except Exception as error:
                    with lock:
                        failures.append("request %d: %r" % (index, error))
                    connection.close()
            connection.close()

        workers = [threading.Thread(target=stream_client, args=(index,))
                   for index in range(self.STREAMS)]
        workers += [threading.Thread(target=buffered_client, args=(
            range(client, self.BUFFERED, self.CLIENTS),))
            for client in range(self.CLIENTS)]
        for worker in workers:
            worker.daemon = True
            worker.start()
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        self.assertEqual(failures, [])
        self.assertEqual(completed, [self.STREAMS - len(abandon_streams),
                                     self.BUFFERED - len(abandon_buffered)])
        # Idle pooled upstream connections are a bounded cache, not a leak;
        # empty it once every handler has finished (and pooled its own).
        self.assertTrue(wait_until(lambda: self.relay.active_connections() == 0))
        self.assertLessEqual(sum(len(idle) for idle in self.relay.pool._idle.values()),
                             llm_relay.POOL_MAX_IDLE_PER_UPSTREAM)
        self.relay.pool.close_all()
        # The stream pump lives as long as its server; stopped, it gives back
        # its thread and descriptors too.
        self.relay.stream_pump.close()
        wait_until(lambda: threading.active_count() <= threads_before and
                   self.relay.active_connections() == 0 and
                   self.upstream.open_connections == 0)
        gc_settle()
        self.assertEqual(self.relay.active_connections(), 0)
        self.assertLessEqual(threading.active_count(), threads_before,
                             describe_threads())
        if fds_before is not None:
            self.assertLessEqual(open_descriptors(), fds_before)


def describe_threads():
    """Name every live thread and where it is, for a failure message."""
    import traceback
    frames = sys._current_frames()
    return "\n".join("%s:\n%s" % (thread.name, "".join(traceback.format_stack(
        frames.get(thread.ident)))[-1500:]) for thread in threading.enumerate())


def gc_settle():
    import gc
    gc.collect()




###############################################################################
# Several upstreams, richer rules, every endpoint, browsers ###################
###############################################################################

class RoutingTest(RelayTestCase):

    def setUp(self):
        RelayTestCase.setUp(self)
        self.second = FakeUpstream(self)

    def start_routed(self, chain, **raw):
        raw.setdefault("upstreams", {"second": {"url": self.second.url,
                                                "api_key": "sk-second"}})
        raw.setdefault("model_rules", [{"match_model": "routed", "upstream": chain}])
        return self.start_relay(upstream=self.upstream.url, **raw)

    def test_a_rule_sends_its_model_to_a_named_upstream(self):
        self.start_routed("second", upstream_api_key="sk-main")
        self.assert_ok(*self.chat({"model": "routed"})[::2])
        self.assert_ok(*self.chat({"model": "other"})[::2])
        self.assertEqual([r.json()["model"] for r in self.second.requests], ["routed"])
        self.assertEqual([r.json()["model"] for r in self.upstream.requests], ["other"])
        self.assertEqual(self.second.last().headers["Authorization"], "Bearer sk-second")
        self.assertEqual(self.upstream.last().headers["Authorization"], "Bearer sk-main")

    def test_fallback_on_refused_5xx_429_and_timeout_before_headers(self):
        release = threading.Event()
        self.addCleanup(release.set)
        behaviours = [
            lambda handler, recorded: reply_json(handler, {"error": {}}, 503),
            lambda handler, recorded: reply_json(handler, {"error": {}}, 429),
            lambda handler, recorded: release.wait(WAIT_SECONDS),
        ]
        self.start_routed(["default", "second"], read_timeout=0.3)
        for behaviour in behaviours:
            with self.subTest(behaviour=behaviour):
                self.upstream.behaviour = behaviour
                with self.assertLogs("llm_relay", "INFO") as logs:
                    status, _, data = self.chat({"model": "routed", "x": 1})
                    self.wait_for_log(logs, "upstream=default>second")
                self.assertEqual(status, 200, data)
                self.assertEqual(self.second.last().json(), {"model": "routed", "x": 1})
        self.upstream.stop()
        self.assert_ok(*self.chat({"model": "routed"})[::2])
        self.assertEqual(len(self.second.requests), 4)

    def test_last_upstream_answer_is_relayed_when_all_fail(self):
        self.upstream.behaviour = self.second.behaviour = (
            lambda handler, recorded: reply_json(handler, {"error": {"m": 1}}, 503))
        self.start_routed(["default", "second"])
        status, _, data = self.chat({"model": "routed"})
        self.assertEqual((status, json.loads(data.decode())), (503, {"error": {"m": 1}}))
        self.assertEqual((len(self.upstream.requests), len(self.second.requests)), (1, 1))

    def test_nothing_is_retried_once_bytes_reached_the_client(self):
        def drops(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, b"data: 1\n\n")
            handler.close_connection = True
        self.upstream.behaviour = drops
        self.start_routed(["default", "second"])
        status, _, data = self.chat({"model": "routed", "stream": True})
        self.assert_ok(status, data)
        self.assertIn(b'"error"', data)
        self.assertEqual(self.second.requests, [])

    def test_models_merges_routed_upstreams_and_skips_unreachable_ones(self):
        self.second.behaviour = lambda handler, recorded: reply_json(handler, {
            "object": "list", "data": [{"id": "on-second", "object": "model",
                                        "created": 2, "owned_by": "b"},
                                       {"id": "qwen2.5-72b-instruct"}]})
        self.start_routed("second", model_rules=[
            {"match_model": ["routed", "gpt-4*"], "upstream": "second"},
            {"match_model": "alias"}])
        status, _, data = self.request("GET", "/v1/models")
        self.assertEqual([m["id"] for m in json.loads(data.decode())["data"]],
                         ["qwen2.5-72b-instruct", "on-second", "routed", "alias"])
        self.second.stop()
        with self.assertLogs("llm_relay", "WARNING") as logs:
            status, _, data = self.request("GET", "/v1/models")
        self.assert_ok(status, data)
        self.assertIn("left out upstream second", "".join(logs.output))
        self.assertEqual([m["id"] for m in json.loads(data.decode())["data"]],
                         ["qwen2.5-72b-instruct", "routed", "alias"])
        self.upstream.stop()
        status, _, data = self.request("GET", "/v1/models")
        self.assert_openai_error(status, data, 502)

    def test_a_silent_upstream_does_not_hold_the_model_list(self):
        second = FakeUpstream(self)
        release = threading.Event()
        self.addCleanup(release.set)
        second.behaviour = lambda handler, recorded: release.wait(WAIT_SECONDS)
        saved = llm_relay.MODELS_TIMEOUT_SECONDS
        llm_relay.MODELS_TIMEOUT_SECONDS = 0.3
        self.addCleanup(setattr, llm_relay, "MODELS_TIMEOUT_SECONDS", saved)
        self.start_relay(upstreams={"second": {"url": second.url}}, model_rules=[
            {"match_model": "s", "upstream": "second"}])
        status, _, data = self.request("GET", "/v1/models")
        self.assert_ok(status, data)
        self.assertEqual([m["id"] for m in json.loads(data.decode())["data"]],
                         ["qwen2.5-72b-instruct", "s"])


class RichRulesOverHttpTest(RelayTestCase):

    def test_patterns_lists_and_defaults(self):
        self.start_relay(model_rules=[
            {"match_model": ["a", "b"], "set": {"model": "ab"}},
            {"match_model": "gpt-4*", "defaults": {"temperature": 0.2, "top_p": 1},
             "set": {"model": "big"}},
            {"match_model": "default", "set": {"model": "fallback"}}])
        cases = [({"model": "b"}, {"model": "ab"}),
                 ({"model": "gpt-4o", "temperature": 0.9},
                  {"model": "big", "temperature": 0.9, "top_p": 1}),
                 ({"model": "GPT-4o"}, {"model": "fallback"})]
        for sent, expected in cases:
            with self.subTest(sent=sent, expected=expected):
                self.chat(sent)
                self.assertEqual(self.upstream.last().json(), expected)


class PassThroughTest(RelayTestCase):

    def test_json_endpoints_go_through_rules_and_routing(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"object": "list", "data": [{"embedding": [0.1]}]})
        self.start_relay(model_rules=[{"match_model": "embed",
                                       "set": {"model": "nomic-embed-text"}}])
        for path in ("/v1/embeddings", "/v1/moderations", "/v1/rerank"):
            with self.subTest(path=path):
                status, _, data = self.request("POST", path, {"model": "embed",
                                                              "input": "hi"})
                self.assert_ok(status, data)
                self.assertEqual(self.upstream.last().path, path)
                self.assertEqual(self.upstream.last().json(),
                                 {"model": "nomic-embed-text", "input": "hi"})

    def test_json_sent_with_a_form_content_type_still_gets_rules_and_checks(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {})
        self.start_relay(model_rules=[{"match_model": "*-embed-?",
                                       "unset": ["encoding_format"]}])
        curl_form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, data = self.request("POST", "/v1/embeddings", b' {"model": "n-embed-t",'
                                    b' "input": "x", "encoding_format": "base64"}',
                                    curl_form)
        self.assert_ok(status, data)
        self.assertEqual(self.upstream.last().json(), {"model": "n-embed-t",
                                                       "input": "x"})
        self.assertEqual(self.upstream.last().headers["Content-Type"],
                         "application/json")
        status, _, data = self.request("POST", "/v1/embeddings", b'{"model": "x", bad',
                                       curl_form)
        self.assert_openai_error(status, data, 400, "invalid_json")
        self.assertEqual(len(self.upstream.requests), 1)
        status, _, data = self.request("POST", "/v1/files", b"a=1&b=%7B", curl_form)
        self.assert_ok(status, data)
        self.assertEqual(self.upstream.last().body, b"a=1&b=%7B")
        self.assertEqual(self.upstream.last().headers["Content-Type"],
                         "application/x-www-form-urlencoded")

    def test_multipart_upload_and_binary_response_stream_through(self):
        audio = bytes(range(256)) * 4096  # 1 MiB of binary

        def transcribe_or_speak(handler, recorded):
            if recorded.path.endswith("/speech"):
                handler.send_response(200)
                handler.send_header("Content-Type", "audio/mpeg")
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for start in range(0, len(audio), 100000):
                    write_chunk(handler, audio[start:start + 100000])
                end_chunks(handler)
            else:
                reply_json(handler, {"text": "%d bytes, %s" % (
                    len(recorded.body), recorded.headers["Content-Type"])})
        self.upstream.behaviour = transcribe_or_speak
        self.start_relay(model_rules=[{"match_model": "default",
                                       "set": {"model": "never-applied"}}])
        upload = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; "
                  b"filename=\"a.wav\"\r\n\r\n" + audio + b"\r\n--XyZ--\r\n")
        status, _, data = self.request(
            "POST", "/v1/audio/transcriptions", upload,
            {"Content-Type": "multipart/form-data; boundary=XyZ"})
        self.assert_ok(status, data)
        self.assertEqual(self.upstream.last().body, upload)
        self.assertEqual(json.loads(data.decode())["text"],
                         "%d bytes, multipart/form-data; boundary=XyZ" % len(upload))
        status, headers, data = self.request("POST", "/v1/audio/speech",
                                             {"model": "tts", "input": "hi"})
        self.assertEqual((status, headers["content-type"]), (200, "audio/mpeg"))
        self.assertEqual(data, audio)

    def test_a_binary_body_cut_short_closes_and_counts_as_dropped(self):
        def cut(handler, recorded):
            start_chunked(handler, content_type="audio/mpeg")
            write_chunk(handler, b"\x00" * 1000)
            handler.close_connection = True
        self.upstream.behaviour = cut
        self.start_relay()
        connection = self.connect()
        connection.request("POST", "/v1/audio/speech", body=b'{"model": "tts"}')
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        with self.assertRaises(http.client.IncompleteRead):
            response.read()  # a short body: the relay closed, never ended it
        self.assertTrue(wait_until(lambda: 'kind="dropped"' in
                                   self.relay.metrics.render().decode()))

    def test_sse_from_any_path_is_relayed_line_by_line(self):
        lines = [b"event: response.created\n", b"data: {}\n", b"\n",
                 b"event: response.completed\n", b"data: {}\n", b"\n"]
        gates = [threading.Event() for _ in lines]

        def responses(handler, recorded):
            start_chunked(handler)
            for line, gate in zip(lines, gates):
                write_chunk(handler, line)
                gate.wait(WAIT_SECONDS)
            end_chunks(handler)
        self.upstream.behaviour = responses
        self.start_relay()
        connection = self.connect()
        connection.request("POST", "/v1/responses", body=b'{"model": "m", "stream": true}',
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        for line, gate in zip(lines, gates):
            with self.subTest(line=line, gate=gate):
                self.assertEqual(response.readline(), line)
                gate.set()

    def test_model_by_id_alias_here_others_upstream(self):
        self.start_relay(model_rules=[{"match_model": "alias", "set": {"model": "x"}}])
        status, _, data = self.request("GET", "/v1/models/alias")
        self.assertEqual(json.loads(data.decode())["id"], "alias")
        self.assertEqual(self.upstream.requests, [])
        self.request("GET", "/v1/models/qwen2.5-72b-instruct")
        self.assertEqual(self.upstream.last().path, "/v1/models/qwen2.5-72b-instruct")

    def test_dot_segments_are_refused(self):
        self.start_relay()
        for path in ("/v1/../admin", "/v1/files/%2e%2e/x", "/v1/./models",
                     "/v1/a/%2E%2E%2Fb"):
            status, _, data = self.request("GET", path)
            self.assert_openai_error(status, data, 400, "invalid_path")
        self.assertEqual(self.upstream.requests, [])

    def test_large_body_with_content_length_gets_its_head_first(self):
        saved = llm_relay.MAX_BUFFERED_RESPONSE_BYTES
        llm_relay.MAX_BUFFERED_RESPONSE_BYTES = 1024
        self.addCleanup(setattr, llm_relay, "MAX_BUFFERED_RESPONSE_BYTES", saved)
        blob = b"A" * 300000
        self.upstream.behaviour = lambda handler, recorded: (
            handler.send_response(200), handler.send_header(
                "Content-Type", "application/octet-stream"),
            handler.send_header("Content-Length", str(len(blob))),
            handler.end_headers(), handler.wfile.write(blob))
        self.start_relay()
        status, headers, data = self.request("GET", "/v1/files/big")
        self.assertEqual((status, headers["content-length"], data),
                         (200, str(len(blob)), blob))

    def test_chunked_upload_of_a_binary_body_reaches_the_upstream_framed(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"bytes": len(recorded.body)})
        self.start_relay()
        payload = b"GET /v1/smuggled HTTP/1.1\r\nHost: up\r\n\r\n" + bytes(range(256))
        reply = self.raw_exchange(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"audio/wav\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:200])
        self.assertEqual(self.upstream.last().body, payload)
        # Streamed on as it arrives, never held whole: chunked again.
        self.assertEqual(self.upstream.last().headers["Transfer-Encoding"], "chunked")
        self.assertIsNone(self.upstream.last().headers["Content-Length"])
        self.assertEqual([r.path for r in self.upstream.requests],
                         ["/v1/audio/transcriptions"])

    def test_head_of_an_event_stream_has_no_body(self):
        def head_reply(handler, recorded):
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Content-Length", "1234")
            handler.end_headers()
        self.upstream.behaviour = head_reply
        self.start_relay()
        connection = self.connect()
        connection.request("HEAD", "/v1/some/stream")
        response = connection.getresponse()
        self.assertEqual((response.status, response.getheader("Content-Length"),
                          response.read()), (200, "1234", b""))
        self.upstream.behaviour = openai_like
        self.assert_ok(*self.request("GET", "/health", connection=connection)[::2])

    def test_typed_non_json_bodies_starting_with_a_brace_pass_through(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {})
        self.start_relay(model_rules=[{"match_model": "default", "set": {"x": 1}}])
        for content_type, body in (
                ("application/x-ndjson", b'{"custom_id":"1"}\n{"custom_id":"2"}\n'),
                ("text/csv", b"{x},y\n")):
            with self.subTest(content_type=content_type):
                status, _, data = self.request("POST", "/v1/batches/upload", body,
                                               {"Content-Type": content_type})
                self.assert_ok(status, data)
                self.assertEqual(self.upstream.last().body, body)
                self.assertEqual(self.upstream.last().headers["Content-Type"],
                                 content_type)

    def test_an_early_upstream_answer_to_an_upload_is_relayed(self):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)

        def answer_early():
            connection, _ = server.accept()
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: "
                                   b"application/json\r\nContent-Length: 16\r\n"
                                   b"Connection: close\r\n\r\n{\"error\": \"big\"}")
                connection.shutdown(socket.SHUT_RDWR)
        thread = threading.Thread(target=answer_early)
        thread.daemon = True
        thread.start()
        self.start_relay(upstream="http://127.0.0.1:%d/v1" % server.getsockname()[1])
        body = b"x" * (8 * 1024 * 1024)
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        sock.sendall(UPLOAD_HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
        reply = b""
        try:
            sock.sendall(body)
        except OSError:
            pass  # the relay may stop reading once the upstream has answered
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply[-300:])
        self.assertIn(b'{"error": "big"}', reply)


class BrowsersAndRequestIdTest(RelayTestCase):

    def test_preflight_is_answered_here_and_keys_still_guard_requests(self):
        self.start_relay(cors_origins=["https://app.example"], api_keys=["k"])
        status, headers, data = self.request("OPTIONS", "/v1/chat/completions", None, {
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        self.assert_ok(status, data, expected=204)
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")
        self.assertIn("POST", headers["access-control-allow-methods"])
        self.assertEqual(headers["access-control-allow-headers"],
                         "authorization, content-type")
        self.assertEqual(headers["access-control-max-age"], "600")
        self.assertEqual(self.upstream.requests, [])
        status, headers, data = self.chat({"model": "m"}, {"Origin": "https://app.example"})
        self.assert_ok(status, data, expected=401)
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")
        status, headers, data = self.chat({"model": "m"}, {
            "Origin": "https://app.example", "Authorization": "Bearer k"})
        self.assert_ok(status, data)
        self.assertIn("X-Request-Id", headers["access-control-expose-headers"])
        self.assertEqual(headers["vary"], "Origin")
        status, headers, _ = self.chat({"model": "m"}, {
            "Origin": "https://evil.example", "Authorization": "Bearer k"})
        self.assertNotIn("access-control-allow-origin", headers)

    def test_no_cors_headers_by_default_and_star_allows_any(self):
        self.start_relay()
        self.assertNotIn("access-control-allow-origin", self.chat(
            {"model": "m"}, {"Origin": "https://a.example"})[1])
        self.relay.config = self.relay.config._replace(cors_origins=frozenset(["*"]))
        self.assertEqual(self.chat({"model": "m"}, {"Origin": "https://a.example"})[1][
            "access-control-allow-origin"], "https://a.example")

    def test_request_id_is_kept_or_made_sent_upstream_returned_and_logged(self):
        self.start_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            _, headers, _ = self.chat({"model": "m"}, {"X-Request-Id": "client-id-1"})
            self.wait_for_log(logs, "id=client-id-1")
        self.assertEqual(headers["x-request-id"], "client-id-1")
        self.assertEqual(self.upstream.last().headers["X-Request-Id"], "client-id-1")
        _, headers, _ = self.chat({"model": "m"}, {"X-Request-Id": "bad id"})
        self.assertRegex(headers["x-request-id"], "^[0-9a-f]{32}$")
        self.assertEqual(self.upstream.last().headers["X-Request-Id"],
                         headers["x-request-id"])

    def test_the_upstreams_own_request_id_reaches_the_client_and_the_log(self):
        upstream_ids = {"x-request-id": "req_openai_1", "request-id": "req_anthropic_1"}
        name_sent = []

        def answer(handler, recorded):
            name = name_sent[-1]
            headers = [(name, upstream_ids[name])] if name else []
            if recorded.json().get("stream"):
                start_chunked(handler, headers=headers)
                write_chunk(handler, b"data: [DONE]\n\n")
                return end_chunks(handler)
            reply_json(handler, chat_completion(), headers=headers)
        self.upstream.behaviour = answer
        self.start_relay()
        for name in ("x-request-id", "request-id"):
            for stream in (False, True):
                with self.subTest(stream=stream):
                    name_sent.append(name)
                    with self.assertLogs("llm_relay", "INFO") as logs:
                        _, headers, _ = self.chat({"model": "m", "stream": stream},
                                                  {"X-Request-Id": "relay-id-7"})
                        self.wait_for_log(logs, "id=relay-id-7")
                    self.assertEqual(headers["x-request-id"], upstream_ids[name])
                    line = [line for line in logs.output if "id=relay-id-7" in line][0]
                    self.assertIn("upstream_id=%s " % upstream_ids[name], line)
        self.assertEqual(headers["request-id"], "req_anthropic_1")
        name_sent.append(None)  # an upstream without an id: the relay's own
        _, headers, _ = self.chat({"model": "m"}, {"X-Request-Id": "relay-id-8"})
        self.assertEqual(headers["x-request-id"], "relay-id-8")


###############################################################################
# Real clients: the official openai package, LangChain ########################
###############################################################################

@unittest.skipUnless(openai, OPENAI_MISSING)
class OpenAIClientTest(RelayTestCase):

    def setUp(self):
        RelayTestCase.setUp(self)
        self.start_relay(model_rules=[{"match_model": "gpt-3.5-turbo",
                                       "set": {"model": "qwen2.5-72b-instruct"}}])
        self.client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.relay.port,
                                    api_key="unused", max_retries=0, timeout=WAIT_SECONDS)
        self.addCleanup(self.client.close)

    def test_models_list(self):
        ids = [model.id for model in self.client.models.list()]
        self.assertEqual(ids, ["qwen2.5-72b-instruct", "gpt-3.5-turbo"])

    def test_chat_completion(self):
        completion = self.client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(completion.choices[0].message.content, "hello")
        self.assertEqual(completion.model, "qwen2.5-72b-instruct")

    def test_streamed_chat_completion(self):
        stream = self.client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}],
            stream=True)
        tokens = [chunk.choices[0].delta.content for chunk in stream
                  if chunk.choices and chunk.choices[0].delta.content]
        self.assertEqual(tokens, ["tok0 ", "tok1 ", "tok2 "])

    def test_the_upstreams_request_id_is_the_sdks_request_id(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, chat_completion(), headers=[("x-request-id", "req_upstream_9")])
        completion = self.client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(completion._request_id, "req_upstream_9")

    def test_completion(self):
        completion = self.client.completions.create(model="gpt-3.5-turbo",
                                                    prompt="Say hi")
        self.assertEqual(completion.choices[0].text, "done")

    def test_errors_surface_as_sdk_exceptions(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"error": {"message": "no such model", "type": "x",
                                "param": None, "code": "model_not_found"}}, 404)
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.chat.completions.create(model="nope", messages=[])
        self.assertIn("no such model", str(caught.exception))


try:
    import langchain_openai
except ImportError:  # pragma: no cover - depends on the environment
    langchain_openai = None


@unittest.skipUnless(langchain_openai, "langchain-openai is not installed "
                     "(.ci/run installs it)")
class LangChainClientTest(RelayTestCase):

    def test_invoke_and_stream(self):
        self.start_relay()
        chat = langchain_openai.ChatOpenAI(
            base_url="http://127.0.0.1:%d/v1" % self.relay.port, api_key="unused",
            model="m", max_retries=0, timeout=WAIT_SECONDS)
        self.assertEqual(chat.invoke("hi").content, "hello")
        self.assertEqual("".join(chunk.content for chunk in chat.stream("hi")),
                         "tok0 tok1 tok2 ")


###############################################################################
# The quick start with the shipped config.jsonc ###############################
###############################################################################

class QuickStartTest(RelayTestCase):
    """The README's quick start: the shipped config, a real client, streaming."""

    def start_shipped_config(self):
        with open(os.path.join(HERE, "config.jsonc")) as handle:
            text = handle.read()
        self.assertIn('"http://localhost:11434/v1"', text)
        self.assertIn('"0.0.0.0:8080"', text)
        text = text.replace('"http://localhost:11434/v1"', json.dumps(self.upstream.url))
        text = text.replace('"0.0.0.0:8080"', '"127.0.0.1:0"')
        config, warnings = llm_relay.parse_config_text(text, "config.jsonc", {})
        self.assertEqual(warnings, [])
        return self.start_server(config)

    def expected_upstream_body(self, body):
        self.assertEqual(body["model"], "qwen2.5-72b-instruct")
        self.assertEqual((body["temperature"], body["top_p"]), (0.7, 0.9))
        self.assertEqual(body["custom_param"], "value")
        self.assertNotIn("presence_penalty", body)

    @unittest.skipUnless(openai, OPENAI_MISSING)
    def test_openai_client_streams_through_the_shipped_config(self):
        self.start_shipped_config()
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.relay.port,
                               api_key="unused", max_retries=0, timeout=WAIT_SECONDS)
        self.addCleanup(client.close)
        stream = client.chat.completions.create(
            model="gpt-3.5-turbo", presence_penalty=0.5, stream=True,
            messages=[{"role": "user", "content": "Hello"}])
        tokens = [chunk.choices[0].delta.content for chunk in stream
                  if chunk.choices and chunk.choices[0].delta.content]
        self.assertEqual(tokens, ["tok0 ", "tok1 ", "tok2 "])
        self.expected_upstream_body(self.upstream.last().json())
        self.assertTrue(self.upstream.last().json()["stream"])

    def test_http_client_through_the_shipped_config(self):
        self.start_shipped_config()
        status, _, data = self.chat({"model": "gpt-3.5-turbo", "presence_penalty": 0.5,
                                     "stream": True, "messages": []})
        self.assertEqual((status, data), (200, b"".join(
            sse_events(3, "qwen2.5-72b-instruct"))))
        self.expected_upstream_body(self.upstream.last().json())
        self.chat({"model": "llama3", "temperature": 0.1, "messages": []})
        self.assertEqual(self.upstream.last().json(), {
            "model": "llama3", "temperature": 0.7, "messages": [], "top_p": 0.95})

    def quick_start_blocks(self):
        blocks = readme_code_blocks("## Quick start")
        self.assertEqual(blocks[0], "python3 llm_relay.py --demo\n")
        return blocks

    @unittest.skipUnless(openai, OPENAI_MISSING)
    def test_the_readme_quick_start_runs_as_written(self):
        blocks = self.quick_start_blocks()
        snippet, shown_output, curl = blocks[1:4]
        # The README's command, on a free port, where no config.jsonc is: the
        # one shipped beside llm_relay.py is used.
        relay = RelayProcess(self, None, shlex.split(blocks[0])[2:] +
                             ["--listen", "127.0.0.1:0"])
        self.assertIsNotNone(relay.port, relay.stderr_text())
        base_url = "http://127.0.0.1:%d/v1" % relay.port
        self.assertIn('"http://localhost:8080/v1"', snippet)
        process = subprocess.Popen(
            [sys.executable, "-c", snippet.replace("http://localhost:8080/v1", base_url)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = process.communicate(timeout=WAIT_SECONDS)
        self.assertEqual((process.returncode, out.decode("utf-8")), (0, shown_output),
                         err.decode("utf-8", "replace"))
        self.assertIn("POST /v1/chat/completions 200", relay.wait_for_line(
            "stream=yes model=gpt-3.5-turbo\u2192qwen2.5-72b-instruct"))
        # The curl command's body, streamed: the same answer, word by word.
        arguments = shlex.split(curl.replace("\\\n", " "))
        self.assertEqual(arguments[:3], ["curl", "-N", "http://localhost:8080/v1/chat/"
                                         "completions"])
        body = arguments[arguments.index("-d") + 1]
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=body.encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(response.getheader("Cache-Control"), "no-cache")
        lines = read_sse_lines(response)
        self.assertEqual(lines[-2:], [b"data: [DONE]\n", b"\n"])
        words = [json.loads(line[6:].decode())["choices"][0]["delta"].get("content", "")
                 for line in lines[:-2] if line.startswith(b"data: ")]
        self.assertGreater(len(words), 10)
        self.assertEqual("".join(words), shown_output.strip())

    def test_the_readme_explain_and_real_commands_run_as_written(self):
        blocks = self.quick_start_blocks()
        for line in blocks[4].splitlines():  # checked, not served
            arguments = shlex.split(line)
            self.assertEqual(arguments[:3], ["python3", "-m", "llm_relay"])
            status, out, err = CommandLineTest.run_relay(
                self, arguments[3:] + ["--check-config"])
            self.assertEqual(status, 0, err)
        arguments = shlex.split(blocks[5])
        self.assertEqual(arguments[:3], ["python3", "llm_relay.py", "--explain"])
        status, out, err = CommandLineTest.run_relay(self, arguments[2:])
        self.assertEqual((status, out, err), (0, blocks[6], ""))


class DemoUpstreamTest(RelayTestCase):
    """--demo's upstream, in process: OpenAI shapes, streamed and not."""

    def setUp(self):
        RelayTestCase.setUp(self)
        demo = llm_relay.DemoUpstream()
        self.addCleanup(demo.server_close)
        self.addCleanup(demo.shutdown)
        config, _ = llm_relay.load_config(os.path.join(HERE, "config.jsonc"), overrides={
            "listen": "127.0.0.1:0", "upstream": demo.url, "every_upstream": True})
        demo.start(self.start_server(config))

    def test_models_and_non_streamed_answers(self):
        status, _, data = self.request("GET", "/v1/models")
        self.assertEqual([entry["id"] for entry in json.loads(data.decode())["data"]],
                         ["llm-relay-demo", "qwen2.5-72b-instruct", "gpt-3.5-turbo"])
        status, _, data = self.chat({"model": "llama3", "temperature": 0.1,
                                     "messages": [{"role": "user", "content": "hi"}]})
        answer = json.loads(data.decode())
        self.assertEqual((status, answer["object"], answer["model"]),
                         (200, "chat.completion", "llama3"))
        self.assertEqual(answer["choices"][0]["message"]["content"],
                         "Demo upstream got model llama3 from model_rules[1] (default), "
                         "which sets temperature, top_p. Parameters: temperature=0.7, "
                         "top_p=0.95.")
        status, _, data = self.chat({"model": "gpt-3.5-turbo", "prompt": "hi"},
                                    path="/v1/completions")
        answer = json.loads(data.decode())
        self.assertEqual((status, answer["object"], answer["model"]),
                         (200, "text_completion", "qwen2.5-72b-instruct"))
        self.assertIn("removes presence_penalty", answer["choices"][0]["text"])
        status, _, data = self.chat({"model": "m", "input": "x"}, path="/v1/embeddings")
        self.assert_openai_error(status, data, 404, "unknown_url")
        status, _, data = self.chat({"model": "claude-x", "max_tokens": 5, "messages": []},
                                    {"anthropic-version": "2023-06-01"}, path="/v1/messages")
        self.assertEqual((status, json.loads(data.decode())["error"]["type"]),
                         (404, "not_found_error"), data)
        self.assertEqual(json.loads(data.decode())["type"], "error")

    @unittest.skipUnless(openai, OPENAI_MISSING)
    def test_the_official_client_streams_chat_and_completions(self):
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.relay.port,
                               api_key="unused", max_retries=0, timeout=WAIT_SECONDS)
        self.addCleanup(client.close)
        stream = client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}],
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks
                       if chunk.choices)
        self.assertTrue(text.startswith("Demo upstream got model qwen2.5-72b-instruct "
                                        "from model_rules[0]"), text)
        self.assertEqual(chunks[-1].usage.completion_tokens, len(text.split()))
        completion = client.completions.create(model="llama3", prompt="hi", stream=True)
        self.assertIn("from model_rules[1] (default)",
                      "".join(chunk.choices[0].text for chunk in completion))
        self.assertEqual([model.id for model in client.models.list()][-1],
                         "gpt-3.5-turbo")


###############################################################################
# The README's promises #######################################################
###############################################################################

def readme_code_blocks(after):
    """Return the fenced code blocks of README.md that follow a phrase."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    text = text[text.index(after):]
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2]]


README_NAMES = ("README.md", "README.zh-CN.md")


def readme_section(name, heading):
    """Return the text of a README's "## " section whose heading contains
    heading (the Chinese one keeps the English words in parentheses); an
    empty heading gives the whole file."""
    with open(os.path.join(HERE, name), encoding="utf-8") as handle:
        text = handle.read()
    if not heading:
        return text
    for section in text.split("\n## ")[1:]:
        if heading in section.split("\n", 1)[0]:
            return section
    raise AssertionError("%s has no section %r" % (name, heading))


def readme_table(name, heading):
    """Return the first table of a README section as key -> its other cells,
    for rows whose first cell is a `key`."""
    rows = collections.OrderedDict()
    for line in readme_section(name, heading).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def readme_default(value, name):
    """Return how a README's Default column starts for a config default."""
    if value is None:
        return "none" if name == "README.md" else "\u65e0"  # wu: none
    return "`%s`" % ("%g" % value if isinstance(value, float)
                     else json.dumps(value))


class ReadmeTest(unittest.TestCase):

    def test_rule_example_gives_the_documented_body(self):
        rule_text, client_body, upstream_body = readme_code_blocks(
            "Example. With this rule:")[:3]
        config, _ = llm_relay.parse_config_text(
            '{"model_rules": [%s]}' % rule_text, "README.md", {})
        body = llm_relay.parse_json_body(client_body.strip().encode())
        data, _ = llm_relay.rewrite_body(client_body.encode(), body,
                                         llm_relay.select_rule(config.rule_index,
                                                               body["model"]))
        self.assertEqual(data.decode(), upstream_body.strip())

    def test_both_readmes_document_exactly_the_config_keys(self):
        for name in README_NAMES:
            with self.subTest(readme=name):
                rows = readme_table(name, "Configuration")
                self.assertEqual(sorted(rows), sorted(llm_relay.TOP_LEVEL_KEYS),
                                 "%s's configuration table" % name)
                for key in llm_relay.CONFIG_KEYS:
                    with self.subTest(key=key):
                        shown = readme_default(key.default, name)
                        self.assertTrue(rows[key.name][1].startswith(shown), "%s: "
                                        "default of %s is %s, not %s" % (
                                            name, key.name, rows[key.name][1], shown))
                        if name == "README.md":
                            self.assertEqual(rows[key.name][0], key.type,
                                             "README.md: type of %s" % key.name)

    def test_both_readmes_document_exactly_the_rule_and_upstream_keys(self):
        for name in README_NAMES:
            with self.subTest(readme=name):
                self.assertEqual(sorted(readme_table(name, "Rules")),
                                 sorted(llm_relay.RULE_KEYS))
                section = readme_section(name, "Several upstreams")
                for key in llm_relay.UPSTREAM_KEYS:
                    with self.subTest(key=key):
                        self.assertIn("`%s`" % key, section, "%s: upstreams' %s" % (
                            name, key))

    def test_both_readmes_document_exactly_the_group_and_key_fields(self):
        for name in README_NAMES:
            with self.subTest(readme=name):
                self.assertEqual(sorted(readme_table(name, "Several GPU boxes")),
                                 sorted(llm_relay.GROUP_KEYS))
                self.assertEqual(sorted(readme_table(name, "Sharing the relay")),
                                 sorted(llm_relay.API_KEY_KEYS))

    def test_the_readmes_link_each_other(self):
        self.assertIn("README.zh-CN.md", readme_section("README.md", ""))
        self.assertIn("README.md", readme_section("README.zh-CN.md", ""))

    def test_several_upstreams_example_is_a_valid_config(self):
        example = readme_code_blocks("## Several upstreams")[0]
        config, warnings = llm_relay.parse_config_text(
            example, "README.md", {"OPENAI_API_KEY": "sk-x", "RELAY_KEY": "k"})
        self.assertEqual(warnings, [])
        self.assertEqual(config.rules[1].upstreams, ("vllm", "openai"))

    def test_several_gpu_boxes_and_sharing_examples_are_valid_configs(self):
        environ = {"OPENAI_API_KEY": "sk-x", "RELAY_KEY": "k", "ALICE_KEY": "a",
                   "NIGHTLY_KEY": "n", "ADMIN_KEY": "admin"}
        cpu_box = readme_code_blocks("A CPU box that serves")[0]
        config, warnings = llm_relay.parse_config_text(cpu_box, "README.md", environ)
        self.assertEqual((warnings, config.upstreams["default"].max_concurrent), ([], 2))
        boxes = readme_code_blocks("## Several GPU boxes")[0]
        config, warnings = llm_relay.parse_config_text(boxes, "README.md", environ)
        self.assertEqual(warnings, [])
        self.assertEqual(config.groups["qwen"].members, ("gpu1", "gpu2", "gpu3"))
        self.assertEqual(config.groups["default"].members, ("gpu1", "gpu2"))
        self.assertEqual(config.rules[1].upstreams, ("qwen", "openai"))
        sharing = readme_code_blocks("## Sharing the relay")[0]
        config, warnings = llm_relay.parse_config_text(sharing, "README.md", environ)
        self.assertEqual(warnings, [])
        self.assertEqual([key.name for key in config.api_keys], [
            "alice", "nightly-eval", llm_relay.key_fingerprint(b"admin")])
        self.assertEqual(config.api_keys[0].requests_per_minute, 60)


###############################################################################
# Several GPU boxes and several people: replica groups, named keys ############
###############################################################################

def metric_value(text, name, labels=""):
    """Return the value of the sample "name{labels}" in /metrics text, or
    None; labels is the rendered label text such as 'upstream="a"'."""
    sample = name + ("{%s}" % labels if labels else "")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class FakeClock(object):
    """A monotonic clock that moves only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def group_config(**fields):
    """Return a config dict with upstreams a, b (and c, d) in group "pool"."""
    members = fields.pop("members", ("a", "b"))
    upstreams = dict((name, {"url": "http://127.0.0.1:%d/v1" % (9000 + position)})
                     for position, name in enumerate(members))
    upstreams["pool"] = dict({"replicas": list(members)}, **fields)
    return {"upstreams": upstreams, "model_rules": [
        {"match_model": "default", "upstream": "pool"}]}


class ReplicaConfigTest(unittest.TestCase):

    def assert_error(self, raw, path, message_part):
        with self.assertRaises(llm_relay.ConfigError) as caught:
            config_from(raw)
        self.assertEqual(caught.exception.path, path, str(caught.exception))
        self.assertIn(message_part, str(caught.exception))

    def test_groups_are_built_and_rules_may_name_them(self):
        config = config_from(group_config(affinity="header:X-Session-Id",
                                          eject_after=2, cooldown=5))
        group = config.groups["pool"]
        self.assertEqual(group.members, ("a", "b"))
        self.assertEqual(group.affinity, ("header", "x-session-id"))
        self.assertEqual((group.eject_after, group.cooldown), (2, 5.0))
        self.assertNotIn("pool", config.upstreams)
        self.assertEqual(config.rules[0].upstreams, ("pool",))
        self.assertEqual(config_from(group_config()).groups["pool"].affinity, None)

    def test_group_errors_name_the_field(self):
        raw = group_config()
        raw["upstreams"]["pool"]["replicas"] = ["a", "nope"]
        self.assert_error(raw, "upstreams.pool.replicas[1]", "unknown upstream 'nope'")
        raw["upstreams"]["pool"]["replicas"] = ["a", "a"]
        self.assert_error(raw, "upstreams.pool.replicas[1]", "listed twice")
        raw["upstreams"]["pool"]["replicas"] = []
        self.assert_error(raw, "upstreams.pool.replicas", "non-empty list")
        raw["upstreams"]["pool"] = {"replicas": ["a"], "affinity": "cookie"}
        self.assert_error(raw, "upstreams.pool.affinity", "header:<name>")
        raw["upstreams"]["pool"] = {"replicas": ["a"], "eject_after": 0}
        self.assert_error(raw, "upstreams.pool.eject_after", "positive integer")
        raw["upstreams"]["pool"] = {"replicas": ["a"], "cooldown": -1}
        self.assert_error(raw, "upstreams.pool.cooldown", "positive number")
        raw["upstreams"]["a"]["max_concurrent"] = 0
        self.assert_error(raw, "upstreams.a.max_concurrent", "positive integer")
        raw["upstreams"]["a"] = {"url": "http://h/v1", "max_queue": -1}
        self.assert_error(raw, "upstreams.a.max_queue", "non-negative integer")
        raw = group_config()
        raw["upstreams"]["pool2"] = {"replicas": ["pool"]}
        self.assert_error(raw, "upstreams.pool2.replicas[0]", "cannot hold a group")
        raw = group_config()
        raw["model_rules"][0]["upstream"] = ["pool", "elsewhere"]
        self.assert_error(raw, "model_rules[0].upstream[1]", "known: a, b, default, pool")

    def test_error_carries_line_and_column(self):
        error = config_error('{"upstreams": {"a": {"url": "http://h/v1"},\n'
                             ' "pool": {"replicas": ["a",\n   "zz"]}}}')
        self.assertEqual((error.line, error.column, error.path),
                         (3, 4, "upstreams.pool.replicas[1]"))

    def test_default_route_may_be_a_group(self):
        raw = group_config()
        raw["upstreams"]["default"] = raw["upstreams"].pop("pool")
        del raw["model_rules"]
        config = config_from(raw)
        self.assertIn("default", config.groups)
        self.assertNotIn("default", config.upstreams)
        raw["upstream"] = "http://h/v1"
        self.assert_error(raw, "upstreams.default", "cannot be called 'default'")

    def test_api_key_objects_and_plain_strings(self):
        config = config_from({"api_keys": [
            "plain-key", {"key": "${ALICE_KEY}", "name": "alice",
                          "models": ["qwen*", "gpt-3.5-turbo"], "max_concurrent": 4,
                          "requests_per_minute": 60}]}, {"ALICE_KEY": "sk-alice"})
        plain, alice = config.api_keys
        self.assertRegex(plain.name, r"^key-[0-9a-f]{8}$")
        self.assertNotIn("plain", plain.name)
        self.assertEqual(alice, llm_relay.ApiKey("alice", b"sk-alice", (
            "qwen*", "gpt-3.5-turbo"), 4, 60))
        self.assertEqual(config_from({"api_keys": [{"key": "k"}]}).api_keys[0].name,
                         llm_relay.key_fingerprint(b"k"))

    def test_api_key_errors_never_show_the_key(self):
        cases = [
            ([{"name": "x"}], "api_keys[0]", "expected \"key\""),
            ([{"key": "secret-1", "name": "a b"}], "api_keys[0].name", "letters"),
            ([{"key": "secret-1", "models": "qwen"}], "api_keys[0].models",
             "list of strings"),
            # [] would read as "any model" (no list): refused, not open.
            ([{"key": "secret-1", "models": []}], "api_keys[0].models",
             "at least one"),
            ([{"key": "secret-1", "max_concurrent": 0}], "api_keys[0].max_concurrent",
             "positive integer"),
            ([{"key": "secret-1", "requests_per_minute": 1.5}],
             "api_keys[0].requests_per_minute", "positive integer"),
            ([{"key": "secret-1", "name": "x"}, {"key": "secret-2", "name": "x"}],
             "api_keys[1]", "used twice"),
            (["secret-1", {"key": "secret-1", "name": "x"}], "api_keys[1]",
             "listed twice"),
            ([3], "api_keys[0]", "expected a key"),
        ]
        for keys, path, message in cases:
            with self.assertRaises(llm_relay.ConfigError) as caught:
                config_from({"api_keys": keys})
            self.assertEqual(caught.exception.path, path, keys)
            self.assertIn(message, str(caught.exception))
            self.assertNotIn("secret-", str(caught.exception))

    def test_check_config_describes_groups_limits_and_keys(self):
        raw = group_config(affinity="prompt")
        raw["upstreams"]["a"]["max_concurrent"] = 2
        raw["api_keys"] = [{"key": "sk-secret-alice-123456", "name": "alice",
                            "models": ["qwen*"], "requests_per_minute": 5}]
        config, warnings = llm_relay.validate_config(raw, "c", None, {})
        report = llm_relay.describe_config(config, warnings)
        self.assertIn("group pool: a, b (affinity prompt, eject_after 3, "
                      "cooldown 10 s)", report)
        self.assertIn("max_concurrent 2, max_queue 32, queue_timeout 30 s", report)
        self.assertIn("alice (****3456; models qwen*; requests_per_minute 5)", report)
        self.assertNotIn("sk-secret", report)

    def test_check_config_shows_which_apis_are_translated(self):
        config = config_from({"upstreams": {
            "default": {"url": "http://a/v1", "apis": ["chat"]},
            "b": {"url": "http://b/v1", "apis": ["chat", "responses"]},
            "c": {"url": "http://c/v1", "apis": ["messages"]},
            "d": {"url": "http://d/v1"}}})
        report = llm_relay.describe_config(config, [])
        self.assertIn("upstream default: http://a/v1 (api_key -, connect_timeout 10 s, "
                      "read_timeout 600 s, apis chat; messages, responses translated)\n",
                      report)
        self.assertIn("read_timeout 600 s, apis chat, responses; messages translated)\n",
                      report)
        self.assertIn("upstream c: http://c/v1 (api_key -, connect_timeout 10 s, "
                      "read_timeout 600 s, apis messages)\n", report)
        self.assertIn("upstream d: http://d/v1 (api_key -, connect_timeout 10 s, "
                      "read_timeout 600 s)\n", report)

    def test_startup_line_names_the_replicas_of_a_default_group(self):
        raw = group_config()
        raw["upstreams"]["default"] = raw["upstreams"].pop("pool")
        del raw["model_rules"]
        self.assertEqual(llm_relay.describe_default_route(config_from(raw)),
                         "replicas http://127.0.0.1:9000/v1, http://127.0.0.1:9001/v1")
        self.assertEqual(llm_relay.describe_default_route(config_from({})),
                         llm_relay.DEFAULT_UPSTREAM)

    def test_unknown_keys_in_new_objects_are_warnings(self):
        raw = group_config(affinty="user")
        raw["api_keys"] = [{"key": "k", "modles": []}]
        _, warnings = llm_relay.validate_config(raw, "c", None, {})
        self.assertTrue(any("'affinty'" in w and "affinity" in w for w in warnings),
                        warnings)
        self.assertTrue(any("'modles'" in w and "models" in w for w in warnings),
                        warnings)


class KeyAndAffinityUnitsTest(unittest.TestCase):

    def test_find_api_key_and_model_allowlist(self):
        keys = config_from({"api_keys": ["k1", {"key": "k2", "name": "bob",
                                                "models": ["qwen*", "gpt-4o"]}]}).api_keys
        self.assertEqual(llm_relay.find_api_key("k2", keys).name, "bob")
        self.assertIsNone(llm_relay.find_api_key("k3", keys))
        self.assertIsNone(llm_relay.find_api_key(None, keys))
        bob = keys[1]
        for model, allowed in (("qwen2.5", True), ("gpt-4o", True), ("gpt-4o-mini", False),
                               ("Qwen", False), (None, False), (3, False)):
            self.assertEqual(llm_relay.key_allows_model(bob, model), allowed, model)
        self.assertTrue(llm_relay.key_allows_model(keys[0], None))

    def test_top_level_members_named_twice(self):
        twice = llm_relay.top_level_members_named_twice
        self.assertEqual(twice(b'{"model":"a","model":"b","x":[{"y":1,"y":2}]}'),
                         {"model"})
        self.assertEqual(twice(b'{"a":{"model":1,"model":2},"model":"m"}'), set())
        self.assertEqual(twice(b'{"\\u006dodel":"a","model":"b"}'), {"model"})
        self.assertEqual(twice(b'{}'), set())

    def test_affinity_keys(self):
        def header(name):
            return {"x-session-id": "s1"}.get(name)
        conversation = {"model": "m", "user": "u1", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"}]}
        later = dict(conversation, messages=conversation["messages"] + [
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])
        other = dict(conversation, messages=[{"role": "system", "content": "be long"},
                                             {"role": "user", "content": "hi"}])
        key = llm_relay.affinity_key
        self.assertEqual(key("prompt", conversation, header), key("prompt", later, header))
        self.assertNotEqual(key("prompt", conversation, header),
                            key("prompt", other, header))
        self.assertEqual(key("user", conversation, header), key("user", {"user": "u1"}, header))
        self.assertEqual(key("user", {"metadata": {"user_id": "u1"}}, header),
                         key("user", {"user": "u1"}, header))
        self.assertIsNone(key("user", {"messages": []}, header))
        self.assertEqual(key(("header", "x-session-id"), None, header),
                         key("user", {"user": "s1"}, header))
        self.assertIsNone(key(("header", "x-other"), None, header))
        self.assertIsNotNone(key("prompt", {"prompt": "x" * 10}, header))
        self.assertEqual(key("prompt", {"prompt": "x" * 5000 + "a"}, header),
                         key("prompt", {"prompt": "x" * 5000 + "b"}, header))

    def test_rendezvous_keeps_keys_on_their_member(self):
        members = ["a", "b", "c", "d"]
        keys = ["session-%d" % index for index in range(200)]
        placed = dict((key, llm_relay.rendezvous_member(key, members)) for key in keys)
        self.assertEqual(set(placed.values()), set(members))
        without_c = dict((key, llm_relay.rendezvous_member(key, ["a", "b", "d"]))
                         for key in keys)
        for key in keys:
            if placed[key] != "c":
                self.assertEqual(without_c[key], placed[key])


class TrafficTest(unittest.TestCase):

    def setUp(self):
        self.config = config_from(group_config(members=("a", "b", "c"),
                                               eject_after=2, cooldown=10))
        self.group = self.config.groups["pool"]
        self.clock = FakeClock()
        self.traffic = llm_relay.Traffic(self.clock)

    def choose(self, key=None, tried=()):
        member, took = self.traffic.choose(self.group, self.config.upstreams, key,
                                           list(tried))
        self.assertTrue(member is None or took)
        return member

    def test_fewest_in_flight_first_and_ties_in_turn(self):
        self.assertEqual([self.choose() for _ in range(3)], ["a", "b", "c"])
        self.traffic.release("b")
        self.assertEqual(self.choose(), "b")  # the only one with none in flight
        for name in "abc":
            self.traffic.release(name)
        self.assertEqual(self.choose(), "c")  # the turn goes on after b
        self.traffic.release("c")
        self.assertEqual([self.choose() for _ in range(3)], ["a", "b", "c"])

    def test_ejection_backoff_and_return(self):
        traffic = self.traffic
        self.assertIsNone(traffic.failed(self.group, "a"))
        self.assertEqual(traffic.failed(self.group, "a"), 10)
        self.assertFalse(traffic.is_up("a"))
        self.assertNotIn("a", [self.choose() for _ in range(4)])
        self.clock.now += 10
        self.assertTrue(traffic.is_up("a"))
        self.assertEqual(traffic.failed(self.group, "a"), 20)  # one failure now
        self.clock.now += 20
        traffic.succeeded("a")
        self.assertIsNone(traffic.failed(self.group, "a"))  # counts from zero
        self.assertEqual(traffic.failed(self.group, "a"), 10)
        samples = dict((row[0], row) for row in traffic.upstream_samples())
        self.assertEqual(samples["a"][4:], (3, 0))

    def test_when_all_are_out_the_least_recently_failed_is_tried(self):
        for name in ("b", "c", "a"):
            self.clock.now += 1
            self.traffic.failed(self.group, name)
            self.traffic.failed(self.group, name)
        self.assertEqual(self.choose(), "b")
        self.assertIsNone(self.choose(tried=["b"]))  # the group failed
        self.assertFalse(self.traffic.has_candidate(self.group, ["b"]))

    def test_affinity_is_sticky_while_the_member_is_up(self):
        member = self.choose(key="k")
        self.assertEqual([self.choose(key="k") for _ in range(5)], [member] * 5)
        self.traffic.failed(self.group, member)
        self.traffic.failed(self.group, member)
        moved = self.choose(key="k")
        self.assertNotEqual(moved, member)
        self.clock.now += 10
        self.assertEqual(self.choose(key="k"), member)

    def test_queue_is_bounded(self):
        upstream = config_from({"upstreams": {"cpu": {
            "url": "http://h/v1", "max_concurrent": 1, "max_queue": 0}}}).upstreams["cpu"]
        self.assertTrue(self.traffic.acquire(upstream))
        self.assertFalse(self.traffic.acquire(upstream))  # no queue: at once
        self.traffic.release("cpu")
        self.assertTrue(self.traffic.acquire(upstream))

    def test_a_reload_that_raises_max_concurrent_frees_the_queued(self):
        def cpu(max_concurrent):
            return config_from({"upstreams": {"cpu": {
                "url": "http://h/v1", "max_concurrent": max_concurrent,
                "queue_timeout": WAIT_SECONDS}}}).upstreams["cpu"]
        old, new = cpu(1), cpu(4)
        self.assertTrue(self.traffic.acquire(old))
        results = []
        queued = threading.Thread(target=lambda: results.append(
            self.traffic.acquire(old)))
        queued.start()
        self.addCleanup(queued.join, WAIT_SECONDS)
        for _ in range(2000):  # until it waits in the queue
            if self.traffic.upstream_samples()[0][2] == 1:
                break
            threading.Event().wait(0.005)
        self.assertEqual(self.traffic.upstream_samples()[0][1:3], (1, 1))
        self.assertTrue(self.traffic.acquire(new))  # the reloaded config's request
        queued.join(WAIT_SECONDS / 2)  # not the whole queue_timeout
        self.assertEqual(results, [True])
        self.assertEqual(self.traffic.upstream_samples()[0][1:3], (3, 0))

    def test_key_limits(self):
        key = llm_relay.ApiKey("alice", b"sk-secret", (), 2, 3)
        self.traffic.admit_key(key, now=0.0)
        self.traffic.admit_key(key, now=1.0)
        with self.assertRaises(llm_relay.RelayError) as caught:
            self.traffic.admit_key(key, now=2.0)
        self.assertEqual(caught.exception.status, 429)
        self.assertIn("max_concurrent", caught.exception.message)
        self.traffic.release_key(key)
        self.traffic.release_key(key)
        self.traffic.admit_key(key, now=2.0)
        self.traffic.release_key(key)
        with self.assertRaises(llm_relay.RelayError) as caught:
            self.traffic.admit_key(key, now=30.0)
        self.assertEqual(dict(caught.exception.headers)["Retry-After"], "30")
        self.assertIn("alice", caught.exception.message)
        self.assertNotIn("sk-secret", caught.exception.message)
        self.traffic.admit_key(key, now=60.0)  # the first start left the window


def session_for(member, members):
    """Return an X-Session-Id value whose affinity goes to member."""
    for index in range(1000):
        value = "session-%d" % index
        digest = llm_relay.affinity_key(("header", "x-session-id"), None,
                                        lambda name: value)
        if llm_relay.rendezvous_member(digest, members) == member:
            return value
    raise AssertionError("no session for %s" % member)


class ReplicaGroupTest(RelayTestCase):
    """Replica groups over real sockets, with one fake upstream per member."""

    def hold_upstream_answers(self):
        """Make the upstream hold each answer until release is set; return
        (started: set when a request arrives, release) Events."""
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def slow(handler, recorded):
            started.set()
            release.wait(WAIT_SECONDS)
            openai_like(handler, recorded)
        self.upstream.behaviour = slow
        return started, release

    def start_group(self, count=2, chain=None, extra_upstreams=None, **group):
        self.fakes = [self.upstream] + [FakeUpstream(self) for _ in range(count - 1)]
        self.names = ["r%d" % index for index in range(count)]
        upstreams = dict((name, {"url": fake.url})
                         for name, fake in zip(self.names, self.fakes))
        upstreams.update(extra_upstreams or {})
        upstreams["pool"] = dict({"replicas": self.names}, **group)
        relay = self.start_relay(upstreams=upstreams, model_rules=[
            {"match_model": "default", "upstream": chain or "pool"}])
        self.clock = FakeClock()
        relay.traffic.clock = self.clock
        return relay

    def counts(self):
        return [len(fake.requests) for fake in self.fakes]

    def metrics_text(self):
        status, _, data = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        return data.decode("utf-8")

    def test_spread_over_1000_requests_on_equal_members(self):
        self.start_group(count=4)
        errors, lock = [], threading.Lock()

        def client(requests):
            connection = self.connect()
            for _ in range(requests):
                status, _, data = self.chat({"model": "m", "messages": []},
                                            connection=connection)
                if status != 200:
                    with lock:
                        errors.append(data)
        threads = [threading.Thread(target=client, args=(125,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        counts = self.counts()
        self.assertEqual(sum(counts), 1000)
        # Each member's share is 250; allow 5% of it above or below.
        self.assertLessEqual(max(counts), 250 + 12, counts)
        self.assertGreaterEqual(min(counts), 250 - 12, counts)
        text = self.metrics_text()
        if text_string_to_metric_families is not None:  # the format parses
            families = dict((family.name, family) for family in
                            text_string_to_metric_families(text))
            self.assertEqual(families["llm_relay_upstream_in_flight"].type, "gauge")
            self.assertEqual(families["llm_relay_upstream_requests"].type, "counter")
        for name, count in zip(self.names, counts):
            self.assertEqual(metric_value(text, "llm_relay_upstream_requests_total",
                                          'upstream="%s"' % name), count)
            self.assertEqual(metric_value(text, "llm_relay_upstream_in_flight",
                                          'upstream="%s"' % name), 0)

    def test_header_affinity_keeps_a_session_on_its_member(self):
        self.start_group(count=3, affinity="header:X-Session-Id")
        for member in range(3):
            session = session_for(self.names[member], self.names)
            before = self.counts()
            for _ in range(4):
                status, _, _ = self.chat({"model": "m"}, {"X-Session-Id": session})
                self.assertEqual(status, 200)
            after = self.counts()
            self.assertEqual([b - a for a, b in zip(before, after)],
                             [4 if index == member else 0 for index in range(3)])
        self.chat({"model": "m"})  # no session: fewest in flight, in turn
        self.assertEqual(sum(self.counts()), 13)

    def test_prompt_affinity_follows_the_start_of_the_conversation(self):
        self.start_group(count=3, affinity="prompt")
        first = [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Name a prime."}]
        for turn in range(5):
            messages = first + [{"role": "assistant", "content": "2"},
                                {"role": "user", "content": "another"}] * turn
            self.assertEqual(self.chat({"model": "m", "messages": messages})[0], 200)
        self.assertEqual(sorted(self.counts()), [0, 0, 5])
        for index in range(12):
            self.chat({"model": "m", "messages": [
                {"role": "user", "content": "topic %d" % index}]})
        self.assertEqual(len([count for count in self.counts() if count]), 3)

    def test_user_affinity(self):
        self.start_group(count=3, affinity="user")
        for _ in range(4):
            self.chat({"model": "m", "user": "alice"})
        self.assertEqual(sorted(self.counts()), [0, 0, 4])

    def test_failing_member_is_ejected_and_comes_back(self):
        broken = threading.Event()
        broken.set()

        def flaky(handler, recorded):
            if broken.is_set():
                return reply_json(handler, {"error": {"message": "oom"}}, 503)
            openai_like(handler, recorded)
        self.start_group(count=2, eject_after=2, cooldown=30)
        self.fakes[1].behaviour = flaky
        with self.assertLogs("llm_relay", "INFO") as logs:
            for _ in range(6):
                status, _, data = self.chat({"model": "m"})
                self.assertEqual(status, 200, data)  # r1 fails over to r0
            self.wait_for_log(logs, "replica r1 of pool is out for 30 s")
        self.assertEqual(len(self.fakes[1].requests), 2)  # out after two
        self.assertTrue(any("upstream=pool/r1>pool/r0" in line for line in logs.output),
                        logs.output)
        text = self.metrics_text()
        self.assertEqual(metric_value(text, "llm_relay_upstream_ejections_total",
                                      'upstream="r1"'), 1)
        self.assertEqual(metric_value(text, "llm_relay_upstream_up", 'upstream="r1"'), 0)
        self.assertEqual(metric_value(text, "llm_relay_upstream_errors_total",
                                      'upstream="r1",kind="5xx"'), 2)
        broken.clear()
        self.clock.now += 30  # the cool-down is over
        for _ in range(4):
            self.assertEqual(self.chat({"model": "m"})[0], 200)
        self.assertEqual(len(self.fakes[1].requests), 4)  # back in turn
        self.assertEqual(metric_value(self.metrics_text(), "llm_relay_upstream_up",
                                      'upstream="r1"'), 1)

    def test_refused_member_is_ejected_and_all_out_tries_the_least_recently_failed(self):
        self.start_group(count=2, eject_after=1)
        self.fakes[1].stop()  # refuses connections from now on
        self.assertEqual(self.chat({"model": "m"})[0], 200)
        self.assertEqual(self.chat({"model": "m"})[0], 200)
        self.assertFalse(self.relay.traffic.is_up("r1"))
        self.clock.now += 1
        self.fakes[0].behaviour = lambda handler, recorded: reply_json(
            handler, {"error": {"message": "down"}}, 500)
        status, _, data = self.chat({"model": "m"})
        self.assertEqual(status, 500, data)  # the last member's own answer
        self.assertFalse(self.relay.traffic.is_up("r0"))
        # Both out: r1 failed first, so it is tried (and refuses: 502).
        served = len(self.fakes[0].requests)
        status, _, data = self.chat({"model": "m"})
        self.assert_openai_error(status, data, 502, "upstream_unreachable")
        self.assertIn("r1", json.loads(data.decode())["error"]["message"])
        self.assertEqual(len(self.fakes[0].requests), served)

    def test_group_is_one_step_of_a_fallback_chain(self):
        backup = FakeUpstream(self)
        self.start_group(count=2, chain=["pool", "backup"],
                         extra_upstreams={"backup": {"url": backup.url}})
        for fake in self.fakes:
            fake.behaviour = lambda handler, recorded: reply_json(
                handler, {"error": {"message": "busy"}}, 500)
        with self.assertLogs("llm_relay", "INFO") as logs:
            status, _, data = self.chat({"model": "m", "stream": True})
            self.assertEqual(status, 200, data)
            self.wait_for_log(logs, ">backup")
        self.assertIn(b"data: [DONE]", data)
        self.assertEqual(self.counts(), [1, 1])
        self.assertEqual(len(backup.requests), 1)
        self.assertTrue(any(re.search(r"upstream=pool/r\d>pool/r\d>backup", line)
                            for line in logs.output), logs.output)
        for fake in self.fakes:
            fake.behaviour = openai_like
        self.assertEqual(self.chat({"model": "m"})[0], 200)
        self.assertEqual(len(backup.requests), 1)  # the group serves again

    def test_stream_on_an_ejected_member_finishes(self):
        started, release = threading.Event(), threading.Event()

        def member(handler, recorded):
            body = recorded.json()
            if not body.get("stream"):
                return reply_json(handler, {"error": {"message": "fail"}}, 500)
            start_chunked(handler)
            lines = sse_events(2)
            write_chunk(handler, lines[0] + lines[1])
            started.set()
            release.wait(WAIT_SECONDS)
            for line in lines[2:]:
                write_chunk(handler, line)
            end_chunks(handler)
        self.start_group(count=2, eject_after=1, affinity="header:X-Session-Id")
        self.fakes[0].behaviour = member
        session = session_for("r0", self.names)
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "stream": True}), headers={
                "Content-Type": "application/json", "X-Session-Id": session})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertTrue(started.wait(WAIT_SECONDS))
        status, _, _ = self.chat({"model": "m"}, {"X-Session-Id": session})
        self.assertEqual(status, 200)  # r0 answered 500, out; r1 answered
        self.assertFalse(self.relay.traffic.is_up("r0"))
        release.set()
        lines = read_sse_lines(response)
        self.assertEqual(lines[-2:], [b"data: [DONE]\n", b"\n"])
        self.assertFalse(any(b"error" in line for line in lines))

    def test_max_concurrent_queues_then_answers_429(self):
        started, release = self.hold_upstream_answers()
        self.start_relay(upstreams={"default": {
            "url": self.upstream.url, "max_concurrent": 1, "max_queue": 1,
            "queue_timeout": WAIT_SECONDS}})
        results = []

        def send():
            results.append(self.chat({"model": "m"}))
        first = threading.Thread(target=send)
        first.start()
        self.assertTrue(started.wait(WAIT_SECONDS))
        second = threading.Thread(target=send)
        second.start()
        self.assertTrue(wait_until(lambda: metric_value(
            self.metrics_text(), "llm_relay_upstream_queued",
            'upstream="default"') == 1))
        with self.assertLogs("llm_relay", "INFO") as logs:
            status, headers, data = self.chat({"model": "m"})
            self.wait_for_log(logs, "upstream=default(busy)")
        self.assert_openai_error(status, data, 429, "upstream_busy")
        self.assertEqual(headers["retry-after"], str(int(WAIT_SECONDS)))
        status, headers, data = self.request("POST", "/v1/messages", {
            "model": "m", "max_tokens": 5, "messages": []})
        self.assertEqual(status, 429)
        self.assertEqual(json.loads(data.decode())["error"]["type"], "rate_limit_error")
        self.assertIn("retry-after", headers)
        self.assertEqual(len(self.upstream.requests), 1)
        release.set()
        first.join(WAIT_SECONDS)
        second.join(WAIT_SECONDS)
        self.assertEqual([result[0] for result in results], [200, 200])
        self.assertEqual(len(self.upstream.requests), 2)
        text = self.metrics_text()
        self.assertEqual(metric_value(text, "llm_relay_upstream_in_flight",
                                      'upstream="default"'), 0)
        self.assertEqual(metric_value(text, "llm_relay_upstream_errors_total",
                                      'upstream="default",kind="busy"'), 2)

    def test_a_client_that_leaves_while_queued_is_never_sent_upstream(self):
        started, release = self.hold_upstream_answers()
        self.start_relay(upstreams={"default": {
            "url": self.upstream.url, "max_concurrent": 1,
            "queue_timeout": WAIT_SECONDS}})
        first = threading.Thread(target=self.chat, args=({"model": "m"},))
        first.start()
        self.addCleanup(first.join, WAIT_SECONDS)
        self.addCleanup(release.set)
        self.assertTrue(started.wait(WAIT_SECONDS))
        with self.assertLogs("llm_relay", "INFO") as logs:
            body = json.dumps({"model": "queued"}).encode()
            sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                            timeout=WAIT_SECONDS)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (len(body), body))
            self.assertTrue(wait_until(lambda: metric_value(
                self.metrics_text(), "llm_relay_upstream_queued",
                'upstream="default"') == 1))
            sock.close()
            release.set()
            self.wait_for_log(logs, "model=queued")
        first.join(WAIT_SECONDS)
        self.assertEqual([r.json()["model"] for r in self.upstream.requests], ["m"])
        line = [line for line in logs.output if "model=queued" in line][0]
        self.assertIn("client disconnected", line)

    def test_a_client_that_leaves_the_queue_frees_its_place_at_once(self):
        started, release = self.hold_upstream_answers()
        # queue_timeout far beyond the test: only the client's leaving can
        # free the place before it.
        self.start_relay(upstreams={"default": {
            "url": self.upstream.url, "max_concurrent": 1, "max_queue": 1,
            "queue_timeout": 1000}})
        first = threading.Thread(target=self.chat, args=({"model": "m"},))
        first.start()
        self.addCleanup(first.join, WAIT_SECONDS)
        self.addCleanup(release.set)
        self.assertTrue(started.wait(WAIT_SECONDS))
        body = json.dumps({"model": "queued"}).encode()
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (len(body), body))

        def queued():
            return metric_value(self.metrics_text(), "llm_relay_upstream_queued",
                                'upstream="default"')
        self.assertTrue(wait_until(lambda: queued() == 1))
        sock.close()
        self.assertTrue(wait_until(lambda: queued() == 0),
                        "the place of a client that left is still taken")
        # The place is free for the next client while the first request runs.
        third = threading.Thread(target=self.chat, args=({"model": "third"},))
        third.start()
        self.addCleanup(third.join, WAIT_SECONDS)
        self.assertTrue(wait_until(lambda: queued() == 1))
        release.set()
        first.join(WAIT_SECONDS)
        third.join(WAIT_SECONDS)
        self.assertEqual([r.json()["model"] for r in self.upstream.requests],
                         ["m", "third"])

    def test_queue_wait_runs_out_and_a_busy_member_moves_on(self):
        started, release = self.hold_upstream_answers()
        backup = FakeUpstream(self)
        self.start_relay(upstreams={
            "cpu": {"url": self.upstream.url, "max_concurrent": 1,
                    "queue_timeout": 0.05},
            "backup": {"url": backup.url}}, model_rules=[
                {"match_model": "a", "upstream": "cpu"},
                {"match_model": "b", "upstream": ["cpu", "backup"]}])
        thread = threading.Thread(target=self.chat, args=({"model": "a"},))
        thread.start()
        self.addCleanup(thread.join, WAIT_SECONDS)
        self.addCleanup(release.set)  # runs first
        self.assertTrue(started.wait(WAIT_SECONDS))
        status, headers, data = self.chat({"model": "a"})
        self.assert_openai_error(status, data, 429, "upstream_busy")
        self.assertEqual(headers["retry-after"], "1")
        status, _, data = self.chat({"model": "b"})
        self.assertEqual(status, 200, data)
        self.assertEqual(len(backup.requests), 1)


    def test_member_silent_past_read_timeout_is_ejected(self):
        answered = threading.Event()
        self.addCleanup(answered.set)

        def silent(handler, recorded):
            answered.wait(WAIT_SECONDS)  # never answers in time
        self.start_group(count=2, eject_after=1)
        self.relay.config = self.relay.config._replace(upstreams=collections.OrderedDict(
            (name, upstream._replace(read_timeout=0.2) if name == "r0" else upstream)
            for name, upstream in self.relay.config.upstreams.items()))
        self.fakes[0].behaviour = silent
        status, _, data = self.chat({"model": "m"})
        self.assertEqual(status, 200, data)  # r0 timed out, r1 answered
        self.assertFalse(self.relay.traffic.is_up("r0"))
        self.assertEqual(metric_value(self.metrics_text(), "llm_relay_upstream_errors_total",
                                      'upstream="r0",kind="timeout"'), 1)
        self.assertEqual(self.chat({"model": "m"})[0], 200)
        self.assertEqual(self.counts(), [1, 2])

    def test_messages_are_translated_for_each_chat_only_member(self):
        self.start_group(count=2)
        self.relay.config = self.relay.config._replace(upstreams=collections.OrderedDict(
            (name, upstream._replace(apis=frozenset(["chat"])))
            for name, upstream in self.relay.config.upstreams.items()))
        for fake in self.fakes:
            fake.behaviour = chat_only_upstream
        for _ in range(2):
            status, _, data = self.request("POST", "/v1/messages", {
                "model": "claude-x", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]},
                {"anthropic-version": "2023-06-01"})
            self.assertEqual(status, 200, data)
            self.assertEqual(json.loads(data.decode())["type"], "message")
        self.assertEqual(self.counts(), [1, 1])
        for fake in self.fakes:
            self.assertTrue(fake.last().path.endswith("/chat/completions"))

    def test_streams_are_translated_for_each_chat_only_member(self):
        # Claude Code and Codex always stream: a group name in the chain must
        # not be looked up as an upstream (it was a KeyError, a 500).
        self.start_group(count=2)
        self.relay.config = self.relay.config._replace(upstreams=collections.OrderedDict(
            (name, upstream._replace(apis=frozenset(["chat"])))
            for name, upstream in self.relay.config.upstreams.items()))
        for fake in self.fakes:
            fake.behaviour = chat_only_upstream
        for path, body, last_event in (
                ("/v1/messages", {"model": "claude-x", "max_tokens": 10, "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]},
                 "message_stop"),
                ("/v1/responses", {"model": "gpt-5.5", "input": "hi", "stream": True},
                 "response.completed")):
            with self.subTest(path=path):
                connection = self.connect()
                connection.request("POST", path, body=json.dumps(body), headers={
                    "Content-Type": "application/json", "anthropic-version": "2023-06-01"})
                response = connection.getresponse()
                self.assertEqual(response.status, 200)
                events = parse_sse_events(b"".join(read_sse_lines(response)))
                self.assertEqual(events[-1][0], last_event)
        self.assertEqual(self.counts(), [1, 1])
        for fake in self.fakes:
            self.assertTrue(fake.last().json()["stream"])

class NamedKeysTest(RelayTestCase):
    """api_keys entries with names, model allowlists and limits."""

    ALICE = {"key": "sk-alice-secret", "name": "alice",
             "models": ["qwen*", "gpt-3.5-turbo"]}

    def auth(self, key="sk-alice-secret"):
        return {"Authorization": "Bearer " + key}

    def test_models_allowlist_is_403_naming_the_model_never_the_key(self):
        self.start_relay(api_keys=[self.ALICE, "sk-plain-key"], model_rules=[
            {"match_model": "gpt-3.5-turbo", "set": {"model": "qwen2.5-72b-instruct"}},
            {"match_model": "llama-3", "set": {"model": "llama"}}])
        self.assertEqual(self.chat({"model": "gpt-3.5-turbo"}, self.auth())[0], 200)
        self.assertEqual(self.chat({"model": "qwen2.5-7b"}, self.auth())[0], 200)
        for body in ({"model": "llama-3"}, {"messages": []}, {"model": 3}):
            status, _, data = self.chat(body, self.auth())
            error = self.assert_openai_error(status, data, 403, "model_not_allowed")
            self.assertNotIn("sk-alice", data.decode())
        self.assertIn('"llama-3"', json.loads(self.chat(
            {"model": "llama-3"}, self.auth())[2].decode())["error"]["message"])
        self.assertEqual(error["type"], "permission_error")
        status, _, data = self.request("POST", "/v1/audio/transcriptions", b"x" * 10,
                                       dict(self.auth(), **{
                                           "Content-Type": "multipart/form-data; b=1"}))
        self.assert_openai_error(status, data, 403, "model_not_allowed")
        self.assertEqual(len(self.upstream.requests), 2)  # nothing else forwarded
        self.assertEqual(self.chat({"model": "llama-3"}, self.auth("sk-plain-key"))[0], 200)

    def test_a_body_naming_model_twice_is_400_for_a_key_with_a_models_list(self):
        # The relay reads the last "model"; an upstream that reads the first
        # would serve a model the key may not use.
        self.start_relay(api_keys=[self.ALICE, "sk-plain-key"])
        twice = b'{"model":"llama-3","model":"qwen2","messages":[]}'
        escaped = b'{"model":"llama-3","\\u006dodel":"qwen2","messages":[]}'
        json_type = {"Content-Type": "application/json"}
        for body in (twice, escaped):
            status, _, data = self.chat(body, dict(self.auth(), **json_type))
            error = self.assert_openai_error(status, data, 400, "invalid_json")
            self.assertEqual(error["param"], "model")
        status, _, data = self.request("POST", "/v1/messages", twice, dict(
            json_type, **{"x-api-key": "sk-alice-secret",
                          "anthropic-version": "2023-06-01"}))
        self.assertEqual(status, 400, data)
        answer = json.loads(data.decode())
        self.assertEqual((answer["type"], answer["error"]["type"]),
                         ("error", "invalid_request_error"))
        self.assertEqual(self.upstream.requests, [])
        nested = b'{"model":"qwen2","metadata":{"model":1,"model":2},"messages":[]}'
        self.assertEqual(self.chat(nested, dict(self.auth(), **json_type))[0], 200)
        # A key without a models list costs nothing: the bytes go as they came.
        self.assertEqual(self.chat(twice, dict(self.auth("sk-plain-key"),
                                               **json_type))[0], 200)
        self.assertEqual([request.body for request in self.upstream.requests],
                         [nested, twice])

    def test_anthropic_clients_get_anthropic_shaped_403_and_429(self):
        self.start_relay(api_keys=[dict(self.ALICE, requests_per_minute=2)])
        key = {"x-api-key": "sk-alice-secret", "anthropic-version": "2023-06-01"}
        body = {"model": "claude-3-haiku", "max_tokens": 5, "messages": []}
        messages = []
        for expected_status, error_type in ((403, "permission_error"),
                                            (403, "permission_error"),
                                            (429, "rate_limit_error")):
            status, headers, data = self.request("POST", "/v1/messages", body, key)
            self.assertEqual(status, expected_status, data)
            answer = json.loads(data.decode())
            self.assertEqual((answer["type"], answer["error"]["type"]),
                             ("error", error_type))
            self.assertNotIn("sk-alice", data.decode())
            messages.append(answer["error"]["message"])
        self.assertIn('"claude-3-haiku"', messages[0])
        self.assertIn("alice", messages[2])
        self.assertTrue(1 <= int(headers["retry-after"]) <= 60)
        self.assertEqual(self.upstream.requests, [])

    def test_model_list_shows_only_what_the_key_may_use(self):
        self.start_relay(api_keys=[self.ALICE, "sk-plain-key"], model_rules=[
            {"match_model": "gpt-3.5-turbo", "set": {"model": "qwen"}},
            {"match_model": "llama-3", "set": {"model": "llama"}}])
        status, _, data = self.request("GET", "/v1/models", headers=self.auth())
        self.assertEqual(status, 200, data)
        self.assertEqual([entry["id"] for entry in json.loads(data.decode())["data"]],
                         ["qwen2.5-72b-instruct", "gpt-3.5-turbo"])
        status, _, data = self.request("GET", "/v1/models",
                                       headers=self.auth("sk-plain-key"))
        self.assertEqual(len(json.loads(data.decode())["data"]), 3)
        status, _, data = self.request("GET", "/v1/models", headers={
            "x-api-key": "sk-alice-secret", "anthropic-version": "2023-06-01"})
        self.assertEqual(status, 200, data)
        self.assertEqual([entry["id"] for entry in json.loads(data.decode())["data"]],
                         ["qwen2.5-72b-instruct", "gpt-3.5-turbo"])
        status, _, data = self.request("GET", "/v1/models/llama-3", headers=self.auth())
        self.assert_openai_error(status, data, 403, "model_not_allowed")
        status, _, _ = self.request("GET", "/v1/models/gpt-3.5-turbo", headers=self.auth())
        self.assertEqual(status, 200)

    def test_per_key_limits_answer_429_with_retry_after(self):
        started, release = threading.Event(), threading.Event()

        def slow(handler, recorded):
            if recorded.json().get("model") == "slow":
                started.set()
                release.wait(WAIT_SECONDS)
            openai_like(handler, recorded)
        self.upstream.behaviour = slow
        self.start_relay(api_keys=[
            {"key": "sk-bob", "name": "bob", "max_concurrent": 1},
            {"key": "sk-carol", "name": "carol", "requests_per_minute": 2}])
        thread = threading.Thread(target=self.chat, args=(
            {"model": "slow"}, self.auth("sk-bob")))
        thread.start()
        self.addCleanup(thread.join, WAIT_SECONDS)
        self.addCleanup(release.set)
        self.assertTrue(started.wait(WAIT_SECONDS))
        status, headers, data = self.chat({"model": "m"}, self.auth("sk-bob"))
        error = self.assert_openai_error(status, data, 429, "rate_limit_exceeded")
        self.assertEqual(headers["retry-after"], "1")
        self.assertIn("bob", error["message"])
        self.assertNotIn("sk-bob", error["message"])
        self.assertEqual(self.chat({"model": "m"}, self.auth("sk-carol"))[0], 200)
        release.set()
        thread.join(WAIT_SECONDS)
        self.assertEqual(self.chat({"model": "m"}, self.auth("sk-bob"))[0], 200)
        self.assertEqual(self.chat({"model": "m"}, self.auth("sk-carol"))[0], 200)
        status, headers, data = self.chat({"model": "m"}, self.auth("sk-carol"))
        self.assert_openai_error(status, data, 429, "rate_limit_exceeded")
        self.assertTrue(1 <= int(headers["retry-after"]) <= 60, headers)

    def test_key_name_in_access_log_and_metrics_never_the_key(self):
        self.start_relay(api_keys=[self.ALICE, "sk-plain-key"])
        plain_name = llm_relay.key_fingerprint(b"sk-plain-key")
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.chat({"model": "qwen"}, self.auth())
            self.chat({"model": "qwen", "stream": True}, self.auth())
            self.chat({"model": "other"}, self.auth("sk-plain-key"))
            self.wait_for_log(logs, "key=" + plain_name)
        self.assertTrue(any("key=alice" in line for line in logs.output))
        self.assertFalse(any("sk-" in line for line in logs.output), logs.output)
        status, _, data = self.request("GET", "/metrics", headers=self.auth())
        text = data.decode()
        self.assertNotIn("sk-", text)
        self.assertEqual(metric_value(text, "llm_relay_requests_total",
                                      'path="/v1/chat/completions",status="200",'
                                      'model="qwen",key="alice"'), 2)
        self.assertEqual(metric_value(text, "llm_relay_requests_total",
                                      'path="/v1/chat/completions",status="200",'
                                      'model="other",key="%s"' % plain_name), 1)
        self.assertEqual(metric_value(text, "llm_relay_tokens_total",
                                      'model="qwen",kind="prompt",key="alice"'), 3)

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "no SIGHUP on this platform")
    def test_sighup_to_the_real_process_removes_a_key(self):
        relay = RelayProcess(self, config_text(self.upstream.url, api_keys=[
            self.ALICE, {"key": "sk-frank", "name": "frank"}]))
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)

        def status_for(key):
            connection.request("POST", "/v1/chat/completions", body=b'{"model": "qwen"}',
                               headers={"Content-Type": "application/json",
                                        "Authorization": "Bearer " + key})
            response = connection.getresponse()
            response.read()
            return response.status
        self.assertEqual(status_for("sk-frank"), 200)
        relay.write_config(config_text(self.upstream.url, api_keys=[self.ALICE]))
        seen = len(relay.lines)
        relay.process.send_signal(signal.SIGHUP)
        self.assertIsNotNone(relay.wait_for_line("reloaded", seen))
        self.assertEqual(status_for("sk-frank"), 401)  # same connection
        self.assertEqual(status_for("sk-alice-secret"), 200)
        self.assertNotIn("sk-frank", relay.stderr_text())
        self.assertIn("key=frank", relay.stderr_text())

    def test_removed_key_stops_working_at_once_on_reload(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "config.jsonc")

        def write(keys):
            with open(path, "w") as handle:
                json.dump({"listen": "127.0.0.1:0", "upstream": self.upstream.url,
                           "api_keys": keys}, handle)
        write([self.ALICE, {"key": "sk-dave", "name": "dave"}])
        config, _ = llm_relay.load_config(path)
        self.start_server(config)
        connection = self.connect()
        self.assertEqual(self.chat({"model": "m"}, self.auth("sk-dave"),
                                   connection=connection)[0], 200)
        write([self.ALICE])
        self.assertTrue(llm_relay.reload_config(self.relay, path))
        status, _, data = self.chat({"model": "m"}, self.auth("sk-dave"),
                                    connection=connection)
        self.assert_openai_error(status, data, 401, "invalid_api_key")
        self.assertEqual(self.chat({"model": "qwen"}, self.auth())[0], 200)
        write([self.ALICE, {"key": "sk-erin", "name": "erin", "models": ["x"]}])
        self.assertTrue(llm_relay.reload_config(self.relay, path))
        self.assertEqual(self.chat({"model": "x"}, self.auth("sk-erin"))[0], 200)
        self.assertEqual(self.chat({"model": "y"}, self.auth("sk-erin"))[0], 403)


###############################################################################
# Operating it: metrics, JSON logs, config check, readiness ###################
###############################################################################

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - depends on the environment
    text_string_to_metric_families = None


class MetricsTest(RelayTestCase):

    def metrics(self, headers=None):
        status, response_headers, data = self.request("GET", "/metrics", None, headers)
        self.assertEqual(status, 200, data)
        self.assertEqual(response_headers["content-type"],
                         "text/plain; version=0.0.4; charset=utf-8")
        return data.decode("utf-8")

    def samples(self, text):
        """Return {(name, frozenset(labels)): value} parsed by prometheus_client."""
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return found

    @unittest.skipUnless(text_string_to_metric_families, "prometheus_client is not "
                         "installed (.ci/run installs it)")
    def test_exposition_parses_and_counts_requests_errors_and_tokens(self):
        usage_line = (b'data: {"choices": [], "usage": {"prompt_tokens": 11, '
                      b'"completion_tokens": 5, "total_tokens": 16}}\n')

        def behaviour(handler, recorded):
            body = recorded.json() if recorded.body else {}
            if body.get("model") == "broken":
                return reply_json(handler, {"error": {}}, 500)
            if body.get("stream"):
                return reply_sse(handler, sse_events(2)[:-2] + [
                    usage_line, b"\n", b"data: [DONE]\n", b"\n"])
            openai_like(handler, recorded)
        self.upstream.behaviour = behaviour
        self.start_relay(model_rules=[{"match_model": "gpt-3.5-turbo",
                                       "set": {"model": "qwen"}}])
        self.chat({"model": "gpt-3.5-turbo", "messages": []})
        self.chat({"model": "gpt-3.5-turbo", "stream": True})
        self.chat({"model": "broken"})
        self.chat(b"{bad", {"Content-Type": "application/json"})
        self.request("GET", "/health")
        self.request("GET", '/v1/odd"path\\x')
        # Each request (a scrape too) is counted just after its answer went
        # out: use the first scrape in which only itself is in flight.
        settled = []

        def scrape_settled():
            text = self.metrics()
            if 'path="/health"' in text and "llm_relay_requests_in_flight 1\n" in text:
                settled.append(text)
            return bool(settled)
        self.assertTrue(wait_until(scrape_settled))
        found = self.samples(settled[0])

        def value(name, **labels):
            return found.get((name, frozenset(labels.items())))
        self.assertEqual(value("llm_relay_requests_total", path="/v1/chat/completions",
                               status="200", model="gpt-3.5-turbo"), 2)
        self.assertEqual(value("llm_relay_requests_total", path="/v1/chat/completions",
                               status="500", model="broken"), 1)
        self.assertEqual(value("llm_relay_requests_total", path="/v1/chat/completions",
                               status="400", model=""), 1)
        self.assertEqual(value("llm_relay_requests_total", path="/health",
                               status="200", model=""), 1)
        self.assertEqual(value("llm_relay_upstream_errors_total", upstream="default",
                               kind="5xx"), 1)
        self.assertEqual(value("llm_relay_tokens_total", model="gpt-3.5-turbo",
                               kind="prompt"), 3 + 11)
        self.assertEqual(value("llm_relay_tokens_total", model="gpt-3.5-turbo",
                               kind="completion"), 1 + 5)
        self.assertEqual(value("llm_relay_requests_in_flight"), 1)  # this scrape
        self.assertEqual(value("llm_relay_request_duration_seconds_count",
                               path="/v1/chat/completions"), 4)
        self.assertEqual(value("llm_relay_request_duration_seconds_bucket",
                               path="/v1/chat/completions", le="+Inf"), 4)
        self.upstream.stop()
        self.chat({"model": "x"})
        found = self.samples(self.metrics())
        self.assertEqual(found[("llm_relay_upstream_errors_total", frozenset(
            {"upstream": "default", "kind": "refused"}.items()))], 1)

    def test_model_labels_are_bounded(self):
        self.start_relay()
        metrics = llm_relay.Metrics()
        for index in range(llm_relay.MAX_MODEL_LABELS + 50):
            metrics.request_finished("/v1/chat/completions", 200, "m%d" % index, 0.1)
        text = metrics.render().decode()
        self.assertIn('model="other"} 50', text)

    def test_metrics_need_a_key_and_can_be_turned_off(self):
        self.start_relay(api_keys=["k"])
        self.assert_ok(*self.request("GET", "/metrics")[::2], expected=401)
        self.assertIn("llm_relay_requests_total", self.metrics(
            {"Authorization": "Bearer k"}))
        self.relay.config = self.relay.config._replace(metrics=False)
        status, _, data = self.request("GET", "/metrics", None,
                                       {"Authorization": "Bearer k"})
        self.assert_openai_error(status, data, 404)


class ReadinessTest(RelayTestCase):

    def ready(self):
        status, _, data = self.request("GET", "/health/ready")
        return status, json.loads(data.decode("utf-8"))

    def test_ready_when_the_default_route_answers_and_down_upstreams_are_named(self):
        second = FakeUpstream(self)
        self.start_relay(upstreams={"second": {"url": second.url}}, api_keys=["k"])
        self.relay.ready_timeout = 0.3
        self.assertEqual(self.ready(), (200, {
            "status": "ready", "upstreams": {"default": "ok", "second": "ok"},
            "failing": [], "routes_down": []}))
        second.stop()  # no rule routes to it: still ready, but named
        self.assertEqual(self.ready(), (200, {
            "status": "ready", "upstreams": {"default": "ok", "second": "refused"},
            "failing": ["second"], "routes_down": []}))
        release = threading.Event()
        self.addCleanup(release.set)
        self.upstream.behaviour = lambda handler, recorded: release.wait(WAIT_SECONDS)
        status, answer = self.ready()
        self.assertEqual((status, answer["status"], answer["failing"],
                          answer["routes_down"]),
                         (503, "not ready", ["default", "second"], ["default"]))
        self.assertEqual(answer["upstreams"]["default"], "timeout")
        self.assert_ok(*self.request("GET", "/health")[::2])

    def test_an_upstream_without_models_is_up(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"detail": "Not Found"}, 404)
        self.start_relay()
        self.assertEqual(self.ready()[0], 200)

    def test_ready_while_each_rule_chain_has_one_upstream_up(self):
        second, third = FakeUpstream(self), FakeUpstream(self)
        self.start_relay(upstreams={"second": {"url": second.url},
                                    "third": {"url": third.url}},
                         model_rules=[
                             {"match_model": "a", "upstream": ["second", "default"]},
                             {"match_model": "default", "upstream": "third"}])
        self.relay.ready_timeout = 0.3
        self.upstream.stop()  # the fallback of one chain; "default" alone is unrouted
        status, answer = self.ready()
        self.assertEqual((status, answer["failing"]), (200, ["default"]), answer)
        second.stop()
        status, answer = self.ready()
        self.assertEqual((status, answer["routes_down"], answer["failing"]),
                         (503, ["model_rules[0]"], ["default", "second"]))

    def test_route_chains_and_routes_down(self):
        config = config_from({"upstreams": {"b": {"url": "http://b/v1"}},
                              "model_rules": [{"match_model": "x",
                                               "upstream": ["b", "default"]}]})
        chains = llm_relay.route_chains(config)
        self.assertEqual(list(chains.items()), [
            ("model_rules[0]", ("b", "default")), ("default", ("default",))])
        self.assertEqual(llm_relay.routes_down(chains, {"b": "refused",
                                                        "default": None}), [])
        self.assertEqual(llm_relay.routes_down(chains, {"b": None,
                                                        "default": "timeout"}),
                         ["default"])

    def test_a_route_through_a_group_is_down_only_when_every_replica_is(self):
        config = config_from(group_config())
        chains = llm_relay.route_chains(config)
        self.assertEqual(llm_relay.routes_down(chains, {"a": "refused", "b": None},
                                               config.groups), [])
        self.assertEqual(llm_relay.routes_down(chains, {"a": "refused",
                                                        "b": "timeout"},
                                               config.groups), ["model_rules[0]"])


class OperatorCommandLineTest(CommandLineTest):

    def write(self, text):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "c.jsonc")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_check_config_prints_settings_and_rules_with_keys_masked(self):
        path = self.write(json.dumps({
            "listen": "127.0.0.1:1", "upstream_api_key": "sk-secret-upstream-key-1234",
            "api_keys": ["relay-secret-key-abcd"], "lisen": 1,
            "model_rules": [{"match_model": "gpt-3.5-turbo", "unset": ["presence_penalty"],
                             "set": {"model": "qwen"}, "extra": {"o": {"a": 1}}}]}))
        status, out, err = self.run_relay(["--check-config", "--config", path])
        self.assertEqual(status, 0, err)
        for secret in ("sk-secret-upstream", "relay-secret-key"):
            with self.subTest(secret=secret):
                self.assertNotIn(secret, out)
        self.assertIn("****1234", out)
        self.assertIn("listen: http://127.0.0.1:1", out)
        rule_line = [line for line in out.splitlines() if "gpt-3.5-turbo" in line][0]
        for part in ("default", "presence_penalty", 'model="qwen"', '{"o": {"a": 1}}'):
            with self.subTest(part=part):
                self.assertIn(part, rule_line)
        self.assertIn("warning:", out)
        self.assertIn("unknown key 'lisen'", out)
        status, out, err = self.run_relay(["--check-config", "--config",
                                           self.write('{"listen": 5}')])
        self.assertEqual(status, 2)
        self.assertIn("c.jsonc:1:12: listen: expected a string", err)

    def test_check_config_escapes_lone_surrogates(self):
        """A JSON escape such as \\ud800 in a key or a model name is valid
        JSONC but cannot be encoded: it is printed escaped, not a traceback."""
        path = self.write('{"\\ud800": 1, "model_rules": [{"match_model": "m\\udfff",'
                          ' "set": {"top_p": 1}}]}')
        status, out, err = self.run_relay(["--check-config", "--config", path])
        self.assertEqual(status, 0, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("unknown key '\\ud800' ignored", out)
        self.assertIn("m\\udfff", out)

    def test_check_config_and_startup_report_rules_that_never_apply(self):
        path = self.write('{"listen": "127.0.0.1:0", "model_rules": [\n'
                          '  {"match_model": "gpt-4*", "set": {"top_p": 1}},\n'
                          '  {"match_model": "gpt-4o-mini", "set": {"top_p": 0.5}}]}')
        status, out, err = self.run_relay(["--check-config", "--config", path])
        self.assertEqual(status, 0, err)
        self.assertIn("warning: %s:3:3: model_rules[1]: never applies to "
                      "'gpt-4o-mini': model_rules[0] ('gpt-4*') matches it first"
                      % path, out)
        with open(path) as handle:
            relay = RelayProcess(self, handle.read())
        self.assertIsNotNone(relay.port)
        text = relay.stderr_text()
        self.assertIn("WARNING %s:3:3: model_rules[1]: never applies to "
                      "'gpt-4o-mini'" % relay.config_path, text)
        self.assertIn(", 2 rules, config ", text)
        relay = RelayProcess(self, '{"listen": "127.0.0.1:0", "model_rules": '
                                   '[{"match_model": "m"}]}')
        self.assertIn(", 1 rule, config ", relay.stderr_text())

    def test_json_log_format_writes_one_object_per_line(self):
        upstream = FakeUpstream(self)
        relay = RelayProcess(self, config_text(upstream.url, log_format="json"))
        self.assertIsNotNone(relay.port)
        connection = http.client.HTTPConnection("127.0.0.1", relay.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/chat/completions", body=b'{"model": "m"}',
                           headers={"X-Request-Id": "rid-1"})
        connection.getresponse().read()
        line = relay.wait_for_line('"rid-1"')
        relay.process.send_signal(signal.SIGTERM)
        relay.process.wait(WAIT_SECONDS)
        entries = [json.loads(text) for text in relay.stderr_text().splitlines()]
        access = json.loads(line)
        self.assertEqual((access["event"], access["method"], access["path"],
                          access["status"], access["model"], access["upstream"],
                          access["id"]), ("request", "POST", "/v1/chat/completions",
                                          200, "m", "default", "rid-1"))
        self.assertIsInstance(access["duration_ms"], float)
        self.assertTrue(any("listening on" in entry.get("message", "")
                            for entry in entries))
        self.assertTrue(all(entry["time"].endswith("Z") for entry in entries))


###############################################################################
# Coding agents: Anthropic Messages and OpenAI Responses #######################
###############################################################################

def sse_event(name, value):
    """Return one named SSE event as the lines a native upstream sends."""
    return [b"event: " + name.encode() + b"\n",
            b"data: " + json.dumps(value).encode() + b"\n", b"\n"]


def anthropic_message(model="m", content=None, stop_reason="end_turn",
                      usage=None):
    """A Messages API answer as Ollama/vLLM's native /v1/messages gives it."""
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": content or [{"type": "text", "text": "hello"}],
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 11, "output_tokens": 3,
                               "cache_read_input_tokens": 5,
                               "cache_creation_input_tokens": 7}}


def anthropic_stream(model="m", text="hello", input_tokens=11, output_tokens=3):
    """The SSE lines of a streamed Messages API answer with one text block."""
    return (sse_event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                  "cache_read_input_tokens": 2, "cache_creation_input_tokens": 4}}})
        + sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        + sse_event("ping", {"type": "ping"})
        + sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": text}})
        + sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + sse_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 1}})
        + sse_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": output_tokens}})
        + sse_event("message_stop", {"type": "message_stop"}))


def responses_object(model="m", output=None, status="completed", usage=None):
    """A Responses API response object as a native /v1/responses gives it."""
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status,
            "error": None, "incomplete_details": None, "instructions": None,
            "model": model, "output": output if output is not None else [{
                "type": "message", "id": "msg_1", "status": "completed",
                "role": "assistant", "content": [{"type": "output_text",
                                                  "text": "hello", "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": usage, "metadata": {}}


def responses_stream(model="m", text="hello", usage=None):
    """The SSE lines of a streamed Responses API answer with one message."""
    usage = usage or {"input_tokens": 13, "output_tokens": 4, "total_tokens": 17,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}
    item = {"type": "message", "id": "msg_1", "status": "in_progress",
            "role": "assistant", "content": []}
    done_item = dict(item, status="completed", content=[
        {"type": "output_text", "text": text, "annotations": []}])
    events = [
        ("response.created", {"response": responses_object(model, [], "in_progress")}),
        ("response.in_progress", {"response": responses_object(model, [], "in_progress")}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        ("response.content_part.added", {"item_id": "msg_1", "output_index": 0,
                                         "content_index": 0, "part": {
                                             "type": "output_text", "text": "",
                                             "annotations": []}}),
        ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0,
                                        "content_index": 0, "delta": text}),
        ("response.output_text.done", {"item_id": "msg_1", "output_index": 0,
                                       "content_index": 0, "text": text}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
        ("response.completed", {"response": responses_object(
            model, [done_item], "completed", usage)}),
    ]
    lines = []
    for number, (name, fields) in enumerate(events):
        event = {"type": name, "sequence_number": number}
        event.update(fields)
        lines += sse_event(name, event)
    return lines


def parse_sse(data):
    """Return the (event name or None, parsed data) pairs of an SSE body."""
    events, name = [], None
    for line in data.decode("utf-8").splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            payload = line[5:].strip()
            events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
            name = None
    return events


def native_agent_upstream(handler, recorded):
    """Answer like Ollama/vLLM's native Messages and Responses endpoints."""
    body = recorded.json() if recorded.body else {}
    model = body.get("model")
    if recorded.path.startswith("/v1/messages"):
        if body.get("stream"):
            return reply_sse(handler, anthropic_stream(model))
        return reply_json(handler, anthropic_message(model))
    if recorded.path.startswith("/v1/responses"):
        if body.get("stream"):
            return reply_sse(handler, responses_stream(model))
        return reply_json(handler, responses_object(model, usage={
            "input_tokens": 13, "output_tokens": 4, "total_tokens": 17}))
    return openai_like(handler, recorded)


class ProtocolHelpersTest(unittest.TestCase):

    def test_translated_error_body_in_the_client_shape(self):
        openai_shaped = b'{"error": {"message": "too long", "type": "x"}}'
        self.assertEqual(llm_relay.translated_error_body(
            "responses", openai_shaped, 400), openai_shaped)
        for data, message in ((b"<h1>oops</h1>", "<h1>oops</h1>"),
                              (b'{"detail": "bad"}', '{"detail": "bad"}'),
                              (b'{"error": "bad"}', "bad")):
            self.assertEqual(json.loads(llm_relay.translated_error_body(
                "responses", data, 500).decode("utf-8")), {"error": {
                    "message": message, "type": "server_error", "param": None,
                    "code": "upstream_error"}})
        self.assertEqual(json.loads(llm_relay.translated_error_body(
            "messages", openai_shaped, 400).decode("utf-8")), {
                "type": "error", "error": {"type": "invalid_request_error",
                                           "message": "too long"}})

    def test_request_protocol_comes_from_the_route(self):
        for route, protocol in (("/chat/completions", "chat"),
                                ("/completions", "completions"),
                                ("/messages", "messages"),
                                ("/messages/count_tokens", "messages"),
                                ("/messages/batches/x", "messages"),
                                ("/responses", "responses"),
                                ("/responses/resp_1/cancel", "responses"),
                                ("/messagesx", "other"), ("/embeddings", "other"),
                                ("/models", "other")):
            self.assertEqual(llm_relay.request_protocol(route), protocol, route)

    def test_error_body_uses_anthropic_types_on_messages(self):
        for status, error_type in ((400, "invalid_request_error"),
                                   (401, "authentication_error"),
                                   (403, "permission_error"), (404, "not_found_error"),
                                   (405, "invalid_request_error"),
                                   (413, "request_too_large"), (429, "rate_limit_error"),
                                   (500, "api_error"), (502, "api_error"),
                                   (503, "overloaded_error"), (504, "api_error"),
                                   (529, "overloaded_error"), (501, "api_error")):
            self.assertEqual(llm_relay.error_body("messages", status, "why", code="c"),
                             {"type": "error", "error": {"type": error_type,
                                                         "message": "why"}}, status)
        for protocol in ("chat", "completions", "responses", "other"):
            self.assertEqual(llm_relay.error_body(protocol, 502, "m", code="c"),
                             llm_relay.openai_error("m", "server_error", "c"))
            self.assertEqual(llm_relay.error_body(protocol, 401, "m", None, "k", "p"),
                             llm_relay.openai_error("m", "invalid_request_error",
                                                    "k", "p"))

    def test_stream_failure_event_per_protocol(self):
        event = llm_relay.stream_failure_event("messages", 502, "cut")
        self.assertEqual(parse_sse(event), [("error", {"type": "error", "error": {
            "type": "api_error", "message": "cut"}})])
        self.assertTrue(event.endswith(b"\n\n"))
        self.assertEqual(parse_sse(llm_relay.stream_failure_event("chat", 504, "slow",
                                                                  code="t")),
                         [(None, llm_relay.openai_error("slow", "server_error", "t"))])
        announced = responses_object("m", [], "in_progress")
        [(name, failed)] = parse_sse(llm_relay.stream_failure_event(
            "responses", 502, "cut", code="upstream_error", response=announced,
            sequence_number=7))
        self.assertEqual(name, "response.failed")
        self.assertEqual((failed["type"], failed["sequence_number"]),
                         ("response.failed", 7))
        self.assertEqual(failed["response"]["status"], "failed")
        self.assertEqual(failed["response"]["error"], {"code": "upstream_error",
                                                       "message": "cut"})
        self.assertEqual(failed["response"]["id"], "resp_1")
        self.assertEqual(announced["status"], "in_progress")  # not mutated
        [(_, minimal)] = parse_sse(llm_relay.stream_failure_event("responses", 504, "x"))
        self.assertNotIn("sequence_number", minimal)
        self.assertTrue(minimal["response"]["id"].startswith("resp_"))
        self.assertEqual((minimal["response"]["object"], minimal["response"]["status"],
                          minimal["response"]["error"]["code"]),
                         ("response", "failed", "server_error"))


class AgentProtocolErrorsTest(RelayTestCase):
    """Errors the relay makes itself, in the protocol of the request."""

    def assert_anthropic_error(self, status, data, expected_status, error_type):
        self.assertEqual(status, expected_status, data)
        body = json.loads(data.decode("utf-8"))
        self.assertEqual(set(body), {"type", "error"})
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], error_type)
        self.assertTrue(body["error"]["message"])
        return body["error"]["message"]

    def test_relay_errors_on_messages_have_anthropic_shape(self):
        self.start_relay(api_keys=["k"], max_body_bytes=1000)
        key = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        message = self.assert_anthropic_error(*self.request(
            "POST", "/v1/messages", {"model": "m"})[::2],
            expected_status=401, error_type="authentication_error")
        self.assertIn("x-api-key", message)
        self.assert_anthropic_error(*self.request(
            "POST", "/v1/messages/count_tokens", {"model": "m"},
            {"x-api-key": "wrong"})[::2], expected_status=401,
            error_type="authentication_error")
        self.assert_anthropic_error(*self.request(
            "POST", "/v1/messages", b"{not json", dict(key, **{
                "Content-Type": "application/json"}))[::2],
            expected_status=400, error_type="invalid_request_error")
        self.assert_anthropic_error(*self.request(
            "POST", "/v1/messages", {"model": "m", "pad": "x" * 2000}, key)[::2],
            expected_status=413, error_type="request_too_large")
        self.assert_anthropic_error(*self.request("GET", "/v1/messages", None, key)[::2],
                                    expected_status=405,
                                    error_type="invalid_request_error")
        self.assertEqual(self.upstream.requests, [])
        self.upstream.stop()
        self.assert_anthropic_error(*self.request(
            "POST", "/v1/messages", {"model": "m"}, key)[::2],
            expected_status=502, error_type="api_error")
        # The other protocols keep OpenAI's shape.
        self.assert_openai_error(*self.request("POST", "/v1/responses", {"model": "m"},
                                               key)[::2], expected_status=502)
        self.assert_openai_error(*self.request("POST", "/v1/responses", {"model": "m"}
                                               )[::2], expected_status=401)

    def test_malformed_heads_on_messages_are_answered_in_anthropic_shape(self):
        self.start_relay()
        reply = self.raw_exchange(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Long: "
                                  + b"a" * 70000 + b"\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 431"), reply[:200])
        self.assertEqual(json.loads(body.decode())["type"], "error", body)
        reply = self.raw_exchange(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nX-Long: "
                                  + b"a" * 70000 + b"\r\n\r\n")
        self.assertIn(b'"error":{"message"', reply)

    def test_upstream_errors_before_and_in_a_stream_reach_the_client_unchanged(self):
        limited = {"error": {"message": "slow down", "type": "rate_limit_exceeded",
                             "param": None, "code": "rate_limit_exceeded"}}
        in_stream = sse_event("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "upstream overloaded"}})

        def behaviour(handler, recorded):
            if recorded.path.startswith("/v1/responses"):
                return reply_json(handler, limited, 429, [("Retry-After", "7")])
            reply_sse(handler, anthropic_stream("m")[:6] + in_stream)
        self.upstream.behaviour = behaviour
        self.start_relay()
        status, headers, data = self.request("POST", "/v1/responses", {"model": "m"})
        self.assertEqual((status, headers["retry-after"], json.loads(data.decode())),
                         (429, "7", limited))
        status, _, data = self.request("POST", "/v1/messages", {"model": "m",
                                                                 "stream": True})
        self.assertEqual(status, 200)
        self.assertEqual(data, b"".join(anthropic_stream("m")[:6] + in_stream))

    def test_upstream_errors_on_messages_reach_the_client_unchanged(self):
        upstream_error = {"type": "error", "error": {"type": "overloaded_error",
                                                     "message": "busy upstream"}}
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, upstream_error, 529)
        self.start_relay()
        status, _, data = self.request("POST", "/v1/messages", {"model": "m"})
        self.assertEqual((status, json.loads(data.decode())), (529, upstream_error))

    def test_x_api_key_and_bearer_both_authorize_every_path(self):
        self.upstream.behaviour = native_agent_upstream
        self.start_relay(api_keys=["relay-key"])
        for headers in ({"x-api-key": "relay-key"},
                        {"Authorization": "Bearer relay-key"}):
            for method, path, body in (("POST", "/v1/messages", {"model": "m"}),
                                       ("POST", "/v1/responses", {"model": "m"}),
                                       ("POST", "/v1/chat/completions", {"model": "m"}),
                                       ("GET", "/v1/models", None),
                                       ("POST", "/v1/embeddings", {"model": "m"})):
                status, _, data = self.request(method, path, body, headers)
                self.assertEqual(status, 200, (path, headers, data))
                # Without forward_auth the relay's key never goes upstream.
                sent = self.upstream.last().headers
                self.assertIsNone(sent.get("x-api-key"))
                self.assertIsNone(sent.get("Authorization"))

    def test_forward_auth_forwards_whichever_credential_header_was_sent(self):
        self.upstream.behaviour = native_agent_upstream
        self.start_relay(forward_auth=True)
        self.request("POST", "/v1/messages", {"model": "m"}, {"x-api-key": "sk-ant-1"})
        sent = self.upstream.last().headers
        self.assertEqual((sent.get("x-api-key"), sent.get("Authorization")),
                         ("sk-ant-1", None))
        self.request("POST", "/v1/messages", {"model": "m"},
                     {"Authorization": "Bearer sk-2"})
        sent = self.upstream.last().headers
        self.assertEqual((sent.get("x-api-key"), sent.get("Authorization")),
                         (None, "Bearer sk-2"))


class AgentAccessLogTest(RelayTestCase):

    def test_access_line_names_the_protocol_and_the_models(self):
        self.upstream.behaviour = native_agent_upstream
        self.start_relay(model_rules=[{"match_model": "claude-*",
                                       "set": {"model": "qwen3-coder"}}])
        with self.assertLogs("llm_relay", "INFO") as logs:
            for path in ("/v1/messages", "/v1/responses", "/v1/chat/completions",
                         "/v1/completions", "/v1/embeddings"):
                self.request("POST", path, {"model": "claude-sonnet-4-5-20250929"})
            self.request("GET", "/health")
            self.wait_for_log(logs, "/v1/embeddings")
        for path, protocol in (("/v1/messages", "messages"),
                               ("/v1/responses", "responses"),
                               ("/v1/chat/completions", "chat"),
                               ("/v1/completions", "completions"),
                               ("/v1/embeddings", "other")):
            self.wait_for_log(logs, "POST %s 200" % path)
            [line] = [line for line in logs.output if "POST %s 200" % path in line]
            self.assertIn(" protocol=%s " % protocol, line)
            self.assertIn(" model=claude-sonnet-4-5-20250929→qwen3-coder", line)


class AgentStreamFailureTest(RelayTestCase):
    """An upstream that fails after the first byte: the protocol's own event."""

    def drop_after(self, lines):
        def behaviour(handler, recorded):
            start_chunked(handler)
            for line in lines:
                write_chunk(handler, line)
            handler.close_connection = True
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
        return behaviour

    def streamed(self, path, body):
        connection = self.connect()
        connection.request("POST", path, body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        return parse_sse(b"".join(read_sse_lines(response)))

    def test_messages_stream_ends_with_an_error_event(self):
        self.upstream.behaviour = self.drop_after(anthropic_stream("m")[:9])
        self.start_relay()
        events = self.streamed("/v1/messages", {"model": "m", "stream": True})
        self.assertEqual([name for name, _ in events],
                         ["message_start", "content_block_start", "ping", "error"])
        self.assertEqual(events[-1][1]["type"], "error")
        self.assertEqual(events[-1][1]["error"]["type"], "api_error")
        self.assertIn("mid-stream", events[-1][1]["error"]["message"])

    def test_responses_stream_ends_with_response_failed(self):
        self.upstream.behaviour = self.drop_after(responses_stream("m")[:12])
        self.start_relay()
        events = self.streamed("/v1/responses", {"model": "m", "stream": True})
        self.assertEqual([name for name, _ in events][-2:],
                         ["response.content_part.added", "response.failed"])
        failed = events[-1][1]
        self.assertEqual(failed["type"], "response.failed")
        self.assertEqual(failed["response"]["status"], "failed")
        self.assertIn("mid-stream", failed["response"]["error"]["message"])

    def test_chat_stream_keeps_the_openai_error_event(self):
        self.upstream.behaviour = self.drop_after(sse_events(2)[:4])
        self.start_relay()
        events = self.streamed("/v1/chat/completions", {"model": "m", "stream": True})
        self.assertEqual(events[-1][0], None)
        self.assertEqual(events[-1][1]["error"]["type"], "server_error")


###############################################################################
# Strict framing: one head reader and one chunked decoder, both directions ####
###############################################################################

def body_reader(data, **framing):
    import io
    return llm_relay.BodyReader(io.BufferedReader(io.BytesIO(data)), **framing)


def read_all(reader, limit=7):
    pieces = []
    while True:
        piece = reader.read(limit)
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)


class FramingTest(unittest.TestCase):
    """The pure parts of RFC 9112 framing: field lines, chunked bodies."""

    def fields(self, data):
        import io
        return llm_relay.read_field_lines(io.BufferedReader(io.BytesIO(data)))

    def test_field_lines_parse_and_strip_outer_whitespace(self):
        self.assertEqual(self.fields(b"Host: a\r\nX-A:\t b c \t\r\nX-E:\r\n\r\nrest"),
                         [("Host", "a"), ("X-A", "b c"), ("X-E", "")])
        self.assertEqual(self.fields(b"X-Obs: caf\xe9\n\n"), [("X-Obs", "caf\xe9")])

    def test_malformed_field_lines_are_refused_with_the_reason(self):
        cases = [(b"X-Pad : 1\r\n\r\n", "whitespace between"),
                 (b"X-Pad\t: 1\r\n\r\n", "whitespace between"),
                 (b"X\x7fPad: 1\r\n\r\n", "not a token"),
                 (b"X(Pad): 1\r\n\r\n", "not a token"),
                 (b"No colon here\r\n\r\n", "without a colon"),
                 (b"A: 1\r\n folded\r\n\r\n", "obsolete line folding"),
                 (b"A: x\ry\r\n\r\n", "control character"),
                 (b"A: x\x00y\r\n\r\n", "control character"),
                 (b"A: x\x0by\r\n\r\n", "control character"),
                 (b"A: x\x1c\r\n\r\n", "control character"),
                 (b": empty name\r\n\r\n", "not a token")]
        for data, reason in cases:
            with self.assertRaises(llm_relay.BadMessage) as caught:
                self.fields(data)
            self.assertIn(reason, caught.exception.reason, data)
            self.assertEqual(caught.exception.status, 400)
        with self.assertRaises(llm_relay.BadMessage) as caught:
            self.fields(b"A: " + b"x" * llm_relay.MAX_FIELD_LINE_BYTES + b"\r\n\r\n")
        self.assertEqual(caught.exception.status, 431)
        with self.assertRaises(llm_relay.BadMessage) as caught:
            self.fields(b"A: 1\r\n" * (llm_relay.MAX_FIELD_LINES + 1) + b"\r\n")
        self.assertEqual(caught.exception.status, 431)
        with self.assertRaises(llm_relay.MessageCutShort):
            self.fields(b"A: 1\r\nB: 2")

    def test_chunked_bodies_decode_with_extensions_and_trailers(self):
        data = (b"5\r\nhello\r\n6;name=value;q=\"a \\\" b\"\r\n world\r\n"
                b"000A ; ext\r\n0123456789\r\n0\r\nTrailer-A: 1\r\n\r\nNEXT")
        reader = body_reader(data, chunked=True)
        self.assertEqual(read_all(reader), b"hello world0123456789")
        self.assertTrue(reader.complete)

    def test_malformed_chunking_is_refused(self):
        for data in (b" 5\r\nhello\r\n0\r\n\r\n", b"5 \r\nhello\r\n0\r\n\r\n",
                     b"0x5\r\nhello\r\n0\r\n\r\n", b"+5\r\nhello\r\n0\r\n\r\n",
                     b"5\nhello\r\n0\r\n\r\n", b"5;\r\nhello\r\n0\r\n\r\n",
                     b"5\r\nhelloXX0\r\n\r\n", b"5\r\nhello\n0\r\n\r\n",
                     b"5\r\nhello\r\n0\r\nGET / HTTP/1.1\r\n\r\n",
                     b"1" * 17 + b"\r\n", b"5\x00\r\nhello\r\n0\r\n\r\n"):
            with self.assertRaises(llm_relay.BadMessage, msg=data):
                read_all(body_reader(data, chunked=True))

    def test_cut_chunked_bodies_are_cut_short_not_malformed(self):
        for data in (b"", b"5\r\nhel", b"5\r\nhello", b"5\r\nhello\r",
                     b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0"):
            with self.assertRaises(llm_relay.MessageCutShort, msg=data):
                read_all(body_reader(data, chunked=True))

    def test_chunked_size_is_bounded(self):
        with self.assertRaises(llm_relay.BadMessage) as caught:
            read_all(body_reader(b"4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n",
                                 chunked=True, max_bytes=6))
        self.assertEqual(caught.exception.status, 413)

    def test_lengths_and_close_delimited_bodies(self):
        reader = body_reader(b"abcdefNEXT", length=6)
        self.assertEqual(read_all(reader, 4), b"abcdef")
        self.assertTrue(reader.complete)
        with self.assertRaises(llm_relay.MessageCutShort):
            read_all(body_reader(b"abc", length=6))
        reader = body_reader(b"until the close")
        self.assertEqual(reader.readline(5), b"until")
        self.assertFalse(reader.complete)
        self.assertEqual(read_all(reader), b" the close")
        self.assertTrue(reader.complete)

    def test_read_to_end_stops_past_the_limit(self):
        data = b"".join(b"4\r\n%04d\r\n" % i for i in range(100)) + b"0\r\n\r\n"
        reader = body_reader(data, chunked=True)
        start = reader.read_to_end(10)
        self.assertGreater(len(start), 10)
        self.assertFalse(reader.complete)
        self.assertEqual(start + read_all(reader), b"".join(b"%04d" % i
                                                            for i in range(100)))

    def test_framing_headers(self):
        fields = llm_relay.FieldList
        length = llm_relay.request_body_length
        self.assertEqual(length("HTTP/1.1", fields([("Host", "h"),
                                                   ("Content-Length", "5, 5")])), 5)
        self.assertIsNone(length("HTTP/1.1", fields([("Host", "h"), (
            "Transfer-Encoding", "chunked")])))
        self.assertEqual(length("HTTP/1.0", fields([])), 0)
        for version, headers, status in (
                ("HTTP/1.1", [], 400),
                ("HTTP/1.1", [("Host", "a"), ("host", "b")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Content-Length", "5"),
                              ("Content-Length", "6")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Content-Length", "5\xa0")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Content-Length", "\xb2")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Content-Length", "-1")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Content-Length", "5"),
                              ("Transfer-Encoding", "chunked")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Transfer-Encoding", "chunked\xa0")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Transfer-Encoding", "chunked, gzip")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Transfer-Encoding", "chunked"),
                              ("Transfer-Encoding", "chunked")], 400),
                ("HTTP/1.1", [("Host", "h"), ("Transfer-Encoding", "gzip, chunked")], 501),
                ("HTTP/1.0", [("Transfer-Encoding", "chunked")], 400)):
            with self.assertRaises(llm_relay.BadMessage, msg=headers) as caught:
                length(version, fields(headers))
            self.assertEqual(caught.exception.status, status, headers)


class StrictUpstreamFramingTest(RelayTestCase):
    """Upstream heads and bodies are read as strictly as client requests."""

    def raw_upstream(self, data):
        def behaviour(handler, recorded):
            handler.wfile.write(data)
            handler.wfile.flush()
            handler.close_connection = True
        self.upstream.behaviour = behaviour

    def test_a_malformed_upstream_head_is_a_502_naming_the_upstream(self):
        self.start_relay()
        for head in (b"HTTP/1.1 200 OK\r\nContent-Type : application/json\r\n"
                     b"Content-Length: 2\r\n\r\n{}",
                     b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\n{}",
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: "
                     b"chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}",
                     b"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\n{}",
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\n{}"):
            self.raw_upstream(head)
            status, _, data = self.chat({"model": "m"})
            error = self.assert_openai_error(status, data, 502, "upstream_error")
            self.assertIn("upstream default (%s) sent an invalid HTTP response"
                          % self.upstream.url, error["message"])

    def test_malformed_chunking_mid_stream_ends_with_the_error_event(self):
        self.raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n"
                          b"8\r\ndata: 1\n\r\n1\r\n\n\r\n5 junk\r\ndata:\r\n0\r\n\r\n")
        self.start_relay()
        connection = self.connect()
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "stream": True}), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        lines = read_sse_lines(response)
        self.assertEqual(lines[:2], [b"data: 1\n", b"\n"])
        error = json.loads(lines[2][len(b"data: "):].decode())["error"]
        self.assertIn("invalid HTTP response (a malformed chunk-size line) "
                      "mid-stream", error["message"])

    def test_one_failure_has_one_message_and_kind_in_every_phase(self):
        def before_answer(handler, recorded):
            handler.close_connection = True

        def mid_stream(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, b"data: 1\n\n")
            handler.close_connection = True

        def mid_body(handler, recorded):
            start_chunked(handler, content_type="application/json")
            write_chunk(handler, b'{"a": ')
            handler.close_connection = True
        self.start_relay()
        messages = []
        for behaviour, stream in ((before_answer, False), (mid_stream, True),
                                  (mid_body, False)):
            self.upstream.behaviour = behaviour
            status, _, data = self.chat({"model": "m", "stream": stream})
            if stream:
                data = data.split(b"data: ")[-1]
            messages.append(json.loads(data.decode())["error"]["message"])
        where = "upstream default (%s) closed the connection " % self.upstream.url
        self.assertEqual(messages, [where + "before answering.", where + "mid-stream.",
                                    where + "mid-body."])
        status, _, text = self.request("GET", "/metrics")
        self.assertIn(b'llm_relay_upstream_errors_total{upstream="default",'
                      b'kind="dropped"} 3', text)

    def test_a_chunked_json_answer_over_the_buffer_limit_streams_through(self):
        saved = llm_relay.MAX_BUFFERED_RESPONSE_BYTES
        llm_relay.MAX_BUFFERED_RESPONSE_BYTES = 1000
        self.addCleanup(setattr, llm_relay, "MAX_BUFFERED_RESPONSE_BYTES", saved)
        answer = json.dumps({"data": ["x" * 100] * 50}).encode()

        def large_chunked(handler, recorded):
            start_chunked(handler, content_type="application/json")
            for start in range(0, len(answer), 300):
                write_chunk(handler, answer[start:start + 300])
            end_chunks(handler)
        self.upstream.behaviour = large_chunked
        self.start_relay()
        connection = self.connect()
        status, headers, data = self.chat({"model": "m"}, connection=connection)
        self.assertEqual((status, data), (200, answer))
        self.assertEqual(headers.get("transfer-encoding"), "chunked")
        self.assertEqual(self.chat({"model": "m"}, connection=connection)[0], 200)


###############################################################################
# Translation onto chat-only upstreams ########################################
###############################################################################

try:
    import anthropic
except ImportError:  # pragma: no cover - depends on the environment
    anthropic = None
    ANTHROPIC_SDK_MISSING = "the anthropic package is not installed (.ci/run installs it)"
else:
    ANTHROPIC_SDK_MISSING = ""

CHAT_ONLY_USAGE = {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}


def scripted_chat_answer(body):
    """Return the chat chunks a chat-only model answers body with: after a
    tool result, "done"; with tools offered, reasoning, text and two calls
    of the first tool (arguments split, the second call's id on index 1);
    else reasoning in <think> tags and text."""
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        return [chat_chunk({"role": "assistant", "content": ""}),
                chat_chunk({"content": "done: " + messages[-1]["content"]}),
                chat_chunk({}, "stop")]
    tools = body.get("tools") or []
    if tools:
        name = tools[0]["function"]["name"]
        return [chat_chunk({"role": "assistant", "reasoning_content": "need a tool"}),
                chat_chunk({"content": "Calling."}),
                chat_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": name, "arguments":
                                                         "{\"city\": "}}]}),
                chat_chunk({"tool_calls": [{"index": 0, "function": {
                    "arguments": "\"Paris\"}"}}]}),
                chat_chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                            "function": {"name": name, "arguments":
                                                         "{\"city\": \"Rome\"}"}}]}),
                chat_chunk({}, "tool_calls")]
    return [chat_chunk({"role": "assistant", "content": "<thi"}),
            chat_chunk({"content": "nk>pondering</think>\n\nHello"}),
            chat_chunk({"content": " there"}), chat_chunk({}, "stop")]


def chat_only(script):
    """Return the behaviour of an upstream that speaks only chat completions
    (an older llama.cpp or Ollama): other paths are 404; answers are the
    chunks script(body) gives, streamed with a final usage chunk, or whole."""
    return lambda handler, recorded: answer_chat_only(handler, recorded, script)


def answer_chat_only(handler, recorded, script):
    if not recorded.path.endswith("/chat/completions"):
        return reply_json(handler, {"error": {"message": "not found"}}, 404)
    body = recorded.json()
    chunks = script(body)
    if body.get("stream"):
        return reply_sse(handler, chat_sse(chunks + [chat_chunk(
            choices=False, usage=CHAT_ONLY_USAGE)]))
    reader = llm_relay.ChatDeltaReader()
    pieces = []
    for chunk in chunks:
        pieces += reader.read(chunk)
    blocks = llm_relay.collect_pieces(pieces + reader.flush())
    message = {"role": "assistant", "content": "".join(
        "<think>%s</think>" % block[1] if block[0] == "thinking" else block[1]
        for block in blocks if block[0] != "tool") or None}
    calls = [{"id": block[1], "type": "function", "function": {
        "name": block[2], "arguments": block[3]}} for block in blocks if block[0] == "tool"]
    if calls:
        message["tool_calls"] = calls
    reply_json(handler, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                         "model": "qwen3-coder", "choices": [{
                             "index": 0, "message": message,
                             "finish_reason": reader.finish_reason}],
                         "usage": CHAT_ONLY_USAGE})


chat_only_upstream = chat_only(scripted_chat_answer)

WEATHER_TOOL = {"name": "get_weather", "description": "Weather of a city",
                "input_schema": {"type": "object", "properties": {
                    "city": {"type": "string"}}, "required": ["city"]}}


class ChatOnlyUpstreamTestCase(RelayTestCase):
    """A relay whose only upstream is declared to speak chat completions only,
    with a rule that maps the agents' model names onto the local model."""

    def setUp(self):
        RelayTestCase.setUp(self)
        self.upstream.behaviour = chat_only_upstream

    def start_chat_only_relay(self, **raw):
        raw.setdefault("upstreams", {"default": {"url": self.upstream.url,
                                                 "apis": ["chat"]}})
        raw.setdefault("model_rules", [{"match_model": ["claude-*", "gpt-5*"],
                                        "set": {"model": "qwen3-coder"}}])
        raw.setdefault("listen", "127.0.0.1:0")
        config, _ = llm_relay.validate_config(raw, "test", None, {})
        return self.start_server(config)

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.relay.port


class TranslatedMessagesOverHttpTest(ChatOnlyUpstreamTestCase):

    def test_the_line_reader_has_stopped_before_the_response_is_closed(self):
        # The upstream sends its whole stream, then keeps its body open: the
        # relay ends the client's stream, gives up waiting for the body's
        # end and closes the response.  The thread reading its lines must
        # have stopped by then: a read racing that close can crash
        # CPython 3.6.
        release = threading.Event()
        self.addCleanup(release.set)
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                 "model": "qwen3-coder", "choices": [{"index": 0, "delta": {
                     "role": "assistant", "content": "Hi"}, "finish_reason": None}]}
        last = dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])

        def open_after_done(handler, recorded):
            start_chunked(handler)
            for event in (chunk, last):
                write_chunk(handler, b"data: " + json.dumps(event).encode() + b"\n\n")
            write_chunk(handler, b"data: [DONE]\n\n")
            say_nothing_until_hang_up(handler, release)
        self.upstream.behaviour = open_after_done
        self.start_chat_only_relay()
        readers_at_close = []
        finish = llm_relay.finish_upstream_response

        def finish_and_look(*args):
            readers_at_close.append([thread for thread in threading.enumerate()
                                     if thread.name == "llm-relay-stream"])
            return finish(*args)
        llm_relay.finish_upstream_response = finish_and_look
        self.addCleanup(setattr, llm_relay, "finish_upstream_response", finish)
        with self.assertLogs("llm_relay", "INFO") as logs:
            status, _, data = self.request("POST", "/v1/messages", {
                "model": "claude-haiku-4-5", "max_tokens": 50, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]})
            self.wait_for_log(logs, "POST /v1/messages")
        self.assert_ok(status, data)
        self.assertIn(b"event: message_stop", data)
        self.assertEqual(readers_at_close, [[]])

    def test_whole_answer_and_what_the_upstream_got(self):
        self.start_chat_only_relay()
        status, headers, data = self.request(
            "POST", "/v1/messages?beta=true", {
                "model": "claude-sonnet-4-5", "max_tokens": 100,
                "system": [{"type": "text", "text": "be nice",
                            "cache_control": {"type": "ephemeral"}}],
                "messages": [{"role": "user", "content": "hi"}]},
            {"anthropic-version": "2023-06-01", "x-api-key": "k"})
        self.assertEqual(status, 200, data)
        self.assertEqual(headers["content-type"], "application/json")
        answer = json.loads(data.decode("utf-8"))
        self.assertEqual((answer["type"], answer["role"], answer["model"],
                          answer["stop_reason"]),
                         ("message", "assistant", "qwen3-coder", "end_turn"))
        self.assertEqual(answer["content"], [
            {"type": "thinking", "thinking": "pondering", "signature": ""},
            {"type": "text", "text": "Hello there"}])
        self.assertEqual(answer["usage"], {"input_tokens": 31, "output_tokens": 12})
        recorded = self.upstream.last()
        self.assertEqual(recorded.path, "/v1/chat/completions")
        # The rule saw the client's model name and renamed it before translation.
        self.assertEqual(recorded.json(), {
            "model": "qwen3-coder", "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "hi"}], "max_tokens": 100})

    def test_stream_follows_the_grammar(self):
        self.start_chat_only_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            connection = self.connect()
            connection.request("POST", "/v1/messages", body=json.dumps({
                "model": "claude-haiku-4-5", "max_tokens": 50, "stream": True,
                "tools": [WEATHER_TOOL],
                "messages": [{"role": "user", "content": "weather?"}]}),
                headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            self.assertEqual(response.getheader("Content-Type"),
                             "text/event-stream; charset=utf-8")
            events = parse_sse_events(b"".join(read_sse_lines(response)))
            self.wait_for_log(logs, "translated=messages>chat")
        access = [line for line in logs.output if "translated=" in line]
        self.assertNotIn("error=", access[0])
        self.assertIn("stream=yes", access[0])
        assert_anthropic_grammar(self, events)
        self.assertEqual(anthropic_blocks(events), [
            {"type": "thinking", "thinking": "need a tool", "signature": ""},
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather",
             "input": {"city": "Rome"}}])
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")
        self.assertEqual(events[-2][1]["usage"], {"input_tokens": 31, "output_tokens": 12})
        sent = self.upstream.last().json()
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(sent["tools"][0]["function"]["parameters"],
                         WEATHER_TOOL["input_schema"])

    def test_usage_is_counted_in_the_clients_protocol(self):
        self.start_chat_only_relay()
        for stream in (False, True):
            self.request("POST", "/v1/messages", {
                "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]})
        self.request("POST", "/v1/responses", {"model": "gpt-5-codex", "input": "hi"})
        _, _, data = self.request("GET", "/metrics")
        text = data.decode("utf-8")
        for model, count in (("claude-sonnet-4-5", 2), ("gpt-5-codex", 1)):
            for kind, tokens in (("input", 31), ("output", 12)):
                self.assertIn('llm_relay_tokens_total{model="%s",kind="%s"} %d' % (
                    model, kind, count * tokens), text)
        self.assertNotIn('kind="prompt"', text)

    def test_whole_upstream_answer_to_a_streamed_request(self):
        """An upstream that ignores "stream" still gives the client a stream."""
        def whole(handler, recorded):
            body = dict(recorded.json(), stream=False)
            recorded.body = json.dumps(body).encode("utf-8")
            answer_chat_only(handler, recorded, scripted_chat_answer)
        self.upstream.behaviour = whole
        self.start_chat_only_relay()
        status, headers, data = self.request("POST", "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
            "tools": [WEATHER_TOOL], "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200, data)
        self.assertEqual(headers["content-type"], "text/event-stream; charset=utf-8")
        events = parse_sse_events(data)
        assert_anthropic_grammar(self, events)
        self.assertEqual([block["type"] for block in anthropic_blocks(events)],
                         ["thinking", "text", "tool_use", "tool_use"])
        self.assertEqual(events[-2][1]["usage"], {"input_tokens": 31, "output_tokens": 12})

    def test_count_tokens_is_estimated_here(self):
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/messages/count_tokens?beta=true", {
            "model": "claude-sonnet-4-5",
            "messages": [{"role": "user", "content": "x" * 400}]})
        self.assertEqual(status, 200, data)
        self.assertGreaterEqual(json.loads(data.decode("utf-8"))["input_tokens"], 100)
        self.assertEqual(self.upstream.requests, [])

    def test_upstream_error_in_anthropic_shape(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"error": {"message": "model qwen3-coder not found",
                                "type": "invalid_request_error"}}, 404)
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(data.decode("utf-8")), {
            "type": "error", "error": {"type": "not_found_error",
                                       "message": "model qwen3-coder not found"}})

    def test_drop_mid_stream_ends_with_an_error_event(self):
        def drop(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, chat_sse([chat_chunk({"content": "hal"})])[0] + b"\n")
            handler.wfile.flush()
            handler.close_connection = True  # no terminating chunk
        self.upstream.behaviour = drop
        self.start_chat_only_relay()
        with self.assertLogs("llm_relay", "WARNING"):
            connection = self.connect()
            connection.request("POST", "/v1/messages", body=json.dumps({
                "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}),
                headers={"Content-Type": "application/json"})
            events = parse_sse_events(b"".join(read_sse_lines(connection.getresponse())))
        self.assertEqual([name for name, _ in events[:3]],
                         ["message_start", "content_block_start", "content_block_delta"])
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(events[-1][1]["error"]["type"], "api_error")
        self.assertIn("mid-stream", events[-1][1]["error"]["message"])

    def test_client_leaving_closes_the_upstream(self):
        client_left, upstream_cut = threading.Event(), threading.Event()

        def endless(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, chat_sse([chat_chunk({"content": "a"})])[0] + b"\n")
            client_left.wait(WAIT_SECONDS)
            try:
                for _ in range(1000):  # until the relay has closed the connection
                    write_chunk(handler, b": still thinking\n\n")
                    time.sleep(0.01)
            except OSError:
                upstream_cut.set()
        self.upstream.behaviour = endless
        self.start_chat_only_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            connection = self.connect()
            connection.request("POST", "/v1/messages", body=json.dumps({
                "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}),
                headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            while b"text_delta" not in response.readline():
                pass
            connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
            client_left.set()
            self.assertTrue(upstream_cut.wait(WAIT_SECONDS))
            self.wait_for_log(logs, "client disconnected")

    def test_pings_while_the_upstream_is_silent(self):
        saw_ping = threading.Event()

        def slow(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, b": prefill\n")
            saw_ping.wait(WAIT_SECONDS)
            for line in chat_sse([chat_chunk({"content": "late"}), chat_chunk({}, "stop")]):
                write_chunk(handler, line)
            end_chunks(handler)
        self.upstream.behaviour = slow
        original = llm_relay.TRANSLATED_PING_SECONDS
        llm_relay.TRANSLATED_PING_SECONDS = 0.05
        self.addCleanup(setattr, llm_relay, "TRANSLATED_PING_SECONDS", original)
        self.start_chat_only_relay()
        connection = self.connect()
        connection.request("POST", "/v1/messages", body=json.dumps({
            "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}),
            headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        lines = []
        while not saw_ping.is_set():
            line = response.readline()
            self.assertTrue(line, "stream ended before a ping")
            lines.append(line)
            if line.startswith(b"event: ping"):
                saw_ping.set()
        events = parse_sse_events(b"".join(lines + read_sse_lines(response)))
        self.assertEqual(events[0][0], "message_start")
        assert_anthropic_grammar(self, events)
        self.assertEqual(anthropic_blocks(events), [{"type": "text", "text": "late"}])

    def fast_pings(self):
        original = llm_relay.TRANSLATED_PING_SECONDS
        llm_relay.TRANSLATED_PING_SECONDS = 0.05
        self.addCleanup(setattr, llm_relay, "TRANSLATED_PING_SECONDS", original)

    def read_until_ping(self, path, body, ping, saw_ping):
        """Stream body to path; return the lines read up to a ping line, and
        the response to read on from."""
        connection = self.connect()
        connection.request("POST", path, body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        lines = []
        while not saw_ping.is_set():
            line = response.readline()
            self.assertTrue(line, "stream ended before a ping: %r" % lines)
            lines.append(line)
            if line.startswith(ping):
                saw_ping.set()
        return lines, response

    def test_pings_before_the_upstream_sends_its_head(self):
        """llama.cpp and Ollama send their head with the first token."""
        saw_ping = threading.Event()

        def prefill(handler, recorded):
            saw_ping.wait(WAIT_SECONDS)
            reply_sse(handler, chat_sse([chat_chunk({"content": "late"}),
                                         chat_chunk({}, "stop")]))
        self.upstream.behaviour = prefill
        self.fast_pings()
        self.start_chat_only_relay()
        lines, response = self.read_until_ping("/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}, b"event: ping", saw_ping)
        events = parse_sse_events(b"".join(lines + read_sse_lines(response)))
        assert_anthropic_grammar(self, events)
        self.assertEqual(anthropic_blocks(events), [{"type": "text", "text": "late"}])

    def test_upstream_error_after_pings_ends_with_an_error_event(self):
        saw_ping = threading.Event()

        def overloaded(handler, recorded):
            saw_ping.wait(WAIT_SECONDS)
            reply_json(handler, {"error": {"message": "out of memory"}}, 503)
        self.upstream.behaviour = overloaded
        self.fast_pings()
        self.start_chat_only_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            lines, response = self.read_until_ping("/v1/responses", {
                "model": "gpt-5-codex", "input": "hi", "stream": True}, b": ping",
                saw_ping)
            events = parse_sse_events(b"".join(lines + read_sse_lines(response)))
            self.wait_for_log(logs, "error=")
        self.assertEqual([name for name, _ in events[:2]],
                         ["response.created", "response.in_progress"])
        self.assertEqual(events[-1][0], "response.failed")
        self.assertIn("out of memory", events[-1][1]["response"]["error"]["message"])

    def test_unreadable_whole_answer_after_pings_ends_with_the_failure_event(self):
        """The head went out with the pings: a whole answer that is not JSON,
        or is cut mid-body, can only end the stream with its failure event."""
        def not_json(handler, recorded):
            saw_ping.wait(WAIT_SECONDS)
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "100")
            handler.end_headers()
            handler.wfile.write(b"{\"choices\": [" if cut else b"not json" + b" " * 92)
            handler.close_connection = True
        self.upstream.behaviour = not_json
        self.fast_pings()
        self.start_chat_only_relay()
        for cut, path, body, ping, last in (
                (False, "/v1/messages", {"model": "claude-x", "max_tokens": 5, "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]},
                 b"event: ping", "error"),
                (True, "/v1/responses", {"model": "gpt-5", "input": "hi", "stream": True},
                 b": ping", "response.failed")):
            saw_ping = threading.Event()
            with self.assertLogs("llm_relay", "INFO") as logs:
                lines, response = self.read_until_ping(path, body, ping, saw_ping)
                events = parse_sse_events(b"".join(lines + read_sse_lines(response)))
                self.wait_for_log(logs, "error=")
            self.assertEqual(events[-1][0], last, events)
            self.assertIn("upstream default", json.dumps(events[-1][1]))

    def test_chat_completions_keep_their_fast_path(self):
        self.start_chat_only_relay(model_rules=[])
        raw = b'{"model":"qwen3-coder",  "messages":[{"role":"user","content":"hi"}]}'
        status, _, _ = self.request("POST", "/v1/chat/completions", raw,
                                    {"Content-Type": "application/json"})
        self.assertEqual(status, 200)
        self.assertEqual(self.upstream.last().body, raw)

    def test_native_upstreams_still_get_messages_as_they_are(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"type": "message", "content": []})
        self.start_relay()
        body = {"model": "claude-x", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}
        status, _, data = self.request("POST", "/v1/messages", body)
        self.assertEqual((status, self.upstream.last().path), (200, "/v1/messages"))
        self.assertEqual(self.upstream.last().json(), body)

    def test_fallback_from_a_native_upstream_to_a_chat_only_one(self):
        native = FakeUpstream(self, lambda handler, recorded: reply_json(
            handler, {"error": "busy"}, 503))
        self.start_chat_only_relay(upstreams={
            "native": {"url": native.url},
            "old": {"url": self.upstream.url, "apis": ["chat"]}},
            model_rules=[{"match_model": "default", "upstream": ["native", "old"]}])
        with self.assertLogs("llm_relay", "WARNING"):
            status, _, data = self.request("POST", "/v1/messages", {
                "model": "qwen3-coder", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200, data)
        self.assertEqual(native.last().path, "/v1/messages")
        self.assertEqual(self.upstream.last().path, "/v1/chat/completions")
        self.assertEqual(json.loads(data.decode("utf-8"))["content"][-1]["text"],
                         "Hello there")

    def test_config_error_names_the_field(self):
        with self.assertRaises(llm_relay.ConfigError) as caught:
            llm_relay.parse_config_text('{"upstreams": {"old": {\n  "url": '
                                        '"http://h/v1", "apis": ["chat", "rest"]}}}')
        self.assertEqual(str(caught.exception),
                         '<config>:2:42: upstreams.old.apis[1]: unknown API "rest"; '
                         'the APIs are "chat", "messages", "responses"')


    def test_readme_recipe_routes_both_agents_to_the_local_model(self):
        recipe = readme_code_blocks("### With an upstream that speaks only chat")[0]
        config, warnings = llm_relay.parse_config_text(recipe, "README.md", {})
        self.assertEqual(warnings, [])
        self.assertEqual(config.upstreams["default"].apis, frozenset(["chat"]))
        config = config._replace(listen_port=0, upstreams={"default": config.upstreams[
            "default"]._replace(port=self.upstream.port)})
        self.start_server(config)
        for path, body, max_tokens in (
                ("/v1/messages", {"model": "claude-sonnet-4-5-20250929",
                                  "max_tokens": 128000, "messages": [
                                      {"role": "user", "content": "hi"}]}, 16384),
                ("/v1/responses", {"model": "gpt-5.5", "input": "hi", "store": False},
                 None)):
            status, _, data = self.request("POST", path, body)
            self.assertEqual(status, 200, data)
            sent = self.upstream.last().json()
            self.assertEqual((sent["model"], sent.get("max_tokens")),
                             ("qwen3-coder", max_tokens))


    def test_rules_shape_what_is_translated(self):
        self.start_chat_only_relay(model_rules=[
            {"match_model": "claude-*", "unset": ["thinking", "output_config"],
             "set": {"model": "qwen3-coder", "max_tokens": 512}},
            {"match_model": "gpt-5*", "unset": ["reasoning"],
             "set": {"model": "qwen3-coder", "max_output_tokens": 256}}])
        self.request("POST", "/v1/messages", {
            "model": "claude-opus-4-1", "max_tokens": 128000,
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "messages": [{"role": "user", "content": "hi"}]})
        sent = self.upstream.last().json()
        self.assertEqual((sent["max_tokens"], "reasoning_effort" in sent), (512, False))
        self.request("POST", "/v1/responses", {
            "model": "gpt-5.5", "input": "hi", "reasoning": {"effort": "high"}})
        sent = self.upstream.last().json()
        self.assertEqual((sent["max_tokens"], "reasoning_effort" in sent), (256, False))

    def test_response_model_asked_is_reported(self):
        self.start_chat_only_relay(response_model="asked")
        for stream in (False, True):
            status, _, data = self.request("POST", "/v1/messages", {
                "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]})
            self.assertEqual(status, 200, data)
            model = (parse_sse_events(data)[0][1]["message"]["model"] if stream
                     else json.loads(data.decode("utf-8"))["model"])
            self.assertEqual(model, "claude-sonnet-4-5")
            status, _, data = self.request("POST", "/v1/responses", {
                "model": "gpt-5-codex", "input": "hi", "stream": stream})
            self.assertEqual(status, 200, data)
            models = ([event[1]["response"]["model"] for event in parse_sse_events(data)
                       if "response" in event[1]] if stream
                      else [json.loads(data.decode("utf-8"))["model"]])
            self.assertEqual(set(models), {"gpt-5-codex"})


class TranslatedResponsesOverHttpTest(ChatOnlyUpstreamTestCase):

    def test_stateful_requests_are_refused(self):
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/responses", {
            "model": "gpt-5-codex", "input": "hi", "previous_response_id": "resp_1"})
        error = self.assert_openai_error(status, data, 400, "stateless_relay")
        self.assertIn("stateless", error["message"])
        self.assertEqual(self.upstream.requests, [])

    def test_dropped_tools_are_logged_once(self):
        self.start_chat_only_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            status, _, data = self.request("POST", "/v1/responses", {
                "model": "gpt-5-codex", "input": "hi", "tools": [
                    {"type": "web_search"}, {"type": "namespace", "name": "mcp"},
                    {"type": "function", "name": "f", "parameters": {}}]})
            self.wait_for_log(logs, "translated=responses>chat")
        self.assertEqual(status, 200, data)
        dropped = [line for line in logs.output if "dropped" in line]
        self.assertEqual(len(dropped), 1, logs.output)
        self.assertIn("responses>chat dropped: tools of type web_search, namespace",
                      dropped[0])
        self.assertEqual([tool["function"]["name"] for tool in
                          self.upstream.last().json()["tools"]], ["f"])

    def test_upstream_errors_pass_in_openai_shape(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"error": {"message": "context too long", "type": "invalid_request_error",
                                "param": None, "code": None}}, 400)
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/responses", {
            "model": "gpt-5-codex", "input": "hi"})
        error = self.assert_openai_error(status, data, 400)
        self.assertEqual(error["message"], "context too long")

    def test_upstream_error_page_becomes_openai_json(self):
        def html_error(handler, recorded):
            data = b"<html><body>502 Bad Gateway (nginx)</body></html>"
            handler.send_response(502)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        self.upstream.behaviour = html_error
        self.start_chat_only_relay()
        for stream in (False, True):
            status, headers, data = self.request("POST", "/v1/responses", {
                "model": "gpt-5-codex", "input": "hi", "stream": stream})
            self.assertEqual(headers["content-type"], "application/json")
            error = self.assert_openai_error(status, data, 502, "upstream_error")
            self.assertEqual(error["type"], "server_error")
            self.assertIn("502 Bad Gateway (nginx)", error["message"])

    def test_drop_mid_stream_ends_with_response_failed(self):
        def drop(handler, recorded):
            start_chunked(handler)
            write_chunk(handler, chat_sse([chat_chunk({"content": "hal"})])[0] + b"\n")
            handler.close_connection = True
        self.upstream.behaviour = drop
        self.start_chat_only_relay()
        with self.assertLogs("llm_relay", "WARNING"):
            connection = self.connect()
            connection.request("POST", "/v1/responses", body=json.dumps({
                "model": "gpt-5-codex", "input": "hi", "stream": True}),
                headers={"Content-Type": "application/json"})
            events = parse_sse_events(b"".join(read_sse_lines(connection.getresponse())))
        self.assertEqual(events[-1][0], "response.failed")
        self.assertEqual(events[-1][1]["response"]["status"], "failed")
        self.assertEqual([data["sequence_number"] for _, data in events],
                         list(range(len(events))))

    def test_whole_answer_with_a_custom_tool(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {
            "id": "c", "object": "chat.completion", "model": "qwen3-coder",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_9", "type": "function", "function": {
                        "name": "apply_patch", "arguments": json.dumps(
                            {"input": "*** Begin Patch\n*** End Patch\n"})}}]}}],
            "usage": CHAT_ONLY_USAGE})
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/responses", {
            "model": "gpt-5-codex", "input": "patch it", "store": False,
            "tools": [{"type": "custom", "name": "apply_patch", "description": "p"}]})
        self.assertEqual(status, 200, data)
        response = json.loads(data.decode("utf-8"))
        self.assertEqual(response["output"][0]["type"], "custom_tool_call")
        self.assertEqual(response["output"][0]["input"],
                         "*** Begin Patch\n*** End Patch\n")
        self.assertEqual(response["usage"]["total_tokens"], 43)
        self.assertEqual(self.upstream.last().json()["tools"][0]["function"]["name"],
                         "apply_patch")


# Chunks of a hostile or broken chat-only upstream: fields of the wrong type
# around one good text delta each.
WRONG_TYPED_CHUNKS = [
    {"choices": 5}, {"choices": [{"index": 0, "delta": "str"}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": 7}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": [1], "id": 5, "function": {"name": {"x": 1}, "arguments": "{}"}}]}}]},
    {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": ["stop"]}]},
]


class HostileTranslationTest(ChatOnlyUpstreamTestCase):
    """Wrong types from either side of a translation: a client's field is a
    400 in its protocol's shape, an upstream's is ignored; never a 500, a
    cut connection or a stream without its end."""

    def assert_messages_error(self, status, data, field):
        self.assertEqual(status, 400, data)
        body = json.loads(data.decode("utf-8"))
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        self.assertIn(field, body["error"]["message"])

    def test_wrong_typed_messages_fields_are_400(self):
        self.start_chat_only_relay()
        base = {"model": "claude-x", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}
        for field, value in (("messages", 5), ("stop_sequences", 5),
                             ("stop_sequences", "abc"), ("stop_sequences", [5])):
            status, _, data = self.request("POST", "/v1/messages",
                                           dict(base, **{field: value}))
            self.assert_messages_error(status, data, field)
        self.assertEqual(self.upstream.requests, [])

    def test_wrong_typed_parts_are_dropped(self):
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/messages", {
            "model": "claude-x", "max_tokens": 5, "messages": [
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": 5}]}]})
        self.assert_ok(status, data)
        self.assertEqual(self.upstream.last().json()["messages"],
                         [{"role": "tool", "tool_call_id": "t", "content": ""}])
        status, _, data = self.request("POST", "/v1/responses", {
            "model": "gpt-5", "input": "hi", "reasoning": {"effort": ["high"]},
            "tools": [{"type": "custom", "name": ["apply_patch"]}]})
        self.assert_ok(status, data)
        sent = self.upstream.last().json()
        self.assertNotIn("reasoning_effort", sent)
        self.assertNotIn("tools", sent)

    def wrong_typed_stream(self, handler, recorded):
        chunks = []
        for chunk in WRONG_TYPED_CHUNKS:
            chunks += [chunk, chat_chunk({"content": "a"})]
        reply_sse(handler, chat_sse(chunks + [chat_chunk({}, "stop")]))

    def test_wrong_typed_stream_chunks_are_ignored(self):
        self.upstream.behaviour = self.wrong_typed_stream
        self.start_chat_only_relay()
        for path, body, last in (
                ("/v1/messages", {"model": "claude-x", "max_tokens": 5, "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]},
                 "message_stop"),
                ("/v1/responses", {"model": "gpt-5", "input": "hi", "stream": True},
                 "response.completed")):
            connection = self.connect()
            connection.request("POST", path, body=json.dumps(body),
                               headers={"Content-Type": "application/json"})
            events = parse_sse_events(b"".join(read_sse_lines(connection.getresponse())))
            self.assertEqual(events[-1][0], last, events)
            text = "".join(data.get("delta", {}).get("text", "") if path == "/v1/messages"
                           else data.get("delta", "") for name, data in events
                           if name in ("content_block_delta", "response.output_text.delta"))
            self.assertEqual(text, "a" * (len(WRONG_TYPED_CHUNKS) - 1) + "oka")

    def test_wrong_typed_whole_answer_is_not_a_500(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {
            "choices": [{"index": 0, "message": 5, "finish_reason": {"x": 1}}]})
        self.start_chat_only_relay()
        status, _, data = self.request("POST", "/v1/messages", {
            "model": "claude-x", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]})
        self.assert_ok(status, data)
        self.assertEqual(json.loads(data.decode("utf-8"))["stop_reason"], "end_turn")
        connection = self.connect()
        connection.request("POST", "/v1/responses", body=json.dumps({
            "model": "gpt-5", "input": "hi", "stream": True}),
            headers={"Content-Type": "application/json"})
        events = parse_sse_events(b"".join(read_sse_lines(connection.getresponse())))
        self.assertEqual(events[-1][0], "response.completed")

    def test_an_unreadable_event_shape_is_an_invalid_event(self):
        upstream = llm_relay.validate_config({"upstream": "http://127.0.0.1:1/v1"},
                                             "test", None, {})[0].upstreams["default"]
        for error in (TypeError("x"), AttributeError("x"), KeyError("x")):
            failure = llm_relay.translated_stream_failure(upstream, error)
            self.assertEqual((failure.status, failure.kind), (502, "invalid"))


@unittest.skipUnless(anthropic, ANTHROPIC_SDK_MISSING)
class AnthropicClientOnChatOnlyUpstreamTest(ChatOnlyUpstreamTestCase):
    """The official anthropic package against a chat-only upstream."""

    def setUp(self):
        ChatOnlyUpstreamTestCase.setUp(self)
        self.start_chat_only_relay()
        self.client = anthropic.Anthropic(base_url=self.base_url, api_key="unused",
                                          max_retries=0, timeout=WAIT_SECONDS)
        self.addCleanup(self.client.close)

    def test_create(self):
        message = self.client.messages.create(
            model="claude-sonnet-4-5", max_tokens=64,
            messages=[{"role": "user", "content": "hi"}])
        self.assertEqual([block.type for block in message.content], ["thinking", "text"])
        self.assertEqual(message.content[1].text, "Hello there")
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (31, 12))

    def test_stream(self):
        with self.client.messages.stream(
                model="claude-sonnet-4-5", max_tokens=64,
                messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, "Hello there")
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertEqual(final.content[0].thinking, "pondering")
        self.assertEqual(final.usage.output_tokens, 12)

    def test_tool_round_trip(self):
        messages = [{"role": "user", "content": "weather in Paris and Rome?"}]
        with self.client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                         tools=[WEATHER_TOOL], messages=messages) as stream:
            first = stream.get_final_message()
        self.assertEqual(first.stop_reason, "tool_use")
        calls = [block for block in first.content if block.type == "tool_use"]
        self.assertEqual([call.input for call in calls], [{"city": "Paris"}, {"city": "Rome"}])
        messages += [{"role": "assistant", "content": first.content},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": call.id,
                          "content": "sunny in %s" % call.input["city"]} for call in calls]}]
        second = self.client.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                             tools=[WEATHER_TOOL], messages=messages)
        self.assertEqual(second.content[-1].text, "done: sunny in Rome")
        sent = self.upstream.last().json()["messages"]
        self.assertEqual([message["role"] for message in sent],
                         ["user", "assistant", "tool", "tool"])
        self.assertEqual([call["id"] for call in sent[1]["tool_calls"]],
                         ["call_1", "call_2"])
        self.assertEqual(sent[1]["content"], "Calling.")  # thinking not replayed

    def test_error_class(self):
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"error": {"message": "slow down"}}, 429)
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.client.messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}])
        self.assertIn("slow down", str(caught.exception))


@unittest.skipUnless(openai, OPENAI_MISSING)
class OpenAIResponsesOnChatOnlyUpstreamTest(ChatOnlyUpstreamTestCase):
    """The openai package's responses.create against a chat-only upstream."""

    TOOL = {"type": "function", "name": "get_weather", "description": "Weather",
            "parameters": WEATHER_TOOL["input_schema"]}

    def setUp(self):
        ChatOnlyUpstreamTestCase.setUp(self)
        self.start_chat_only_relay()
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused",
                                    max_retries=0, timeout=WAIT_SECONDS)
        self.addCleanup(self.client.close)

    def test_create(self):
        response = self.client.responses.create(model="gpt-5-codex", input="hi",
                                                instructions="be brief")
        self.assertEqual(response.output_text, "Hello there")
        self.assertEqual(response.status, "completed")
        self.assertEqual([item.type for item in response.output], ["reasoning", "message"])
        self.assertEqual(response.usage.total_tokens, 43)
        self.assertEqual(self.upstream.last().json()["messages"][0],
                         {"role": "system", "content": "be brief"})

    def test_stream(self):
        stream = self.client.responses.create(model="gpt-5-codex", input="hi", stream=True)
        events = list(stream)
        text = "".join(event.delta for event in events
                       if event.type == "response.output_text.delta")
        self.assertEqual(text, "Hello there")
        self.assertEqual(events[-1].type, "response.completed")
        self.assertEqual(events[-1].response.output_text, "Hello there")
        self.assertEqual([event.sequence_number for event in events],
                         list(range(len(events))))

    def test_function_tool_round_trip(self):
        with self.client.responses.stream(model="gpt-5-codex", input="weather?",
                                          tools=[self.TOOL]) as stream:
            first = stream.get_final_response()
        calls = [item for item in first.output if item.type == "function_call"]
        self.assertEqual([json.loads(call.arguments) for call in calls],
                         [{"city": "Paris"}, {"city": "Rome"}])
        follow_up = [{"role": "user", "content": "weather?"}] + [
            item.model_dump(exclude_none=True) for item in first.output] + [
            {"type": "function_call_output", "call_id": call.call_id,
             "output": "rain in " + json.loads(call.arguments)["city"]} for call in calls]
        second = self.client.responses.create(model="gpt-5-codex", input=follow_up,
                                              tools=[self.TOOL], store=False)
        self.assertEqual(second.output_text, "done: rain in Rome")
        sent = self.upstream.last().json()["messages"]
        self.assertEqual([message["role"] for message in sent],
                         ["user", "assistant", "tool", "tool"])


# -- Claude Code and Codex CLI on a chat-only upstream ---------------------------

def find_agent(name):
    """Return the path of a coding agent's CLI ("claude", "codex"), or None:
    from LLM_RELAY_AGENTS_BIN (where .ci/run installs them with npm), else
    from PATH."""
    directory = os.environ.get("LLM_RELAY_AGENTS_BIN")
    if directory:
        path = os.path.join(directory, name)
        return path if os.access(path, os.X_OK) else None
    return shutil.which(name)


CLAUDE_BIN, CODEX_BIN = find_agent("claude"), find_agent("codex")
AGENT_MISSING = ("%s is not installed (.ci/run installs it with npm into "
                 "LLM_RELAY_AGENTS_BIN)")
AGENT_PATCH = "*** Begin Patch\n*** Add File: out.txt\n+hi\n*** End Patch\n"
AGENT_TIMEOUT_SECONDS = 180  # the CLIs start in about a second; a bound, not a wait


def agent_script(body):
    """The chat-only model an agent talks to: after a tool result it says
    "done"; offered Claude Code's Bash tool it writes out.txt with it;
    offered Codex's apply_patch it adds out.txt with a patch."""
    messages = body.get("messages") or []
    names = [tool["function"]["name"] for tool in body.get("tools") or []]
    if messages and messages[-1].get("role") == "tool":
        return [chat_chunk({"role": "assistant", "content": "done"}), chat_chunk({}, "stop")]
    for name, arguments in (("Bash", {"command": "echo hi > out.txt",
                                      "description": "write out.txt"}),
                            ("apply_patch", {"input": AGENT_PATCH})):
        if name in names:
            text = json.dumps(arguments)
            return [chat_chunk({"role": "assistant", "reasoning_content": "a tool"}),
                    chat_chunk({"tool_calls": [{"index": 0, "id": "call_7", "type":
                                                "function", "function": {
                                                    "name": name, "arguments": text[:9]}}]}),
                    chat_chunk({"tool_calls": [{"index": 0, "function": {
                        "arguments": text[9:]}}]}),
                    chat_chunk({}, "tool_calls")]
    return [chat_chunk({"role": "assistant", "content": "ok"}), chat_chunk({}, "stop")]


def agent_environment(home, **variables):
    """Return a clean environment for an agent CLI: no inherited settings,
    and a dead proxy for every host but 127.0.0.1, so that nothing reaches
    the internet even if a switch below stops working."""
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": home, "TERM": "dumb",
                   "LANG": "C.UTF-8", "NO_PROXY": "127.0.0.1,localhost",
                   "no_proxy": "127.0.0.1,localhost"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        environment[name] = "http://127.0.0.1:9"  # discard port: refused at once
    environment.update(variables)
    return environment


class AgentOnChatOnlyUpstreamTestCase(ChatOnlyUpstreamTestCase):

    def setUp(self):
        ChatOnlyUpstreamTestCase.setUp(self)
        self.upstream.behaviour = chat_only(agent_script)
        self.start_chat_only_relay(model_rules=[
            {"match_model": "*", "set": {"model": "qwen3-coder"}}])
        self.directory = tempfile.mkdtemp(prefix="llm-relay-agent-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.home = os.path.join(self.directory, "home")
        self.work = os.path.join(self.directory, "work")
        os.makedirs(self.home)
        os.makedirs(self.work)

    def run_agent(self, command, environment):
        process = subprocess.Popen(command, cwd=self.work, env=environment,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            stdout, stderr = process.communicate(timeout=AGENT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        events = []
        for line in stdout.decode("utf-8", "replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        report = "rc=%s\nstdout: %s\nstderr: %s" % (
            process.returncode, stdout[-3000:], stderr[-3000:])
        return process.returncode, events, report

    def assert_tool_round_trip(self, report):
        with open(os.path.join(self.work, "out.txt")) as made:
            self.assertEqual(made.read(), "hi\n", report)
        paths = set(recorded.path for recorded in self.upstream.requests)
        self.assertEqual(paths, {"/v1/chat/completions"}, report)
        bodies = [recorded.json() for recorded in self.upstream.requests]
        # Every turn streamed: the agent took the translated event stream
        # (Claude Code falls back to "stream": false when it cannot).
        self.assertTrue(all(body.get("stream") is True for body in bodies), report)
        results = [body for body in bodies if body["messages"][-1]["role"] == "tool"]
        self.assertTrue(results, report)
        return results[-1]["messages"]


@unittest.skipUnless(CLAUDE_BIN, AGENT_MISSING % "Claude Code (claude)")
class ClaudeCodeOnChatOnlyUpstreamTest(AgentOnChatOnlyUpstreamTestCase):

    def test_bash_tool_round_trip(self):
        state = os.path.join(self.home, ".claude")
        environment = agent_environment(
            self.home, CLAUDE_CONFIG_DIR=state, CLAUDE_CODE_TMPDIR=self.home,
            ANTHROPIC_BASE_URL=self.base_url, ANTHROPIC_API_KEY="sk-ant-test",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_TELEMETRY="1",
            DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1", DISABLE_UPDATES="1",
            DISABLE_GROWTHBOOK="1", CLAUDE_CODE_DISABLE_FEATURE_FLAGS="1",
            DO_NOT_TRACK="1", DISABLE_INSTALLATION_CHECKS="1",
            CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY="1", CLAUDE_CODE_MAX_RETRIES="0",
            IS_SANDBOX="1")  # lets --dangerously-skip-permissions run as root
        code, events, report = self.run_agent([
            CLAUDE_BIN, "-p", "Create out.txt containing hi using the Bash tool.",
            "--output-format", "stream-json", "--verbose", "--no-session-persistence",
            "--dangerously-skip-permissions"], environment)
        self.assertEqual(code, 0, report)
        messages = self.assert_tool_round_trip(report)
        self.assertEqual(messages[-2]["tool_calls"][0]["function"]["name"], "Bash")
        self.assertEqual(messages[-1]["tool_call_id"], "call_7")
        result = events[-1]
        self.assertEqual((result.get("type"), result.get("subtype"), result.get("result")),
                         ("result", "success", "done"), report)
        first = self.upstream.requests[0].json()
        self.assertEqual(first["model"], "qwen3-coder")
        self.assertEqual(first["messages"][0]["role"], "system")
        self.assertEqual([m["role"] for m in first["messages"]].count("system"), 1)


@unittest.skipUnless(CODEX_BIN, AGENT_MISSING % "Codex CLI (codex)")
class CodexOnChatOnlyUpstreamTest(AgentOnChatOnlyUpstreamTestCase):

    CONFIG = """
model = "gpt-5.5"
model_provider = "relay"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false
web_search = "disabled"

[analytics]
enabled = false

[feedback]
enabled = false

[features]
plugins = false
remote_plugin = false
apps = false
tool_suggest = false

[model_providers.relay]
name = "relay"
base_url = "%s/v1"
env_key = "RELAY_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""

    def test_apply_patch_round_trip(self):
        with open(os.path.join(self.home, "config.toml"), "w") as config:
            config.write(self.CONFIG % self.base_url)
        environment = agent_environment(self.home, CODEX_HOME=self.home,
                                        RELAY_API_KEY="sk-test")
        code, events, report = self.run_agent([
            CODEX_BIN, "exec", "--skip-git-repo-check", "--ephemeral", "--json",
            "--dangerously-bypass-approvals-and-sandbox", "Create out.txt containing hi"],
            environment)
        self.assertEqual(code, 0, report)
        messages = self.assert_tool_round_trip(report)
        call = messages[-2]["tool_calls"][0]["function"]
        self.assertEqual((call["name"], json.loads(call["arguments"])),
                         ("apply_patch", {"input": AGENT_PATCH}))
        first = self.upstream.requests[0].json()
        tools = dict((tool["function"]["name"], tool["function"]) for tool in first["tools"])
        self.assertEqual(tools["apply_patch"]["parameters"]["required"], ["input"])
        self.assertEqual(first["model"], "qwen3-coder")
        kinds = [event.get("type") for event in events]
        self.assertIn("turn.completed", kinds, report)
        self.assertTrue(any(event.get("item", {}).get("type") == "file_change"
                            for event in events), report)


def token_counts(relay_test, headers=None):
    """Return {(model, kind): tokens} from the relay's /metrics."""
    status, _, data = relay_test.request("GET", "/metrics", None, headers)
    relay_test.assertEqual(status, 200)
    counts = {}
    for line in data.decode("utf-8").splitlines():
        match = re.match(r'^llm_relay_tokens_total\{(.*)\} (\d+)$', line)
        if match:  # summed over other labels (the key of named api_keys)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            kind = (labels["model"], labels["kind"])
            counts[kind] = counts.get(kind, 0) + int(match.group(2))
    return counts


class UpstreamKeyHeaderTest(RelayTestCase):

    def start_with(self, **upstream):
        upstream.setdefault("url", self.upstream.url)
        self.upstream.behaviour = native_agent_upstream
        return self.start_relay(upstreams={"up": upstream},
                                model_rules=[{"match_model": "default",
                                              "upstream": "up"}])

    def test_x_api_key_upstream_gets_its_key_and_an_anthropic_version(self):
        self.start_with(api_key="sk-ant-up", api_key_header="x-api-key")
        self.request("POST", "/v1/messages", {"model": "m"},
                     {"Authorization": "Bearer client-token"})
        sent = self.upstream.last().headers
        self.assertEqual((sent["x-api-key"], sent["anthropic-version"]),
                         ("sk-ant-up", llm_relay.ANTHROPIC_VERSION))
        self.assertIsNone(sent.get("Authorization"))
        self.request("POST", "/v1/messages", {"model": "m"},
                     {"anthropic-version": "2099-01-01"})
        self.assertEqual(self.upstream.last().headers.get_all("anthropic-version"),
                         ["2099-01-01"])

    def test_api_key_header_and_the_bearer_default(self):
        self.start_with(api_key="azure-key", api_key_header="api-key")
        self.request("POST", "/v1/responses", {"model": "m"})
        sent = self.upstream.last().headers
        self.assertEqual((sent.get("api-key"), sent.get("Authorization"),
                          sent.get("x-api-key")), ("azure-key", None, None))
        config = config_from({"upstreams": {"u": {"url": "http://h/v1",
                                                  "api_key": "k"}}})
        self.assertEqual(llm_relay.upstream_credential_headers(config.upstreams["u"]),
                         [("Authorization", "Bearer k")])

    def test_an_unknown_header_is_a_config_error(self):
        error = config_error('{"upstreams": {"a": {"url": "http://h/v1",\n'
                             '  "api_key_header": "X-Key"}}}')
        self.assertEqual(error.path, "upstreams.a.api_key_header")
        self.assertEqual(error.line, 2)


class AnthropicModelsTest(RelayTestCase):

    def setUp(self):
        RelayTestCase.setUp(self)
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {
            "object": "list", "data": [{"id": "qwen3-coder", "object": "model",
                                        "created": 1700000000, "owned_by": "x"},
                                       {"id": "glm-4.6", "object": "model",
                                        "created": 1700000001, "owned_by": "x"}]})
        self.start_relay(api_keys=["k"], model_rules=[
            {"match_model": ["claude-sonnet-4-5-20250929", "claude-*"],
             "set": {"model": "qwen3-coder"}}])
        self.anthropic = {"x-api-key": "k", "anthropic-version": "2023-06-01"}

    def get(self, path, headers):
        status, _, data = self.request("GET", path, None, headers)
        return status, json.loads(data.decode("utf-8"))

    def test_list_in_anthropic_shape_with_aliases(self):
        status, listing = self.get("/v1/models", self.anthropic)
        self.assertEqual(status, 200)
        self.assertEqual(set(listing), {"data", "has_more", "first_id", "last_id"})
        self.assertEqual([entry["id"] for entry in listing["data"]],
                         ["qwen3-coder", "glm-4.6", "claude-sonnet-4-5-20250929"])
        self.assertEqual(listing["data"][0], {
            "type": "model", "id": "qwen3-coder", "display_name": "qwen3-coder",
            "created_at": "2023-11-14T22:13:20Z"})
        self.assertEqual((listing["has_more"], listing["first_id"], listing["last_id"]),
                         (False, "qwen3-coder", "claude-sonnet-4-5-20250929"))
        status, page = self.get("/v1/models?limit=1&after_id=qwen3-coder",
                                self.anthropic)
        self.assertEqual(([entry["id"] for entry in page["data"]], page["has_more"]),
                         (["glm-4.6"], True))
        status, bad = self.get("/v1/models?limit=0", self.anthropic)
        self.assertEqual((status, bad["error"]["type"]), (400, "invalid_request_error"))
        # Without anthropic-version: OpenAI's shape, as before.
        status, listing = self.get("/v1/models", {"Authorization": "Bearer k"})
        self.assertEqual((listing["object"], listing["data"][0]["object"]),
                         ("list", "model"))

    def test_one_model_in_anthropic_shape(self):
        status, entry = self.get("/v1/models/claude-sonnet-4-5-20250929",
                                 self.anthropic)
        self.assertEqual((status, entry["type"], entry["id"]),
                         (200, "model", "claude-sonnet-4-5-20250929"))
        status, entry = self.get("/v1/models/glm-4.6", self.anthropic)
        self.assertEqual((status, entry["created_at"]), (200, "2023-11-14T22:13:21Z"))
        status, error = self.get("/v1/models/nope", self.anthropic)
        self.assertEqual((status, error["type"], error["error"]["type"]),
                         (404, "error", "not_found_error"))
        status, error = self.get("/v1/models", {"anthropic-version": "2023-06-01"})
        self.assertEqual((status, error["error"]["type"]), (401, "authentication_error"))


class CountTokensTest(RelayTestCase):

    BODY = {"model": "claude-haiku-4-5", "system": "Be brief.",
            "messages": [{"role": "user", "content": "Count these tokens, please."}]}

    def test_forwarded_through_the_rules_with_the_query_kept(self):
        second = FakeUpstream(self, lambda handler, recorded: reply_json(
            handler, {"input_tokens": 42}))
        self.start_relay(upstreams={"small": {"url": second.url}}, model_rules=[
            {"match_model": "claude-haiku-*", "set": {"model": "qwen3:4b"},
             "upstream": "small"}])
        status, _, data = self.request("POST", "/v1/messages/count_tokens?beta=true",
                                       self.BODY)
        self.assertEqual((status, json.loads(data.decode())), (200, {"input_tokens": 42}))
        sent = second.last()
        self.assertEqual(sent.path, "/v1/messages/count_tokens?beta=true")
        self.assertEqual(sent.json()["model"], "qwen3:4b")
        self.assertEqual(self.upstream.requests, [])

    def test_an_upstream_without_the_endpoint_gets_an_estimate(self):
        for status_code in (404, 405):
            self.upstream.behaviour = lambda handler, recorded, code=status_code: (
                reply_json(handler, b"404 page not found", code))
            if not hasattr(self, "relay"):
                self.start_relay()
            with self.assertLogs("llm_relay", "INFO") as logs:
                status, _, data = self.request("POST", "/v1/messages/count_tokens",
                                               self.BODY)
                self.wait_for_log(logs, "count_tokens estimated")
            expected = llm_relay.estimate_input_tokens(self.BODY)
            self.assertEqual((status, json.loads(data.decode())),
                             (200, {"input_tokens": expected}))
            self.assertGreater(expected, 10)
        # Other upstream errors, and other paths' 404s, are relayed as they are.
        self.upstream.behaviour = lambda handler, recorded: reply_json(
            handler, {"type": "error", "error": {"type": "api_error",
                                                 "message": "x"}}, 500)
        self.assertEqual(self.request("POST", "/v1/messages/count_tokens",
                                      self.BODY)[0], 500)
        self.upstream.behaviour = lambda handler, recorded: reply_json(handler, {}, 404)
        self.assertEqual(self.request("POST", "/v1/messages", self.BODY)[0], 404)

    def test_estimate_is_a_documented_rule_of_thumb(self):
        short = {"messages": [{"role": "user", "content": "hi"}]}
        long = {"messages": [{"role": "user", "content": "hi" + "x" * 400}],
                "model": "m" * 999}
        self.assertEqual(llm_relay.estimate_input_tokens(long) -
                         llm_relay.estimate_input_tokens(short), 100)


class AgentUsageMetricsTest(RelayTestCase):

    def test_messages_and_responses_usage_buffered_and_streamed(self):
        self.upstream.behaviour = native_agent_upstream
        self.start_relay()
        self.request("POST", "/v1/messages", {"model": "claude"})
        self.request("POST", "/v1/messages", {"model": "claude", "stream": True})
        self.request("POST", "/v1/responses", {"model": "codex"})
        self.request("POST", "/v1/responses", {"model": "codex", "stream": True})
        self.assertTrue(wait_until(lambda: ("codex", "input") in token_counts(self)
                                   and token_counts(self)[("codex", "input")] == 26))
        counts = token_counts(self)
        # Buffered: 11 in, 3 out, 5 cache reads, 7 cache writes.  Streamed:
        # message_start's 11 in, 2 and 4 cached, and the last message_delta's
        # cumulative 3 out (not 1 + 1 + 3).
        self.assertEqual(dict((kind, tokens) for (model, kind), tokens in counts.items()
                              if model == "claude"),
                         {"input": 22, "output": 6, "cache_read": 7, "cache_write": 11})
        self.assertEqual(dict((kind, tokens) for (model, kind), tokens in counts.items()
                              if model == "codex"), {"input": 26, "output": 8})

    def test_only_marked_lines_are_parsed(self):
        watch = llm_relay.StreamWatch("messages")
        for line in anthropic_stream("m", output_tokens=9):
            if watch.marker in line:
                watch.see(line)
        self.assertEqual(watch.usage, {"input_tokens": 11, "output_tokens": 9,
                                       "cache_read_input_tokens": 2,
                                       "cache_creation_input_tokens": 4})
        marked = [line for line in responses_stream("m") if b'"response"' in line]
        self.assertEqual(len(marked), 3)  # created, in_progress, completed
        watch = llm_relay.StreamWatch("responses")
        for line in marked:
            watch.see(line)
        self.assertEqual((watch.usage["input_tokens"], watch.response["status"]),
                         (13, "in_progress"))


class ResponseModelTest(RelayTestCase):
    """response_model: "asked" makes answers report the model asked for."""

    def setUp(self):
        RelayTestCase.setUp(self)

        def behaviour(handler, recorded):
            body = recorded.json()
            body["model"] = "qwen3-coder:30b"  # what the upstream calls it
            recorded.body = json.dumps(body).encode()
            return native_agent_upstream(handler, recorded)
        self.upstream.behaviour = behaviour

    def exchange(self, path, body):
        connection = self.connect()
        connection.request("POST", path, body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.read()

    def test_default_leaves_answers_byte_for_byte(self):
        self.start_relay(model_rules=[{"match_model": "claude-*",
                                       "set": {"model": "qwen3-coder"}}])
        data = self.exchange("/v1/messages", {"model": "claude-x"})
        self.assertEqual(data, json.dumps(anthropic_message("qwen3-coder:30b")).encode())
        data = self.exchange("/v1/messages", {"model": "claude-x", "stream": True})
        self.assertEqual(data, b"".join(anthropic_stream("qwen3-coder:30b")))

    def test_asked_name_in_every_answer_that_carries_one(self):
        self.start_relay(response_model="asked", model_rules=[
            {"match_model": "keep-*", "response_model": "upstream"},
            {"match_model": "default", "set": {"model": "qwen3-coder"}}])
        asked = 'claude-opus-4-1[1m] "é"'
        for path, stream, expected in (
                ("/v1/messages", False, anthropic_message(asked)),
                ("/v1/responses", False, responses_object(asked, usage={
                    "input_tokens": 13, "output_tokens": 4, "total_tokens": 17})),
                ("/v1/chat/completions", False, chat_completion(asked, "hello"))):
            self.assertEqual(json.loads(self.exchange(path, {"model": asked}).decode()),
                             expected, path)
        events = parse_sse(self.exchange("/v1/messages", {"model": asked,
                                                          "stream": True}))
        self.assertEqual(events[0][1]["message"]["model"], asked)
        self.assertEqual([event for event in events[1:]],
                         parse_sse(b"".join(anthropic_stream("x")))[1:])
        events = parse_sse(self.exchange("/v1/responses", {"model": asked,
                                                           "stream": True}))
        carrying = [event for _, event in events if "response" in event]
        self.assertEqual([event["response"]["model"] for event in carrying], [asked] * 3)
        events = parse_sse(self.exchange("/v1/chat/completions",
                                         {"model": asked, "stream": True}))
        self.assertEqual(set(event["model"] for _, event in events[:-1]), {asked})
        self.assertEqual(events[-1], (None, "[DONE]"))
        # A rule can turn it off again.
        data = self.exchange("/v1/messages", {"model": "keep-1"})
        self.assertEqual(json.loads(data.decode())["model"], "qwen3-coder:30b")

    def test_model_renamer_touches_only_the_first_model_member(self):
        rename = llm_relay.model_renamer("a\"b")
        self.assertEqual(rename(b'data: {"x":"\\"model\\": \\"q\\"","model" : "up",'
                                b'"o":{"model":"up"}}\n'),
                         b'data: {"x":"\\"model\\": \\"q\\"","model":"a\\"b",'
                         b'"o":{"model":"up"}}\n')
        line = b'data: {"type":"response.output_text.delta","delta":"model"}\n'
        self.assertIs(rename(line), line)
        self.assertEqual(llm_relay.rename_model_in_body(b"not json", "a"), b"not json")
        self.assertEqual(llm_relay.rename_model_in_body(b'{"model":1}', "a"),
                         b'{"model":1}')


###############################################################################
# Hot path: kernel timeouts, cached Date, direct access lines ##################
###############################################################################

class HotPathHelpersTest(unittest.TestCase):

    def test_http_date_is_an_english_imf_fixdate(self):
        self.assertEqual(llm_relay.format_http_date(784111777),
                         "Sun, 06 Nov 1994 08:49:37 GMT")
        import email.utils
        now = int(time.time())
        self.assertEqual(llm_relay.format_http_date(now),
                         email.utils.formatdate(now, usegmt=True))
        cache = llm_relay.HttpDateCache()
        value = cache.value()
        self.assertIn(value, [llm_relay.format_http_date(second) for second in
                              (int(time.time()) - 1, int(time.time()))])

    def access(self, **fields):
        access = collections.OrderedDict((
            ("client", "127.0.0.1"), ("method", "POST"),
            ("path", "/v1/chat/completions"), ("status", 200),
            ("duration_ms", 1.5)))
        access.update(fields)
        access["id"] = "req-1"
        return access

    def test_access_text_line(self):
        self.assertEqual(
            llm_relay.format_access_text(self.access(stream=True, model="a→b",
                                                     error="x\ny")),
            "127.0.0.1 POST /v1/chat/completions 200 1.5ms stream=yes model=a→b "
            "error=x\\x0ay id=req-1")
        access = self.access()
        access["status"], access["id"] = None, None
        self.assertEqual(llm_relay.format_access_text(access),
                         "127.0.0.1 POST /v1/chat/completions - 1.5ms")

    def write_direct(self, log_format, access):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        llm_relay.AccessLog(handler, log_format).write(access)
        return stream.getvalue()

    def test_direct_text_line_matches_the_logging_format(self):
        line = self.write_direct("text", self.access(stream=False))
        record = logging.LogRecord("llm_relay", logging.INFO, __file__, 1, "%s",
                                   (llm_relay.format_access_text(
                                       self.access(stream=False)),), None)
        expected = logging.Formatter(llm_relay.TEXT_LOG_FORMAT).format(record)
        # Same shape; the timestamps differ by the time between the two.
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(line.split(" ", 2)[2], expected.split(" ", 2)[2] + "\n")
        self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ")

    def test_direct_json_line_matches_the_json_formatter(self):
        line = self.write_direct("json", self.access(model="m"))
        entry = json.loads(line)
        self.assertEqual(list(entry), ["time", "level", "event", "client", "method",
                                       "path", "status", "duration_ms", "model",
                                       "id"])
        self.assertEqual((entry["level"], entry["event"], entry["model"]),
                         ("INFO", "request", "m"))
        self.assertRegex(entry["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def start_blocked_write(self, stream_class, *args, **kwargs):
        """Return (stream, AccessLog, finish): a thread is inside the
        stream's first write, of /first's line, until finish() is called;
        finish() waits for that thread."""
        writing, finish_writing = threading.Event(), threading.Event()

        class BlockingStream(stream_class):
            def write(self, text):  # the first write blocks until told
                if not writing.is_set():
                    writing.set()
                    finish_writing.wait(WAIT_SECONDS)
                return stream_class.write(self, text)

        stream = BlockingStream(*args, **kwargs)
        access_log = llm_relay.AccessLog(logging.StreamHandler(stream), "text")
        first = threading.Thread(target=access_log.write,
                                 args=(self.access(path="/first"),))
        first.start()
        self.assertTrue(writing.wait(WAIT_SECONDS))

        def finish():
            finish_writing.set()
            first.join(WAIT_SECONDS)
        return stream, access_log, finish

    def write_without_waiting(self, access_log, access):
        thread = threading.Thread(target=access_log.write, args=(access,))
        thread.start()
        thread.join(WAIT_SECONDS)
        self.assertFalse(thread.is_alive())  # it did not wait for the write

    def test_a_line_ready_during_a_write_leaves_with_the_writer_not_after_a_wait(self):
        stream, access_log, finish = self.start_blocked_write(io.StringIO)
        self.write_without_waiting(access_log, self.access(path="/second"))
        self.assertEqual(stream.getvalue(), "")
        finish()
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn(" POST /first 200 ", lines[0])
        self.assertIn(" POST /second 200 ", lines[1])

    def test_a_line_the_stream_cannot_encode_is_the_only_one_lost(self):
        raw = io.BytesIO()
        stream, access_log, finish = self.start_blocked_write(
            io.TextIOWrapper, raw, encoding="ascii", errors="strict")
        self.write_without_waiting(access_log, self.access(path="/second"))
        self.write_without_waiting(access_log, self.access(path="/third",
                                                           model="a\u2192b"))
        self.write_without_waiting(access_log, self.access(path="/fourth"))
        finish()
        stream.flush()
        paths = [line.split(" ")[5] for line in raw.getvalue().decode().splitlines()]
        self.assertEqual(paths, ["/first", "/second", "/fourth"])

    def test_without_a_handler_the_line_is_a_logging_record(self):
        with self.assertLogs("llm_relay", "INFO") as logs:
            llm_relay.AccessLog().write(self.access())
        self.assertEqual(logs.records[0].access["id"], "req-1")
        self.assertIn("POST /v1/chat/completions 200 1.5ms id=req-1", logs.output[0])

    def test_kernel_receive_timeout_raises_socket_timeout(self):
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        self.assertTrue(llm_relay.set_kernel_timeouts(left, 0.05))
        self.assertIsNone(left.gettimeout())  # no poll() before each call
        reader = io.BufferedReader(llm_relay.KernelTimeoutReader(
            left.makefile("rb", 0)))
        right.sendall(b"line\n")
        self.assertEqual(reader.readline(), b"line\n")
        with self.assertRaises(socket.timeout):
            reader.readline()
        reader.close()

    def test_kernel_timeouts_are_refused_where_they_cannot_work(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        for seconds in (0, -1, 1e100, float("inf")):
            self.assertFalse(llm_relay.set_kernel_timeouts(sock, seconds), seconds)
        self.assertTrue(llm_relay.set_kernel_timeouts(sock, 0.0000001))


class KernelTimeoutsOverHttpTest(RelayTestCase):

    def test_a_client_that_stops_reading_is_cut_after_client_timeout(self):
        sock, stop = flooded_stream_with_a_small_receive_buffer(self, client_timeout=0.5)
        body = b'{"model":"m","stream":true}'
        with self.assertLogs("llm_relay", "INFO") as logs:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.wait_for_log(logs, "client stopped reading for client_timeout")
        stop.set()

    def test_an_upstream_that_stops_reading_the_body_is_504(self):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        self.addCleanup(server.close)
        accepted = []

        def accept_and_never_read():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass
        thread = threading.Thread(target=accept_and_never_read)
        thread.daemon = True
        thread.start()
        self.addCleanup(lambda: [sock.close() for sock in accepted])
        self.start_relay(upstream="http://127.0.0.1:%d/v1" % server.getsockname()[1],
                         read_timeout=0.3)
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        body = b"\0" * (24 * 1024 * 1024)  # far beyond both socket buffers
        with self.assertLogs("llm_relay", "INFO") as logs:
            try:
                sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass  # the relay answered and closed before taking it all
            # The access line carries the answer's status and message.
            self.wait_for_log(logs, " 504 ")
        line = [line for line in logs.output if " 504 " in line][0]
        self.assertIn("sent nothing for read_timeout = 0.3 s", line)


# -- Native Messages and Responses upstreams with scripted tool calls ------------

def anthropic_events(model, blocks, stop_reason, input_tokens=21, output_tokens=7):
    """The SSE lines of a streamed Messages answer made of content blocks
    (text and tool_use), as a native upstream sends them: tool input in
    input_json_delta pieces, usage in message_start and message_delta."""
    lines = sse_event("message_start", {"type": "message_start", "message": {
        "id": "msg_2", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                  "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}})
    for index, block in enumerate(blocks):
        if block["type"] == "tool_use":
            text = json.dumps(block["input"])
            start = dict(block, input={})
            deltas = [{"type": "input_json_delta", "partial_json": text[:10]},
                      {"type": "input_json_delta", "partial_json": text[10:]}]
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": block["text"]}]
        lines += sse_event("content_block_start", {"type": "content_block_start",
                                                   "index": index,
                                                   "content_block": start})
        for delta in deltas:
            lines += sse_event("content_block_delta", {"type": "content_block_delta",
                                                       "index": index, "delta": delta})
        lines += sse_event("content_block_stop", {"type": "content_block_stop",
                                                  "index": index})
    lines += sse_event("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens}})
    return lines + sse_event("message_stop", {"type": "message_stop"})


def responses_events(model, output, usage):
    """The SSE lines of a streamed Responses answer with output items
    (message, function_call, custom_tool_call), as a native upstream sends
    them, numbered by sequence_number."""
    events = [("response.created", {"response": responses_object(model, [], "in_progress")}),
              ("response.in_progress", {"response": responses_object(
                  model, [], "in_progress")})]
    for index, item in enumerate(output):
        where = {"output_index": index, "item_id": item["id"]}
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            events += [("response.output_item.added", {"output_index": index, "item": dict(
                item, status="in_progress", content=[])}),
                ("response.content_part.added", dict(where, content_index=0, part=part)),
                ("response.output_text.delta", dict(where, content_index=0, delta=text)),
                ("response.output_text.done", dict(where, content_index=0, text=text)),
                ("response.content_part.done", dict(where, content_index=0, part=dict(
                    part, text=text)))]
        elif item["type"] == "function_call":
            events += [("response.output_item.added", {"output_index": index, "item": dict(
                item, status="in_progress", arguments="")}),
                ("response.function_call_arguments.delta", dict(
                    where, delta=item["arguments"])),
                ("response.function_call_arguments.done", dict(
                    where, arguments=item["arguments"]))]
        else:
            events += [("response.output_item.added", {"output_index": index, "item": dict(
                item, input="")}),
                ("response.custom_tool_call_input.done", dict(where, input=item["input"]))]
        events.append(("response.output_item.done", {"output_index": index, "item": item}))
    events.append(("response.completed", {"response": responses_object(
        model, output, "completed", usage)}))
    lines = []
    for number, (name, fields) in enumerate(events):
        event = {"type": name, "sequence_number": number}
        event.update(fields)
        lines += sse_event(name, event)
    return lines


NATIVE_USAGE = {"input_tokens": 21, "output_tokens": 7, "total_tokens": 28}
BASH_INPUT = {"command": "echo hi > out.txt", "description": "write out.txt"}
WEATHER_INPUT = {"city": "Paris"}


def scripted_messages_answer(body):
    """(blocks, stop_reason) of a model that calls a tool once: after a
    tool_result anywhere in the conversation it answers "done: <result>";
    offered Bash it writes out.txt; offered get_weather it asks for Paris."""
    answer = None
    for message in body.get("messages") or []:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                result = block.get("content")
                if isinstance(result, list):
                    result = "".join(part.get("text", "") for part in result)
                answer = "done: %s" % result
    if answer is not None:
        return [{"type": "text", "text": answer}], "end_turn"
    names = [tool.get("name") for tool in body.get("tools") or []]
    for name, tool_input in (("Bash", BASH_INPUT), ("get_weather", WEATHER_INPUT)):
        if name in names:
            return [{"type": "text", "text": "Let me use %s." % name},
                    {"type": "tool_use", "id": "toolu_01", "name": name,
                     "input": tool_input}], "tool_use"
    return [{"type": "text", "text": "ok"}], "end_turn"


def scripted_responses_output(body):
    """The output items of a model that calls a tool once: after a
    function_call_output it answers "done: <output>"; offered Codex's
    exec_command it writes out.txt; offered get_weather it asks for Paris."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    outputs = [item.get("output") for item in items if isinstance(item, dict) and
               item.get("type") in ("function_call_output", "custom_tool_call_output")]
    if outputs:
        return [{"type": "message", "id": "msg_9", "status": "completed",
                 "role": "assistant", "content": [{"type": "output_text", "annotations": [],
                                                   "text": "done: %s" % outputs[-1]}]}]
    names = [tool.get("name") for tool in body.get("tools") or []]
    for name, arguments in (("exec_command", {"cmd": "echo hi > out.txt"}),
                            ("get_weather", WEATHER_INPUT)):
        if name in names:
            return [{"type": "function_call", "id": "fc_1", "call_id": "call_1",
                     "name": name, "arguments": json.dumps(arguments),
                     "status": "completed"}]
    return [{"type": "message", "id": "msg_9", "status": "completed",
             "role": "assistant", "content": [{"type": "output_text", "annotations": [],
                                               "text": "ok"}]}]


def native_scripted_upstream(handler, recorded):
    """Ollama/vLLM's native /v1/messages and /v1/responses, scripted to call a
    tool once (see scripted_messages_answer, scripted_responses_output)."""
    if recorded.method == "HEAD":
        return reply_json(handler, b"")
    if recorded.method == "GET" and "/models" in recorded.path:
        return openai_like(handler, recorded)
    body = recorded.json() if recorded.body else {}
    model = body.get("model")
    if recorded.path.startswith("/v1/messages/count_tokens"):
        return reply_json(handler, {"input_tokens": 42})
    if recorded.path.startswith("/v1/messages"):
        blocks, stop_reason = scripted_messages_answer(body)
        if body.get("stream"):
            return reply_sse(handler, anthropic_events(model, blocks, stop_reason))
        return reply_json(handler, anthropic_message(model, blocks, stop_reason, {
            "input_tokens": 21, "output_tokens": 7}))
    if recorded.path.startswith("/v1/responses"):
        output = scripted_responses_output(body)
        if body.get("stream"):
            return reply_sse(handler, responses_events(model, output, NATIVE_USAGE))
        return reply_json(handler, responses_object(model, output, usage=NATIVE_USAGE))
    return openai_like(handler, recorded)


class NativeAgentUpstreamTestCase(RelayTestCase):
    """A relay in front of an upstream that serves Messages and Responses
    natively, with api_keys and rules for the agents' model names."""

    RULES = [{"match_model": ["claude-*", "gpt-5*"], "set": {"model": "qwen3-coder"}}]

    def setUp(self):
        RelayTestCase.setUp(self)
        self.upstream.behaviour = native_scripted_upstream
        self.start_relay(api_keys=["relay-key"], model_rules=self.RULES,
                         max_body_bytes=64 * 1024)

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.relay.port


@unittest.skipUnless(anthropic, ANTHROPIC_SDK_MISSING)
class AnthropicClientOnNativeUpstreamTest(NativeAgentUpstreamTestCase):
    """The official anthropic package through the relay to a native upstream."""

    def client(self, **options):
        options.setdefault("api_key", "relay-key")
        client = anthropic.Anthropic(base_url=self.base_url, max_retries=0,
                                     timeout=WAIT_SECONDS, **options)
        self.addCleanup(client.close)
        return client

    def test_create_and_stream(self):
        client = self.client()
        message = client.messages.create(
            model="claude-sonnet-4-5-20250929", max_tokens=64,
            messages=[{"role": "user", "content": "hi"}])
        self.assertEqual((message.content[0].text, message.model, message.usage.input_tokens),
                         ("ok", "qwen3-coder", 21))
        sent = self.upstream.last()
        self.assertEqual((sent.path, sent.json()["model"]), ("/v1/messages", "qwen3-coder"))
        self.assertIsNone(sent.headers.get("x-api-key"))  # the relay's key stays here
        with client.messages.stream(model="claude-opus-4-1[1m]", max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual((text, final.stop_reason, final.usage.output_tokens),
                         ("ok", "end_turn", 7))
        # Claude Code's ANTHROPIC_AUTH_TOKEN: the key as a Bearer token.
        bearer = self.client(api_key=None, auth_token="relay-key")
        self.assertEqual(bearer.messages.create(
            model="claude-haiku-4-5", max_tokens=8,
            messages=[{"role": "user", "content": "hi"}]).content[0].text, "ok")

    def test_tool_use_round_trip(self):
        client = self.client()
        messages = [{"role": "user", "content": "weather in Paris?"}]
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                    tools=[WEATHER_TOOL], messages=messages) as stream:
            first = stream.get_final_message()
        self.assertEqual(first.stop_reason, "tool_use")
        call = first.content[-1]
        self.assertEqual((call.type, call.name, call.input),
                         ("tool_use", "get_weather", WEATHER_INPUT))
        messages += [{"role": "assistant", "content": [
            block.model_dump(exclude_none=True) for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                          "content": "rain"}]}]
        second = client.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                        tools=[WEATHER_TOOL], messages=messages)
        self.assertEqual(second.content[0].text, "done: rain")
        sent = self.upstream.last().json()["messages"]
        self.assertEqual(sent[1]["content"][-1]["input"], WEATHER_INPUT)

    def test_count_tokens_and_models_list(self):
        client = self.client()
        counted = client.messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(counted.input_tokens, 42)
        self.assertTrue(self.upstream.last().path.startswith("/v1/messages/count_tokens"))
        models = [model.id for model in client.models.list()]
        self.assertEqual(models, ["qwen2.5-72b-instruct"])
        self.assertEqual(client.models.retrieve("qwen2.5-72b-instruct").type, "model")
        with self.assertRaises(anthropic.NotFoundError):
            client.models.retrieve("nope")

    def test_exception_classes_for_the_relays_errors(self):
        with self.assertRaises(anthropic.AuthenticationError) as caught:
            self.client(api_key="wrong").messages.create(
                model="claude-sonnet-4-5", max_tokens=8,
                messages=[{"role": "user", "content": "hi"}])
        self.assertIn("x-api-key", str(caught.exception))
        too_large = getattr(anthropic, "ContentTooLargeError", None) or getattr(
            anthropic, "RequestTooLargeError", anthropic.APIStatusError)
        with self.assertRaises(too_large) as caught:
            self.client().messages.create(
                model="claude-sonnet-4-5", max_tokens=8,
                messages=[{"role": "user", "content": "x" * 70000}])
        self.assertEqual(caught.exception.status_code, 413)
        self.assertIn("max_body_bytes", str(caught.exception))
        self.upstream.stop()
        with self.assertRaises(anthropic.InternalServerError) as caught:
            self.client().messages.create(
                model="claude-sonnet-4-5", max_tokens=8,
                messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.status_code, 502)
        self.assertIn("refused the connection", str(caught.exception))

    def test_a_stream_cut_mid_way_raises_in_the_client(self):
        def drop(handler, recorded):
            start_chunked(handler)
            for line in anthropic_events("m", [{"type": "text", "text": "hel"}],
                                         "end_turn")[:9]:
                write_chunk(handler, line)
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        self.upstream.behaviour = drop
        with self.assertRaises(anthropic.APIStatusError) as caught:
            with self.client().messages.stream(
                    model="claude-sonnet-4-5", max_tokens=8,
                    messages=[{"role": "user", "content": "hi"}]) as stream:
                "".join(stream.text_stream)
        self.assertIn("mid-stream", str(caught.exception))


@unittest.skipUnless(openai, OPENAI_MISSING)
class OpenAIResponsesOnNativeUpstreamTest(NativeAgentUpstreamTestCase):
    """The openai package's responses API through the relay to a native
    upstream."""

    TOOL = {"type": "function", "name": "get_weather", "description": "Weather",
            "parameters": WEATHER_TOOL["input_schema"]}

    def setUp(self):
        NativeAgentUpstreamTestCase.setUp(self)
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="relay-key",
                                    max_retries=0, timeout=WAIT_SECONDS)
        self.addCleanup(self.client.close)

    def test_create_and_stream(self):
        response = self.client.responses.create(model="gpt-5-codex", input="hi")
        self.assertEqual((response.output_text, response.usage.total_tokens), ("ok", 28))
        self.assertEqual(self.upstream.last().json()["model"], "qwen3-coder")
        with self.client.responses.stream(model="gpt-5-codex", input="hi") as stream:
            deltas = [event.delta for event in stream
                      if event.type == "response.output_text.delta"]
            final = stream.get_final_response()
        self.assertEqual((deltas, final.status, final.output_text),
                         (["ok"], "completed", "ok"))

    def test_function_tool_round_trip_streamed_and_not(self):
        for stream in (True, False):
            if stream:
                with self.client.responses.stream(model="gpt-5-codex", input="weather?",
                                                  tools=[self.TOOL]) as events:
                    first = events.get_final_response()
            else:
                first = self.client.responses.create(model="gpt-5-codex",
                                                     input="weather?", tools=[self.TOOL])
            [call] = [item for item in first.output if item.type == "function_call"]
            self.assertEqual(json.loads(call.arguments), WEATHER_INPUT)
            follow_up = [{"role": "user", "content": "weather?"},
                         call.model_dump(exclude_none=True),
                         {"type": "function_call_output", "call_id": call.call_id,
                          "output": "rain"}]
            second = self.client.responses.create(model="gpt-5-codex", input=follow_up,
                                                  tools=[self.TOOL], store=False,
                                                  stream=stream)
            if stream:
                second = [event for event in second
                          if event.type == "response.completed"][0].response
            self.assertEqual(second.output_text, "done: rain")
            self.assertEqual(self.upstream.last().json()["input"][2]["output"], "rain")

    def test_a_stream_cut_mid_way_ends_with_response_failed(self):
        def drop(handler, recorded):
            start_chunked(handler)
            for line in responses_stream("m")[:15]:
                write_chunk(handler, line)
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        self.upstream.behaviour = drop
        events = list(self.client.responses.create(model="gpt-5-codex", input="hi",
                                                   stream=True))
        self.assertEqual(events[-1].type, "response.failed")
        self.assertEqual((events[-1].response.id, events[-1].response.status),
                         ("resp_1", "failed"))
        self.assertIn("mid-stream", events[-1].response.error.message)


# -- Claude Code and Codex CLI on a native upstream ------------------------------

def claude_code_environment(home, base_url, **variables):
    """The environment for claude -p against the relay at base_url: state
    under home, telemetry, updates and every non-essential call off, no
    retries, and IS_SANDBOX=1 so --dangerously-skip-permissions runs as root.
    variables (the README's exports) come last and win."""
    environment = agent_environment(
        home, CLAUDE_CONFIG_DIR=os.path.join(home, ".claude"), CLAUDE_CODE_TMPDIR=home,
        ANTHROPIC_BASE_URL=base_url, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1",
        DISABLE_UPDATES="1", DISABLE_GROWTHBOOK="1", CLAUDE_CODE_DISABLE_FEATURE_FLAGS="1",
        DO_NOT_TRACK="1", DISABLE_INSTALLATION_CHECKS="1",
        CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY="1", CLAUDE_CODE_MAX_RETRIES="0",
        IS_SANDBOX="1")
    environment.update(variables)
    return environment


AGENT_RECIPE = "### With an upstream that serves Messages and Responses natively"


def agent_recipe_blocks():
    """Return the README's agent recipe: (relay config JSONC, Claude Code's
    shell lines, Codex's config.toml)."""
    relay, shell, toml = readme_code_blocks(AGENT_RECIPE)[:3]
    return relay, shell, toml


def recipe_config(upstream_url, relay_key):
    """Return the README recipe's relay Config, on an ephemeral port and with
    upstream_url for Ollama."""
    relay, _, _ = agent_recipe_blocks()
    text = relay.replace('"127.0.0.1:8080"', '"127.0.0.1:0"').replace(
        '"http://localhost:11434/v1"', json.dumps(upstream_url))
    config, warnings = llm_relay.parse_config_text(text, "README.md",
                                                   {"RELAY_KEY": relay_key})
    return config, warnings


def recipe_shell_environment(base_url, relay_key):
    """Return the variables the README's Claude Code lines export, with the
    relay's base URL and key filled in."""
    _, shell, _ = agent_recipe_blocks()
    variables = {}
    for line in shell.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            variables[name] = value.strip('"').replace("$RELAY_KEY", relay_key).replace(
                "http://127.0.0.1:8080", base_url)
    return variables


class AgentRecipeTest(unittest.TestCase):
    """The README's recipe for Claude Code and Codex: a valid config whose
    rules catch the names the agents ask for."""

    def test_rules_catch_the_agents_model_names(self):
        config, warnings = recipe_config("http://127.0.0.1:1/v1", "k")
        self.assertEqual(warnings, [])
        self.assertEqual(config.response_model, "asked")
        for asked, sent in (("claude-sonnet-4-5-20250929", "qwen3-coder:30b"),
                            ("claude-opus-4-1[1m]", "qwen3-coder:30b"),
                            ("claude-opus-5-5", "qwen3-coder:30b"),
                            ("claude-haiku-4-5", "qwen3:4b"),
                            ("claude-haiku-4-5-20251001", "qwen3:4b"),
                            ("gpt-5-codex", "qwen3-coder:30b"),
                            ("gpt-5.5", "qwen3-coder:30b")):
            rule = llm_relay.select_rule(config.rule_index, asked)
            self.assertEqual(llm_relay.apply_rule({"model": asked}, rule)["model"], sent,
                             asked)
        variables = recipe_shell_environment("http://relay:1", "k")
        self.assertEqual((variables["ANTHROPIC_BASE_URL"], variables["ANTHROPIC_API_KEY"]),
                         ("http://relay:1", "k"))
        for name in ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL"):
            self.assertIsNotNone(llm_relay.select_rule(config.rule_index,
                                                       variables[name]), name)
        self.assertIn('base_url = "http://127.0.0.1:8080/v1"', agent_recipe_blocks()[2])


class AgentOnNativeUpstreamTestCase(NativeAgentUpstreamTestCase):
    """The README's recipe, run with the real agent CLIs."""

    def setUp(self):
        RelayTestCase.setUp(self)
        self.upstream.behaviour = native_scripted_upstream
        config, _ = recipe_config(self.upstream.url, "relay-key")
        self.start_server(config)
        self.directory = tempfile.mkdtemp(prefix="llm-relay-agent-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.home = os.path.join(self.directory, "home")
        self.work = os.path.join(self.directory, "work")
        os.makedirs(self.home)
        os.makedirs(self.work)

    KEY = {"Authorization": "Bearer relay-key"}
    run_agent = AgentOnChatOnlyUpstreamTestCase.run_agent

    def assert_out_txt(self, report):
        with open(os.path.join(self.work, "out.txt")) as made:
            self.assertEqual(made.read(), "hi\n", report)


@unittest.skipUnless(CLAUDE_BIN, AGENT_MISSING % "Claude Code (claude)")
class ClaudeCodeOnNativeUpstreamTest(AgentOnNativeUpstreamTestCase):

    def test_bash_tool_round_trip_through_the_relay(self):
        environment = claude_code_environment(
            self.home, self.base_url, **recipe_shell_environment(self.base_url,
                                                                 "relay-key"))
        code, events, report = self.run_agent([
            CLAUDE_BIN, "-p", "Create out.txt containing hi using the Bash tool.",
            "--output-format", "stream-json", "--verbose", "--no-session-persistence",
            "--dangerously-skip-permissions"], environment)
        self.assertEqual(code, 0, report)
        self.assert_out_txt(report)
        requests = [recorded for recorded in self.upstream.requests
                    if recorded.method == "POST"]
        self.assertEqual(set(recorded.path for recorded in requests),
                         {"/v1/messages?beta=true"}, report)
        bodies = [recorded.json() for recorded in requests]
        self.assertEqual(set(body["model"] for body in bodies), {"qwen3-coder:30b"})
        self.assertTrue(all(body.get("stream") is True for body in bodies), report)
        results = [block for block in bodies[-1]["messages"][-1]["content"]
                   if isinstance(block, dict) and block.get("type") == "tool_result"]
        self.assertEqual([block["tool_use_id"] for block in results], ["toolu_01"])
        self.assertIsNone(requests[-1].headers.get("x-api-key"))
        result = events[-1]
        self.assertEqual((result.get("type"), result.get("subtype")),
                         ("result", "success"), report)
        self.assertTrue(result.get("result", "").startswith("done"), report)
        # response_model "asked": Claude Code saw its own model name.
        init = [event for event in events if event.get("type") == "assistant"]
        asked = init[0]["message"]["model"]
        self.assertEqual(asked, "claude-sonnet-4-5-20250929", report)
        self.assertEqual(token_counts(self, self.KEY).get((asked, "input")),
                         21 * len(requests), report)


@unittest.skipUnless(CODEX_BIN, AGENT_MISSING % "Codex CLI (codex)")
class CodexOnNativeUpstreamTest(AgentOnNativeUpstreamTestCase):

    def test_exec_command_tool_round_trip_through_the_relay(self):
        config = agent_recipe_blocks()[2].replace(
            "http://127.0.0.1:8080", self.base_url).replace(
            'wire_api = "responses"\n', 'wire_api = "responses"\nrequest_max_retries = 0\n'
            'stream_max_retries = 0\n')
        self.assertIn("stream_max_retries", config)
        with open(os.path.join(self.home, "config.toml"), "w") as handle:
            handle.write(config)
        environment = agent_environment(self.home, CODEX_HOME=self.home,
                                        RELAY_KEY="relay-key")
        code, events, report = self.run_agent([
            CODEX_BIN, "exec", "--skip-git-repo-check", "--ephemeral", "--json",
            "--dangerously-bypass-approvals-and-sandbox", "Create out.txt containing hi"],
            environment)
        self.assertEqual(code, 0, report)
        self.assert_out_txt(report)
        requests = [recorded for recorded in self.upstream.requests
                    if recorded.method == "POST"]
        self.assertEqual(set(recorded.path for recorded in requests), {"/v1/responses"},
                         report)
        bodies = [recorded.json() for recorded in requests]
        self.assertEqual(set(body["model"] for body in bodies), {"qwen3-coder:30b"})
        outputs = [item for item in bodies[-1]["input"]
                   if item.get("type") == "function_call_output"]
        self.assertEqual([item["call_id"] for item in outputs], ["call_1"], report)
        kinds = [event.get("type") for event in events]
        self.assertIn("turn.completed", kinds, report)
        self.assertTrue(any(event.get("item", {}).get("type") == "command_execution"
                            for event in events), report)
        self.assertEqual(token_counts(self, self.KEY).get(("gpt-5.5", "output")),
                         7 * len(requests), report)
        # A model name Codex's catalog knows: no "Model metadata ... not found".
        self.assertEqual([event for event in events
                          if event.get("item", {}).get("type") == "error"], [], report)


class _Response(object):
    """What iter_upstream_batches needs of an upstream response."""

    def __init__(self, body_reader):
        self.body_reader = body_reader


class SseRunsTest(unittest.TestCase):
    """One receive and one send per upstream read: every complete line that
    has arrived leaves at once; a partial line waits only for its own end."""

    def socket_source(self):
        """(sending socket, buffered source over a kernel-timeout reader);
        a read that would wait fails after WAIT_SECONDS instead."""
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        self.assertTrue(llm_relay.set_kernel_timeouts(left, WAIT_SECONDS))
        return right, io.BufferedReader(llm_relay.KernelTimeoutReader(
            left.makefile("rb", 0)))

    def test_chunks_that_arrived_together_are_read_together(self):
        peer, source = self.socket_source()
        reader = llm_relay.BodyReader(source, chunked=True)
        peer.sendall(b"9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n")
        self.assertEqual(reader.read_arrived(65536), b"data: a\n\ndata: b\n\n")

    def test_a_chunk_is_not_held_for_the_next_one(self):
        peer, source = self.socket_source()
        reader = llm_relay.BodyReader(source, chunked=True)
        # Its CRLF and half of the next size line have arrived: reading on
        # would wait for the network, so the first chunk comes alone.
        peer.sendall(b"9\r\ndata: a\n\n\r\n1")
        self.assertEqual(reader.read_arrived(65536), b"data: a\n\n")
        peer.sendall(b"2\r\ndata: bcdefghijk\n\n\r\n0\r\n\r\n")
        self.assertEqual(reader.read_arrived(65536), b"data: bcdefghijk\n\n")
        self.assertEqual(reader.read_arrived(65536), b"")
        self.assertTrue(reader.complete)

    def test_runs_of_whole_lines_and_a_partial_line_waits_for_its_end(self):
        peer, source = self.socket_source()
        runs = llm_relay.iter_upstream_batches(
            _Response(llm_relay.BodyReader(source, chunked=True)), 64)
        peer.sendall(b"10\r\ndata: a\n\ndata: b\r\n")
        self.assertEqual(next(runs), b"data: a\n\n")  # not held for "b"
        peer.sendall(b"3\r\nc\n\n\r\n")
        self.assertEqual(next(runs), b"data: bc\n\n")
        peer.sendall(b"50\r\n" + b"x" * 80 + b"\r\n0\r\n\r\n")
        self.assertEqual(list(runs), [b"x" * 64, b"x" * 16])

    def test_split_at_done_and_last_line(self):
        self.assertEqual(llm_relay.split_at_done(b"data: 1\n\ndata: [DONE]\n\nx\n"),
                         (b"data: 1\n\ndata: [DONE]\n", b"\nx\n", b"data: [DONE]\n"))
        self.assertIsNone(llm_relay.split_at_done(b"data: 1\n\n"))
        self.assertEqual(llm_relay.last_line_of(b"data: 1\n\n"), b"\n")
        self.assertEqual(llm_relay.last_line_of(b"a\ndata: 1\n"), b"data: 1\n")
        self.assertEqual(llm_relay.last_line_of(b"data: 1"), b"data: 1")


class SseRunsOverHttpTest(RelayTestCase):

    def read_chunks(self, sock):
        """Read a chunked response from sock; return its head and chunks."""
        reader = sock.makefile("rb")
        self.addCleanup(reader.close)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += reader.readline()
        chunks = []
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if not size:
                return head, chunks
            chunks.append(reader.read(size))
            reader.read(2)

    def test_lines_that_arrived_together_leave_together(self):
        events = [b'data: {"n": %d}\n' % number for number in range(3)]

        def together(handler, recorded):
            start_chunked(handler)
            # Three events, each its own chunk, in one TCP write.
            handler.wfile.write(b"".join(
                b"%x\r\n%s\r\n" % (len(line + b"\n"), line + b"\n") for line in events))
            handler.wfile.flush()
            end_chunks(handler)
        self.upstream.behaviour = together
        self.start_relay()
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        body = b'{"model": "m", "stream": true}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head, chunks = self.read_chunks(sock)
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(chunks, [b"\n".join(events) + b"\n"])


class StrictRequestHeadTest(RelayTestCase):
    """The front door: a request head RFC 9112 says to reject gets one 400
    (431/501/505) in the error shape of its path, Connection: close, one
    log line, and nothing is forwarded, even what follows it."""

    SMUGGLED = b"GET /v1/files/smuggled HTTP/1.1\r\nHost: r\r\n\r\n"

    def assert_refused(self, head, status=400, shape="openai"):
        reply = self.raw_exchange(head + self.SMUGGLED)
        self.assertTrue(reply.startswith(b"HTTP/1.1 %d " % status), (head, reply))
        response_head, _, body = reply.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", response_head + b"\r\n", head)
        self.assertIn(b"\r\nContent-Length: %d\r\n" % len(body), response_head)
        value = json.loads(body.decode("utf-8"))  # one answer, nothing after it
        if shape == "openai":
            self.assertEqual(set(value["error"]), {"message", "type", "param", "code"})
        else:
            self.assertEqual(value["type"], "error")
            self.assertEqual(value["error"]["type"], "invalid_request_error")
        self.assertEqual(self.upstream.requests, [], head)
        return value

    def test_a_malformed_header_line_never_lets_the_rest_through(self):
        self.start_relay()
        # ../shared/cases/smuggled-after-bad-header-line.md, and its kind.
        for bad_line in (b"X-Pad : 1", b"X-Pad\t: 1", b"X\x7fPad: 1", b"X-Pad 1",
                         b" X-Pad: 1", b"X-Pad: a\rb", b"X-Pad: a\x00b",
                         b"X-Pad: a\x01b", b"X[Pad]: 1"):
            self.assert_refused(b"GET /health HTTP/1.1\r\nHost: r\r\n" + bad_line +
                                b"\r\nContent-Length: 48\r\n\r\n")

    def test_framing_headers_that_could_be_read_two_ways_are_refused(self):
        self.start_relay()
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
        for headers, status in (
                (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", 400),
                (b"Transfer-Encoding: chunked, identity\r\n", 400),
                (b"Transfer-Encoding: identity\r\n", 400),
                (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
                (b"Transfer-Encoding: gzip, chunked\r\n", 501),
                (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400),
                (b"Content-Length: 2, 3\r\n", 400),
                (b"Content-Length: +2\r\n", 400),
                (b"Content-Length: 0x2\r\n", 400),
                (b"Content-Length:\x0b2\r\n", 400),
                (b"Content-Length: 2\x0c\r\n", 400),
                (b"Content-Length: 2\x1c\r\n", 400),
                (b"Content-Length: 2\xa0\r\n", 400),
                (b"Content-Length: \xc2\xa02\r\n", 400),
                (b"Transfer-Encoding: chunked\x1c\r\n", 400),
                (b"Transfer-Encoding: chunked\xa0\r\n", 400),
                (b"Transfer-Encoding:\x0bchunked\r\n", 400)):
            self.assert_refused(post + headers + b"\r\n{}", status)

    def test_host_and_request_line_rules(self):
        self.start_relay()
        for head, status in (
                (b"GET /health HTTP/1.1\r\n\r\n", 400),
                (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
                (b"GET /health HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
                (b"GET  /health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
                (b"GET /health  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
                (b"GET\t/health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
                (b"GET /health HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
                (b"GET /health http/1.1\r\nHost: a\r\n\r\n", 400),
                (b"GET /health HTTP/1.1\rHost: a\r\n\r\n", 400),
                (b"GET /health\r\n\r\n", 400),
                (b"G(T /health HTTP/1.1\r\nHost: a\r\n\r\n", 400),
                (b"GET /health HTTP/1.2\r\nHost: a\r\n\r\n", 505),
                (b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", 505),
                (b"GET /health HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"Host: a\r\n\r\n",
                 431)):
            self.assert_refused(head, status)
        # Still accepted: HTTP/1.0 without Host, one empty line before the
        # request (RFC 9112 §2.2), obs-text in a value, bare LF line ends.
        for head in (b"GET /health HTTP/1.0\r\n\r\n",
                     b"\r\nGET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                     b"GET /health HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9\r\n"
                     b"Connection: close\r\n\r\n",
                     b"GET /health HTTP/1.1\nHost: a\nConnection: close\n\n"):
            reply = self.raw_exchange(head)
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), (head, reply))

    def test_malformed_chunked_bodies_are_refused(self):
        self.start_relay()
        post = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        data = b'{"model": "m"}'
        for body in (b"e \r\n%s\r\n0\r\n\r\n", b" e\r\n%s\r\n0\r\n\r\n",
                     b"ex\r\n%s\r\n0\r\n\r\n", b"e;=\r\n%s\r\n0\r\n\r\n",
                     b"e\r\n%sXX0\r\n\r\n", b"e\r\n%s\n0\r\n\r\n",
                     # The last chunk without its final CRLF: the next request
                     # must not pass for trailer fields and go unanswered.
                     b"e\r\n%s\r\n0\r\n"):
            self.assert_refused(post + body % data)
        reply = self.raw_exchange(post.replace(b"\r\n\r\n", b"\r\nConnection: close"
                                               b"\r\n\r\n") +
                                  b"e;ext=1\r\n%s\r\n0\r\nX-T: 1\r\n\r\n" % data)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

    def test_messages_paths_get_the_anthropic_error_shape(self):
        self.start_relay()
        value = self.assert_refused(b"POST /v1/messages HTTP/1.1\r\nHost: r\r\n"
                                    b"X-Pad : 1\r\nContent-Length: 2\r\n\r\n{}",
                                    shape="anthropic")
        self.assertIn("whitespace between a header name and its colon",
                      value["error"]["message"])
        self.assert_refused(b"POST /v1/messages/count_tokens HTTP/1.1 x\r\n\r\n",
                            shape="anthropic")

    def test_refused_heads_are_counted_and_malformed_upstreams_are_not_ready(self):
        self.start_relay()
        self.assert_refused(b"GET /v1/models HTTP/1.1\r\nHost: r\r\nX : 1\r\n\r\n")
        status, _, text = self.request("GET", "/metrics")
        self.assertIn(b'llm_relay_requests_total{path="other",status="400",model=""} 1',
                      text)

        def malformed(handler, recorded):
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX : y\r\nContent-Length: 0\r\n\r\n")
            handler.close_connection = True
        self.upstream.behaviour = malformed
        status, _, data = self.request("GET", "/health/ready")
        self.assertEqual((status, json.loads(data.decode())["upstreams"]),
                         (503, {"default": "invalid"}))

    def test_a_refused_head_is_one_log_line(self):
        self.start_relay()
        with self.assertLogs("llm_relay", "INFO") as logs:
            self.assert_refused(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                                b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
            self.wait_for_log(logs, " 400 ")
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn("POST /v1/chat/completions 400", logs.output[0])
        self.assertIn("error=Bad request: differing Content-Length values.",
                      logs.output[0])

    def test_a_target_starting_with_two_slashes_is_a_path(self):
        self.start_relay(api_keys=["k"])
        for target in (b"//x/metrics", b"//x/health", b"//127.0.0.1/v1/models"):
            reply = self.raw_exchange(b"GET " + target + b" HTTP/1.1\r\nHost: r\r\n"
                                      b"Connection: close\r\n\r\n")
            self.assertTrue(reply.startswith(b"HTTP/1.1 404 "), (target, reply))
        self.assertEqual(llm_relay.split_route("//x/metrics?a=1"), ("//x/metrics", "a=1"))
        self.assertEqual(llm_relay.split_route("http://h/v1/models?a"), ("/models", "a"))


class NoKeyInAnyLogLineTest(RelayTestCase):
    """Every path that logs client input masks secrets (README promise)."""

    SECRET = "sk-live-SECRET1234"

    def assert_no_secret(self, logs):
        text = "\n".join(logs.output)
        self.assertNotIn("SECRET1234", text)
        return text

    def test_a_key_in_a_malformed_request_line(self):
        # ../shared/cases/key-in-bad-request-line.md
        self.start_relay()
        for name in (b"api-key", b"token", b"key"):
            with self.assertLogs("llm_relay", "DEBUG") as logs:
                reply = self.raw_exchange(b"GET /v1/models?" + name + b"=" +
                                          self.SECRET.encode() + b"&q=a b HTTP/1.1"
                                          b"\r\nHost: r\r\n\r\n")
                self.wait_for_log(logs, " 400 ")
            self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
            text = self.assert_no_secret(logs)
            self.assertIn(name.decode() + "=***", text)

    def test_a_key_in_the_target_of_unknown_paths_and_bad_heads(self):
        self.start_relay()
        with self.assertLogs("llm_relay", "DEBUG") as logs:
            status, _, data = self.request("GET", "/nope?token=" + self.SECRET)
            self.assertEqual(status, 404)
            self.assertNotIn(b"SECRET1234", data)
            self.raw_exchange(b"GET /v1/x?key=" + self.SECRET.encode() +
                              b" HTTP/1.1\r\nHost: r\r\nX-Pad : 1\r\n\r\n")
            self.raw_exchange(b"GET /v1/x/" + self.SECRET.encode() +
                              b" HTTP/1.1\r\nHost: r\r\nX-Pad : 1\r\n\r\n")
            self.wait_for_log(logs, "header name")
        self.assert_no_secret(logs)

    def test_keys_in_headers_and_debug_bodies(self):
        self.start_relay(model_rules=[{"match_model": "m", "set": {"temperature": 0}}])
        with self.assertLogs("llm_relay", "DEBUG") as logs:
            self.raw_exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                              b"Authorization : Bearer " + self.SECRET.encode() +
                              b"\r\nContent-Length: 2\r\n\r\n{}")
            status, _, _ = self.chat({"model": "m", "api_key": self.SECRET,
                                      "metadata": {"token": self.SECRET}},
                                     {"Authorization": "Bearer " + self.SECRET})
            self.assertEqual(status, 200)
            self.wait_for_log(logs, "POST /v1/chat/completions 200")
        self.assert_no_secret(logs)
        self.assertEqual(self.upstream.last().json()["api_key"], self.SECRET)

    def test_mask_secrets(self):
        mask = llm_relay.mask_secrets
        self.assertEqual(mask("GET /x?api_key=abc&q=1 HTTP/1.1"),
                         "GET /x?api_key=***&q=1 HTTP/1.1")
        self.assertEqual(mask("Authorization: Bearer abc.def"),
                         "Authorization: Bearer ***")
        self.assertEqual(mask("model sk-proj-abc123, task-1"), "model sk-***, task-1")


class BoundedMetricsLabelsTest(RelayTestCase):
    """Label values come from fixed sets, whatever clients send."""

    def test_made_up_paths_do_not_grow_the_path_label(self):
        # ../shared/cases/metrics-path-label-growth.md, smaller.
        self.start_relay(api_keys=["k"])
        connection = self.connect()
        for index in range(40):
            self.assertEqual(self.request("GET", "/nope-%d" % index,
                                          connection=connection)[0], 404)
            self.assertEqual(self.request("GET", "/v1/probe-%d" % index,
                                          connection=connection)[0], 401)
            self.assertEqual(self.request("GET", "/v1/tenant-%d/items" % index,
                                          headers={"Authorization": "Bearer k"},
                                          connection=connection)[0], 200)
        self.request("GET", "/v1/files/file-%d/content" % index,
                     headers={"Authorization": "Bearer k"}, connection=connection)
        status, _, text = self.request("GET", "/metrics", headers={
            "Authorization": "Bearer k"}, connection=connection)
        self.assertEqual(status, 200)
        paths = set(re.findall(r'path="([^"]*)"', text.decode()))
        self.assertEqual(paths, {"other", "/v1/files/*"})

    def test_the_path_label_names_known_api_paths(self):
        label = llm_relay.metrics_path
        self.assertEqual([label(route) for route in (
            "/messages", "/messages/count_tokens", "/responses/resp_1",
            "/embeddings", "/audio/transcriptions", "/images/generations",
            "/files/f/content", "/batches", "/moderations", "/rerank",
            "/messages/batches/b/results", "/health", "/x/files", "//x/metrics")],
            ["/v1/messages", "/v1/messages/count_tokens", "/v1/responses/*",
             "/v1/embeddings", "/v1/audio/transcriptions", "/v1/images/generations",
             "/v1/files/*", "/v1/batches", "/v1/moderations", "/v1/rerank",
             "/v1/messages/batches/*", "/health", "other", "other"])


class StrictConfigTest(RelayTestCase):
    """JSONC as JSON5 reads it; timeouts the platform can hold; reloads in
    the order asked."""

    def test_a_line_comment_ends_at_a_lone_cr(self):
        # ../shared/cases/jsonc-lone-cr.md
        text = '{"upstream_tls_verify": false, // x\r"upstream_tls_verify": true\n}'
        _, warnings = llm_relay.parse_config_text(text, "t.jsonc", {})
        self.assertFalse(any("upstream_tls_verify is false" in w for w in warnings),
                         warnings)
        self.assertTrue(any("duplicate key 'upstream_tls_verify'" in w
                            for w in warnings), warnings)
        config, _ = llm_relay.parse_config_text(
            '{"listen": "127.0.0.1:0", "upstream": "%s", "model_rules": [{'
            '"match_model": "m", "set": {"model": "old"}, // x\r'
            '"set": {"model": "new"}}]}' % self.upstream.url, "t.jsonc", {})
        self.start_server(config)
        self.assertEqual(self.chat({"model": "m"})[0], 200)
        self.assertEqual(self.upstream.last().json()["model"], "new")
        error = config_error('{\r// c\r"listen": 5}')
        self.assertEqual(error.path, "listen")

    def test_empty_objects_and_arrays_with_a_comma_are_errors(self):
        for text, column in (('{,}', 2), ('{"api_keys": [,]}', 15),
                             ('{"api_keys": ["a",,]}', 19),
                             ('{"api_keys": [ /* c */ , ]}', 24)):
            error = config_error(text)
            self.assertEqual((error.line, error.column), (1, column), (text, str(error)))
        config, _ = llm_relay.parse_config_text('{"api_keys": ["a",],}', "t", {})
        self.assertEqual([key.secret for key in config.api_keys], [b"a"])

    def test_timeouts_beyond_the_platform_are_config_errors(self):
        for text, path in (('{"read_timeout": 1e400}', "read_timeout"),
                           ('{"connect_timeout": 1e10}', "connect_timeout"),
                           ('{"client_timeout": 1e10}', "client_timeout"),
                           ('{"shutdown_grace": 1e400}', "shutdown_grace"),
                           ('{"upstreams": {"x": {"url": "http://h", '
                            '"read_timeout": 1e10}}}', "upstreams.x.read_timeout")):
            error = config_error(text)
            self.assertEqual(error.path, path, str(error))
            self.assertIn("at most", str(error))
        config_from({"read_timeout": float(llm_relay.MAX_TIMEOUT_SECONDS)})

    def test_two_quick_reloads_leave_the_newer_file_in_force(self):
        # ../shared/cases/reload-order.md: the first reload is slow (a large
        # file), the second one finishes first; the first is then dropped.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "config.jsonc")

        def write(alias):
            with open(path, "w") as handle:
                handle.write(config_text(self.upstream.url, model_rules=[
                    {"match_model": alias}]))
        write("a")
        self.start_server(llm_relay.load_config(path)[0])
        real_load_config = llm_relay.load_config
        first_loaded, second_done = threading.Event(), threading.Event()
        calls = []

        def load_config(*args, **kwargs):
            result = real_load_config(*args, **kwargs)
            calls.append(result)
            if len(calls) == 1:
                first_loaded.set()
                second_done.wait(WAIT_SECONDS)
            return result
        llm_relay.load_config = load_config
        self.addCleanup(setattr, llm_relay, "load_config", real_load_config)
        with self.assertLogs("llm_relay", "INFO") as logs:
            write("b")
            slow = threading.Thread(target=llm_relay.reload_config, args=(self.relay, path))
            slow.start()
            self.assertTrue(first_loaded.wait(WAIT_SECONDS))
            write("c")
            self.assertTrue(llm_relay.reload_config(self.relay, path))
            second_done.set()
            slow.join(WAIT_SECONDS)
        self.assertTrue(any("dropped reload #1" in line for line in logs.output),
                        logs.output)
        status, _, data = self.request("GET", "/v1/models")
        ids = [entry["id"] for entry in json.loads(data.decode())["data"]]
        self.assertIn("c", ids)
        self.assertNotIn("b", ids)


class OneWriteRequestTest(unittest.TestCase):

    class RecordingSocket(object):
        def __init__(self):
            self.sent = []

        def sendall(self, data):
            self.sent.append(bytes(data))

    def sent_for(self, body, **options):
        connection = llm_relay.UpstreamConnection("127.0.0.1", 9)
        connection.sock = self.RecordingSocket()
        connection.putrequest("POST", "/v1/chat/completions", skip_host=True,
                              skip_accept_encoding=True)
        connection.putheader("Host", "x")
        connection.endheaders(body, **options)
        return connection.sock.sent

    def test_head_and_small_body_leave_in_one_send(self):
        sent = self.sent_for(b'{"model": "m"}')
        self.assertEqual(len(sent), 1)
        self.assertTrue(sent[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n"))
        self.assertTrue(sent[0].endswith(b'\r\n\r\n{"model": "m"}'))

    def test_large_and_streamed_bodies_are_sent_as_before(self):
        large = b"x" * (llm_relay.COPY_BLOCK_BYTES + 1)
        sent = self.sent_for(large)
        self.assertEqual((len(sent), sent[1]), (2, large))
        sent = self.sent_for(iter([b"ab", b"c"]), encode_chunked=True)
        self.assertEqual(sent[1:], [b"2\r\nab\r\n", b"1\r\nc\r\n", b"0\r\n\r\n"])
        self.assertEqual(len(self.sent_for(None)), 1)

    def test_request_ids_are_32_hex_digits_and_differ(self):
        ids = set(llm_relay.new_request_id() for _ in range(100))
        self.assertEqual(len(ids), 100)
        for request_id in ids:
            self.assertRegex(request_id, r"^[0-9a-f]{32}$")


###############################################################################
# Real clients in Node: openai-node and @anthropic-ai/sdk #####################
###############################################################################

def find_node_package(name):
    """Return the node_modules directory that holds the npm package name
    ("openai", "@anthropic-ai/sdk"), or None: from LLM_RELAY_NODE_SDKS (the
    npm prefix .ci/run installs them into), and only when node is on PATH."""
    prefix = os.environ.get("LLM_RELAY_NODE_SDKS")
    if not prefix or not shutil.which("node"):
        return None
    modules = os.path.join(prefix, "node_modules")
    manifest = os.path.join(modules, *(name.split("/") + ["package.json"]))
    return modules if os.path.isfile(manifest) else None


NODE_OPENAI, NODE_ANTHROPIC = find_node_package("openai"), find_node_package(
    "@anthropic-ai/sdk")
NODE_SDK_MISSING = ("node or the npm package %s is not installed (.ci/run installs it "
                    "into LLM_RELAY_NODE_SDKS; locally: npm install --prefix DIR "
                    "openai@latest @anthropic-ai/sdk@latest, then LLM_RELAY_NODE_SDKS=DIR)")
NODE_TIMEOUT_SECONDS = 60  # node starts in well under a second; a bound, not a wait

# Wrapped around each test's script (CommonJS, so NODE_PATH finds the SDKs):
# the body's value is printed as one JSON line; an SDK error is described by
# caught(); an uncaught one fails the script with its stack on stderr.
NODE_PRELUDE = r"""
'use strict';
const RELAY_URL = process.env.RELAY_URL;
const TIMEOUT_MS = 10000;
setTimeout(() => { console.error('timed out'); process.exit(3); }, 50000).unref();
function load(name) { return require(name); }
async function caught(promise) {
  try { await promise; return null; } catch (error) {
    return {name: error.constructor.name, status: error.status === undefined ? null : error.status,
            message: String(error.message)};
  }
}
async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}
async function main() {
"""
NODE_EPILOGUE = r"""
}
main().then((value) => { process.stdout.write(JSON.stringify(value) + '\n'); },
            (error) => { console.error(error && error.stack || String(error)); process.exit(1); });
"""


class NodeClientMixin(object):
    """Runs a Node script against the relay: the script is a body of an async
    function (RELAY_URL is the relay's http://127.0.0.1:port) whose returned
    value comes back parsed from JSON.  Nothing leaves 127.0.0.1: keys are
    fake and every proxy variable points at a closed port."""

    def run_node(self, body):
        directory = tempfile.mkdtemp(prefix="llm-relay-node-")
        self.addCleanup(shutil.rmtree, directory, True)
        script = os.path.join(directory, "client.cjs")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(NODE_PRELUDE + body + NODE_EPILOGUE)
        environment = agent_environment(
            directory, NODE_PATH=NODE_OPENAI or NODE_ANTHROPIC,
            RELAY_URL="http://127.0.0.1:%d" % self.relay.port,
            OPENAI_API_KEY="sk-fake", ANTHROPIC_API_KEY="sk-ant-fake")
        process = subprocess.Popen([shutil.which("node"), script], cwd=directory,
                                   env=environment, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout, stderr = process.communicate(timeout=NODE_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        report = "rc=%s\nstdout: %s\nstderr: %s" % (
            process.returncode, stdout[-3000:], stderr[-3000:])
        self.assertEqual(process.returncode, 0, report)
        lines = stdout.decode("utf-8").splitlines()
        self.assertTrue(lines, report)
        return json.loads(lines[-1])


# The openai-node client every script below makes (baseURL ends in /v1).
NODE_OPENAI_CLIENT = r"""
  const OpenAI = load('openai');
  const client = new OpenAI({baseURL: RELAY_URL + '/v1', apiKey: 'sk-fake',
                             maxRetries: 0, timeout: TIMEOUT_MS});
"""
# Pieces of a streamed answer, multi-byte characters included.
STREAM_PIECES = ["Gr", "\u00fc\u00df", " ", "\u4f60\u597d", " \U0001F600", "!"] + [
    " p%d" % index for index in range(30)]
NODE_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": WEATHER_TOOL["input_schema"]}}


def sse_event_types(lines):
    """Return the type of each data event in SSE lines (bytes)."""
    return [json.loads(line[len(b"data: "):].decode("utf-8"))["type"]
            for line in lines if line.startswith(b"data: ")]


@unittest.skipUnless(NODE_OPENAI, NODE_SDK_MISSING % "openai")
class NodeOpenAIClientTest(NodeClientMixin, RelayTestCase):
    """openai-node's chat completions and models through the relay to an
    OpenAI-compatible upstream."""

    def setUp(self):
        RelayTestCase.setUp(self)
        self.start_relay(model_rules=[{"match_model": "gpt-3.5-turbo",
                                       "set": {"model": "qwen2.5-72b-instruct"}}])

    def test_chat_completion_whole_and_streamed(self):
        def answer(handler, recorded):
            if not recorded.json().get("stream"):
                return reply_json(handler, chat_completion(recorded.json()["model"], "hello"))
            reply_sse(handler, chat_sse(
                [chat_chunk({"role": "assistant", "content": STREAM_PIECES[0]})] +
                [chat_chunk({"content": piece}) for piece in STREAM_PIECES[1:]] +
                [chat_chunk({}, "stop")]))
        self.upstream.behaviour = answer
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  const messages = [{role: 'user', content: 'hi'}];
  const whole = await client.chat.completions.create({model: 'gpt-3.5-turbo', messages});
  const chunks = await collect(await client.chat.completions.create(
    {model: 'gpt-3.5-turbo', messages, stream: true}));
  return {content: whole.choices[0].message.content, model: whole.model,
          deltas: chunks.map((chunk) => chunk.choices[0].delta.content),
          finish: chunks.map((chunk) => chunk.choices[0].finish_reason)};
""")
        self.assertEqual((result["content"], result["model"]),
                         ("hello", "qwen2.5-72b-instruct"))
        self.assertEqual(result["deltas"], STREAM_PIECES + [None])  # every chunk, in order
        self.assertEqual("".join(result["deltas"][:-1]), "".join(STREAM_PIECES))
        self.assertEqual(result["finish"], [None] * len(STREAM_PIECES) + ["stop"])
        self.assertEqual([recorded.json()["model"] for recorded in self.upstream.requests],
                         ["qwen2.5-72b-instruct"] * 2)

    def test_function_tool_round_trip(self):
        self.upstream.behaviour = chat_only_upstream
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  const tools = [%s];
  const question = {role: 'user', content: 'weather in Paris and Rome?'};
  const whole = await client.chat.completions.create(
    {model: 'gpt-3.5-turbo', messages: [question], tools});
  const first = await client.chat.completions.stream(
    {model: 'gpt-3.5-turbo', messages: [question], tools}).finalChatCompletion();
  const calls = first.choices[0].message.tool_calls;
  const messages = [question, {role: 'assistant', content: null, tool_calls: calls}].concat(
    calls.map((call) => ({role: 'tool', tool_call_id: call.id,
                          content: 'sunny in ' + JSON.parse(call.function.arguments).city})));
  const second = await client.chat.completions.create(
    {model: 'gpt-3.5-turbo', messages, tools});
  const simple = (list) => list.map((call) => [call.id, call.function.name,
                                               JSON.parse(call.function.arguments)]);
  return {whole: simple(whole.choices[0].message.tool_calls),
          whole_finish: whole.choices[0].finish_reason,
          streamed: simple(calls), streamed_finish: first.choices[0].finish_reason,
          answer: second.choices[0].message.content};
""" % json.dumps(NODE_WEATHER_TOOL))
        expected = [["call_1", "get_weather", {"city": "Paris"}],
                    ["call_2", "get_weather", {"city": "Rome"}]]
        self.assertEqual((result["whole"], result["whole_finish"]), (expected, "tool_calls"))
        self.assertEqual((result["streamed"], result["streamed_finish"]),
                         (expected, "tool_calls"))
        self.assertEqual(result["answer"], "done: sunny in Rome")
        sent = self.upstream.last().json()
        self.assertEqual([message["role"] for message in sent["messages"]],
                         ["user", "assistant", "tool", "tool"])
        self.assertEqual([message.get("tool_call_id") for message in sent["messages"][2:]],
                         ["call_1", "call_2"])
        self.assertEqual(sent["tools"], [NODE_WEATHER_TOOL])

    def test_models_list(self):
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  return (await collect(client.models.list())).map((model) => model.id);
""")
        self.assertEqual(result, ["qwen2.5-72b-instruct", "gpt-3.5-turbo"])

    def test_the_upstreams_request_id_is_the_sdks_request_id(self):
        def answer(handler, recorded):
            headers = [("x-request-id", "req_upstream_9")] if recorded.json()[
                "messages"][0]["content"] == "with id" else []
            if recorded.json().get("stream"):
                return reply_sse(handler, sse_events(2, "m"))  # no id on streams here
            reply_json(handler, chat_completion(), headers=headers)
        self.upstream.behaviour = answer
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  const ask = (content, stream) => client.chat.completions.create(
    {model: 'm', messages: [{role: 'user', content}], stream});
  const whole = await ask('with id', false);
  const {data: stream, request_id: streamed} = await ask('without', true).withResponse();
  await collect(stream);
  const own = await ask('without', false);
  return {whole: whole._request_id, streamed, own: own._request_id};
""")
        self.assertEqual(result["whole"], "req_upstream_9")
        # Without one from the upstream, the id is the relay's own, as it
        # sent it upstream.
        self.assertRegex(result["own"], "^[0-9a-f]{32}$")
        self.assertRegex(result["streamed"], "^[0-9a-f]{32}$")
        self.assertEqual(self.upstream.last().headers["X-Request-Id"], result["own"])

    def test_the_upstreams_request_id_on_a_stream(self):
        def answer(handler, recorded):
            start_chunked(handler, headers=[("x-request-id", "req_stream_4")])
            for line in sse_events(2, "m"):
                write_chunk(handler, line)
            end_chunks(handler)
        self.upstream.behaviour = answer
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  const {data, request_id} = await client.chat.completions.create(
    {model: 'm', messages: [{role: 'user', content: 'hi'}], stream: true}).withResponse();
  const chunks = await collect(data);
  return {request_id, text: chunks.map((chunk) => chunk.choices[0].delta.content || '').join('')};
""")
        self.assertEqual(result, {"request_id": "req_stream_4", "text": "tok0 tok1 "})


@unittest.skipUnless(NODE_OPENAI, NODE_SDK_MISSING % "openai")
class NodeOpenAIOnNativeUpstreamTest(NodeClientMixin, NativeAgentUpstreamTestCase):
    """openai-node's responses API passed to an upstream that serves
    /v1/responses, and the relay's own errors as the SDK's exceptions."""

    def test_responses_create_and_stream(self):
        result = self.run_node(NODE_OPENAI_CLIENT.replace("sk-fake", "relay-key") + r"""
  const whole = await client.responses.create({model: 'gpt-5-codex', input: 'hi'});
  const events = await collect(await client.responses.create(
    {model: 'gpt-5-codex', input: 'hi', stream: true}));
  const final = await client.responses.stream({model: 'gpt-5-codex', input: 'hi'})
    .finalResponse();
  return {text: whole.output_text, total: whole.usage.total_tokens,
          types: events.map((event) => event.type),
          numbers: events.map((event) => event.sequence_number),
          deltas: events.filter((event) => event.type === 'response.output_text.delta')
            .map((event) => event.delta),
          final: [final.status, final.output_text]};
""")
        self.assertEqual((result["text"], result["total"]), ("ok", 28))
        expected = sse_event_types(responses_events(
            "qwen3-coder", scripted_responses_output({}), NATIVE_USAGE))
        self.assertEqual(result["types"], expected)  # every event arrives, in order
        self.assertEqual(result["numbers"], list(range(len(expected))))
        self.assertEqual((result["deltas"], result["final"]), (["ok"], ["completed", "ok"]))
        self.assertEqual([(recorded.path, recorded.json()["model"])
                          for recorded in self.upstream.requests],
                         [("/v1/responses", "qwen3-coder")] * 3)

    def test_the_relays_errors_are_the_sdks_exceptions(self):
        self.upstream.stop()
        result = self.run_node(r"""
  const OpenAI = load('openai');
  const make = (apiKey) => new OpenAI({baseURL: RELAY_URL + '/v1', apiKey, maxRetries: 0,
                                       timeout: TIMEOUT_MS});
  const body = {model: 'gpt-5-codex', messages: [{role: 'user', content: 'hi'}]};
  const wrong = await caught(make('wrong-key').chat.completions.create(body));
  const unreachable = await caught(make('relay-key').chat.completions.create(body));
  const streamed = await caught(make('relay-key').chat.completions.create(
    Object.assign({stream: true}, body)));
  const responses = await caught(make('relay-key').responses.create(
    {model: 'gpt-5-codex', input: 'hi'}));
  let classes = {};
  try { await make('wrong-key').models.list(); } catch (error) {
    classes = {authentication: error instanceof OpenAI.AuthenticationError,
               api: error instanceof OpenAI.APIError};
  }
  try { await make('relay-key').chat.completions.create(body); } catch (error) {
    classes.unreachable_api = error instanceof OpenAI.APIError;
    classes.unreachable_server = error instanceof OpenAI.InternalServerError;
  }
  return {wrong, unreachable, streamed, responses, classes};
""")
        self.assertEqual((result["wrong"]["name"], result["wrong"]["status"]),
                         ("AuthenticationError", 401), result)
        self.assertIn("Incorrect or missing API key", result["wrong"]["message"])
        for name in ("unreachable", "streamed", "responses"):
            self.assertEqual(result[name]["status"], 502, result)
            self.assertEqual(result[name]["name"], "InternalServerError", result)
            self.assertIn("refused the connection", result[name]["message"], result)
        self.assertEqual(result["classes"], {"authentication": True, "api": True,
                                             "unreachable_api": True,
                                             "unreachable_server": True})


@unittest.skipUnless(NODE_OPENAI, NODE_SDK_MISSING % "openai")
class NodeOpenAIResponsesOnChatOnlyUpstreamTest(NodeClientMixin, ChatOnlyUpstreamTestCase):
    """openai-node's responses API translated onto an upstream declared
    "apis": ["chat"]."""

    def setUp(self):
        ChatOnlyUpstreamTestCase.setUp(self)
        self.start_chat_only_relay()

    def test_responses_create_and_stream(self):
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  const whole = await client.responses.create(
    {model: 'gpt-5-codex', input: 'hi', instructions: 'be brief'});
  const events = await collect(await client.responses.create(
    {model: 'gpt-5-codex', input: 'hi', stream: true}));
  const last = events[events.length - 1];
  return {text: whole.output_text, status: whole.status, total: whole.usage.total_tokens,
          items: whole.output.map((item) => item.type),
          deltas: events.filter((event) => event.type === 'response.output_text.delta')
            .map((event) => event.delta),
          numbers: events.map((event) => event.sequence_number),
          // output_text is the SDK's convenience on whole answers; an event
          // carries the output items as the API sent them.
          last: [last.type, last.response.output.filter((item) => item.type === 'message')
            .map((item) => item.content.map((part) => part.text).join('')).join('')]};
""")
        self.assertEqual((result["text"], result["status"], result["total"]),
                         ("Hello there", "completed", 43))
        self.assertEqual(result["items"], ["reasoning", "message"])
        self.assertEqual("".join(result["deltas"]), "Hello there")
        self.assertEqual(result["numbers"], list(range(len(result["numbers"]))))
        self.assertEqual(result["last"], ["response.completed", "Hello there"])
        sent = [recorded.json() for recorded in self.upstream.requests]
        self.assertEqual([recorded.path for recorded in self.upstream.requests],
                         ["/v1/chat/completions"] * 2)
        self.assertEqual(sent[0]["messages"][0], {"role": "system", "content": "be brief"})
        self.assertEqual([body.get("stream", False) for body in sent], [False, True])

    def test_function_tool_round_trip(self):
        tool = dict(NODE_WEATHER_TOOL["function"], type="function")
        result = self.run_node(NODE_OPENAI_CLIENT + r"""
  const tools = [%s];
  const first = await client.responses.stream({model: 'gpt-5-codex', input: 'weather?', tools})
    .finalResponse();
  const calls = first.output.filter((item) => item.type === 'function_call');
  const input = [{role: 'user', content: 'weather?'}].concat(first.output, calls.map(
    (call) => ({type: 'function_call_output', call_id: call.call_id,
                output: 'rain in ' + JSON.parse(call.arguments).city})));
  const second = await client.responses.create(
    {model: 'gpt-5-codex', input, tools, store: false});
  return {calls: calls.map((call) => [call.name, JSON.parse(call.arguments)]),
          answer: second.output_text};
""" % json.dumps(tool))
        self.assertEqual(result["calls"], [["get_weather", {"city": "Paris"}],
                                           ["get_weather", {"city": "Rome"}]])
        self.assertEqual(result["answer"], "done: rain in Rome")
        self.assertEqual([message["role"] for message in self.upstream.last().json()[
            "messages"]], ["user", "assistant", "tool", "tool"])


# The @anthropic-ai/sdk client the scripts below make.
NODE_ANTHROPIC_CLIENT = r"""
  const Anthropic = load('@anthropic-ai/sdk');
  const client = new Anthropic({baseURL: RELAY_URL, apiKey: 'relay-key',
                                maxRetries: 0, timeout: TIMEOUT_MS});
  const ask = {model: 'claude-sonnet-4-5', max_tokens: 64,
               messages: [{role: 'user', content: 'hi'}]};
  const whole = await client.messages.create(ask);
  const stream = client.messages.stream(ask);
  const texts = [];
  stream.on('text', (text) => texts.push(text));
  const final = await stream.finalMessage();
  return {whole: whole.content, model: whole.model, usage: whole.usage.output_tokens,
          texts, final: final.content, stop: final.stop_reason,
          final_usage: final.usage.output_tokens};
"""


@unittest.skipUnless(NODE_ANTHROPIC, NODE_SDK_MISSING % "@anthropic-ai/sdk")
class NodeAnthropicOnNativeUpstreamTest(NodeClientMixin, NativeAgentUpstreamTestCase):
    """@anthropic-ai/sdk's messages.create and messages.stream passed to an
    upstream that serves /v1/messages."""

    def test_create_and_stream(self):
        result = self.run_node(NODE_ANTHROPIC_CLIENT)
        self.assertEqual((result["whole"], result["model"], result["usage"]),
                         ([{"type": "text", "text": "ok"}], "qwen3-coder", 7))
        self.assertEqual((result["texts"], result["stop"], result["final_usage"]),
                         (["ok"], "end_turn", 7))
        self.assertEqual([(recorded.path, recorded.json()["model"], recorded.json().get(
            "stream", False)) for recorded in self.upstream.requests],
            [("/v1/messages", "qwen3-coder", False), ("/v1/messages", "qwen3-coder", True)])
        self.assertIsNone(self.upstream.last().headers.get("x-api-key"))


@unittest.skipUnless(NODE_ANTHROPIC, NODE_SDK_MISSING % "@anthropic-ai/sdk")
class NodeAnthropicOnChatOnlyUpstreamTest(NodeClientMixin, ChatOnlyUpstreamTestCase):
    """@anthropic-ai/sdk's messages.create and messages.stream translated
    onto an upstream declared "apis": ["chat"]."""

    def test_create_and_stream(self):
        self.start_chat_only_relay()
        result = self.run_node(NODE_ANTHROPIC_CLIENT)
        self.assertEqual([block["type"] for block in result["whole"]], ["thinking", "text"])
        self.assertEqual(result["whole"][1]["text"], "Hello there")
        self.assertEqual("".join(result["texts"]), "Hello there")
        self.assertEqual((result["final"][0]["thinking"], result["stop"],
                          result["final_usage"]), ("pondering", "end_turn", 12))
        self.assertEqual([recorded.path for recorded in self.upstream.requests],
                         ["/v1/chat/completions"] * 2)


###############################################################################
# Differential tests: the relay's parsers against reference parsers ##########
###############################################################################

try:
    import h11
except ImportError:  # pragma: no cover - depends on the environment
    h11 = None
try:
    import json5
except ImportError:  # pragma: no cover - depends on the environment
    json5 = None
# Hypothesis keeps caches in ./.hypothesis unless told otherwise; keep the
# repository root clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(
    tempfile.gettempdir(), "llm-relay-hypothesis"))
try:
    import hypothesis
    from hypothesis import strategies
except ImportError:  # pragma: no cover - depends on the environment
    hypothesis = strategies = None

DIFFERENTIAL_MISSING = "h11 and hypothesis are not installed (.ci/run installs them)"
# Bounded in time for CI: a few hundred generated inputs, no example database
# written into the repository, no per-example deadline on a shared machine.
DIFFERENTIAL_EXAMPLES = 300


def differential_settings():
    return hypothesis.settings(max_examples=DIFFERENTIAL_EXAMPLES, deadline=None,
                               database=None, derandomize=True)


def relay_accepts_head(head):
    """The relay's verdict on a request head: the readers parse_request uses."""
    import io
    source = io.BufferedReader(io.BytesIO(head))
    try:
        _, _, version = llm_relay.parse_request_line(source.readline(65537))
        fields = llm_relay.FieldList(llm_relay.read_field_lines(source))
        llm_relay.request_body_length(version, fields)
    except (llm_relay.BadMessage, llm_relay.MessageCutShort):
        return False
    return True


def h11_accepts_head(head):
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return False
    return isinstance(event, h11.Request)


_CONTROL_IN_VALUE = re.compile(b"[\x01-\x08\x0e-\x1f\x7f]")


def stricter_than_h11(head):
    """Return why the relay refuses a head h11 accepts, or None.

    The deliberate differences, each a rule of RFC 9112 or 9110 that h11
    relaxes: control characters in field values (RFC 9110 §5.5 allows only
    visible characters, SP, HTAB and obs-text); obsolete line folding
    (RFC 9112 §5.2: refused rather than unfolded); versions other than
    HTTP/1.0 and HTTP/1.1; Transfer-Encoding with Content-Length, or in an
    HTTP/1.0 request (RFC 9112 §6.1: faulty framing).
    """
    lines = head.split(b"\n")
    request_line, fields = lines[0], []
    for line in lines[1:]:
        if not line.strip(b"\r"):
            break
        fields.append(line)
    names = set(line.split(b":", 1)[0].lower() for line in fields)
    if any(line[:1] in (b" ", b"\t") for line in fields):
        return "obs-fold"
    if any(_CONTROL_IN_VALUE.search(line.split(b":", 1)[-1]) for line in fields):
        return "control character in a value"
    if not re.search(b" HTTP/1\\.[01]\r?$", request_line):
        return "version"
    if b"transfer-encoding" in names and (
            b"content-length" in names or b"HTTP/1.0" in request_line):
        return "Transfer-Encoding with Content-Length or in HTTP/1.0"
    return None


def request_heads():
    """Hypothesis strategy: request heads built from valid pieces and, about
    one piece in seven, invalid ones."""
    def mostly(valid, invalid):
        return strategies.sampled_from(valid * (6 * len(invalid) // len(valid) + 1)
                                       + invalid)
    request_line = strategies.tuples(
        mostly([b"GET", b"POST"], [b"G(T", b"", b"get"]),
        mostly([b" "], [b"  ", b"\t"]),
        mostly([b"/", b"/v1/x?a=b", b"//x/metrics", b"http://h/p"], [b"/a\x7f", b"*"]),
        mostly([b" "], [b"  "]),
        mostly([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.2", b"http/1.1",
                                            b"HTTP/1.1 ", b"HTTP/11"])).map(b"".join)
    name = mostly([b"Host", b"Content-Length", b"content-length", b"Transfer-Encoding",
                   b"X-A"], [b"X A", b"X\x7fA", b"", b"X(A)"])
    separator = mostly([b":", b": ", b":\t", b": \t"], [b" :", b"\t:"])
    value = mostly([b"a", b"5", b"05", b"5, 5", b"chunked", b"Chunked", b"caf\xe9",
                    b"a b", b"chunked \t", b"", b"identity", b"gzip, chunked"],
                   [b"5, 6", b"5,", b"-5", b"+5", b"0x5", b"chunked, gzip", b"chunked,",
                    b"a\x01b", b"a\x7f", b"\xa0", b"5\xa0", b"a\rb", b"a\x00b", b"\x0b5",
                    b"x\x1c"])
    ending = mostly([b"\r\n", b"\n"], [b"\r\n"])
    fold = mostly([b""], [b" folded\r\n"])
    field_line = strategies.tuples(name, separator, value, ending, fold).map(b"".join)
    host = mostly([b"Host: h\r\n"], [b""])
    return strategies.tuples(request_line, ending, host,
                             strategies.lists(field_line, max_size=4), ending).map(
        lambda parts: parts[0] + parts[1] + parts[2] + b"".join(parts[3]) + parts[4])


@unittest.skipUnless(h11 is not None and hypothesis is not None, DIFFERENTIAL_MISSING)
class RequestHeadDifferentialTest(unittest.TestCase):
    """The relay never accepts a request head that h11 refuses, and refuses
    one h11 accepts only for a documented reason (stricter_than_h11)."""

    def test_generated_heads_agree_with_h11(self):
        @differential_settings()
        @hypothesis.given(request_heads())
        def check(head):
            relay, reference = relay_accepts_head(head), h11_accepts_head(head)
            if relay:
                self.assertTrue(reference, "the relay accepts what h11 refuses: %r"
                                % head)
            elif reference:
                self.assertIsNotNone(stricter_than_h11(head),
                                     "refused, h11 accepts, no documented reason: %r"
                                     % head)
        check()

    def test_each_documented_difference(self):
        for head, reason in (
                (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n", "control"),
                (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
                (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", "version"),
                (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer"),
                (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n", "Transfer")):
            self.assertTrue(h11_accepts_head(head), head)
            self.assertFalse(relay_accepts_head(head), head)
            self.assertIn(reason, stricter_than_h11(head))
        # The one where the relay is more lenient: an empty line before the
        # request line is skipped (RFC 9112 §2.2 says it SHOULD be).
        self.assertFalse(h11_accepts_head(b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"))


@unittest.skipUnless(hypothesis is not None, "hypothesis is not installed "
                     "(.ci/run installs it)")
class RequestHeadVerdictOverHttpTest(RelayTestCase):
    """The relay serving over a socket refuses exactly the generated heads
    that relay_accepts_head (the readers RequestHeadDifferentialTest
    compares with h11) refuses."""

    def answer(self, head):
        sock = socket.create_connection(("127.0.0.1", self.relay.port),
                                        timeout=WAIT_SECONDS)
        self.addCleanup(sock.close)
        # An empty chunked body, and exactly the 5 bytes the generated
        # Content-Length values announce.
        sock.sendall(head + b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()

    def test_generated_heads_over_a_socket(self):
        self.start_relay()

        @hypothesis.settings(max_examples=40, deadline=None, database=None,
                             derandomize=True)
        @hypothesis.given(request_heads())
        def check(head):
            status, body = self.answer(head)
            refused = b"Bad request: " in body or status in (414, 431, 505) or (
                status == 501 and b"Transfer-Encoding" in body)
            self.assertEqual(not refused, relay_accepts_head(head),
                             (head, status, body))
        check()


def jsonc_documents():
    """Hypothesis strategy: (JSONC text) with comments, odd line ends, and
    valid and invalid commas, built around JSON values."""
    scalar = strategies.sampled_from(['1', '-2.5', '0', 'true', 'false', 'null', '"s"',
                                      '"a//b"', '"/*x*/"', '"q\\"//"', '"\\\\"', '""'])
    gap = strategies.sampled_from(["", "", " ", "\n", "\r\n", "\r", "\t", " // c\n",
                                   " // c\r", " // c\r\n", "// \"x\n", " /* c */ ",
                                   "/* a\n b */", "/**/", "/* // */"])

    def container(children):
        items = strategies.lists(strategies.tuples(gap, children, gap), max_size=3)
        comma = strategies.sampled_from(["", "", "trailing", "lead", "double"])

        def render(parts, keyed):
            (kind, entries), tail, opener_gap = parts
            rendered = []
            for position, (before, child, after) in enumerate(entries):
                if keyed:
                    child = '"k%d"%s:%s' % (position % 2, before, child)
                rendered.append(before + child + after)
            body = ",".join(rendered)
            if kind == "trailing" and rendered:
                body += ","
            elif kind == "lead":
                body = "," + body
            elif kind == "double" and rendered:
                body += ",,"
            return ("{%s%s}" if keyed else "[%s%s]") % (opener_gap + body, tail)
        shape = strategies.tuples(strategies.tuples(comma, items), gap, gap)
        return strategies.one_of(shape.map(lambda parts: render(parts, False)),
                                 shape.map(lambda parts: render(parts, True)))
    value = strategies.recursive(scalar, container, max_leaves=8)
    return strategies.tuples(gap, value, gap).map("".join)


def relay_jsonc(text):
    try:
        return True, json.loads(llm_relay.strip_jsonc(text))
    except (ValueError, llm_relay.ConfigError):
        return False, None


def json5_jsonc(text):
    try:
        return True, json5.loads(text)
    except ValueError:
        return False, None


@unittest.skipUnless(json5 is not None and hypothesis is not None,
                     "json5 and hypothesis are not installed (.ci/run installs them)")
class JsoncDifferentialTest(unittest.TestCase):
    """strip_jsonc + json.loads reads generated JSONC as json5 does: the same
    value, or both refuse.  (Not compared: what JSON5 adds to JSON, such as
    unquoted keys and single quotes, and U+2028/U+2029 as line ends.)"""

    def test_generated_documents_agree_with_json5(self):
        @differential_settings()
        @hypothesis.given(jsonc_documents())
        def check(text):
            self.assertEqual(relay_jsonc(text), json5_jsonc(text), repr(text))
        check()
