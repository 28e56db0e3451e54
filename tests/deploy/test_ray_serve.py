"""tokenmill on Ray Serve: a local Ray cluster in its own network namespace (loopback only) runs two replicas of
the default model; requests land on both; a replica whose server is killed is replaced, and serving goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_harness import REPO

pytestmark = pytest.mark.slow
pytest.importorskip("ray.serve")


def network_namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not network_namespaces_work(), reason="unshare -n is not permitted here (needs CAP_SYS_ADMIN)")
def test_two_replicas_share_the_load_and_a_killed_one_is_replaced(tmp_path: Path) -> None:
    log = tmp_path / "ray.log"
    cmd = ["unshare", "-n", sys.executable, "-m", "tests.deploy.ray_scenario", str(REPO / "models.yaml"), "smollm2"]
    done = subprocess.run([*cmd, str(log)], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in seen, f"{seen['error']}\n{log.read_text(errors='replace')[-4000:]}"
    first, after = seen["first"], seen["after"]
    assert all(status == 200 for status, _ in first + after), first + after
    assert len({replica for _, replica in first}) == 2, "the requests should land on both replicas"
    assert seen["new_ids"], "the killed replica should have been replaced by a new one"
    assert len({replica for _, replica in after}) == 2 and set(seen["new_ids"]) & {replica for _, replica in after}
    assert seen["driver_exit"] == 0
