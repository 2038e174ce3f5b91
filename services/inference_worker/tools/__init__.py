"""OpenAI tool calls for any engine: which format a chat template uses, parsing and streaming a
generation into content and tool calls, llguidance grammars that force a call, and turning OpenAI
messages into what chat templates expect."""
from .formats import FORMATS, HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11, ToolFormat, detect_format, unsupported_reason
from .types import ContentDelta, Delta, ParsedOutput, ToolCall, ToolCallDelta, collect, new_call_id

__all__ = ["FORMATS", "HERMES", "LLAMA3_JSON", "MISTRAL", "MISTRAL_V11", "ToolFormat", "detect_format",
           "unsupported_reason", "ContentDelta", "Delta", "ParsedOutput", "ToolCall", "ToolCallDelta",
           "collect", "new_call_id"]
