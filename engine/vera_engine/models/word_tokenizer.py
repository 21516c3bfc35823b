"""A word-level tokenizer for tiny checkpoints trained from scratch, built with Hugging Face `tokenizers`.

Why words, not bytes: a small text encoder learned from scratch has to turn "red" into one direction the DiT's
cross-attention can find; over words the colour is one token from the first step (docs/TINY_MODEL.md has the
runs behind this). A full-size Vera keeps Wan's umT5 and its tokenizer; this is only for checkpoints whose encoder
is trained with them.

The vocabulary is every word of the training instructions (lower-cased; punctuation split off), so a studio's own
layered data brings its own words. Unknown words at inference map to `<unk>`: the edit still runs, and
`unknown_words` lets a caller say which words the model cannot read. The tokenizer saves as a standard
`PreTrainedTokenizerFast` folder (`tokenizer.json`), which the pipeline loads like any other.
"""

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Same ids as T5's (pad 0, eos 1, unk 2), so the T5 encoder config keeps its usual special ids.
SPECIAL_TOKENS = (PAD, EOS, UNK)

# What the tokenizer's pre-tokenizer splits on (`pre_tokenizers.Whitespace`): runs of word characters, runs of
# other non-space characters. Used to list a text's words without building a tokenizer.
_WORD = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """The tokens a word-level tokenizer sees in `text`: lower-cased words and punctuation runs."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of `texts` (sorted, so the ids are reproducible)."""
    vocabulary = sorted({word for text in texts for word in words_of(text)} - set(SPECIAL_TOKENS))
    if not vocabulary:
        raise ValueError("no words to build a vocabulary from: every instruction was empty")
    return _word_tokenizer({token: index for index, token in enumerate((*SPECIAL_TOKENS, *vocabulary))})


def _word_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5's convention: every sequence ends with </s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def is_word_tokenizer(tokenizer: object) -> bool:
    """Whether `tokenizer` is a word-level one built by `build_word_tokenizer` (not bytes, not sentencepiece)."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return False
    return type(tokenizer.backend_tokenizer.model).__name__ == "WordLevel"


def extend_word_tokenizer(
    tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]
) -> PreTrainedTokenizerFast:
    """`tokenizer` with the words of `texts` it lacks appended (sorted); the words it has keep their ids.

    Returns `tokenizer` itself when it knows every word. A text encoder trained with the old tokenizer reads the
    old ids as before once its embedding table is resized to the new length (`resize_token_embeddings`).
    """
    vocab = tokenizer.get_vocab()
    new_words = sorted({word for text in texts for word in words_of(text)} - set(vocab))
    if not new_words:
        return tokenizer
    ordered = sorted(vocab, key=vocab.__getitem__)
    if ordered[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS) or vocab[ordered[-1]] != len(ordered) - 1:
        raise ValueError("the tokenizer's ids are not 0..n-1 with pad, eos, unk first: it was not built here")
    return _word_tokenizer({token: index for index, token in enumerate((*ordered, *new_words))})


def unknown_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """The words of `text` that `tokenizer` reads as `<unk>` (empty for a byte-level tokenizer)."""
    unk = tokenizer.unk_token_id
    if unk is None or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return []
    vocab = tokenizer.get_vocab()
    return [word for word in words_of(text) if vocab.get(word, unk) == unk]
