"""CPU target, direction split: one call of a bidirectional stack run by two threads, one per direction.

The two directions of a bidirectional block share nothing until the block's
output: each reads the block's input and writes its own columns of the
output. Worker ``me`` runs direction ``me`` of every block over all rows,
with the unsplit kernel's layer functions (so masking, reversal, multi-cell
directions and the loop modes are exactly theirs), and the workers meet at a
barrier (``numrnn.runtime.sync.barrier``) once per block: the next block reads
both directions' columns. A merging block is merged after that barrier, each
worker its half of the time rows, and, unless it is the last block, a second
barrier lets the merge finish before the next block reads it.

Compared with the batch split, each worker's per-step product covers all rows
(twice the rows per pass over the cache-resident recurrent weights), and
with one row it is the only split there is for a small matrix. Compared with
the unit split there is no barrier per step.

Kernel signature: the unsplit kernel's, then ``me`` (0 or 1), ``flags``
(``numrnn.runtime.sync`` layout) and the block output buffers the workers
share (:func:`codegen.targets.cpu_split.block_buffers`); then the job loop's
``ctl``, ``box`` and ``role`` (:func:`codegen.targets.cpu_split.job_loop`).
"""

from __future__ import annotations

from functools import partial

from codegen.cells import ALIGNMENT
from codegen.cells.common import ITEMSIZE
from codegen.emit import Emitter
from codegen.spec import StackSpec
from codegen.targets.cpu import (
    Layer,
    Workspace,
    _emit_layer_function,
    _needs_merge,
    chain_of,
    emit_chain_calls,
    emit_each_layer,
    emit_layer_call,
    layers_of,
    merge_expression,
)
from codegen.targets.cpu_split import (
    allocation,
    block_buffers,
    emit_partner_tag,
    emit_shared_buffers_function,
    job_loop,
    kernel_arguments,
)

#: Threads of a direction-split call: one per direction.
WORKERS = 2


def shared_buffers(spec: StackSpec, workspace: Workspace) -> list[tuple[str, str]]:
    """``(name, allocation expression in T, T_out, B)`` of every buffer the two workers share, in argument order.

    The blocks' outputs, then ``workspaces``: a row per worker, which carves
    its layers' projections and sequences from its own row as the unsplit
    kernel does from ``ws`` (``workspace`` holds their sizes once the kernel
    is emitted). New arrays there cost bidir_masked (B8: 1.6 MiB projections)
    a page fault per page and call, where malloc served them from a fresh
    mapping: 5.3-5.6 ms a call, against 4.3-4.6 ms with malloc told to keep
    its memory.
    """
    blocks = [buffer for bi in range(len(spec.blocks)) for buffer in block_buffers(spec, bi)]
    line = ALIGNMENT // ITEMSIZE[spec.dtype]  # each row on a cache line of its own
    row = f"-(-({workspace.size_expression()}) // {line}) * {line}"
    return [*blocks, ("workspaces", allocation(f"({WORKERS}, {row})", spec.dtype))]


def emit_dirsplit_module_body(em: Emitter, spec: StackSpec) -> None:
    """The layer functions (the unsplit kernel's), ``shared_buffers`` and the kernel of a direction-split spec."""
    layers = layers_of(spec)
    emit_each_layer(em, spec, layers, _emit_layer_function)
    workspace, kernel = Workspace(spec), Emitter()
    _emit_kernel(kernel, spec, layers, workspace)  # first: the workspace's size is known once it is written
    emit_shared_buffers_function(em, shared_buffers(spec, workspace))
    emit_partner_tag(em, spec)
    em.extend(kernel)


def _emit_barrier(em: Emitter) -> None:
    em("epoch += 1", f"barrier(flags, me, {WORKERS}, epoch)")


def _emit_kernel(em: Emitter, spec: StackSpec, layers: list[Layer], workspace: Workspace) -> None:
    # The arguments' names do not depend on the workspace's size, which the layer calls below add up.
    with job_loop(em, spec, kernel_arguments(spec, shared_buffers(spec, workspace)), WORKERS,
                  "Worker ``me`` of the call: direction ``me`` of every block, in step with the other worker."):
        em("T = x.shape[0]", "B = x.shape[1]", "T_out = y.shape[0]", "inp = x", "epoch = flags[GENERATION]",
           "ws = workspaces[me]")
        workspace.emit_start(em)
        for bi, block in enumerate(spec.blocks):
            last_block = bi == len(spec.blocks) - 1
            em(f"# block {bi}")
            em(f"dest = dest{bi}" if _needs_merge(block) or not last_block else "dest = y")
            for di, direction in enumerate(block.directions):
                with em.block(f"if me == {di}:  # direction {di} ({direction.reverse})"):
                    em("src = inp")
                    emit_chain_calls(em, spec, chain_of(layers, bi, di), partial(emit_layer_call, buffers=workspace))
            _emit_barrier(em)
            if _needs_merge(block):
                _emit_merge(em, block, "y" if last_block else f"merged{bi}")
                if not last_block:
                    _emit_barrier(em)
                    em(f"inp = merged{bi}")
            elif not last_block:
                em("inp = dest")


def _emit_merge(em: Emitter, block, target: str) -> None:
    """Merge both directions' columns into ``target``, this worker's half of its time rows."""
    w = block.directions[0].output_size
    fw, bw = "dest[t, b, j]", f"dest[t, b, {w} + j]"
    expr = merge_expression(block.merge, fw, bw)
    em(f"rows = {target}.shape[0]")
    with em.block(f"for t in range(me * rows // {WORKERS}, (me + 1) * rows // {WORKERS}):"):
        with em.block("for b in range(B):"):
            with em.block(f"for j in range({w}):"):
                em(f"{target}[t, b, j] = {expr}")
