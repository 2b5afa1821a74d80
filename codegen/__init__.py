"""Spec -> source. Pure Python: never imports numrnn or numba."""

from codegen.spec import CODEGEN_VERSION, BlockSpec, CellSpec, DirectionSpec, StackSpec


def generate_source(spec: StackSpec) -> str:
    """Source of the module that implements ``spec`` on its target."""
    if spec.target == "cpu":
        from codegen.targets import cpu

        return cpu.generate(spec)
    raise ValueError(f"StackSpec: target {spec.target!r} has no code generator yet (available: 'cpu')")


__all__ = ["CODEGEN_VERSION", "BlockSpec", "CellSpec", "DirectionSpec", "StackSpec", "generate_source"]
