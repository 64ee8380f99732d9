"""The repository root is the import package `locoswarm`, and its folders (`node`, `cli`,
`kernels`, `optim`, `protocol`, `bench`, `workload`) share names with real packages: with
the root on `sys.path` they shadow them (current `transformers` imports a package named
`kernels`). The suite must run without it, as `pytest` with `--import-mode=importlib`
does and `python -m pytest` does not."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import locoswarm

ROOT = Path(locoswarm.__file__).resolve().parent
LAYERS = ("kernels", "protocol", "optim", "workload", "node", "bench", "cli")
"""Lowest first: a package may import only those before it (and itself)."""


def _on_path(entry: str) -> bool:
    return Path(entry or os.getcwd()).resolve() == ROOT


def test_repository_root_is_not_on_sys_path_during_the_suite():
    shadowing = [entry for entry in sys.path if _on_path(entry)]
    assert not shadowing, (f"{ROOT} is on sys.path ({shadowing}): its folders shadow real packages; "
                           "run the suite with `pytest`, not `python -m pytest`")


def test_no_folder_of_ours_shadows_an_installed_package_in_a_fresh_interpreter():
    # What a user's process sees: each top-level name resolves outside the repository.
    code = ("import importlib.util, sys; "
            "print('\\n'.join(f'{n} {getattr(importlib.util.find_spec(n), \"origin\", None)}' for n in sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *LAYERS], capture_output=True, text=True, timeout=60,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        name, origin = line.split(" ", 1)
        inside = origin != "None" and Path(origin).resolve().is_relative_to(ROOT)
        assert not inside, f"{name} resolves into the repository: {origin}"


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "locoswarm" and len(parts) > 1 and parts[1] in LAYERS:
                out.add(parts[1])
    return out


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for rank, layer in enumerate(LAYERS):
        allowed = set(LAYERS[:rank + 1])
        for path in sorted((ROOT / layer).rglob("*.py")):
            bad = _imported_layers(path) - allowed
            if bad:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not wrong, "\n".join(wrong)


def test_the_daemon_imports_hiveminds_subpackages_without_its_averager_and_hivemind_whole_still_loads():
    """node/_hivemind.py: the daemon's modules import without hivemind/__init__.py's averager,
    optimizer and scipy (0.4 s of every start); the package itself, asked for anything, is
    the real one."""
    code = ("import sys; import locoswarm.node.daemon; "
            "skipped = sorted(m for m in ('scipy', 'hivemind.averaging', 'hivemind.optim', 'hivemind.moe') "
            "if m in sys.modules); "
            "import hivemind; from hivemind import DHT, Optimizer; "
            "print(skipped, hivemind.__version__, DHT.__module__, 'hivemind.averaging' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    skipped, version, dht, averaging = out.stdout.split()
    assert skipped == "[]", f"imported with the daemon: {skipped}"
    assert version.count(".") == 2 and dht == "hivemind.dht.dht" and averaging == "True"


NET = "net"
"""locoswarm.net (py-libp2p, issue 22) stands beside the layers: it may import only `protocol`
and never hivemind. py-libp2p and hivemind cannot share a process, so a layer reaches it only
where the daemon starts its network on py-libp2p (NET_ENTRY), inside the function that does,
never when a module is imported."""
NET_ENTRY = "node/network.py"


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    return {name for node in nodes
            for name in ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])}


def _is_net(name: str) -> bool:
    return name == f"locoswarm.{NET}" or name.startswith(f"locoswarm.{NET}.")


def test_net_imports_only_protocol_and_never_hivemind_and_layers_reach_it_only_where_the_daemon_starts_it():
    wrong = []
    for path in sorted((ROOT / NET).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "hivemind" or (parts[0] == "locoswarm" and len(parts) > 1 and parts[1] not in
                                          ("protocol", NET)):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    entry_imports = set()
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            if where == NET_ENTRY:
                entry_imports = {n for n in _imports(path) if _is_net(n)}
                wrong += [f"{where} imports {n} at module level" for n in _imports(path, top_level_only=True)
                          if _is_net(n)]
            else:
                wrong += [f"{where} imports {n}" for n in _imports(path) if _is_net(n)]
    assert not wrong, "\n".join(wrong)
    assert entry_imports == {"locoswarm.net.dht", "locoswarm.net.node"}, entry_imports


ROUND_MODULES = ("roundloop", "rounds", "membership", "lineage", "catchup", "pull", "tree", "treeround", "trainer",
                 "progress", "outbox", "streams", "exchange", "statedownload", "statesync", "replay", "roll",
                 "services", "runinfo", "network", "joining", "upkeep", "daemon")
"""The node's round loop and what it reaches the network through (docs/windows.md: the way to
a py-libp2p peer that trains)."""


def test_the_round_modules_import_without_hivemind_and_beside_py_libp2p():
    """A py-libp2p peer cannot share a process with hivemind's protobufs, so the round loop must
    import without loading any hivemind module: hivemind is imported where a p2pd peer calls it,
    never at import. Then py-libp2p imports beside it (where it is installed)."""
    code = ("import importlib, sys\n"
            f"for m in {ROUND_MODULES!r}: importlib.import_module('locoswarm.node.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('hivemind.')))\n"
            "try:\n    import libp2p.crypto.serialization\nexcept ImportError as e:\n    print('no libp2p:', e)\n"
            "else:\n    print('libp2p imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, libp2p = out.stdout.splitlines()[:2]
    assert loaded == "[]", f"importing the round modules loads hivemind: {loaded}"
    assert libp2p == "libp2p imported" or libp2p.startswith("no libp2p"), out.stdout
