"""Masked-language-modelling inputs (BERT, Devlin et al. 2019): choose a share of the tokens to predict; of
those, 80% are replaced by <|mask|>, 10% by a random token and 10% stay as they were. The loss is taken on the
chosen positions only (targets -100 elsewhere)."""

from __future__ import annotations

import torch

from ..errors import TokenizerError
from ..tokenizer import MASK_TOKEN


def mask_token_id(tokenizer) -> int:
    """The id of <|mask|>, or TokenizerError for a tokenizer made before fmforge had it."""
    text = getattr(tokenizer, "text", tokenizer)  # a media tokenizer wraps the text one
    if MASK_TOKEN not in text.special_tokens():
        raise TokenizerError(f"the tokenizer has no {MASK_TOKEN} token (it predates the encoder); re-run "
                             "`fmforge prepare` to train a tokenizer that has it")
    return text.token_id(MASK_TOKEN)


def special_id_count(tokenizer) -> int:
    """Special tokens take ids 0 .. n-1 in fmforge's tokenizers; n is where ordinary (maskable) ids begin."""
    return len(getattr(tokenizer, "text", tokenizer).special_tokens())


def mask_tokens(input_ids: torch.Tensor, mask_rate: float, mask_id: int, n_special: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each shaped like input_ids (B, T): special tokens (ids < n_special) are never chosen;
    each other token is chosen with probability mask_rate; targets hold the original id at chosen positions and
    -100 elsewhere. Random replacements are drawn from the ordinary ids [n_special, vocab_size)."""
    ordinary = input_ids >= n_special
    draws = torch.rand(input_ids.shape, generator=generator)  # one uniform per token decides it all
    chosen = ordinary & (draws < mask_rate)
    # Split the chosen ones by where their draw fell inside [0, mask_rate): 80% mask, 10% random, 10% kept.
    share = draws / mask_rate
    to_mask = chosen & (share < 0.8)
    to_random = chosen & (share >= 0.8) & (share < 0.9)
    random_ids = torch.randint(n_special, vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, random_ids, inputs)
    targets = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return inputs, targets


def masked_batch(batch: dict[str, torch.Tensor], mask_rate: float, mask_id: int, n_special: int,
                 vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A pretraining batch (input_ids, next-token targets) turned into an MLM batch; the masking is a function
    of `seed`, so a resumed run masks each step as the uninterrupted one did."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = mask_tokens(batch["input_ids"], mask_rate, mask_id, n_special, vocab_size, generator)
    return {**batch, "input_ids": inputs, "targets": targets}
