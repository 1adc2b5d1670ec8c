"""Character-level tokenizer for the scratch base model.

Every character is one token, so digits, letters and operators are each their own
symbol and a small model never has to split a number across merges. Built with
`tokenizers` and wrapped as a transformers fast tokenizer (pad/bos/eos/unk set), saved
with ``save_pretrained`` like any other tokenizer.
"""
from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# Always in the vocabulary, so a skill added later still tokenizes its symbols.
BASE_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_char_tokenizer(texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    chars = sorted(set(BASE_CHARS).union(*map(set, texts)))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    return fast
