"""deploy/: what can be checked without a Docker engine, systemd user session or a Mac.
The compose file parses and defines three peers; every LOCOSWARM_* variable the Dockerfile
and compose file set is a real setting; the Dockerfile runs as a non-root user with a state
volume and a healthcheck through the control API; the systemd unit parses
(`systemd-analyze verify` where installed) with the low-priority settings; the launchd plist
parses."""

from __future__ import annotations

import configparser
import os
import plistlib
import re
import shutil
import subprocess

import pytest

from locoswarm.node.userconfig import SETTINGS, env_name

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
KNOWN_ENV = {env_name(s.name) for s in SETTINGS} | {"LOCOSWARM_CONFIG"}


def read(name: str) -> str:
    with open(os.path.join(DEPLOY, name)) as fh:
        return fh.read()


def test_the_dockerfile_runs_unprivileged_with_a_volume_a_healthcheck_and_real_settings():
    text = read("Dockerfile")
    assert re.search(r"^USER volunteer$", text, re.M)
    assert re.search(r"^VOLUME /data$", text, re.M)
    assert "HEALTHCHECK" in text and "locoswarm node status" in text
    assert re.search(r'^ENTRYPOINT \["locoswarm", "node", "join"\]$', text, re.M)
    assert set(re.findall(r"\b(LOCOSWARM_[A-Z_]+)=", text)) <= KNOWN_ENV


def test_the_compose_file_defines_three_peers_with_real_settings():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    compose = yaml.safe_load(read("docker-compose.yml"))
    assert sorted(compose["services"]) == ["peer1", "peer2", "peer3"]
    for name, service in compose["services"].items():
        assert set(service["environment"]) <= KNOWN_ENV, name
        assert service["environment"]["LOCOSWARM_DEVICE"] == "cpu"
    assert "/dns4/peer1/tcp/31337/p2p/" in compose["services"]["peer3"]["entrypoint"][2]


def test_the_systemd_unit_parses_and_steps_aside():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(read("locoswarm.service"))
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and service["Nice"] == "19" and service["CPUWeight"] == "20"
    assert service["ExecStart"].endswith("locoswarm node join")
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", os.path.join(DEPLOY, "locoswarm.service")],
                             capture_output=True, text=True, timeout=60)
        # The only complaint allowed here: the executable is not installed on this machine.
        problems = [line for line in out.stderr.splitlines() if "is not executable" not in line and line.strip()]
        assert problems == [], problems


def test_the_launchd_plist_parses_and_runs_in_the_background():
    with open(os.path.join(DEPLOY, "org.locoswarm.node.plist"), "rb") as fh:
        plist = plistlib.load(fh)
    assert plist["ProgramArguments"][-2:] == ["node", "join"]
    assert plist["ProcessType"] == "Background" and plist["Nice"] == 19
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
