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
(``numrnn.runtime.sync`` layout), the block output buffers the workers
share (:func:`codegen.targets.cpu_split.block_buffers`) and ``workspaces``
(a row per worker, :func:`shared_buffers`); then the job loop's ``ctl``,
``box`` and ``role`` (:func:`codegen.targets.cpu_split.job_loop`).
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


def shared_buffers(spec: StackSpec, workspaces: list[Workspace]) -> list[tuple[str, str]]:
    """``(name, allocation expression in T, T_out, B)`` of every buffer the two workers share, in argument order.

    The blocks' outputs, then ``workspaces``: a row per worker, which carves
    its layers' projections and sequences from its own row as the unsplit
    kernel does from ``ws`` (``workspaces`` holds each direction's sizes
    once the kernel is emitted). New arrays there cost bidir_masked (B8:
    1.6 MiB projections) a page fault per page and call, where malloc served
    them from a fresh mapping: 5.3-5.6 ms a call, against 4.3-4.6 ms with
    malloc told to keep its memory.
    """
    blocks = [buffer for bi in range(len(spec.blocks)) for buffer in block_buffers(spec, bi)]
    return [*blocks, ("workspaces", allocation(f"({WORKERS}, {_row_elements(spec, workspaces)})", spec.dtype))]


def _row_elements(spec: StackSpec, workspaces: list[Workspace]) -> str:
    """Elements of one worker's row of ``workspaces``, in ``T``, ``T_out`` and ``B``: the larger direction's, rounded
    up to a cache line so that each row starts on one of its own."""
    line = ALIGNMENT // ITEMSIZE[spec.dtype]
    sizes = ", ".join(workspace.size_expression() for workspace in workspaces)
    return f"-(-max({sizes}) // {line}) * {line}"


def emit_dirsplit_module_body(em: Emitter, spec: StackSpec) -> None:
    """The layer functions (the unsplit kernel's), ``shared_buffers`` and the kernel of a direction-split spec."""
    layers = layers_of(spec)
    emit_each_layer(em, spec, layers, _emit_layer_function)
    workspaces, kernel = [Workspace(spec) for _ in range(WORKERS)], Emitter()
    _emit_kernel(kernel, spec, layers, workspaces)  # first: the workspaces' sizes are known once it is written
    emit_shared_buffers_function(em, shared_buffers(spec, workspaces))
    emit_partner_tag(em, spec)
    em.extend(kernel)


def _emit_barrier(em: Emitter) -> None:
    em("epoch += 1", f"barrier(flags, me, {WORKERS}, epoch)")


def _emit_kernel(em: Emitter, spec: StackSpec, layers: list[Layer], workspaces: list[Workspace]) -> None:
    """The kernel; direction ``di``'s layers carve their buffers with ``workspaces[di]``, which adds up their sizes."""
    # The arguments' names do not depend on the workspaces' sizes.
    with job_loop(em, spec, kernel_arguments(spec, shared_buffers(spec, workspaces)), WORKERS,
                  "Worker ``me`` of the call: direction ``me`` of every block, in step with the other worker."):
        em("T = x.shape[0]", "B = x.shape[1]", "T_out = y.shape[0]", "inp = x", "epoch = flags[GENERATION]",
           "ws = workspaces[me]")
        workspaces[0].emit_start(em)  # the same for every direction: the projection and gather regions
        body = Emitter()  # written first: the check below needs every buffer's size
        for bi, block in enumerate(spec.blocks):
            last_block = bi == len(spec.blocks) - 1
            body(f"# block {bi}")
            body(f"dest = dest{bi}" if _needs_merge(block) or not last_block else "dest = y")
            for di, direction in enumerate(block.directions):
                with body.block(f"if me == {di}:  # direction {di} ({direction.reverse})"):
                    body("src = inp")
                    emit_chain_calls(body, spec, chain_of(layers, bi, di),
                                     partial(emit_layer_call, buffers=workspaces[di]))
            _emit_barrier(body)
            if _needs_merge(block):
                _emit_merge(body, block, "y" if last_block else f"merged{bi}")
                if not last_block:
                    _emit_barrier(body)
                    body(f"inp = merged{bi}")
            elif not last_block:
                body("inp = dest")
        with em.block(f"if workspaces.shape[1] < {_row_elements(spec, workspaces)}:"):
            em('raise ValueError("workspaces: smaller than the module\'s shared_buffers(T, T_out, B) make it")')
        em.extend(body)


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
