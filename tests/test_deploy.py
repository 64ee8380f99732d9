"""deploy/: what can be checked without a Docker engine, a systemd user session or a Mac.
The systemd unit passes `systemd-analyze verify` with its executable where deploy/README.md
installs it, and does not restart on a configuration error, whose exit status `node join`
and `config check` give; the compose file is valid against the Compose Specification's
schema (vendored in tests/data) and builds the CPU image; every LOCOSWARM_* variable set is
a real setting; the image runs unprivileged without pausing for other GPU users; the build
context leaves out what the image does not need; the launchd plist parses."""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from locoswarm.cli.main import app
from locoswarm.node.files import read_toml
from locoswarm.node.userconfig import BY_NAME, SETTINGS, env_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
KNOWN_ENV = {env_name(s.name) for s in SETTINGS} | {"LOCOSWARM_CONFIG"}
VENV_BIN = ".local/share/locoswarm/venv/bin/locoswarm"
"""Where deploy/README.md installs the service's locoswarm, under the volunteer's home."""
PEER = "/ip4/203.0.113.5/tcp/31337/p2p/QmcJ4LBNh6gXscQq9DrrCpvLntLHJjEESStMBXQLstDs22"


def read(name: str) -> str:
    with open(os.path.join(DEPLOY, name)) as fh:
        return fh.read()


def pyproject() -> dict:
    return read_toml(os.path.join(ROOT, "pyproject.toml"), "pyproject.toml")


def unit_service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(read("locoswarm.service"))
    return unit["Service"]


def dockerfile_env() -> dict[str, str]:
    text = read("Dockerfile")
    return dict(re.findall(r"\b(LOCOSWARM_[A-Z_]+)=(\S+?)\s*(?:\\|$)", text, re.M))


def test_the_dockerfile_runs_unprivileged_with_a_volume_a_healthcheck_and_real_settings():
    text = read("Dockerfile")
    assert re.search(r"^USER volunteer$", text, re.M)
    assert re.search(r"^VOLUME /data$", text, re.M)
    assert "HEALTHCHECK" in text and "locoswarm node status" in text
    assert re.search(r'^ENTRYPOINT \["locoswarm", "node", "join"\]$', text, re.M)
    assert set(re.findall(r"\b(LOCOSWARM_[A-Z_]+)=", text)) <= KNOWN_ENV


def test_the_image_does_not_pause_for_other_gpu_users():
    # A rented GPU runs nothing of its owner's; the setting stays on by default at home.
    value = dockerfile_env()[env_name("pause_on_gpu_use")]
    assert BY_NAME["pause_on_gpu_use"].from_env(value) is False
    assert BY_NAME["pause_on_gpu_use"].default is True


def test_the_dockerfile_builds_cuda_by_default_and_pins_torch_as_the_package_does():
    text = read("Dockerfile")
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    assert args["BASE"].startswith("nvidia/cuda:") and args["TORCH_INDEX"] == "" and args["EXTRAS"] == "nvml"
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    (torch,) = [d for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    # The CPU build installs torch from its own index first: the same range, or pip replaces it.
    assert f'"{torch}"' in text


def test_the_compose_file_is_valid_compose_and_runs_three_cpu_peers_on_the_cpu_image():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a test extra) is not installed")
    compose = yaml.safe_load(read("docker-compose.yml"))
    with open(os.path.join(ROOT, "tests", "data", "compose-spec.json")) as fh:
        schema = json.load(fh)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert errors == []
    assert sorted(compose["services"]) == ["peer1", "peer2", "peer3"]
    declared = set(re.findall(r"^ARG (\w+)=", read("Dockerfile"), re.M))
    for name, service in compose["services"].items():
        assert set(service["environment"]) <= KNOWN_ENV, name
        assert service["environment"]["LOCOSWARM_DEVICE"] == "cpu"
        args = service["build"]["args"]
        assert set(args) <= declared, name
        assert not args["BASE"].startswith("nvidia/") and args["TORCH_INDEX"].endswith("/whl/cpu"), name
        assert args["EXTRAS"] == "", name
    assert "/dns4/peer1/tcp/31337/p2p/" in compose["services"]["peer3"]["entrypoint"][2]


def test_the_compose_schema_check_catches_a_broken_compose_file():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a test extra) is not installed")
    compose = yaml.safe_load(read("docker-compose.yml"))
    compose["services"]["peer1"]["restart_policy"] = "always"  # a key that is not Compose's
    with open(os.path.join(ROOT, "tests", "data", "compose-spec.json")) as fh:
        schema = json.load(fh)
    assert not jsonschema.Draft7Validator(schema).is_valid(compose)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out of the build, for patterns
    without exclusions: a pattern matches the path or a folder above it."""
    def regex(pattern: str) -> str:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        return out.replace(r"\?", "[^/]")

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(regex(p), prefix) for p in patterns for prefix in prefixes)


def test_the_build_context_leaves_out_the_history_caches_results_and_tests_but_not_the_package():
    with open(os.path.join(ROOT, ".dockerignore")) as fh:
        patterns = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # dockerignored() does not model exclusions
    for big in (".git", ".whl", ".whl-net", "bench/results/swarm.json", "tests/test_deploy.py", "docs/swarm.md",
                "node/__pycache__/daemon.cpython-311.pyc", "locoswarm.egg-info/PKG-INFO", ".pytest_cache"):
        assert dockerignored(big, patterns), big
    project = pyproject()
    needed = ["pyproject.toml", project["project"]["readme"], *project["project"]["license-files"],
              "__init__.py", "node/static/dashboard.html", "kernels/compress.ptx"]
    needed += [f"{package.removeprefix('locoswarm.').replace('.', '/')}/__init__.py"
               for package in project["tool"]["setuptools"]["packages"] if package != "locoswarm"]
    for path in needed:
        assert not dockerignored(path, patterns), path


def test_the_systemd_unit_runs_the_venv_install_at_low_priority_and_stops_on_a_configuration_error():
    service = unit_service()
    assert service["Restart"] == "on-failure" and service["Nice"] == "19" and service["CPUWeight"] == "20"
    assert service["ExecStart"] == f"%h/{VENV_BIN} node join"
    assert service["ExecCondition"] == f"%h/{VENV_BIN} config check --require-peers"
    assert service["RestartPreventExitStatus"] == "2"
    assert f"~/{os.path.dirname(os.path.dirname(VENV_BIN))}" in read("README.md")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze (systemd) is not installed")
def test_systemd_analyze_verifies_the_unit_with_locoswarm_where_the_readme_installs_it(tmp_path):
    unit = tmp_path / "locoswarm.service"
    unit.write_text(read("locoswarm.service"))

    def verify() -> subprocess.CompletedProcess:
        # %h is $HOME: a home of our own, where a stand-in for the venv's locoswarm is put.
        return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOME": str(tmp_path)})

    missing = verify()
    assert missing.returncode != 0 and f"{tmp_path}/{VENV_BIN} is not executable" in missing.stderr
    executable = tmp_path / VENV_BIN
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    out = verify()
    assert (out.returncode, out.stderr.strip()) == (0, ""), out.stderr


@pytest.fixture
def no_user_settings(monkeypatch):
    """No LOCOSWARM_* variable and an empty config file."""
    for var in [v for v in os.environ if v.startswith("LOCOSWARM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LOCOSWARM_CONFIG", os.devnull)


def test_a_configuration_error_exits_with_the_status_the_unit_does_not_restart(no_user_settings, monkeypatch,
                                                                                tmp_path):
    import locoswarm.node.daemon as daemon

    started = []
    monkeypatch.setattr(daemon, "run_daemon", lambda *a, **k: started.append(a) or 0)
    monkeypatch.setenv(env_name("fanout"), "0")
    out = CliRunner().invoke(app, ["node", "join", "--state-dir", str(tmp_path / "s")])
    assert out.exit_code == int(unit_service()["RestartPreventExitStatus"]), out.output
    assert "LOCOSWARM_FANOUT=0: must be >= 1" in out.output and started == []
    check = CliRunner().invoke(app, ["config", "check"])
    assert check.exit_code == 2 and "LOCOSWARM_FANOUT=0: must be >= 1" in check.output


def test_config_check_refuses_a_lone_swarm_only_when_peers_are_required(no_user_settings, monkeypatch):
    alone = CliRunner().invoke(app, ["config", "check", "--require-peers"])
    assert alone.exit_code == 2 and env_name("peers") in alone.output, alone.output
    assert CliRunner().invoke(app, ["config", "check"]).exit_code == 0
    monkeypatch.setenv(env_name("peers"), PEER)
    joined = CliRunner().invoke(app, ["config", "check", "--require-peers"])
    assert joined.exit_code == 0 and "joins through 1 peer" in joined.output, joined.output


def test_the_launchd_plist_runs_the_venv_install_in_the_background():
    with open(os.path.join(DEPLOY, "org.locoswarm.node.plist"), "rb") as fh:
        plist = plistlib.load(fh)
    assert plist["ProgramArguments"][0].endswith("/Library/Application Support/locoswarm/venv/bin/locoswarm")
    assert plist["ProgramArguments"][1:] == ["node", "join"]
    assert plist["ProcessType"] == "Background" and plist["Nice"] == 19
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == int(unit_service()["RestartSec"])


def test_the_windows_task_runs_the_wsl_venv_install_at_logon_below_normal_priority_after_the_settings_check():
    """deploy/locoswarm-wsl-task.xml: Task Scheduler's schema's elements where Windows reads
    them, the command WSL runs (the venv of deploy/README.md section 1, `config check
    --require-peers` first, as the systemd unit's ExecCondition), no time limit."""
    import shlex
    import xml.etree.ElementTree as ET

    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    task = ET.parse(os.path.join(DEPLOY, "locoswarm-wsl-task.xml")).getroot()
    assert task.tag == f"{{{ns['t']}}}Task" and task.get("version") == "1.2"
    assert task.find("t:Triggers/t:LogonTrigger/t:Enabled", ns).text == "true"
    settings = task.find("t:Settings", ns)
    assert settings.find("t:ExecutionTimeLimit", ns).text == "PT0S"
    assert int(settings.find("t:Priority", ns).text) >= 7, "below normal, or lower"
    assert settings.find("t:MultipleInstancesPolicy", ns).text == "IgnoreNew"
    assert task.find("t:Principals/t:Principal/t:RunLevel", ns).text == "LeastPrivilege"
    assert task.find("t:Actions/t:Exec/t:Command", ns).text == "wsl.exe"
    argv = shlex.split(task.find("t:Actions/t:Exec/t:Arguments", ns).text)
    assert argv[:3] == ["--exec", "bash", "-lc"] and len(argv) == 4
    check, join = argv[3].split(" && ")
    venv = "~/.local/share/locoswarm/venv/bin/locoswarm"
    assert shlex.split(check) == [venv, "config", "check", "--require-peers"]
    assert shlex.split(join) == ["exec", venv, "node", "join"]


def test_the_native_windows_task_runs_the_venv_install_on_py_libp2p_at_logon_after_the_settings_check():
    """deploy/locoswarm-task.xml: the native peer's task (docs/windows.md) has the WSL task's
    trigger, priority, principal and limits, and runs the venv's `config check
    --require-peers`, then `node join` (py-libp2p, where hivemind is not installed), through
    cmd.exe so that the second runs only when the first exits 0."""
    import xml.etree.ElementTree as ET

    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    native = ET.parse(os.path.join(DEPLOY, "locoswarm-task.xml")).getroot()
    wsl = ET.parse(os.path.join(DEPLOY, "locoswarm-wsl-task.xml")).getroot()
    for path in ("t:Triggers/t:LogonTrigger/t:Enabled", "t:Settings/t:ExecutionTimeLimit", "t:Settings/t:Priority",
                 "t:Settings/t:MultipleInstancesPolicy", "t:Principals/t:Principal/t:RunLevel",
                 "t:Settings/t:RestartOnFailure/t:Interval", "t:Settings/t:DisallowStartIfOnBatteries"):
        assert native.find(path, ns).text == wsl.find(path, ns).text, path
    assert native.find("t:Actions/t:Exec/t:Command", ns).text == "cmd.exe"
    arguments = native.find("t:Actions/t:Exec/t:Arguments", ns).text
    assert arguments.startswith('/d /c "') and arguments.endswith('"'), arguments
    check, join = arguments[len('/d /c "'):-1].split(" && ")
    exe = "%LOCALAPPDATA%\\locoswarm\\venv\\Scripts\\locoswarm.exe"
    assert check.split(" ") == [exe, "config", "check", "--require-peers"], check
    assert join.split(" ") == [exe, "node", "join"], join

