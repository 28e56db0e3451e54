"""The baseline a server without batching gives: FastAPI + transformers' `generate` with a streamer, one request
at a time. It speaks just enough of OpenAI's streaming chat API for `loadtests.load`.

    python -m loadtests.naive_server --port 8001 [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import TextIteratorStreamer

from worker.loader import load_model
from worker.registry import DEFAULT_REGISTRY, load_registry
from worker.runtime import configure_threads


def build_app(models: str, dtype: str) -> FastAPI:
    entry = load_registry(models).models[0].model_copy(update={"dtype": dtype})
    loaded = load_model(entry)
    model, tokenizer = loaded.model, loaded.tokenizer
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body: dict[str, Any] = await request.json()
        max_tokens = int(body.get("max_tokens", 128))
        prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_dict=False)
        ids = torch.tensor([cast(list[int], prompt)])
        minimum = max_tokens if body.get("ignore_eos") else 0

        async def stream() -> AsyncIterator[str]:
            async with lock:  # one request at a time: the point of this baseline
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                kwargs = {"max_new_tokens": max_tokens, "min_new_tokens": minimum, "do_sample": False}
                thread = threading.Thread(
                    target=lambda: cast(Any, model).generate(
                        ids, streamer=streamer, pad_token_id=tokenizer.eos_token_id, **kwargs
                    )
                )
                thread.start()
                count = 0
                iterator = iter(streamer)
                while True:
                    piece = await asyncio.to_thread(next, iterator, None)
                    if piece is None:
                        break
                    count += 1
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                thread.join()
                usage = {"completion_tokens": max_tokens if minimum else count, "created": time.time()}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(DEFAULT_REGISTRY))
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    uvicorn.run(build_app(args.models, args.dtype), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
