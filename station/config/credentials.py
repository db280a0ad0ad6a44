"""[credentials]: where a board's credentials go on disk and on the board, and in which
format: today's NVS namespace, or Espressif's `esp_secure_cert` partition (TLV, read by
esp_secure_cert_mgr), optionally with the private key as Digital Signature ciphertext.

A mixed line (`[[firmware]]`) may give an entry its own `credentials = { format = ...,
ds = ..., efuse_key_block = ... }`: an ESP32 product keeps a plain key while the S3 beside
it uses DS. What needs the chip (DS exists on it) is checked here per entry, from
esptool/espefuse and esp-secure-cert-tool facts (`station.chips.ds_chips`); what needs
the partition table (an esp_secure_cert partition, its size) is checked with the firmware
(station/flash/plan.py), both before any board is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

from station import chips
from station.config._table import Table
from station.config.sections import (
    KEY_BLOCKS,
    SECURE_CERT_LABEL,
    BoardCredentials,
    CredentialsFormat,
    CredentialsSection,
    FirmwareSection,
    RegistrarSection,
)
from station.errors import ConfigError

FORMATS = ("nvs", "esp_secure_cert")


def board_credentials(t: Table, default: BoardCredentials | None = None) -> BoardCredentials:
    """format, ds and efuse_key_block of a [credentials] table or a firmware entry's."""
    base = default or BoardCredentials()
    fmt = cast(CredentialsFormat, t.choice("format", FORMATS, base.format))
    ds = t.get("ds", bool, base.ds if fmt == "esp_secure_cert" else False)
    block = t.get("efuse_key_block", str, base.efuse_key_block)
    if ds and fmt != "esp_secure_cert":
        raise t.error("ds", "the Digital Signature ciphertext lives in the esp_secure_cert "
                      "partition: set format = \"esp_secure_cert\" (and give the firmware's "
                      "partition table an esp_secure_cert partition)")
    if block not in KEY_BLOCKS:
        raise t.error("efuse_key_block", f"{block!r} is not an eFuse key block: one of "
                      f"{', '.join(KEY_BLOCKS)} (espefuse's names)")
    if "efuse_key_block" in t.data and not ds:
        raise t.error("efuse_key_block", "the HMAC key's block is used only with ds = true")
    return BoardCredentials(format=fmt, ds=ds, efuse_key_block=block)


def credentials_section(t: Table) -> CredentialsSection:
    board = board_credentials(t)
    partition = t.get("partition", str, SECURE_CERT_LABEL if board.format ==
                      "esp_secure_cert" else "nvs")
    c = CredentialsSection(
        out_dir=t.path("out_dir", Path("certs_out")),
        partition=partition,
        namespace=t.get("namespace", str, "station"),
        keep_private_keys=t.get("keep_private_keys", bool, True),
        board=board,
    )
    if not 1 <= len(c.namespace) <= 15:
        raise t.error("namespace", "NVS namespaces are 1 to 15 characters")
    if board.format == "esp_secure_cert" and partition != SECURE_CERT_LABEL:
        raise t.error("partition", f"esp_secure_cert_mgr finds its partition by the label "
                      f"{SECURE_CERT_LABEL!r}, not {partition!r}: remove partition (or set "
                      f"format = \"nvs\")")
    t.done()
    return c


def check_credentials(file: Path, credentials: CredentialsSection,
                      firmwares: Sequence[FirmwareSection], registrar: RegistrarSection,
                      explicit_keep: bool) -> None:
    """What needs several sections: DS on each entry's chip, a key the station makes."""
    uses_ds = ""
    for f in firmwares:
        own = f.credentials is not None
        board = f.credentials or credentials.board
        if board.ds and not uses_ds:
            uses_ds = f"{f.key}.credentials.ds" if own else "credentials.ds"
        have = chips.ds_chips() if board.ds else ()
        if board.ds and f.chip not in have:
            key = f"{f.key}.credentials.ds" if own else "credentials.ds"
            mixed = "" if own or len(firmwares) == 1 else \
                f", or give {f.key} (chip {f.chip}) its own credentials = {{ format = " \
                "\"esp_secure_cert\", ds = false }"
            raise ConfigError(str(file), key, f"{f.chip} has no Digital Signature peripheral "
                              f"(chips with one: {', '.join(have)}): set ds = false{mixed}")
    if not uses_ds:
        return
    if registrar.kind == "aws-iot" and registrar.aws.key_source == "aws":
        raise ConfigError(str(file), "registrar.aws.key_source", "ds = true needs the RSA key "
                          "made on the station (AWS would hand its key out in the clear): "
                          "set key_source = \"csr\"")
    if explicit_keep and credentials.keep_private_keys:
        raise ConfigError(str(file), "credentials.keep_private_keys", "with ds = true the "
                          "private key exists only as the board's DS ciphertext; certs_out "
                          "keeps the certificate and the public key: remove "
                          "keep_private_keys")
