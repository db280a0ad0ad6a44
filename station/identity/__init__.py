"""Who the board is to the cloud: its registration, its keys, its credentials on disk and
on the board.

    registrar/      how a board becomes known: "none", "local-ca", "aws-iot" (its own face)
    registry.py     [registry]: each board made known to a device registry over HTTP
    registry_http.py  that registry's request and answer, as plain data
    cloudcheck.py   [verify] cloud: the board's own credentials on its MQTT broker
    credentials.py  certs_out/ (keys 0600 in 0700 folders) and the credentials' NVS image
    nvs.py          a reader of ESP-IDF NVS partitions (tests, the soak's checker)
    securecert.py   the esp_secure_cert partition (esp-secure-cert-tool) and its reader;
                    `credentials_image` picks NVS or it per chip
    ds.py           [credentials] ds: the RSA key as DS ciphertext, the DS partition
"""

from station.identity.cloudcheck import CloudCheck, CloudVerdict, make_cloud_check
from station.identity.credentials import (
    CERTIFICATE_FILE,
    DS_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    RECORD_FILE,
    CredentialStore,
    RegistrationRecord,
    nvs_region,
)
from station.identity.ds import DsData, ds_partition, wrap_key
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
from station.identity.registry import (
    HttpRegistry,
    RegistryJournal,
    RegistryNote,
    RegistryOutcome,
    make_registry,
    pending_without_registry,
)
from station.identity.securecert import (
    SecureCertFormatError,
    Tlv,
    credentials_image,
    read_secure_cert,
    secure_cert_region,
)

__all__ = [
    "CERTIFICATE_FILE", "CRASH_ENV", "DS_FILE", "PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE",
    "RECORD_FILE",
    "BoardFacts", "CloudCheck", "CloudVerdict", "CredentialStore", "HttpRegistry", "Journal",
    "NoRegistrar", "NvsFormatError", "Registrar", "RegistrationRecord", "RegistryJournal",
    "RegistryNote", "RegistryOutcome", "certificate_key_matches", "crash_point", "journaled",
    "key_pair_matches", "make_cloud_check", "make_registrar", "make_registry", "nvs_region",
    "pending_without_registry", "read_nvs", "same_public_key", "SecureCertFormatError", "Tlv",
    "credentials_image", "read_secure_cert", "secure_cert_region", "DsData", "ds_partition",
    "wrap_key",
]
