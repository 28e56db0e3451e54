"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) as a translation at the edge: its shapes in,
the chat pipeline's admission, generation, stop strings and tool calls underneath, its shapes out."""
