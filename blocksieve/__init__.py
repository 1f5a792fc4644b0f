"""blocksieve: hierarchical sparse attention — select coarse to fine, then attend exactly.

Quick start::

    import blocksieve
    layout = blocksieve.method("streaming", local_tokens=512).select(q, k)
    out, lse = blocksieve.attend(q, k, v, layout, return_lse=True)
"""

from blocksieve.layout import BlockLayout, TokenLayout
from blocksieve.methods import SparseMethod, method, methods
from blocksieve.ops import attend, merge

__version__ = "0.1.0"

__all__ = ["BlockLayout", "TokenLayout", "SparseMethod", "attend", "merge", "method", "methods", "__version__"]
