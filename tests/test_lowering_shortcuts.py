"""The lowering shortcuts (gemma3n_executorch/lowering_shortcuts.py) change how long lowering takes,
never what it makes: the same program bytes with and without them, while they are taken."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch
from torch import nn

from gemma3n_executorch import lowering, lowering_shortcuts, quantize
from gemma3n_executorch.constants_on_disk import ConstantsOnDisk


class Block(nn.Module):
    """Dynamically quantized linears around the elementwise and reduction operators a decoder
    layer has, with a dynamic token count, as the kv program is exported."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(64, 128, bias=False)
        self.down = nn.Linear(128, 64, bias=False)

    def forward(self, hidden):
        normed = hidden * torch.rsqrt((hidden * hidden).mean(-1, keepdim=True) + 1e-6)
        return hidden + self.down(nn.functional.gelu(self.up(normed), approximate="tanh"))


def program_bytes(shortcuts: bool, release_weights: bool = False, backend: str = "xnnpack") -> tuple[bytes, dict]:
    block = Block().requires_grad_(False)  # as the exporter's models are
    if backend == "xnnpack":  # the portable kernels have no dynamically quantized linears
        quantize.quantize_linears(block, "8da4w", 32, torch.float32)
    tokens = torch.export.Dim("tokens", min=1, max=16)
    program = lowering.export(block, (torch.randn(1, 4, 64),), ({1: tokens},))
    weights = {name: tensor.dequantize() for name, tensor in program.state_dict.items()}  # (8da4w's)
    releasing = lowering_shortcuts.releasing(program) if release_weights else contextlib.nullcontext()
    with lowering_shortcuts.enabled() if shortcuts else contextlib.nullcontext({}) as counts, releasing:
        lowered = lowering.emit(lowering.delegate(program, backend, {})[0])
    if not release_weights:
        # The partitions' copies share these tensors with XNNPACK's preprocessing: it must not write them.
        assert all(torch.equal(program.state_dict[name].dequantize(), tensor) for name, tensor in weights.items())
    return lowered.buffer, dict(counts)


def test_shortcuts_leave_the_program_byte_for_byte_the_same():
    plain, _ = program_bytes(shortcuts=False)
    shortcut, counts = program_bytes(shortcuts=True)
    assert counts["shapes reused"] > 0 and counts["passes skipped"] > 0, counts  # taken, not bypassed
    assert counts["partition copies sharing weights"] > 0 and counts["reachability as bits"] > 0, counts
    assert shortcut == plain


def test_reachability_bits_answer_as_the_partitioners_sets():
    from executorch.exir import to_edge
    from executorch.exir.backend.canonical_partitioners.group_partitioner import _DependencyViewer

    tokens = torch.export.Dim("tokens", min=1, max=16)
    graph_module = to_edge(lowering.export(Block().requires_grad_(False), (torch.randn(1, 4, 64),),
                                           ({1: tokens},))).exported_program().graph_module
    sets, bits = _DependencyViewer(graph_module), lowering_shortcuts.ReachableBits(graph_module)
    nodes = list(graph_module.graph.nodes)
    assert sum(len(sets.downstreams_of(node)) for node in nodes) > len(nodes)  # a graph with paths to follow
    for node in nodes:
        assert bits.downstreams_of(node) == sets.downstreams_of(node), node
        assert bits.upstreams_of(node) == sets.upstreams_of(node), node


@pytest.mark.parametrize("backend", ["xnnpack", "portable"])  # freed after XNNPACK's packing / the emitter's copy
def test_weights_released_as_they_are_serialized_leave_the_program_byte_for_byte_the_same(backend):
    plain, _ = program_bytes(shortcuts=False, backend=backend)
    released, counts = program_bytes(shortcuts=True, release_weights=True, backend=backend)
    # Both linears' weights were freed (8da4w: one byte a 4-bit value, and their scales; fp32: 4 bytes a value),
    # when the delegate packed them, or when the emitter copied them for the portable kernels.
    when = "packed" if backend == "xnnpack" else "emitted"
    assert counts.get(f"weight bytes released {when}", 0) >= 2 * 64 * 128, counts
    assert counts["weight bytes released"] == sum(counts.get(f"weight bytes released {phase}", 0)
                                                  for phase in lowering_shortcuts.RELEASE_PHASES), counts
    assert released == plain


class Lookup(nn.Module):
    """A table gathered by token, as Gemma 3n's token and per-layer embeddings are."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(96, 64)

    def forward(self, tokens):
        return self.table(tokens)


def lookup_program_bytes(shortcuts: bool) -> tuple[bytes, dict]:
    lookup = Lookup().requires_grad_(False)
    quantize.quantize_model(lookup, qembedding_config="4w", qembedding_group_size=quantize.EMBEDDING_GROUP_SIZE)
    program = lowering.export(lookup, (torch.tensor([[3, 95, 0, 17]]),), None)
    with lowering_shortcuts.enabled() if shortcuts else contextlib.nullcontext({}) as counts:
        lowered = lowering.emit(lowering.delegate(program, "portable", {})[0], quantized_embeddings=True)
    return lowered.buffer, dict(counts)


def test_four_bit_tables_packed_in_row_blocks_leave_the_program_byte_for_byte_the_same(monkeypatch):
    plain, _ = lookup_program_bytes(shortcuts=False)
    monkeypatch.setattr(lowering_shortcuts, "PACKING_BLOCK_BYTES", 64 * 10)  # 10 rows a block: 10 blocks, the last short
    blocked, counts = lookup_program_bytes(shortcuts=True)
    assert counts.get("tables packed in row blocks") == 1, counts
    assert blocked == plain


def test_weights_moved_into_the_program_a_block_at_a_time_leave_it_byte_for_byte_the_same(monkeypatch):
    """The emitter's copy of a weight's last use is made a block at a time, each block's pages of the
    weight given back once copied (at real size the largest weight would otherwise exist twice):
    here every weight, in blocks of one page."""
    plain, _ = program_bytes(shortcuts=False, backend="portable")
    monkeypatch.setattr(lowering_shortcuts, "MOVE_MIN_BYTES", 0)
    monkeypatch.setattr(lowering_shortcuts, "MOVE_BLOCK_BYTES", 4096)
    moved, counts = program_bytes(shortcuts=True, release_weights=True, backend="portable")
    assert counts["weights moved a block at a time"] >= 2, counts  # both linears' weights (32 KB each)
    assert moved == plain


def test_constants_on_disk_are_written_back_in_place_of_their_stand_ins_exactly_once(tmp_path):
    disk = ConstantsOnDisk(tmp_path, min_bytes=1)
    constants = [bytes(range(256)) * 4097, b"\x01" * 100]
    stand_ins = []
    for constant in constants:
        spilling = disk.begin(len(constant))
        spilling.write(constant[:5000])
        spilling.write(constant[5000:])
        stand_ins.append(spilling.stand_in())
    assert [len(s) for s in stand_ins] == [len(c) for c in constants] and not any(stand_ins[0])
    assert [disk.sha256(s).hexdigest() for s in stand_ins] == [hashlib.sha256(c).hexdigest() for c in constants]
    assert disk.sha256(constants[1]).hexdigest() == hashlib.sha256(constants[1]).hexdigest()  # not a stand-in

    def program(file):
        for piece in (b"head", stand_ins[0], b"pad", stand_ins[1], b"tail"):
            file.write(piece)

    with open(tmp_path / "p", "wb") as file:
        disk.writing(program)(file)
    assert (tmp_path / "p").read_bytes() == b"head" + constants[0] + b"pad" + constants[1] + b"tail"
    with open(tmp_path / "q", "wb") as file, pytest.raises(RuntimeError, match="1 constants kept on disk were not written"):
        disk.writing(lambda file: file.write(stand_ins[0]))(file)  # a stand-in left out: never a file of zeros
    with open(tmp_path / "r", "wb") as file, pytest.raises(RuntimeError, match="written into the program twice"):
        disk.writing(lambda file: [file.write(stand_ins[0]), file.write(stand_ins[0])])(file)
    disk.close()
