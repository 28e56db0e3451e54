"""Operator endpoints: behind the admin key, else the API key, else loopback clients only (app.auth)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends

from app.dependencies import PoolDep, get_settings
from app.reload import reload_registry
from app.settings import Settings

router = APIRouter(prefix="/admin")


@router.post("/reload")
async def reload(pool: PoolDep, settings: Annotated[Settings, Depends(get_settings)]) -> dict[str, object]:
    """Re-read models.yaml: added models start, removed ones drain and stop, changed ones are replaced after their
    in-flight requests finish. A bad file is refused whole (400, code `invalid_registry`) and nothing changes."""
    report = await reload_registry(settings, pool)
    return {"status": "reloaded", **dataclasses.asdict(report)}
