"""What must hold in the morning: the soak's invariant checker (importable; used by tests).

It reads only what a person could read after a night: the ledger (SQLite), the boards'
flash dumps (the simulator writes DIR/flash-<mac>.bin on unplug), certs_out/ and the AWS
side (boto3 against the same moto the station used, but directly, not via the faulty
proxy). Each broken promise is one `Violation`; the soak passes only with none.

Checks:
  unaccounted    a plugged board (MAC, or port and time for boards that never identify)
                 with no final ledger row; a job row still without a result at the end
  phantom        a done board in the ledger whose MAC no plugged board has (misread)
  flash          a done board whose dump lacks an image at its offset
  nvs            a done board whose NVS partition (offset from the firmware's partition
                 table, decoded with station.identity.read_nvs) does not hold its own thing
                 name, endpoint, certificate (= certs_out = AWS's certificate of the
                 thing) and private key (= certs_out, pair of public.pem.key)
  thing-certs    a done board's thing with zero or several ACTIVE certificates
  orphan-cert    an ACTIVE certificate with no thing, no key on disk or no ledger row
  unheld-cert    an ACTIVE certificate that no board holds: its journal does not end with
                 the worker's "on-board" (credentials verified on the flash)
  certs-out      a certs_out folder with no ledger row, or a done board (aws-iot)
                 with no certs_out folder
  stuck          a slot stuck past its stage timeouts (from the harness's observations)
  rss            the station's RSS growing more than the limit within one process
  central        the central PostgreSQL differs from the local ledger (an event missing
                 or twice, a job row unlike the local one, the cursor short of the end)
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from station.flash import FirmwareBundle
from station.identity import certificate_key_matches, key_pair_matches, read_nvs, same_public_key

FINAL = ("done", "failed", "removed", "skipped")
OK = ("done", "skipped")
RSS_LIMIT_MB = 20.0


@dataclass(frozen=True)
class Violation:
    kind: str
    subject: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Plug:
    """One plugging of a board into a slot, as the harness did it."""

    mac: str  # 12 lower-case hex digits
    port: str
    plugged_at: float  # wall clock, like the ledger
    unplugged_at: float | None = None


@dataclass(frozen=True)
class RssSample:
    at: float
    pid: int
    boards_final: int  # boards settled (whole run) when the sample was taken
    rss_kb: int


# -- reading ---------------------------------------------------------------------------


def read_jobs(ledger: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY started_at, rowid")]
    finally:
        conn.close()


def read_registrations(ledger: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM registrations ORDER BY rowid")]
    finally:
        conn.close()


def _paginate(iot: Any, api: str, key: str, **params: Any) -> list[Any]:
    out: list[Any] = []
    for page in iot.get_paginator(api).paginate(**params):
        out += page[key]
    return out


@dataclass
class AwsView:
    """The AWS side, read once: certificates by id, things, principals of things."""

    certificates: dict[str, dict[str, Any]]  # id -> {status, arn}
    things: set[str]
    principals: dict[str, list[str]]  # thing -> certificate ids attached
    pem: dict[str, str]  # certificate id -> PEM (ACTIVE ones)

    @classmethod
    def read(cls, iot: Any) -> AwsView:
        certificates = {c["certificateId"]: {"status": c["status"], "arn": c["certificateArn"]}
                        for c in _paginate(iot, "list_certificates", "certificates")}
        things = {t["thingName"] for t in _paginate(iot, "list_things", "things")}
        principals = {}
        for thing in things:
            arns = _paginate(iot, "list_thing_principals", "principals", thingName=thing)
            principals[thing] = [a.rsplit("/", 1)[-1] for a in arns if ":cert/" in a]
        pem = {}
        for cid, cert in certificates.items():
            if cert["status"] == "ACTIVE":
                reply = iot.describe_certificate(certificateId=cid)
                pem[cid] = reply["certificateDescription"]["certificatePem"]
        return cls(certificates=certificates, things=things, principals=principals, pem=pem)

    def active_of(self, thing: str) -> list[str]:
        return [c for c in self.principals.get(thing, [])
                if self.certificates.get(c, {}).get("status") == "ACTIVE"]

    def things_of(self, cid: str) -> list[str]:
        return [t for t, certs in self.principals.items() if cid in certs]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cert in self.certificates.values():
            out[cert["status"]] = out.get(cert["status"], 0) + 1
        out["things"] = len(self.things)
        return out


# -- the checks ------------------------------------------------------------------------


def check_accounted(plugs: Sequence[Plug], jobs: Sequence[dict[str, Any]]) -> list[Violation]:
    out = []
    for job in jobs:
        if job["result"] is None:
            out.append(Violation("unaccounted", job["job_id"],
                                 f"job on {job['port']} (MAC {job['mac']}) has no result"))
    by_mac: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        if job["mac"]:
            by_mac.setdefault(job["mac"], []).append(job)
    for plug in plugs:
        mine = [j for j in by_mac.get(plug.mac, []) if j["result"] in FINAL]
        if not mine:  # a board that never identified: its row has the port and the time
            end = plug.unplugged_at if plug.unplugged_at is not None else float("inf")
            mine = [j for j in jobs if j["mac"] is None and j["port"] == plug.port
                    and plug.plugged_at <= j["started_at"] <= end and j["result"] in FINAL]
        if not mine:
            out.append(Violation("unaccounted", plug.mac,
                                 f"plugged on {plug.port} but no final ledger row"))
    return out


def final_jobs_by_mac(jobs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each identified board's last final job (jobs are in start order)."""
    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job["mac"] and job["result"] in FINAL:
            out[job["mac"]] = job
    return out


def done_boards(jobs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """MAC -> its last done job, for boards whose last final job is done or skipped."""
    last = final_jobs_by_mac(jobs)
    out = {}
    for mac, job in last.items():
        if job["result"] in OK:
            done = [j for j in jobs if j["mac"] == mac and j["result"] == "done"]
            out[mac] = done[-1] if done else job
    return out


def _public(private_pem: str) -> Any:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return key.public_key()


def check_done_board(mac: str, job: dict[str, Any], dumps: Path, bundle: FirmwareBundle,
                     partition: str, namespace: str, certs_out: Path,
                     aws: AwsView | None) -> list[Violation]:
    out: list[Violation] = []
    thing = job["thing_name"]
    dump = dumps / f"flash-{mac}.bin"
    if not dump.exists():
        return [Violation("flash", mac, f"done but no flash dump {dump.name}")]
    flash = dump.read_bytes()
    for region in bundle.regions:
        if flash[region.offset:region.end] != region.data:
            out.append(Violation("flash", mac, f"{region.name} at 0x{region.offset:x} "
                                               "does not match the firmware"))
    if job.get("registrar") in (None, "none"):
        return out
    part = bundle.partition(partition)
    try:
        values = read_nvs(flash[part.offset:part.offset + part.size]).get(namespace, {})
    except Exception as e:  # a corrupt partition is exactly what this check is for
        return [*out, Violation("nvs", mac, f"NVS at 0x{part.offset:x} unreadable: {e}")]
    folder = certs_out / thing
    if values.get("thing_name") != thing:
        out.append(Violation("nvs", mac, f"thing_name {values.get('thing_name')!r} != {thing}"))
    record = _record(folder) or {}
    if values.get("endpoint") != record.get("endpoint"):  # moto's endpoint varies per call
        out.append(Violation("nvs", mac, f"endpoint {values.get('endpoint')!r} is not "
                                         f"{record.get('endpoint')!r} of registration.json"))
    cert_blob, key_blob = values.get("cert"), values.get("priv_key")
    if not isinstance(cert_blob, bytes) or not isinstance(key_blob, bytes):
        return [*out, Violation("nvs", mac, "no cert / priv_key blobs in the NVS partition")]
    cert = cert_blob.rstrip(b"\0").decode(errors="replace")
    key = key_blob.rstrip(b"\0").decode(errors="replace")
    try:
        disk_cert = (folder / "certificate.pem.crt").read_text()
        disk_public = (folder / "public.pem.key").read_text()
    except OSError as e:
        return [*out, Violation("certs-out", mac, f"{folder}: {e.strerror}")]
    if cert.strip() != disk_cert.strip():
        out.append(Violation("nvs", mac, "the board's certificate is not certs_out's"))
    if not key_pair_matches(key, disk_public):
        out.append(Violation("nvs", mac, "the board's private key is not the pair of "
                                         "certs_out's public.pem.key"))
    private_file = folder / "private.pem.key"
    if private_file.exists():
        try:
            if not same_public_key(_public(private_file.read_text()), _public(key)):
                out.append(Violation("nvs", mac, "the board's key differs from certs_out's"))
        except ValueError as e:
            out.append(Violation("certs-out", mac, f"{private_file}: unreadable key: {e}"))
    if certificate_key_matches(cert, disk_public) is False:  # None: moto's own key type
        out.append(Violation("nvs", mac, "the certificate does not carry the board's key"))
    if aws is not None:
        active = aws.active_of(thing)
        if len(active) != 1:
            out.append(Violation("thing-certs", thing, f"{len(active)} ACTIVE certificates "
                                                       f"(board {mac} is done)"))
        elif aws.pem.get(active[0], "").strip() != cert.strip():
            out.append(Violation("nvs", mac, f"the board's certificate is not AWS's ACTIVE "
                                             f"certificate {active[0][:12]} of {thing}"))
        if job["certificate_id"] and active and job["certificate_id"] not in active:
            out.append(Violation("thing-certs", thing, f"ledger names certificate "
                                                       f"{job['certificate_id'][:12]}, AWS has "
                                                       f"{[a[:12] for a in active]} ACTIVE"))
    return out


def check_aws(aws: AwsView, registrations: Sequence[dict[str, Any]],
              certs_out: Path) -> list[Violation]:
    out: list[Violation] = []
    activated = {r["certificate_id"] for r in registrations if r["step"] == "cert-activated"}
    owner: dict[str, str] = {}  # certificate id -> its last ownership step
    for r in registrations:
        if r["step"] in ("cert-activated", "on-board", "cert-deactivated"):
            owner[r["certificate_id"]] = r["step"]
    for cid, cert in aws.certificates.items():
        if cert["status"] != "ACTIVE":
            continue
        things = aws.things_of(cid)
        if not things:
            out.append(Violation("orphan-cert", cid, "ACTIVE with no thing"))
            continue
        for thing in things:
            folder = certs_out / thing
            record = _record(folder)
            if not (folder / "private.pem.key").exists() and \
                    not (record or {}).get("private_key_dropped"):
                out.append(Violation("orphan-cert", cid, f"ACTIVE on {thing}, no key on disk"))
            if record is None or record.get("certificate_id") != cid:
                out.append(Violation("orphan-cert", cid, f"ACTIVE on {thing}, but "
                                                         f"{folder.name}/registration.json "
                                                         "names another certificate"))
        if cid not in activated:
            out.append(Violation("orphan-cert", cid, "ACTIVE with no cert-activated row in "
                                                     "the ledger"))
        elif owner.get(cid) != "on-board":
            out.append(Violation("unheld-cert", cid, f"ACTIVE, but its journal ends with "
                                                     f"{owner.get(cid)}, not on-board"))
    return out


def _record(folder: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((folder / "registration.json").read_text())
        return data
    except (OSError, ValueError):
        return None


def check_certs_out(certs_out: Path, jobs: Sequence[dict[str, Any]],
                    registrations: Sequence[dict[str, Any]],
                    done: dict[str, dict[str, Any]]) -> list[Violation]:
    out: list[Violation] = []
    known = {j["thing_name"] for j in jobs if j["thing_name"]}
    known |= {r["thing_name"] for r in registrations}
    folders = {p.name for p in certs_out.iterdir() if p.is_dir()} if certs_out.exists() \
        else set()
    for name in sorted(folders - known):
        out.append(Violation("certs-out", name, "folder with no ledger row"))
    for mac, job in done.items():
        if job.get("registrar") not in (None, "none") and job["thing_name"] not in folders:
            out.append(Violation("certs-out", mac, f"done, registered, but no certs_out/"
                                                   f"{job['thing_name']}"))
    return out


def check_rss(samples: Sequence[RssSample], limit_mb: float = RSS_LIMIT_MB,
              from_board: int = 50, warm_up: int = 10) -> tuple[list[Violation], dict[str, Any]]:
    """RSS growth within each station process, from its baseline to its last sample.

    A restart resets the process, so growth is only comparable inside one. The baseline
    is the `from_board`th board of the run if the process saw it with `warm_up` boards
    still to come, else the process's own `warm_up`th board (imports, esptool's stub,
    thread pools and boto3 are loaded by then). Any process growing more than
    `limit_mb` from its baseline is a violation.
    """
    by_pid: dict[int, list[RssSample]] = {}
    for s in samples:
        by_pid.setdefault(s.pid, []).append(s)
    out: list[Violation] = []
    processes = []
    for pid, mine in by_pid.items():
        first, last = mine[0], mine[-1]
        if last.boards_final - first.boards_final < warm_up:
            # e.g. a start that failed while AWS was away: it never got past its imports
            processes.append({"pid": pid, "boards": [first.boards_final, last.boards_final],
                              "last_mb": round(last.rss_kb / 1024, 1),
                              "note": f"fewer than {warm_up} boards: not judged"})
            continue
        if first.boards_final <= from_board <= last.boards_final - warm_up:
            baseline_at = from_board
        else:
            baseline_at = first.boards_final + min(warm_up, (last.boards_final -
                                                             first.boards_final) // 2)
        base = next((s for s in mine if s.boards_final >= baseline_at), first)
        growth = (last.rss_kb - base.rss_kb) / 1024
        processes.append({"pid": pid, "boards": [first.boards_final, last.boards_final],
                          "baseline_at_board": base.boards_final,
                          "baseline_mb": round(base.rss_kb / 1024, 1),
                          "last_mb": round(last.rss_kb / 1024, 1),
                          "growth_mb": round(growth, 1)})
        if growth > limit_mb:
            out.append(Violation("rss", str(pid), f"RSS grew {growth:.1f} MB from board "
                                                  f"{base.boards_final} to "
                                                  f"{last.boards_final}"))
    if not processes:
        return [], {"note": "no samples"}
    longest = max(processes, key=lambda p: p["boards"][1] - p["boards"][0])
    summary = {"limit_mb": limit_mb,
               "max_growth_mb": max((p["growth_mb"] for p in processes if "growth_mb" in p),
                                    default=None),
               "max_mb": round(max(s.rss_kb for s in samples) / 1024, 1),
               "longest_lived": longest, "processes": processes}
    return out, summary


def check_all(*, ledger: Path, dumps: Path, certs_out: Path, bundle: FirmwareBundle,
              partition: str, namespace: str, plugs: Sequence[Plug], iot: Any | None,
              stuck: Iterable[Violation] = (),
              rss: Sequence[RssSample] = ()) -> tuple[list[Violation], dict[str, Any]]:
    """Every check; returns the violations and a few counts for the report."""
    jobs = read_jobs(ledger)
    registrations = read_registrations(ledger)
    aws = AwsView.read(iot) if iot is not None else None
    done = done_boards(jobs)
    violations = list(stuck)
    violations += check_accounted(plugs, jobs)
    plugged = {p.mac for p in plugs}
    for mac, job in sorted(done.items()):
        if plugs and mac not in plugged:
            violations.append(Violation("phantom", mac, f"done in the ledger as "
                                                        f"{job['thing_name']}, but no board "
                                                        "with this MAC was plugged (a misread "
                                                        "MAC?)"))
            continue
        violations += check_done_board(mac, job, dumps, bundle, partition, namespace,
                                       certs_out, aws)
    if aws is not None:
        violations += check_aws(aws, registrations, certs_out)
    violations += check_certs_out(certs_out, jobs, registrations, done)
    rss_violations, rss_summary = check_rss(rss) if rss else ([], {})
    violations += rss_violations
    facts: dict[str, Any] = {"jobs": len(jobs), "done_boards": len(done),
                             "registration_rows": len(registrations), "rss": rss_summary}
    if aws is not None:
        facts["aws"] = aws.counts()
        # A board that failed after its registration (unplugged mid-flash, full disk) has
        # its certificate parked INACTIVE (unheld-cert above otherwise); counted here.
        facts["aws"]["active_of_boards_not_done"] = sum(
            1 for mac, job in final_jobs_by_mac(jobs).items() if mac not in done
            and job["thing_name"] and aws.active_of(job["thing_name"]))
    return violations, facts


# -- the central ledger (issue 12) ------------------------------------------------------


def check_central(ledger: Path, conninfo: str, station: str, password: str) -> tuple[
        list[Violation], dict[str, Any]]:
    """`central`: the central PostgreSQL holds exactly the local ledger: every event once
    (same seq, kind, job), every job row equal to the local one, the cursor at the end."""
    import psycopg

    conn_local = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        local_events = conn_local.execute(
            "SELECT rowid, job_id, kind FROM events ORDER BY rowid").fetchall()
        conn_local.row_factory = sqlite3.Row
        local_jobs = {r["job_id"]: dict(r) for r in conn_local.execute("SELECT * FROM jobs")}
    finally:
        conn_local.close()
    out: list[Violation] = []
    with psycopg.connect(conninfo, password=password, connect_timeout=10) as conn:
        remote_events = conn.execute("SELECT seq, job_id, kind FROM events WHERE station = %s "
                                     "ORDER BY seq", (station,)).fetchall()
        rows = conn.execute("SELECT job_id, mac, result, failed_stage, error, thing_name, "
                            "certificate_id, extract(epoch FROM finished_at) FROM jobs "
                            "WHERE station = %s", (station,)).fetchall()
        cursor = conn.execute("SELECT shipped_seq FROM stations WHERE station = %s",
                              (station,)).fetchone()
    remote = {tuple(e) for e in remote_events}
    local = {tuple(e) for e in local_events}
    for seq, job, kind in sorted(local - remote)[:20]:
        out.append(Violation("central", job, f"event #{seq} {kind} is not in PostgreSQL"))
    for seq, job, kind in sorted(remote - local)[:20]:
        out.append(Violation("central", job, f"PostgreSQL has event #{seq} {kind} the "
                                             "ledger does not"))
    if len(remote_events) != len(remote):
        out.append(Violation("central", station, "PostgreSQL holds an event twice"))
    remote_jobs = {r[0]: r for r in rows}
    for job_id, job in local_jobs.items():
        r = remote_jobs.get(job_id)
        mine = (job_id, job["mac"], job["result"], job["failed_stage"], job["error"],
                job["thing_name"], job["certificate_id"])
        if r is None or tuple(r[:7]) != mine or (job["finished_at"] is not None and (
                r[7] is None or abs(float(r[7]) - job["finished_at"]) > 1e-3)):
            out.append(Violation("central", job["mac"] or job_id,
                                 f"job {job_id}: PostgreSQL has {r and tuple(r[:7])}, the "
                                 f"ledger {mine}"))
    for job_id in set(remote_jobs) - set(local_jobs):
        out.append(Violation("central", job_id, "job in PostgreSQL, not in the ledger"))
    end = max((e[0] for e in local_events), default=0)
    if cursor is None or int(cursor[0]) != end:
        out.append(Violation("central", station, f"cursor {cursor and cursor[0]} but the "
                                                 f"ledger ends at #{end}"))
    return out, {"events": len(remote_events), "jobs": len(remote_jobs),
                 "shipped_seq": cursor and int(cursor[0])}
