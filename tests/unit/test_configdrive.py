"""Config drive ISO: read back with pycdlib and with isoinfo (genisoimage's reader)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
from typing import Iterator

import pycdlib
import pytest

from vacfactory.vmio.configdrive import DATED_VERSION, build_config_drive

USER_DATA = b"#!/bin/sh\necho contextualized\n\xff\xfe binary tail\n"
META = {"uuid": "0b5c6f9e-aaaa", "hostname": "vm-01.example.org", "name": "vm-01.example.org",
        "meta": {"machinefeatures": "http://169.254.169.253/machinefeatures"}}


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vfvmio-cd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _read(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def test_iso_has_openstack_layout_with_rock_ridge_and_joliet(workdir: str) -> None:
    path = os.path.join(workdir, "config.iso")
    build_config_drive(path, USER_DATA, META)
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "config-2"
        assert iso.has_rock_ridge() and iso.has_joliet()
        for version in ("latest", DATED_VERSION):
            base = f"/openstack/{version}"
            assert _read(iso, rr_path=f"{base}/user_data") == USER_DATA
            assert _read(iso, joliet_path=f"{base}/user_data") == USER_DATA
            assert json.loads(_read(iso, rr_path=f"{base}/meta_data.json")) == META
    finally:
        iso.close()


def test_isoinfo_reads_label_and_files(workdir: str) -> None:
    isoinfo = shutil.which("isoinfo")
    assert isoinfo, "isoinfo (genisoimage) is needed to cross-check the image"
    path = os.path.join(workdir, "config.iso")
    build_config_drive(path, USER_DATA, META)
    info = subprocess.run([isoinfo, "-d", "-i", path], capture_output=True, text=True, check=True)
    assert "Volume id: config-2" in info.stdout
    assert "Rock Ridge signatures" in info.stdout and "Joliet" in info.stdout
    listing = subprocess.run([isoinfo, "-R", "-f", "-i", path], capture_output=True, text=True,
                             check=True).stdout.split()
    assert {"/openstack/latest/user_data", "/openstack/latest/meta_data.json",
            f"/openstack/{DATED_VERSION}/user_data",
            f"/openstack/{DATED_VERSION}/meta_data.json"} <= set(listing)
    extracted = subprocess.run([isoinfo, "-R", "-x", "/openstack/latest/user_data", "-i", path],
                               capture_output=True, check=True).stdout
    assert extracted == USER_DATA


def test_rewrite_is_atomic_and_leaves_no_temporaries(workdir: str) -> None:
    path = os.path.join(workdir, "config.iso")
    build_config_drive(path, b"first", META)
    with pytest.raises(TypeError):
        build_config_drive(path, b"second", {"bad": object()})  # not JSON: nothing written
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        assert _read(iso, rr_path="/openstack/latest/user_data") == b"first"
    finally:
        iso.close()
    build_config_drive(path, b"third", META)
    assert os.listdir(workdir) == ["config.iso"]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_empty_user_data_is_allowed(workdir: str) -> None:
    path = os.path.join(workdir, "empty.iso")
    build_config_drive(path, b"", {})
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        assert _read(iso, rr_path="/openstack/latest/user_data") == b""
        assert json.loads(_read(iso, rr_path="/openstack/latest/meta_data.json")) == {}
    finally:
        iso.close()
