"""Registration hidden behind flashing: 16 boards with `kind = "aws-iot"` against a
moto server behind a loopback proxy that adds 150 ms to every call, against the same
16 boards with `kind = "none"`.

The worker registers while the common images are written, so the per-board time should
grow only by the credentials partition's line time and whatever registration is left
when the flash ends (`register` in the timings). Run alone:
`python benchmarks/registration.py`.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import common
import flashmodel
from soak_aws import FaultyProxy, moto_server

BOARDS = 16
LATENCY_S = 0.150
ADDED_LIMIT_S = 0.5
MOTO_START_TIMEOUT = 60.0
FORWARD_TIMEOUT = 60.0


def aws_env(root: Any) -> dict[str, str]:
    """Dummy credentials; the host's ~/.aws is never read."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_CONFIG_FILE=str(root / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def run(ctx: common.Context) -> dict[str, Any]:
    baseline = ctx.station(BOARDS)
    with moto_server() as moto, FaultyProxy(moto, latency=LATENCY_S) as proxy:
        aws = {"region": "eu-west-1", "endpoint_url": proxy.url,
               "policy_document": str(common.ROOT / "config" / "aws-iot-policy.json"),
               "retry_mode": "standard", "max_attempts": 10}
        registered = ctx.station(BOARDS, "aws-iot", aws=aws, env=aws_env(ctx.root))
        calls = sum(proxy.calls.values())
    base = statistics.fmean(baseline.per_board())
    with_reg = statistics.fmean(registered.per_board())
    nvs = flashmodel.nvs_compressed_bytes(ctx.firmware)
    cloud = [j["timings"].get("register_cloud", 0.0) for j in registered.jobs]
    waited = [j["timings"].get("register", 0.0) for j in registered.jobs]
    added = with_reg - base
    return {
        "boards": BOARDS, "latency_per_call_s": LATENCY_S, "proxy_calls": calls,
        "calls_per_board": round(calls / BOARDS, 1),
        "per_board_s_none": round(base, 3), "per_board_s_aws": round(with_reg, 3),
        "added_per_board_s": round(added, 3),
        "register_cloud_s_mean": round(statistics.fmean(cloud), 3),
        "register_cloud_s_max": round(max(cloud), 3),
        "register_wait_after_flash_s_mean": round(statistics.fmean(waited), 4),
        "nvs_line_s": round(flashmodel.line_seconds(nvs), 3),
        "wall_s_none": round(baseline.wall_s, 2), "wall_s_aws": round(registered.wall_s, 2),
        "run_aws": registered.summary(),
        "targets": [common.target("registration adds s/board (150 ms/call)", added,
                                  ADDED_LIMIT_S, "<=", "s",
                                  note=f"cloud {statistics.fmean(cloud):.2f}s/board, "
                                       "overlapped with the flash"),
                    common.target("station peak RSS MB (16 boards, aws-iot)",
                                  registered.usage.max_rss_mb, 250.0, "<=", " MB",
                                  note="boto3 included")],
    }


if __name__ == "__main__":
    sys.exit(common.standalone("registration", run))
