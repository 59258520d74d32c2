"""Hugging Face ``transformers`` integration for causal language models (optional extra ``[hf]``).

One line, two paths:

* ``tri_losses.hf.apply(model)`` (logits path): the model's ``loss_function`` becomes tri_losses'
  fused cross-entropy (no fp32 upcast copy of the logits; the usual label shift,
  ``ignore_index=-100``, and ``num_items_in_batch`` normalisation for gradient accumulation).
* ``tri_losses.hf.apply(model, fused=True)`` (fused path): in training, when ``labels`` are given,
  the forward computes the LM head and the loss in one :func:`tri_losses.linear_cross_entropy`, so
  the ``(B, T, V)`` logits are never built (the output's ``logits`` is ``None``); in ``eval()`` or
  without labels it runs the model's own forward and returns logits as usual.

Works for ``*ForCausalLM`` models whose head is a plain ``nn.Linear`` on the decoder's last hidden
state (Llama, Mistral, Qwen, Gemma, ...); Gemma-2-style ``config.final_logit_softcapping`` is
applied as ``softcap``, Granite's ``logits_scaling`` and Cohere's ``logit_scale`` by scaling the hidden
state. ``ce_kwargs`` (``label_smoothing``, ``z_loss``, ``focal_gamma``, ...) are
passed to the loss. For ``Trainer(compute_loss_func=...)``, :func:`causal_lm_loss` has the
``(outputs, labels, num_items_in_batch)`` form via :func:`trainer_loss`.
"""
from __future__ import annotations

import functools
import inspect
import types

import torch

from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["apply", "causal_lm_loss", "trainer_loss"]


def _shift(labels, ignore_index, shift_labels):
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return shift_labels


def _finish(loss_sum_or_mean, num_items_in_batch):
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   ce_kwargs=None, **kwargs):
    """Drop-in for transformers' ``ForCausalLMLoss`` computed with :func:`tri_losses.cross_entropy`."""
    V = logits.shape[-1] if vocab_size is None else vocab_size
    target = _shift(labels, ignore_index, shift_labels).reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(logits.reshape(-1, V), target, ignore_index=ignore_index, reduction=reduction,
                         **(ce_kwargs or {}))
    return _finish(loss, num_items_in_batch)


def trainer_loss(**ce_kwargs):
    """A ``compute_loss_func`` for ``transformers.Trainer``: ``f(outputs, labels, num_items_in_batch)``."""
    def f(outputs, labels, num_items_in_batch=None):
        return causal_lm_loss(outputs.logits, labels, num_items_in_batch=num_items_in_batch, ce_kwargs=ce_kwargs)
    return f


def _bind(orig, args, kwargs):
    """Call arguments of the model's own ``forward`` by name (positional ones included)."""
    sig = inspect.signature(orig)
    bound = sig.bind_partial(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            named[name] = value
    return named


def _logit_scale(config):
    """The factor some heads apply to the logits: Granite divides by ``logits_scaling``, Cohere
    multiplies by ``logit_scale``."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    return scale


def _fused_forward(self, *args, _orig=None, _ce=None, **kwargs):
    named = _bind(_orig, args, kwargs)
    if named is None or named.get("labels") is None or not self.training:
        return _orig(*args, **kwargs)
    kwargs = named
    labels = kwargs.pop("labels")
    input_ids = kwargs.pop("input_ids", None)
    attention_mask = kwargs.pop("attention_mask", None)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    num_items = kwargs.get("num_items_in_batch")
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    decoder = self.get_decoder() if hasattr(self, "get_decoder") else self.model
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    head = self.get_output_embeddings()
    scale = _logit_scale(self.config)
    if scale != 1.0:
        hidden = hidden * scale  # scale * (h @ W.T) = (scale * h) @ W.T (the bias is not scaled: none here)
    target = _shift(labels, ignore_index, shift_labels).to(hidden.device)
    ce = dict(_ce)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    if softcap:
        ce.setdefault("softcap", float(softcap))
    loss = linear_cross_entropy(hidden, head.weight, target, linear_bias=head.bias, ignore_index=ignore_index,
                                reduction="sum" if num_items is not None else "mean", **ce)
    loss = _finish(loss, num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def apply(model, *, fused: bool = False, **ce_kwargs):
    """Make a transformers causal LM use tri_losses (see the module docstring). Returns the model."""
    model.loss_function = functools.partial(causal_lm_loss, ce_kwargs=ce_kwargs)
    if fused:
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"apply: fused: the model's output embedding must be an nn.Linear, got "
                             f"{type(head).__name__}")
        if head.bias is not None and _logit_scale(model.config) != 1.0:
            raise ValueError("apply: fused: a scaled head with a bias is not supported; use fused=False")
        orig = model.forward if not hasattr(model, "_tri_losses_orig_forward") else model._tri_losses_orig_forward
        model._tri_losses_orig_forward = orig
        model.forward = types.MethodType(functools.partial(_fused_forward, _orig=orig, _ce=ce_kwargs), model)
    return model
