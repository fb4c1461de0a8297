"""How to lower: an exported program to an ExecuTorch program, for one backend recipe.

* ``portable``: ExecuTorch's reference kernels, every operator in the program itself.
* ``xnnpack``: everything XNNPACK can run is delegated to it (the dynamically quantized linears
  and the floating-point operators around them, in one pass); what stays outside runs on
  portable kernels:
  the KV-cache update and attention (ExecuTorch's ``llama::`` custom ops), the embedding
  gathers, and index/shape bookkeeping (``--verbose`` lists them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import types
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

from . import lowering_shortcuts, program_file
from .progress import UserError, log, raise_dropped_interrupt


def partitioners(backend: str) -> list:
    """The partitioners of a delegating backend (``portable`` has none: lower() takes to_edge)."""
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # One partitioner for the dynamically quantized linears and the floating-point rest, not
        # ExecuTorch's usual two in a row: each partitioner costs a full re-decomposition of the
        # program, and one pass makes half the delegate subgraphs (4-layer tiny kv program:
        # 150 -> 77) with bit-identical logits.
        return [XnnpackPartitioner()]
    raise ValueError(f"unknown backend {backend!r}")


def _xnnpack_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # The same arithmetic as Gemma3nRMSNorm._norm, in the forms XNNPACK takes: its mean kernel wants
    # a 4-D input reduced over dims (2, 3) with keepdim, and its power kernel only squares. Written
    # Hugging Face's way, every norm (8 per layer) stays outside the delegate and splits it.
    width = hidden_states.shape[-1]
    squares = (hidden_states * hidden_states).reshape(1, -1, 1, width)
    mean_squared = squares.mean(dim=(2, 3), keepdim=True).reshape(*hidden_states.shape[:-1], 1)
    return hidden_states * torch.rsqrt(mean_squared + self.eps)


def _xnnpack_altup_correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
    # Gemma3nTextAltUp.correct with the innovation [batch, tokens, width] broadcast against the
    # coefficients [streams, batch, tokens, 1] instead of repeated per stream: the same products and
    # sums, but XNNPACK has no repeat, so Hugging Face's form leaves a copy outside the delegate in
    # every layer (about 5% of prefill).
    modalities = self.compute_router_modalities(activated)
    innovation = activated - predictions[self.config.altup_active_idx]
    all_coefs = (self.correction_coefs(modalities) + 1.0).permute(2, 0, 1).unsqueeze(-1)
    return (innovation * all_coefs + predictions).type_as(activated)


def _xnnpack_altup_predict(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Gemma3nTextAltUp.predict with its batched matmul ([batch, tokens] batches of [width, streams]
    # x [streams, streams]) written as the bmm it is: torch.matmul decomposes into an expand, which
    # XNNPACK does not take, so Hugging Face's form leaves a copy outside the delegate in every
    # layer (4.4% of a 2-layer program's prefill).
    streams, width = self.config.altup_num_inputs, hidden_states.shape[-1]
    modalities = self.compute_router_modalities(hidden_states[self.config.altup_active_idx])
    all_coefs = self.prediction_coefs(modalities).reshape(-1, streams, streams).transpose(1, 2)
    per_position = hidden_states.permute(1, 2, 3, 0).reshape(-1, width, streams)
    predictions = torch.bmm(per_position, all_coefs).reshape(*hidden_states.shape[1:], streams)
    return (predictions.permute(3, 0, 1, 2) + hidden_states).type_as(hidden_states)


def prepare_for_backend(module: torch.nn.Module, backend: str) -> None:
    """Source transforms a backend needs, applied to this module's instances only."""
    if backend != "xnnpack":
        return
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm, Gemma3nTextAltUp

    for child in module.modules():
        if isinstance(child, Gemma3nRMSNorm):
            child._norm = types.MethodType(_xnnpack_rms_norm, child)
        elif isinstance(child, Gemma3nTextAltUp):
            child.correct = types.MethodType(_xnnpack_altup_correct, child)
            child.predict = types.MethodType(_xnnpack_altup_predict, child)


def infer_token_dimension_of_reshapes(graph_module: torch.fx.GraphModule):
    """Writes each reshape whose only symbolic dimension is the token count with -1 there instead.

    The same reshape (-1 stands for what the element count leaves, which is exactly that
    dimension), but XNNPACK only takes a reshape whose target is integers and at most one -1:
    Hugging Face's ``view(*input_shape, -1, head_dim)`` names the token count, so every such
    view stayed outside the delegates and split them.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    changed = False
    for node in graph_module.graph.nodes:
        if node.target != exir_ops.edge.aten.view_copy.default or all(isinstance(d, int) for d in node.args[1]):
            continue
        shape = node.meta["val"].shape
        symbolic = [i for i, size in enumerate(shape) if not isinstance(size, int)]
        if len(symbolic) == 1:
            node.args = (node.args[0], [-1 if i in symbolic else size for i, size in enumerate(shape)])
            changed = True
    graph_module.recompile()
    return PassResult(graph_module, changed)


def export(module: torch.nn.Module, example_inputs: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)


def lower(program: torch.export.ExportedProgram, backend: str, constant_methods: dict,
          quantized_embeddings: bool = False, verbose: bool = False, initialized_buffers: tuple = ()):
    """Edge dialect + backend delegation + ExecuTorch memory planning; returns the program and
    the delegation report: ``delegate`` then ``emit``, with the lowering shortcuts."""
    with lowering_shortcuts.enabled():
        edge, report = delegate(program, backend, constant_methods, verbose)
        return emit(edge, quantized_embeddings, initialized_buffers), report


def delegate(program, backend: str, constant_methods: dict, verbose: bool = False):
    """The edge dialect program with what ``backend`` takes delegated to it, and the delegation
    report. Once it returns, a delegating backend holds the weights it took in its own form: the
    exported program's are needed no more."""
    config = EdgeCompileConfig(_check_ir_validity=False)
    if backend == "portable":
        # to_edge_transform_and_lower functionalizes the program (run_decompositions({})) before
        # decomposing it for its partitioners; with none, to_edge's one decomposition makes the
        # same program without that extra re-trace of the whole graph.
        edge = to_edge(program, constant_methods=constant_methods, compile_config=config)
    else:
        # No run_decompositions({}) beforehand: to_edge_transform_and_lower starts with exactly
        # that, and a second one only re-traced the whole program again.
        edge = to_edge_transform_and_lower(
            program,
            transform_passes=[infer_token_dimension_of_reshapes],
            partitioner=partitioners(backend),
            compile_config=config,
            constant_methods=constant_methods,
        )
    report = delegation_report(edge.exported_program().graph_module)
    if verbose:
        for line in report["table"]:
            log(line)
    return edge, report


def largest_delegates_first(program, named_data) -> None:
    """Reorder each plan's delegates, largest weights first, and its delegate calls with them.

    The runtime initializes a plan's delegates in their order, and XNNPACK packs a delegate's
    weights into memory of its own while their source pages of the file are mapped, unmapped
    once it is done. In graph order the tied lm_head comes last (E2B: 269 MB at 4 bits), so its
    source was resident beside every other packed weight at the load's peak: 4-layer E2B-width
    phone program through the stock runner, advised, 701 MiB peak against 495 MiB after
    decoding; largest first, 624 MiB, the same after decoding. A delegate's size is the named
    weights its blob names (XNNPACK stores each as a ``named_key``)."""
    from executorch.exir.schema import DataLocation, DelegateCall

    named_sizes = {key: len(named_data.buffers[entry.buffer_index])
                   for key, entry in (named_data.pte_data.items() if named_data else ())}
    for plan in program.execution_plan:
        sizes = program_file.delegate_weight_bytes(
            [program.backend_delegate_data[d.processed.index].data if d.processed.location == DataLocation.INLINE
             else b"" for d in plan.delegates], named_sizes)
        order = sorted(range(len(sizes)), key=lambda index: (-sizes[index], index))
        position = {old: new for new, old in enumerate(order)}
        plan.delegates = [plan.delegates[index] for index in order]
        for chain in plan.chains:
            for instruction in chain.instructions:
                if isinstance(instruction.instr_args, DelegateCall):
                    instruction.instr_args.delegate_index = position[instruction.instr_args.delegate_index]


def gathered_tables_first(program) -> None:
    """Put the tables forward gathers from at the front of the constant segment, largest first.

    The constant segment starts on a page of the file (``emit`` aligns segments to
    program_file.FILE_PAGE), so the first table's rows do too, and every row padded to whole pages
    (quantize.page_row_columns) lies in the fewest pages. Gemma 3n's tables have 262144 rows, so
    each ends on a page and the next starts on one."""
    from executorch.exir.schema import KernelCall, Tensor

    def tables(plan):
        for chain in plan.chains:
            for instruction in chain.instructions:
                call = instruction.instr_args
                if isinstance(call, KernelCall) and plan.operators[call.op_index].name in program_file.GATHER_KERNELS:
                    yield plan.values[call.args[0]].val.data_buffer_idx

    forward = next(plan for plan in program.execution_plan if plan.name == "forward")
    first = sorted(set(tables(forward)), key=lambda index: -len(program.constant_buffer[index].storage))
    # Buffer 0 is the empty placeholder of tensors that are not constants; it stays first.
    order = [0] + first + [index for index in range(1, len(program.constant_buffer)) if index not in first]
    position = {old: new for new, old in enumerate(order)}
    program.constant_buffer = [program.constant_buffer[index] for index in order]
    for plan in program.execution_plan:
        for value in plan.values:
            # A mutable buffer's data_buffer_idx indexes the initial states, not the constants.
            if isinstance(value.val, Tensor) and value.val.allocation_info is None:
                value.val.data_buffer_idx = position[value.val.data_buffer_idx]


@contextlib.contextmanager
def laid_out_for_loading():
    """While the context lasts, ExecuTorch's serializer writes programs whose delegates are in
    ``largest_delegates_first`` order and whose gathered tables are ``gathered_tables_first`` (it is
    called between emission and serialization, inside ``to_executorch``, which gives no hook there)."""
    from executorch.exir.program import _program

    serialize = _program.serialize_for_executorch

    def reordered_then_serialized(emitter_output, config, data_serializer, named_data_store=None):
        largest_delegates_first(emitter_output.program, named_data_store)
        gathered_tables_first(emitter_output.program)
        return serialize(emitter_output, config, data_serializer, named_data_store)

    _program.serialize_for_executorch = reordered_then_serialized
    try:
        yield
    finally:
        _program.serialize_for_executorch = serialize


def emit(edge, quantized_embeddings: bool = False, initialized_buffers: tuple = ()):
    """ExecuTorch's memory planning and emission of a ``delegate``d program, its delegates in the
    order that loads them in the least memory, its gathered tables' rows on the fewest pages."""
    with laid_out_for_loading():
        return edge.to_executorch(
            ExecutorchBackendConfig(
                # Turns torchao's dequantize + embedding into ExecuTorch's quantized embedding kernels.
                # Only then: its constant folding would also store a transposed copy of a float lm_head.
                do_quant_fusion_and_const_prop=quantized_embeddings,
                extract_delegate_segments=True,
                # Segments on pages: the constant segment's first table and its rows (gathered_tables_first).
                segment_alignment=program_file.FILE_PAGE,
                # Mutable buffers otherwise start with whatever the runtime's memory holds.
                passes=[InitializedMutableBufferPass(list(initialized_buffers))] if initialized_buffers else [],
                # Inputs come from the caller's buffers; planning them would copy every call.
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                # Plan dynamic-shape tensors at their upper bound, not by symbolic guess.
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            )
        )


def planned_bytes(program) -> int:
    """The planned memory of a lowered program (program_file.planned_bytes)."""
    return program_file.planned_bytes(program.executorch_program)


def delegation_report(graph_module: torch.fx.GraphModule) -> dict:
    """Operator counts inside and outside the backend's delegates, in total and per operator."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    outside = Counter({op: b.non_delegated for op, b in info.delegation_by_operator.items() if b.non_delegated})
    table = [f"  delegated: {info.num_delegated_nodes} operators in {info.num_delegated_subgraphs} subgraphs; "
             f"outside: {info.num_non_delegated_nodes}"]
    table += [f"    outside {count:4d}  {op}" for op, count in outside.most_common()]
    return {"delegated": info.num_delegated_nodes, "outside": info.num_non_delegated_nodes,
            "subgraphs": info.num_delegated_subgraphs, "table": table}


def write_atomically(program, output: Path) -> int:
    """Write next to ``output`` and rename: an interrupted export never leaves a truncated file."""
    write_together({output: program.write_to_file})
    return output.stat().st_size


def write_together(files: dict[Path, Callable[[BinaryIO], None] | None]) -> None:
    """Write every file, then rename them all into place at once; a ``None`` writer removes that
    path (what an earlier export left and this one does not make). A failure, a full disk or a
    signal before the renames leaves every path as it was and no temporary behind."""
    temporaries: dict[Path, str] = {}
    current = None
    try:
        for current, write in files.items():
            if write is None:
                continue
            current.parent.mkdir(parents=True, exist_ok=True)
            handle, temporaries[current] = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".partial",
                                                            dir=current.parent)
            with os.fdopen(handle, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporaries[current], 0o666 & ~umask)  # mkstemp makes it private; the result should not be
        # The renames cannot fail for want of space; signals wait until all are done, so the
        # program never appears beside another export's tokenizer.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            raise_dropped_interrupt()
            for path, write in files.items():
                if write is None:
                    path.unlink(missing_ok=True)
                else:
                    os.replace(temporaries[path], path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    except OSError as error:
        raise UserError(f"cannot write {current}: {error.strerror or error}; free some space or choose another "
                        "--output (nothing was written)") from None
    finally:
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)
