"""hivemind without its package's own imports.

`import hivemind.p2p` runs hivemind/__init__.py first, which imports the averager, the
optimizer and mixture-of-experts code and, through them, scipy: about 0.4 s of every
daemon's and every command's start on the 2-core machine (1.8–2.3 s to import the daemon,
1.4–1.8 s without), for modules the node never uses. `defer()` puts a hivemind package in
`sys.modules` whose __init__ has not run: its subpackages import as usual, and the first
attribute asked of the package itself that is not a loaded subpackage (`hivemind.DHT`,
`from hivemind import P2P`, `hivemind.__version__`) runs the real __init__ then, so a test
or a tool that uses hivemind whole gets it whole.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

_lock = threading.Lock()


def defer() -> None:
    """Install the deferred hivemind package, unless hivemind is imported already (or absent)."""
    if "hivemind" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("hivemind")
    except (ImportError, ValueError):  # a finder that refuses it, or a module of None: as not installed
        return
    if spec is None or spec.loader is None:
        return  # not installed: the import that needs it says so
    package = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):
        loaded = sys.modules.get(f"hivemind.{name}")
        if loaded is not None:  # a subpackage being imported (`import hivemind.p2p.x as y` asks for it early)
            return loaded
        with _lock:
            if package.__dict__.get("__getattr__") is __getattr__:
                del package.__getattr__
                spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules["hivemind"] = package
