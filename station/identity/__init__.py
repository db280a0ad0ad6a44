"""Who the board is to the cloud: its registration, its keys, its credentials on disk and
on the board.

    registrar/      how a board becomes known: "none", "local-ca", "aws-iot" (its own face)
    credentials.py  certs_out/ (keys 0600 in 0700 folders) and the credentials' NVS image
    nvs.py          a reader of ESP-IDF NVS partitions (tests, the soak's checker)
"""

from station.identity.credentials import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    RECORD_FILE,
    CredentialStore,
    RegistrationRecord,
    nvs_region,
)
from station.identity.nvs import NvsFormatError, read_nvs
from station.identity.registrar import (
    CRASH_ENV,
    BoardFacts,
    Journal,
    NoRegistrar,
    Registrar,
    certificate_key_matches,
    crash_point,
    journaled,
    key_pair_matches,
    make_registrar,
    same_public_key,
)

__all__ = [
    "CERTIFICATE_FILE", "CRASH_ENV", "PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "RECORD_FILE",
    "BoardFacts", "CredentialStore", "Journal", "NoRegistrar", "NvsFormatError", "Registrar",
    "RegistrationRecord", "certificate_key_matches", "crash_point", "journaled",
    "key_pair_matches", "make_registrar", "nvs_region", "read_nvs", "same_public_key",
]
