"""Shortcuts through ExecuTorch 1.4.1's XNNPACK lowering that leave the program byte for byte the
same (tests/test_lowering_shortcuts.py), for the time and memory they save.

Where the time goes (py-spy on the trained tiny model's phone export, 12 layers, 74 delegate
subgraphs, 250 s of lowering on a quiet 2-core AMD Zen 4): every pass of the edge dialect and of
XNNPACK's preprocessing re-traces its graph on fake tensors (exir's ``ExportPass``), and XNNPACK
runs all 17 of its passes on each of the 74 subgraphs.

* torchao's ``choose_qparams_affine``, ``quantize_affine`` and ``dequantize_affine`` (4 per 8da4w
  linear) are CompositeImplicitAutograd ops: on fake tensors each re-trace runs their Python bodies,
  dozens of operators each, to learn shapes it learnt the re-trace before (27% of lowering). While
  an ``ExportPass`` runs, a call on fake tensors whose shapes, dtypes and other arguments were seen
  before in the same shape environment gets empty fake outputs of the shapes, strides and dtypes
  the real body gave then; anything else (real tensors, tracing modes above the fake one, a new
  signature) runs the body.
* Six of XNNPACK's passes only rewrite operators a decoder has none of (convolutions, batch norm,
  bilinear upsampling, constant padding, PReLU); they are left out for a graph without those
  operators, with the same result and one re-trace fewer each (8%).
* At full depth the partitioner's merging took a fifth of the lowering (py-spy, E4B's E2B slice,
  about 550 s of lowering): each pair of candidate partitions is checked for a cycle by walking,
  for every outside user of the pair, every node downstream of it; the check intersects bit sets
  instead, with the same answers.

And three through its memory:
* The partitioners (torch's, then ExecuTorch's over it) first write down, for every node, the set
  of every node downstream of it, and ExecuTorch's also upstream: every connected pair of the
  graph, quadratic in its size, 6.6 GiB of the 14.4 GiB peak of E4B's full-depth export (1.0 GiB at
  12 layers; docs/profile_lowering_memory.py). ``ReachableBits`` keeps the same relation as one
  int a node, bit i for the graph's i-th node.
* ExecuTorch's packing of a 4-bit table into two values a byte goes a block of rows at a time.
* ``to_backend`` deep-copies every partition's program before handing it to the backend ("in case
  backends change graph inside preprocess"), all of them at once, weights included, so the
  quantized linears were held twice while XNNPACK serialized them a third time. The copies share
  their weights with the originals now (the graphs are still copied): XNNPACK reads the weights and
  never writes them (the tests check both the program bytes and the weights). And when the caller
  gives the program's weights up (``releasing``), each weight is freed as soon as its serialized
  form exists (XNNPACK's for a delegated weight, the emitter's bytes for the others), so the
  lowering never holds the weights in both forms at once: the peak had been about twice the
  weights (a program's file size, for the portable recipes). The emitter's copy of a weight's last
  use is made a block at a time, each block's pages of the weight given back as soon as copied:
  otherwise the largest weight existed twice at that moment (E2B's bf16 per-layer table: 4.0 GB
  over the 8.8 GB the fixed program's weights take).
* The emitter's copies of the constants were all held until the file was written (a portable
  program whole: E4B in bf16, 12.7 GiB). Inside ``constants_on_disk`` they wait in a scratch file
  instead (constants_on_disk.py), and a weight that is a mapping of its checkpoint's file gives its
  pages back once copied.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import ctypes
import hashlib
import mmap
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import torch

from .constants_on_disk import ConstantsOnDisk

TORCHAO_QUANT_OPS = ("choose_qparams_affine", "quantize_affine", "dequantize_affine")

_library = None  # the overriding registrations last as long as this Library object
_state = {"lowering": 0, "passes": 0, "shapes": None, "counts": None, "releasable": set(), "mapped": set(),
          "partition uses": Counter(), "copying": None, "on disk": None}
# madvise, where the C library has it (Linux, macOS); elsewhere weights are copied whole.
_madvise = getattr(ctypes.CDLL(None), "madvise", None) if sys.platform != "win32" else None


def _shortcut_kernel(body):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    def kernel(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if (not _state["passes"] or not tensors or not all(isinstance(t, FakeTensor) for t in tensors)
                or not all(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())):
            return body(*args)
        fake_mode = tensors[0].fake_mode
        key = (body.__name__, id(fake_mode.shape_env)) + tuple(
            (tuple(map(str, a.shape)), tuple(map(str, a.stride())), a.dtype, a.device) if isinstance(a, torch.Tensor)
            else repr(a) for a in args)
        known = _state["shapes"].get(key)
        if known is None:
            result = body(*args)
            outputs = result if isinstance(result, tuple) else (result,)
            _state["shapes"][key] = (isinstance(result, tuple),
                                     [(o.shape, o.stride(), o.dtype, o.device) for o in outputs])
            return result
        _state["counts"]["shapes reused"] += 1
        is_tuple, outputs = known
        with fake_mode:
            made = tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device)
                         for shape, stride, dtype, device in outputs)
        return made if is_tuple else made[0]

    return kernel


def _skippable_passes() -> dict:
    """XNNPACK pass -> the operators it rewrites; with none of them in the graph it changes nothing."""
    from executorch.backends.xnnpack import _passes as xnnpack_passes
    from executorch.exir.dialects._ops import ops as exir_ops

    aten = exir_ops.edge.aten
    batch_norm = (aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default)
    return {
        xnnpack_passes.ConvertToUpsampleBilinear2d: (aten.upsample_bilinear2d.vec,),
        xnnpack_passes.FuseBatchNormPass: batch_norm,
        xnnpack_passes.DecomposeBatchNorm: batch_norm,
        xnnpack_passes.InsertPadQDQPass: (aten.constant_pad_nd.default,),
        xnnpack_passes.Conv1dUnsqueezePass: (aten.convolution.default,),
        xnnpack_passes.PReLUReshapePass: (aten._prelu_kernel.default,),
    }


class ReachableBits:
    """The partitioners' ``_DependencyViewer``: which nodes are downstream (upstream) of a node, the
    same sets, held as the bits of one int a node (bit i: the graph's i-th node) instead of sets of
    nodes: N ints of N bits, not a set entry for every connected pair."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        self.nodes = list(graph_module.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.downstream = {}
        for node in reversed(self.nodes):  # users come later in a graph's order
            bits = 0
            for user in node.users:
                bits |= (1 << self.index[user]) | self.downstream[user]
            self.downstream[node] = bits
        self.upstream = None  # ExecuTorch's viewer offers it, its partitioner never asks

    def bits(self, nodes) -> int:
        flags = bytearray((len(self.nodes) + 7) // 8)
        for node in nodes:
            i = self.index[node]
            flags[i >> 3] |= 1 << (i & 7)
        return int.from_bytes(flags, "little")

    def downstream_bits(self, node) -> int:
        return self.downstream.get(node, 0)

    def _members(self, bits: int) -> set:
        members = set()
        while bits:
            lowest = bits & -bits
            members.add(self.nodes[lowest.bit_length() - 1])
            bits ^= lowest
        return members

    def downstreams_of(self, node) -> set:
        return self._members(self.downstream_bits(node))

    def upstreams_of(self, node) -> set:
        if self.upstream is None:
            self.upstream = {}
            for later in self.nodes:
                bits = 0
                for given in later.all_input_nodes:
                    bits |= (1 << self.index[given]) | self.upstream[given]
                self.upstream[later] = bits
        return self._members(self.upstream.get(node, 0))


def _viewer_while_lowering(viewer_class):
    def viewer(graph_module):
        if not _state["lowering"]:
            return viewer_class(graph_module)
        _state["counts"]["reachability as bits"] += 1
        return ReachableBits(graph_module)
    return viewer


PACKING_BLOCK_BYTES = 1 << 24


def _pack_embedding_weight_in_row_blocks(pack):
    def packed_in_row_blocks(weight: torch.Tensor, bitwidth: int) -> torch.Tensor:
        # ExecuTorch's 4-bit packing of a table (one int8 a value in, two values a byte out) makes
        # three temporaries of the whole table (the values shifted, the even ones shifted again, their
        # OR with the odd ones): 4.6 GiB above E4B's 2.35 GB per-layer table, the export's peak once
        # the partitioners' sets were gone. The same packing, a block of rows at a time.
        if bitwidth != 4 or not _state["lowering"] or weight.dim() != 2:
            return pack(weight, bitwidth)
        rows, width = weight.shape
        packed = torch.empty(rows, width // 2, dtype=torch.uint8, device=weight.device)
        block = max(1, PACKING_BLOCK_BYTES // max(width, 1))
        for start in range(0, rows, block):
            packed[start:start + block] = pack(weight[start:start + block], bitwidth)
        _state["counts"]["tables packed in row blocks"] += 1
        return packed
    return packed_in_row_blocks


def _deepcopy_sharing_weights(value, memo=None):
    """copy.deepcopy, except that while lowering an exported program's copy shares its weights."""
    from torch.export import ExportedProgram

    if _state["lowering"] and isinstance(value, ExportedProgram):
        memo = {} if memo is None else memo
        for tensor in (*value.state_dict.values(), *value.constants.values()):
            if isinstance(tensor, torch.Tensor):
                memo[id(tensor)] = tensor
        _state["counts"]["partition copies sharing weights"] += 1
    return copy.deepcopy(value, memo)


def _program_weights(program, names=None) -> list[torch.Tensor]:
    """The plain tensors that hold an exported program's parameters and constants (torchao's
    quantized tensors are taken apart into theirs), not its buffers: the KV caches must survive.
    ``names``: only those of these placeholders."""
    from torch.export.graph_signature import InputKind
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def plain(tensor):
        if not is_traceable_wrapper_subclass(tensor):
            return [tensor]
        return [part for name in tensor.__tensor_flatten__()[0] for part in plain(getattr(tensor, name))]

    tables = {InputKind.PARAMETER: program.state_dict, InputKind.CONSTANT_TENSOR: program.constants}
    return [part for spec in program.graph_signature.input_specs
            if spec.kind in tables and (names is None or spec.arg.name in names)
            and isinstance(tables[spec.kind].get(spec.target), torch.Tensor)
            for part in plain(tables[spec.kind][spec.target])]


def _distinct_storages(tensors) -> dict[int, torch.UntypedStorage]:
    return {tensor.untyped_storage().data_ptr(): tensor.untyped_storage() for tensor in tensors}


def _storage_uses(program) -> Counter:
    """How many of the program's weight tensors use each storage, by address."""
    return Counter(tensor.untyped_storage().data_ptr() for tensor in _program_weights(program))


@contextlib.contextmanager
def releasing(program, mapped: frozenset[int] = frozenset()):
    """While lowering ``program`` (inside ``enabled()``), free each weight once it is serialized
    where it is used last. Only weights whose memory no other tensor of the program shares (a tied
    embedding and lm_head stay); the caller must hold no other reference it will read: ``program``
    and its edge dialect form are unusable afterwards, the lowered program is whole. ``mapped``:
    the addresses of weights that are private mappings of a checkpoint's file, whose pages are
    given back once copied (they would read from the file again)."""
    holders = _storage_uses(program)
    _state["releasable"] = {key for key, count in holders.items() if count == 1 and key}
    _state["mapped"] = set(mapped)
    try:
        yield
    finally:
        _state["releasable"], _state["mapped"] = set(), set()


@contextlib.contextmanager
def constants_on_disk(directory: Path):
    """While the context lasts, the emitter's copies of constants from ``SPILL_MIN_BYTES`` go to a
    scratch file in ``directory`` (constants_on_disk.py); write the program with ``disk.writing``."""
    disk = ConstantsOnDisk(directory, SPILL_MIN_BYTES)
    _state["on disk"] = disk
    try:
        yield disk
    finally:
        _state["on disk"] = None
        disk.close()


RELEASE_PHASES = ("packed", "folded", "emitted")  # when a weight's last use was serialized
MOVE_MIN_BYTES = 1 << 24  # weights from this size are moved into the emitter's copy a block at a time
MOVE_BLOCK_BYTES = 1 << 26  # at most this much of a weight exists twice while it is moved
SPILL_MIN_BYTES = 1 << 20  # constants from this size wait on disk for the program's file (constants_on_disk)


def _copied_out(storage: torch.UntypedStorage, give_back: bool, disk: ConstantsOnDisk | None) -> bytes:
    """The storage's bytes, copied a block at a time into a new bytes object (zero pages until
    written), or into ``disk``'s scratch file with a stand-in returned; with ``give_back``, the
    storage's pages go back to the system as soon as copied (they read as zeros after, or from the
    file for a mapped weight): the storage is freed, or not read, next."""
    size, source = storage.nbytes(), storage.data_ptr()
    if disk is None:
        result = builtins.bytes(size)
        target = ctypes.cast(ctypes.c_char_p(result), ctypes.c_void_p).value  # a new object: no one has seen it yet
    else:
        spilling = disk.begin(size)
    given_back = -(-source // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only
    for offset in range(0, size, MOVE_BLOCK_BYTES):
        length = min(MOVE_BLOCK_BYTES, size - offset)
        if disk is None:
            ctypes.memmove(target + offset, source + offset, length)
        else:
            spilling.write((ctypes.c_char * length).from_address(source + offset))
        copied_pages_end = (source + offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if give_back and copied_pages_end > given_back:
            _give_back(given_back, copied_pages_end)
            given_back = copied_pages_end
    if disk is not None:
        _state["counts"]["constant bytes kept on disk"] += size
        return spilling.stand_in()
    _state["counts"]["weights moved a block at a time"] += 1
    return result


def _emitter_bytes(*args, **kwargs):
    """``bytes`` as the emitter sees it: its copy of the constant in ``_state["copying"]`` goes
    through ``_copied_out``; any other call is the builtin's."""
    copying = _state["copying"]
    if copying is not None:
        storage, give_back, disk = copying
        if (len(args) == 1 and not kwargs and isinstance(args[0], ctypes.Array)
                and ctypes.addressof(args[0]) == storage.data_ptr() and ctypes.sizeof(args[0]) == storage.nbytes()):
            return _copied_out(storage, give_back, disk)
    return builtins.bytes(*args, **kwargs)


def _emitter_sha256(data=b""):
    """The emitter's hash of a constant: of its real bytes when it waits on disk."""
    disk = _state["on disk"]
    return disk.sha256(data) if disk is not None else hashlib.sha256(data)


def _free(key: int, storage: torch.UntypedStorage, phase: str) -> None:
    _state["releasable"].remove(key)  # each address once: a tensor made later may be given it
    mapped = key in _state["mapped"] and _madvise is not None
    if storage.resizable() or mapped:  # not memory torch borrowed (from numpy, say): that stays
        _state["counts"]["weight bytes released"] += storage.nbytes()
        _state["counts"][f"weight bytes released {phase}"] += storage.nbytes()
        if mapped:  # its pages would be read from the file again
            _give_back(storage.data_ptr(), storage.data_ptr() + storage.nbytes())
        else:
            storage.resize_(0)


def _give_back(start: int, end: int) -> None:
    """The whole pages between the two addresses back to the system."""
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _used_once_more(uses, storages: dict[int, torch.UntypedStorage], phase: str) -> None:
    """One use of each of ``storages`` is serialized: free those that have no use left."""
    for key, storage in storages.items():
        uses[key] -= 1
        if uses[key] <= 0 and key in _state["releasable"]:
            _free(key, storage, phase)


def _install() -> None:
    """Wraps, once per process, what the shortcuts need; every wrapper does exactly what it wraps
    unless ``enabled()`` is in force."""
    global _library
    if _library is not None:
        return
    import torch._inductor.decomposition as inductor_decompositions
    import torchao.quantization.quant_primitives  # noqa: F401  (defines the torchao ops)
    from executorch.backends.xnnpack import _passes as xnnpack_passes
    from executorch.exir import pass_base

    # The ops' own bodies, as torchao registered them (also as inductor decompositions).
    library = torch.library.Library("torchao", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        for name in TORCHAO_QUANT_OPS:
            body = inductor_decompositions.decompositions[getattr(torch.ops.torchao, name).default]
            library.impl(name, _shortcut_kernel(body), "CompositeImplicitAutograd", allow_override=True)

    export_pass_call = pass_base._ExportPassBase.call

    def call(self, *args, **kwargs):
        _state["passes"] += bool(_state["lowering"])
        try:
            return export_pass_call(self, *args, **kwargs)
        finally:
            _state["passes"] -= bool(_state["lowering"])

    pass_base._ExportPassBase.call = call

    skippable = _skippable_passes()
    transform = xnnpack_passes.XNNPACKPassManager.transform

    def transform_without_idle_passes(self):
        if _state["lowering"]:
            present = {node.target for node in self.exported_program.graph.nodes if node.op == "call_function"}
            kept = [p for p in self.passes if p not in skippable or present.intersection(skippable[p])]
            _state["counts"]["passes skipped"] += len(self.passes) - len(kept)
            self.passes = kept
        return transform(self)

    xnnpack_passes.XNNPACKPassManager.transform = transform_without_idle_passes

    from executorch.exir.backend import backend_api

    backend_api.copy = types.SimpleNamespace(deepcopy=_deepcopy_sharing_weights)

    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner as torch_partitioner
    from torch.fx.passes.utils.fuser_utils import validate_partition

    for module in (torch_partitioner, group_partitioner):
        module._DependencyViewer = _viewer_while_lowering(module._DependencyViewer)

    can_merge = group_partitioner.GroupBasedPartitioner._can_merge_partitions

    def can_merge_intersecting_bits(self, p1, p2, partitions_by_id):
        # The same answer as ExecuTorch's, which asks of every node downstream of an outside user
        # whether it is in the pair (the downstream sets of a full-depth graph run to thousands of
        # nodes, for each pair of partitions): one AND of two ints instead.
        if not _state["lowering"] or not isinstance(self.dependency_viewer, ReachableBits):
            return can_merge(self, p1, p2, partitions_by_id)
        combined = set(partitions_by_id[p1].nodes.keys()).union(set(partitions_by_id[p2].nodes.keys()))
        combined_bits = self.dependency_viewer.bits(combined)
        for node in combined:
            for user in node.users:
                if user not in combined and self.dependency_viewer.downstream_bits(user) & combined_bits:
                    return False
        return validate_partition(list(combined))

    group_partitioner.GroupBasedPartitioner._can_merge_partitions = can_merge_intersecting_bits

    # Releasing weights: a weight may be used by several partitions (ExecuTorch's duplicated
    # constants still name the original tensor) or stay outside them, so the uses are counted
    # once the program is partitioned, and a weight is freed when its last use is serialized.
    lower_partitions = backend_api.lower_all_submodules_to_backend

    def lower_partitions_counting_uses(backend_id, method_to_submodule_nodes, method_to_tagged_program):
        if _state["lowering"] and _state["releasable"]:
            uses = Counter()
            for method, nodes in method_to_submodule_nodes.items():
                consumed = set()
                for node in nodes:
                    uses.update(_distinct_storages(_program_weights(node.meta["submodule_program"])).keys())
                    consumed.update(node.meta["toplevel_input_specs_to_delete"])
                program = method_to_tagged_program[method]
                outside = {spec.arg.name for spec in program.graph_signature.input_specs} - consumed
                uses.update(_distinct_storages(_program_weights(program, outside)).keys())  # emitted later
            _state["partition uses"] = uses
        return lower_partitions(backend_id, method_to_submodule_nodes, method_to_tagged_program)

    backend_api.lower_all_submodules_to_backend = lower_partitions_counting_uses

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    preprocess = XnnpackBackend.preprocess

    def preprocess_then_release(partition, compile_specs):
        # Taken before: XNNPACK's passes edit the partition's state_dict in place (it shares the dict),
        # and a weight they replaced would be missed afterwards, held to the end of the lowering.
        weights = _distinct_storages(_program_weights(partition)) if _state["lowering"] and _state["releasable"] else {}
        result = preprocess(partition, compile_specs)
        _used_once_more(_state["partition uses"], weights, "packed")
        return result

    XnnpackBackend.preprocess = staticmethod(preprocess_then_release)

    from executorch.exir.program import _program

    fuse_and_fold = _program.quant_fusion_and_const_prop_pass

    def fuse_and_fold_then_release(program):
        before = _distinct_storages(_program_weights(program)) if _state["lowering"] and _state["releasable"] else {}
        folded = fuse_and_fold(program)
        if before:
            after = _distinct_storages(_program_weights(folded))
            for key in before.keys() - after.keys():  # folded into new constants (the packed tables)
                if key in _state["releasable"]:
                    _free(key, before[key], "folded")
            _state["releasable"].update(after.keys() - before.keys() - {0})  # those, the folded program's alone
        return folded

    _program.quant_fusion_and_const_prop_pass = fuse_and_fold_then_release

    from executorch.exir.passes import _quant_patterns_and_replacements

    pack = _quant_patterns_and_replacements._pack_embedding_weight
    pack.register_kernel("cpu")(_pack_embedding_weight_in_row_blocks(pack._init_fn))

    from executorch.exir.emit import _emitter
    from executorch.exir.emit._emitter import _Emitter

    tensor_spec_to_evalue = _Emitter._tensor_spec_to_evalue

    def emit_then_release(self, spec, *args, **kwargs):
        program = getattr(self, "exported_program", None)  # the top level's emitter
        disk = _state["on disk"]
        if not (_state["lowering"] and (_state["releasable"] or disk) and spec.const and spec.storage is not None
                and program):
            return tensor_spec_to_evalue(self, spec, *args, **kwargs)
        if not hasattr(self, "weight_uses"):
            self.weight_uses = _storage_uses(program)
        key, size = spec.storage.data_ptr(), spec.storage.nbytes()
        weight = key in self.weight_uses  # else a copy the emitter made
        last = (weight and self.weight_uses[key] == 1 and key in _state["releasable"] and _madvise is not None
                and ((spec.storage.resizable() and size >= MOVE_MIN_BYTES) or key in _state["mapped"]))
        # Initial states of mutable buffers stay: the serializer reads them from another list.
        if disk is None or size < disk.min_bytes or spec.mem_id is not None:
            disk = None
        _state["copying"] = (spec.storage, last, disk) if last or disk else None
        kept_before = len(self.program_state.constant_buffer)
        if disk is not None:
            disk.latest = None
        try:
            value = tensor_spec_to_evalue(self, spec, *args, **kwargs)
        finally:
            _state["copying"] = None
        if disk is not None and len(self.program_state.constant_buffer) == kept_before:
            disk.forget_latest()  # the same bytes were stored before: this stand-in is in no program
        if weight:
            _used_once_more(self.weight_uses, {key: spec.storage}, "emitted")  # its bytes are in the program now
        return value

    _Emitter._tensor_spec_to_evalue = emit_then_release
    # The two names the emitter copies and hashes a constant with.
    _emitter.bytes = _emitter_bytes
    _emitter.hashlib = types.SimpleNamespace(sha256=_emitter_sha256)
    _library = library


@contextlib.contextmanager
def enabled():
    """The shortcuts, for one lowering; yields counts of what they did (nested, the outermost's)."""
    _install()
    if not _state["lowering"]:
        _state.update(shapes={}, counts=Counter())
    _state["lowering"] += 1
    try:
        yield _state["counts"]
    finally:
        _state["lowering"] -= 1
        if not _state["lowering"]:
            _state["shapes"] = None  # shapes hold symbols of this lowering's shape environment
