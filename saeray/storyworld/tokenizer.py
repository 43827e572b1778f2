"""The storyworld tokenizer: one token per word, as a Hugging Face ``PreTrainedTokenizerFast``.

``tokenizers`` WordLevel model over the fixed vocabulary (``vocab.VOCAB``, ids in that order), a
``Whitespace`` pre-tokenizer (every storyworld word is all letters or a single punctuation mark,
so it splits exactly on the spaces of ``Doc.text``), and a post-processor that prepends ``<bos>``,
so ``tokenizer(doc.text).input_ids == doc.token_ids`` and per-token labels line up with positions.

transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` into ``tokenizer_config.json``;
older transformers (4.x, as pinned by SAELens / TransformerLens setups) cannot resolve that name,
so :func:`save_tokenizer` rewrites it to ``"PreTrainedTokenizerFast"``, which both resolve.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .generator import CONTEXT_LEN
from .vocab import BOS, EOS, PAD, UNK, VOCAB, WORD_ID


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=dict(WORD_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, WORD_ID[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=CONTEXT_LEN, padding_side="right")


def save_tokenizer(folder: str | Path, tokenizer: PreTrainedTokenizerFast | None = None) -> None:
    folder = Path(folder)
    (tokenizer or build_tokenizer()).save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def encode(words: list[str]) -> list[int]:
    """Ids of ``[BOS] + words`` without going through the tokenizer (the training fast path)."""
    unk = WORD_ID[UNK]
    return [WORD_ID[BOS]] + [WORD_ID.get(w, unk) for w in words]


def vocab_size() -> int:
    return len(VOCAB)
