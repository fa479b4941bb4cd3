"""Byte-level BPE tokenizers trained locally, one per model family, with that family's chat format.

Byte-level BPE covers all 256 byte values, so any UTF-8 text (accents, CJK,
emoji) round-trips. Training is deterministic and cached per process, so
building many model folders in a test run trains each family's tokenizer once.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 512

_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'] + '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
)


_GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    special_tokens: tuple[str, ...]
    bos_token: str | None  # prepended by the tokenizer when add_special_tokens=True
    eos_token: str
    stop_tokens: tuple[str, ...]  # generation_config.json eos_token_id: end of text and end of turn
    chat_template: str


CHAT_FORMATS: dict[str, ChatFormat] = {
    "llama": ChatFormat(
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        stop_tokens=("<|end_of_text|>", "<|eot_id|>"),
        chat_template=_LLAMA3_TEMPLATE,
    ),
    "qwen2": ChatFormat(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        chat_template=_CHATML_TEMPLATE,
    ),
    "mistral": ChatFormat(
        special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        bos_token="<s>",
        eos_token="</s>",
        stop_tokens=("</s>",),
        chat_template=_MISTRAL_TEMPLATE,
    ),
    "gemma3": ChatFormat(
        special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos_token="<bos>",
        eos_token="<eos>",
        stop_tokens=("<eos>", "<end_of_turn>"),
        chat_template=_GEMMA_TEMPLATE,
    ),
}
# Families that share another's chat format (and so its trained tokenizer).
CHAT_FORMATS.update(qwen3=CHAT_FORMATS["qwen2"], qwen3_moe=CHAT_FORMATS["qwen2"], mixtral=CHAT_FORMATS["mistral"])

# Training text: enough English, code and other scripts for VOCAB_SIZE merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.",
    "Kubernetes schedules pods onto nodes; a deployment keeps the requested number of replicas running.",
    "Large language models predict the next token from the tokens that came before it.",
    "A paged key-value cache stores attention keys and values in fixed-size blocks of memory.",
    "Continuous batching adds new requests to the running batch at every step of the engine.",
    "Hello, world! How are you today? I am fine, thank you. What would you like to talk about?",
    "Once upon a time there was a little robot who wanted to learn how to write poems and stories.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "import torch\nx = torch.randn(4, 8)\ny = x @ x.T\nprint(y.shape, y.dtype)\n",
    '{"model": "kubellm-default", "prompt": "Hello", "max_tokens": 16, "temperature": 0.0}',
    "The year 2024 had 366 days; 3.14159 is close to pi and 2.71828 is close to e.",
    "Grüße aus München! Le café est très bon, naïve façade, señor, smörgåsbord.",
    "Здравствуйте, как дела? Привет, мир! Спасибо большое.",
    "こんにちは世界。今日はいい天気ですね。日本語のテキストです。",
    "你好，世界！我们正在测试分词器。北京欢迎你。",
    "مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। Γειά σου κόσμε.",
    "Emoji: 🙂 😀 🚀 🎉 👍 ❤️ 🤖 🌍 — and symbols: © ® ™ € £ ¥ ± × ÷ ≤ ≥ ∞.",
    "Question: What is the capital of France? Answer: The capital of France is Paris.",
    "The engine reads the model configuration, loads the weights, and allocates the cache.",
    "Operators reconcile the desired state of custom resources with the actual state of the cluster.",
]


@functools.cache
def _trained_tokenizer_json(chat: ChatFormat) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(chat.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if chat.bos_token is not None:
        bos = (chat.bos_token, tokenizer.token_to_id(chat.bos_token))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1", special_tokens=[bos]
        )
    return tokenizer.to_str()


def trained_tokenizer(family: str) -> Tokenizer:
    """The `tokenizers` tokenizer of `family` (any key of CHAT_FORMATS)."""
    if family not in CHAT_FORMATS:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(CHAT_FORMATS)}")
    return Tokenizer.from_str(_trained_tokenizer_json(CHAT_FORMATS[family]))


def write_tokenizer(folder: Path, family: str) -> Tokenizer:
    """tokenizer.json plus a classic tokenizer_config.json (chat template inline), as most hub models ship."""
    tokenizer = trained_tokenizer(family)
    chat = CHAT_FORMATS[family]
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": chat.bos_token,
        "eos_token": chat.eos_token,
        "chat_template": chat.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return tokenizer
