"""tokenmill on Ray Serve: a local Ray cluster in its own network namespace (loopback only) runs two replicas of
the default model; requests land on both; a replica whose server is killed is replaced, and serving goes on; more
requests than the replicas and Serve's queue hold get 429 with Retry-After."""

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
def test_two_replicas_share_the_load_replace_a_killed_one_and_push_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "ray.log"
    cmd = ["unshare", "-n", sys.executable, "-m", "tests.deploy.ray_scenario", str(REPO / "models.yaml"), "smollm2"]
    done = subprocess.run([*cmd, str(log)], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in seen, f"{seen['error']}\n{log.read_text(errors='replace')[-4000:]}"
    first, after = seen["first"], seen["after"]
    refused = [(status, replica) for status, replica in first + after if status != 200]
    assert not refused, f"{refused}\n{log.read_text(errors='replace')[-4000:]}"
    assert len({replica for _, replica in first}) == 2, "the requests should land on both replicas"
    assert seen["new_ids"], "the killed replica should have been replaced by a new one"
    assert len({replica for _, replica in after}) == 2 and set(seen["new_ids"]) & {replica for _, replica in after}
    statuses = [status for status, _ in seen["flood"]]
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    assert all(retry == "1" for status, retry in seen["flood"] if status == 429), "429 should say when to retry"
    assert seen["driver_exit"] == 0
    with capsys.disabled():
        print(
            f"\nray serve: ready in {seen['startup_s']:.0f} s, replica replaced in {seen['recovery_s']:.0f} s, "
            f"flood of {len(statuses)}: {statuses.count(200)} served, {statuses.count(429)} refused with 429"
        )
