"""Hugging Face ``transformers`` integration for causal language models, masked LMs and CTC speech models
(optional extra ``[hf]``).

Two paths, for one model or for a whole model class:

* **logits path** (``fused=False``): the model's ``loss_function`` becomes :func:`causal_lm_loss`, i.e.
  :func:`tri_losses.cross_entropy` with the usual label shift, ``ignore_index=-100`` and
  ``num_items_in_batch`` normalisation for gradient accumulation (no fp32 copy of the logits).
  Works for every decoder-only causal LM whose ``forward`` calls ``self.loss_function``, multimodal
  ``*ForConditionalGeneration`` models included.
* **fused path** (``fused=True``): in training mode, when ``labels`` are given, ``forward`` runs the
  decoder and computes the LM head and the loss in one :func:`tri_losses.linear_cross_entropy`, so the
  ``(B, T, V)`` logits are never built (the output's ``logits`` is ``None``). In ``eval()`` mode or
  without labels it runs the model's own ``forward`` (full logits, for generation, evaluation
  metrics and ``logits_to_keep``), with the logits path's loss. A model in ``eval()`` mode that gets
  labels while autograd is on (a training step without ``model.train()``: ``from_pretrained``
  returns models in eval mode) warns once. Supported for the model types in :data:`FUSED_MODEL_TYPES`
  (tested on each; multimodal ones with transformers >= 5), whose head is a plain ``nn.Linear`` on the
  decoder's last hidden state; the post-processing those heads apply is reproduced:
  ``final_logit_softcapping`` (Gemma 2-4, PaliGemma 2) as ``softcap``, Granite's ``logits_scaling`` and
  Cohere's ``logit_scale`` by scaling the hidden state, and the MoE routers' auxiliary loss; the output is
  the model's own output class.

Use:

* ``tri_losses.hf.apply(model, fused=..., **ce_kwargs)``: one model instance (returns it).
* ``tri_losses.hf.patch("llama", fused=..., **ce_kwargs)`` (a model type or a model class) before
  ``from_pretrained``: every instance of the class, also those a ``Trainer`` builds; ``unpatch`` (or
  ``with patch(...):``) restores the class.
* ``Trainer(compute_loss_func=tri_losses.hf.trainer_loss())``: the logits path without touching the model.
* ``tri_losses.hf.patch_trl()`` before building a TRL trainer: TRL's fused LM head (per-token log-probs,
  entropy, top-1 flags) on :func:`tri_losses.linear_cross_entropy` (:func:`add_fused_lm_head`).

``ce_kwargs`` (``label_smoothing``, ``z_loss``, ``focal_gamma``, ``softcap``, ``backend``, ...) are passed
to the loss; an option the loss does not take raises ``TypeError`` at once.

Masked LMs whose forward calls ``self.loss_function`` (``ModernBertForMaskedLM``, ``EuroBertForMaskedLM``, ...;
BERT and RoBERTa compute their loss themselves) take ``apply``/``patch`` with ``fused=False``: their loss
becomes :func:`masked_lm_loss`, the logits path without the label shift.
CTC speech models (``*ForCTC``: Wav2Vec2, HuBERT, WavLM, Data2Vec-Audio, SEW, UniSpeech, Parakeet CTC, ...,
transformers >= 5, whose forward calls ``self.loss_function``) take ``apply``/``patch`` with ``fused=False``:
their loss becomes :func:`ctc_loss` (:func:`tri_losses.ctc_loss` with the log-softmax fused; the model's
config sets the blank, the reduction and ``zero_infinity``), and the options are :func:`tri_losses.ctc_loss`'s
own (``backend``, ``validate``, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import warnings

import torch

from . import _validate
from ._validate import InputError, InputTypeError
from .cross_entropy import cross_entropy
from .ctc import ctc_loss as _ctc
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["apply", "patch", "unpatch", "causal_lm_loss", "masked_lm_loss", "ctc_loss", "trainer_loss",
           "add_fused_lm_head", "patch_trl", "unpatch_trl", "FUSED_MODEL_TYPES", "TRL_OUTPUTS", "TRL_TRAINERS"]

#: Model types (``config.model_type``) the fused path is tested on, with the causal-LM class each
#: names and what the fused path reproduces of its head (see docs/hf.md for the table).
FUSED_MODEL_TYPES = {
    "llama": ("LlamaForCausalLM", "plain head"),
    "llama4_text": ("Llama4ForCausalLM", "plain head"),
    "mistral": ("MistralForCausalLM", "plain head"),
    "ministral": ("MinistralForCausalLM", "plain head"),
    "ministral3": ("Ministral3ForCausalLM", "plain head"),
    "mixtral": ("MixtralForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "qwen2": ("Qwen2ForCausalLM", "plain head"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "qwen3": ("Qwen3ForCausalLM", "plain head"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "qwen3_next": ("Qwen3NextForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "qwen3_5_text": ("Qwen3_5ForCausalLM", "plain head"),
    "qwen3_5_moe_text": ("Qwen3_5MoeForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "gemma": ("GemmaForCausalLM", "plain head (tied embeddings)"),
    "gemma2": ("Gemma2ForCausalLM", "final_logit_softcapping as softcap"),
    "gemma3_text": ("Gemma3ForCausalLM", "final_logit_softcapping as softcap"),
    "gemma3n_text": ("Gemma3nForCausalLM", "final_logit_softcapping as softcap"),
    "gemma4_text": ("Gemma4ForCausalLM", "final_logit_softcapping as softcap"),
    "vaultgemma": ("VaultGemmaForCausalLM", "final_logit_softcapping as softcap"),
    "phi": ("PhiForCausalLM", "plain head with a bias"),
    "phi3": ("Phi3ForCausalLM", "plain head"),
    "phimoe": ("PhimoeForCausalLM",
               "plain head (a bias with lm_head_bias); router auxiliary loss when output_router_logits"),
    "granite": ("GraniteForCausalLM", "logits / logits_scaling"),
    "granitemoe": ("GraniteMoeForCausalLM", "logits / logits_scaling; router auxiliary loss when output_router_logits"),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM",
                         "logits / logits_scaling; router auxiliary loss when output_router_logits"),
    "cohere": ("CohereForCausalLM", "logits * logit_scale"),
    "cohere2": ("Cohere2ForCausalLM", "logits * logit_scale"),
    "olmo": ("OlmoForCausalLM", "plain head"),
    "olmo2": ("Olmo2ForCausalLM", "plain head"),
    "olmo3": ("Olmo3ForCausalLM", "plain head"),
    "olmoe": ("OlmoeForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "flex_olmo": ("FlexOlmoForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "plain head"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "plain head"),
    "gpt_oss": ("GptOssForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "glm": ("GlmForCausalLM", "plain head"),
    "glm4": ("Glm4ForCausalLM", "plain head"),
    "glm4_moe": ("Glm4MoeForCausalLM", "plain head"),
    "smollm3": ("SmolLM3ForCausalLM", "plain head"),
    "starcoder2": ("Starcoder2ForCausalLM", "plain head"),
    "stablelm": ("StableLmForCausalLM", "plain head"),
    "ernie4_5": ("Ernie4_5ForCausalLM", "plain head"),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "hunyuan_v1_dense": ("HunYuanDenseV1ForCausalLM", "plain head"),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM", "plain head"),
    "minimax": ("MiniMaxForCausalLM", "plain head; router auxiliary loss when output_router_logits"),
    "exaone4": ("Exaone4ForCausalLM", "plain head"),
    "seed_oss": ("SeedOssForCausalLM", "plain head"),
    "helium": ("HeliumForCausalLM", "plain head"),
    "apertus": ("ApertusForCausalLM", "plain head"),
    "arcee": ("ArceeForCausalLM", "plain head"),
    "nemotron": ("NemotronForCausalLM", "plain head"),
    "lfm2": ("Lfm2ForCausalLM", "plain head"),
    # multimodal (image-text-to-text; transformers >= 5): the decoder's hidden states after the vision tokens
    "llava": ("LlavaForConditionalGeneration", "plain head (multimodal)"),
    "llava_next": ("LlavaNextForConditionalGeneration", "plain head (multimodal)"),
    "mistral3": ("Mistral3ForConditionalGeneration", "plain head (multimodal)"),
    "gemma3": ("Gemma3ForConditionalGeneration", "plain head (multimodal; no soft-cap, as the model's own)"),
    "paligemma": ("PaliGemmaForConditionalGeneration",
                  "the text model's final_logit_softcapping as softcap (multimodal; PaliGemma 2)"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "plain head (multimodal)"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "plain head (multimodal)"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "plain head (multimodal)"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration",
                     "plain head (multimodal); router auxiliary loss when output_router_logits"),
    "glm4v": ("Glm4vForConditionalGeneration", "plain head (multimodal)"),
    "idefics3": ("Idefics3ForConditionalGeneration", "plain head (multimodal)"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "plain head (multimodal)"),
    "internvl": ("InternVLForConditionalGeneration", "plain head (multimodal)"),
}
# multimodal model types whose forward soft-caps with its text model's config (PaliGemma 2's Gemma 2)
_TEXT_CONFIG_SOFTCAP = {"paligemma"}

_PATCHED = {}  # class -> {attribute: original value or _MISSING}
_MISSING = object()
_WARNED_EVAL = False


# ----------------------------------------------------------------------------------------------------------
# the loss (logits path)

def _shift(labels, ignore_index, shift_labels):
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return shift_labels


def _check_items(n):
    """``num_items_in_batch``: None, a number >= 0 (0: all targets ignored, the loss is transformers' 0 / 0) or a
    one-element real tensor (any device; not read)."""
    if n is None:
        return
    if torch.is_tensor(n):
        if n.numel() != 1 or n.dtype == torch.bool or n.is_complex():
            raise InputError(f"tri_losses.hf: num_items_in_batch: expected a number or a one-element real "
                             f"tensor, got a {n.dtype} tensor of shape {tuple(n.shape)}")
    else:
        _validate.check_number(n, "num_items_in_batch", "tri_losses.hf", low=0)


def causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   ce_kwargs=None, **kwargs):
    """Next-token cross-entropy of a causal LM: a drop-in for transformers' ``ForCausalLMLoss``.

    The loss of position ``t`` is the cross-entropy of ``logits[..., t, :]`` against ``labels[..., t + 1]``
    (the last position has no target), computed by :func:`tri_losses.cross_entropy`.

    Args:
        logits: ``(B, T, V)`` (or ``(T, V)``) float tensor, any of fp32/fp16/bf16 (not upcast to a copy).
        labels: ``(B, T)`` int64 class ids, ``ignore_index`` where no loss is wanted (padding, prompt).
            Not shifted by the caller. May be ``None`` when ``shift_labels`` is given.
        vocab_size: ``V`` as the model's config says it; must equal ``logits.shape[-1]`` (``None``: taken
            from the logits).
        num_items_in_batch: ``None`` for the mean over non-ignored targets; else an int or a tensor, the
            number of non-ignored targets over all gradient-accumulation micro-batches: the loss is
            then the sum divided by it (``Trainer``'s gradient-accumulation normalisation), on device and
            inside the loss, so that ``loss.backward()`` reaches its training fast path with an upstream
            of 1 (no scaling pass over the gradient on Triton).
        ignore_index: label value that contributes nothing (default -100).
        shift_labels: ``(B, T)`` targets already shifted (sequence-parallel training); replaces the shift.
        ce_kwargs: dict of options for :func:`tri_losses.cross_entropy` (``label_smoothing``, ``z_loss``,
            ``focal_gamma``, ``softcap``, ``backend``, ...).
        **kwargs: other loss kwargs transformers passes along; ignored.

    Returns:
        A scalar fp32 loss (fp64 for fp64 logits on the torch backend).

    Raises:
        ValueError: ``vocab_size`` differs from ``logits.shape[-1]``, ``labels`` (``shift_labels``) does
            not have the shape ``logits.shape[:-1]``, or a number ``num_items_in_batch`` is negative.
        TypeError: ``logits``/``labels`` is not a tensor, or ``labels`` does not hold integers.
    """
    if labels is None and torch.is_tensor(shift_labels):  # as ForCausalLMLoss (e.g. Git passes only these)
        labels = shift_labels
    name, ids = ("labels", labels) if shift_labels is None else ("shift_labels", shift_labels)
    return _token_loss("causal_lm_loss", logits, labels, name, ids, vocab_size, num_items_in_batch, ignore_index,
                       ce_kwargs, lambda: _shift(labels, ignore_index, shift_labels))


def masked_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, ce_kwargs=None,
                   **kwargs):
    """Cross-entropy of a masked LM (BERT, RoBERTa, XLM-R, ModernBERT, ELECTRA, ...): a drop-in for
    transformers' ``ForMaskedLMLoss``: the loss of position ``t`` is the cross-entropy of ``logits[..., t, :]``
    against ``labels[..., t]`` (no shift), the mean over the labels that are not ``ignore_index``, or the sum
    over ``num_items_in_batch``; by :func:`tri_losses.cross_entropy` without transformers' fp32 copy of the
    logits. Arguments, result and errors as :func:`causal_lm_loss`'s (without ``shift_labels``); ``labels``
    may have any shape with one id per row of logits (``(B, T)`` for ``(B, T, V)``, or flat), as transformers
    flattens both."""
    def targets():  # any labels with one id per logits row, as ForMaskedLMLoss flattens both
        rows = math.prod(logits.shape[:-1])
        return labels.reshape(logits.shape[:-1]) if labels.numel() == rows else labels
    return _token_loss("masked_lm_loss", logits, labels, "labels", labels, vocab_size, num_items_in_batch,
                       ignore_index, ce_kwargs, targets)


def _check_logits_labels(op, logits, labels, name, ids):
    """TypeError unless ``logits`` and ``labels`` are tensors and ``ids`` (the labels, read as ``name``) integers."""
    if not torch.is_tensor(logits) or not torch.is_tensor(labels):
        raise InputTypeError(f"{op}: logits and labels: expected tensors, got {type(logits).__name__} and "
                             f"{type(labels).__name__}")
    if torch.is_tensor(ids) and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise InputTypeError(f"{op}: {name}: expected integer class ids, got a {ids.dtype} tensor")


def _token_loss(op, logits, labels, name, ids, vocab_size, num_items_in_batch, ignore_index, ce_kwargs, targets):
    """The language-model losses' checks and cross-entropy: ``targets()`` gives the (shifted) label ids."""
    _check_logits_labels(op, logits, labels, name, ids)
    if logits.dim() < 2:
        raise InputError(f"{op}: logits: expected (B, T, V) or (T, V), got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    if vocab_size is not None and int(vocab_size) != V:
        raise InputError(f"{op}: vocab_size: expected logits.shape[-1] = {V}, got {vocab_size}")
    _check_items(num_items_in_batch)
    target = targets()
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise InputError(f"{op}: {name}: expected shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    own = sorted(_CE_OWN & set(ce_kwargs or ()))
    if own:  # set here (the loss is one scalar), not by ce_kwargs
        raise InputTypeError(f"{op}: ce_kwargs: unexpected option {own[0]!r} (set by the integration)")
    # the sum over num_items_in_batch as the loss's own mean (private _denom, kept on device): the training
    # fast path then saves the gradient already divided by it and Trainer's backward is an upstream of 1
    target = _validate.to_device(target.reshape(-1), logits.device, name="labels", op=op)
    return cross_entropy(logits.reshape(-1, V), target, ignore_index=ignore_index,
                         reduction="mean", _denom=num_items_in_batch, **(ce_kwargs or {}))


def ctc_loss(logits, labels, logit_lengths, blank_token_id, reduction="mean", zero_infinity=False, ignore_index=-100,
             ctc_kwargs=None, **kwargs):
    """CTC loss of a speech model's frame logits: a drop-in for transformers' ``ForCTCLoss`` (the loss of
    ``Wav2Vec2ForCTC``, ``HubertForCTC``, ``WavLMForCTC``, ``ParakeetForCTC``, ...).

    As transformers: the label sequence of row b is ``labels[b]`` without its ``ignore_index`` and
    ``blank_token_id`` entries (in order, wherever they are), and the loss is CTC over the log-softmax of
    the logits. Here the log-softmax is fused into :func:`tri_losses.ctc_loss` (``input_type="logits"``: no
    fp32 copy of the ``(B, T, V)`` log-probabilities; the gradient reaching the logits is the same softmax
    minus the posteriors), and the label sequences are compacted on device (no host sync, where
    transformers' ``masked_select`` reads the count).

    Args:
        logits: ``(B, T, V)`` float frame logits (fp32/fp16/bf16: the math is fp32).
        labels: ``(B, U)`` integer labels, padded with ``ignore_index`` or the blank.
        logit_lengths: ``(B,)`` valid frames per row.
        blank_token_id: the blank's class id (the models pass ``config.pad_token_id``).
        reduction: ``"mean"`` (each loss over its label count, then the batch mean: ``F.ctc_loss``'s), ``"sum"``
            or ``"none"``.
        zero_infinity: infeasible rows (more labels than frames allow) give 0 and no gradient.
        ignore_index: the label value of padding (default -100).
        ctc_kwargs: dict of options for :func:`tri_losses.ctc_loss` (``backend``, ``validate``,
            ``max_approx``, ``label_loop``).
        **kwargs: other loss kwargs transformers passes along; ignored.

    Returns:
        The loss (fp32; fp64 for fp64 logits on the torch backend): a scalar, or ``(B,)`` with ``"none"``.

    Raises:
        ValueError: ``logits`` is not ``(B, T, V)``, or ``labels``/``logit_lengths`` do not have B rows.
        TypeError: ``logits``/``labels`` is not a tensor, or ``labels`` does not hold integers.
    """
    op = "tri_losses.hf.ctc_loss"
    _check_logits_labels(op, logits, labels, "labels", labels)
    if logits.dim() != 3:
        raise InputError(f"{op}: logits: expected (B, T, V), got shape {tuple(logits.shape)}")
    if labels.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise InputError(f"{op}: labels: expected (B, U) with B = {logits.shape[0]}, got shape {tuple(labels.shape)}")
    own = sorted(_CTC_OWN & set(ctc_kwargs or ()))
    if own:
        raise InputTypeError(f"{op}: ctc_kwargs: unexpected option {own[0]!r} (set by the integration)")
    labels = _validate.to_device(labels, logits.device, name="labels", op=op)
    keep = (labels != ignore_index) & (labels != blank_token_id)
    lengths = keep.sum(-1)
    # each row's kept labels first, in order (a stable sort of the dropped flags), the rest 0 (not read)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    inside = torch.arange(labels.shape[1], device=labels.device) < lengths[:, None]
    targets = torch.where(inside, labels.gather(1, order), 0)
    return _ctc(logits, targets, logit_lengths, lengths, blank=blank_token_id, reduction=reduction,
                zero_infinity=zero_infinity, input_type="logits", batch_first=True, **(ctc_kwargs or {}))


def trainer_loss(*, task="causal_lm", router_aux_loss_coef=None, **ce_kwargs):
    """A ``compute_loss_func`` for ``transformers.Trainer`` that computes :func:`causal_lm_loss` (or
    :func:`masked_lm_loss` with ``task="masked_lm"``).

    ``Trainer(model, args, compute_loss_func=tri_losses.hf.trainer_loss(label_smoothing=0.1))`` replaces
    the loss of any causal LM (the model itself is not changed; it still builds its logits). With
    ``task="masked_lm"`` it replaces the loss of any masked LM, also those whose forward computes its loss
    itself (BERT, RoBERTa, ...: ``Trainer`` then keeps the labels from the model), normalised as transformers'
    ``ForMaskedLMLoss`` (over ``num_items_in_batch`` under gradient accumulation). ``Trainer``
    hands a ``compute_loss_func`` the ``labels`` only: for batches with pre-shifted ``shift_labels``
    (context parallelism, packing) use :func:`apply` or :func:`patch`, whose loss reads them.

    A mixture-of-experts model with ``output_router_logits`` adds its router's load-balancing loss
    (``router_aux_loss_coef * aux_loss``) to its loss only when it gets the labels, which ``Trainer`` keeps from
    it here: pass ``router_aux_loss_coef=model.config.router_aux_loss_coef`` and the loss adds that term from
    ``outputs.aux_loss`` as the model would (``0.0`` leaves it out). Outputs carrying an ``aux_loss`` without
    the coefficient raise ``ValueError`` rather than silently train without the router loss.

    Args:
        task: ``"causal_lm"`` (next-token targets: the labels shifted) or ``"masked_lm"`` (no shift).
        router_aux_loss_coef: the weight of ``outputs.aux_loss`` (MoE models), or ``None`` for models
            without one.
        **ce_kwargs: options for :func:`tri_losses.cross_entropy` (checked now: an unknown one raises
            ``TypeError``).

    Returns:
        ``f(outputs, labels, num_items_in_batch=None) -> loss`` reading ``outputs.logits`` (and
        ``outputs.aux_loss``).
    """
    _check_ce_kwargs(ce_kwargs, fused=False, where="trainer_loss")
    _validate.check_option(task, "task", "tri_losses.hf.trainer_loss", ("causal_lm", "masked_lm"))
    _validate.check_number(router_aux_loss_coef, "router_aux_loss_coef", "tri_losses.hf.trainer_loss",
                           allow_none=True)
    lm_loss = masked_lm_loss if task == "masked_lm" else causal_lm_loss

    def compute_loss(outputs, labels, num_items_in_batch=None):
        loss = lm_loss(outputs.logits, labels, num_items_in_batch=num_items_in_batch, ce_kwargs=ce_kwargs)
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None:
            if router_aux_loss_coef is None:
                raise InputError("tri_losses.hf.trainer_loss: router_aux_loss_coef: the model returned a router "
                                 "aux_loss (a mixture of experts with output_router_logits), which it adds to its "
                                 "loss only when it gets the labels; pass router_aux_loss_coef="
                                 "model.config.router_aux_loss_coef (0.0 to leave it out), got None")
            if router_aux_loss_coef:
                loss = loss + router_aux_loss_coef * aux.to(loss.device)
        return loss
    return compute_loss


# set by the integration, not by ce_kwargs (size_average/reduce: PyTorch's legacy spelling of reduction;
# return_lse/return_argmax: the model's loss is one scalar, not a tuple)
_CE_OWN = {"input", "target", "reduction", "ignore_index", "size_average", "reduce", "return_lse", "return_argmax",
           "return_entropy"}
_FUSED_ONLY = ("chunk_size", "filter_eps")  # linear_cross_entropy's own: the logits path (eval) leaves them out
# set by a CTC model (or the integration), not by ctc_kwargs
_CTC_OWN = {"log_probs", "targets", "input_lengths", "target_lengths", "blank", "reduction", "zero_infinity",
            "input_type", "batch_first"}


def _logits_kwargs(ce_kwargs):
    """The options for the logits path: ``ce_kwargs`` without the fused path's own."""
    return {k: v for k, v in ce_kwargs.items() if k not in _FUSED_ONLY}


def _check_ce_kwargs(ce_kwargs, fused, where, ctc=False):
    if ctc:
        allowed = set(inspect.signature(_ctc).parameters) - _CTC_OWN
        for name in ce_kwargs:
            if name not in allowed:
                raise InputTypeError(f"{where}: unexpected option {name!r} for a CTC model (the options are "
                                     f"tri_losses.ctc_loss's): expected one of {sorted(allowed)}")
        return
    allowed = set(inspect.signature(cross_entropy).parameters) - _CE_OWN
    if fused:  # the fused model also uses the logits path in eval: both losses must take the option
        allowed &= set(inspect.signature(linear_cross_entropy).parameters) - {"linear_weight", "linear_bias"}
        allowed |= set(_FUSED_ONLY)
    for name in ce_kwargs:
        if name not in allowed:
            raise InputTypeError(f"{where}: ce_kwargs: unexpected option {name!r} for the "
                                 f"{'fused path' if fused else 'logits path'}; expected one of {sorted(allowed)}")


# ----------------------------------------------------------------------------------------------------------
# the fused path

def _head_transform(model):
    """``(scale, softcap)`` of a model's head: logits = softcap(scale * (h @ W.T)). Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2-4 soft-cap, PaliGemma with its text model's
    soft-cap (PaliGemma 2); a multimodal model's own config has none of these."""
    config = model.config
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    if _model_type(type(model)) in _TEXT_CONFIG_SOFTCAP:
        config = _text_config(config)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def _output_class(orig, moe):
    """The output class ``orig`` (a causal LM's ``forward``) declares it returns (a ``ModelOutput``, alone or in a
    union with ``tuple``), so that the fused path returns the model's own output type (e.g. a MoE output from a
    model without a router loss); else transformers' (MoE) causal-LM output."""
    import typing
    from transformers import modeling_outputs
    from transformers.utils import ModelOutput
    ann = inspect.signature(orig).return_annotation
    for c in (ann, *typing.get_args(ann)):
        if isinstance(c, type) and issubclass(c, ModelOutput):
            return c
    return modeling_outputs.MoeCausalLMOutputWithPast if moe else modeling_outputs.CausalLMOutputWithPast


def _keep_positions(hidden, keep):
    """The hidden states of the positions the model's head would see: transformers' own
    ``slice_logits_to_keep`` where it has one (an int, positions, a ``(B, P)`` index or a ``(B, T)`` bool mask),
    else the int/1-D form of transformers 4.x."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
    return slice_logits_to_keep(hidden, keep)


def _text_config(config):
    """The text model's config (a multimodal model's ``text_config``; a text model's own config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _router_setting(model, *names):
    """A MoE router setting as the model's forward reads it: the model's own attribute (``self.num_experts``,
    ``self.router_aux_loss_coef``), else its text config's (multimodal MoE models such as Qwen3-VL-MoE read
    ``config.text_config``)."""
    text = _text_config(model.config)
    for source in (model, text):
        for name in names:
            value = getattr(source, name, None)
            if value is not None:
                return value
    raise AttributeError(f"tri_losses.hf: {type(model).__name__} has no router setting {' / '.join(names)}")


def _fused_forward(self, named, ce_kwargs, balance, out_cls, out_fields, has_keep):
    """Decoder -> (scaled) hidden states -> linear_cross_entropy with the head's weight; ``balance``: the
    model's ``load_balancing_loss_func`` (MoE models, whose ``forward`` takes ``output_router_logits``);
    ``has_keep``: whether the model's ``forward`` takes ``logits_to_keep`` (else a given one is ignored, as there)."""
    labels = named.pop("labels")
    shift_labels = named.pop("shift_labels", None)
    num_items = named.pop("num_items_in_batch", None)
    _check_items(num_items)
    ignore_index = named.pop("ignore_index", -100)
    return_dict = named.pop("return_dict", None)
    keep = named.pop("logits_to_keep", 0)  # the positions the model's head would see (0: all), as its forward
    moe = balance is not None
    if moe and named.get("output_router_logits") is None:
        named["output_router_logits"] = _router_setting(self, "output_router_logits")
    if _transformers_major() >= 5:  # the decoder's outputs by name whatever config.return_dict says
        named["return_dict"] = True
    outputs = self.model(**named)
    hidden = _keep_positions(outputs.last_hidden_state, keep if has_keep else 0)
    head = self.get_output_embeddings()
    scale, softcap = _head_transform(self)
    if scale != 1.0:
        hidden = hidden * scale  # scale * (h @ W.T) = (scale * h) @ W.T; heads with a bias are refused
    ce = dict(ce_kwargs)
    if softcap is not None:  # (a softcap option as well was refused by the forward that calls this)
        ce["softcap"] = softcap
    target = _validate.to_device(_shift(labels, ignore_index, shift_labels), hidden.device, name="labels",
                                 op="tri_losses.hf")
    # under torch.autocast (Trainer's bf16/fp16) the op runs the head's GEMM in the autocast dtype, as autocast
    # runs the model's own lm_head
    loss = linear_cross_entropy(hidden, head.weight, target, linear_bias=head.bias, ignore_index=ignore_index,
                                reduction="mean", _denom=num_items, **ce)  # as in causal_lm_loss
    if hasattr(loss, "to_local"):  # a tensor-parallel head (a DTensor, e.g. tp_plan's colwise_rep): the model's
        loss = loss.to_local()  # own loss is a plain tensor, the same on every rank (this replicated value)
    aux_loss = None
    if moe and named["output_router_logits"]:
        aux_loss = balance(outputs.router_logits, _router_setting(self, "num_experts"),
                           _router_setting(self, "num_experts_per_tok"), named.get("attention_mask"))
        loss = loss + _router_setting(self, "router_aux_loss_coef") * aux_loss.to(loss.device)
    fields = {name: getattr(outputs, name, None) for name in out_fields}  # cache, hidden_states, ...
    fields.update(loss=loss, logits=None)
    if "aux_loss" in fields:
        fields["aux_loss"] = aux_loss
    out = out_cls(**fields)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _warn_eval_once(model):
    global _WARNED_EVAL
    if not _WARNED_EVAL:
        _WARNED_EVAL = True
        warnings.warn(f"tri_losses.hf: {type(model).__name__} is in eval() mode, so the fused path is off and "
                      "full logits are built, although autograd is on; call model.train() for training "
                      "(from_pretrained returns models in eval mode)", UserWarning, stacklevel=3)


def _sharded_alone(head) -> bool:
    """Whether data parallelism shards the head as a unit of its own, so that outside its own ``forward`` its
    weight is not the whole matrix: FSDP2's ``fully_shard(lm_head)`` (a DTensor of this rank's rows, which the
    loss would take for a vocab-parallel head although each rank holds other data) or DeepSpeed ZeRO-3 (a
    partitioned, empty parameter). A head sharded with the whole model is unsharded in the model's forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed
        FSDPModule = ()
    return isinstance(head, FSDPModule) or hasattr(head.weight, "ds_id")


def _plain_head(head):
    """The fused path reads ``head.weight`` / ``head.bias``: only right for an ``nn.Linear`` whose forward is
    ``nn.Linear``'s own (not a LoRA/PEFT wrapper or a quantised layer, whose output differs), that no
    accelerate hook drives (CPU/disk offload or a ``device_map`` placement: its weight may be elsewhere) and
    that data parallelism does not shard on its own (:func:`_sharded_alone`). A head compiled on its own
    (``torch.compile(lm_head)``, Accelerate's regional compilation) is judged by the module it wraps."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (not imported: no compiled module exists)
    if eval_frame is not None and isinstance(head, eval_frame.OptimizedModule):
        head = head._orig_mod
    return (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and getattr(head, "_hf_hook", None) is None and not _sharded_alone(head))


_WARNED_HEAD = set()


def _warn_head_once(model):
    name = type(model).__name__
    if name not in _WARNED_HEAD:
        _WARNED_HEAD.add(name)
        warnings.warn(f"tri_losses.hf: {name}'s output embedding is a {type(model.get_output_embeddings()).__name__} "
                      "(e.g. LoRA on lm_head, a quantised layer, one driven by an accelerate hook: offloaded or "
                      "placed by a device_map, or one that FSDP2 / DeepSpeed ZeRO-3 shards on its own), not a plain "
                      "nn.Linear, so the fused path is off "
                      "for it: the model builds its logits and the logits path computes the loss", UserWarning,
                      stacklevel=3)


def _check_softcap(model, ce_kwargs):
    """A ``softcap`` loss option on a model that soft-caps its own logits raises, even an equal one: the logits
    path (eval mode) would cap the model's capped logits again. Checked by ``apply`` and by every fused-forward
    call with labels, training or not."""
    softcap = _head_transform(model)[1]
    if softcap is not None and "softcap" in ce_kwargs:
        raise InputError(f"tri_losses.hf: softcap={ce_kwargs['softcap']!r}: {type(model).__name__} soft-caps its "
                         f"logits itself (final_logit_softcapping={softcap}); leave softcap out of the loss options "
                         "and set the model's config instead (the logits path would cap the model's capped logits "
                         "again)")


def _make_fused_forward(orig, ce_kwargs):
    """A ``forward`` with ``orig``'s signature (``functools.wraps``: ``inspect.signature``, ``Trainer``'s
    column filter and ``torch.compile`` see the model's own) that takes the fused path in training."""
    params = list(inspect.signature(orig).parameters.values())[1:]  # without self
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    moe = any(p.name == "output_router_logits" for p in params)
    out_cls = _output_class(orig, moe)
    out_fields = [f.name for f in dataclasses.fields(out_cls)]
    # the router's auxiliary loss as the model's module defines it (a subclass elsewhere keeps its base's)
    balance = getattr(sys.modules.get(orig.__module__), "load_balancing_loss_func", None) if moe else None
    has_keep = any(p.name == "logits_to_keep" for p in params)

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        if _unwrap(type(self).forward) is not orig:  # a subclass's own forward calling super().forward
            return orig(self, *args, **kwargs)  # its own path (the logits path), as an overriding class gets
        if len(args) > len(positional) or any(name in kwargs for name in positional[:len(args)]):
            return orig(self, *args, **kwargs)  # the model's own argument errors
        named = dict(zip(positional, args))
        named.update(kwargs)
        if named.get("labels") is None:
            return orig(self, *args, **kwargs)
        _check_softcap(self, ce_kwargs)
        if not self.training:
            if torch.is_grad_enabled():
                _warn_eval_once(self)
            return orig(self, *args, **kwargs)
        if not _plain_head(self.get_output_embeddings()):  # e.g. LoRA on lm_head after patch(): its own forward
            _warn_head_once(self)
            return orig(self, *args, **kwargs)
        if _transformers_major() < 5 and not getattr(self.config, "use_return_dict", True):
            return orig(self, *args, **kwargs)  # 4.x: its decoder would return a tuple (the model's own path)
        return _fused_forward(self, named, ce_kwargs, balance, out_cls, out_fields, has_keep)

    forward._tri_losses_wraps = orig
    # the signature without a __wrapped__ link: Accelerate's unwrap_model follows __wrapped__ to the innermost
    # function and binds that, which would drop the fused path (and this module's own unwrapping uses
    # _tri_losses_wraps)
    forward.__signature__ = inspect.signature(orig)
    del forward.__wrapped__
    return forward


# ----------------------------------------------------------------------------------------------------------
# checks

def _mappings():
    from transformers.models.auto import modeling_auto as ma
    causal = dict(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    multimodal = dict(getattr(ma, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}))
    return causal, multimodal


def _ctc_mapping():
    from transformers.models.auto import modeling_auto as ma
    return dict(getattr(ma, "MODEL_FOR_CTC_MAPPING_NAMES", {}))


def _masked_lm_mapping():
    from transformers.models.auto import modeling_auto as ma
    return dict(getattr(ma, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", {}))


def _is_ctc(cls) -> bool:
    """Whether ``cls`` (or the class it derives from) is a CTC speech model (``*ForCTC``)."""
    ctc = set(_ctc_mapping().values())
    return any(c.__name__ in ctc or c.__name__.endswith("ForCTC") for c in cls.__mro__)


def _is_masked_lm(cls) -> bool:
    """Whether ``cls`` (or the class it derives from) is an encoder's masked LM (``*ForMaskedLM``; not the
    encoder-decoder models the masked-LM mapping also lists for mask filling)."""
    return any(c.__name__.endswith("ForMaskedLM") for c in cls.__mro__)


def _model_type(cls):
    config_class = getattr(cls, "config_class", None)
    return getattr(config_class, "model_type", None)


def _transformers_major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def _check_class(cls, fused, where):
    """ValueError unless ``cls`` is a decoder-only causal LM (and, for ``fused``, of a tested model type), an
    encoder's masked LM or a CTC speech model (these two not ``fused``). Returns which: ``"causal"``,
    ``"masked"`` or ``"ctc"``."""
    from transformers import PreTrainedModel
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise InputTypeError(f"{where}: expected a transformers PreTrainedModel (class), got {cls!r}")
    name = cls.__name__
    model_type = _model_type(cls)
    for kind, test, what, instead in (
            ("ctc", _is_ctc, "a CTC model (frame logits, no LM head to fuse with the loss)",
             "transformers 4.x's CTC models do"),
            ("masked", _is_masked_lm, "a masked LM (its head transforms the hidden states before the vocabulary "
                                      "projection)",
             "use Trainer(compute_loss_func=tri_losses.hf.trainer_loss(task='masked_lm'))")):
        if not test(cls):
            continue
        if fused:
            raise InputError(f"{where}: fused=True: {name} is {what}; use fused=False")
        if not _calls_loss_function(cls):
            raise InputError(f"{where}: {name} (model type {model_type!r}): its forward computes its loss itself "
                             f"instead of calling self.loss_function, so the loss cannot be replaced here ({instead})")
        return kind
    causal, multimodal = _mappings()
    names = [c.__name__ for c in cls.__mro__]  # a subclass of a causal LM class is judged as that class
    config_class = getattr(cls, "config_class", None)
    encoder_decoder = bool(getattr(config_class, "is_encoder_decoder", False)) or name in {
        "EncoderDecoderModel", "SpeechEncoderDecoderModel", "VisionEncoderDecoderModel"}
    if not encoder_decoder and config_class is not None:
        try:
            encoder_decoder = bool(config_class().is_encoder_decoder)
        except Exception:  # configs that need arguments: judged by the class below
            pass
    if encoder_decoder:
        raise InputError(f"{where}: {name} (model type {model_type!r}) is an encoder-decoder model; tri_losses.hf "
                         "supports decoder-only causal LMs (its causal label shift would give a wrong loss)")
    is_multimodal = any(n in multimodal.values() for n in names)
    if not any(n in causal.values() or n in multimodal.values() or n.endswith("ForCausalLM") for n in names):
        raise InputError(f"{where}: {name} (model type {model_type!r}) is not a causal language model (expected a "
                         "*ForCausalLM or a multimodal *ForConditionalGeneration whose head predicts the next "
                         "token, e.g. LlamaForCausalLM, or a *ForMaskedLM or *ForCTC model that calls "
                         "self.loss_function)")
    if not _calls_loss_function(cls):
        raise InputError(f"{where}: {name}.forward does not call self.loss_function, so the logits path cannot "
                         "replace its loss; use Trainer(compute_loss_func=tri_losses.hf.trainer_loss())")
    if fused:
        if is_multimodal and not any(n.endswith("ForCausalLM") for n in names):
            if model_type not in FUSED_MODEL_TYPES:
                raise InputError(f"{where}: fused=True: {name} (model type {model_type!r}) is a multimodal model "
                                 "outside the tested fused model types (multimodal ones: "
                                 f"{sorted(k for k, v in FUSED_MODEL_TYPES.items() if 'multimodal' in v[1])}); use "
                                 "fused=False (the logits path) here")
            if _transformers_major() < 5:
                raise InputError(f"{where}: fused=True: {name} is a multimodal model, fused only with transformers "
                                 ">= 5 (whose multimodal models run the vision tower inside .model); use "
                                 "fused=False (the logits path) here")
        base = next((c for c in cls.__mro__ if c.__name__ == FUSED_MODEL_TYPES.get(model_type, (None,))[0]), None)
        if base is None:
            raise InputError(f"{where}: fused=True: {name} (model type {model_type!r}) is not one of the tested "
                             f"fused model types {sorted(FUSED_MODEL_TYPES)}, whose head post-processing the fused "
                             "path reproduces; use fused=False (the logits path works for any causal LM)")
        if base is not cls and _plain_forward(cls) is not _plain_forward(base):
            raise InputError(f"{where}: fused=True: {name} overrides {base.__name__}.forward, which the fused path "
                             "replaces (its extra outputs would be lost); use fused=False")
    return "causal"


def _loss_for(kind, ce_kwargs):
    """The ``loss_function`` :func:`apply` and :func:`patch` install for a model of ``kind``."""
    if kind == "ctc":
        return functools.partial(ctc_loss, ctc_kwargs=dict(ce_kwargs))
    loss = masked_lm_loss if kind == "masked" else causal_lm_loss
    return functools.partial(loss, ce_kwargs=_logits_kwargs(ce_kwargs))


def _calls_loss_function(cls):
    """Whether ``cls.forward`` calls ``self.loss_function``, following ``super()`` calls up the classes."""
    for c in cls.__mro__:
        if "forward" not in vars(c):
            continue
        try:
            source = inspect.getsource(_unwrap(vars(c)["forward"]))
        except (OSError, TypeError):
            return True  # no source (frozen, compiled): trust the causal-LM mapping
        if "loss_function" in source:
            return True
        if "super(" not in source:
            return False
    return False


def _unwrap(forward):
    """A ``forward`` without the fused wrappers :func:`patch` put around it."""
    while hasattr(forward, "_tri_losses_wraps"):
        forward = forward._tri_losses_wraps
    return forward


def _plain_forward(cls):
    return _unwrap(cls.forward)


def _check_head(model, where):
    """The fused path's head: an ``nn.Linear`` (D -> V) on the decoder's last hidden state."""
    head = model.get_output_embeddings()
    config = _text_config(model.config)
    hidden, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
    if not _plain_head(head):
        raise InputError(f"{where}: fused=True: {type(model).__name__}'s output embedding must be a plain "
                         f"nn.Linear on the last hidden state, got {type(head).__module__}.{type(head).__name__} "
                         "(a LoRA/PEFT-wrapped or quantised head changes the logits the fused path cannot see, and an "
                         "accelerate hook (offload, device_map) or FSDP2 / ZeRO-3 sharding the head on its own keeps "
                         "its weight elsewhere: use fused=False, or PEFT's modules_to_save=['lm_head'])")
    if (head.in_features, head.out_features) != (hidden, vocab):
        raise InputError(f"{where}: fused=True: {type(model).__name__}'s head: expected nn.Linear(hidden_size="
                         f"{hidden}, vocab_size={vocab}), got nn.Linear({head.in_features}, {head.out_features})")
    if head.bias is not None and _head_transform(model)[0] != 1.0:
        raise InputError(f"{where}: fused=True: a scaled head with a bias is not supported; use fused=False")
    if not isinstance(getattr(model, "model", None), torch.nn.Module):
        raise InputError(f"{where}: fused=True: {type(model).__name__} has no decoder at .model; use fused=False")


# ----------------------------------------------------------------------------------------------------------
# public entry points

def apply(model, *, fused: bool = False, **ce_kwargs):
    """Make one transformers causal-LM (or masked-LM, or CTC speech model) instance compute its loss with
    tri_losses.

    ``fused=False`` (logits path) sets ``model.loss_function`` to :func:`causal_lm_loss` (:func:`masked_lm_loss`
    for a masked LM, :func:`ctc_loss` for a CTC model);
    ``fused=True`` also replaces ``model.forward`` (an instance attribute with the class's signature)
    so that training steps with ``labels`` never build the logits. See the module docstring for what
    each path does in ``eval()`` mode. Applying again replaces the previous settings.

    Args:
        model: a ``transformers`` decoder-only causal LM (``*ForCausalLM``; multimodal
            ``*ForConditionalGeneration`` with ``fused=False`` only), or a masked LM (``*ForMaskedLM``) or a
            CTC speech model (``*ForCTC``) whose forward calls ``self.loss_function``, with ``fused=False``.
        fused: take the fused linear-cross-entropy path in training (model types in
            :data:`FUSED_MODEL_TYPES`).
        **ce_kwargs: loss options (``label_smoothing``, ``z_loss``, ``focal_gamma``, ``softcap``,
            ``backend``, ...), passed to :func:`tri_losses.cross_entropy` /
            :func:`tri_losses.linear_cross_entropy`: with ``fused=True`` an option both take, or
            ``chunk_size`` / ``filter_eps`` (the fused path's own; the logits path leaves them out). For a
            CTC model, :func:`tri_losses.ctc_loss`'s options (``backend``, ``validate``, ...).

    Returns:
        ``model`` (changed in place).

    Raises:
        ValueError: the model is not a decoder-only causal LM, a masked LM or a CTC model (encoder-decoder such
            as T5, sequence classification, ...), or ``fused=True`` for a masked LM, a CTC model or a model type outside
            :data:`FUSED_MODEL_TYPES` (a
            multimodal one also with transformers 4.x), or a head that is not an ``nn.Linear(hidden_size,
            vocab_size)``.
        TypeError: ``model`` is not a ``PreTrainedModel``, or an unknown option in ``ce_kwargs``.
    """
    where = "tri_losses.hf.apply"
    _validate.check_bool(where, fused=fused)
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise InputTypeError(f"{where}: model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    kind = _check_class(type(model), fused, where)
    _check_ce_kwargs(ce_kwargs, fused, where, kind == "ctc")
    if fused:
        _check_head(model, where)
        _check_softcap(model, ce_kwargs)
    model.loss_function = _loss_for(kind, ce_kwargs)
    for name in ("forward", "_replicate_for_data_parallel"):
        vars(model).pop(name, None)
    if fused or hasattr(type(model).forward, "_tri_losses_wraps"):  # (a class patched fused: not this instance)
        model.forward = _InstanceForward(model, fused, ce_kwargs)
        model._replicate_for_data_parallel = functools.partial(_replicate_for_data_parallel, model)
    return model


def _replicate_for_data_parallel(model):
    """``nn.DataParallel``'s replica of an applied model (what ``nn.Module._replicate_for_data_parallel`` makes,
    an instance-attribute override: it wins over the class's method), with :func:`apply`'s forward bound to the
    replica. The replica shares the model's ``__dict__`` copy, so the forward would otherwise run the original
    model (its parameters on the first device) on every replica's inputs."""
    replica = torch.nn.Module._replicate_for_data_parallel(model)
    spec = getattr(replica.__dict__.get("forward"), "_tri_losses_spec", None)
    if spec is not None:
        replica.__dict__["forward"] = _InstanceForward(replica, *spec)
        replica.__dict__["_replicate_for_data_parallel"] = functools.partial(_replicate_for_data_parallel, replica)
    return replica


class _InstanceForward(functools.partial):
    """:func:`apply`'s ``forward`` of one instance: the fused forward (or, for an instance of a class patched
    fused, the plain one) with the model as its first argument, i.e. a bound call. A ``functools.partial``
    rather than a bound method so that pickling the model (``torch.save(model)``) and ``copy.deepcopy``
    rebuild it for the new instance (``__reduce__``: a bound method is pickled as ``getattr(model,
    "forward")``, which on loading reads the class's forward of that moment and keeps it in the instance),
    while what rebinds a shallow copy's methods (Accelerate's regional compilation) still sees a partial whose
    first argument is the module. The class's signature (``__signature__``), no ``__wrapped__`` link (see
    :func:`_make_fused_forward`) and no ``__func__`` (Accelerate then wraps it as a plain function)."""

    def __new__(cls, model, fused, ce_kwargs):
        plain = _plain_forward(type(model))
        fn = _make_fused_forward(plain, dict(ce_kwargs)) if fused else plain
        self = super().__new__(cls, fn, model)
        self.__signature__ = inspect.signature(fn.__get__(model))
        self._tri_losses_spec = (bool(fused), dict(ce_kwargs))
        return self

    def __reduce__(self):
        return _InstanceForward, (self.args[0],) + self._tri_losses_spec

    def __repr__(self):
        return f"<tri_losses.hf forward of {type(self.args[0]).__name__} (fused={self._tri_losses_spec[0]})>"


def _resolve(model_type_or_class, where):
    if isinstance(model_type_or_class, str):
        causal, multimodal = _mappings()
        name = (causal.get(model_type_or_class) or multimodal.get(model_type_or_class)
                or _ctc_mapping().get(model_type_or_class) or _masked_lm_mapping().get(model_type_or_class))
        if name is None:
            raise InputError(f"{where}: model_type_or_class: unknown causal-LM, CTC or masked-LM model type "
                             f"{model_type_or_class!r} (fused path tested on {sorted(FUSED_MODEL_TYPES)})")
        import transformers
        return getattr(transformers, name)
    return model_type_or_class


class _Patch:
    """What :func:`patch` returns: ``with patch(...):`` undoes the patch on exit."""

    def __init__(self, cls):
        self.cls = cls

    def __enter__(self):
        return self.cls

    def __exit__(self, *exc):
        unpatch(self.cls)
        return False

    def __repr__(self):
        return f"<tri_losses.hf.patch of {self.cls.__name__}>"


def _loss_property(loss_fn):
    def get(self):
        return self.__dict__.get("_loss_function", loss_fn)  # an instance's own (apply) wins

    def set(self, value):
        self.__dict__["_loss_function"] = value
    return property(get, set)


def patch(model_type_or_class, *, fused: bool = False, **ce_kwargs):
    """Patch a causal-LM class before loading, so every instance uses tri_losses (like ``apply``).

    ``tri_losses.hf.patch("llama", fused=True)`` then ``LlamaForCausalLM.from_pretrained(...)`` or
    ``AutoModelForCausalLM.from_pretrained(...)`` (and any ``Trainer``) trains with the fused loss. The
    class's ``loss_function`` (and, with ``fused=True``, its ``forward``, keeping its signature) are
    replaced; instances that already exist change too. Patching again replaces the previous settings.

    Args:
        model_type_or_class: a ``config.model_type`` (``"llama"``, ``"qwen3"``, ``"gemma3_text"``, ...:
            the class ``AutoModelForCausalLM`` maps it to, or for a multimodal type the
            image-text-to-text class, then for a speech type such as ``"wav2vec2"`` the ``AutoModelForCTC``
            class, then the ``AutoModelForMaskedLM`` class: ``"modernbert"``; a type with a causal LM, such as
            ``"bert"``, resolves to that, and its masked LM computes its own loss: give ``Trainer``
            :func:`trainer_loss` with ``task="masked_lm"``) or a model class (``transformers.LlamaForCausalLM``,
            ``transformers.ModernBertForMaskedLM``).
        fused: as in :func:`apply`.
        **ce_kwargs: as in :func:`apply`.

    Returns:
        A handle that is also a context manager: ``with tri_losses.hf.patch("llama"): ...`` unpatches on exit.

    Raises:
        ValueError: unknown model type, or a class :func:`apply` would refuse.
        TypeError: not a ``PreTrainedModel`` class, or an unknown option in ``ce_kwargs``.
    """
    where = "tri_losses.hf.patch"
    _validate.check_bool(where, fused=fused)
    cls = _resolve(model_type_or_class, where)
    kind = _check_class(cls, fused, where)
    _check_ce_kwargs(ce_kwargs, fused, where, kind == "ctc")
    unpatch(cls)
    saved = {name: vars(cls).get(name, _MISSING) for name in ("loss_function", "forward")}
    _PATCHED[cls] = saved
    cls.loss_function = _loss_property(_loss_for(kind, ce_kwargs))
    if fused:
        cls.forward = _make_fused_forward(_plain_forward(cls), dict(ce_kwargs))
    else:  # the class's own plain forward, also when a base class is (or is later) patched fused
        cls.forward = _plain_forward(cls)
    return _Patch(cls)


def unpatch(model_type_or_class):
    """Undo :func:`patch` on a class (a model type or a class); nothing happens if it is not patched.

    Returns:
        ``True`` if the class was patched.
    """
    cls = _resolve(model_type_or_class, "tri_losses.hf.unpatch")
    saved = _PATCHED.pop(cls, None)
    if saved is None:
        return False
    for name, value in saved.items():
        if value is _MISSING:
            if name in vars(cls):
                delattr(cls, name)
        else:
            setattr(cls, name, value)
    return True


# ----------------------------------------------------------------------------------------------------------
# TRL: the trainers' fused LM head on linear_cross_entropy

#: The per-token outputs of TRL's fused LM head that :func:`add_fused_lm_head` computes.
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")


_FusedCausalLMOutput = None  # the output class where TRL is not loaded (made on first use)


def _fused_output_class():
    """TRL's ``FusedCausalLMOutput`` where TRL is loaded, else a ``ModelOutput`` with its fields."""
    cls = getattr(sys.modules.get("trl.trainer.utils"), "FusedCausalLMOutput", None)
    if cls is not None:
        return cls
    global _FusedCausalLMOutput
    if _FusedCausalLMOutput is None:
        from transformers.utils import ModelOutput

        @dataclasses.dataclass
        class FusedCausalLMOutput(ModelOutput):
            loss: torch.Tensor = None
            log_probs: torch.Tensor = None
            entropy: torch.Tensor = None
            log_sum_sq_probs: torch.Tensor = None
            mean_logits: torch.Tensor = None
            is_top1: torch.Tensor = None
            label_mask: torch.Tensor = None
            aux_loss: torch.Tensor = None
        _FusedCausalLMOutput = FusedCausalLMOutput
    return _FusedCausalLMOutput


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple = ("log_probs",)):
    """TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, TRL 1.x) on :func:`linear_cross_entropy`:
    ``model(..., labels=labels, fused_lm_head=True)`` runs the decoder and returns, without the logits, TRL's
    ``FusedCausalLMOutput`` (a ``ModelOutput`` with its fields where TRL is not loaded) for the next-token
    labels (``labels`` shifted, or pre-shifted ``shift_labels``): ``log_probs`` (each label's log-probability
    under the ``temperature``-scaled distribution, differentiable), ``entropy`` (differentiable) and
    ``is_top1`` (the label is the first maximum of the logits) where asked for in ``outputs`` (every
    per-token field 0 where the label is -100), ``label_mask``, ``loss`` (``-log_probs.sum()`` over
    ``num_items_in_batch``, else the label count, plus the router's auxiliary loss of MoE models that
    return router logits) and ``aux_loss``. Without ``fused_lm_head=True`` the model's own ``forward`` runs.
    Only labelled positions are scored (as TRL does on GPUs: their selection reads the mask's count on the
    host). The model's head post-processing (soft-cap, logit scales) is applied as on the fused path of
    :func:`apply`. ``cast_lm_head_to_fp32``: the head's GEMM in fp32, outside autocast.

    Supported: the model types of :data:`FUSED_MODEL_TYPES` with a plain ``nn.Linear`` head, ``outputs``
    among :data:`TRL_OUTPUTS` (not ``log_sum_sq_probs``/``mean_logits``), and ``temperature`` 1 on a model
    that soft-caps its logits (TRL divides the capped logits). Otherwise ``ValueError``; :func:`patch_trl`
    then keeps TRL's own head for that model. Apply it before wrapping the model with PEFT, as TRL's. Returns
    ``model``."""
    where = "tri_losses.hf.add_fused_lm_head"
    _check_class(type(model), True, where)
    _check_head(model, where)
    _validate.check_bool(where, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        raise InputTypeError(f"{where}: outputs: expected a tuple of names, got {outputs!r}")
    unknown = [o for o in outputs if o not in TRL_OUTPUTS]
    if unknown:
        raise InputError(f"{where}: outputs: {unknown} not computed here (only {list(TRL_OUTPUTS)}); TRL's own "
                         "head computes them")
    _validate.check_number(temperature, "temperature", where, low=0.0, low_inclusive=False, high=math.inf,
                           high_inclusive=False)
    temperature = float(temperature)
    scale, softcap = _head_transform(model)
    if softcap is not None and temperature != 1.0:
        raise InputError(f"{where}: temperature: {type(model).__name__} soft-caps its logits and TRL divides the "
                         f"capped logits by the temperature, which the fused loss cannot express; got "
                         f"temperature={temperature} (1.0 is supported)")
    cls_forward = _unwrap(type(model).forward)
    params = list(inspect.signature(cls_forward).parameters.values())[1:]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    moe = any(p.name == "output_router_logits" for p in params)
    balance = getattr(sys.modules.get(cls_forward.__module__), "load_balancing_loss_func", None) if moe else None
    original = model.forward
    want = frozenset(outputs)

    @functools.wraps(cls_forward)  # (generate validates its model kwargs against the signature)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise InputError(f"{where}: fused_lm_head=True needs labels (or shift_labels)")
        kwargs.update(zip(positional, args))
        return _trl_fused(self, kwargs, labels, shift_labels, num_items_in_batch, temperature, cast_lm_head_to_fp32,
                          want, balance)

    forward.__signature__ = inspect.signature(cls_forward)
    del forward.__wrapped__
    model.forward = forward.__get__(model)
    return model


def _trl_fused(model, named, labels, shift_labels, num_items, temperature, fp32, want, balance):
    """The fused call of :func:`add_fused_lm_head`'s forward."""
    _check_items(num_items)
    named["use_cache"] = False
    moe = balance is not None
    if moe and named.get("output_router_logits") is None:
        named["output_router_logits"] = bool(getattr(_text_config(model.config), "output_router_logits", False))
    if _transformers_major() >= 5:
        named["return_dict"] = True
    out = model.model(**named)
    hidden = out.last_hidden_state
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    head = model.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    target = _validate.to_device(target, hidden.device, name="labels", op="tri_losses.hf.add_fused_lm_head")
    mask = target != -100
    scale, softcap = _head_transform(model)
    # the labelled positions only: their indices read once on the host (one sync), the rows and labels gathered
    at = mask.nonzero().unbind(1)
    rows = picked = hidden[at]
    labelled = target[at]
    if fp32:  # (before the scale: a bf16 hidden state scaled by 1 / T would be rounded to bf16 again)
        rows, w, b = rows.float(), w.float(), b.float() if b is not None else None
    scale = scale / temperature
    kinds = [k for k, field in (("argmax", "is_top1"), ("entropy", "entropy")) if field in want]
    with torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        if not _plain_head(head):  # e.g. PEFT wrapped lm_head after the head was added: the head's own output
            _warn_head_once(model)
            got = _token_outputs(head(picked).float() * scale, labelled, softcap, kinds)
        else:
            if scale != 1.0:
                rows = rows * scale  # (scale * h) @ W.T (+ b * scale: a scaled head with a bias is refused, 1 / T)
                b = b * scale if b is not None else b
            res = linear_cross_entropy(rows, w, labelled, linear_bias=b, reduction="none", softcap=softcap,
                                       **{f"return_{k}": True for k in kinds})
            got = dict(zip(["nll"] + kinds, res if isinstance(res, tuple) else (res,)))

    def scatter(t):  # back to the (B, T) positions, 0 where the label is -100, connected to the graph
        return t.new_zeros(mask.shape).masked_scatter(mask, t)
    log_probs = scatter(-got["nll"])
    fields = dict(log_probs=log_probs, label_mask=mask,
                  entropy=scatter(got["entropy"]) if "entropy" in want else None,
                  is_top1=scatter(got["argmax"] == labelled) if "is_top1" in want else None)
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -log_probs.sum() / count
    aux_loss = None
    if moe and named["output_router_logits"]:
        aux_loss = balance(out.router_logits, _router_setting(model, "num_experts"),
                           _router_setting(model, "num_experts_per_tok"), named.get("attention_mask"))
        loss = loss + _router_setting(model, "router_aux_loss_coef") * aux_loss.to(loss.device)
    return _fused_output_class()(loss=loss, aux_loss=aux_loss, **fields)


def _token_outputs(z, target, softcap, kinds):
    """:func:`_trl_fused`'s per-token values from materialised (scaled) logits ``z``: the label's negative
    log-probability and, in ``kinds``, the argmax and the entropy of the soft-capped logits."""
    z = softcap * torch.tanh(z / softcap) if softcap else z
    logp = z.log_softmax(-1)
    got = dict(nll=-logp.gather(-1, target[:, None])[:, 0])
    if "argmax" in kinds:
        got["argmax"] = z.argmax(-1)
    if "entropy" in kinds:
        got["entropy"] = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    return got


_TRL_ORIGINAL = []  # TRL's own add_fused_lm_head while patch_trl is in effect
_WARNED_TRL = set()


#: TRL's trainer modules whose fused-head requests :func:`add_fused_lm_head` computes (DPO and KTO ask for
#: ``mean_logits``/``log_sum_sq_probs`` for the policy: its reference model getting another head than the
#: policy would make their log-ratios nonzero at equal weights, so they keep TRL's head for both).
TRL_TRAINERS = ("sft_trainer", "grpo_trainer", "rloo_trainer")


def patch_trl():
    """Make TRL's ``SFTTrainer``, ``GRPOTrainer`` and ``RLOOTrainer`` (TRL 1.x, whose trainers install a fused LM
    head on the models they train: the policy and its reference model) install :func:`add_fused_lm_head`, this
    package's, instead of TRL's own: call it before building the trainer. Other trainers (DPO, KTO: they ask for
    outputs this package does not compute) keep TRL's. Where this package's head does not support a model (a
    model type outside :data:`FUSED_MODEL_TYPES`, a temperature on a soft-capping model, a head that is not a
    plain ``nn.Linear``), TRL's own head is installed for it, with a warning naming why (once per reason).
    :func:`unpatch_trl` restores TRL's. Returns ``True`` if this call patched (``False``: already patched)."""
    import importlib
    try:
        import trl.trainer.utils as trl_utils
        modules = [importlib.import_module(f"trl.trainer.{name}") for name in TRL_TRAINERS]
    except ImportError as e:
        raise ImportError(f"tri_losses.hf.patch_trl: TRL is not importable ({e})") from e
    if _TRL_ORIGINAL:
        return False
    original = trl_utils.add_fused_lm_head
    _TRL_ORIGINAL.append(original)

    @functools.wraps(original)
    def install(model, *args, **kwargs):
        try:
            return add_fused_lm_head(model, *args, **kwargs)
        except (InputError, InputTypeError) as e:
            reason = str(e)
            if reason not in _WARNED_TRL:
                _WARNED_TRL.add(reason)
                warnings.warn(f"tri_losses.hf.patch_trl: TRL's own fused LM head for {type(model).__name__}: "
                              f"{reason}", UserWarning, stacklevel=2)
            return original(model, *args, **kwargs)

    install._tri_losses_trl = True
    for mod in modules:
        if mod.add_fused_lm_head is original:
            mod.add_fused_lm_head = install
    return True


def unpatch_trl():
    """Undo :func:`patch_trl` (trainers built from now on install TRL's own head; models that have a head
    keep it). Returns ``True`` if TRL was patched."""
    if not _TRL_ORIGINAL:
        return False
    original = _TRL_ORIGINAL.pop()
    for name in TRL_TRAINERS:
        mod = sys.modules.get(f"trl.trainer.{name}")
        if getattr(getattr(mod, "add_fused_lm_head", None), "_tri_losses_trl", False):
            mod.add_fused_lm_head = original
    return True
