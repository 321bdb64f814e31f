"""fxfuse: declarative fusion passes for torch.compile, and the fused ops inference needs.

Example:
    >>> import torch, fxfuse
    >>> compiled = fxfuse.compile(model, passes=fxfuse.default_passes())
    >>> compiled(x); fxfuse.match_table()
"""

__version__ = "0.1.0"

from . import compat

compat.check_torch_version()

from .rewrite import Rewrite, RewriteError, TensorSpec  # noqa: E402
from .fusion_pass import FusionPass, FusionWarning  # noqa: E402
from .pass_manager import PassManager, compile, inductor_options  # noqa: E402
from .match_table import match_table, miss_table, reset_match_table  # noqa: E402
from .explain import Explanation, capture_post_grad_graph, capture_post_grad_graphs, explain  # noqa: E402
from . import ops  # noqa: E402,F401  (registers torch.ops.fxfuse.*)

__all__ = [
    "Rewrite", "RewriteError", "TensorSpec", "FusionPass", "FusionWarning", "PassManager",
    "compile", "inductor_options", "match_table", "miss_table", "reset_match_table",
    "explain", "Explanation", "capture_post_grad_graph", "capture_post_grad_graphs",
]

from .passes import FusionConfig, default_passes  # noqa: E402
from . import distributed  # noqa: E402,F401

__all__ += ["FusionConfig", "default_passes"]
