"""Tokenizers: a checkpoint's `tokenizer.json` through the `tokenizers` library, or the byte-level
tokenizer that presets embed (256 byte tokens, then <s> and </s>)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

BYTE_BOS, BYTE_EOS = 256, 257  # ids of <s> and </s> in the byte-level tokenizer
CONTEXT = 8  # tokens before a continuation that it is decoded after (a character split over tokens takes at most 4)


def continuation(decode: Callable[[Sequence[int]], str], context: Sequence[int], ids: Sequence[int]) -> str:
    """The text token `ids` add after the tokens `context` (its last CONTEXT decoded with them), as vLLM's
    detokenizer reads a completion after its prompt: a SentencePiece word keeps the leading space that a decode
    of it alone drops, and a character split across the boundary goes to `ids`."""
    before = list(context[-CONTEXT:])
    if not before:
        return decode(list(ids))
    head, text = decode(before), decode([*before, *ids])
    return text[len(os.path.commonprefix([head, text])):]


class TokenizerError(ValueError):
    """A tokenizer.json that cannot be loaded; the message names the file."""


class Tokenizer:
    """Text <-> token ids. `encode` applies the tokenizer's own post-processor (e.g. BOS)."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        self._specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from None

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """Every UTF-8 byte is one token (ids 0..255); <s> (256) is prepended; </s> is 257."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
        tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([tokenizers.AddedToken("<s>", special=True), tokenizers.AddedToken("</s>", special=True)])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BYTE_BOS)])
        return cls(tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; add_special_tokens=False skips the post-processor (e.g. for a rendered chat template,
        which writes its own BOS, as transformers' apply_chat_template does)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for: a byte-fallback token's (`<0xE2>`) or a byte-level BPE
        token's own bytes, even where they are part of a UTF-8 character (its decoding alone would be U+FFFD);
        otherwise its piece as text (SentencePiece's "▁" a space). Empty for a special token (`decode` skips
        them) and for an id outside the vocabulary."""
        piece = self._tok.id_to_token(token_id)
        if piece is None or token_id in self._specials:
            return b""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if isinstance(self._tok.decoder, decoders.ByteLevel) and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_byte_of(c) for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_id(self, text: str) -> int | None:
        """The id of the token whose text is `text` (e.g. a special token's), or None."""
        return self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


_BYTE_LEVEL = frozenset(pre_tokenizers.ByteLevel.alphabet())


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: the byte a ByteLevel alphabet character stands for."""
    o = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if o in printable:
        return o
    others = [b for b in range(256) if b not in printable]
    return others[o - 256]
