"""Tokenizers: byte ids against Python's own UTF-8 encoding; HF wrapper against the
`tokenizers` library on a tiny BPE trained here (no downloads)."""
import json

import pytest

from deepseek_jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


def test_byte_layout_and_sizes(byte_tok):
    assert (byte_tok.pad_id, byte_tok.bos_id, byte_tok.eos_id) == (256, 257, 258)
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    assert [byte_tok.token_to_id(t) for t in tags] == [259, 260, 261, 262]
    assert byte_tok.vocab_size == 264 and byte_tok.vocab_size % 8 == 0


@pytest.mark.parametrize("text", ["hello", "", "café ☕ 数学 🚀", "a\nb\tc", "<thin>k"])
def test_byte_encode_is_utf8_and_roundtrips(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text


def test_byte_special_tokens_are_single_ids(byte_tok):
    text = "Q<think>2+2=4</think><answer>4</answer>"
    ids = byte_tok.encode(text, add_bos=True, add_eos=True)
    expected = [257, *b"Q", 259, *b"2+2=4", 260, 261, *b"4", 262, 258]
    assert ids == expected
    assert byte_tok.decode(ids) == "<bos>" + text + "<eos>"
    # Control tokens go, the reasoning tags stay: rewards parse them.
    assert byte_tok.decode(ids + [256, 256], skip_special_tokens=True) == text


def test_byte_decode_invalid_utf8_is_replaced(byte_tok):
    assert byte_tok.decode([0xFF, ord("h"), ord("i")]) == "\ufffdhi"
    euro = list("€".encode("utf-8"))  # three bytes
    assert byte_tok.decode(euro[:2] + [ord("x")]) == b"\xe2\x82x".decode("utf-8", errors="replace")
    # A special token between the bytes of one character splits it: both halves invalid.
    assert byte_tok.decode(euro[:1] + [259] + euro[1:]) == "\ufffd<think>\ufffd\ufffd"


def test_byte_decode_rejects_foreign_ids_and_ignores_padding_slot(byte_tok):
    assert byte_tok.decode([ord("a"), 263, ord("b")]) == "ab"
    for bad in (264, 1000, -1):
        with pytest.raises(ValueError, match=str(bad)):
            byte_tok.decode([bad])


def _train_tiny_bpe(directory, special_tokens):
    """A byte-level BPE trained on a few strings, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the cat sat on the mat", "compute 12*34 = 408", "use 3 5 2 to make 16"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["<think>", "</think>"])  # added, not special: kept by decode
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def test_hf_tokenizer_matches_library(tmp_path):
    path, lib = _train_tiny_bpe(tmp_path, ["<pad>", "<bos>", "<eos>"])
    tok = get_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # trainer order
    assert tok.vocab_size == lib.get_vocab_size(with_added_tokens=True)
    text = "the cat <think>computes</think> 12*34"
    plain = lib.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == plain
    assert tok.encode(text, add_bos=True, add_eos=True) == [1] + plain + [2]
    assert tok.token_to_id("<think>") in plain
    ids = tok.encode(text, add_bos=True, add_eos=True) + [tok.pad_id]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_hf_tokenizer_reads_tokenizer_config(tmp_path):
    _train_tiny_bpe(tmp_path, ["<s>", "</s>", "<unk>"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None})
    )
    tok = get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == tok.eos_id  # no pad token anywhere: falls back to eos


def test_hf_tokenizer_without_bos_says_how_to_fix(tmp_path):
    path, _ = _train_tiny_bpe(tmp_path, ["<unk>"])
    with pytest.raises(ValueError, match="bos_token"):
        HFTokenizer(str(path))
    tok = HFTokenizer(str(path), bos_token="<unk>", eos_token="<unk>")
    assert tok.bos_id == tok.eos_id == 0


def test_get_tokenizer_names(tmp_path):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt7")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path))
