"""tri_losses: PyTorch losses with fused Triton kernels and RETURNN's loss semantics."""
from ._backend import use_backend
from .automata import Fsa, ctc_fsa, fast_baum_welch, fast_viterbi, fsa_loss, hmm_fsa
from .cross_entropy import CrossEntropyLoss, cross_entropy, frame_error
from .ctc import CTCLoss, ctc_best_path, ctc_greedy_decode, ctc_loss, ctc_posteriors
from .elementwise import (BCEWithLogitsLoss, L1Loss, MSELoss, binary_cross_entropy_with_logits, generic_ce_loss,
                          l1_loss, mse_loss)
from .linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from . import samplers, tf_compat
from .sampled import NCELoss, SampledSoftmaxLoss, compute_sampled_logits, nce_loss, sampled_softmax_loss
from .text import bleu, ctc_beam_search_decode, edit_distance, error_rate
from .misc import (deep_clustering_loss, expected_loss, label_smoothed_log_prob_gradient, loss_with_gradient,
                   triplet_loss)

__version__ = "0.1.0"

__all__ = ["use_backend", "cross_entropy", "CrossEntropyLoss", "frame_error", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "ctc_loss", "CTCLoss", "ctc_posteriors", "ctc_best_path", "ctc_greedy_decode",
           "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "generic_ce_loss", "BCEWithLogitsLoss", "MSELoss",
           "L1Loss", "deep_clustering_loss", "triplet_loss", "expected_loss", "loss_with_gradient",
           "label_smoothed_log_prob_gradient", "edit_distance", "error_rate", "bleu", "ctc_beam_search_decode",
           "fast_baum_welch", "fast_viterbi", "fsa_loss", "ctc_fsa", "hmm_fsa", "Fsa",
           "sampled_softmax_loss", "nce_loss", "compute_sampled_logits", "SampledSoftmaxLoss", "NCELoss", "samplers",
           "tf_compat"]
