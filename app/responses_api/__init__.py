"""OpenAI's Responses API (POST /v1/responses, stateless) as a translation at the edge: its input items in, the chat
pipeline's admission, generation, structured outputs and tool calls underneath, its Response object and events out."""
