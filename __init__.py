"""locoswarm: peer-to-peer volunteer training of open models.

The repository root is this import package; its subpackages are layered
``kernels`` → ``protocol`` → ``optim`` → ``workload`` → ``node`` → ``bench`` → ``cli``
and a lower layer never imports a higher one (tests/test_layout.py checks it). Importing
``locoswarm`` itself stays cheap (no torch).
"""

__version__ = "0.1.0"
