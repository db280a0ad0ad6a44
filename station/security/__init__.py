"""Locking boards: flash encryption, secure boot v2 and the release-mode eFuses.

    plan.py    the per-chip plan: which eFuses, in which batches and order (espefuse's
               tables), what each makes impossible; `station check` prints it
    images.py  the firmware for locked boards: checked and signed at start, encrypted
               per board (espsecure)
    signer.py  who signs for secure boot v2: a key file or a PKCS#11 token (espsecure)
    escrow.py  escrow_public_key: each host key kept only wrapped (RSA-OAEP)
    setup.py   [security] at start: plans and secured firmware, or a refusal
    efuses.py  a board's eFuses through espefuse's library on the open session
    board.py   one board's sequence, journaled and resumable (`LineSecurity`)
    dskey.py   the Digital Signature HMAC key block ([credentials] ds): read, burn
"""

from station.security.board import BoardLock, LineSecurity
from station.security.dskey import DS_PURPOSE, DsBlock, burn_ds_key, read_ds_block
from station.security.images import SecuredFirmware, key_fingerprint
from station.security.plan import ChipPlan, PlanError, chip_plan
from station.security.setup import FirmwareFacts, StationSecurity, secure_line

__all__ = [
    "DS_PURPOSE", "BoardLock", "ChipPlan", "DsBlock", "FirmwareFacts", "LineSecurity",
    "PlanError", "SecuredFirmware", "StationSecurity", "burn_ds_key", "chip_plan",
    "key_fingerprint", "read_ds_block", "secure_line",
]
