"""Triton launches on the current CUDA device, so every launcher enters its inputs' device first."""

import ast
import contextlib
from pathlib import Path

import torch

import blocksieve.ops
from blocksieve.ops import _triton_utils
from blocksieve.ops._triton_utils import device_guard, on_input_device


class OnSecondGpu(torch.Tensor):
    """A CPU tensor that reports ``cuda:1`` (no GPU here): enough to see which device a guard enters."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.device("cuda", 0)), contextlib.nullcontext)
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_launcher_runs_under_its_first_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(device)
        yield

    monkeypatch.setattr(_triton_utils, "device_guard", record)

    @on_input_device
    def launcher(block: int, x: torch.Tensor, out=None) -> int:
        """A launcher."""
        return block + 1

    assert launcher(3, torch.zeros(2)) == 4 and entered == []  # CPU inputs: no guard
    assert launcher(3, torch.zeros(2).as_subclass(OnSecondGpu)) == 4
    assert entered == [torch.device("cuda", 1)]
    assert launcher(3, x=torch.zeros(2).as_subclass(OnSecondGpu)) == 4 and len(entered) == 2  # keyword tensors count too
    assert launcher.__doc__ == "A launcher." and launcher.__wrapped__ is not None


def test_every_launcher_is_guarded():
    """Each function of blocksieve/ops that launches a Triton kernel (``name[grid](...)``) is decorated with
    ``on_input_device`` or enters ``device_guard`` itself."""
    unguarded = []
    for path in sorted(Path(blocksieve.ops.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or any("jit" in ast.unparse(d) for d in node.decorator_list):
                continue
            launches = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript) for n in ast.walk(node))
            guarded = any(ast.unparse(d) == "on_input_device" for d in node.decorator_list) or "device_guard(" in ast.unparse(node)
            if launches and not guarded:
                unguarded.append(f"{path.name}:{node.name}")
    assert unguarded == []
