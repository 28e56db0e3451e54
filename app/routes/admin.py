"""Operator endpoints: behind the admin key, else the API key, else loopback clients only (app.auth)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.reload import Reloader

router = APIRouter(prefix="/admin")


def get_reloader(request: Request) -> Reloader:
    reloader: Reloader = request.app.state.reloader
    return reloader


@router.post("/reload")
async def reload(reloader: Annotated[Reloader, Depends(get_reloader)]) -> dict[str, object]:
    """Re-read models.yaml: added models start, removed ones drain and stop, changed ones are replaced after their
    in-flight requests finish. A bad file is refused whole (400, code `invalid_registry`) and nothing changes; while
    the previous reload's models are still loading or stopping, another reload gets 409 (`reload_in_progress`)."""
    report = await reloader.reload()
    return {"status": "reloaded", **dataclasses.asdict(report)}
