"""Hugging Face integration on tiny randomly initialised models built from configs (no download).

Every loss and gradient is compared with the model's own (transformers' ForCausalLMLoss on the full
logits, with the model's own head post-processing)."""
import copy
import functools
import inspect
import sys
import tempfile
import warnings

import pytest
import torch

from tests.conftest import DEVICE, assert_close

transformers = pytest.importorskip("transformers")
import transformers.loss.loss_utils  # noqa: E402 (the model's own loss; not imported by `import transformers`)

import tri_losses  # noqa: E402
import tri_losses.hf  # noqa: E402

V = 96
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# per family: what makes its head or loss differ from Llama's, set so the test sees it
_MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
_LINEAR_ATTN = dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
_MLA = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
            topk_group=1, head_dim=8)
_EXTRA = {
    "mixtral": dict(num_local_experts=4, **_MOE),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, **_MOE),
    "qwen3_next": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_MOE,
                       **_LINEAR_ATTN),
    "qwen3_5_text": dict(_LINEAR_ATTN),
    "qwen3_5_moe_text": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_MOE,
                             **_LINEAR_ATTN),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, head_dim=8, intermediate_size_mlp=64),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=5.0),
    "gemma3_text": dict(head_dim=8, final_logit_softcapping=5.0, sliding_window=4),
    "gemma3n_text": dict(head_dim=8, final_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"],
                         num_kv_shared_layers=0, vocab_size_per_layer_input=V, hidden_size_per_layer_input=8,
                         laurel_rank=4, activation_sparsity_pattern=[0.0, 0.0], intermediate_size=[64, 64],
                         sliding_window=4),
    "gemma4_text": dict(head_dim=8, final_logit_softcapping=5.0, vocab_size_per_layer_input=V,
                        hidden_size_per_layer_input=8, per_layer_config={}),
    "vaultgemma": dict(head_dim=8, final_logit_softcapping=5.0),
    "phimoe": dict(num_local_experts=4, router_jitter_noise=0.0, lm_head_bias=True, **_MOE),  # no router noise
    "granite": dict(logits_scaling=8.0),
    "granitemoe": dict(num_local_experts=4, logits_scaling=8.0, **_MOE),
    "granitemoeshared": dict(num_local_experts=4, logits_scaling=8.0, shared_intermediate_size=32, **_MOE),
    "cohere": dict(logit_scale=0.3),
    "cohere2": dict(logit_scale=0.3),
    "olmoe": dict(num_experts=4, **_MOE),
    "flex_olmo": dict(num_experts=4, **_MOE),
    "gpt_oss": dict(num_local_experts=4, head_dim=8, **_MOE),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, output_router_logits=True,
                         router_aux_loss_coef=0.1),
    "minimax": dict(num_local_experts=4, head_dim=8, **_MOE),
    "deepseek_v2": dict(_MLA, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        v_head_dim=8, qk_nope_head_dim=8),
    "deepseek_v3": dict(_MLA, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        v_head_dim=8, qk_nope_head_dim=8),
    "glm4_moe": dict(_MLA),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=8),
    "seed_oss": dict(head_dim=8, attention_dropout=0.0, residual_dropout=0.0),  # dropout would differ per run
    "ministral": dict(head_dim=8),
    "hunyuan_v1_dense": dict(head_dim=8),
    "helium": dict(head_dim=8),
}


def _family_class(model_type):
    """The family's causal-LM class, or a skip where the installed transformers has none (a family newer than it)."""
    name = tri_losses.hf.FUSED_MODEL_TYPES[model_type][0]
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    if model_type == "llama4_text" and tri_losses.hf._transformers_major() < 5:
        pytest.skip("transformers 4.x's Llama4ForCausalLM fails in fp32 on its own (bf16 keys in its attention)")
    return cls


def _tiny(model_type="llama", **overrides):
    """(class, config) of a tiny model of a family."""
    cls = _family_class(model_type)
    cfg = cls.config_class(**{**_COMMON, **_EXTRA.get(model_type, {}), **overrides})
    return cls, cfg


def _model(model_type="llama", **overrides):
    cls, cfg = _tiny(model_type, **overrides)
    torch.manual_seed(0)
    return cls(cfg).float().train().to(DEVICE)  # initialised on the CPU (the same weights on every device)


def _batch():
    ids = torch.randint(3, V, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 7:] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


def _loss_and_grads(model, ids, labels=None, upstream=None, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward(upstream)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(out, g, ref_out, ref_g):
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    assert g.keys() == ref_g.keys()
    for n in ref_g:
        assert_close(g[n], ref_g[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.fixture(autouse=True)
def _no_leftover_patches():
    yield
    for cls in list(tri_losses.hf._PATCHED):
        tri_losses.hf.unpatch(cls)


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
@pytest.mark.parametrize("num_items,upstream", [(None, None), (13, None), ("tensor", None), ("tensor", "random")])
def test_hf_matches_model_own_loss(backend, fused, num_items, upstream):
    """Also Trainer's gradient-accumulation normalisation (num_items_in_batch an int or a tensor), with the
    usual unit upstream and with a random scalar one."""
    ref_model = _model()
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": _num_items(num_items, 13)}
    up = (torch.rand(()) + 0.5).to(DEVICE) if upstream == "random" else None
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels, upstream=up, **kw)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused)
    with tri_losses.use_backend(backend):
        out, g = _loss_and_grads(model, ids, labels, upstream=up, **kw)
    assert (out.logits is None) == fused  # the fused path builds no logits in training
    _assert_same(out, g, ref_out, ref_g)


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_shift_labels_and_ignore_index_match_model_own_loss(backend, fused):
    """The loss kwargs a model's forward hands to ``self.loss_function``: ``shift_labels`` (targets already
    shifted, e.g. by a sequence-parallel collator: they replace the shift of ``labels``), with
    ``num_items_in_batch``, and another ``ignore_index``; both paths give the model's own loss and gradients."""
    ref_model = _model()
    ids, labels = _batch()
    shifted = torch.randint(0, V, (2, 9))
    shifted[0, 5:] = -100
    shifted, n = shifted.to(DEVICE), _num_items("tensor", 11)
    other = labels.masked_fill(labels == -100, 7)  # 7 marks the ignored positions now
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused)
    for kw in (dict(labels=labels, shift_labels=shifted, num_items_in_batch=n), dict(labels=other, ignore_index=7)):
        ref_out, ref_g = _loss_and_grads(ref_model, ids, **kw)
        with tri_losses.use_backend(backend):
            out, g = _loss_and_grads(model, ids, **kw)
        assert (out.logits is None) == fused
        _assert_same(out, g, ref_out, ref_g)


def test_hf_fused_under_autocast_runs_the_head_in_the_autocast_dtype(backend, monkeypatch):
    """Mixed precision (``torch.autocast``, what ``Trainer(bf16=True)`` turns on) with fp32 weights: the
    model's own head runs in bf16 (autocast's ``F.linear``); the fused path gives the fused op bf16 hidden
    states and head weight too (tri_losses.linear_cross_entropy casts under autocast) (not fp32, which is no model's loss and no tensor-core GEMM; the torch
    backend failed on autocast's dtypes), and its loss equals the float64 loss of those bf16 operands and
    the model's own at bf16 precision."""
    from tests.reference.linear_ce import linear_ce
    ref_model = _model()
    ids, labels = _batch()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref_out = ref_model(input_ids=ids, labels=labels)
    ref_out.loss.backward()
    assert ref_out.logits.dtype == torch.bfloat16
    seen = []
    lce_module = sys.modules["tri_losses.linear_cross_entropy"]
    fused_op = lce_module._lce_fwd_grad  # the op the training step runs (a scalar upstream)

    def recording(h, w, *args, **kwargs):
        seen.append((h.dtype, w.dtype))
        return fused_op(h, w, *args, **kwargs)
    monkeypatch.setattr(lce_module, "_lce_fwd_grad", recording)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend=backend)
    model.zero_grad()
    hidden = {}
    model.model.norm.register_forward_hook(lambda mod, args, out: hidden.setdefault("h", out))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] and out.loss.dtype == torch.float32
    h = hidden["h"].detach().to(torch.bfloat16).cpu().double()
    w = model.lm_head.weight.detach().to(torch.bfloat16).cpu().double()
    target = torch.nn.functional.pad(labels.cpu(), (0, 1), value=-100)[:, 1:]
    assert_close(out.loss, linear_ce(h, w, None, target, reduction="mean"))
    _assert_bf16_close = functools.partial(assert_close, dtype=torch.bfloat16)
    _assert_bf16_close(out.loss, ref_out.loss)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        _assert_bf16_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_ce_kwargs_reach_the_loss(fused):
    # label smoothing changes the loss: the model's logits with F.cross_entropy(label_smoothing=0.1)
    ref_model = _model()
    ids, labels = _batch()
    logits = ref_model(input_ids=ids).logits
    exp = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                            label_smoothing=0.1)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused, label_smoothing=0.1, backend="torch")
    assert_close(model(input_ids=ids, labels=labels).loss, exp, atol=1e-5, rtol=1e-5)


def test_hf_fused_path_takes_linear_cross_entropy_own_options():
    """chunk_size and filter_eps (linear_cross_entropy's own options) reach the fused path in training; in
    eval mode the logits path leaves them out; the logits path alone still refuses them."""
    ref_model = _model()
    ids, labels = _batch()
    exp = ref_model(input_ids=ids, labels=labels).loss
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, chunk_size=7, filter_eps=1e-30, backend="torch")
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert_close(out.loss, exp, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert out.logits is not None
    assert_close(out.loss, exp, atol=1e-5, rtol=1e-5)
    seen = []
    orig = tri_losses.hf.linear_cross_entropy
    try:
        tri_losses.hf.linear_cross_entropy = lambda *a, **k: seen.append(k) or orig(*a, **k)
        model.train()(input_ids=ids, labels=labels)
    finally:
        tri_losses.hf.linear_cross_entropy = orig
    assert seen and seen[0]["chunk_size"] == 7 and seen[0]["filter_eps"] == 1e-30
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'chunk_size' for the logits path"):
        tri_losses.hf.apply(_model(), chunk_size=7)
    # cross_entropy's legacy size_average/reduce would override the reduction the integration sets
    for legacy in ("size_average", "reduce"):
        with pytest.raises(TypeError, match=f"ce_kwargs: unexpected option '{legacy}'"):
            tri_losses.hf.trainer_loss(**{legacy: False})
    # return_lse would make the model's loss a (loss, lse) tuple (out.loss.backward() failed): refused up front
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'return_lse'"):
        tri_losses.hf.trainer_loss(return_lse=True)
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'return_lse'"):
        tri_losses.hf.apply(_model(), return_lse=True)
    # return_argmax and return_entropy (linear_cross_entropy's) too, on either path: the model's loss stays one
    # scalar
    for fused in (False, True):
        for opt in ("return_argmax", "return_entropy"):
            with pytest.raises(TypeError, match=f"ce_kwargs: unexpected option '{opt}'"):
                tri_losses.hf.apply(_model(), fused=fused, **{opt: True})
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'return_argmax'"):
        tri_losses.hf.causal_lm_loss(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long),
                                     ce_kwargs=dict(return_argmax=True))
    for call in (lambda: tri_losses.hf.apply(_model(), fused="False"), lambda: tri_losses.hf.patch("llama", fused=1)):
        with pytest.raises(TypeError, match="fused: expected a bool"):  # was taken by its truth value
            call()
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'return_lse'"):
        tri_losses.hf.causal_lm_loss(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long),
                                     ce_kwargs=dict(return_lse=True))


_TEXT_TYPES = sorted(k for k, v in tri_losses.hf.FUSED_MODEL_TYPES.items() if "multimodal" not in v[1])
_MULTIMODAL_TYPES = sorted(k for k, v in tri_losses.hf.FUSED_MODEL_TYPES.items() if "multimodal" in v[1])


@pytest.mark.parametrize("model_type", _TEXT_TYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_patch_family_matches_model_own_loss(model_type, fused, backend):
    """patch() before building: each supported family (soft-capping, logit scales, Mixtral's router loss set
    in its config) gives the model's own loss and gradients on both paths."""
    cls, cfg = _tiny(model_type)
    ref_model = _model(model_type)
    ids, labels = _batch()
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    with tri_losses.hf.patch(model_type, fused=fused, backend=backend):
        model = cls(cfg).float().train().to(DEVICE)
        model.load_state_dict(ref_model.state_dict())
        assert type(model).loss_function is not transformers.PreTrainedModel.loss_function
        out, g = _loss_and_grads(model, ids, labels)
    assert (out.logits is None) == fused
    _assert_same(out, g, ref_out, ref_g)
    assert type(out) is type(ref_out)  # the model's own output class (a MoE output, say)
    if getattr(ref_out, "aux_loss", None) is not None:  # a router loss, which the loss includes
        assert out.aux_loss is not None and out.router_logits is not None
        assert_close(out.aux_loss, ref_out.aux_loss)
    has_router_loss = "router" in tri_losses.hf.FUSED_MODEL_TYPES[model_type][1]
    assert (getattr(ref_out, "aux_loss", None) is not None) == has_router_loss
    # unpatched on exit: the class's own forward and loss come back
    assert "forward" not in vars(cls) or not hasattr(cls.forward, "_tri_losses_wraps")
    assert "loss_function" not in vars(cls)
    assert model(input_ids=ids, labels=labels).logits is not None


_MM_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, depth=1,
                  embed_dim=16, num_heads=2, image_size=16, patch_size=8, out_hidden_size=32, num_layers=1,
                  vision_output_dim=32)


def _tiny_multimodal(model_type):
    """(class, config) of a tiny multimodal model: the family's default config with its text model shrunk to
    _COMMON's sizes (and a soft-cap set where the text model has one: Gemma 3's forward ignores it, PaliGemma
    2's applies it) and its vision tower to one small layer; image/video token ids at V - 1."""
    cls = _family_class(model_type)
    if tri_losses.hf._transformers_major() < 5:
        pytest.skip("the fused path for multimodal models needs transformers >= 5")
    if model_type == "paligemma":  # PaliGemma 2: a Gemma 2 text model, which soft-caps
        cfg = cls.config_class(text_config=dict(model_type="gemma2", final_logit_softcapping=5.0))
    else:
        cfg = cls.config_class()
    text = cfg.get_text_config()
    for k, v in {**_COMMON, "head_dim": 8}.items():
        if hasattr(text, k):
            setattr(text, k, v)
    if model_type == "gemma3":
        text.final_logit_softcapping = 5.0
    if model_type == "qwen3_vl_moe":  # the router's loss switched on, set in the text config as the model reads it
        for k, v in dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True,
                         router_aux_loss_coef=0.1).items():
            setattr(text, k, v)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:_COMMON["num_hidden_layers"]]
    if model_type in ("qwen2_vl", "qwen2_5_vl", "glm4v"):  # multimodal RoPE sections summing to head_dim / 2
        text.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    vision = getattr(cfg, "vision_config", None)
    for k, v in _MM_VISION.items():
        if vision is not None and hasattr(vision, k):
            setattr(vision, k, v)
    if model_type == "internvl":
        vision.image_size, vision.patch_size = [16, 16], [8, 8]
    for k in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
              "vision_end_token_id", "boi_token_index", "eoi_token_index"):
        if isinstance(getattr(cfg, k, None), int):
            setattr(cfg, k, V - 1)
    if hasattr(cfg, "vocab_size"):
        cfg.vocab_size = V
    return cls, cfg


@pytest.mark.parametrize("model_type", _MULTIMODAL_TYPES)
def test_hf_patch_multimodal_family_matches_model_own_loss(model_type, backend):
    """The fused path of each multimodal family (text tokens; the image path is the Llava test's) gives the
    model's own loss, gradients and output class."""
    cls, cfg = _tiny_multimodal(model_type)
    torch.manual_seed(0)
    ref_model = cls(cfg).float().train().to(DEVICE)
    ids, labels = _batch()
    ids = ids.clamp(max=V - 2)  # no image tokens
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    with tri_losses.hf.patch(model_type, fused=True, backend=backend):
        model = cls(cfg).float().train().to(DEVICE)
        model.load_state_dict(ref_model.state_dict())
        out, g = _loss_and_grads(model, ids, labels)
    assert out.logits is None and type(out) is type(ref_out)
    _assert_same(out, g, ref_out, ref_g)
    has_router_loss = "router" in tri_losses.hf.FUSED_MODEL_TYPES[model_type][1]
    assert (getattr(ref_out, "aux_loss", None) is not None) == has_router_loss
    if getattr(ref_out, "aux_loss", None) is not None:
        assert_close(out.aux_loss, ref_out.aux_loss)


def test_hf_patch_by_class_changes_existing_instances_and_unpatch_restores():
    model = _model()
    ids, labels = _batch()
    own_forward = transformers.LlamaForCausalLM.forward
    handle = tri_losses.hf.patch(transformers.LlamaForCausalLM, fused=True, backend="torch")
    assert model(input_ids=ids, labels=labels).logits is None
    assert inspect.signature(model.forward) == inspect.signature(own_forward.__get__(model))
    other = tri_losses.hf.apply(_model(), fused=False, backend="torch")  # an instance's own setting wins
    assert other(input_ids=ids, labels=labels).logits is not None
    assert tri_losses.hf.unpatch("llama") is True and tri_losses.hf.unpatch("llama") is False
    assert transformers.LlamaForCausalLM.forward is own_forward
    assert model(input_ids=ids, labels=labels).logits is not None
    assert repr(handle).endswith("LlamaForCausalLM>")


def test_hf_fused_forward_has_model_signature():
    model = tri_losses.hf.apply(_model(), fused=True)
    own = inspect.signature(type(model).forward.__get__(model))
    assert inspect.signature(model.forward) == own
    assert "input_ids" in own.parameters and "labels" in own.parameters


def _trainer_data():
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(8):
        n = 5 + i % 4
        ids = torch.randint(3, V, (12,), generator=g)
        mask = (torch.arange(12) < n).long()
        data.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                     "sample_id": i})  # a column the model does not take: Trainer's filter drops it
    return data


def _train(model, **trainer_kw):
    with tempfile.TemporaryDirectory() as d:
        args = transformers.TrainingArguments(output_dir=d, max_steps=2, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none",
                                              save_strategy="no", disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=_trainer_data(), **trainer_kw).train()
    return model


@pytest.mark.parametrize("how", ["apply", "patch"])
def test_hf_trainer_default_arguments_fused(how, monkeypatch):
    """Trainer with default TrainingArguments (remove_unused_columns=True, gradient accumulation with
    num_items_in_batch): the fused model trains to the same weights as the model's own loss."""
    pytest.importorskip("accelerate")
    base = _model()
    ref = _train(copy.deepcopy(base))
    calls = []
    fused_loss = tri_losses.hf.linear_cross_entropy

    @functools.wraps(fused_loss)
    def counted(*args, **kwargs):
        calls.append(1)
        return fused_loss(*args, **kwargs)
    monkeypatch.setattr(tri_losses.hf, "linear_cross_entropy", counted)
    if how == "apply":
        model = tri_losses.hf.apply(copy.deepcopy(base), fused=True, backend="torch")
    else:
        tri_losses.hf.patch("llama", fused=True, backend="torch")
        model = _model()
    model = _train(model)
    assert len(calls) == 4  # 2 steps x 2 accumulated micro-batches, all fused
    moved = max((p - q).abs().max() for p, q in zip(ref.parameters(), base.parameters()))
    assert moved > 1e-3
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


def test_hf_trainer_loss_in_trainer_trains_like_the_model_own_loss():
    """``Trainer(compute_loss_func=trainer_loss())`` (gradient accumulation: Trainer hands it
    num_items_in_batch and does not divide the loss again) trains to the weights of the model's own loss."""
    pytest.importorskip("accelerate")
    base = _model()
    ref = _train(copy.deepcopy(base))
    model = _train(copy.deepcopy(base), compute_loss_func=tri_losses.hf.trainer_loss(backend="torch"))
    moved = max((p - q).abs().max() for p, q in zip(ref.parameters(), base.parameters()))
    assert moved > 1e-3
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("num_items", [None, 13])
def test_hf_torch_compile_model_fused(num_items):
    ref_model = _model()
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": _num_items("tensor", num_items)}
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels, **kw)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out, g = _loss_and_grads(compiled, ids, labels, **kw)
    assert out.logits is None
    _assert_same(out, g, ref_out, {"_orig_mod." + n: v for n, v in ref_g.items()})


def test_hf_fused_eval_returns_logits_and_warns_once_when_training_in_eval(monkeypatch):
    monkeypatch.setattr(tri_losses.hf, "_WARNED_EVAL", False)
    ref_model = _model().eval()
    ids, labels = _batch()
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evaluation (no grad) and plain inference do not warn
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
            plain = model(input_ids=ids)
        ref = ref_model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (2, 9, V)
    assert_close(out.logits, ref.logits)
    assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert plain.loss is None and plain.logits is not None
    with pytest.warns(UserWarning, match=r"eval\(\) mode.*model\.train\(\)"):
        model(input_ids=ids, labels=labels)  # a training step forgotten in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=labels)  # once


def test_hf_trainer_loss_function_form():
    model = _model()
    ids, labels = _batch()
    out = model(input_ids=ids)
    f = tri_losses.hf.trainer_loss(backend="torch")
    got = f(out, labels, num_items_in_batch=_num_items("tensor", 11))
    exp = transformers.loss.loss_utils.ForCausalLMLoss(out.logits, labels, V, num_items_in_batch=_num_items("tensor", 11))
    assert_close(got, exp, atol=1e-6, rtol=1e-5)


def test_hf_trainer_loss_adds_the_router_loss_of_a_mixture_of_experts():
    """Trainer keeps the labels from the model under a compute_loss_func, so a MoE model leaves its router's
    aux loss out of its loss: trainer_loss(router_aux_loss_coef=...) adds it as the model's own loss does
    (it was dropped silently); without the coefficient such outputs raise, 0.0 leaves the term out."""
    model = _model("mixtral")
    ids, labels = _batch()
    own = model(input_ids=ids, labels=labels)
    out = model(input_ids=ids)  # what Trainer does with a compute_loss_func
    assert out.aux_loss is not None
    coef = model.config.router_aux_loss_coef
    got = tri_losses.hf.trainer_loss(router_aux_loss_coef=coef, backend="torch")(out, labels)
    assert_close(got, own.loss, atol=1e-6, rtol=1e-5)
    ce = transformers.loss.loss_utils.ForCausalLMLoss(out.logits, labels, V)
    assert_close(tri_losses.hf.trainer_loss(router_aux_loss_coef=0.0, backend="torch")(out, labels), ce,
                 atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="router_aux_loss_coef: the model returned a router aux_loss"):
        tri_losses.hf.trainer_loss(backend="torch")(out, labels)
    with pytest.raises(TypeError, match="router_aux_loss_coef: expected a number"):
        tri_losses.hf.trainer_loss(router_aux_loss_coef="0.1")


def test_hf_fused_positional_arguments_bind_like_the_model():
    # model(input_ids, attention_mask, position_ids, labels=...): positional arguments keep their
    # meaning (position_ids is not mistaken for labels) and the fused loss matches the model's own.
    ref_model = _model()
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    pos = torch.arange(9, device=DEVICE).expand(2, 9)
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    model.zero_grad()
    out = model(ids, mask, pos, labels=labels)
    out.loss.backward()
    assert out.logits is None
    _assert_same(out, {n: p.grad for n, p in model.named_parameters()}, ref_out, ref_g)
    tup = model(ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.is_tensor(tup[0])
    assert_close(tup[0], ref_out.loss, atol=1e-5, rtol=1e-5)


def test_hf_multimodal_with_an_image_matches_model_own_loss(monkeypatch):
    """A tiny Llava (CLIP vision tower + Llama text model, image tokens in the sequence): both paths give the
    model's own loss and gradients, vision tower included (the fused path hands the pixels to the model's
    decoder, which embeds the image); a multimodal family outside the table is refused with a clear message."""
    text = transformers.LlamaConfig(**{**_COMMON, "num_hidden_layers": 1})
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text)
    cfg.image_token_id = cfg.image_token_index = V - 1  # the name in transformers 5 and in 4.x
    torch.manual_seed(0)
    ref_model = transformers.LlavaForConditionalGeneration(cfg).float().train().to(DEVICE)
    ids = torch.randint(3, V - 1, (2, 10))
    ids[:, 1:5] = V - 1  # 4 image tokens = (16 / 8)^2 patches
    labels = ids.masked_fill(ids == V - 1, -100)
    pixels = torch.randn(2, 3, 16, 16)
    ids, labels, pixels = ids.to(DEVICE), labels.to(DEVICE), pixels.to(DEVICE)
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels, pixel_values=pixels)
    if "loss_function" not in inspect.getsource(inspect.unwrap(type(ref_model).forward)):
        # transformers 4.x's Llava computes its own loss: refused rather than silently left unchanged
        with pytest.raises(ValueError, match="does not call self.loss_function"):
            tri_losses.hf.apply(ref_model)
        return
    for fused in (False, True) if tri_losses.hf._transformers_major() >= 5 else (False,):  # 4.x: not fused
        model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused, backend="torch")
        out, g = _loss_and_grads(model, ids, labels, pixel_values=pixels)
        assert (out.logits is None) == fused
        _assert_same(out, g, ref_out, ref_g)
        assert any("vision_tower" in n for n in g)
    outside = next((t for t in ("aya_vision", "llava_onevision", "qwen2_audio")
                    if t in tri_losses.hf._mappings()[1] and t not in tri_losses.hf.FUSED_MODEL_TYPES), None)
    if outside is not None:
        with pytest.raises(ValueError, match="is a multimodal model outside the tested fused model types"):
            tri_losses.hf.patch(outside, fused=True)
    monkeypatch.setattr(tri_losses.hf, "_transformers_major", lambda: 4)  # multimodal classes of 4.x: not fused
    with pytest.raises(ValueError, match="fused only with transformers >= 5"):
        tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True)


def test_hf_refuses_models_it_does_not_fit():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=V, d_model=16, d_ff=32, num_layers=1,
                                                                       num_heads=2, d_kv=8))
    for fused in (False, True):
        with pytest.raises(ValueError, match="T5ForConditionalGeneration .* encoder-decoder"):
            tri_losses.hf.apply(t5, fused=fused)
    cls_model = transformers.LlamaForSequenceClassification(_tiny()[1])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification .* not a causal language model"):
        tri_losses.hf.apply(cls_model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V,
                                                                bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel .* not one of the tested fused model types"):
        tri_losses.hf.apply(gpt2, fused=True)
    tri_losses.hf.apply(gpt2)  # the logits path fits any causal LM
    with pytest.raises(TypeError, match="PreTrainedModel"):
        tri_losses.hf.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError,
                       match="model_type_or_class: unknown causal-LM, CTC or masked-LM model type 'no_such_model'"):
        tri_losses.hf.patch("no_such_model")
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'label_smothing'"):
        tri_losses.hf.apply(_model(), label_smothing=0.1)
    with pytest.raises(TypeError, match="ce_kwargs: unexpected option 'input_type' for the fused path"):
        tri_losses.hf.patch("llama", fused=True, input_type="log_probs")
    assert "loss_function" not in vars(transformers.LlamaForCausalLM)  # a refused patch changes nothing
    # a head that is not nn.Linear(hidden_size, vocab_size)
    model = _model()
    model.lm_head = torch.nn.Linear(32, V + 4, bias=False)
    with pytest.raises(ValueError, match=r"expected nn.Linear\(hidden_size=32, vocab_size=96\), got nn.Linear\(32, 100\)"):
        tri_losses.hf.apply(model, fused=True)


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_logits_to_keep_matches_model_own_loss(fused):
    """``logits_to_keep=k`` with labels of the last k positions: the model's own loss over those positions
    (the fused path slices the hidden states as the model's head would), on both paths."""
    ref_model = _model()
    ids, labels = _batch()
    kw = dict(labels=labels[:, -4:], logits_to_keep=4)
    ref_out, ref_g = _loss_and_grads(ref_model, ids, **kw)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused, backend="torch")
    out, g = _loss_and_grads(model, ids, **kw)
    _assert_same(out, g, ref_out, ref_g)
    with pytest.raises(ValueError):  # whole-sequence labels with 4 kept positions: an error, as the model's own
        model(input_ids=ids, labels=labels, logits_to_keep=4)


def test_hf_fused_patch_with_a_wrapped_head_takes_the_logits_path():
    """A class patched fused whose instance's lm_head is then wrapped (LoRA on lm_head: the wrapper's output
    differs from ``head.weight``'s): the fused path would drop the adapter, so that instance runs its own
    forward (logits path, warning once) and its loss and gradients are the unpatched model's, the adapter's
    included; ``apply(fused=True)`` refuses such a head with a message naming LoRA."""

    class Adapter(torch.nn.Module):  # a LoRA-like head: base(x) + B(A(x)), not an nn.Linear
        def __init__(self, base):
            super().__init__()
            self.base, self.a, self.b = base, torch.nn.Linear(32, 4, bias=False), torch.nn.Linear(4, V, bias=False)
            torch.nn.init.normal_(self.b.weight)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    ref_model = _model()
    ref_model.lm_head = Adapter(ref_model.lm_head).to(DEVICE)
    ids, labels = _batch()
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    tri_losses.hf.patch("llama", fused=True, backend="torch")
    model = copy.deepcopy(ref_model)
    tri_losses.hf._WARNED_HEAD.clear()
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        out, g = _loss_and_grads(model, ids, labels)
    assert out.logits is not None and "lm_head.b.weight" in g
    _assert_same(out, g, ref_out, ref_g)
    tri_losses.hf.unpatch("llama")
    with pytest.raises(ValueError, match="LoRA"):
        tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True)


def test_hf_subclass_of_a_fused_class():
    """A subclass that keeps the forward is fused as its base; one that overrides forward is refused for the
    fused path (its extra outputs would be lost) and takes the logits path."""

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    class WithValueHead(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    cfg = _tiny()[1]
    ids, labels = _batch()
    torch.manual_seed(0)
    ref_model = MyLlama(cfg).train().to(DEVICE)
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    out, g = _loss_and_grads(model, ids, labels)
    assert out.logits is None
    _assert_same(out, g, ref_out, ref_g)
    with pytest.raises(ValueError, match="overrides LlamaForCausalLM.forward"):
        tri_losses.hf.apply(WithValueHead(cfg), fused=True)
    tri_losses.hf.apply(WithValueHead(cfg))  # the logits path

    class MyMixtral(transformers.MixtralForCausalLM):  # defined here: the router loss is still its base module's
        pass

    cfg = _tiny("mixtral")[1]
    torch.manual_seed(0)
    ref_model = MyMixtral(cfg).train().to(DEVICE)
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    out, g = _loss_and_grads(tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch"), ids, labels)
    assert out.logits is None and out.aux_loss is not None
    _assert_same(out, g, ref_out, ref_g)


def test_hf_patch_subclass_logits_path_under_a_fused_base():
    """patch(Subclass, fused=False, ...) while the base class is patched fused: the subclass takes the logits
    path with its own options (as apply does), in either order; unpatching the subclass restores the base's."""

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    cfg = _tiny()[1]
    ids, labels = _batch()
    torch.manual_seed(0)
    model = MyLlama(cfg).train().to(DEVICE)
    exp = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                          label_smoothing=0.5)
    for order in ("base first", "subclass first"):
        try:
            if order == "base first":
                tri_losses.hf.patch(transformers.LlamaForCausalLM, fused=True, backend="torch")
            tri_losses.hf.patch(MyLlama, label_smoothing=0.5, backend="torch")
            if order != "base first":
                tri_losses.hf.patch(transformers.LlamaForCausalLM, fused=True, backend="torch")
            out = model(ids, labels=labels)
            assert out.logits is not None, order
            assert_close(out.loss, exp)
            tri_losses.hf.unpatch(MyLlama)
            assert model(ids, labels=labels).logits is None  # the base's fused path again
        finally:
            tri_losses.hf.unpatch(MyLlama)
            tri_losses.hf.unpatch(transformers.LlamaForCausalLM)

    class WithValueHead(transformers.LlamaForCausalLM):  # overrides forward, calling the base's
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    torch.manual_seed(0)
    model = WithValueHead(cfg).train().to(DEVICE)
    try:
        tri_losses.hf.patch(transformers.LlamaForCausalLM, fused=True, backend="torch")
        out = model(ids, labels=labels)  # the logits path with the base's (default) options
        assert out.logits is not None
        tri_losses.hf.patch(WithValueHead, label_smoothing=0.5, backend="torch")
        out = model(ids, labels=labels)
        assert out.logits is not None
        assert_close(out.loss, torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), label_smoothing=0.5))
    finally:
        tri_losses.hf.unpatch(WithValueHead)
        tri_losses.hf.unpatch(transformers.LlamaForCausalLM)


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_pickled_applied_model_loads_as_it_was_saved(fused):
    """pickle / torch.save(model) of an applied model loads as the applied model (as copy.deepcopy copies it):
    its path and options, whatever the class's patch state at loading or later (an instance's own settings
    win over a class patch, as for the instance saved). A bound forward used to be pickled by name and load as
    the class's forward of that moment: plain with apply's loss options kept, or frozen fused after unpatch."""
    import io
    import pickle
    ref_model = _model()
    ids, labels = _batch()
    opts = dict(z_loss=0.1, label_smoothing=0.2, backend="torch")
    saved = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused, **opts)
    want, want_g = _loss_and_grads(saved, ids, labels)
    plain, _ = _loss_and_grads(ref_model, ids, labels)
    assert (want.logits is None) == fused and abs(want.loss.item() - plain.loss.item()) > 1e-3
    buf = io.BytesIO()
    torch.save(saved, buf)
    loaded = []
    for patched in (False, True):  # loaded with the class plain, and while it is patched fused (then unpatched)
        if patched:
            tri_losses.hf.patch("llama", fused=True, backend="torch")
        loaded.append(pickle.loads(pickle.dumps(saved)))
        buf.seek(0)
        loaded.append(torch.load(buf, weights_only=False))
        tri_losses.hf.unpatch("llama")
    loaded.append(copy.deepcopy(saved))
    for i, m in enumerate(loaded):
        out, g = _loss_and_grads(m.train(), ids, labels)
        assert (out.logits is None) == fused, i
        _assert_same(out, g, want, want_g)
        if fused:
            assert m.forward.args[0] is m
        with tri_losses.hf.patch("llama", fused=not fused, label_smoothing=0.5, backend="torch"):
            # a class patch after loading: the loaded instance does what the saved one does
            ref_out, ref_g = _loss_and_grads(saved, ids, labels)
            out, g = _loss_and_grads(m, ids, labels)
            assert (out.logits is None) == (ref_out.logits is None), i
            _assert_same(out, g, ref_out, ref_g)
        m.eval()
        with torch.no_grad():
            assert_close(m(input_ids=ids, labels=labels).loss, want.loss, atol=1e-5, rtol=1e-5)
        saved.eval()
        with torch.no_grad():
            assert_close(saved(input_ids=ids, labels=labels).loss, want.loss, atol=1e-5, rtol=1e-5)
        saved.train()


def test_hf_applied_forward_follows_accelerate_regional_compilation():
    """Accelerate's compile_regions makes a shallow copy of the model and rebinds the bound methods and partials
    in its __dict__ to the copy: apply's forward goes with it (eval mode of the copy takes the model's own
    forward with logits; the copy's compiled layers run)."""
    accelerate = pytest.importorskip("accelerate")
    compile_regions = getattr(accelerate.utils, "compile_regions", None)
    if compile_regions is None:
        pytest.skip(f"accelerate {accelerate.__version__} has no compile_regions")
    model = tri_losses.hf.apply(_model(), fused=True, backend="torch")
    ids, labels = _batch()
    compiled = compile_regions(model, backend="eager")
    assert compiled is not model and compiled.forward.args[0] is compiled
    ran = []
    compiled.model.layers[0].register_forward_hook(lambda *a: ran.append(1))
    compiled.eval()
    with torch.no_grad():
        out = compiled(input_ids=ids, labels=labels)
    assert out.logits is not None and ran
    compiled.train()
    assert compiled(input_ids=ids, labels=labels).logits is None


def test_hf_fused_forward_survives_accelerate_unwrap_model():
    """Accelerate's unwrap_model(keep_fp32_wrapper=False) follows the forward's __wrapped__ chain and binds the
    innermost function: the fused forward has no such link, so the model stays fused (apply and patch)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState
    cfg = _tiny()[1]
    ids, labels = _batch()
    for how in ("apply", "patch"):
        AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton (Trainer sets it too)
        try:
            model = transformers.LlamaForCausalLM(cfg).to(DEVICE)
            if how == "apply":
                tri_losses.hf.apply(model, fused=True, backend="torch")
            else:
                tri_losses.hf.patch("llama", fused=True, backend="torch")
            acc = accelerate.Accelerator(mixed_precision="bf16", cpu=DEVICE.type == "cpu")
            model = acc.prepare(model).train()
            assert model(ids, labels=labels).logits is None
            plain = acc.unwrap_model(model, keep_fp32_wrapper=False).train()
            assert plain(ids, labels=labels).logits is None, how
        finally:
            tri_losses.hf.unpatch("llama")
            AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("softcap", [2.0, 5.0], ids=["other", "equal"])
def test_hf_softcap_option_on_a_model_that_caps_its_logits_raises_on_the_fused_path(softcap):
    """Any softcap option (even the model's own value, 5.0 here: eval mode's logits path would cap twice):
    apply() refuses it at once; patch() at the first call with labels, in eval mode too (an evaluation before
    any training step capped twice)."""
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        tri_losses.hf.apply(_model("gemma2"), fused=True, softcap=softcap, backend="torch")
    ids, labels = _batch()
    for train in (True, False):
        model = _model("gemma2").train(train)
        with tri_losses.hf.patch("gemma2", fused=True, softcap=softcap, backend="torch"):
            with pytest.raises(ValueError, match="final_logit_softcapping"):
                model(input_ids=ids, labels=labels)


def test_hf_fused_logits_to_keep_tensor_forms_match_model_own_loss():
    """transformers 5's other logits_to_keep forms: a (B, P) tensor of positions and a (B, T) bool mask
    (packed training: the kept positions flattened), sliced as the model's own head slices them."""
    if not hasattr(__import__("transformers.modeling_utils").modeling_utils, "slice_logits_to_keep"):
        pytest.skip("this transformers has no slice_logits_to_keep (int / 1-D logits_to_keep only)")
    ref_model = _model()
    ids, labels = _batch()
    mask = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    mask[0, 2:7] = True
    mask[1, :4] = True
    for keep, lab in ((torch.tensor([[1, 4, 8], [0, 2, 5]], device=DEVICE), labels[:, :3]), (mask, labels[mask])):
        ref_out, ref_g = _loss_and_grads(ref_model, ids, lab, logits_to_keep=keep)
        model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
        out, g = _loss_and_grads(model, ids, lab, logits_to_keep=keep)
        assert out.logits is None
        _assert_same(out, g, ref_out, ref_g)


def test_hf_fused_with_config_return_dict_false_matches_model_own_loss():
    """config.return_dict=False: the model's own tuple layout minus the logits (transformers 5: fused; 4.x:
    the model's own forward, whose decoder would hand back a tuple). transformers 5's own text models fail
    with it (their decoders return tuples), its multimodal Gemma 3 does not: that is the reference there."""
    if tri_losses.hf._transformers_major() >= 5:
        cls, cfg = _tiny_multimodal("gemma3")
        torch.manual_seed(0)
        ref_model = cls(cfg).float().train().to(DEVICE)
    else:
        ref_model = _model()
    ref_model.config.return_dict = False
    ids, labels = _batch()
    ids = ids.clamp(max=V - 2)  # no image tokens
    ref_model.zero_grad()
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    try:
        ref = ref_model(input_ids=ids, labels=labels)
    except AttributeError:  # a 4.x whose own model fails with it (4.57's Llama): so does the model's own path here
        with pytest.raises(AttributeError):
            model(input_ids=ids, labels=labels)
        return
    ref[0].backward()
    ref_g = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out[0].backward()
    assert isinstance(out, tuple)
    assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert g.keys() == ref_g.keys()
    for n in g:
        assert_close(g[n], ref_g[n], atol=1e-5, rtol=1e-4, msg=n)


def test_hf_fused_head_driven_by_an_accelerate_hook_takes_the_logits_path(monkeypatch):
    """A head with an accelerate hook (offload, device_map) may hold its weight elsewhere: apply refuses the
    fused path, a patched class runs the model's own forward with a warning, with the model's own loss."""
    hooks = pytest.importorskip("accelerate.hooks")
    monkeypatch.setattr(tri_losses.hf, "_WARNED_HEAD", set())  # warned once per class: maybe by an earlier test
    ref_model = _model()
    ids, labels = _batch()
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    model = copy.deepcopy(ref_model)
    hooks.add_hook_to_module(model.lm_head, hooks.ModelHook())
    with pytest.raises(ValueError, match="accelerate hook"):
        tri_losses.hf.apply(model, fused=True)
    with tri_losses.hf.patch("llama", fused=True, backend="torch"):
        with pytest.warns(UserWarning, match="accelerate hook"):
            out, g = _loss_and_grads(model, ids, labels)
    assert out.logits is not None
    _assert_same(out, g, ref_out, ref_g)
    zero3 = copy.deepcopy(ref_model)
    zero3.lm_head.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter (empty outside its forward)
    with pytest.raises(ValueError, match="ZeRO-3"):
        tri_losses.hf.apply(zero3, fused=True)


def test_hf_causal_lm_loss_takes_shift_labels_without_labels():
    """As transformers' ForCausalLMLoss (Git's forward passes only shift_labels)."""
    logits = torch.randn(2, 9, V)
    shifted = torch.randint(0, V, (2, 9))
    shifted[0, :2] = -100
    exp = transformers.loss.loss_utils.ForCausalLMLoss(logits, None, V, shift_labels=shifted)
    got = tri_losses.hf.causal_lm_loss(logits, None, V, shift_labels=shifted, ce_kwargs={"backend": "torch"})
    assert_close(got, exp, atol=1e-6, rtol=1e-5)


def test_hf_causal_lm_loss_bad_arguments():
    logits = torch.randn(2, 9, V).to(DEVICE)
    labels = torch.randint(0, V, (2, 9)).to(DEVICE)
    with pytest.raises(ValueError, match=r"vocab_size: expected logits.shape\[-1\] = 96, got 48"):
        tri_losses.hf.causal_lm_loss(logits, labels, vocab_size=48)  # 2*9*96 is divisible by 48
    with pytest.raises(ValueError, match=r"labels: expected shape logits.shape\[:-1\] = \(2, 9\), got \(2, 8\)"):
        tri_losses.hf.causal_lm_loss(logits, labels[:, :8], vocab_size=V)
    with pytest.raises(TypeError, match="logits and labels: expected tensors"):
        tri_losses.hf.causal_lm_loss(logits, labels.tolist())
    with pytest.raises(TypeError, match="labels: expected integer class ids, got a torch.float32 tensor"):
        tri_losses.hf.causal_lm_loss(logits, labels.float())
    with pytest.raises(TypeError, match="shift_labels: expected integer class ids, got a torch.bool tensor"):
        tri_losses.hf.causal_lm_loss(logits, None, shift_labels=labels > 0)
    with pytest.raises(ValueError, match=r"num_items_in_batch: expected a value in \[0, inf\), got -3"):
        tri_losses.hf.causal_lm_loss(logits, labels, num_items_in_batch=-3)  # (a negative loss before)
    exp = transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, V)
    assert_close(tri_losses.hf.causal_lm_loss(logits, labels, vocab_size=V, ce_kwargs={"backend": "torch"}), exp,
                 atol=1e-6, rtol=1e-5)
    # no target counted (every label ignored): transformers' 0 / 0
    none = torch.full_like(labels, -100)
    assert torch.isnan(tri_losses.hf.causal_lm_loss(logits, none, num_items_in_batch=0))
    assert torch.isnan(transformers.loss.loss_utils.ForCausalLMLoss(logits, none, V, num_items_in_batch=0))


# ----------------------------------------------------------------------------------------------------------
# num_items_in_batch: the loss hands its denominator to the op, so the backward's upstream is 1

def _num_items(kind, n):
    """num_items_in_batch as Trainer passes it: a tensor on the model's device (or an int)."""
    return torch.tensor(n, device=DEVICE) if kind == "tensor" else n


def _logits_case(dtype, n_items_kind, n=None):
    """(B, T, V) logits, labels with ignored positions, num_items_in_batch (default: 3 more than the
    non-ignored targets: gradient accumulation over micro-batches)."""
    logits = torch.randn(2, 7, V, dtype=dtype)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :2] = -100
    labels[1, 5] = -100
    if n is None:
        n = int((labels[:, 1:] != -100).sum()) + 3
    return logits.to(DEVICE).requires_grad_(), labels.to(DEVICE), _num_items(n_items_kind, n)


def _reference_rows(logits, labels):
    """float64 per-position losses of the shifted targets, differentiable w.r.t. ``logits``."""
    from tests.reference.ce import ce_rows
    rows, _ = ce_rows(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int", "tensor"])
@pytest.mark.parametrize("upstream", ["one", "random"])
def test_hf_causal_lm_loss_num_items_matches_float64_reference(backend, dtype, kind, upstream):
    logits, labels, n = _logits_case(dtype, kind)
    up = torch.tensor(1.0) if upstream == "one" else torch.rand(()) + 0.5
    loss = tri_losses.hf.causal_lm_loss(logits, labels, num_items_in_batch=n, ce_kwargs=dict(backend=backend))
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward(up.to(DEVICE))
    ref_x = logits.detach().cpu().double().requires_grad_()
    ref = _reference_rows(ref_x, labels.cpu()).sum() / int(n)
    ref.backward(up.double())
    assert_close(loss, ref, dtype=torch.float32)
    assert_close(logits.grad, ref_x.grad, dtype=dtype)
    # today's formula, the sum divided afterwards, gives the same loss
    before = tri_losses.cross_entropy(logits.detach()[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                      reduction="sum", backend=backend) / n
    assert_close(loss, before, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["int", "tensor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_hf_causal_lm_loss_num_items_backward_sees_unit_upstream(backend, kind, inplace, monkeypatch):
    """The fast path's backward scales the saved gradient by the upstream it gets: with Trainer's
    ``loss.backward()`` that is exactly 1 (free on Triton), not 1 / num_items_in_batch."""
    import importlib
    ce_module = importlib.import_module("tri_losses.cross_entropy")  # the attribute is the function
    seen = []
    scaled_grad = ce_module._scaled_grad

    def recording(grad, g, use_triton):
        seen.append(g.detach().clone())
        return scaled_grad(grad, g, use_triton)
    monkeypatch.setattr(ce_module, "_scaled_grad", recording)
    logits, labels, n = _logits_case(torch.float32, kind)
    ref_x = logits.detach().cpu().double().requires_grad_()
    (_reference_rows(ref_x, labels.cpu()).sum() / int(n)).backward()
    x = logits.detach().clone().requires_grad_()
    xin = x * 1.0 if inplace else x  # inplace_backward overwrites its input: a non-leaf
    loss = tri_losses.hf.causal_lm_loss(xin, labels, num_items_in_batch=n,
                                        ce_kwargs=dict(backend=backend, inplace_backward=inplace))
    loss.backward()
    assert len(seen) == 1 and seen[0].item() == 1.0
    assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("kind", ["int", "tensor"])
def test_hf_causal_lm_loss_zero_num_items_divides_by_zero(backend, kind):
    """A degenerate batch (num_items_in_batch = 0) gives what the sum divided by 0 gives: the loss of
    PyTorch's ``sum / 0``, and no finite gradient on a row with a target (inf, or NaN where a zero meets
    the infinite scale, as in PyTorch); the ignored rows' zero gradient times the infinite upstream is 0
    (PyTorch, the torch backend) or NaN (Triton: as the sum divided afterwards gave)."""
    logits, labels, n = _logits_case(torch.float32, kind, n=0)
    loss = tri_losses.hf.causal_lm_loss(logits, labels, num_items_in_batch=n, ce_kwargs=dict(backend=backend))
    loss.backward()
    ref_x = logits.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_x[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                            reduction="sum") / n
    ref.backward()
    assert torch.isinf(loss)
    torch.testing.assert_close(loss, ref)
    ignored = (torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] == -100)[..., None].expand_as(ref_x)
    assert not torch.isfinite(logits.grad[~ignored]).any() and not torch.isfinite(ref_x.grad[~ignored]).any()
    assert ((logits.grad[ignored] == 0) | torch.isnan(logits.grad[ignored])).all()


@pytest.mark.parametrize("kind", ["int", "tensor"])
@pytest.mark.parametrize("upstream", ["one", "random"])
def test_hf_fused_num_items_is_the_op_output_and_matches_float64_reference(backend, kind, upstream):
    """The fused path: the loss the model returns is the fused op's own output (its gradients formed
    for ``sum / num_items_in_batch``, no division after it), equal to the float64 reference."""
    from tests.reference.linear_ce import linear_ce
    model = tri_losses.hf.apply(_model(), fused=True)
    ids, labels = _batch()
    n = _num_items(kind, int((labels[:, 1:] != -100).sum()) + 3)
    hidden = {}
    model.model.norm.register_forward_hook(lambda mod, args, out: hidden.setdefault("h", out))  # the head's input
    up = torch.tensor(1.0) if upstream == "one" else torch.rand(()) + 0.5
    with tri_losses.use_backend(backend):
        out = model(input_ids=ids, labels=labels, num_items_in_batch=n)
        assert "lce_fwd_grad" in out.loss.grad_fn.name()
        h = hidden["h"]
        h.retain_grad()
        out.loss.backward(up.to(DEVICE))
    ref_h = h.detach().cpu().double().requires_grad_()
    ref_w = model.lm_head.weight.detach().cpu().double().requires_grad_()
    target = torch.nn.functional.pad(labels.cpu(), (0, 1), value=-100)[:, 1:]
    ref = linear_ce(ref_h, ref_w, None, target, reduction="sum") / int(n)
    ref.backward(up.double())
    assert_close(out.loss, ref)
    assert_close(h.grad, ref_h.grad)
    assert_close(model.lm_head.weight.grad, ref_w.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["int", "tensor"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_num_items_without_grad_matches_float64_reference(backend, kind, fused):
    """The exact (loss-only) paths divide by num_items_in_batch too: evaluation under no_grad."""
    from tests.reference.linear_ce import linear_ce
    h = torch.randn(2, 7, 16)
    w = torch.randn(V, 16)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :2] = -100
    n = _num_items(kind, 17)
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    ref = linear_ce(h, w, None, target, reduction="sum") / 17
    h, w, labels, target = h.to(DEVICE), w.to(DEVICE), labels.to(DEVICE), target.to(DEVICE)
    with torch.no_grad():
        if fused:
            loss = tri_losses.linear_cross_entropy(h, w, target, reduction="mean", _denom=n, backend=backend)
        else:
            loss = tri_losses.hf.causal_lm_loss(h @ w.t(), labels, num_items_in_batch=n,
                                                ce_kwargs=dict(backend=backend))
    assert_close(loss, ref)


def _worker_vocab_parallel(rank, world, group, backend, kind):
    """Both losses on this rank's slice of the classes (a tensor-parallel head), num_items_in_batch given."""
    torch.manual_seed(3)
    h, w = torch.randn(2, 7, 16), torch.randn(V, 16)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :2] = -100
    up = torch.rand(()) + 0.5
    rows = slice(rank * V // world, (rank + 1) * V // world)
    logits = (h @ w[rows].t()).requires_grad_()
    loss = tri_losses.hf.causal_lm_loss(logits, labels, num_items_in_batch=_num_items(kind, 17),
                                        ce_kwargs=dict(backend=backend, process_group=group))
    loss.backward(up)
    h2, w2 = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    lce = tri_losses.linear_cross_entropy(h2, w2, target, reduction="mean", _denom=_num_items(kind, 17),
                                          backend=backend, process_group=group)
    lce.backward(up)
    # the same through DTensors sharded on the classes (the logits' last dim, the head's rows)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = DeviceMesh("cpu", list(range(world)))
    xd = distribute_tensor(h @ w.t(), mesh, [Shard(2)]).requires_grad_()
    dloss = tri_losses.hf.causal_lm_loss(xd, labels, num_items_in_batch=_num_items(kind, 17),
                                         ce_kwargs=dict(backend=backend))
    dloss.to_local().backward(up)
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    dlce = tri_losses.linear_cross_entropy(h, wd, target, reduction="mean", _denom=_num_items(kind, 17),
                                           backend=backend)
    dlce.to_local().backward(up)
    return [t.detach().numpy().copy() for t in (loss, logits.grad, lce, h2.grad, w2.grad, dloss.to_local(),
                                                  xd.grad.to_local(), dlce.to_local(), wd.grad.to_local())]


def _worker_fsdp2(rank, world, group, backend):
    """FSDP2 over 2 data-parallel ranks, each with its own batch: the model's own loss and gradients against the
    fused path's, (a) the whole model sharded as one unit (the head is unsharded in its forward: fused), (b) the
    head sharded on its own (its weight outside its forward is this rank's rows: the model's own forward runs,
    with a warning)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    mesh = DeviceMesh("cpu", list(range(world)))
    ref = _model().cpu()  # a gloo CPU mesh: the model and batch on the CPU whatever the test device
    torch.manual_seed(100 + rank)  # another batch on each rank
    ids, labels = (t.cpu() for t in _batch())
    out = []
    for head_alone in (False, True):
        per_path = []
        for fused in (False, True):
            model = copy.deepcopy(ref)
            if head_alone:
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            tri_losses.hf._WARNED_HEAD.clear()
            with tri_losses.hf.patch("llama", fused=fused, backend=backend), warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                res = model(input_ids=ids, labels=labels)
                res.loss.backward()
            warned = any("shards on its own" in str(x.message) for x in w)
            grads = [p.grad.to_local().detach().numpy().copy() for _, p in sorted(model.named_parameters())]
            per_path.append((res.loss.item(), res.logits is None, warned, grads))
        out.append(per_path)
    return out


def _worker_tensor_parallel_head(rank, world, group, backend):
    """The head split over 2 tensor-parallel ranks as transformers' tp_plan splits it ("colwise_rep": a DTensor
    of rows, the logits gathered), the same batch on both: the model's own loss and gradients, fused or not."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    mesh = DeviceMesh("cpu", list(range(world)))
    ref = _model().cpu()  # a gloo CPU mesh: the model and batch on the CPU whatever the test device
    ids, labels = (t.cpu() for t in _batch())
    out = []
    for fused in (False, True):
        model = copy.deepcopy(ref)
        parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
        with tri_losses.hf.patch("llama", fused=fused, backend=backend):
            res, g = _loss_and_grads(model, ids, labels)
        full = {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).numpy().copy() for n, v in sorted(g.items())}
        out.append((type(res.loss).__name__, res.loss.detach().numpy().copy(), res.logits is None, full))
    return out


def test_hf_fused_with_a_tensor_parallel_head_matches_model_own_loss(pool2, backend):
    """A tensor-parallel head (vocab-parallel inside linear_cross_entropy): the loss is a plain tensor, as the
    model's own, and it and every gradient equal the model's own on each rank."""
    for own, fused in pool2.run(_worker_tensor_parallel_head, backend):
        assert fused[0] == own[0] == "Tensor" and fused[2] and not own[2]
        assert_close(torch.from_numpy(fused[1]), torch.from_numpy(own[1]), atol=1e-5, rtol=1e-5)
        assert fused[3].keys() == own[3].keys()
        for n in own[3]:
            assert_close(torch.from_numpy(fused[3][n]), torch.from_numpy(own[3][n]), atol=1e-5, rtol=1e-4, msg=n)


def test_hf_fused_under_fsdp2_matches_model_own_loss(pool2, backend):
    """FSDP2 data parallelism (2 ranks): fused where the model's forward unshards the head, else the model's own
    forward (a head sharded on its own gave NaN before: its rows were taken for a vocab-parallel head)."""
    for rank, (whole, alone) in enumerate(pool2.run(_worker_fsdp2, backend)):
        for (own_loss, _, _, own_g), (loss, logits_none, warned, g), expect_fused in ((*whole, True), (*alone, False)):
            assert logits_none == expect_fused and warned == (not expect_fused), rank
            assert_close(torch.tensor(loss), torch.tensor(own_loss), atol=1e-5, rtol=1e-5)
            for a, b in zip(g, own_g):
                assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def pool2():
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from tests.dist_pool import DistPool
    pool = DistPool(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("kind", ["int", "tensor"])
def test_hf_num_items_vocab_parallel_matches_float64_reference(pool2, backend, kind):
    """The process_group and DTensor routes (logits path and fused head, 2 ranks) divide by
    num_items_in_batch too."""
    from tests.reference.linear_ce import linear_ce
    results = pool2.run(_worker_vocab_parallel, backend, kind)
    torch.manual_seed(3)
    h, w = torch.randn(2, 7, 16), torch.randn(V, 16)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :2] = -100
    up = torch.rand(()) + 0.5
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    logits = (h @ w.t()).detach().requires_grad_()
    ref = linear_ce(h, w, None, target, reduction="sum") / 17
    ref.backward(up.double())
    ref_logits = (_reference_rows(logits, labels).sum() / 17)
    ref_logits.backward(up.double())
    rows = [slice(r * V // 2, (r + 1) * V // 2) for r in range(2)]
    for r, per_rank in enumerate(results):
        loss, glogits, lce, gh, gw, dloss, gxd, dlce, gwd = map(torch.from_numpy, per_rank)
        for loss_, glogits_ in ((loss, glogits), (dloss, gxd)):
            assert_close(loss_, ref_logits)
            assert_close(glogits_, logits.grad[..., rows[r]])
        for lce_, gw_ in ((lce, gw), (dlce, gwd)):
            assert_close(lce_, ref)
            assert_close(gw_, w.grad[rows[r]], atol=1e-5, rtol=1e-4)
        assert_close(gh, h.grad)


def _data_parallel_replicas(monkeypatch, model, shifts):
    """``torch.nn.parallel.replicate`` (what ``nn.DataParallel`` runs each step) itself on the CPU: only its
    device broadcast is replaced, by differentiable copies of the parameters shifted by ``shifts[j]`` for
    replica j (so that a forward running the original model is seen), and device indices are taken as
    given."""
    import importlib
    replicate = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):
        return [[(t.detach() if detach else t) + shift for t in tensors] for shift in shifts] if tensors else []
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(replicate, "_get_device_index", lambda device, optional=False: device)
    return replicate.replicate(model, list(range(len(shifts))))


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
def test_hf_applied_forward_follows_data_parallel_replicas(monkeypatch, fused):
    """nn.DataParallel (what transformers' Trainer wraps a model in on a multi-GPU machine without a launcher)
    runs a replica per device, a shallow ``__dict__`` copy of each module: apply's forward must run the
    replica, whose parameters are the device's copies (it ran the original model, on the first device)."""
    ref_model = _model()
    ids, labels = _batch()
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused, z_loss=0.1, backend="torch")
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.01)
    want, want_g = _loss_and_grads(shifted, ids, labels)
    model.zero_grad()
    replica = _data_parallel_replicas(monkeypatch, model, [0.0, 0.01])[1]
    if fused:
        assert replica.forward.args[0] is replica and model.forward.args[0] is model
    out = replica(input_ids=ids, labels=labels)
    assert (out.logits is None) == fused
    out.loss.backward()  # through the copies into the model's parameters, as DataParallel's broadcast
    assert_close(out.loss, want.loss, atol=1e-5, rtol=1e-5)
    got_g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got_g.keys() == want_g.keys()
    for n in want_g:  # (a tied embedding's two gradients add up in another order)
        assert_close(got_g[n], want_g[n], atol=5e-5, rtol=1e-3, msg=n)
    nested = _data_parallel_replicas(monkeypatch, replica, [0.0])[0]  # a replica of a replica
    with torch.no_grad():
        assert_close(nested(input_ids=ids, labels=labels).loss, want.loss, atol=1e-5, rtol=1e-5)
    tri_losses.hf.apply(model, fused=False)  # applying again (plain class): no replica hook left behind
    assert "_replicate_for_data_parallel" not in vars(model) and "forward" not in vars(model)


# ----------------------------------------------------------------------------------------------------------
# CTC speech models (transformers' ForCTCLoss; transformers 4.x computes CTC inside the models' forward)
needs_ctc_loss_function = pytest.mark.skipif(not hasattr(transformers.loss.loss_utils, "ForCTCLoss"),
                                             reason="transformers without ForCTCLoss (4.x)")

def _ctc_inputs(dtype=torch.float32):
    B, T, Vc = 4, 20, 9
    logits = torch.randn(B, T, Vc, device=DEVICE).to(dtype).requires_grad_()
    # padding by -100 or by the blank (0), also between labels, as transformers allows; row 3 cannot fit
    labels = torch.tensor([[3, 4, 4, 5, -100, -100], [6, 0, 7, -100, 8, 0], [1, 2, -100, -100, -100, -100],
                           [1, 1, 1, 1, 1, 1]], device=DEVICE)
    lengths = torch.tensor([20, 17, 9, 6], device=DEVICE)
    return logits, labels, lengths


@needs_ctc_loss_function
@pytest.mark.parametrize("reduction,zero_infinity", [("mean", True), ("sum", True), ("none", False)])
def test_hf_ctc_loss_matches_transformers(backend, reduction, zero_infinity):
    logits, labels, lengths = _ctc_inputs()
    theirs = transformers.loss.loss_utils.ForCTCLoss(logits, labels, lengths, 0, reduction=reduction,
                                                     zero_infinity=zero_infinity)
    ours = tri_losses.hf.ctc_loss(logits, labels, lengths, 0, reduction=reduction, zero_infinity=zero_infinity,
                                  ctc_kwargs=dict(backend=backend))
    assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    up = torch.rand_like(ours)
    (g,) = torch.autograd.grad(ours, logits, up)
    finite = torch.isfinite(theirs).all() or zero_infinity  # (an infinite row: PyTorch's gradient is NaN there)
    if finite:
        (ref,) = torch.autograd.grad(theirs, logits, up)
        assert_close(g, ref, atol=1e-5, rtol=1e-4)


@needs_ctc_loss_function
def test_hf_ctc_loss_16_bit_logits(backend):
    logits, labels, lengths = _ctc_inputs(torch.bfloat16)
    ours = tri_losses.hf.ctc_loss(logits[:3], labels[:3], lengths[:3], 0, ctc_kwargs=dict(backend=backend))
    theirs = transformers.loss.loss_utils.ForCTCLoss(logits[:3].float(), labels[:3], lengths[:3], 0)
    assert ours.dtype == torch.float32
    assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def _tiny_ctc_model():
    cfg = transformers.Wav2Vec2Config(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8),
                                      num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, pad_token_id=0,
                                      ctc_loss_reduction="mean", do_stable_layer_norm=True)
    # eval(): no dropout, so the two models' losses are comparable (the loss is computed in either mode)
    return transformers.Wav2Vec2ForCTC(cfg).to(DEVICE).eval()


@needs_ctc_loss_function
@pytest.mark.parametrize("how", ["apply", "patch"])
def test_hf_ctc_model_matches_its_own_loss(backend, how):
    """A tiny Wav2Vec2ForCTC (every transformers CTC model calls self.loss_function the same way): loss and every
    parameter's gradient as with the model's own ForCTCLoss."""
    torch.manual_seed(0)
    ref = _tiny_ctc_model()
    model = copy.deepcopy(ref)
    x = torch.randn(3, 1600, device=DEVICE)
    mask = torch.ones(3, 1600, dtype=torch.long, device=DEVICE)
    mask[1, 1200:] = 0
    mask[2, 800:] = 0
    labels = torch.tensor([[3, 4, 4, 5, -100, -100], [6, 0, 7, -100, 8, -100], [1, 2, -100, -100, -100, -100]],
                          device=DEVICE)
    expected = ref(x, attention_mask=mask, labels=labels).loss
    expected.backward()
    if how == "apply":
        tri_losses.hf.apply(model, backend=backend)
        got = model(x, attention_mask=mask, labels=labels).loss
    else:
        with tri_losses.hf.patch("wav2vec2", backend=backend):
            assert isinstance(model.loss_function, functools.partial)
            got = model(x, attention_mask=mask, labels=labels).loss
        assert "loss_function" not in vars(transformers.Wav2Vec2ForCTC)
    got.backward()
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


@needs_ctc_loss_function
def test_hf_ctc_refusals():
    model = _tiny_ctc_model()
    with pytest.raises(ValueError, match="Wav2Vec2ForCTC is a CTC model .* use fused=False"):
        tri_losses.hf.apply(model, fused=True)
    with pytest.raises(TypeError, match="unexpected option 'reduction' for a CTC model"):
        tri_losses.hf.apply(model, reduction="sum")  # the model's config sets it
    with pytest.raises(TypeError, match="unexpected option 'label_smoothing' for a CTC model"):
        tri_losses.hf.patch("wav2vec2", label_smoothing=0.1)
    assert "loss_function" not in vars(transformers.Wav2Vec2ForCTC)
    logits, labels, lengths = _ctc_inputs()
    with pytest.raises(ValueError, match=r"labels: expected \(B, U\) with B = 4, got shape \(3, 6\)"):
        tri_losses.hf.ctc_loss(logits, labels[:3], lengths, 0)
    with pytest.raises(TypeError, match="labels: expected integer class ids"):
        tri_losses.hf.ctc_loss(logits, labels.float(), lengths, 0)


# ----------------------------------------------------------------------------------------------------------
# masked LMs (transformers' ForMaskedLMLoss: the encoders whose forward calls self.loss_function)

def _tiny_masked_lm(name):
    cls = getattr(transformers, f"{name}ForMaskedLM", None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}ForMaskedLM")
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    cfg = getattr(transformers, f"{name}Config")(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                                                 **ids)
    if not tri_losses.hf._calls_loss_function(cls):
        pytest.skip(f"{cls.__name__} computes its loss itself in transformers {transformers.__version__}")
    return cls(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("name", ["ModernBert", "EuroBert"])
@pytest.mark.parametrize("num_items", [None, 5])
def test_hf_masked_lm_matches_its_own_loss(backend, name, num_items):
    torch.manual_seed(0)
    ref = _tiny_masked_lm(name)
    ids = torch.randint(4, V, (2, 10), device=DEVICE)
    labels = torch.full((2, 10), -100, device=DEVICE)
    labels[0, 2], labels[1, 4], labels[1, 7] = 5, 7, 9
    extra = {} if num_items is None else dict(num_items_in_batch=torch.tensor(num_items, device=DEVICE))
    expected = ref(input_ids=ids, labels=labels, **extra).loss
    expected.backward()
    for how in ("apply", "patch"):
        model = copy.deepcopy(ref)
        model.zero_grad()
        if how == "apply":
            tri_losses.hf.apply(model, backend=backend)
            got = model(input_ids=ids, labels=labels, **extra).loss
        else:
            with tri_losses.hf.patch(type(model), backend=backend):
                got = model(input_ids=ids, labels=labels, **extra).loss
        got.backward()
        assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=how)
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is not None:
                assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=f"{how} {pname}")


def test_hf_masked_lm_loss_function_and_refusals():
    logits = torch.randn(2, 6, V, requires_grad=True)
    labels = torch.randint(0, V, (2, 6))
    labels[0, :3] = -100
    for n in (None, 7):
        theirs = transformers.loss.loss_utils.ForMaskedLMLoss(logits, labels, V, num_items_in_batch=n)
        ours = tri_losses.hf.masked_lm_loss(logits, labels, V, num_items_in_batch=n)
        assert_close(ours, theirs)
        assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0])
    with pytest.raises(ValueError, match=r"masked_lm_loss: labels: expected shape logits.shape\[:-1\]"):
        tri_losses.hf.masked_lm_loss(logits, labels[:, :5], V)
    flat = transformers.loss.loss_utils.ForMaskedLMLoss(logits, labels.reshape(-1), V)  # flat labels, as transformers
    assert_close(tri_losses.hf.masked_lm_loss(logits, labels.reshape(-1), V), flat)
    model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                                 num_attention_heads=2, intermediate_size=32))
    if not tri_losses.hf._calls_loss_function(type(model)):  # BERT computes its masked-LM loss itself
        with pytest.raises(ValueError, match=r"BertForMaskedLM \(model type 'bert'\): its forward computes its loss "
                                             r"itself .*trainer_loss\(task='masked_lm'\)"):
            tri_losses.hf.apply(model)
    modern = getattr(transformers, "ModernBertForMaskedLM", None)
    if modern is not None:
        with pytest.raises(ValueError, match="fused=True: ModernBertForMaskedLM is a masked LM"):
            tri_losses.hf.patch(modern, fused=True)


def test_hf_trainer_loss_masked_lm_trains_bert_like_transformers_loss():
    """trainer_loss(task="masked_lm") on BERT (whose forward computes its loss itself; Trainer keeps the labels
    from it when given a compute_loss_func): the same weights after two accumulated steps as with transformers'
    own ForMaskedLMLoss in that place (both normalise by num_items_in_batch)."""
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    base = transformers.BertForMaskedLM(cfg)

    def theirs(outputs, labels, num_items_in_batch=None):
        return transformers.loss.loss_utils.ForMaskedLMLoss(outputs.logits, labels, V,
                                                            num_items_in_batch=num_items_in_batch)

    data = []
    g = torch.Generator().manual_seed(2)
    for i in range(8):
        ids = torch.randint(4, V, (12,), generator=g)
        labels = torch.full((12,), -100)
        pos = torch.randperm(12, generator=g)[:1 + i % 3]
        labels[pos] = ids[pos]
        data.append({"input_ids": ids.masked_fill(labels != -100, 3), "labels": labels})

    def train(model, loss):
        with tempfile.TemporaryDirectory() as d:
            args = transformers.TrainingArguments(output_dir=d, max_steps=2, per_device_train_batch_size=2,
                                                  gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none",
                                                  save_strategy="no", disable_tqdm=True, use_cpu=True)
            transformers.Trainer(model=model, args=args, train_dataset=data, compute_loss_func=loss).train()
        return model

    ref = train(copy.deepcopy(base), theirs)
    model = train(copy.deepcopy(base), tri_losses.hf.trainer_loss(task="masked_lm", backend="torch"))
    assert max((p - q).abs().max() for p, q in zip(ref.parameters(), base.parameters())) > 1e-3
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match=r"task: expected one of \('causal_lm', 'masked_lm'\), got 'mlm'"):
        tri_losses.hf.trainer_loss(task="mlm")


# ----------------------------------------------------------------------------------------------------------
# TRL's fused LM head (add_fused_lm_head / patch_trl) against its documented outputs on the model's own logits

def _trl_reference(model, ids, labels, temperature=1.0, shift_labels=None, num_items=None):
    """TRL's FusedCausalLMOutput fields from the model's own logits (its head's soft-cap and scales applied by
    the model), in float64: log_probs, entropy, is_top1 (0 where the label is -100), label_mask, loss."""
    out = model(input_ids=ids, use_cache=False)
    z = out.logits.double() / temperature
    if shift_labels is None:
        z, tgt = z[:, :-1], labels[:, 1:]
    else:
        tgt = shift_labels
    mask = tgt != -100
    logp = z.log_softmax(-1)
    lp = torch.where(mask, logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0], 0.0)
    ent = torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)
    loss = -lp.sum() / (mask.sum() if num_items is None else num_items)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return dict(loss=loss, log_probs=lp, entropy=ent, is_top1=(z.argmax(-1) == tgt) & mask, label_mask=mask)


@pytest.mark.parametrize("model_type,temperature,how", [
    ("llama", 0.7, "labels"), ("llama", 1.0, "shift_labels"), ("gemma2", 1.0, "labels"),
    ("granite", 1.3, "num_items"), ("cohere", 1.0, "labels"), ("mixtral", 0.8, "labels")])
def test_hf_add_fused_lm_head_gives_trl_outputs(backend, model_type, temperature, how):
    """tri_losses.hf.add_fused_lm_head (TRL's fused head on linear_cross_entropy): with fused_lm_head=True the
    outputs TRL's trainers read (log_probs, entropy, is_top1, label_mask, loss with the router's loss for
    MoE) equal those of the model's own logits (temperature-scaled, soft-capped / scaled by the model), and
    the gradients of every parameter for loss + entropy terms match; without fused_lm_head the model's own
    forward runs."""
    overrides = dict(final_logit_softcapping=5.0) if model_type == "gemma2" else {}
    ref_model = _model(model_type, **overrides)
    ids, labels = _batch()
    # pre-shifted labels (context parallelism, packing): (B, T), scored without shifting (rows swapped: not
    # what shifting the labels would give)
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).roll(1, 0) if how == "shift_labels" else None
    num_items = torch.tensor(11, device=DEVICE) if how == "num_items" else None
    model = tri_losses.hf.add_fused_lm_head(copy.deepcopy(ref_model), temperature=temperature,
                                            outputs=("log_probs", "entropy", "is_top1"))
    kw = dict(shift_labels=shift) if shift is not None else dict(labels=labels)
    upe = torch.randn(shift.shape if shift is not None else labels[:, 1:].shape, device=DEVICE)
    with tri_losses.use_backend(backend):
        out = model(input_ids=ids, fused_lm_head=True, num_items_in_batch=num_items, **kw)
        (out.loss + (out.entropy * upe).sum()).backward()
    exp = _trl_reference(ref_model, ids, labels, temperature, shift, num_items)
    (exp["loss"] + (exp["entropy"] * upe.double()).sum()).backward()
    for name in ("loss", "log_probs", "entropy"):
        assert_close(getattr(out, name).double(), exp[name], atol=2e-5, rtol=2e-5, msg=name)
    assert torch.equal(out.is_top1, exp["is_top1"]) and torch.equal(out.label_mask, exp["label_mask"])
    assert (out.aux_loss is not None) == (model_type == "mixtral")
    got = dict(model.named_parameters())
    for n, p in ref_model.named_parameters():
        if p.grad is not None:
            assert_close(got[n].grad, p.grad, atol=2e-5, rtol=2e-4, msg=n)
    # without fused_lm_head: the model's own forward (its logits and loss)
    plain, own = model(input_ids=ids, labels=labels), ref_model(input_ids=ids, labels=labels)
    assert_close(plain.loss, own.loss) and assert_close(plain.logits, own.logits)


def test_hf_add_fused_lm_head_refusals():
    """What the fused loss cannot reproduce raises, naming it: TRL outputs it does not compute, a temperature
    on a soft-capping model, a model type outside the tested ones, bad arguments; a fused call needs labels."""
    with pytest.raises(ValueError, match="outputs: \\['mean_logits'\\]"):
        tri_losses.hf.add_fused_lm_head(_model(), outputs=("log_probs", "mean_logits"))
    with pytest.raises(ValueError, match="temperature"):
        tri_losses.hf.add_fused_lm_head(_model("gemma2", final_logit_softcapping=5.0), temperature=0.9)
    for kw, exc in ((dict(temperature=0.0), ValueError), (dict(temperature="1"), TypeError),
                    (dict(outputs="entropy"), TypeError), (dict(cast_lm_head_to_fp32=1), TypeError)):
        with pytest.raises(exc):
            tri_losses.hf.add_fused_lm_head(_model(), **kw)
    model = tri_losses.hf.add_fused_lm_head(_model())
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=_batch()[0], fused_lm_head=True)
    with pytest.raises(ValueError, match="not one of the tested fused model types"):
        tri_losses.hf.add_fused_lm_head(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=1, n_head=4)))


def test_hf_add_fused_lm_head_fp32_head_under_autocast():
    """cast_lm_head_to_fp32: the head's GEMM in fp32 outside autocast (bf16 autocast elsewhere): the log-probs
    equal the float64 ones of the model's fp32 hidden states (autocast's bf16 head would be ~1e-2 off)."""
    ref_model = _model()
    ids, labels = _batch()
    model = tri_losses.hf.add_fused_lm_head(copy.deepcopy(ref_model), cast_lm_head_to_fp32=True)
    with torch.autocast(DEVICE.type if hasattr(DEVICE, "type") else "cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    z = hidden.double() @ model.lm_head.weight.double().t()
    tgt = labels[:, 1:]
    exp = torch.where(tgt != -100, z.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0], 0.0)
    assert out.log_probs.dtype == torch.float32
    assert_close(out.log_probs.double(), exp, atol=2e-5, rtol=2e-5)


def test_hf_patch_trl_swaps_the_trainers_head_and_keeps_trls_where_unsupported(monkeypatch):
    """patch_trl on stand-ins for TRL's modules (TRL itself is not a test dependency): SFT, GRPO and RLOO's
    imported add_fused_lm_head become this package's, DPO's and trl.trainer.utils' stay TRL's (DPO/KTO ask for
    outputs it does not compute, for the policy, and the reference must get the same head); a model it does
    not support gets TRL's own head, with a warning naming why; unpatch_trl restores TRL's; no TRL importable
    raises ImportError naming TRL."""
    import types
    calls = []

    def trl_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        calls.append(type(model).__name__)
    mods = {name: types.ModuleType(name) for name in ("trl", "trl.trainer", "trl.trainer.utils",
                                                      *(f"trl.trainer.{t}" for t in tri_losses.hf.TRL_TRAINERS),
                                                      "trl.trainer.dpo_trainer")}
    for name, mod in mods.items():
        if name.count(".") == 2:
            mod.add_fused_lm_head = trl_head
        monkeypatch.setitem(sys.modules, name, mod)
    sft = mods["trl.trainer.sft_trainer"]
    try:
        assert tri_losses.hf.patch_trl() and not tri_losses.hf.patch_trl()
        for t in tri_losses.hf.TRL_TRAINERS:
            assert mods[f"trl.trainer.{t}"].add_fused_lm_head is sft.add_fused_lm_head is not trl_head
        assert mods["trl.trainer.dpo_trainer"].add_fused_lm_head is mods["trl.trainer.utils"].add_fused_lm_head \
            is trl_head
        model = sft.add_fused_lm_head(_model(), outputs=("log_probs", "entropy", "is_top1"))
        assert calls == []
        ids, labels = _batch()
        assert model(input_ids=ids, labels=labels, fused_lm_head=True).entropy.shape == labels[:, 1:].shape
        with pytest.warns(UserWarning, match="TRL's own fused LM head for Gemma2ForCausalLM: .*temperature"):
            sft.add_fused_lm_head(_model("gemma2", final_logit_softcapping=5.0), temperature=0.7)
        assert calls == ["Gemma2ForCausalLM"]
    finally:
        assert tri_losses.hf.unpatch_trl()
    assert all(mods[f"trl.trainer.{t}"].add_fused_lm_head is trl_head for t in tri_losses.hf.TRL_TRAINERS)
    assert not tri_losses.hf.unpatch_trl()
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # (import fails)
    with pytest.raises(ImportError, match="TRL"):
        tri_losses.hf.patch_trl()


def test_hf_add_fused_lm_head_fp32_cast_before_the_temperature_and_a_wrapped_head(monkeypatch):
    """cast_lm_head_to_fp32 with a bf16 model and a temperature: the hidden state is cast before it is scaled
    by 1 / T (scaled in bf16 first, it was rounded again: ~6e-2 off in log-probs); a head wrapped after the
    fused head was added (a PEFT LoRA on lm_head, here a stand-in adding a delta) is read through its own
    forward (its logits), with a warning, not skipped."""
    ref_model = _model().to(torch.bfloat16)
    with torch.no_grad():
        ref_model.lm_head.weight.normal_()
    ids, labels = _batch()
    model = tri_losses.hf.add_fused_lm_head(copy.deepcopy(ref_model), temperature=0.7, cast_lm_head_to_fp32=True)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].double()
    tgt = labels[:, 1:]

    def expect(z):
        return torch.where(tgt != -100, (z / 0.7).log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0], 0.0)
    assert_close(out.log_probs.double(), expect(hidden @ model.lm_head.weight.double().t()), atol=2e-5, rtol=2e-5)

    class Delta(torch.nn.Module):  # a head whose output is not x @ W.T (as LoRA's)
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.weight = base.weight

        def forward(self, x):
            return self.base(x) + 0.5
    model.lm_head = Delta(model.lm_head)
    monkeypatch.setattr(tri_losses.hf, "_WARNED_HEAD", set())  # (warned once per class)
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    exp = expect(model.lm_head(hidden.to(torch.bfloat16)).double())
    assert_close(out.log_probs.double(), exp, atol=2e-2, rtol=2e-2)
