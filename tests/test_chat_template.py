"""Chat templates (data/chat.py) against transformers' apply_chat_template on the same files."""
import json

import pytest

from deepseek_jax.data import chat
from deepseek_jax.data.tokenizer import get_tokenizer
from tests import chat_fixtures as cf

CONVERSATIONS = [
    [{"role": "user", "content": "Say the word: apple."}, {"role": "assistant", "content": "apple"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"},
     {"role": "assistant", "content": "<think>hm</think> fine, über café 東京"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return cf.write_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_render_and_ids_equal_transformers(tok_dir, hf_tok, conv, gen):
    template = chat.load_template("auto", tok_dir)
    messages = conv[:-1] if gen else conv
    text = template.render(messages, add_generation_prompt=gen)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ours = get_tokenizer(tok_dir).encode(text)
    theirs = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
    assert ours == list(theirs["input_ids"])


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_assistant_mask_equals_transformers_generation_mask(tok_dir, hf_tok, conv):
    """Our prefix-rendering spans vs transformers' {% generation %} assistant mask."""
    template = chat.load_template("auto", tok_dir)
    tokenizer = get_tokenizer(tok_dir)
    ids, weights = chat.tokenize_conversation(tokenizer, template, conv)
    theirs = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    # Pieces are tokenised apart; on this template the boundaries are special tokens, so the
    # ids equal the whole-string encoding and the masks must match token for token.
    assert ids == list(theirs["input_ids"])
    assert [int(w) for w in weights] == list(theirs["assistant_masks"])
    assert sum(weights) > 0


def test_none_concatenates_with_eos_after_assistant(tok_dir):
    tokenizer = get_tokenizer(tok_dir)
    conv = CONVERSATIONS[0]
    ids, weights = chat.tokenize_conversation(tokenizer, None, conv)
    user, reply = tokenizer.encode(conv[0]["content"]), tokenizer.encode(conv[1]["content"])
    assert ids == [tokenizer.bos_id] + user + reply + [tokenizer.eos_id]
    assert weights == [0.0] * (1 + len(user)) + [1.0] * (len(reply) + 1)


def test_sandbox_blocks_python_internals(tok_dir):
    evil = chat.ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|attribute"):
        evil.render([{"role": "user", "content": "x"}])


def test_unknown_role_and_rewriting_template_are_errors(tok_dir):
    template = chat.load_template("auto", tok_dir)
    with pytest.raises(chat.TemplateMismatch, match="Unknown role: tool"):
        chat.tokenize_conversation(get_tokenizer(tok_dir), template,
                                   [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])
    # A template that shows only the last assistant turn rewrites earlier ones.
    last_only = chat.ChatTemplate("{% for m in messages %}{% if m.role == 'user' or loop.last %}"
                                  "{{ m.role }}:{{ m.content }};{% endif %}{% endfor %}"
                                  "{% if add_generation_prompt %}assistant:{% endif %}")
    conv = CONVERSATIONS[1]
    with pytest.raises(chat.TemplateMismatch, match="rewrites or reorders"):
        chat.tokenize_conversation(get_tokenizer(tok_dir), last_only, conv)


def test_auto_without_template_names_the_fix(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="chat_template='none'"):
        chat.load_template("auto", "byte")
    d = tmp_path / "t"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="no 'chat_template'"):
        chat.load_template("auto", str(d))
    with pytest.raises(ValueError, match="use one of"):
        chat.load_template("chatml", str(d))
