"""A trained byte-level BPE tokenizer.json and a DeepSeek-style chat template, written the
way Hugging Face checkpoints ship them (tokenizer.json + tokenizer_config.json), so that
transformers' AutoTokenizer / apply_chat_template can serve as the oracle."""
from __future__ import annotations

import json
import os

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL = [BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>"]

# DeepSeek-V3's template, trimmed: system prompt first (collected with a namespace, as the
# released one does), then user / assistant turns; anything else is refused.
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}{% generation %}"
    "{{ message['content'] + '<｜end▁of▁sentence｜>' }}{% endgeneration %}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")

CORPUS = [
    "the cat sat on the mat", "a dog ran in the park", "hello world, how are you?",
    "answer: yes", "answer: no", "red green blue apple banana cherry", "Say the word: apple.",
    "What is 2 + 3? It is 5.", "def f(x): return x * 2", "über naïve café 東京",
] * 20


def write_tokenizer(folder: str, vocab_size: int = 320) -> str:
    """Train a byte-level BPE on CORPUS and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "rstrip": False,
                            "normalized": False, "single_word": False, "special": True},
              "eos_token": EOS, "pad_token": PAD, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 256, "chat_template": DEEPSEEK_TEMPLATE}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    return folder
