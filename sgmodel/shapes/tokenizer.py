"""A small word-level tokenizer in transformers format, built offline from a known vocabulary.

The shapes demo and the tests cannot download CLIP's tokenizer; a WordLevel model from the
`tokenizers` library over the world's words saves as a standard ``PreTrainedTokenizerFast``
(tokenizer.json) that ``AutoTokenizer.from_pretrained`` loads with no network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def words_of(phrases: Iterable[str]) -> list[str]:
    """Lower-cased words of the phrases, in first-seen order."""
    out: dict[str, None] = {}
    for phrase in phrases:
        for word in re.findall(r"[a-z0-9]+", phrase.lower()):
            out.setdefault(word, None)
    return list(out)


def build_word_tokenizer(phrases: Iterable[str], model_max_length: int = 16):
    """A PreTrainedTokenizerFast: lower-casing, whitespace/punctuation split, [BOS] … [EOS], [UNK] for new words."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words_of(phrases):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=model_max_length,
    )
