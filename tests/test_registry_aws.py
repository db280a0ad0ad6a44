"""Issue 22's acceptance: 16 boards through `station run` with AWS IoT (moto) *and* a Bodh
registry over HTTPS: every board in both, once.

The registry (tests/registrykit.py) answers the first requests with 429 + Retry-After
and 500, as a busy registry would; AWS IoT is moto behind the proxy that makes CSR
certificates INACTIVE as AWS does (tests/registrar/awsproxy.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from station.config import FirmwareSection
from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity.registrar.local_ca import LocalCa
from station.sim import Rig
from tests.registrar.awsproxy import AwsProxy, moto_server, reset_moto
from tests.registrykit import bodh
from tests.stationkit import AwsLine, aws_client, aws_env, thing_of
from tests.test_registry_station import KEY, assert_no_secrets
from tests.test_station_aws import check_sixteen

pytestmark = pytest.mark.timeout(420)
BOARDS = 16


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FirmwareBundle]:
    args = make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=60_000)
    return args, load_firmware(FirmwareSection(chip="esp32", flasher_args=args, images=()))


@pytest.mark.slow
def test_sixteen_boards_in_aws_iot_and_in_bodh_each_once(
        tmp_path: Path, moto_url: str, firmware: tuple[Path, FirmwareBundle]) -> None:
    reset_moto(moto_url)
    ca = LocalCa.open(tmp_path / "registry-ca")
    (tmp_path / "registry-ca.crt").write_text(ca.pem)
    args, bundle = firmware
    with Rig(tmp_path / "hub", seed=22, throttle=False, flash_timing=False) as rig, \
            AwsProxy(moto_url) as proxy, aws_client(moto_url) as aws, \
            bodh(KEY, ca, faults=["429", "500", "429"], retry_after="1") as registry:
        boards = [rig.plug(chip="esp32") for _ in range(BOARDS)]
        station = AwsLine(root=tmp_path, rig=rig, firmware=args, bundle=bundle,
                          endpoint=proxy.url, env={**aws_env(tmp_path), "BODH_API_KEY": KEY},
                          extra=f'[registry]\nkind = "bodh"\nurl = "{registry.url}"\n'
                                f'ca_file = "{tmp_path / "registry-ca.crt"}"\nbackoff = 0.1\n')
        with station:
            result = station.run(BOARDS)
            assert result.returncode == 0, result
            check_sixteen(station, aws, boards)  # AWS: a thing and one ACTIVE cert each
            rows = station.ledger()
        assert registry.created == Counter({thing_of(b): 1 for b in boards})
        assert registry.answers[429] == 2 and registry.answers[500] == 1
        assert {(r["registry"], r["registry_id"] == r["thing_name"]) for r in rows} == \
            {("registered", True)}, rows
        assert proxy.calls["CreateCertificateFromCsr"] == BOARDS
        assert "throttled by registry" in result.stdout  # the 429s, on their boards' rows
    assert_no_secrets(tmp_path, result.stdout, result.stderr)
