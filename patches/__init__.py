"""Runtime fixes to transformers' ``modeling_gemma3n`` needed to export the text decoder.

1. AltUp coefficient clamp guarded by ``self.training``. Old releases clamped
   ``prediction_coefs.weight.data`` in place in every forward, a mutation of a parameter
   that ``torch.export`` cannot trace. transformers 5.23 already guards it; the fix is only
   installed when the imported source lacks the guard.
2. ``Gemma3nTextMLP._gaussian_topk`` computes ``Normal(0, 1).icdf(sparsity)`` in every forward.
   ``icdf`` is ``erfinv``, which is not in the core ATen opset, so ``to_edge`` rejects the
   program. The multiplier depends only on the layer's configured sparsity, so it is computed
   once at construction and kept as a Python float. Still needed with transformers 5.23.
3. ``Gemma3nTextModel.forward`` computes the RoPE tables in ``for layer_type in set(layer_types)``
   order, which follows the process's string-hash seed: the exported graph, and so the program's
   bytes, changed from run to run (same logits). The module's ``set`` becomes one that iterates in
   first-seen order, so the same checkpoint and options always give the same bytes.

The fixes patch the imported classes (never the installed files), are idempotent, and
``revert()`` restores the originals. ``modeling_gemma3n.diff`` carries the same fixes for
people who patch the source by hand (``patches/apply_diff.sh``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.models.gemma3n import modeling_gemma3n as _modeling

_ORIGINALS: dict[tuple[type, str], object] = {}
STD_MULTIPLIER = "std_multiplier"  # attribute of each sparse Gemma3nTextMLP: a Python float


def _replace(cls: type, name: str, function) -> None:
    _ORIGINALS.setdefault((cls, name), cls.__dict__[name])
    setattr(cls, name, function)


def altup_clamp_needs_fix() -> bool:
    source = inspect.getsource(_modeling.Gemma3nTextAltUp.predict)
    return "clamp_" in source and "self.training" not in source


def gaussian_topk_needs_fix() -> bool:
    return "icdf" in inspect.getsource(_modeling.Gemma3nTextMLP._gaussian_topk)


def layer_type_order_needs_fix() -> bool:
    return "set(self.config.layer_types)" in inspect.getsource(inspect.unwrap(_modeling.Gemma3nTextModel.forward))


def _first_seen_set(items=()):
    # Set-like (membership, |, &, -) like the builtin, but iterating in first-seen order.
    return dict.fromkeys(items).keys()


def _std_multiplier(sparsity: float) -> float:
    # The upstream float32 computation, done once. On the CPU even while Hugging Face builds the
    # model on the meta device, where no value can be read back.
    with torch.device("cpu"):
        return torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(sparsity, dtype=torch.float32)).item()


def _add_std_multiplier(mlp: nn.Module) -> None:
    if mlp.activation_sparsity > 0.0 and not hasattr(mlp, STD_MULTIPLIER):
        setattr(mlp, STD_MULTIPLIER, _std_multiplier(mlp.activation_sparsity))


def _mlp_init(self, config, layer_idx: int = 0):
    _ORIGINALS[(_modeling.Gemma3nTextMLP, "__init__")](self, config, layer_idx)
    _add_std_multiplier(self)


def _gaussian_topk(self, inputs: torch.Tensor) -> torch.Tensor:
    if not hasattr(self, STD_MULTIPLIER):  # a model built before the fix was installed, run eagerly
        _add_std_multiplier(self)
    # A constant in the exported graph; cast as upstream casts its float32 tensor.
    std_multiplier = torch.tensor(getattr(self, STD_MULTIPLIER), dtype=torch.float32).type(inputs.dtype)
    inputs_mean = torch.mean(inputs, dim=-1, keepdim=True)
    inputs_std = torch.std(inputs, dim=-1, keepdim=True, unbiased=False)
    cutoff_x = inputs_mean + inputs_std * std_multiplier
    return nn.functional.relu(inputs - cutoff_x)


def _altup_predict(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Upstream 5.x predict, with the in-place clamp only while training.
    modalities = self.compute_router_modalities(hidden_states[self.config.altup_active_idx])
    if self.training and self.config.altup_coef_clip is not None:
        self.prediction_coefs.weight.data.clamp_(-self.config.altup_coef_clip, self.config.altup_coef_clip)
    all_coefs = (
        self.prediction_coefs(modalities)
        .reshape(*modalities.shape[:-1], self.config.altup_num_inputs, self.config.altup_num_inputs)
        .permute(0, 1, 3, 2)
    )
    predictions = torch.matmul(hidden_states.permute(1, 2, 3, 0), all_coefs)
    predictions = predictions.permute(3, 0, 1, 2)
    predictions += hidden_states
    return predictions.contiguous().type_as(hidden_states)


def apply(model: nn.Module | None = None) -> list[str]:
    """Install the fixes the imported transformers needs; return the names of those in force.

    ``model``: an already-built model whose MLPs predate the patch gets their multipliers now.
    """
    if altup_clamp_needs_fix():
        _replace(_modeling.Gemma3nTextAltUp, "predict", _altup_predict)
    if gaussian_topk_needs_fix():
        _replace(_modeling.Gemma3nTextMLP, "__init__", _mlp_init)
        _replace(_modeling.Gemma3nTextMLP, "_gaussian_topk", _gaussian_topk)
    if layer_type_order_needs_fix() and _modeling.__dict__.get("set") is not _first_seen_set:
        # A module global shadows the builtin for modeling_gemma3n alone (its only other use,
        # sorted(set(...)), means the same either way); revert() deletes it.
        _ORIGINALS.setdefault((_modeling, "set"), None)
        _modeling.set = _first_seen_set
    if model is not None and (_modeling.Gemma3nTextMLP, "_gaussian_topk") in _ORIGINALS:
        for module in model.modules():
            if isinstance(module, _modeling.Gemma3nTextMLP):
                _add_std_multiplier(module)
    names = {"predict": "altup-clamp-training-guard", "_gaussian_topk": "gaussian-topk-icdf-at-init",
             "set": "layer-types-in-first-seen-order"}
    return [names[name] for (_, name) in _ORIGINALS if name in names]


def revert() -> None:
    """Restore the original methods (tests use this to show what the fixes are for)."""
    for (owner, name), original in _ORIGINALS.items():
        if owner is _modeling:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _ORIGINALS.clear()
