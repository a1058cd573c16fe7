"""Real tokenizers (offline, from the llama-models and mistral-common wheels) and chat templates
that follow the ChatML, Llama 3 and Mistral conventions, with and without {% generation %} tags.

Builders are cached per process: converting Llama 3's 128k-token tiktoken file takes ~2 s.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile

import pytest

from lora_doctor.chat.templates import CHATML_TAGGED

CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TAGGED_EOT_OUTSIDE = CHATML_TAGGED.replace(
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}")
"""The fault TRL's is_chat_template_stop_token_trained looks for: the stop token outside the tags."""
CHATML_THINK = CHATML.replace("message['content'] + '<|im_end|>",
                              "(('<think>\\n\\n</think>\\n\\n' if message['role'] == 'assistant' else '') "
                              "+ message['content']) + '<|im_end|>")
"""Qwen3-style: an empty reasoning block written into every assistant turn."""

LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_TAGGED = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_MISTRAL_HEAD = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
)
MISTRAL = _MISTRAL_HEAD + "{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
MISTRAL_TAGGED = (_MISTRAL_HEAD + "{% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}"
                  "{%- endif %}{%- endfor %}")

TEMPLATE_PAIRS = {"chatml": (CHATML, CHATML_TAGGED), "llama3": (LLAMA3, LLAMA3_TAGGED),
                  "mistral": (MISTRAL, MISTRAL_TAGGED)}
"""Convention -> (template without tags, the same template with {% generation %} tags)."""

LLAMA3_EMBEDDING_ROWS = 128256
"""Rows of Llama 3's embedding matrix: 128,000 BPE tokens + 256 special tokens."""


@functools.lru_cache(maxsize=None)
def _llama3():
    pytest.importorskip("tiktoken")
    llama_models = pytest.importorskip("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    specials = list(Tokenizer.get_instance().special_tokens)
    backend = TikTokenConverter(vocab_file=path, pattern=Tokenizer.pat_str, extra_special_tokens=specials).converted()
    # Like Meta's tokenizer.json: the tokenizer itself prepends <|begin_of_text|>.
    backend.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                special_tokens=[("<|begin_of_text|>", 128000)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


@functools.lru_cache(maxsize=None)
def llama3_tokenizer(template: str | None = LLAMA3):
    """Meta's Llama 3 tokenizer as a fast HF tokenizer, one per template (shared: copy it before changing it)."""
    tok = copy.deepcopy(_llama3())
    tok.chat_template = template
    return tok


@functools.lru_cache(maxsize=None)
def chatml_tokenizer(template: str | None = CHATML):
    """Llama 3's tokenizer with ChatML's <|im_start|>/<|im_end|> added (ids 128256-7, past the embedding)."""
    tok = copy.deepcopy(llama3_tokenizer(template))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = "<|finetune_right_pad_id|>"
    return tok


@functools.lru_cache(maxsize=None)
def _mistral(version: str):
    mistral_common = pytest.importorskip("mistral_common")
    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    name = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}[version]
    folder = tempfile.mkdtemp(prefix=f"mistral-{version}-")
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", name),
                os.path.join(folder, "tokenizer.model"))
    return LlamaTokenizer.from_pretrained(folder)


@functools.lru_cache(maxsize=None)
def mistral_tokenizer(version: str = "v3", template: str | None = MISTRAL):
    """Mistral's SentencePiece tokenizer (v1: 32,000 pieces; v3: 32,768 with [INST] as control tokens)."""
    tok = copy.deepcopy(_mistral(version))
    tok.chat_template = template
    return tok


TOKENIZERS = {"chatml": chatml_tokenizer, "llama3": llama3_tokenizer, "mistral": mistral_tokenizer}

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, since 3+3 is 6."},
]


def rows(*conversations, field: str = "messages", source: str = "chat.jsonl") -> list[tuple[str, dict]]:
    """(origin, row) pairs as data.read_rows returns them."""
    return [(f"{source}:{i}", {field: c}) for i, c in enumerate(conversations, start=1)]


@functools.lru_cache(maxsize=None)
def tiny_chat_model_dir() -> str:
    """examples/make_tiny_model.py's tiny-llama-chat (ChatML template with generation tags, <|im_end|> as
    EOS, the special tokens inside the embedding), written once per process to a temporary folder."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = Path(tempfile.mkdtemp(prefix="tiny-llama-chat-"))
    return str(module.save_tiny_chat_model(folder))


@functools.lru_cache(maxsize=None)
def tiny_chat_tokenizer():
    """The tokenizer of tiny_chat_model_dir() (shared: copy it before changing it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model_dir())
