"""The README's twenty-line example runs as written, and its merge reproduces dense attention."""

import re
from pathlib import Path

import torch


def test_readme_example_runs_and_merge_is_exact(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## In twenty lines\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    q, k, v, full = scope["q"], scope["k"], scope["v"], scope["full"]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True
    )
    assert torch.allclose(full, dense, atol=1e-5)
    assert "BlockLayout(B=1, H=2" in capsys.readouterr().out
