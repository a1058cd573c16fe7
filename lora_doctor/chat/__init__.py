"""Chat data: rows of messages rendered with the model's own chat template, assistant-only labels,
and the facts (ChatStats) the doctor's chat checks read.

rows     detect OpenAI / ShareGPT layouts, normalize messages, say what non-chat rows look like
render   template resolution, rendering, generation-tag and prefix-diff assistant spans
example  one conversation -> input_ids, labels, truncation losses
stats    ChatStats and the batch entry points tokenize_chat_examples (data.load_data) / tokenize_chat_rows
"""

from .example import IGNORE_INDEX, ChatExample, TrainOn, tokenize_conversation  # noqa: F401
from .render import (MaskComparison, MaskMethod, Rendering, compare_masks, derived_mask,  # noqa: F401
                     has_generation_tags, render_conversation, resolve_chat_template)
from .rows import (ROLES, ChatStyle, RowShape, detect_chat_style, normalize_messages, roles_alternate,  # noqa: F401
                   row_shape, row_shapes)
from .stats import ChatStats, row_shape_stats, tokenize_chat_examples, tokenize_chat_rows  # noqa: F401
