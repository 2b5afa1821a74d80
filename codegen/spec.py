"""The stack spec: everything that changes the generated code, and nothing else.

A spec is a tree of frozen dataclasses, so it is hashable (it keys the kernel
cache) and round-trips through JSON (it is the serializable config).

    StackSpec
      blocks: BlockSpec ...        run one after the other; block k+1 reads block k's output
        directions: DirectionSpec  one (unidirectional) or two (forward, backward)
          cells: CellSpec ...      a stack of cells run in that direction, Keras-style
        merge                      how a bidirectional block combines its directions

All three facades lower to this one structure:

- Keras ``RNN(cells)``: one block, one direction of several cells.
- Keras ``Bidirectional(RNN(cells))``: one block, two directions of several cells.
- TF1 ``bidirectional_dynamic_rnn``: one block, two directions, ``reverse="valid"``.
- PyTorch ``nn.LSTM(num_layers=L, bidirectional=True)``: L blocks of two one-cell directions.

Weights are not in the spec. Their canonical ("logical") layout is Keras's, see
:func:`CellSpec.weight_shapes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

#: Bump whenever the generated source changes for an unchanged spec, and whenever
#: ``numrnn.runtime.sync`` changes: numba compiles the barrier and the job hand-off into the
#: cached machine code of the split kernels and does not notice when they change.
CODEGEN_VERSION = 50

ACTIVATIONS = ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear")
CELL_KINDS = ("simple", "lstm", "gru")
MASKINGS = ("none", "carry", "zero", "lengths")
REVERSALS = ("none", "full", "valid")
MERGES = ("concat", "sum", "mul", "ave", None)
DTYPES = ("float32", "float64")
#: The CUDA target (codegen/targets/cuda.py in the design) is not written yet.
TARGETS = ("cpu",)

#: Full static unroll emits straight-line code per step; compile time grows
#: linearly with T, so longer sequences must use the loop.
UNROLL_CEILING = 256

#: Partial unroll inlines the step body ``unroll_steps + 1`` times per layer
#: (the unrolled loop and its remainder loop); each copy costs compile time
#: (about 0.2 s per copy and layer for GRU(120)), so ``unroll_steps`` is capped.
UNROLL_STEPS_CEILING = 32

#: Most threads one kernel call's hidden units can be split over (``StackSpec.unit_split``).
UNIT_SPLIT_CEILING = 64

_GATES = {"simple": 1, "lstm": 4, "gru": 3}


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"{owner}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )


def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class CellSpec:
    """One recurrent cell.

    ``kind`` is ``"simple"``, ``"lstm"`` or ``"gru"``. ``forget_bias`` (TF1) is
    added to the forget gate pre-activation at run time; ``peephole``,
    ``cell_clip`` and ``proj_units`` are LSTM-only (TF1 ``LSTMCell``,
    PyTorch ``proj_size``). ``reset_after`` is GRU-only.
    """

    kind: str
    units: int
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    use_bias: bool = True
    reset_after: bool = True
    peephole: bool = False
    cell_clip: float | None = None
    proj_units: int | None = None
    forget_bias: float = 0.0

    def __post_init__(self):
        owner = f"CellSpec({self.kind!r}, {self.units!r})"
        _check_choice(owner, "kind", self.kind, CELL_KINDS)
        _check_positive_int(owner, "units", self.units)
        _check_choice(owner, "activation", self.activation, ACTIVATIONS)
        _check_choice(owner, "recurrent_activation", self.recurrent_activation, ACTIVATIONS)
        lstm_only = {
            "peephole": self.peephole,
            "cell_clip": self.cell_clip is not None,
            "proj_units": self.proj_units is not None,
            "forget_bias": self.forget_bias != 0.0,
        }
        for name, used in lstm_only.items():
            if used and self.kind != "lstm":
                raise ValueError(f"{owner}: {name} is only supported by LSTM cells")
        if self.proj_units is not None:
            _check_positive_int(owner, "proj_units", self.proj_units)
        if self.cell_clip is not None and not (self.cell_clip > 0 and math.isfinite(self.cell_clip)):
            raise ValueError(f"{owner}: cell_clip must be a positive finite number; got {self.cell_clip!r}")
        if not math.isfinite(self.forget_bias):
            raise ValueError(f"{owner}: forget_bias must be finite; got {self.forget_bias!r}")

    @property
    def gates(self) -> int:
        """Number of gate blocks in the kernels (1, 4 or 3)."""
        return _GATES[self.kind]

    @property
    def output_size(self) -> int:
        """Width of the cell's output (and of its ``h`` state)."""
        return self.proj_units or self.units

    @property
    def state_names(self) -> tuple[str, ...]:
        """State arrays in Keras order: ``("h",)`` or ``("h", "c")`` for LSTM."""
        return ("h", "c") if self.kind == "lstm" else ("h",)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Width of each state in :attr:`state_names`."""
        return (self.output_size, self.units) if self.kind == "lstm" else (self.units,)

    @property
    def has_recurrent_bias(self) -> bool:
        """GRU with ``reset_after`` keeps a separate bias inside ``r * (h U + b_r)``."""
        return self.kind == "gru" and self.reset_after and self.use_bias

    def weight_shapes(self, input_size: int) -> dict[str, tuple[int, ...]]:
        """Logical weights in Keras layout and gate order (LSTM i,f,c,o; GRU z,r,h).

        ``kernel`` (in, G*units), ``recurrent_kernel`` (output_size, G*units),
        ``bias`` (G*units,), ``recurrent_bias`` (G*units,) for GRU reset_after,
        ``peephole`` (3, units) rows i, f, o, ``projection`` (units, proj_units).
        """
        gu = self.gates * self.units
        shapes = {"kernel": (input_size, gu), "recurrent_kernel": (self.output_size, gu)}
        if self.use_bias:
            shapes["bias"] = (gu,)
        if self.has_recurrent_bias:
            shapes["recurrent_bias"] = (gu,)
        if self.peephole:
            shapes["peephole"] = (3, self.units)
        if self.proj_units is not None:
            shapes["projection"] = (self.units, self.proj_units)
        return shapes

    def short_name(self) -> str:
        """Readable name fragment, e.g. ``lstm64`` or ``gru128``."""
        return f"{self.kind}{self.units}" + (f"p{self.proj_units}" if self.proj_units else "")


@dataclass(frozen=True)
class DirectionSpec:
    """A stack of cells run over time in one direction.

    ``reverse``: ``"none"`` (forward), ``"full"`` (backward over the whole
    padded axis, Keras ``go_backwards``) or ``"valid"`` (backward over each
    sequence's valid prefix, TF1 ``reverse_sequence`` / PyTorch packed).
    Outputs are always stored aligned with the input time axis.
    """

    cells: tuple[CellSpec, ...]
    reverse: str = "none"

    def __post_init__(self):
        if isinstance(self.cells, list):
            object.__setattr__(self, "cells", tuple(self.cells))
        if not self.cells:
            raise ValueError("DirectionSpec: cells must hold at least one CellSpec")
        for cell in self.cells:
            if not isinstance(cell, CellSpec):
                raise TypeError(f"DirectionSpec: cells must be CellSpec objects; got {cell!r}")
        _check_choice("DirectionSpec", "reverse", self.reverse, REVERSALS)

    @property
    def output_size(self) -> int:
        """Width of the last cell's output."""
        return self.cells[-1].output_size


@dataclass(frozen=True)
class BlockSpec:
    """One or two directions over the same input, merged (``merge`` of Keras ``Bidirectional``).

    ``merge=None`` keeps both directions' outputs (side by side in the kernel's
    output; the facade splits them) and is only allowed on the last block.
    """

    directions: tuple[DirectionSpec, ...]
    merge: str | None = "concat"

    def __post_init__(self):
        if isinstance(self.directions, list):
            object.__setattr__(self, "directions", tuple(self.directions))
        if len(self.directions) not in (1, 2):
            raise ValueError(f"BlockSpec: directions must hold 1 or 2 DirectionSpec; got {len(self.directions)}")
        _check_choice("BlockSpec", "merge", self.merge, MERGES)
        if len(self.directions) == 2:
            sizes = {d.output_size for d in self.directions}
            if self.merge in ("sum", "mul", "ave") and len(sizes) != 1:
                raise ValueError(f"BlockSpec: merge {self.merge!r} needs equal output sizes; got {sorted(sizes)}")

    @property
    def output_size(self) -> int:
        """Width of the block's merged output."""
        sizes = [d.output_size for d in self.directions]
        if len(sizes) == 1 or self.merge in ("sum", "mul", "ave"):
            return sizes[0]
        return sum(sizes)


@dataclass(frozen=True)
class StackSpec:
    """A whole network: blocks, input size, dtype, masking, outputs, loop mode and target.

    ``masking``: ``"none"``; ``"carry"`` (Keras mask: states keep their value,
    output repeats the previous one); ``"zero"`` (Keras
    ``zero_output_for_mask``: output zero on masked steps); ``"lengths"``
    (per-sequence lengths: zero output past the length, state carried through).
    ``unroll``: ``None`` for the dynamic time loop, or the fixed sequence length
    to unroll statically (at most :data:`UNROLL_CEILING`).
    ``unroll_steps``: time steps per iteration of the dynamic loop (partial
    unroll, any sequence length; the remainder runs in a plain loop). ``1`` is
    the plain loop; more than 1 needs ``unroll=None`` and at most
    :data:`UNROLL_STEPS_CEILING`.
    ``unit_split``: threads that share one call, each computing a slice of
    every layer's hidden units and exchanging ``h`` with the others after every
    time step (the runtime's schedule for small batches; ``1``: no split).
    Needs the plain dynamic loop, and unit counts (and LSTM projections)
    divisible by it.
    ``direction_split``: two threads share one call, each running one
    direction of every bidirectional block over all rows; they meet at a
    barrier after each block (the runtime's schedule for small batches of
    bidirectional stacks). Needs two directions in every block; excludes
    ``unit_split``.
    """

    blocks: tuple[BlockSpec, ...]
    input_size: int
    dtype: str = "float32"
    masking: str = "none"
    return_sequences: bool = True
    unroll: int | None = None
    unroll_steps: int = 1
    target: str = "cpu"
    unit_split: int = 1
    direction_split: bool = False

    def __post_init__(self):
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise ValueError("StackSpec: blocks must hold at least one BlockSpec")
        _check_positive_int("StackSpec", "input_size", self.input_size)
        _check_choice("StackSpec", "dtype", self.dtype, DTYPES)
        _check_choice("StackSpec", "masking", self.masking, MASKINGS)
        _check_choice("StackSpec", "target", self.target, TARGETS)
        if self.unroll is not None:
            _check_positive_int("StackSpec", "unroll", self.unroll)
            if self.unroll > UNROLL_CEILING:
                raise ValueError(
                    f"StackSpec: unroll={self.unroll} exceeds the static unroll ceiling of "
                    f"{UNROLL_CEILING} time steps; use the dynamic loop (unroll=None) for longer sequences"
                )
        _check_positive_int("StackSpec", "unroll_steps", self.unroll_steps)
        if self.unroll_steps > UNROLL_STEPS_CEILING:
            raise ValueError(
                f"StackSpec: unroll_steps={self.unroll_steps} exceeds the partial unroll ceiling of "
                f"{UNROLL_STEPS_CEILING} steps per loop iteration"
            )
        if self.unroll is not None and self.unroll_steps != 1:
            raise ValueError(
                f"StackSpec: unroll={self.unroll} (full static unroll) and unroll_steps={self.unroll_steps} "
                "(partial unroll of the dynamic loop) exclude each other; set one of them"
            )
        self._check_unit_split()
        self._check_direction_split()
        for block in self.blocks[:-1]:
            if block.merge is None and len(block.directions) == 2:
                raise ValueError("StackSpec: merge=None is only allowed on the last block")
        for block in self.blocks:
            for direction in block.directions:
                if direction.reverse == "valid" and self.masking != "lengths":
                    raise ValueError(
                        'StackSpec: reverse="valid" needs masking="lengths" (it reverses each valid prefix)'
                    )

    def _check_unit_split(self) -> None:
        n = self.unit_split
        _check_positive_int("StackSpec", "unit_split", n)
        if n == 1:
            return
        if n > UNIT_SPLIT_CEILING:
            raise ValueError(f"StackSpec: unit_split={n} exceeds the ceiling of {UNIT_SPLIT_CEILING} threads")
        blocker = self.unit_split_blocker(n)
        if blocker is not None:
            raise ValueError(f"StackSpec: unit_split={n} is impossible: {blocker}")

    def _check_direction_split(self) -> None:
        if not isinstance(self.direction_split, bool):
            raise TypeError(f"StackSpec: direction_split must be a bool; got {self.direction_split!r}")
        if not self.direction_split:
            return
        if self.unit_split != 1:
            raise ValueError(f"StackSpec: direction_split and unit_split={self.unit_split} exclude each other")
        blocker = self.direction_split_blocker()
        if blocker is not None:
            raise ValueError(f"StackSpec: direction_split is impossible: {blocker}")

    def direction_split_blocker(self) -> str | None:
        """Why this stack's directions cannot run on two threads, or ``None`` when they can."""
        for bi, block in enumerate(self.blocks):
            if len(block.directions) != 2:
                return f"block {bi} has one direction (the direction split needs every block bidirectional)"
        return None

    def unit_split_blocker(self, workers: int) -> str | None:
        """Why this stack's units cannot be split over ``workers`` threads, or ``None`` when they can."""
        if self.unroll is not None or self.unroll_steps != 1:
            return "the unit split needs the plain dynamic loop (unroll=None, unroll_steps=1)"
        for cell in self.cells:
            for count, name in ((cell.units, "units"), (cell.output_size, "projected outputs")):
                if count % workers:
                    return (f"{cell.short_name()}: {workers} threads must divide the {name} of every cell, "
                            f"and it has {count}")
        return None

    @property
    def cells(self) -> tuple[CellSpec, ...]:
        """Every cell, block by block, direction by direction (the weight order)."""
        return tuple(c for b in self.blocks for d in b.directions for c in d.cells)

    @property
    def output_size(self) -> int:
        """Width of the kernel's output (both directions side by side for ``merge=None``)."""
        return self.blocks[-1].output_size

    def input_sizes(self) -> list[int]:
        """Input width of every cell, in :attr:`cells` order."""
        sizes, width = [], self.input_size
        for block in self.blocks:
            for direction in block.directions:
                cell_in = width
                for cell in direction.cells:
                    sizes.append(cell_in)
                    cell_in = cell.output_size
            width = block.output_size
        return sizes

    # -- serialization -------------------------------------------------
    def to_dict(self) -> dict:
        """Plain nested dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; equal specs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> StackSpec:
        """Inverse of :meth:`to_dict`."""
        blocks = tuple(
            BlockSpec(
                directions=tuple(
                    DirectionSpec(cells=tuple(CellSpec(**c) for c in d["cells"]), reverse=d["reverse"])
                    for d in b["directions"]
                ),
                merge=b["merge"],
            )
            for b in data["blocks"]
        )
        rest = {k: v for k, v in data.items() if k != "blocks"}
        return cls(blocks=blocks, **rest)

    @classmethod
    def from_json(cls, text: str) -> StackSpec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def cache_key(self) -> str:
        """Versioned hash of the spec: it names the generated module on disk."""
        payload = f"{CODEGEN_VERSION}:{self.to_json()}".encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def kernel_name(self) -> str:
        """Deterministic, readable kernel name, e.g. ``gru120x3_fwd_none_dyn`` (``_partial4``, ``_unroll32``)."""
        parts = []
        for block in self.blocks:
            for direction in block.directions:
                names = [c.short_name() for c in direction.cells]
                run = names[0] + (f"x{len(names)}" if len(set(names)) == 1 and len(names) > 1 else "")
                if len(set(names)) > 1:
                    run = "_".join(names)
                parts.append(run + {"none": "_fwd", "full": "_bwd", "valid": "_rev"}[direction.reverse])
        if self.unroll is not None:
            mode = f"unroll{self.unroll}"
        else:
            mode = "dyn" if self.unroll_steps == 1 else f"partial{self.unroll_steps}"
        split = [f"split{self.unit_split}"] if self.unit_split > 1 else []
        split += ["dirsplit"] if self.direction_split else []
        return "_".join(parts + [self.masking, mode] + split)


def simple_stack(
    cells,
    input_size: int,
    *,
    reverse: str = "none",
    **stack_kwargs,
) -> StackSpec:
    """A one-block, one-direction stack of ``cells`` (the Keras ``RNN(cells)`` shape)."""
    block = BlockSpec(directions=(DirectionSpec(cells=tuple(cells), reverse=reverse),))
    return StackSpec(blocks=(block,), input_size=input_size, **stack_kwargs)
