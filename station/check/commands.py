"""`station check` and `station reconcile`: the station's answers before and after a run.

`check` does everything `run` does at start except watching ports, and says what it
would do, so a rig can be validated (and the cloud access proven) before boards arrive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from station.check.host import HOST_ROOT_ENV, findings
from station.check.hubs import probe_hubs
from station.config import Config, writable_folder
from station.daemon import EXIT_OK, reconcile_journal, reconcile_registry, state_dir_lock
from station.flash import build_plans, firmware_warnings, load_bundles
from station.identity import CredentialStore, credentials_image, make_registrar, make_registry
from station.ports import scan
from station.security import secure_line

LOW_SPACE = 1 << 20


def _space(free: int) -> str:
    if free >= LOW_SPACE:
        return f"{free / (1 << 20):.0f} MB free"
    return f"only {free // 1024} KB free: low"


async def check(config: Config, out: TextIO) -> int:
    print(f"config      {config.path}: ok", file=out)
    bundles = load_bundles(config)
    for bundle in bundles:
        print(f"firmware    {bundle.describe()}", file=out)
        for region in bundle.regions:
            print(f"            0x{region.offset:06x} {region.name} {len(region.data)} B "
                  f"({len(region.compressed)} B compressed)", file=out)
    for line in firmware_warnings(config, bundles):
        print(f"firmware    warning: {line}", file=out)
    registrar = make_registrar(config, CredentialStore(config.credentials.out_dir))
    plans = build_plans(config, bundles,
                        None if registrar.kind == "none" else credentials_image)
    registers = any(p.credentials_region is not None for p in plans.by_chip.values())
    for bundle in bundles if registers else ():
        part = bundle.partition(config.partition_for(bundle.chip))
        board = config.credentials_for(bundle.chip)
        what = f"namespace '{config.credentials.namespace}'" if board.format == "nvs" else \
            ("TLV, private key as DS ciphertext, HMAC key in "
             f"{board.efuse_key_block}" if board.ds else "TLV, private key in it")
        kind = "NVS" if board.format == "nvs" else "esp_secure_cert"
        print(f"credentials {kind} partition '{part.label}' at 0x{part.offset:x} "
              f"({part.size} B) of the {bundle.chip} firmware, {what}", file=out)
    security = secure_line(config, bundles)
    for line in security.lines() if security is not None else ["security    off"]:
        print(line, file=out)
    state_free = writable_folder(config.station.state_dir, "station.state_dir", config)
    print(f"state       {config.station.state_dir} (writable, {_space(state_free)})",
          file=out)
    if registers:
        certs_free = writable_folder(config.credentials.out_dir, "credentials.out_dir", config)
        print(f"certs_out   {config.credentials.out_dir} (writable, {_space(certs_free)})",
              file=out)
    try:
        await registrar.start()
        print(f"registrar   {registrar.kind}: ready", file=out)
    finally:
        await registrar.close()
    if config.registry.kind != "none":  # nothing is sent: a probe would register a device
        print(f"registry    {config.registry.describe()}: told about each board beside the "
              "registrar; nothing sent now", file=out)
    cloud = config.verify.cloud
    if cloud.mode != "off":
        where = cloud.endpoint or "the endpoint the registrar writes to each board"
        what = f"and publishes on {cloud.topic!r}" if cloud.mode == "publish" else "(connect)"
        print(f"cloud check each board's certificate opens an MQTT session at {where} {what}",
              file=out)
    if config.ledger.central:
        print(f"central     {check_central(config)}", file=out)
    if config.metrics.listen:
        print(f"metrics     http://{config.metrics.listen}/metrics (Prometheus)", file=out)
    ports = scan(config.ports.watch)
    print(f"ports       {len(ports)} present now, watching {', '.join(config.ports.watch)} "
          f"at {config.ports.baud} baud", file=out)
    for hub in probe_hubs(config.ports.remote):  # run retries a dead hub; say it now
        print(f"hub         {'' if hub.problem is None else 'problem: '}{hub.line()}",
              file=out)
    host = findings(Path(os.environ.get(HOST_ROOT_ENV) or "/"), [p.path for p in ports])
    for finding in host:  # warnings: a rig may work without them, but rarely well
        print(f"host        warning: {finding}", file=out)
    if not host:
        print("host        ok: ModemManager, brltty, tty group, USB hubs", file=out)
    print(f"would flash {', '.join(plans.by_chip)} boards, up to {config.station.max_parallel} "
          f"at once, things named {config.identity.thing_name!r}", file=out)
    return EXIT_OK


def check_central(config: Config) -> str:
    """What `run` does at start with [ledger] central: connect and migrate. A refusal
    raises CentralError (the same line `run` prints); unreachable is only a warning."""
    import psycopg

    from station.errors import CentralUnreachableError
    from station.fleet import central

    try:
        conn = central.connect(config.ledger.central, config.ledger.connect_timeout,
                               application="station check")
    except CentralUnreachableError as e:
        return f"WARNING: {e}; run would buffer in the local ledger and ship later"
    try:
        found = central.migrate(conn, config.station.name)
        shipped = central.shipped_seq(conn, config.station.name)
    except psycopg.Error as e:
        raise central.as_error(e, central.describe(config.ledger.central)) from None
    finally:
        conn.close()
    made = "created" if found == 0 else f"schema {found}"
    if found and found < central.SCHEMA_VERSION:
        made = f"migrated from schema {found}"
    return (f"{central.describe(config.ledger.central)}: ready ({made}, version "
            f"{central.SCHEMA_VERSION}); station {config.station.name!r} has shipped "
            f"up to event #{shipped}")


async def reconcile(config: Config, out: TextIO) -> int:
    """Clean up after a crash without taking boards: the same step `run` does at start."""
    from station.record import Ledger

    with state_dir_lock(config.station.state_dir):
        ledger = Ledger.open(config.station.state_dir)
        registrar = make_registrar(config, CredentialStore(config.credentials.out_dir))
        registry = make_registry(config.registry)
        try:
            for job in ledger.close_interrupted("the station was stopped or crashed"):
                print(f"job {job}: interrupted, marked failed", file=out)
            await registrar.start()
            steps = ledger.registration_steps()
            for line in await registrar.reconcile(steps, reconcile_journal(ledger.record)):
                print(line, file=out)
            if registry is not None:
                await registry.start()
            for line in await reconcile_registry(registry, ledger.registry_steps(),
                                                 ledger.record):
                print(line, file=out)
        finally:
            await registrar.close()
            if registry is not None:
                await registry.close()
            ledger.close()
    return EXIT_OK
