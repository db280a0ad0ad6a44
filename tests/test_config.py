"""station.toml: what a user gets wrong fails at start with the file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from station.config import load
from station.errors import ConfigError

GOOD = """\
[station]
name = "line-1"
state_dir = "state"
max_parallel = 16
[ports]
watch = ["/dev/ttyUSB*", "/dev/ttyACM*"]
baud = 921600
[ports.slots]
"1-1.2" = "A1"
[firmware]
chip = "esp32"
images = [{ offset = 0x1000, file = "boot.bin" }, { offset = 0x10000, file = "app.bin" }]
[identity]
thing_name = "{mac}"
[registrar]
kind = "local-ca"
[registrar.local_ca]
dir = "state/ca"
[credentials]
out_dir = "certs_out"
partition = "nvs"
namespace = "station"
"""


@pytest.fixture
def rig(tmp_path: Path) -> Path:
    (tmp_path / "boot.bin").write_bytes(b"\xe9" + bytes(100))
    (tmp_path / "app.bin").write_bytes(b"\xe9" + bytes(100))
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "station.toml"
    path.write_text(text)
    return path


def test_the_documented_keys_load_into_typed_values(rig: Path) -> None:
    config = load(write(rig, GOOD))
    assert config.station.name == "line-1"
    assert config.station.state_dir == rig / "state"  # relative to the config file
    assert config.ports.baud == 921600
    assert config.firmware.images[1].offset == 0x10000
    assert config.firmware.images[1].file == rig / "app.bin"
    assert config.slot_for("1-1.2", "/dev/ttyUSB3") == "A1"
    assert config.slot_for(None, "/dev/ttyUSB3") == "ttyUSB3"
    assert config.identity.thing_for("240ac4000001", "esp32", "line-1") == "240ac4000001"
    assert config.registrar.kind == "local-ca"


def test_the_shipped_station_toml_is_valid_apart_from_the_firmware_build() -> None:
    """The example in the repo must only lack what a user adds: their firmware build."""
    with pytest.raises(ConfigError) as err:
        load(Path(__file__).parent.parent / "station.toml")
    assert err.value.key == "firmware.flasher_args"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("baud = 921600", "baud = 921600\nbuad = 1"), "ports.buad", "unknown key"),
        (("[identity]", "[identitty]"), "identitty", "unknown key"),
        (("baud = 921600", 'baud = "fast"'), "ports.baud", 'must be an int baud rate or "auto"'),
        (("max_parallel = 16", "max_parallel = 0"), "station.max_parallel", "at least 1"),
        (('file = "app.bin"', 'file = "missing.bin"'), "firmware.images[1].file",
         "no such file"),
        (('watch = ["/dev/ttyUSB*", "/dev/ttyACM*"]', 'watch = ["/dev/*/tty*"]'),
         "ports.watch", "only in the last part"),
        (('watch = ["/dev/ttyUSB*", "/dev/ttyACM*"]', 'watch = ["/dev/tty[USB*"]'),
         "ports.watch", "not a valid glob"),
        (('chip = "esp32"', 'chip = "esp8266"'), "firmware.chip", "is not supported: ESP8266"),
        (('chip = "esp32"', 'chip = "esp32s4"'), "firmware.chip", "did you mean 'esp32s3'"),
        (('thing_name = "{mac}"', 'thing_name = "board"'), "identity.thing_name",
         "{mac}"),
        (('thing_name = "{mac}"', 'thing_name = "{serial}"'), "identity.thing_name",
         "unknown placeholder"),
        (('kind = "local-ca"', 'kind = "azure"'), "registrar.kind", "must be one of"),
        (('namespace = "station"', 'namespace = "a-namespace-too-long"'),
         "credentials.namespace", "15"),
        (('chip = "esp32"', 'chip = "esp32"\nimage_checks = "maybe"'),
         "firmware.image_checks", 'must be "refuse" or "warn", not \'maybe\''),
    ],
)
def test_each_mistake_names_file_and_key(rig: Path, change: tuple[str, str], key: str,
                                          words: str) -> None:
    old, new = change
    assert old in GOOD
    path = write(rig, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert err.value.key == key
    assert message.startswith(f"{path.resolve()}: {key}: ")
    assert words in message
    assert "\n" not in message


def test_secrets_are_refused_in_the_file(rig: Path) -> None:
    text = GOOD + '[registrar.aws]\naws_secret_access_key = "x"\n'
    with pytest.raises(ConfigError, match="secrets never go in station.toml"):
        load(write(rig, text))


def test_invalid_policy_json_is_named_when_aws_is_used(rig: Path) -> None:
    (rig / "policy.json").write_text("{not json")
    text = GOOD.replace('kind = "local-ca"', 'kind = "aws-iot"') + \
        '[registrar.aws]\npolicy_document = "policy.json"\n'
    with pytest.raises(ConfigError) as err:
        load(write(rig, text))
    assert err.value.key == "registrar.aws.policy_document"
    assert "not valid JSON" in str(err.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[station\n"))


SINGLE = """[firmware]
chip = "esp32"
images = [{ offset = 0x1000, file = "boot.bin" }, { offset = 0x10000, file = "app.bin" }]
"""
MULTI = """[[firmware]]
chip = "esp32"
images = [{ offset = 0x1000, file = "boot.bin" }, { offset = 0x10000, file = "app.bin" }]

[[firmware]]
chip = "esp32c6"
images = [{ offset = 0x0, file = "boot.bin" }, { offset = 0x10000, file = "app.bin" }]
"""


def test_firmware_for_several_chips_and_a_single_table_still_loads(rig: Path) -> None:
    single = load(write(rig, GOOD))
    assert [(f.chip, f.key) for f in single.firmwares] == [("esp32", "firmware")]
    assert single.firmware is single.firmwares[0]
    assert single.ports.reenumerate_window == 5.0
    multi = load(write(rig, GOOD.replace(SINGLE, MULTI)))
    assert [(f.chip, f.key) for f in multi.firmwares] == [("esp32", "firmware[0]"),
                                                          ("esp32c6", "firmware[1]")]
    assert multi.firmware.chip == "esp32"
    # image_checks: "refuse" unless an entry says "warn", each entry for itself
    assert [f.image_checks for f in multi.firmwares] == ["refuse", "refuse"]
    warn = MULTI.replace('chip = "esp32c6"\n', 'chip = "esp32c6"\nimage_checks = "warn"\n')
    multi = load(write(rig, GOOD.replace(SINGLE, warn)))
    assert [f.image_checks for f in multi.firmwares] == ["refuse", "warn"]


@pytest.mark.parametrize(("firmware", "key", "words"), [
    (MULTI.replace('"esp32c6"', '"esp32"'), "firmware[1].chip",
     "esp32 already has firmware[0]: one firmware per chip"),
    (MULTI.replace('"esp32c6"', '"esp32c7"'), "firmware[1].chip", "did you mean 'esp32c6'"),
    (MULTI.replace('file = "app.bin" }]\n', 'file = "ap.bin" }]\n'), "firmware[0].images[1].file",
     "ap.bin: no such file"),
    (MULTI.replace('chip = "esp32c6"\n', 'chip = "esp32c6"\nchips = 2\n'), "firmware[1].chips",
     "unknown key"),
    (MULTI.replace('chip = "esp32c6"\n', 'chip = "esp32c6"\nimage_checks = "off"\n'),
     "firmware[1].image_checks", 'must be "refuse" or "warn", not \'off\''),
    ("firmware = []\n", "firmware", "at least one entry"),
])
def test_each_firmware_entry_is_checked_as_one_table_is(rig: Path, firmware: str, key: str,
                                                        words: str) -> None:
    text = GOOD.replace(SINGLE, firmware)
    if firmware.startswith("firmware ="):  # a top-level key: before the first table
        text = firmware + GOOD.replace(SINGLE, "")
    path = write(rig, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == key, err.value
    assert words in str(err.value)


@pytest.mark.parametrize(("value", "words"), [("-1", "at least 0"), ("600", "at most 120"),
                                               ('"5s"', "must be int or float")])
def test_the_reenumerate_window_is_validated(rig: Path, value: str, words: str) -> None:
    text = GOOD.replace("baud = 921600\n", f"baud = 921600\nreenumerate_window = {value}\n")
    path = write(rig, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == "ports.reenumerate_window"
    assert words in str(err.value)
