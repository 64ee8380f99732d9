"""The command line: thin, torch-free at --help, and refusing bad settings before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from locoswarm.cli.main import app


@pytest.mark.parametrize(
    "argv",
    [["-m", "locoswarm", "--help"], ["-m", "locoswarm", "bench", "--help"], ["-m", "locoswarm", "run", "--help"],
     ["-m", "locoswarm", "node", "--help"], ["-m", "locoswarm", "node", "join", "--help"],
     ["-m", "locoswarm", "config", "--help"], ["-m", "locoswarm", "demo", "--help"],
     ["-m", "locoswarm", "doctor", "--help"]],
)
def test_help_does_not_import_torch(argv):
    code = (
        "import sys, runpy; sys.argv = ['locoswarm'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('locoswarm', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv[2:]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_console_script_help_runs(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "locoswarm")
    if not os.path.exists(exe):
        pytest.skip("console script not on this interpreter's bin dir (not pip-installed)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bench" in out.stdout


@pytest.mark.parametrize(
    ("flags", "field"),
    [(["--density", "0"], "density"), (["--bits", "3"], "bits"), (["--chunk", "1000"], "chunk"),
     (["--model", "huge"], "model"), (["--preset", "nope"], "preset")],
)
def test_bad_setting_exits_2_naming_it_and_writes_nothing(tmp_path, flags, field):
    out = tmp_path / "result.json"
    res = CliRunner().invoke(app, ["bench", "convergence", *flags, "--json", str(out)])
    assert res.exit_code == 2, res.output
    assert field in res.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bench_writes_json_with_the_documented_keys(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, [
        "bench", "convergence", "--replicas", "2", "--steps", "4", "-H", "2", "--runs", "ddp,compressed,local",
        "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    for key in ("params", "tokens", "replicas"):
        assert key in data
    for run in ("ddp", "compressed", "local"):
        for key in ("eval_loss", "gap_pct", "bytes_sent_per_replica", "reduction_vs_ddp"):
            assert key in data[run]
    assert "compressed" in res.output


def test_missing_data_folder_exits_2_naming_it_and_writes_nothing(tmp_path):
    out = tmp_path / "result.json"
    missing = tmp_path / "no-such-corpus"
    res = CliRunner().invoke(app, ["bench", "convergence", "--data", str(missing), "--json", str(out)])
    assert res.exit_code == 2, res.output
    assert "no-such-corpus" in res.output
    assert not out.exists()


def test_corpus_smaller_than_a_sequence_exits_2_and_writes_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("to be")
    out = tmp_path / "result.json"
    res = CliRunner().invoke(app, ["bench", "convergence", "--data", str(corpus), "--json", str(out)])
    assert res.exit_code == 2, res.output
    assert "smaller than" in res.output
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_bench_kernels_without_cuda_says_so_and_exits_2(tmp_path):
    out = CliRunner().invoke(app, ["bench", "kernels", "--json", str(tmp_path / "k.json")])
    assert out.exit_code == 2 and "needs a CUDA GPU" in out.output
    assert not (tmp_path / "k.json").exists()
