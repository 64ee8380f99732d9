"""DiLoCo inner/outer optimization, pseudo-gradients, error-feedback compression and
aggregation. Talks to the network only through the protocol's byte formats."""

from locoswarm.optim.aggregate import aggregate, average_dense, coverage
from locoswarm.optim.compress import ErrorFeedbackCompressor, delta_spec, densify, tensor_specs
from locoswarm.optim.config import CompressionConfig, DiLoCoConfig, InnerConfig, OuterConfig
from locoswarm.optim.inner import make_inner_optimizer, pseudo_gradients, set_lr
from locoswarm.optim.outer import OuterOptimizer
from locoswarm.optim.schedule import lr_at

__all__ = [
    "CompressionConfig",
    "DiLoCoConfig",
    "ErrorFeedbackCompressor",
    "InnerConfig",
    "OuterConfig",
    "OuterOptimizer",
    "aggregate",
    "average_dense",
    "coverage",
    "delta_spec",
    "densify",
    "lr_at",
    "make_inner_optimizer",
    "pseudo_gradients",
    "set_lr",
    "tensor_specs",
]
