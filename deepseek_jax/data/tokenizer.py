"""Tokenizers: a zero-dependency byte-level tokenizer and a Hugging Face wrapper.

Both expose the same small interface, which is all the data pipeline, the sampler and
the rewards use:

    ids = tok.encode(text, add_bos=True, add_eos=False)   # list[int]
    text = tok.decode(ids, skip_special_tokens=False)      # str
    tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size, tok.token_to_id("<think>")

Byte-level layout (`ByteTokenizer`):

    0..255   the UTF-8 bytes
    256      <pad>        257  <bos>       258  <eos>
    259      <think>      260  </think>    261  <answer>    262  </answer>
    263      unused; the vocabulary is rounded up to a multiple of 8 (264) so embedding
             and logit matrices tile evenly on accelerators.

Special-token strings that appear in the text are encoded as their single id, as
Hugging Face tokenizers do for added tokens; that is how the R1 response format
`<think>...</think><answer>...</answer>` costs four tokens, not thirty-odd bytes.
`skip_special_tokens=True` drops the control tokens (pad/bos/eos) but keeps the
reasoning tags, which carry meaning for reward parsing (DeepSeek-R1's own tokenizer
marks its `<think>` tokens as added-but-not-special for the same reason).
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional, Sequence

CONTROL_TOKENS = ("<pad>", "<bos>", "<eos>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
BYTE_SPECIAL_TOKENS = CONTROL_TOKENS + TAG_TOKENS


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes plus the seven special tokens listed in the module docstring."""

    name = "byte"

    def __init__(self):
        self._special_to_id = {s: 256 + i for i, s in enumerate(BYTE_SPECIAL_TOKENS)}
        self._id_to_special = {i: s for s, i in self._special_to_id.items()}
        self._control_ids = frozenset(self._special_to_id[s] for s in CONTROL_TOKENS)
        self._num_used_ids = 256 + len(BYTE_SPECIAL_TOKENS)
        self.vocab_size = round_up(self._num_used_ids, 8)
        # Longest first so that no special token can shadow a longer one it prefixes.
        alternatives = sorted(BYTE_SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @property
    def pad_id(self) -> int:
        return self._special_to_id["<pad>"]

    @property
    def bos_id(self) -> int:
        return self._special_to_id["<bos>"]

    @property
    def eos_id(self) -> int:
        return self._special_to_id["<eos>"]

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a special token, or of a single-byte token; None if it is neither."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        encoded = token.encode("utf-8")
        return encoded[0] if len(encoded) == 1 else None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        # re.split with a capture group alternates plain text (even) and specials (odd).
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Bytes are joined and decoded together, so multi-byte characters survive;
        invalid UTF-8 (e.g. a sampled stray continuation byte) becomes U+FFFD."""
        parts: list[str] = []
        pending = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                pending.append(i)
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the byte vocabulary [0, {self.vocab_size}); "
                    "were these ids produced by a different tokenizer?"
                )
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if i >= self._num_used_ids:
                continue  # the rounding slot has no text; a model may still sample it
            if skip_special_tokens and i in self._control_ids:
                continue
            parts.append(self._id_to_special[i])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)


# Names under which common tokenizer.json files spell their control tokens, tried in
# order when neither the caller nor tokenizer_config.json names them.
_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "[CLS]")
_EOS_CANDIDATES = (
    "<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "[SEP]",
)
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>")


def _config_token(config: Mapping, key: str) -> Optional[str]:
    """tokenizer_config.json stores a token either as a string or as {"content": ...}."""
    value = config.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """Any Hugging Face `tokenizer.json`, through the `tokenizers` library.

    BOS/EOS are added here rather than by the file's post-processor, whose templates
    differ between models; `add_bos`/`add_eos` therefore mean the same thing for every
    tokenizer. Control tokens are taken from the arguments, else from a
    `tokenizer_config.json` next to the file, else from a list of common spellings;
    a missing pad token falls back to EOS (the usual choice for decoder-only models).
    `vocab_size` counts every id including added tokens; the model's embedding table
    must be at least that large.
    """

    def __init__(
        self,
        path: str,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
    ):
        from tokenizers import Tokenizer  # local import: only this class needs it

        self.name = path
        self._tok = Tokenizer.from_file(path)
        config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos = bos_token or _config_token(config, "bos_token")
        eos = eos_token or _config_token(config, "eos_token")
        pad = pad_token or _config_token(config, "pad_token")
        self._bos_id = self._find("bos", bos, _BOS_CANDIDATES)
        self._eos_id = self._find("eos", eos, _EOS_CANDIDATES)
        self._pad_id = self._find("pad", pad, _PAD_CANDIDATES, default=self._eos_id)
        self._control_ids = frozenset({self._bos_id, self._eos_id, self._pad_id})

    def _find(
        self, role: str, named: Optional[str], candidates: Sequence[str], default=None
    ) -> int:
        if named is not None:
            token_id = self._tok.token_to_id(named)
            if token_id is None:
                raise ValueError(f"{role} token {named!r} is not in the vocabulary of {self.name}")
            return token_id
        for candidate in candidates:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        if default is not None:
            return default
        raise ValueError(
            f"could not find a {role} token in {self.name} (tried {list(candidates)}); "
            f"pass {role}_token=... or add a tokenizer_config.json naming it"
        )

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self._bos_id] if add_bos else []) + ids + ([self._eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control_ids]
        # The library's own skipping is off: it would also drop added tags like <think>.
        return self._tok.decode(ids, skip_special_tokens=False)


def get_tokenizer(name_or_path: str):
    """"byte" for `ByteTokenizer`; a tokenizer.json file, or a directory holding one,
    for `HFTokenizer`."""
    if name_or_path == "byte":
        return ByteTokenizer()
    if os.path.isdir(name_or_path):
        candidate = os.path.join(name_or_path, "tokenizer.json")
        if os.path.isfile(candidate):
            return HFTokenizer(candidate)
        raise ValueError(f"directory {name_or_path!r} has no tokenizer.json")
    if os.path.isfile(name_or_path):
        return HFTokenizer(name_or_path)
    raise ValueError(
        f"unknown tokenizer {name_or_path!r}: use 'byte', a path to a tokenizer.json, "
        "or a directory containing one"
    )
