"""OpenAI tool calls for any engine: which format a chat template uses, parsing and streaming a
generation into content and tool calls, llguidance grammars that force a call, and turning OpenAI
messages into what chat templates expect.

Wiring, in order:
  fmt = detect_format(tokenizer.chat_template)      # None: refuse `tools` with unsupported_reason()
  prompt = tokenizer.apply_chat_template(template_messages(messages, fmt), tools=tools)
                                                     # tool_choice "none": pass tools=None instead
  grammar = fmt.grammar(tools, tool_choice, parallel_tool_calls,
                        marker_tokens=fmt.marker_tokens(tokenizer.token_to_id))  # None: unconstrained
  fmt.parse(text) / fmt.stream_parser().feed(delta) ... .finish()

Llama's `<|python_tag|>` and Mistral's `[TOOL_CALLS]`/`[ARGS]` are special tokens: the text given
to the parser must be detokenized with skip_special_tokens=False, or the markers vanish."""
from .formats import (FORMATS, HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11, ToolFormat, detect_format,
                      unsupported_reason)
from .grammar import GrammarError
from .render import mistral_call_id, template_messages
from .types import ContentDelta, Delta, ParsedOutput, ToolCall, ToolCallDelta, collect, new_call_id

__all__ = ["FORMATS", "HERMES", "LLAMA3_JSON", "MISTRAL", "MISTRAL_V11", "ToolFormat", "detect_format",
           "unsupported_reason", "GrammarError", "mistral_call_id", "template_messages", "ContentDelta",
           "Delta", "ParsedOutput", "ToolCall", "ToolCallDelta", "collect", "new_call_id"]
