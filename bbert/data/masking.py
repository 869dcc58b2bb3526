"""BERT's masked-language-model corruption: choose 15% of the tokens, then 80/10/10.

Masks are a pure function of (seed, epoch, sample index), so a resumed run, or any rank
layout, sees the same masks for the same sample. Dynamic masking (RoBERTa's, the default)
draws a new mask every epoch. Static masking (BERT's and the 24hBERT code's, which store
``duplication_factor`` masked copies of the data) is reproduced without storing anything:
epoch ``e`` reuses the mask of epoch ``e % duplication_factor``.
Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # the label of positions that are not predicted (PyTorch's cross-entropy default)
_MASKING_STREAM = 2  # domain tag, so masking never reuses the shuffling's random numbers


MASKING_MODES = ("dynamic", "static")


@dataclass
class MaskingConfig:
    """How many tokens to predict and how to corrupt them.

    ``mlm_probability`` of the non-special tokens of each sample are predicted (rounded, at
    least one, at most ``max_predictions_per_seq`` when set: 20 at length 128 in BERT's and
    24hBERT's data scripts); of those, ``mask_ratio`` become [MASK], ``random_ratio`` a random
    token and the rest stay as they are. ``whole_word_masking`` picks whole words (all their
    ``##`` pieces). ``mode`` is ``"dynamic"`` (a new mask every epoch) or ``"static"`` (each
    sample has ``duplication_factor`` fixed masks, cycled over the epochs).
    """

    mlm_probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    whole_word_masking: bool = False
    mode: str = "dynamic"
    duplication_factor: int = 10
    max_predictions_per_seq: int | None = None

    def __post_init__(self):
        if self.mode not in MASKING_MODES:
            raise ValueError(f"masking.mode must be dynamic or static, got {self.mode!r}")
        if isinstance(self.duplication_factor, bool) or not isinstance(self.duplication_factor, int) \
                or self.duplication_factor < 1:
            raise ValueError(f"masking.duplication_factor must be a whole number >= 1 (the paper's "
                             f"data uses 10), got {self.duplication_factor!r}")
        if self.max_predictions_per_seq is not None and (
                isinstance(self.max_predictions_per_seq, bool)
                or not isinstance(self.max_predictions_per_seq, int) or self.max_predictions_per_seq < 1):
            raise ValueError("masking.max_predictions_per_seq must be a whole number >= 1 or None "
                             f"(no cap; BERT uses 20 at length 128), got {self.max_predictions_per_seq!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.mask_ratio < 0 or self.random_ratio < 0 or self.mask_ratio + self.random_ratio > 1:
            raise ValueError("mask_ratio and random_ratio must be >= 0 and sum to at most 1, "
                             f"got {self.mask_ratio} and {self.random_ratio}")


class Masker:
    """Applies :class:`MaskingConfig` to packed samples of one tokenizer's ids.

    ``special_ids`` are never chosen; ``continuation`` marks ``##`` word pieces (needed only
    for whole-word masking).
    """

    def __init__(self, config: MaskingConfig, vocab_size: int, mask_id: int, special_ids,
                 continuation: np.ndarray | None = None):
        self.config = config
        self.mask_id = mask_id
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[list(special_ids)] = True
        # Random replacements are drawn from ordinary tokens only.
        self.random_pool = np.flatnonzero(~self.is_special)
        if config.whole_word_masking and continuation is None:
            raise ValueError("whole_word_masking needs the tokenizer's continuation (##) table")
        self.continuation = continuation

    @classmethod
    def from_tokenizer(cls, tok, config: MaskingConfig) -> "Masker":
        """Build a masker for a ``transformers`` tokenizer."""
        vocab = tok.get_vocab()
        continuation = np.zeros(len(tok), dtype=bool)
        for token, i in vocab.items():
            continuation[i] = token.startswith("##")
        return cls(config, len(tok), tok.mask_token_id, tok.all_special_ids, continuation)

    def rng(self, seed: int, epoch: int, index: int) -> np.random.Generator:
        """The random stream of one sample in one epoch: a pure function of its arguments.

        Static masking has only ``duplication_factor`` streams per sample, cycled over epochs."""
        if self.config.mode == "static":
            epoch %= self.config.duplication_factor
        return np.random.default_rng([_MASKING_STREAM, seed, epoch, index])

    def __call__(self, ids: np.ndarray, seed: int, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(input_ids, labels)`` (int64) for one sample ``ids`` of shape ``[L]``."""
        rng = self.rng(seed, epoch, index)
        ids = ids.astype(np.int64)
        candidates = np.flatnonzero(~self.is_special[ids])
        labels = np.full_like(ids, IGNORE_INDEX)
        if candidates.size == 0:
            return ids, labels
        n_predict = max(1, int(round(candidates.size * self.config.mlm_probability)))
        if self.config.max_predictions_per_seq is not None:
            n_predict = min(n_predict, self.config.max_predictions_per_seq)
        if self.config.whole_word_masking:
            chosen = self._choose_whole_words(ids, candidates, n_predict, rng)
        else:
            chosen = rng.choice(candidates, size=n_predict, replace=False)
        labels[chosen] = ids[chosen]
        action = rng.random(chosen.size)
        masked = ids.copy()
        to_mask = action < self.config.mask_ratio
        to_random = ~to_mask & (action < self.config.mask_ratio + self.config.random_ratio)
        masked[chosen[to_mask]] = self.mask_id
        masked[chosen[to_random]] = rng.choice(self.random_pool, size=int(to_random.sum()))
        return masked, labels

    def _choose_whole_words(self, ids, candidates, n_predict, rng) -> np.ndarray:
        # A word starts at a candidate that is not a ## piece, or follows a special token.
        follows_candidate = np.zeros(candidates.size, dtype=bool)
        follows_candidate[1:] = np.diff(candidates) == 1
        starts = ~(self.continuation[ids[candidates]] & follows_candidate)
        words = np.split(candidates, np.flatnonzero(starts)[1:])
        chosen: list[int] = []
        # Google's recipe: visit words in random order, skip one that would overshoot the budget.
        for w in rng.permutation(len(words)):
            if len(chosen) >= n_predict:
                break
            too_many = len(chosen) + len(words[w]) > n_predict
            # The first word may overshoot the 15% (or nothing would be chosen), never the cap.
            if too_many and (chosen or self.config.max_predictions_per_seq is not None):
                continue
            chosen.extend(words[w].tolist())
        return np.array(sorted(chosen), dtype=np.int64)
