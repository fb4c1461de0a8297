"""Two shortcuts through ExecuTorch 1.4.1's XNNPACK lowering that leave the program byte for byte
the same (tests/test_lowering_shortcuts.py), for the 20-30% of its time they save.

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
"""

from __future__ import annotations

import contextlib
import warnings

import torch

TORCHAO_QUANT_OPS = ("choose_qparams_affine", "quantize_affine", "dequantize_affine")

_library = None  # the overriding registrations last as long as this Library object
_state = {"lowering": 0, "passes": 0, "shapes": None, "counts": None}


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
    _library = library


@contextlib.contextmanager
def enabled():
    """The shortcuts, for one lowering; yields counts of what they did (nested, the outermost's)."""
    from collections import Counter

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
