"""Vacuum pipes: validation and expansion (pure), loading from the cache, and fetching from a
real HTTP(S) server on loopback: changes, 304s, outages, malformed and malicious documents."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vacfactory.config import options as table
from vacfactory.config import pipes
from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, ConfigWatcher, load_config, pipe_cache_path, pipe_meta_path
from vacfactory.fetch.pipefetch import RETRY_SECONDS, FetchSettings, read_meta, refresh_pipe, refresh_pipes
from tests.unit.test_imagecache import Route, ScriptedServer

HOST = HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384)
URL = "https://vo.example.org/vo.pipe"


def doc(*entries, cache_seconds=3600) -> bytes:
    return json.dumps({"cache_seconds": cache_seconds, "machinetypes": list(entries)}).encode()


def expand(data: bytes, share: float = 3.0, prefix: str = "vo", url: str = URL) -> pipes.PipeExpansion:
    return pipes.expand_bytes(prefix, url, share, data)


GOOD = {"suffix": "prod", "target_share": 2, "machine_model": "vm-raw",
        "root_image": "https://vo.example.org/prod.img", "max_processors": 4, "min_processors": 2,
        "heartbeat_file": "heartbeat", "cvmfs_repositories": ["vo.example.org", "grid.cern.ch"],
        "user_data_option_queue": "prod queue", "user_data_proxy": True, "accounting_fqan": "/vo/Role=NULL"}
TEST = {"suffix": "test", "target_share": 1, "machine_model": "vm-raw", "root_image": "test.img"}


# --------------------------------------------------------------------------- pure validation


def test_entries_become_prefixed_machinetypes_with_vac_share_split():
    expansion = expand(doc(GOOD, TEST))
    assert [m.name for m in expansion.machinetypes] == ["vo-prod", "vo-test"]
    assert expansion.problems == ()
    prod, test = expansion.machinetypes
    assert float(prod.options["target_share"]) == pytest.approx(2.0)
    assert float(test.options["target_share"]) == pytest.approx(1.0)
    assert prod.options["max_processors"] == "4"
    assert prod.options["cvmfs_repositories"] == "vo.example.org grid.cern.ch"
    assert prod.options["user_data_proxy"] == "yes"
    assert prod.options["user_data_option_queue"] == "prod queue"
    assert "suffix" not in prod.options


def test_malicious_root_image_is_refused_and_the_rest_of_the_pipe_works():
    evil = dict(TEST, suffix="evil", root_image="/cvmfs/x; cmd")
    expansion = expand(doc(GOOD, evil, TEST))
    assert [m.name for m in expansion.machinetypes] == ["vo-prod", "vo-test"]
    assert expansion.problems == (
        f"pipe vo ({URL}) machinetypes[1].root_image: '/cvmfs/x; cmd' may contain only letters, digits and "
        ". _ - / : % + = @ , (no spaces or shell metacharacters): entry vo-evil skipped",)
    # the broken entry's share is not handed to the others (Vac's sum counts every entry)
    assert float(expansion.machinetypes[0].options["target_share"]) == pytest.approx(3.0 * 2 / 4)


@pytest.mark.parametrize("option,value,reason", [
    ("max_processors", "many", "'many' is not an integer"),
    ("max_processors", 2.5, "'2.5' is not an integer"),
    ("max_processors", True, "must be a integer, not true"),
    ("fizzle_seconds", -5, "must be >= 0 (got -5)"),
    ("target_share", "lots", "'lots' is not a number"),
    ("machine_model", "xen", "'xen' is not one of"),
    ("root_image", "$(reboot)", "may contain only letters"),
    ("root_image", "https://x.example.org/a b.img", "is not a valid URL"),
    ("root_image", "https://x.example.org/a.img?x=1&y=2", "may contain only letters"),
    ("root_image", "https://x.example.org/../etc/shadow", "must not contain '..'"),
    ("root_image", "/etc/shadow", "must be an http(s) or docker:// URL, a /cvmfs/ path or a plain file name"),
    ("root_image", "ftp://x.example.org/a.img", "URL scheme must be one of"),
    ("root_image", "docker://Registry.example.org/UPPER:1", "is not a container image reference"),
    ("root_image", "docker://lhcb/pilot:1@sha256:00", "is not a container image reference"),
    ("root_image", "docker://-v/etc:/x", "is not a container image reference"),
    ("user_data", "/etc/passwd", "must be an http(s) URL or a plain file name"),
    ("user_data", "`id`", "may contain only letters"),
    ("user_data_file_key", "../../etc/shadow", "must not contain '..'"),
    ("user_data_file_key", "sub/file", "must be a plain name (no '/')"),
    ("heartbeat_file", "a/b", "must be a plain file name"),
    ("cvmfs_repositories", {"a": 1}, "must be a list, not an object"),
    ("cvmfs_repositories", ["a b"], "must be a list of words"),
    ("root_device", "vda;", "must be a guest disk device"),
    ("root_image_sha256", "12ab", "must be 64 hexadecimal digits"),
    ("accounting_fqan", None, "must not be null"),
    ("user_data_option_x", "line\x00", "must not contain control characters"),
])
def test_bad_values_skip_their_entry_with_a_located_message(option, value, reason):
    entry = dict(TEST, suffix="bad", **{option: value})
    expansion = expand(doc(entry, TEST))
    assert [m.name for m in expansion.machinetypes] == ["vo-test"]
    assert len(expansion.problems) == 1
    message = expansion.problems[0]
    assert message.startswith(f"pipe vo ({URL}) machinetypes[0].{option}: ")
    assert reason in message and message.endswith("entry vo-bad skipped")


def test_values_are_validated_with_the_option_table_types():
    """One source of truth: a pipe value fails exactly when the same text fails in a file."""
    for option in ("max_processors", "fizzle_seconds", "machine_model", "heartbeat_file", "root_device"):
        row = table.accepted_options(table.MACHINETYPE)[option]
        for text in ("12", "-1", "vm-raw", "vda", "x y", "1.5"):
            try:
                row.type.parse(text)
                in_file = True
            except ValueError:
                in_file = False
            in_pipe = bool(expand(doc(dict(TEST, **{option: text}))).machinetypes)
            assert in_pipe == in_file, (option, text)


def test_options_outside_the_whitelist_are_ignored_and_named_once():
    entry = dict(TEST, kernel_image="/boot/vmlinuz", machinetype_path="/etc", mb_per_processor=99999)
    expansion = expand(doc(entry, dict(TEST, suffix="two", kernel_image="x")))
    assert [m.name for m in expansion.machinetypes] == ["vo-test", "vo-two"]
    assert "kernel_image" not in expansion.machinetypes[0].options
    assert sorted(expansion.problems) == sorted(
        f"pipe vo ({URL}) machinetypes[0].{name}: not accepted from a vacuum pipe: ignored"
        for name in ("kernel_image", "machinetype_path", "mb_per_processor"))


@pytest.mark.parametrize("entry,reason", [
    ({"target_share": 1, "root_image": "a.img"}, "suffix: is missing"),
    ({"suffix": "Prod_1", "root_image": "a.img"}, "must match"),
    ({"suffix": 7, "root_image": "a.img"}, "must match"),
    ("not an object", "must be a JSON object"),
])
def test_entries_without_a_usable_suffix_are_skipped(entry, reason):
    expansion = expand(doc(entry, TEST))
    assert [m.name for m in expansion.machinetypes] == ["vo-test"]
    assert reason in expansion.problems[0] and "skipped" in expansion.problems[0]


def test_a_repeated_suffix_is_skipped():
    expansion = expand(doc(TEST, dict(TEST, root_image="other.img")))
    assert [m.options["root_image"] for m in expansion.machinetypes] == ["test.img"]
    assert "already used by machinetypes[0]" in expansion.problems[0]


def test_zero_total_share_gives_zero_shares():
    expansion = expand(doc(dict(TEST, target_share=0)))
    assert expansion.machinetypes[0].options["target_share"] == "0.0"


@pytest.mark.parametrize("data,reason", [
    (b"<html>not found</html>", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"cache_seconds": 10}', "no machinetypes list"),
    (b'{"machinetypes": {"suffix": "a"}}', "machinetypes is not a list"),
    (b'{"machinetypes": [], "cache_seconds": NaN}', "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"machinetypes": [' + b"{}," * 300 + b"{}]}", "more than 256"),
    (b" " * (pipes.MAX_DOCUMENT_BYTES + 1), "larger than"),
])
def test_unusable_documents_raise_pipe_error(data, reason):
    with pytest.raises(pipes.PipeError, match=reason):
        pipes.parse_document(data)


def test_cache_seconds_is_bounded_and_a_bad_one_is_reported():
    assert pipes.parse_document(doc(cache_seconds=5)).cache_seconds == pipes.MIN_CACHE_SECONDS
    assert pipes.parse_document(doc(cache_seconds=10**9)).cache_seconds == pipes.MAX_CACHE_SECONDS
    bad = pipes.parse_document(b'{"cache_seconds": "soon", "machinetypes": []}')
    assert bad.cache_seconds == pipes.DEFAULT_CACHE_SECONDS and "cache_seconds" in bad.problems[0]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
KEYS = st.sampled_from(sorted(pipes.WHITELIST) + ["suffix", "target_share", "user_data_option_a",
                                                   "user_data_file_b", "kernel_image", "nonsense"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.dictionaries(KEYS, JSON_VALUES | st.sampled_from(["a.img", "vm-raw", "prod", "2"]),
                                        max_size=6), max_size=4))
def test_any_document_expands_without_crashing_and_every_kept_value_is_safe(entries):
    expansion = expand(doc(*entries))
    for mt in expansion.machinetypes:
        assert mt.name.startswith("vo-")
        for option, text in mt.options.items():
            row = table.accepted_options(table.MACHINETYPE).get(option)
            if row is not None:
                row.type.parse(text)  # raises if a value slipped through unvalidated
            if option in ("root_image", "user_data") or option.startswith("user_data_file_"):
                assert pipes._path_rules(option, text) is None
                assert not set(text) & set(" \t\n;&|$`'\"<>()\\*?")


# --------------------------------------------------------------------------- loading from the cache


def write(path, text) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(str(path), mode) as f:
        f.write(text)
    return str(path)


def site_conf(tmp_path, url=URL, extra="", pipe_extra="") -> str:
    state = tmp_path / "vfops-state"
    return write(tmp_path / "vfops.conf", f"""\
[settings]
vac_space = vac01.example.com
factory_name = wn01.example.com
state_dir = {state}
total_processors = 8
processors_per_superslot = 4

[vacuum_pipe vo]
vacuum_pipe_url = {url}
target_share = 3
user_data_option_cvmfs_proxy = http://squid.example.com:3128
{pipe_extra}
{extra}""")


def load(conf_path):
    return load_config(ConfigSources.for_main_file(conf_path), host_facts=HOST)


def test_loader_expands_the_cached_pipe_with_site_values_winning(tmp_path):
    conf = site_conf(tmp_path, pipe_extra="heartbeat_seconds = 900\nfizzle_seconds = 100",
                     extra="[machinetype vo-test]\ntarget_share = 7\nmax_processors = 2\n")
    state = str(tmp_path / "vfops-state")
    write(pipe_cache_path(state, "vo"), doc(GOOD, dict(TEST, heartbeat_seconds=30, fizzle_seconds=5)))
    config = load(conf)
    assert list(config.machinetypes) == ["vo-prod", "vo-test"]
    prod, test = config.machinetypes["vo-prod"], config.machinetypes["vo-test"]
    assert prod.target_share == pytest.approx(2.0) and prod.max_processors == 4
    assert prod.root_image == "https://vo.example.org/prod.img"
    assert prod.machinetype_path == os.path.join(state, "machinetypes", "vo")
    assert prod.cvmfs_repositories == ("vo.example.org", "grid.cern.ch")
    assert dict(prod.user_data_options) == {"queue": "prod queue", "cvmfs_proxy": "http://squid.example.com:3128"}
    # precedence: [machinetype vo-test] > [vacuum_pipe vo] > the pipe document
    assert test.target_share == 7.0 and test.max_processors == 2
    assert test.heartbeat_seconds == 900 and test.fizzle_seconds == 100
    assert test.root_image == os.path.join(state, "machinetypes", "vo", "files", "test.img")
    assert config.origins["machinetype vo-prod"]["max_processors"] == f"pipe vo ({URL}) machinetypes[0]"
    assert config.origins["machinetype vo-test"]["target_share"].endswith("vfops.conf:15")


def test_a_broken_entry_is_a_warning_and_never_invalidates_the_site_configuration(tmp_path):
    conf = site_conf(tmp_path, extra="[machinetype vo-evil]\nmax_processors = 2\n")
    state = str(tmp_path / "vfops-state")
    evil = dict(TEST, suffix="evil", root_image="/cvmfs/x; cmd")
    nofit = dict(TEST, suffix="nofit", min_processors=4, max_processors=2)
    write(pipe_cache_path(state, "vo"), doc(evil, nofit, TEST))
    config = load(conf)
    assert list(config.machinetypes) == ["vo-test"]
    text = "\n".join(config.warnings)
    assert f"pipe vo ({URL}) machinetypes[0].root_image: '/cvmfs/x; cmd'" in text
    assert f"pipe vo ({URL}) machinetypes[1].max_processors: must be >= min_processors (4): entry vo-nofit skipped" \
        in text
    assert "no vacuum pipe defines machinetype vo-evil now" in text


def test_a_site_typo_in_a_section_refining_a_pipe_machinetype_is_an_error(tmp_path):
    conf = site_conf(tmp_path, extra="[machinetype vo-test]\nmax_processors = lots\n")
    write(pipe_cache_path(str(tmp_path / "vfops-state"), "vo"), doc(TEST))
    with pytest.raises(Exception) as raised:
        load(conf)
    assert "[machinetype vo-test] max_processors: 'lots' is not an integer" in str(raised.value)


def test_an_unfetched_pipe_defines_nothing_and_says_so(tmp_path):
    config = load(site_conf(tmp_path))
    assert dict(config.machinetypes) == {}
    assert any("not fetched yet" in w for w in config.warnings)


def test_an_unusable_cache_is_reported_not_fatal(tmp_path):
    conf = site_conf(tmp_path)
    write(pipe_cache_path(str(tmp_path / "vfops-state"), "vo"), b"garbage")
    config = load(conf)
    assert dict(config.machinetypes) == {}
    assert any("is unusable: document is not JSON" in w for w in config.warnings)


def test_the_config_watcher_notices_a_new_pipe_cache(tmp_path):
    conf = site_conf(tmp_path)
    watcher = ConfigWatcher(ConfigSources.for_main_file(conf), host_facts=HOST)
    assert dict(watcher.current.machinetypes) == {}
    assert watcher.poll().changed is False
    write(pipe_cache_path(str(tmp_path / "vfops-state"), "vo"), doc(TEST))
    result = watcher.poll()
    assert result.changed and list(result.config.machinetypes) == ["vo-test"]


# --------------------------------------------------------------------------- fetching


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.stop()


def fetch_once(tmp_path, server, now, path="/vo.pipe", force=False):
    conf = site_conf(tmp_path, url=server.url(path))
    config = load(conf)
    problems = refresh_pipes(config, now=now, force=force)
    return load(conf), problems


def test_first_fetch_fills_the_cache_and_the_loader_uses_it(tmp_path, server):
    server.routes["/vo.pipe"] = Route(doc(GOOD, TEST), etag='"1"', content_type="application/json")
    config, problems = fetch_once(tmp_path, server, now=1000.0)
    assert problems == []
    assert list(config.machinetypes) == ["vo-prod", "vo-test"]
    meta = json.load(open(pipe_meta_path(str(tmp_path / "vfops-state"), "vo")))
    assert meta["etag"] == '"1"' and meta["fetched"] == 1000.0 and meta["url"] == server.url("/vo.pipe")
    assert server.requests_to("/vo.pipe")[0].headers["User-Agent"].startswith("vacfactory/")


def test_cache_seconds_is_honoured_and_revalidation_uses_the_etag(tmp_path, server):
    server.routes["/vo.pipe"] = Route(doc(TEST, cache_seconds=600), etag='"1"', last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
    fetch_once(tmp_path, server, now=1000.0)
    cache = pipe_cache_path(str(tmp_path / "vfops-state"), "vo")
    inode = os.stat(cache).st_ino
    fetch_once(tmp_path, server, now=1599.0)
    assert len(server.requests_to("/vo.pipe")) == 1
    config, problems = fetch_once(tmp_path, server, now=1600.0)
    second = server.requests_to("/vo.pipe")[1]
    assert second.headers["If-None-Match"] == '"1"'
    assert second.headers["If-Modified-Since"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    assert problems == [] and os.stat(cache).st_ino == inode  # 304: the cache file is untouched
    fetch_once(tmp_path, server, now=2199.0)
    assert len(server.requests_to("/vo.pipe")) == 2  # the 304 restarted the cache_seconds clock


def test_a_changed_document_replaces_the_cache(tmp_path, server):
    server.routes["/vo.pipe"] = Route(doc(TEST, cache_seconds=60), etag='"1"')
    fetch_once(tmp_path, server, now=1000.0)
    server.routes["/vo.pipe"] = Route(doc(TEST, GOOD, cache_seconds=60), etag='"2"')
    config, problems = fetch_once(tmp_path, server, now=1060.0)
    assert problems == [] and list(config.machinetypes) == ["vo-test", "vo-prod"]


def test_an_outage_keeps_the_cached_machinetypes(tmp_path, server):
    server.routes["/vo.pipe"] = Route(doc(GOOD, TEST, cache_seconds=60))
    fetch_once(tmp_path, server, now=1000.0)
    server.stop()
    config, problems = fetch_once(tmp_path, server, now=2000.0)
    assert list(config.machinetypes) == ["vo-prod", "vo-test"]
    assert len(problems) == 1 and "cannot fetch: cannot connect" in problems[0]
    assert "keeping the cached copy from 1970-01-01 00:16:40 UTC" in problems[0]


def test_failures_are_retried_no_sooner_than_the_retry_interval(tmp_path, server):
    server.routes["/vo.pipe"] = Route(status=500)
    _, problems = fetch_once(tmp_path, server, now=1000.0)
    assert "HTTP 500" in problems[0] and "no cached copy" in problems[0]
    fetch_once(tmp_path, server, now=1000.0 + RETRY_SECONDS - 1)
    assert len(server.requests_to("/vo.pipe")) == 1
    server.routes["/vo.pipe"] = Route(doc(TEST))
    config, problems = fetch_once(tmp_path, server, now=1000.0 + RETRY_SECONDS)
    assert problems == [] and list(config.machinetypes) == ["vo-test"]


@pytest.mark.parametrize("bad,reason", [
    (b"<html>oops</html>", "bad document: document is not JSON"),
    (json.dumps({"machinetypes": [dict(TEST, root_image="/cvmfs/x; rm -rf /")]}).encode(),
     "bad document: none of its machinetypes is valid"),
    (b'{"machinetypes": "all of them"}', "bad document: machinetypes is not a list"),
    (b"{" * 100000, "bad document"),
])
def test_a_bad_download_never_replaces_a_good_cache(tmp_path, server, bad, reason):
    server.routes["/vo.pipe"] = Route(doc(TEST, cache_seconds=60))
    fetch_once(tmp_path, server, now=1000.0)
    cache = pipe_cache_path(str(tmp_path / "vfops-state"), "vo")
    good = open(cache, "rb").read()
    server.routes["/vo.pipe"] = Route(bad)
    config, problems = fetch_once(tmp_path, server, now=1100.0)
    assert open(cache, "rb").read() == good
    assert list(config.machinetypes) == ["vo-test"]
    assert any(reason in p and "keeping the cached copy" in p for p in problems), problems


def test_an_oversized_document_is_refused_while_downloading(tmp_path, server):
    server.routes["/vo.pipe"] = Route(b" " * (pipes.MAX_DOCUMENT_BYTES + 10))
    _, problems = fetch_once(tmp_path, server, now=1000.0)
    assert "more than" in problems[0]
    assert not os.path.exists(pipe_cache_path(str(tmp_path / "vfops-state"), "vo"))


def test_a_new_url_is_fetched_at_once(tmp_path, server):
    server.routes["/a.pipe"] = Route(doc(TEST, cache_seconds=86400))
    server.routes["/b.pipe"] = Route(doc(GOOD, cache_seconds=86400))
    fetch_once(tmp_path, server, now=1000.0, path="/a.pipe")
    config, problems = fetch_once(tmp_path, server, now=1001.0, path="/b.pipe")
    assert problems == [] and list(config.machinetypes) == ["vo-prod"]


def test_entry_problems_of_a_fetched_pipe_are_returned_for_the_log(tmp_path, server):
    server.routes["/vo.pipe"] = Route(doc(TEST, dict(TEST, suffix="bad", max_processors="x")))
    config, problems = fetch_once(tmp_path, server, now=1000.0)
    assert list(config.machinetypes) == ["vo-test"]
    assert problems == [f"pipe vo ({server.url('/vo.pipe')}) machinetypes[1].max_processors: 'x' is not an "
                        "integer: entry vo-bad skipped"]


def test_file_urls_are_read_from_disk(tmp_path):
    source = write(tmp_path / "vfops-source.pipe", doc(TEST))
    conf = site_conf(tmp_path, url=f"file://{source}")
    assert refresh_pipes(load(conf), now=1000.0) == []
    assert list(load(conf).machinetypes) == ["vo-test"]


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vfops test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = write(tmp_path / "vfops-cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    key_path = write(tmp_path / "vfops-key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_https_is_verified_against_the_configured_ca(tmp_path):
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ScriptedServer(ssl_context=context)
    try:
        server.routes["/vo.pipe"] = Route(doc(TEST))
        state = str(tmp_path / "vfops-state")
        other_ca, _ = _self_signed(tmp_path / "vfops-other")
        untrusted = FetchSettings(ca_path=other_ca, timeout=10)
        problems = refresh_pipe(state, "vo", server.url("/vo.pipe"), 1.0, 1000.0, untrusted)
        assert "TLS verification failed" in problems[0]
        trusted = FetchSettings(ca_path=cert, timeout=10)
        assert refresh_pipe(state, "vo", server.url("/vo.pipe"), 1.0, 1000.0, trusted, force=True) == []
        assert os.path.exists(pipe_cache_path(state, "vo"))
    finally:
        server.stop()


def test_https_is_verified_against_a_hashed_ca_directory(tmp_path):
    """pipe_ca_path may be a directory in the c_rehash / `openssl rehash` layout, like
    /etc/grid-security/certificates: <subject hash>.0 links to the CA certificates."""
    cert, key = _self_signed(tmp_path)
    other_ca, _ = _self_signed(tmp_path / "vfops-other")
    trusted_dir, untrusted_dir = tmp_path / "vfops-cadir", tmp_path / "vfops-otherdir"
    for directory, ca in ((trusted_dir, cert), (untrusted_dir, other_ca)):
        directory.mkdir()
        shutil.copy(ca, directory / "ca.pem")
        subprocess.run(["openssl", "rehash", str(directory)], check=True)
        assert any(name.endswith(".0") for name in os.listdir(directory))  # the hashed layout
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ScriptedServer(ssl_context=context)
    try:
        server.routes["/vo.pipe"] = Route(doc(TEST))
        state = str(tmp_path / "vfops-state")
        problems = refresh_pipe(state, "vo", server.url("/vo.pipe"), 1.0, 1000.0,
                                FetchSettings(ca_path=str(untrusted_dir), timeout=10))
        assert "TLS verification failed" in problems[0]
        assert refresh_pipe(state, "vo", server.url("/vo.pipe"), 1.0, 1000.0,
                            FetchSettings(ca_path=str(trusted_dir), timeout=10), force=True) == []
        assert json.loads(open(pipe_cache_path(state, "vo"), "rb").read()) == json.loads(doc(TEST))
    finally:
        server.stop()


class SlowServer:
    """HTTP/1.1 on 127.0.0.1, written by hand: the first request gets ``body``, later ones
    are answered as ``mode`` says: "stall" (accept, read the request, never answer),
    "trickle-headers" or "trickle-body" (one byte every ``pause`` s, each well inside a read
    timeout, for ``limit`` s at most so that a broken client cannot hang the test run)."""

    def __init__(self, body: bytes, pause: float = 0.2, limit: float = 20.0) -> None:
        self.body, self.pause, self.limit = body, pause, limit
        self.mode = "answer"
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn, self.mode), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            if mode == "answer":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
                return
            if mode == "stall":
                self.stopping.wait(self.limit)
                return
            if mode == "trickle-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
            ends = time.monotonic() + self.limit
            while time.monotonic() < ends and not self.stopping.wait(self.pause):
                try:
                    conn.sendall(b" " if mode == "trickle-body" else b"a")
                except OSError:  # the client gave up
                    return

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


@pytest.mark.parametrize("mode", ["stall", "trickle-headers", "trickle-body"])
def test_a_stalled_or_trickling_server_fails_within_the_timeout_and_the_cache_stays(tmp_path, mode):
    server = SlowServer(doc(TEST, cache_seconds=60))
    try:
        conf = site_conf(tmp_path, url=server.url("/vo.pipe"))
        state = str(tmp_path / "vfops-state")
        settings_1s = FetchSettings(timeout=1.0)
        assert refresh_pipe(state, "vo", server.url("/vo.pipe"), 3.0, 1000.0, settings_1s) == []
        cached = open(pipe_cache_path(state, "vo"), "rb").read()
        server.mode = mode
        began = time.monotonic()
        problems = refresh_pipe(state, "vo", server.url("/vo.pipe"), 3.0, 1100.0, settings_1s)
        took = time.monotonic() - began
    finally:
        server.stop()
    assert took < 4.0, f"{mode}: the fetch took {took:.1f} s with a 1 s timeout"
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"pipe vo ({server.url('/vo.pipe')}): cannot fetch: ")
    assert "timeout" in problems[0] or "took more than 1 s" in problems[0], problems[0]
    assert "keeping the cached copy from 1970-01-01 00:16:40 UTC" in problems[0]
    assert open(pipe_cache_path(state, "vo"), "rb").read() == cached
    assert list(load(conf).machinetypes) == ["vo-test"]
    assert read_meta(state, "vo")["attempted"] == 1100.0  # the next try waits RETRY_SECONDS


def test_hostile_option_names_stay_on_one_line():
    expansion = expand(doc(dict(TEST, **{"evil\nname": 1, "user_data_option_Bad Name": "x"})))
    assert [m.name for m in expansion.machinetypes] == []
    assert all("\n" not in p for p in expansion.problems)
    assert any("'evil\\nname': not accepted from a vacuum pipe" in p for p in expansion.problems)
