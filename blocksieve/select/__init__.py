"""Selection building blocks: pooling, scoring, choosing, forced sets, GQA policy, permutations."""
