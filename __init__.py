"""locoswarm: peer-to-peer volunteer training of open models.

The repository root is this import package; its subpackages are layered
``kernels`` → ``protocol`` → ``optim`` → ``node`` → ``cli`` and a lower layer never
imports a higher one. Importing ``locoswarm`` itself stays cheap (no torch).
"""

__version__ = "0.1.0"
