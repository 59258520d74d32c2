"""Hugging Face integration on a tiny randomly initialised Llama (built from a config, no download)."""
import copy

import pytest
import torch

from tests.conftest import assert_close

transformers = pytest.importorskip("transformers")

import tri_losses  # noqa: E402
import tri_losses.hf  # noqa: E402


def _model():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


def _batch():
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 7:] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [False, True], ids=["logits_path", "fused_path"])
@pytest.mark.parametrize("num_items", [None, 13])
def test_hf_matches_model_own_loss(backend, fused, num_items):
    ref_model = _model().train()
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels, **kw)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=fused)
    with tri_losses.use_backend(backend):
        out, g = _loss_and_grads(model, ids, labels, **kw)
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    assert (out.logits is None) == fused  # the fused path builds no logits in training
    assert g.keys() == ref_g.keys()
    for n in ref_g:
        assert_close(g[n], ref_g[n], atol=1e-5, rtol=1e-4, msg=n)


def test_hf_fused_eval_still_returns_logits():
    ref_model = _model().eval()
    ids, labels = _batch()
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        ref = ref_model(input_ids=ids, labels=labels)
        plain = model(input_ids=ids)
    assert out.logits is not None and out.logits.shape == (2, 9, 96)
    assert_close(out.logits, ref.logits)
    assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert plain.loss is None and plain.logits is not None


def test_hf_trainer_loss_function_form():
    model = _model()
    ids, labels = _batch()
    out = model(input_ids=ids)
    f = tri_losses.hf.trainer_loss(backend="torch")
    got = f(out, labels, num_items_in_batch=torch.tensor(11))
    exp = transformers.loss.loss_utils.ForCausalLMLoss(out.logits, labels, 96, num_items_in_batch=torch.tensor(11))
    assert_close(got, exp, atol=1e-6, rtol=1e-5)


def test_hf_fused_positional_arguments_bind_like_the_model():
    # model(input_ids, attention_mask, position_ids, labels=...): positional arguments keep their
    # meaning (position_ids is not mistaken for labels) and the fused loss matches the model's own.
    ref_model = _model().train()
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    pos = torch.arange(9).expand(2, 9)
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    model.zero_grad()
    out = model(ids, mask, pos, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_g[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_hf_fused_path_handles_scaled_and_softcapped_heads(family):
    """Heads that post-process their logits (Granite / logits_scaling, Cohere * logit_scale, Gemma-2
    soft-capping): the fused loss and gradients equal the model's own."""
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "granite":
        cfg = transformers.GraniteConfig(logits_scaling=8.0, **common)
        cls = transformers.GraniteForCausalLM
    elif family == "cohere":
        cfg = transformers.CohereConfig(logit_scale=0.3, **common)
        cls = transformers.CohereForCausalLM
    else:
        cfg = transformers.Gemma2Config(final_logit_softcapping=5.0, head_dim=8, **common)
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(0)
    ref_model = cls(cfg).float().train()
    ids, labels = _batch()
    ref_out, ref_g = _loss_and_grads(ref_model, ids, labels)
    model = tri_losses.hf.apply(copy.deepcopy(ref_model), fused=True, backend="torch")
    out, g = _loss_and_grads(model, ids, labels)
    assert out.logits is None
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    for n in ref_g:
        assert_close(g[n], ref_g[n], atol=1e-5, rtol=1e-4, msg=n)
