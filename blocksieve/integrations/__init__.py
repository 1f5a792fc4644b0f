"""Framework integrations. Import the submodule you need; each registers itself on import.

- :mod:`blocksieve.integrations.transformers`: ``attn_implementation="blocksieve"`` and ``sparsify(model, ...)``.
"""
