"""Reference chat templates. lora-doctor never applies one on its own (a model without a template is an
error, not a guess); these are what examples/make_tiny_model.py gives the tiny Llama and what tests
compare masks against, and a user may pass one as data.chat_template."""

CHATML_TAGGED = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML with each assistant turn's content, its <|im_end|> and the newline after it inside {% generation %}
(the newline too, because the turn-by-turn rendering assigns it to the turn, so the two masks agree)."""
