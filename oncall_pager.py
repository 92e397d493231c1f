"""oncall-pager: a small, auditable on-call pager for a small team, built on Twilio.

What it does
    Customers call the *pager number*, press 1 and leave a voicemail (or, with live answer,
    press 2 and are put through to the on-call engineer). The on-call engineer is paged at
    once (MMS with the recording, an e-mail copy with the mp3 attached, the recording
    archived in the store); until somebody acknowledges, the pager phones the on-call engineer
    and then the rest of the team. Team members run it by SMS to the *control number*
    (WHO, TAKE + C/X, ACK, STATUS, NEXT, QUIET + C/X, HALP, LOOK; STOP/START as the carriers
    define them).
    Messages from anybody else are ignored. An optional rotation hands on-call over at each
    shift start by itself, and reminds the next engineer before; overrides (TAKE 4h, TAKE
    UNTIL FRI 09:00, `override add`) put somebody on call for a while and then hand back.
    Monitoring pages through PagerDuty's Events API (Alertmanager, Grafana, Uptime Kuma ...),
    and a heartbeat that stops pinging pages too; quiet hours (QUIET 2h) list those instead of
    ringing, for a maintenance window, and never silence callers.

How data flows
    call -> /public/answer -> /public/keypress -> <Record> -> /public/recordingcb
         -> Pages.open_page: one conditional create of pages/<id>.json, which is the page, its
            queue entry and this instance's claim on its first deliveries
         -> Worker.start_work, at once: MMS; e-mail and archive; the page number; audit entries
         (a caller whose page is open: Pages._join_open_page, one conditional create of the
            repeat's own record, then its MMS; the open page lists it after, the join channel)
         -> Worker.scan: escalation (calls, then the team) until ACK, retries, other instances'
            work (found by listing pages/ every poll_interval; only changed pages are read;
            after a start the recent pages first, then the changed ones, in parallel, but for
            those the done index names with the ETag listed: DoneIndex, no read)
         -> daily: a page done with and quiet for two days moves to pages-done/ (Pages.archive)
         (no valid config at all: the page is created `waiting` (Pages.wait_for_config), rings
            nobody, and the worker opens it (Pages.open_waiting) once it reads a valid one;
            serve stays up meanwhile, /healthz says config-invalid)
    live -> /public/keypress 2 -> LiveCalls.live_hunt: a caller reaches the hunt once in 10
            minutes (live/<number>.json) and not while their page is open, else voicemail
         -> screened <Dial>, each leg counted against the hourly budget (/public/screen,
            /public/screenkey: only the engineer's 1 connects; LiveCalls.live_accepted opens a
            page of kind call, acknowledged; spooled like a voicemail while S3 is down)
         -> /public/dialdone: the next person, or the voicemail flow above (also when the
            store cannot say whether the call was taken)
    transcript -> /public/transcriptioncb -> LiveCalls.transcribed: texted, e-mailed, archived
    rotation -> Worker: at a shift start Team.hand_off (one conditional write of the config,
            the handoff texts travel with it); before it Team.remind (a job keyed by the shift).
            A config change that makes a handoff due (handoff_due) carries it out in the same
            write (the command line: Team.handoff_with_change; its texts are sent by the
            worker that next sees the config, checked with every listing); WHO makes a due
            one first. A page keeps calling whom it was sent to (page.oncall), then the team.
            Who the schedule names when is oncall_shifts: the rotation's shifts with the
            overrides (current_config.overrides) laid over them; an override's start and its
            end (the hand-back) are handoffs like a shift's. Overrides (the room) writes them:
            C after TAKE 4h / TAKE UNTIL (Team.confirm hands over to it), `override add`.
    SMS  -> /msgcontrol/entry -> Commands.handle_sms (once per MessageSid) -> TwiML reply;
            a text's fate -> /public/mmsstatuscb -> Pages.text_failed (codes, call at once)
    alert -> /v2/enqueue (PagerDuty's Events API v2; the routing key names the integration)
         -> Alerts.alert_event: trigger opens a page of kind alert (critical/error ring like a
            voicemail; warning/info are e-mailed and listed) or joins the one of its
            dedup_key (open, listed, or acknowledged within a day); acknowledge ->
            Pages.acknowledge; resolve -> Pages.resolve (notices). A page keeps 8 KiB of
            the event's custom_details (kept_details), not the event. Per integration,
            alert_pages_per_hour new dedup_keys ring in an hour (Alerts.count_alert); the
            rest are held: listed and e-mailed, and the first held one texts once
    test -> `oncall-pager test MEMBER [--call]` or TEST by SMS: ContactTests.tested; the
            member's OK (or 1 on /oncall/test) -> ContactTests.confirmed
    report -> `oncall-pager report`: Report, from the audit log's keys (one LIST a day)

    quiet -> QUIET 2h [reason] + C (or `oncall-pager quiet 2h`) -> QuietHours.start: one
            conditional write of current_config.quiet {since, until, reason, by}. While it
            lasts (quiet_until), Alerts.trigger and Heartbeats.missed open their pages listed
            and *hushed* (e-mail only), and the worker holds the escalation of alert pages.
            At `until` (or QUIET OFF) QuietHours.end removes it in one write that carries the
            one "Quiet ended: N alerts still open." text (a job keyed by the window); then
            every hushed page rings (Upkeep._ring_after_quiet: ring_after_quiet, page.ringing)


    push -> a page's first notification also goes to the push topic (ntfy) of whom it was
            sent to: the channel `push` of the page (Push), on threads of its own
    webhooks -> page.opened/acknowledged/resolved/escalated and oncall.changed: when such an
            audit entry is written, AuditLog.follow (Worker.follow) first creates one job per
            webhook that follows it (jobs/hook-*, Webhooks.queue), sent on threads of its own
            as signed JSON or a chat line, retried with backoff; never on a page's path


            alert_pages_per_hour new dedup_keys ring in an hour (Alerts.count_alert, group
            committed); the rest are held: listed and e-mailed, and the first held one
            texts once. A new dedup_key's page is created at once, the index and the budget
            checked beside the create (Alerts.open_alert_at_once; a worker checks a page left
            `unchecked`, Alerts.check_alert); a repeat of a page the book knows is answered
            from memory and its count written by the worker (AlertRepeats)
    change -> /v2/change/enqueue (PagerDuty's Change Events: a deploy, a config push)
         -> Alerts.change_received: audited (change.received), nothing rings
    heartbeat -> GET, HEAD or POST /heartbeat/<name> (any integration's key, or one made
            with --heartbeats-only, which cannot trigger) -> Heartbeats.ping (resolves
            the page of a miss);
            Upkeep._check_heartbeats, planned from memory: no ping for interval + grace ->
            Heartbeats.missed opens a page of kind heartbeat
    views -> GET /calendar/<token>.ics, GET /status/<token> (tokens made by `calendar-token`,
            `status-token`; the config keeps their SHA-256, feed_token): read-only.
            oncall_shifts lays the rotation's shifts (Rotation) and the overrides out as
            stretches of time, for calendar_feed (RFC 5545) and the StatusBoard (who is on
            call, the next handoffs, open and last pages from the PageBook, health_words),
            which `oncall-pager status` prints too

    Over a real network the round trip to S3 is the cost that matters: the page path makes at
    most two requests one after the other (the config, unless checked in the last 10 s, and
    the create); everything else follows it, independent writes at once (in_parallel). Each
    instance keeps copies of the pages it has seen (PageBook) and writes over them with
    If-Match, so a change costs a read only when another instance changed the page meanwhile.

Store layout (a local directory, or an S3 bucket with an optional prefix)
    oncall_config.json                      the operational config (the predecessor's schema)
    sessions/<member id>.json               pending TAKE confirmations
    pages/<RecordingSid or CallSid>.json    one page and its queue entry: caller, who was
                                            paged, ack, channels, escalation, claims; or, in
                                            state `joined`, a later call of the caller of the
                                            open page it `joins` (Pages._join_open_page)
    pages/AL<hash>.json, pages/HB<hash>.json      alert pages (hash of integration, dedup_key,
                                            generation) and missed heartbeats (name, the ping
                                            it missed)
    pages-done/<id>.json                    pages with nothing left to do, moved out of pages/
                                            after two quiet days (so its listing stays short)
    index/done-pages.json                   the pages of pages/ known done with, by ETag: a
                                            cache that spares a start reading them (DoneIndex)
    alerts/<hash>.json                      the generation of a dedup_key that came back after
                                            its page was done with, or whose page moved out
    heartbeats/<name>.json                  when a heartbeat was first seen and last pinged
    jobs/msg-*.json                         single SMS (handoffs, reminders, the end of quiet
                                            hours), kept a day once sent
    jobs/hook-<audit entry>-<webhook>.json  one event for one webhook, kept a day once sent
    replies/<MessageSid>.json               replay markers of state-changing SMS (7 days)
    live/<caller number>.json               when that caller last reached the live hunt (a
                                            repeat within 10 minutes goes to voicemail)
    counters/pages.json, counters/outbound.json   page numbers; the hourly outbound cost guard
    counters/alerts-<hash>.json             an integration's alert budget this hour: the
                                            dedup_keys that rang, those held (listed only)
    numbers/<n>.json                        page number n -> page id (ACK n for any page)
    recordings/<UTC stamp>_<sid>.mp3|.json  archived voicemails
    audit/YYYY/MM/DD/<UTC stamp>-<uuid>~<event>~<actor>~<facts>.json   one immutable object
                                            per event; its key says what `report` needs
    contacts/<member id>.json               the member's last contact test and confirmation
    outbox/...                              dry-run mode only: what would have been sent
    probe/<random>.json                     check's and serve's probe that the store honours
                                            If-None-Match and If-Match (probe_store; deleted)

Every state change is a conditional write (S3 If-Match / If-None-Match; the directory store
has the same semantics under a lock) and one audit entry, which travels inside the object it
describes until it is written, so a stop between the two loses neither. A store that accepts
those headers and ignores them would silently undo all of that: `check` and `serve` probe it
first (probe_store) and refuse one that does.

Run it
    oncall-pager serve -c config.ini        (see README.md; `make run` for the local default)

Watch it
    GET /healthz: status words for anyone. GET /metrics: Prometheus text for whoever holds
    [server] metrics_token; this process's counters (METRICS: in memory, counted by the store,
    the domain, the worker and the web), gauges read from memory, never a store request.
    Under systemd (Type=notify) the ServiceNotifier sends READY=1 once serve listens,
    WATCHDOG=1 while the worker loop is alive (Worker.alive) and STATUS= a one-line summary.

Rooms (classes named after the domain, none over about 600 lines; each owns its state changes)
    domain  Pager      the shared parts: store, audit log, operational config, PageBook, spool,
                       the worker's hooks; hand_over, claim_until
            Pages      open/join a page, find, number, acknowledge, resolve, archive
            Team       WHO, TAKE/C/X, opt-outs, rotation, handoffs, reminders (oncall_user)
            Alerts     the Events API (a new alert in one create, a storm's repeats from
                       memory), change events, alert budgets
            Heartbeats pings, and the page of a miss
            LiveCalls  the screened hunt and its live pages, transcripts
            Commands   an SMS in (once per MessageSid), the right room, the reply
            beside them, smaller: QuietHours (QUIET), Overrides (TAKE 4h, `override`),
            ContactTests (TEST, OK), AlertRepeats (a storm's repeats, counted in memory)
    channels Push, Webhooks   POSTs to the push topics and webhooks of the operational config
    worker  Worker     the loop, listings, claims, the pools: what schedules; DoneIndex (the
                       pages done with, so that a start need not read them)
            Messages   single texts and webhook jobs (jobs/): sent, found, adopted, claimed
            Upkeep     rotation timing, heartbeat checks, housekeeping, the spool
            Delivery   MMS, SMS, e-mail, archive, escalation calls, the outbound budget
    web     WebApp     the gate (sizes, signature, router) and Twilio's webhooks
            Monitors   /v2/enqueue, /v2/change/enqueue, /heartbeat/*, /healthz, /metrics,
                       /calendar/TOKEN.ics and /status/TOKEN (StatusBoard: the views section)
    command line       cmd_* functions; Report (`oncall-pager report`, from the audit log)
    The rooms share the store, the audit log, the PageBook and the clock (the module's `time`),
    taken from their hub in __init__; a room reaches another through an explicit reference
    (`self.pages`, or `self.pager.alerts` for one built after it).

Dependencies: twilio, boto3, waitress, and the standard library. Sections, top to bottom:
helpers, metrics, configuration (with the schedule as stretches and the calendar feed),
store, domain, channels (Twilio, e-mail, the recording; Push and Webhooks: POSTs to the
operational config's URLs), worker, views (the status page), web, command line (serve's
systemd notifier with it). Each section uses only what stands above it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import csv
import dataclasses
import datetime as dt
import email.message
import email.utils
import faulthandler
import fcntl
import functools
import gc
import getpass
import hashlib
import hmac
import html
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zoneinfo
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_any
from configparser import ConfigParser
from configparser import Error as ConfigParserError
from pathlib import Path
from typing import Any, NamedTuple

VERSION = "0.1.0"
log = logging.getLogger("oncall_pager")


# ==============================================================================================
# Errors and small helpers
# ==============================================================================================


class ConfigError(Exception):
    """A config file or document is invalid; `problems` holds one precise line per fault."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class StoreConflict(Exception):
    """A conditional write lost: the object changed (or appeared) since it was read.
    `retried`: the client had sent the write more than once (see S3Store.put)."""

    def __init__(self, message: str, retried: bool = False):
        super().__init__(message)
        self.retried = retried


class StoreUnavailable(Exception):
    """The store could not be reached or answered with a server error."""


class StoreUncertain(StoreUnavailable):
    """The store failed after it said a page exists: answer 503 so Twilio retries, and do not
    spool it (a spooled copy would page a second time)."""


class UsageError(Exception):
    """A command-line mistake, printed as one line on stderr."""


E164 = re.compile(r"\+[1-9][0-9]{6,14}")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
MAX_BODY = 64 * 1024
MAX_EVENT_BODY = 512 * 1024  # an Events API event (PagerDuty's own limit); Twilio's are small
WAITRESS_BODY_LIMIT = MAX_EVENT_BODY + 1  # waitress refuses a body of its limit or more
MAX_PATH = 1024  # a request's path, and its query string: Twilio's own are far shorter
MAX_QUERY = 4 * 1024
DAY = 24 * 3600


def is_e164(value: object) -> bool:
    return isinstance(value, str) and E164.fullmatch(value) is not None


def iso_time(ts: float) -> str:
    """`2026-11-26T23:05:55.123Z`: the audit log's time format."""
    moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def file_stamp(ts: float) -> str:
    """`2026-11-26_230555`: the recordings' file-name stamp (UTC)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d_%H%M%S")


def sortable_stamp(ts: float) -> str:
    """`20261126T230555.123456Z`: sorts in time order inside a folder."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


@functools.lru_cache(maxsize=64)
def short_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration_text(seconds: float) -> str:
    """How long until something, to the units that matter: `3 d 4 h`, `5 h 20 min`,
    `12 min`, `40 s`."""
    days, rest = divmod(max(0, round(seconds)), DAY)
    hours, rest = divmod(rest, 3600)
    minutes, rest = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min" if minutes else f"{rest} s"


def to_json(doc: object) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def first_name(member: dict) -> str:
    return str(member.get("name", "")).split(" ")[0] or str(member.get("id"))


def backoff(attempts: int, base: float, cap: float) -> float:
    """Capped exponential backoff: base, 2*base, 4*base, ... never above cap."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


# C0 and C1 controls (CR and LF among them), DEL, the Unicode line and paragraph separators and
# the bidirectional overrides: what can end a header or a log line, or make text read backwards.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+")


# What XML 1.0 (its Char production) or UTF-8 cannot carry: lone surrogates (a JSON "\ud83d",
# half an emoji that a JavaScript monitor cut) and U+FFFE, U+FFFF; with them the other
# noncharacters (U+FDD0-U+FDEF, the last two code points of every plane), which no sender
# means as text. One of them in a summary made its SMS fail (UnicodeEncodeError) and its
# call's TwiML not XML.
UNCARRIED = re.compile("[\ud800-\udfff\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17)) + "]")
REPLACEMENT = "\ufffd"


def clean_text(value: str) -> str:
    """Text from outside (an alert's summary, CallerName, FromCity, an SMS Body, a transcript
    ...) as it may travel on: every run of control characters becomes one space, and every
    character that XML 1.0 or UTF-8 cannot carry becomes U+FFFD. Applied once, where the
    text enters the program, so no e-mail, SMS, TwiML, log line or CLI listing downstream
    can be split or broken by it. A space, not nothing: "+1919555\\x001002" must not turn
    into a member's phone number. What is left with nothing but spaces and U+FFFD says
    nothing: it is "", so a field made only of controls or junk counts as missing."""
    if not value:
        return value
    if value.isascii() and value.isprintable():  # most text: nothing to replace (fast)
        return value.strip()
    cleaned = UNCARRIED.sub(REPLACEMENT, CONTROL_CHARACTERS.sub(" ", value)).strip()
    return cleaned if cleaned.strip(" " + REPLACEMENT) else ""


def clean_json(value: object) -> object:
    """A JSON value from outside (an alert's custom_details) with every string, keys too,
    cleared of what XML 1.0 or UTF-8 cannot carry (U+FFFD instead). Controls stay: wherever
    the value is shown it is shown as JSON, which escapes them. Its nesting is bounded
    (MAX_NESTING) before it gets here."""
    if isinstance(value, str):
        return UNCARRIED.sub(REPLACEMENT, value)
    if isinstance(value, list):
        return [clean_json(item) for item in value]
    if isinstance(value, dict):
        return {UNCARRIED.sub(REPLACEMENT, key): clean_json(item) for key, item in value.items()}
    return value


def whole_number(text: str, digits: int = 9) -> int | None:
    """A whole number as a request spells it (a duration, a step, an error code, a page
    number): ASCII digits, at most `digits` of them; else None. `str.isdigit` also says yes
    to "²", and int() refuses more than 4,300 digits: either was a 500."""
    return int(text) if text.isascii() and text.isdecimal() and len(text) <= digits else None


PLAIN_LOG_VALUE = re.compile(r"[\w./:@+\-,%]{1,200}", re.ASCII)


def log_value(value: object, limit: int = 200) -> str:
    """A value from a request, fit for a key=value log line: plain values as they are,
    anything else quoted with its quotes, backslashes and non-printable characters escaped,
    so that `GET /x%0a2026-11-27 ... event=audit` can neither start a new line nor add a
    key to this one."""
    text = str(value)
    if PLAIN_LOG_VALUE.fullmatch(text):
        return text
    if len(text) > limit:
        text = text[:limit] + "..."
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


# ==============================================================================================
# Metrics: this process's counters, for GET /metrics
# ==============================================================================================


# Every metric family /metrics shows: name -> (type, help). The counters and histograms are
# counted below; the gauges are read at scrape time from what the process holds in memory.
METRIC_FAMILIES = {
    "oncall_build_info": ("gauge", "Always 1; the label carries the pager's version."),
    "oncall_pages_opened_total": ("counter", "Pages this process opened, by kind."),
    "oncall_deliveries_total": (
        "counter", "Delivery attempts of this process, by channel and result (sent, failed, "
        "retry, capped, expired)."),
    "oncall_escalation_steps_total": (
        "counter", "Escalation steps this process started, by kind (oncall, team)."),
    "oncall_queue_depth": (
        "gauge", "Pages and messages with delivery or escalation work pending (last scan)."),
    "oncall_outbound_budget_left": (
        "gauge", "SMS and calls left in this hour's outbound budget, as this process last saw "
        "counters/outbound.json (absent until it has spent from it)."),
    "oncall_store_requests_total": (
        "counter", "Store requests, by store, operation and outcome."),
    "oncall_store_request_seconds": ("histogram", "Store request latency, by operation."),
    "oncall_http_requests_total": (
        "counter", "HTTP requests, by route (other: no route) and status."),
    "oncall_http_request_seconds": ("histogram", "Time to answer an HTTP request, by route."),
    "oncall_config_stale": (
        "gauge", "1 when the last read of the operational config failed (store unreachable, "
        "config missing or invalid) and the last good copy answers, else 0."),
    "oncall_store_reachable": (
        "gauge", "1 when the last read of the operational config reached the store, else 0."),
    "oncall_quiet": (
        "gauge", "1 while quiet hours are on (alerts listed and e-mailed, not rung; "
        "voicemails and calls page as always), else 0; by the config as this process last "
        "read it."),


    "oncall_alert_repeats_total": (
        "counter", "Triggers that joined an open alert page, by path: memory (answered from "
        "the page book, counted on the page later) or store (written before the answer)."),
    "oncall_alert_repeats_pending": (
        "gauge", "Repeats answered from memory whose count is not yet written on its page."),
    "oncall_alert_checks_total": (
        "counter", "New alert pages created at once and checked beside the create, by "
        "outcome (rings, held, superseded: the id of a page done with, created again)."),
    "oncall_worker_busy_seconds": (
        "gauge", "Seconds the worker loop has been busy without coming round or making "
        "progress (0 while it waits for work); from 180 s (or 12 x http_timeout) on it counts "
        "as stuck and no longer feeds the systemd watchdog."),
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
Labels = tuple[tuple[str, str], ...]


def metric_labels(labels: Labels) -> str:
    """`{a="x",b="y"}` with the text format's escapes (backslash, quote, line feed)."""
    if not labels:
        return ""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for _, value in labels)
    return "{" + ",".join(f'{name}="{value}"' for (name, _), value in zip(labels, escaped,
                                                                         strict=True)) + "}"


class Metrics:
    """Counters and latency histograms of this process, in memory: they start at zero with
    each start (Prometheus's rate() takes a reset in its stride) and tell nothing of other
    instances. Label values come from fixed sets only (route patterns, page kinds, channel
    kinds, store operations), never from a request, so no caller can add a series. One lock:
    a count is a dictionary update, far cheaper than the request it counts."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, Labels], float] = {}
        # name, labels -> [count in each bucket (not cumulative) ..., count, sum]
        self._histograms: dict[tuple[str, Labels], list[float]] = {}
        self._lock = threading.Lock()

    def count(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + 1

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        slot = next((i for i, le in enumerate(LATENCY_BUCKETS) if seconds <= le),
                    len(LATENCY_BUCKETS))
        with self._lock:
            cells = self._histograms.setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 3))
            cells[slot] += 1
            cells[-2] += 1
            cells[-1] += seconds

    def render(self, gauges: dict[str, list[tuple[Labels, float]]]) -> str:
        """The Prometheus text format (version 0.0.4): every family with its HELP and TYPE,
        its samples sorted; `gauges` are the values read at scrape time."""
        with self._lock:
            counters = dict(self._counters)
            histograms = {key: list(cells) for key, cells in self._histograms.items()}
        samples: dict[str, list[str]] = {name: [] for name in METRIC_FAMILIES}
        for name, values in gauges.items():
            samples[name] += [f"{name}{metric_labels(labels)} {value!r}"
                              for labels, value in sorted(values)]
        for (name, labels), value in sorted(counters.items()):
            samples[name].append(f"{name}{metric_labels(labels)} {value!r}")
        for (name, labels), cells in sorted(histograms.items()):
            cumulative = 0.0
            for le, count in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), cells[:-2],
                                 strict=True):
                cumulative += count
                samples[name].append(
                    f"{name}_bucket{metric_labels((*labels, ('le', le)))} {cumulative!r}")
            samples[name].append(f"{name}_count{metric_labels(labels)} {cells[-2]!r}")
            samples[name].append(f"{name}_sum{metric_labels(labels)} {cells[-1]!r}")
        lines = []
        for name, (kind, text) in METRIC_FAMILIES.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
        return "\n".join(lines) + "\n"


METRICS = Metrics()  # one registry per process: the store, the worker and the web count here


# ==============================================================================================
# Configuration: config.ini (AppConfig) and the operational JSON (validation with field paths)
# ==============================================================================================


@dataclasses.dataclass
class AppConfig:
    """The host's config.ini. Relative `file:` paths are resolved against the file's folder."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    threads: int = 8
    metrics_token: str = ""  # GET /metrics wants it as a bearer token; empty: no /metrics
    store_url: str = "file:var"
    config_key: str = "oncall_config.json"
    s3_endpoint_url: str = ""
    region: str = ""
    cache_file: str = "oncall_config.cache.json"
    spool_dir: str = "spool"
    init_from: str = ""
    account_sid: str = ""
    auth_token: str = ""
    auth_token_secondary: str = ""  # also accepted for signatures while tokens are rotated
    mode: str = "live"
    api_base_url: str = "https://api.twilio.com"
    validate_signatures: bool = True
    poll_interval: float = 60.0
    retry_base: float = 5.0
    retry_cap: float = 300.0
    claim_timeout: float = 60.0
    smtp_timeout: float = 20.0
    http_timeout: float = 10.0
    worker_threads: int = 4
    log_level: str = "INFO"
    base_dir: Path = Path(".")

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry-run"

    def url(self, path: str) -> str:
        """An absolute URL for Twilio to call back, built from public_url."""
        return self.public_url.rstrip("/") + path


# (section, key, field, kind) for every config.ini setting; kind is how the text is parsed.
APP_SETTINGS = [
    ("server", "host", "host", str),
    ("server", "port", "port", int),
    ("server", "public_url", "public_url", str),
    ("server", "threads", "threads", int),
    ("server", "metrics_token", "metrics_token", str),
    ("store", "url", "store_url", str),
    ("store", "config_key", "config_key", str),
    ("store", "s3_endpoint_url", "s3_endpoint_url", str),
    ("store", "region", "region", str),
    ("store", "cache_file", "cache_file", str),
    ("store", "spool_dir", "spool_dir", str),
    ("store", "init_from", "init_from", str),
    ("twilio", "account_sid", "account_sid", str),
    ("twilio", "auth_token", "auth_token", str),
    ("twilio", "auth_token_secondary", "auth_token_secondary", str),
    ("twilio", "mode", "mode", str),
    ("twilio", "api_base_url", "api_base_url", str),
    ("twilio", "validate_signatures", "validate_signatures", bool),
    ("worker", "poll_interval", "poll_interval", float),
    ("worker", "retry_base", "retry_base", float),
    ("worker", "retry_cap", "retry_cap", float),
    ("worker", "claim_timeout", "claim_timeout", float),
    ("worker", "smtp_timeout", "smtp_timeout", float),
    ("worker", "http_timeout", "http_timeout", float),
    ("worker", "threads", "worker_threads", int),
    ("log", "level", "log_level", str),
]


def parse_setting(text: str, kind: type) -> object:
    """Parse one config.ini value; ValueError names what was expected."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError("is not true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("is not a whole number") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("is not a number") from None
    return text.strip()


def load_app_config(path: str | Path, environ: dict[str, str] | None = None) -> AppConfig:
    """Read config.ini; every problem is reported at once, each naming `[section] key`."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    parser = ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except (ConfigParserError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: not an ini file: {str(e).splitlines()[0]}"]) from None
    cfg = AppConfig(base_dir=path.resolve().parent)
    problems = []
    for section, key, field, kind in APP_SETTINGS:
        if not parser.has_option(section, key):
            continue
        text = parser.get(section, key)
        if text.strip() == "" and kind is not str:
            continue
        try:
            setattr(cfg, field, parse_setting(text, kind))
        except ValueError as e:
            problems.append(f"{path}: [{section}] {key} {text!r} {e}")
    cfg.account_sid = environ.get("TWILIO_ACCOUNT_SID") or cfg.account_sid
    cfg.auth_token = environ.get("TWILIO_AUTH_TOKEN") or cfg.auth_token
    cfg.auth_token_secondary = (environ.get("TWILIO_AUTH_TOKEN_SECONDARY")
                                or cfg.auth_token_secondary)
    cfg.metrics_token = environ.get("ONCALL_METRICS_TOKEN") or cfg.metrics_token
    problems += [f"{path}: {p}" for p in check_app_config(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


# A bearer token as RFC 6750 spells one, long enough not to be guessed.
METRICS_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]{16,}=*")


def check_app_config(cfg: AppConfig) -> list[str]:
    """Cross-field rules of config.ini."""
    problems = []
    if cfg.mode not in ("live", "dry-run"):
        problems.append(f"[twilio] mode {cfg.mode!r} is not 'live' or 'dry-run'")
    if not cfg.validate_signatures and not cfg.dry_run:
        problems.append("[twilio] validate_signatures = false is refused unless mode = dry-run")
    if not re.fullmatch(r"AC[0-9a-fA-F]{32}", cfg.account_sid or ""):
        problems.append("[twilio] account_sid is missing or not an AC... sid "
                        "(or set TWILIO_ACCOUNT_SID)")
    if not cfg.auth_token:
        problems.append("[twilio] auth_token is missing (or set TWILIO_AUTH_TOKEN)")
    if not cfg.store_url.startswith(("file:", "s3://")) or cfg.store_url in ("file:", "s3://"):
        problems.append(f"[store] url {cfg.store_url!r} is not file:PATH or s3://BUCKET[/PREFIX]")
    if not cfg.config_key or cfg.config_key.startswith("/"):
        problems.append(f"[store] config_key {cfg.config_key!r} is not a relative key")
    for section, name in (("server", "public_url"), ("twilio", "api_base_url"),
                          ("store", "s3_endpoint_url")):
        value = getattr(cfg, name)
        parts = urllib.parse.urlsplit(value)
        if (value or name != "s3_endpoint_url") and (
                parts.scheme not in ("http", "https") or not parts.netloc):
            problems.append(f"[{section}] {name} {value!r} is not an http(s) URL")
    if cfg.metrics_token and not METRICS_TOKEN.fullmatch(cfg.metrics_token):
        problems.append("[server] metrics_token must be at least 16 characters of A-Z a-z 0-9 "
                        "- . _ ~ + / (or set ONCALL_METRICS_TOKEN; e.g. openssl rand -hex 32)")
    if not 0 < cfg.port < 65536:
        problems.append(f"[server] port {cfg.port} is not between 1 and 65535")
    for name in ("threads", "worker_threads"):
        if getattr(cfg, name) < 1:
            problems.append(f"threads setting {name} must be at least 1")
    for name in ("poll_interval", "retry_base", "retry_cap", "claim_timeout", "smtp_timeout",
                 "http_timeout"):
        if getattr(cfg, name) <= 0:
            problems.append(f"[worker] {name} must be a positive number of seconds")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"[log] level {cfg.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    return problems


def resolve_path(cfg: AppConfig, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else cfg.base_dir / path


def cannot_write_in(folder: Path, *, created_on_demand: bool) -> str:
    """Why this user cannot create a file in `folder` ('' when it can). Tried for real, with a
    file made and removed at once: permission bits do not tell (root ignores them; a
    read-only mount or systemd's sandbox does not show in them). A folder that is created on
    demand is tried at its nearest existing ancestor."""
    probe = folder
    while created_on_demand and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".oncall-pager-check-", dir=probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(name)
    return ""


def local_file_problems(cfg: AppConfig) -> list[str]:
    """[store] cache_file and spool_dir must be writable (S3 stores only, where they are
    used): otherwise the pager finds out during an S3 outage, when it has lost its last good
    config or the pages that arrive meanwhile."""
    if not cfg.store_url.startswith("s3://"):
        return []
    problems = []
    if cfg.cache_file:
        path = resolve_path(cfg, cfg.cache_file)
        why = "it is a folder" if path.is_dir() else cannot_write_in(path.parent,
                                                                      created_on_demand=False)
        if why:
            problems.append(f"[store] cache_file {path} is not writable: {why}")
    if cfg.spool_dir:
        path = resolve_path(cfg, cfg.spool_dir)
        why = ("it is not a folder" if path.exists() and not path.is_dir()
               else cannot_write_in(path, created_on_demand=True))
        if why:
            problems.append(f"[store] spool_dir {path} is not writable: {why}")
    return problems


ESCALATION_DEFAULTS = {"ack_timeout": 300, "call_attempts": 2, "escalate_to": None,
                       "max_outbound_per_hour": 60, "alert_pages_per_hour": 10}


def check_oncall_config(doc: object) -> tuple[list[str], list[str]]:
    """Validate the operational config. Returns (errors, warnings), each naming a field path.
    A validator must not crash on what it validates: a value of a type no rule expected is
    one more error, never an exception."""
    try:
        return check_document(doc)
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        return [f"the operational config has a value of an unexpected type ({e})"], []


def check_document(doc: object) -> tuple[list[str], list[str]]:
    """The rules of check_oncall_config.

    The schema is the predecessor's, so files it wrote load unchanged; unknown keys are kept.
    The copy of the on-call member in `oncall_user` may disagree with the member's record (the
    predecessor's own README does): that is a warning, and the member's record wins.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if not isinstance(doc, dict):
        return ["the operational config is not a JSON object"], []
    users = doc.get("available_users", {}).get("users") if isinstance(
        doc.get("available_users"), dict) else None
    if not isinstance(users, dict) or not users:
        errors.append("available_users.users is missing or has no members")
        users = {}
    for key, member in users.items():
        where = f"available_users.users.{key}"
        if not isinstance(member, dict):
            errors.append(f"{where} is not an object")
            continue
        if member.get("id") != key:
            errors.append(f"{where}.id {member.get('id')!r} does not match its key {key!r}")
        if not isinstance(member.get("name"), str) or not member["name"].strip():
            errors.append(f"{where}.name is missing or empty")
        if not is_e164(member.get("phone")):
            errors.append(f"{where}.phone {member.get('phone')!r} is not an E.164 number "
                          "(+ and 7 to 15 digits)")
        if not isinstance(member.get("opted_out", False), bool):
            errors.append(f"{where}.opted_out {member.get('opted_out')!r} is not true or false")
        elif member.get("opted_out"):
            warnings.append(f"{where} has opted out of texts (sent STOP): pages reach "
                            f"{member.get('name', key)} by call only, until START")
    phones: dict[str, str] = {}
    for key, member in users.items():
        if isinstance(member, dict) and is_e164(member.get("phone")):
            if member["phone"] in phones:
                errors.append(f"available_users.users.{key}.phone {member['phone']} is also "
                              f"{phones[member['phone']]}'s phone")
            phones[member["phone"]] = key
    current = doc.get("current_config")
    if not isinstance(current, dict):
        errors.append("current_config is missing or not an object")
        return errors, warnings
    for field in ("from_phone", "pager_phone"):
        if not is_e164(current.get(field)):
            errors.append(f"current_config.{field} {current.get(field)!r} is not an E.164 number")
    if "last_modified_time" in current and not isinstance(
            current["last_modified_time"], (int, float)):
        errors.append("current_config.last_modified_time is not a number")
    oncall = current.get("oncall_user")
    if not isinstance(oncall, dict):
        errors.append("current_config.oncall_user is missing or not an object")
    elif not isinstance(oncall.get("id"), str) or oncall["id"] not in users:
        errors.append(f"current_config.oncall_user.id {oncall.get('id')!r} "
                      "is not an available user")
    else:
        member = users[oncall["id"]]
        for field in ("name", "phone"):
            if isinstance(member, dict) and oncall.get(field) != member.get(field):
                warnings.append(f"current_config.oncall_user.{field} {oncall.get(field)!r} "
                                f"differs from available_users.users.{oncall['id']}.{field} "
                                f"{member.get(field)!r}; the member's record is used")
    if "session_lifetime" in current and not positive_number(current["session_lifetime"]):
        errors.append(f"current_config.session_lifetime {current['session_lifetime']!r} "
                      "is not a positive number of seconds")
    if "team_name" in current and not isinstance(current["team_name"], str):
        errors.append("current_config.team_name is not a string")
    errors += check_live_answer(current.get("live_answer", {}))
    if "transcribe" in current and not isinstance(current["transcribe"], bool):
        errors.append("current_config.transcribe is not true or false")
    if "greeting" in current and (not isinstance(current["greeting"], str)
                                  or not current["greeting"].strip()):
        errors.append("current_config.greeting is not a sentence")
    voice = current.get("voice", {})
    if not isinstance(voice, dict):
        errors.append("current_config.voice is not an object")
    else:
        for field in ("name", "language"):
            if field in voice and (not isinstance(voice[field], str)
                                   or not re.fullmatch(r"[A-Za-z0-9._-]{1,60}", voice[field])):
                errors.append(f"current_config.voice.{field} {voice[field]!r} is not a voice "
                              f"{'name (Polly.Joanna)' if field == 'name' else 'language (en-US)'}")
    errors += check_mail_settings(current.get("mail_settings"))
    errors += check_escalation(current.get("escalation", {}), users)
    if "rotation" in current:
        errors += check_rotation(current["rotation"], users)
    if "timezone" in current and zone_problem(current["timezone"]):
        errors.append(f"current_config.timezone {current['timezone']!r} "
                      f"{zone_problem(current['timezone'])}")
    errors += check_overrides(current.get("overrides", []), users)
    handoff = current.get("rotation_handoff", {})
    if not isinstance(handoff, dict) or not hours_value(handoff.get("shift_start", 0), zero=True):
        errors.append("current_config.rotation_handoff is not the pager's record of a handoff")
    changed = current.get("oncall_change", {})
    if not isinstance(changed, dict) or not isinstance(changed.get("time", 0), (int, float)) \
            or not isinstance(changed.get("by", ""), str):
        errors.append("current_config.oncall_change is not the pager's record of an on-call "
                      "change")
    errors += check_integrations(current.get("integrations", {}))
    errors += check_heartbeats(current.get("heartbeats", {}))
    if "quiet" in current:
        errors += check_quiet(current["quiet"])
    errors += check_feed_tokens(current.get("feed_tokens", {}))
    errors += check_push(users)
    errors += check_webhooks(current.get("webhooks", []))
    return errors, warnings


def check_live_answer(live: object) -> list[str]:
    where = "current_config.live_answer"
    if not isinstance(live, dict):
        return [f"{where} is not an object"]
    errors = []
    for field in ("enabled", "record"):
        if not isinstance(live.get(field, False), bool):
            errors.append(f"{where}.{field} {live.get(field)!r} is not true or false")
    for field, low, high in (("ring_seconds", 5, 120), ("max_targets", 1, 10)):
        value = live.get(field, low)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            errors.append(f"{where}.{field} {value!r} is not a whole number from {low} "
                          f"to {high}")
    return errors


def check_rotation(rotation: object, users: dict) -> list[str]:
    where = "current_config.rotation"
    if not isinstance(rotation, dict):
        return [f"{where} is not an object"]
    errors = []
    ids = rotation.get("members")
    if not isinstance(ids, list) or not ids:
        errors.append(f"{where}.members is not a list of member ids")
    else:
        for i, member_id in enumerate(ids):
            if not isinstance(member_id, str) or member_id not in users:
                errors.append(f"{where}.members[{i}] {member_id!r} is not an available user")
    zone = rotation.get("timezone")
    problem = zone_problem(zone)
    if problem:
        errors.append(f"{where}.timezone {zone!r} {problem}")
    start = rotation.get("start")
    try:
        naive = dt.datetime.fromisoformat(start) if isinstance(start, str) else None
    except ValueError:
        naive = None
    if naive is None or naive.tzinfo is not None or not 1970 <= naive.year < 2200:
        errors.append(f"{where}.start {start!r} is not a local time without offset "
                      "(2026-11-30T09:00, from the year 1970 to 2199)")
    shift = rotation.get("shift_hours")
    if not hours_value(shift) or not 1 <= shift * 3600 <= MAX_SHIFT_HOURS * 3600:
        errors.append(f"{where}.shift_hours {shift!r} is not a number of hours "
                      f"(at least one second, 1/3600, at most a year, {MAX_SHIFT_HOURS})")
    remind = rotation.get("remind_hours", 0)
    if not hours_value(remind, zero=True) or (hours_value(shift) and remind >= shift):
        errors.append(f"{where}.remind_hours {remind!r} is not a number of hours from 0 "
                      "to less than shift_hours")
    return errors


MAX_SHIFT_HOURS = 366 * 24


def check_overrides(block: object, users: dict) -> list[str]:
    """`current_config.overrides`: [{"member", "start", "end", "by"}, ...], times ISO 8601
    with an offset (the pager writes UTC), at most 14 days each; `covering` (who was on
    call when it began, for the hand-back when there is no rotation) is the pager's."""
    where = "current_config.overrides"
    if not isinstance(block, list) or len(block) > MAX_OVERRIDES:
        return [f"{where} is not a list of at most {MAX_OVERRIDES} overrides"]
    errors = []
    for i, override in enumerate(block):
        at = f"{where}[{i}]"
        if not isinstance(override, dict):
            errors.append(f"{at} is not an object")
            continue
        for field in ("member", "covering"):
            value = override.get(field, "" if field == "covering" else None)
            if value != "" or field == "member":
                if not isinstance(value, str) or value not in users:
                    errors.append(f"{at}.{field} {value!r} is not an available user")
        if not isinstance(override.get("by", ""), str):
            errors.append(f"{at}.by is not a string")
        times = []
        for field in ("start", "end"):
            value = override.get(field)
            try:
                moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
            except ValueError:
                moment = None
            if moment is None or moment.tzinfo is None or not 1970 <= moment.year < 2200:
                errors.append(f"{at}.{field} {value!r} is not a time with its offset "
                              "(2026-12-11T08:00:00Z)")
            else:
                times.append(moment.timestamp())
        if len(times) == 2 and not 0 < times[1] - times[0] <= MAX_OVERRIDE:
            errors.append(f"{at}.end is not after its start, within 14 days")
    return errors


def hours_value(value: object, zero: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and (value > 0 or zero and value == 0))


def zone_problem(name: object) -> str:
    """Why `name` is no time zone here, or "" (an IANA name this system's database knows)."""
    if isinstance(name, str) and name:
        try:
            zoneinfo.ZoneInfo(name)
            return ""
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            if not zoneinfo.available_timezones():
                return ("cannot be looked up: this system has no time zone database "
                        "(install the tzdata package: apt install tzdata, or pip install "
                        "tzdata into the pager's virtualenv)")
    return "is not an IANA time zone name (Europe/Berlin, America/New_York, UTC)"


LIVE_DEFAULTS = {"enabled": False, "ring_seconds": 20, "max_targets": 3, "record": False}


def live_settings(doc: dict | None) -> dict:
    """`current_config.live_answer` with its defaults (absent: live answer is off)."""
    return {**LIVE_DEFAULTS, **(doc or {}).get("current_config", {}).get("live_answer", {})}


def positive_number(value: object) -> bool:
    if isinstance(value, str) and value.isdecimal() and value.isascii():
        value = int(value)
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_mail_settings(mail: object) -> list[str]:
    where = "current_config.mail_settings"
    if not isinstance(mail, dict):
        return [f"{where} is missing or not an object"]
    errors = []
    for field in ("from_email", "to_email"):
        if not isinstance(mail.get(field), str) or not EMAIL.fullmatch(mail[field]):
            errors.append(f"{where}.{field} {mail.get(field)!r} is not an e-mail address")
    if not isinstance(mail.get("mail_server"), str) or not mail["mail_server"].strip():
        errors.append(f"{where}.mail_server is missing or empty")
    port = mail.get("mail_port")
    if not positive_number(port) or not 0 < int(port) < 65536:
        errors.append(f"{where}.mail_port {port!r} is not a port number")
    if not isinstance(mail.get("mail_use_tls", False), bool):
        errors.append(f"{where}.mail_use_tls {mail.get('mail_use_tls')!r} is not true or false")
    for field in ("mail_username", "mail_password"):
        if mail.get(field) is not None and not isinstance(mail[field], str):
            errors.append(f"{where}.{field} is not a string")
    return errors


def check_escalation(escalation: object, users: dict) -> list[str]:
    where = "current_config.escalation"
    if not isinstance(escalation, dict):
        return [f"{where} is not an object"]
    errors = []
    for field in ("ack_timeout", "call_attempts", "max_outbound_per_hour",
                  "alert_pages_per_hour"):
        if field not in escalation:
            continue
        value = escalation[field]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        if field == "ack_timeout":
            ok = ok and value > 0
        else:
            ok = ok and value >= 0 and value == int(value)
        if not ok:
            errors.append(f"{where}.{field} {value!r} is not a valid number")
    escalate_to = escalation.get("escalate_to")
    if escalate_to is not None:
        if not isinstance(escalate_to, list):
            errors.append(f"{where}.escalate_to is not a list of member ids")
        else:
            for i, member_id in enumerate(escalate_to):
                if not isinstance(member_id, str) or member_id not in users:
                    errors.append(f"{where}.escalate_to[{i}] {member_id!r} "
                                  "is not an available user")
    return errors


# Names of integrations and heartbeats: they appear in URLs, audit entries and texts.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def named_objects(block: object, where: str) -> tuple[list[str], dict[str, dict]]:
    """A block of named objects (integrations, heartbeats): what is wrong with its shape,
    and the objects whose fields are to be checked."""
    if not isinstance(block, dict):
        return [f"{where} is not an object"], {}
    errors, found = [], {}
    for name, item in block.items():
        if not NAME.fullmatch(name):
            errors.append(f"{where}.{name!r} is not a name (letters, digits, . _ -; "
                          "at most 64)")
        elif not isinstance(item, dict):
            errors.append(f"{where}.{name} is not an object")
        else:
            found[name] = item
    return errors, found


def check_integrations(integrations: object) -> list[str]:
    """`current_config.integrations`: name -> {key_sha256, created, heartbeats_only}; only
    the hash of a routing key is ever stored (see `oncall-pager integration add`). A
    heartbeats-only key (the one a cron line carries) can ping and cannot page."""
    where = "current_config.integrations"
    errors, found = named_objects(integrations, where)
    for name, integration in found.items():
        if not isinstance(integration.get("key_sha256"), str) or \
                not SHA256_HEX.fullmatch(integration["key_sha256"]):
            errors.append(f"{where}.{name}.key_sha256 is not a SHA-256 in hex")
        elif "created" in integration and not positive_number(integration["created"]):
            errors.append(f"{where}.{name}.created is not a time (epoch seconds)")
        elif not isinstance(integration.get("heartbeats_only", False), bool):
            errors.append(f"{where}.{name}.heartbeats_only is not true or false")
    return errors


def check_feed_tokens(tokens: object) -> list[str]:
    """`current_config.feed_tokens`: calendar / status -> {sha256, created}: the hash of the
    token in the URL of the calendar feed and of the status page, never the token."""
    where = "current_config.feed_tokens"
    if not isinstance(tokens, dict):
        return [f"{where} is not an object"]
    errors = []
    for name, token in tokens.items():
        if name not in FEEDS:
            errors.append(f"{where}.{name} is not one of {', '.join(FEEDS)}")
        elif not isinstance(token, dict) or not isinstance(token.get("sha256"), str) or \
                not SHA256_HEX.fullmatch(token["sha256"]):
            errors.append(f"{where}.{name}.sha256 is not a SHA-256 in hex")
    return errors


FEEDS = ("calendar", "status")  # the read-only views a token in their URL opens


def check_heartbeats(heartbeats: object) -> list[str]:
    """`current_config.heartbeats`: name -> {interval, grace} in seconds."""
    where = "current_config.heartbeats"
    errors, found = named_objects(heartbeats, where)
    for name, heartbeat in found.items():
        interval = heartbeat.get("interval")
        if not positive_number(interval) or isinstance(interval, str):
            errors.append(f"{where}.{name}.interval {interval!r} is not a positive number "
                          "of seconds")
        grace = heartbeat.get("grace", 0)
        if grace != 0 and (not positive_number(grace) or isinstance(grace, str)):
            errors.append(f"{where}.{name}.grace {grace!r} is not a number of seconds")
    return errors


# Quiet hours for monitoring (SPEC 21): at most this long, and the reason's length (a line).
QUIET_MAX = 8 * 3600
QUIET_REASON_MAX = 100


def utc_seconds(text: object) -> float | None:
    """An ISO 8601 time with its offset (`2026-11-26T23:05:55.123Z`, as iso_time writes
    it) as epoch seconds; None for anything else (a time without an offset says nothing)."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def check_quiet(quiet: object) -> list[str]:
    """`current_config.quiet`: {since, until, reason, by}, written by QUIET and `oncall-pager
    quiet` (a window of at most 8 hours), removed when it ends."""
    where = "current_config.quiet"
    if not isinstance(quiet, dict):
        return [f"{where} is not an object"]
    errors = []
    since, until = utc_seconds(quiet.get("since")), utc_seconds(quiet.get("until"))
    for field, value in (("since", since), ("until", until)):
        if value is None:
            errors.append(f"{where}.{field} {quiet.get(field)!r} is not a UTC time "
                          "(2026-12-06T18:00:00Z)")
    if since is not None and until is not None and not 0 < until - since < QUIET_MAX + 1:
        errors.append(f"{where}.until {quiet['until']!r} is not within 8 hours after since")
    for field in ("reason", "by"):
        value = quiet.get(field, "")
        if not isinstance(value, str) or len(value) > QUIET_REASON_MAX or \
                value != clean_text(value):
            errors.append(f"{where}.{field} is not one line of at most {QUIET_REASON_MAX} "
                          "characters")
    return errors


# Push (ntfy) and chat webhooks (SPEC 22): where the pager POSTs to, from the operational config
# only. The events a webhook may follow, and the formats it may speak.
WEBHOOK_EVENTS = ("page.opened", "page.acknowledged", "page.resolved", "page.escalated",
                  "oncall.changed")
WEBHOOK_FORMATS = ("json", "slack")
WEBHOOK_SECRET = re.compile(r"[0-9a-f]{64}")


def outbound_url_problem(url: object) -> str:
    """Why the pager must not POST to `url` (a member's push URL, a webhook's), or "":
    https:// to a named host, or http:// to a loopback address only (tests, a local ntfy); no
    credentials in it (they would travel in logs and listings), nothing that is not text."""
    if not isinstance(url, str) or not url:
        return "is not a URL"
    if len(url) > 2048 or not url.isascii() or not url.isprintable() or " " in url:
        return "is not a URL (at most 2,048 printable ASCII characters, no spaces)"
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 -- a bad port raises here
    except ValueError:
        return "is not a URL"
    if parts.username is not None or parts.password is not None:
        return "carries credentials (user:password@); put a token in the path instead"
    if parts.scheme == "https" and host:
        return ""
    if parts.scheme == "http" and host:
        with contextlib.suppress(ValueError):
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return ""
    return "must be https:// (or http:// to a loopback address, for a local receiver)"


def check_push(users: dict) -> list[str]:
    """`available_users.users.<id>.push`: an ntfy-style topic URL (optional)."""
    errors = []
    for key, member in users.items():
        if isinstance(member, dict) and "push" in member:
            problem = outbound_url_problem(member["push"])
            if problem:
                errors.append(f"available_users.users.{key}.push {member['push']!r} {problem}")
    return errors


def check_webhooks(hooks: object) -> list[str]:
    """`current_config.webhooks`: a list of {name, url, events, format, secret}; the secret
    (64 hex digits, made by `oncall-pager webhook add`) signs every body it sends."""
    where = "current_config.webhooks"
    if not isinstance(hooks, list):
        return [f"{where} is not a list"]
    errors: list[str] = []
    names: set[str] = set()
    for i, hook in enumerate(hooks):
        at = f"{where}[{i}]"
        if not isinstance(hook, dict):
            errors.append(f"{at} is not an object")
            continue
        name = hook.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            errors.append(f"{at}.name {name!r} is not a name (letters, digits, . _ -; at "
                          "most 64)")
        elif name in names:
            errors.append(f"{at}.name {name!r} is used twice")
        else:
            names.add(name)
        problem = outbound_url_problem(hook.get("url"))
        if problem:
            errors.append(f"{at}.url {hook.get('url')!r} {problem}")
        events = hook.get("events")
        if not isinstance(events, list) or not events or any(
                e not in WEBHOOK_EVENTS for e in events):
            errors.append(f"{at}.events {events!r} is not a list of events from: "
                          f"{', '.join(WEBHOOK_EVENTS)}")
        if hook.get("format", "json") not in WEBHOOK_FORMATS:
            errors.append(f"{at}.format {hook.get('format')!r} is not json or slack")
        if not isinstance(hook.get("secret"), str) or \
                not WEBHOOK_SECRET.fullmatch(hook["secret"]):
            errors.append(f"{at}.secret is not 64 hex digits (oncall-pager webhook add makes "
                          "one)")
    return errors


def webhooks(doc: dict | None) -> list[dict]:
    hooks = (doc or {}).get("current_config", {}).get("webhooks", [])
    return hooks if isinstance(hooks, list) else []


def parse_oncall_config(data: bytes) -> dict:
    """Bytes from the store to a validated document, or ConfigError with field paths."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"the operational config is not valid JSON: {e}"]) from None
    errors, _ = check_oncall_config(doc)
    if errors:
        raise ConfigError(errors)
    return doc


# Reading the operational config: pure functions over the validated document.


def members(doc: dict) -> dict[str, dict]:
    return doc["available_users"]["users"]


def member_by_phone(doc: dict, phone: str) -> dict | None:
    for member in members(doc).values():
        if member.get("phone") == phone:
            return member
    return None


def oncall_member(doc: dict) -> dict:
    """Who is on call: decided by oncall_user.id; the member's own record wins over the copy."""
    return members(doc)[doc["current_config"]["oncall_user"]["id"]]


def oncall_id_of(doc: object) -> str | None:
    """Who a document says is on call, even when it is not a valid config (an edit that
    repairs a broken config still audits the change of who is on call)."""
    current = doc.get("current_config") if isinstance(doc, dict) else None
    oncall = current.get("oncall_user") if isinstance(current, dict) else None
    return oncall.get("id") if isinstance(oncall, dict) else None


def session_lifetime(doc: dict) -> int:
    return int(doc["current_config"].get("session_lifetime", 300))


def team_name(doc: dict) -> str:
    return doc["current_config"].get("team_name") or ""


def integrations(doc: dict) -> dict[str, dict]:
    return doc["current_config"].get("integrations", {})


def heartbeats(doc: dict) -> dict[str, dict]:
    return doc["current_config"].get("heartbeats", {})


def quiet_window(doc: dict) -> dict | None:
    """The quiet hours block (`current_config.quiet`) while it is in the config: from QUIET
    until its end is written (by the worker at `until`, or by QUIET OFF)."""
    return doc["current_config"].get("quiet")


def quiet_until(doc: dict, now: float) -> float | None:
    """When the quiet hours in force at `now` end; None when alerts ring as usual."""
    window = quiet_window(doc)
    until = utc_seconds(window.get("until")) if window else None
    return until if until is not None and until > now else None


def heartbeats_only(doc: dict, integration: str) -> bool:
    """Whether an integration's key may only ping heartbeats (`integration add NAME
    --heartbeats-only`): a key copied into crontabs must not be able to page anybody."""
    return integrations(doc).get(integration, {}).get("heartbeats_only", False) is True


def integration_of(doc: dict, routing_key: str) -> str | None:
    """The integration a routing key belongs to, or None. The key's SHA-256 is compared with
    every integration's, each in constant time, so timing tells nothing about a near miss."""
    digest = hashlib.sha256(routing_key.encode("utf-8", "replace")).hexdigest()
    found = None
    for name, integration in sorted(integrations(doc).items()):
        if hmac.compare_digest(digest, integration["key_sha256"]):
            found = name
    return found


def escalation_settings(doc: dict, oncall_id: str = "") -> dict:
    """The escalation block with defaults filled in; escalate_to defaults to every other member
    (other than `oncall_id`, the engineer a page was sent to; by default who is on call)."""
    settings = dict(ESCALATION_DEFAULTS)
    settings.update(doc["current_config"].get("escalation", {}))
    if settings["escalate_to"] is None:
        oncall_id = oncall_id or oncall_member(doc)["id"]
        settings["escalate_to"] = [m for m in sorted(members(doc)) if m != oncall_id]
    return settings


@dataclasses.dataclass(frozen=True)
class Rotation:
    """`current_config.rotation`, in time. Shift k starts at `start` + k x `shift_hours`,
    counted on the wall clock of the zone (so a shift of whole days hands over at the same
    local time across daylight-saving changes), and belongs to members[k mod len]. k < 0:
    before the first shift."""

    members: tuple[str, ...]
    zone: zoneinfo.ZoneInfo
    start: dt.datetime  # local, without offset
    shift: dt.timedelta
    remind: dt.timedelta

    @classmethod
    def of(cls, doc: dict) -> Rotation | None:
        block = doc["current_config"].get("rotation")
        if not block:
            return None
        return cls(tuple(block["members"]), zoneinfo.ZoneInfo(block["timezone"]),
                   dt.datetime.fromisoformat(block["start"]),
                   dt.timedelta(hours=block["shift_hours"]),
                   dt.timedelta(hours=block.get("remind_hours", 0)))

    def starts(self, k: int) -> float:
        """When shift k starts (epoch seconds). A local time that a change to summer time
        skips counts as an hour later, as cron counts it."""
        return (self.start + k * self.shift).replace(tzinfo=self.zone).timestamp()

    def shift_at(self, ts: float) -> int:
        """The shift running at `ts`. The wall-clock estimate is off by at most the
        daylight-saving change around one; the steps mend that."""
        local = dt.datetime.fromtimestamp(ts, self.zone).replace(tzinfo=None)
        k = math.floor((local - self.start) / self.shift)
        while self.starts(k + 1) <= ts:
            k += 1
        while self.starts(k) > ts:
            k -= 1
        return k

    def member(self, k: int) -> str:
        return self.members[k % len(self.members)]

    def local_text(self, ts: float) -> str:
        """`Mon 2026-12-07 09:00 CET` (seconds only where a shift starts at them)."""
        moment = dt.datetime.fromtimestamp(ts, self.zone)
        return moment.strftime("%a %Y-%m-%d %H:%M" + (":%S" if moment.second else "") + " %Z")


def reminder_name(start: float) -> str:
    """The reminder's job name (jobs/msg-<name>.json): its shift's start, UTC."""
    return f"remind-{sortable_stamp(start)}"


def reminder_ahead(key: str) -> bool:
    """Whether a message job is the reminder of a shift that has not started: kept, so that
    its key still refuses a second reminder however early it was sent."""
    stamp = key.removeprefix("jobs/msg-remind-").removesuffix(".json")
    with contextlib.suppress(ValueError):
        return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(
            tzinfo=dt.UTC).timestamp() > time.time()
    return False


def handed_over(doc: dict) -> float:
    """The start of the last shift whose handoff was made (the pager's own record)."""
    return doc["current_config"].get("rotation_handoff", {}).get("shift_start", -math.inf)


def handoff_due(doc: dict, now: float) -> Shift | None:
    """The shift whose handoff `doc` makes due at `now`: a shift (the rotation's, an
    override, or the hand-back after one: see oncall_shifts) has started and its handoff is
    not made, or was made to somebody else (the rotation or the overrides were changed
    since, so the shift running is now another member's). None when none is due.
    The one rule for everyone who acts on a handoff (the worker, a config change by the
    command line, WHO), so that WHO never contradicts `schedule`."""
    if not doc["current_config"].get("rotation") and not overrides(doc):
        return None
    shift = shift_at(doc, now)
    if shift is None:
        return None
    made = doc["current_config"].get("rotation_handoff", {})
    made_to = made.get("member")
    if handed_over(doc) < shift.start or (isinstance(made_to, str) and made_to != shift.member):
        return shift
    return None


def oncall_change(doc: dict) -> tuple[float, str] | None:
    """When on-call last changed and who changed it (a member id, `rotation`, or the
    operator of a command-line change): the pager's record (`oncall_change`, written with
    every change of who is on call), or, in a config written before it kept one, the last
    write of the config (the predecessor's `last_modified_*`). None when neither is there."""
    current = doc["current_config"]
    changed = current.get("oncall_change")
    if changed and changed.get("time"):
        return changed["time"], str(changed.get("by", ""))
    if current.get("last_modified_time"):
        return current["last_modified_time"], str(current.get("last_modified_user_id"))
    return None

# Overrides (SPEC 21): somebody on call instead for a while, by `TAKE 4h` or planned ahead.
MAX_OVERRIDE = 14 * DAY
MAX_OVERRIDES = 100
OVERRIDES_KEPT = 35 * DAY  # an override ended longer ago is dropped at the next change


class Shift(NamedTuple):
    """Who is on call from `start` to `end` (epoch seconds; `end` is math.inf for the
    hand-back after an override when there is no rotation: until somebody TAKEs).
    `covering`: the member whose time an override takes ("" for a rotation's own shift, or
    an override planned without a rotation that has not started: covering whoever is on
    call then). `override`: its index in current_config.overrides, or None."""

    member: str
    start: float
    end: float
    covering: str = ""
    override: int | None = None


def override_stamp(ts: float) -> str:
    """`2026-12-11T08:00:00Z`: an override's times, whole seconds, UTC."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def override_times(override: dict) -> tuple[float, float]:
    return (dt.datetime.fromisoformat(override["start"]).timestamp(),
            dt.datetime.fromisoformat(override["end"]).timestamp())


def overrides(doc: dict) -> list[dict]:
    return doc["current_config"].get("overrides", [])


def team_zone(doc: dict) -> zoneinfo.ZoneInfo:
    """The team's time zone: `rotation.timezone`, else `current_config.timezone`, else UTC."""
    current = doc["current_config"]
    name = (current.get("rotation") or {}).get("timezone") or current.get("timezone") or "UTC"
    return zoneinfo.ZoneInfo(name)


def local_text(zone: zoneinfo.ZoneInfo, ts: float) -> str:
    """`Mon 2026-12-07 09:00 CET` (seconds only where they are not 0), as Rotation's."""
    moment = dt.datetime.fromtimestamp(ts, zone)
    return moment.strftime("%a %Y-%m-%d %H:%M" + (":%S" if moment.second else "") + " %Z")


def oncall_shifts(doc: dict, start: float, end: float, limit: int = 10_000) -> list[Shift]:
    """Who is on call from `start` to `end`, in time order: the rotation's shifts with the
    overrides laid over them (a later one in the list over an earlier one), each with its
    whole extent (the first may start before `start`). A shift an override cuts goes on
    from the override's end (that is the hand-back). Without a rotation only overrides and
    their hand-backs (to whom each covered) are known; before either, nobody is scheduled
    (on-call is whatever TAKE made it). At most `limit` rotation shifts are looked at.
    This is the one function that says who the schedule names: handoffs (handoff_due),
    NEXT, WHO, `schedule` and the calendar feed all read it."""
    rotation = Rotation.of(doc)
    laid = [(i, o, *override_times(o)) for i, o in enumerate(overrides(doc))]
    base: list[Shift] = []
    if rotation is not None:
        first = max(rotation.shift_at(start), 0)
        last = min(rotation.shift_at(end), first + limit - 1)
        base = [Shift(rotation.member(k), rotation.starts(k), rotation.starts(k + 1))
                for k in range(first, last + 1)]
    else:
        covering = coverings(laid, oncall_member(doc)["id"])
        ends = sorted((o_end, covering[i]) for i, _, _, o_end in laid)
        base = [Shift(member, at, ends[n + 1][0] if n + 1 < len(ends) else math.inf)
                for n, (at, member) in enumerate(ends)]
    shifts = base
    for i, override, o_start, o_end in laid:
        if o_start > end or o_end <= o_start:
            continue
        under = next((s.member for s in shifts if s.start <= o_start < s.end), "")
        kept: list[Shift] = []
        for shift in shifts:
            if shift.end <= o_start or shift.start >= o_end:
                kept.append(shift)
                continue
            if shift.start < o_start:
                kept.append(shift._replace(end=o_start))
            if shift.end > o_end:
                kept.append(shift._replace(start=o_end))
        kept.append(Shift(override["member"], o_start, o_end,
                          override.get("covering") or under, i))
        shifts = sorted(kept, key=lambda s: s.start)
    return [s for s in shifts if s.end > start and s.start <= end and s.start < s.end]


def coverings(laid: list[tuple[int, dict, float, float]], oncall: str) -> dict[int, str]:
    """Without a rotation: whom each override covers (and hands back to). Recorded when it
    starts; for one still planned, whoever will be on call just before it by the others
    (an override running then, else the hand-back of the last one ended), else `oncall`."""
    covering: dict[int, str] = {}
    for i, override, start, _ in sorted(laid, key=lambda item: item[2]):
        if override.get("covering"):
            covering[i] = override["covering"]
            continue
        running = [j for j, _, s, e in laid if j in covering and s <= start < e]
        ended = sorted((e, j) for j, _, _, e in laid if j in covering and e <= start)
        covering[i] = (laid[max(running)][1]["member"] if running else
                       covering[ended[-1][1]] if ended else oncall)
    return covering


def shift_at(doc: dict, ts: float) -> Shift | None:
    """The shift running at `ts` (rotation or override), or None when nobody is scheduled."""
    return next((s for s in oncall_shifts(doc, ts, ts) if s.start <= ts < s.end), None)


def next_shifts(doc: dict, now: float, n: int) -> list[Shift]:
    """The shift running now (if any) and the next ones, `n` in all."""
    rotation = Rotation.of(doc)
    ends = [override_times(o)[1] for o in overrides(doc)]
    horizon = max([now + 1, *ends])
    if rotation is not None:
        horizon = max(horizon, rotation.starts(max(rotation.shift_at(now), 0) + n))
    return oncall_shifts(doc, now, horizon, limit=n + 1)[:n]


def override_text(doc: dict, shift: Shift, zone: zoneinfo.ZoneInfo, named: bool = True
                  ) -> str:
    """`Carol until Fri 09:00 CET, covering Bob` (the date too when it is a week or more
    away); `named=False`: `override until ...`."""
    names = members(doc)
    until = dt.datetime.fromtimestamp(shift.end, zone)
    soon = shift.end - time.time() < 6 * DAY
    text = (f"{first_name(names[shift.member])} until " if named else "override until ") + \
        until.strftime("%a %H:%M %Z" if soon else "%a %Y-%m-%d %H:%M %Z")
    if shift.covering and shift.covering != shift.member:
        text += f", covering {first_name(names[shift.covering])}"
    return text


TAKE_USAGE = ("send TAKE 4h, TAKE 30m, TAKE UNTIL 18:00 or TAKE UNTIL FRI 09:00 (the team's "
              "time, at most 14 days)")
DAY_NAMES = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")
SPAN_UNITS = {"M": 60, "MIN": 60, "H": 3600, "D": DAY}


def take_until(args: list[str], now: float, zone: zoneinfo.ZoneInfo) -> float:
    """When a `TAKE 4h` / `TAKE 30m` / `TAKE UNTIL 18:00` / `TAKE UNTIL FRI 09:00` ends
    (epoch seconds, whole): a time of day is the next such time on the team's wall clock
    (an hour a change to summer time skips counts as an hour later, as for shifts).
    ValueError with the reply when the words are no such time, or more than 14 days away."""
    words = [w.upper() for w in args]
    bad = ValueError(f"Cannot read TAKE {' '.join(args)[:40]}: {TAKE_USAGE}.")
    start = math.floor(now)
    span = re.fullmatch(r"(\d{1,5})(M|MIN|H|D)", words[0]) if len(words) == 1 else None
    if span and int(span[1]) > 0:
        end = start + int(span[1]) * SPAN_UNITS[span[2]]
    elif words[0] == "UNTIL" and len(words) in (2, 3):
        clock = re.fullmatch(r"(\d{1,2})[:.]?(\d{2})", words[-1])
        day = words[1] if len(words) == 3 else ""
        weekday = next((i for i, name in enumerate(DAY_NAMES)
                        if len(day) >= 3 and name.startswith(day)), None)
        if clock is None or int(clock[1]) > 23 or int(clock[2]) > 59 or (
                day and weekday is None):
            raise bad
        today = dt.datetime.fromtimestamp(now, zone).date()
        end = math.inf
        for ahead in range(8):
            date = today + dt.timedelta(days=ahead)
            if weekday is not None and date.weekday() != weekday:
                continue
            moment = dt.datetime.combine(date, dt.time(int(clock[1]), int(clock[2])))
            at = moment.replace(tzinfo=zone).timestamp()
            if at > now:
                end = at
                break
    else:
        raise bad
    if end - start > MAX_OVERRIDE:
        raise ValueError(f"TAKE for at most 14 days: {' '.join(args)[:40]} is "
                         f"{duration_text(end - start)}. Nothing changes.")
    return end


def next_change(doc: dict, now: float) -> float | None:
    """When the schedule next names somebody new (a shift starts or an override begins or
    ends), or None."""
    later = [s.start for s in next_shifts(doc, now, 2 + len(overrides(doc))) if s.start > now]
    return min(later) if later else None



# --- the schedule as stretches of time: the calendar feed, the status page --------------------


def next_handoffs(doc: dict, now: float, count: int) -> list[Shift]:
    """The next `count` stretches that hand on-call to somebody else after `now`."""
    rotation = Rotation.of(doc)
    ends = [override_times(o)[1] for o in overrides(doc)]
    horizon = max([now + 1, *ends])
    if rotation is not None:
        horizon = max(horizon, rotation.starts(max(rotation.shift_at(now), 0) + count + 1))
    found: list[Shift] = []
    current = None
    for shift in oncall_shifts(doc, now, horizon, limit=count + 2):
        if shift.start > now and shift.member != current:
            found.append(shift)
        current = shift.member
    return found[:count]


def feed_token(doc: dict, name: str, token: str) -> bool:
    """Whether `token` is the one `oncall-pager calendar-token` / `status-token` made: its
    SHA-256 is compared with the stored one in constant time (the store keeps only the hash,
    as for routing keys). Always compared, even without a stored one."""
    stored = doc["current_config"].get("feed_tokens", {}).get(name, {}).get("sha256")
    digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
    known = isinstance(stored, str)
    return hmac.compare_digest(digest, stored if known else "-" * 64) and known


def ical_text(value: str) -> str:
    """An iCalendar TEXT value (RFC 5545 3.3.11): backslash, semicolon and comma escaped, a
    line break as \\n, other control characters as spaces, so that a name cannot add a line
    or a property to the feed."""
    value = value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
    value = re.sub(r"\r\n|\r|\n", r"\\n", value)
    return CONTROL_CHARACTERS.sub(" ", value)


def ical_fold(line: str) -> str:
    """A content line folded at 75 octets (RFC 5545 3.1): CRLF and a space before each
    further piece, never inside a UTF-8 sequence."""
    pieces, piece, size = [], "", 0
    for char in line:
        octets = len(char.encode("utf-8"))
        if size + octets > 75:
            pieces.append(piece)
            piece, size = " ", 1
        piece += char
        size += octets
    pieces.append(piece)
    return "\r\n".join(pieces)


def ical_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%dT%H%M%SZ")


CALENDAR_PAST, CALENDAR_AHEAD = 30 * DAY, 180 * DAY
CALENDAR_SHIFTS = 2000  # rotation shifts a feed holds at most (tests use seconds-long shifts)


def calendar_feed(doc: dict, now: float, domain: str) -> str:
    """The iCalendar feed (RFC 5545) of `GET /calendar/TOKEN.ics`: one VEVENT per stretch of
    on-call from 30 days ago to 180 days ahead (oncall_shifts), in UTC, transparent (a shift
    does not make the day busy). A UID is the stretch's start and the pager's host, so a
    calendar app that fetches the feed again updates an event rather than adding a second; when the
    stretch's end or member changes, its SEQUENCE (the stored config's last change) goes up.
    With no rotation, one event for whoever is on call, from when on-call last changed to the
    first override, else to the end of the feed's span (an empty feed would read "nobody")."""
    users = members(doc)
    team = team_name(doc) or "on-call"
    sequence = int(doc["current_config"].get("last_modified_time") or 0) % 2 ** 31
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//oncall-pager//calendar " + VERSION
             + "//EN", "CALSCALE:GREGORIAN", "METHOD:PUBLISH",
             "X-WR-CALNAME:" + ical_text(f"On call: {team}"),
             "REFRESH-INTERVAL;VALUE=DURATION:PT1H", "X-PUBLISHED-TTL:PT1H"]
    since, until = now - CALENDAR_PAST, now + CALENDAR_AHEAD
    stretches = [(shift, ical_time(shift.start)) for shift in
                 oncall_shifts(doc, since, until, limit=CALENDAR_SHIFTS)]
    if Rotation.of(doc) is None:  # before the overrides: whoever is on call, since when
        oncall = oncall_member(doc)["id"]
        # the pager's record of the change (not last_modified_time, which every write moves:
        # the UID would change with it); a config without one: since the feed's start
        changed = doc["current_config"].get("oncall_change", {}).get("time")
        begin = min(changed, now) if changed else since
        first = stretches[0][0].start if stretches else until
        if begin < first:
            stretches.insert(0, (Shift(oncall, begin, first),
                                 ical_time(begin) if changed else f"{oncall}-on-call"))
    for shift, uid in stretches:
        member = users[shift.member]
        summary = f"On call: {member['name']}"
        if shift.covering:
            summary += f" (covering {users.get(shift.covering, {}).get('name', shift.covering)})"
        lines += ["BEGIN:VEVENT", f"UID:{uid}-oncall@{domain}",
                  f"DTSTAMP:{ical_time(now)}", f"DTSTART:{ical_time(shift.start)}",
                  f"DTEND:{ical_time(shift.end if shift.end < math.inf else until)}",
                  f"SEQUENCE:{sequence}",
                  "SUMMARY:" + ical_text(summary),
                  "DESCRIPTION:" + ical_text(f"{member['name']} ({member['id']}) is on call "
                                             f"for {team}."),
                  "TRANSP:TRANSPARENT", "END:VEVENT"]
    lines.append("END:VCALENDAR")
    return "".join(ical_fold(line) + "\r\n" for line in lines)


# ==============================================================================================
# Store: one small interface, a local directory and S3 behind it
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str


UNCHANGED = Blob(b"", "unchanged")  # what get(..., unless_etag=E) returns when the ETag is E


class Store:
    """What the rest of the module knows of storage: keys are relative paths like
    `pages/RE123.json`. `put` with `if_match` or `if_absent` is conditional and raises
    StoreConflict when it loses; every other failure to reach the store is StoreUnavailable.
    """

    def get(self, key: str, *, unless_etag: str | None = None) -> Blob | None:
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            if_absent: bool = False) -> str:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def versions(self, prefix: str) -> dict[str, tuple[str, float]]:
        """Every key under `prefix` with its ETag and when it last changed (epoch seconds), in
        one listing: a scan sees which objects changed without reading any of them."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad store key {key!r}")
    return key


def store_request(store: str, operation: str, request: Callable[[], Any]) -> Any:
    """One store request, counted for /metrics with its latency and outcome: ok, missing (a
    get that found nothing), unchanged (a 304), conflict (a conditional write lost) or error."""
    started = time.perf_counter()
    outcome = "error"
    try:
        answer = request()
        outcome = ("unchanged" if answer is UNCHANGED else
                   "missing" if answer is None and operation == "get" else "ok")
        return answer
    except StoreConflict:
        outcome = "conflict"
        raise
    finally:
        METRICS.count("oncall_store_requests_total", store=store, operation=operation,
                      outcome=outcome)
        METRICS.observe("oncall_store_request_seconds", time.perf_counter() - started,
                        operation=operation)


class DirectoryStore(Store):
    """A local directory. Writes go to a temp file that is renamed into place, so a reader never
    sees a partial object. Conditional writes hold an exclusive `flock` on `.lock`, so two
    processes (or threads) on one box cannot both win. The ETag is the content's SHA-256 (file
    metadata alone could repeat after a quick rewrite); `unless_etag` reads are answered from
    `stat` when the file has not been replaced since this process last hashed it.
    """

    def __init__(self, root: Path):
        self.root = root
        self._root = str(root)
        self._seen: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._seen_lock = threading.Lock()

    def describe(self) -> str:
        return f"file:{self.root}/"

    # The interface, each request counted (store_request); the work is done further down.
    def get(self, key: str, *, unless_etag: str | None = None) -> Blob | None:
        return store_request("file", "get", lambda: self._get(key, unless_etag))

    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            if_absent: bool = False) -> str:
        return store_request("file", "put", lambda: self._put(key, data, if_match, if_absent))

    def list(self, prefix: str) -> list[str]:
        return store_request("file", "list", lambda: self._list(prefix))

    def versions(self, prefix: str) -> dict[str, tuple[str, float]]:
        return store_request("file", "list", lambda: self._versions(prefix))

    def delete(self, key: str) -> None:
        store_request("file", "delete", lambda: self._delete(key))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _etag(self, key: str, st: os.stat_result, data: bytes) -> str:
        etag = hashlib.sha256(data).hexdigest()[:32]
        with self._seen_lock:
            self._seen[key] = (self._signature(st), etag)
        return etag

    def _get(self, key: str, unless_etag: str | None = None) -> Blob | None:
        path = os.path.join(self._root, check_key(key))  # a str: Path costs ~25 us a webhook
        try:
            if unless_etag is not None:
                st = os.stat(path)
                with self._seen_lock:
                    seen = self._seen.get(key)
                if seen == (self._signature(st), unless_etag):
                    return UNCHANGED
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"{path}: {e.strerror}") from None
        etag = self._etag(key, st, data)
        if etag == unless_etag:
            return UNCHANGED
        return Blob(data, etag)

    def _put(self, key: str, data: bytes, if_match: str | None, if_absent: bool) -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if if_match is None and not if_absent:
                return self._replace(key, path, data)
            with self._locked():
                current = self._get(key)
                if if_absent and current is not None:
                    raise StoreConflict(f"{key} exists already")
                if if_match is not None and (current is None or current.etag != if_match):
                    raise StoreConflict(f"{key} changed since it was read")
                return self._replace(key, path, data)
        except OSError as e:
            raise StoreUnavailable(f"{path}: {e.strerror}") from None

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _replace(self, key: str, path: Path, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self._etag(key, os.stat(path), data)

    def _list(self, prefix: str) -> list[str]:
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys = []
        try:
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if name.startswith("."):
                        continue
                    key = Path(dirpath, name).relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        keys.append(key)
        except OSError as e:
            raise StoreUnavailable(f"{folder}: {e.strerror}") from None
        return sorted(keys)

    def _versions(self, prefix: str) -> dict[str, tuple[str, float]]:
        """ETags from what this process hashed already; a file replaced since is read again."""
        found = {}
        for key in self._list(prefix):
            path = os.path.join(self._root, key)
            try:
                st = os.stat(path)
                with self._seen_lock:
                    seen = self._seen.get(key)
                if seen is None or seen[0] != self._signature(st):
                    with open(path, "rb") as f:
                        etag = self._etag(key, os.fstat(f.fileno()), f.read())
                else:
                    etag = seen[1]
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreUnavailable(f"{path}: {e.strerror}") from None
            found[key] = (etag, st.st_mtime)
        return found

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


# S3's operations as /metrics names them (the Store interface's words).
S3_OPERATIONS = {"get_object": "get", "put_object": "put", "list_objects_v2": "list",
                 "list_object_versions": "list", "delete_object": "delete"}


class S3Store(Store):
    """An S3 bucket (or an S3-compatible store through `endpoint_url`), all keys under
    `prefix/`. One boto3 client per process, shared by the threads (boto3 clients are
    thread-safe; building one costs about 17 ms). Conditional writes are S3's own
    `If-Match` / `If-None-Match: *` on PutObject; reads with `unless_etag` are conditional GETs.
    """

    def __init__(self, bucket: str, prefix: str, endpoint_url: str = "", region: str = "",
                 timeout: float = 10.0, pool: int = 16):
        import boto3
        import botocore.config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = botocore.config.Config(
            connect_timeout=min(timeout, 5.0), read_timeout=timeout,
            retries={"max_attempts": 2, "mode": "standard"}, max_pool_connections=pool)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _call(self, operation: str, **params: Any) -> Any:
        """One S3 call, counted (store_request); errors become StoreConflict, None (missing),
        UNCHANGED or StoreUnavailable, so callers never see a botocore exception."""
        return store_request("s3", S3_OPERATIONS[operation],
                             lambda: self._send(operation, **params))

    def _send(self, operation: str, **params: Any) -> Any:
        import botocore.exceptions

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **params)
        except botocore.exceptions.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code in ("304", "NotModified") or status == 304:
                return UNCHANGED
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                    409, 412):
                retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
                raise StoreConflict(f"{params.get('Key')}: {code}", retried) from None
            raise StoreUnavailable(f"S3 {operation}: {code or status}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise StoreUnavailable(f"S3 {operation}: {type(e).__name__}") from None

    def get(self, key: str, *, unless_etag: str | None = None) -> Blob | None:
        params: dict[str, Any] = {"Key": self.prefix + check_key(key)}
        if unless_etag is not None:
            params["IfNoneMatch"] = f'"{unless_etag}"'
        answer = self._call("get_object", **params)
        if answer is None or answer is UNCHANGED:
            return answer
        try:
            data = answer["Body"].read()
        except Exception as e:  # a connection dropped mid-body is still "unreachable"
            raise StoreUnavailable(f"S3 get_object body: {type(e).__name__}") from None
        return Blob(data, answer["ETag"].strip('"'))

    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            if_absent: bool = False) -> str:
        params: dict[str, Any] = {"Key": self.prefix + check_key(key), "Body": data}
        if if_match is not None:
            params["IfMatch"] = f'"{if_match}"'
        if if_absent:
            params["IfNoneMatch"] = "*"
        try:
            answer = self._call("put_object", **params)
        except StoreConflict as e:
            # botocore retries a PUT after a 5xx or a timeout; if the first try had landed,
            # the retry is refused by our own write: the same bytes in place mean it landed.
            found = self.get(key) if e.retried else None
            if found is not None and found.data == data:
                return found.etag
            raise
        if answer is None:  # S3 answers If-Match on a missing object with 404
            raise StoreConflict(f"{key} does not exist")
        return str(answer["ETag"]).strip('"')

    def list(self, prefix: str) -> list[str]:
        return sorted(self.versions(prefix))

    def versions(self, prefix: str) -> dict[str, tuple[str, float]]:
        """One LIST request per 1,000 keys; S3 lists each key's ETag and LastModified."""
        found = {}
        token = None
        while True:
            params: dict[str, Any] = {"Prefix": self.prefix + prefix}
            if token:
                params["ContinuationToken"] = token
            answer = self._call("list_objects_v2", **params) or {}
            for item in answer.get("Contents", []):
                found[item["Key"][len(self.prefix):]] = (
                    str(item["ETag"]).strip('"'), item["LastModified"].timestamp())
            token = answer.get("NextContinuationToken")
            if not token:
                return found

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=self.prefix + check_key(key))


# Pages the worker reads at once when a listing finds many changed, as the first one after a
# start does (Worker._list_pages): each S3 client keeps a connection for each of them.
LISTING_READERS = 16


def open_store(cfg: AppConfig) -> Store:
    if cfg.store_url.startswith("file:"):
        return DirectoryStore(resolve_path(cfg, cfg.store_url[len("file:"):]))
    bucket, _, prefix = cfg.store_url[len("s3://"):].partition("/")
    return S3Store(bucket, prefix, cfg.s3_endpoint_url, cfg.region, cfg.http_timeout,
                   pool=cfg.threads + cfg.worker_threads + LISTING_READERS + 2)


def json_object(data: bytes) -> dict | None:
    """A stored JSON object, or None when the bytes are not one."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_json(store: Store, key: str) -> tuple[dict, str] | None:
    """A JSON object and its ETag, or None when the key is missing or not a JSON object."""
    blob = store.get(key)
    if blob is None:
        return None
    doc = json_object(blob.data)
    if doc is None:
        log.error("event=store.bad_json key=%s", key)
        return None
    return doc, blob.etag


def update_json(store: Store, key: str, change: Callable[[dict | None], dict | None],
                tries: int = 8, known: tuple[dict, str] | None = None,
                seen: Callable[[tuple[dict, str]], None] | None = None
                ) -> tuple[dict, str] | None:
    """Read-modify-write with a conditional write, retried when another writer got there first.
    `change` gets the current document (None when missing) and returns the new one, or None to
    write nothing. Returns what was written and its ETag (or None).

    `known` is a copy (document, ETag) believed current, such as the one this instance wrote
    last: the first try changes it and writes over its ETag without reading, so the common
    case costs one request and only a conflict costs a read. A `change` that finds nothing to
    do in the copy writes nothing, so a copy may be used only where a stale one errs safely.
    `seen` is told of every version read, so a caller's copy can follow the store."""
    for attempt in range(tries):
        if attempt == 0 and known is not None:
            doc, etag = copy.deepcopy(known[0]), known[1]
        else:
            if attempt:
                time.sleep(0.005 * secrets.randbelow(10))
            current = read_json(store, key)
            doc, etag = current if current else (None, None)
            if current is not None and seen is not None:
                seen((copy.deepcopy(current[0]), current[1]))
        new = change(doc)
        if new is None:
            return None
        try:
            if etag is None:
                etag = store.put(key, to_json(new), if_absent=True)
            else:
                etag = store.put(key, to_json(new), if_match=etag)
            return new, etag
        except StoreConflict:
            continue
    raise StoreConflict(f"{key}: too many concurrent writers")


# Threads for independent store requests sent at once (see in_parallel); made on first use.
IO_POOL = ThreadPoolExecutor(16, thread_name_prefix="io")
# Threads for the requests a webhook sends at once beside its own (see in_parallel): apart
# from IO_POOL, which the worker uses too, so an answer never queues behind its work.
INTAKE_POOL = ThreadPoolExecutor(8, thread_name_prefix="intake")


def put_once(store: Store, key: str, doc: dict) -> bool:
    """Create an object unless it exists: a second try (or a restart) never makes two.
    Returns whether this call created it."""
    try:
        store.put(key, to_json(doc), if_absent=True)
    except StoreConflict:
        return False
    return True


def in_parallel(pool: ThreadPoolExecutor, *calls: Callable[[], Any]) -> list[Any]:
    """Independent store requests at once, so they cost the slowest round trip, not the sum.
    Every call runs to its end; then the first exception, if any, is raised."""
    futures = [pool.submit(call) for call in calls[1:]]
    results: list[Any] = []
    failure: BaseException | None = None
    try:
        results.append(calls[0]())
    except BaseException as e:  # noqa: B036 (re-raised below, once the others finished)
        failure = e
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as e:  # noqa: B036
            failure = failure or e
    if failure is not None:
        raise failure
    return results


PROBE_WRONG_ETAG = "0" * 32  # an ETag no object has: a PUT that names it must be refused


def probe_store(store: Store) -> str | None:
    """Whether the store honours the conditions every guarantee rests on (no double page, no
    lost update, one step per instance): a create under `probe/<random>` with If-None-Match:
    *, then at once the same create again and a PUT with a wrong If-Match (each must be
    refused: 412, StoreConflict), then a delete, sent without waiting for it. Two round
    trips to the answer: the two refusals are independent, so they go together. Some
    S3-compatible stores (and older versions of others) accept the headers and overwrite
    anyway; one that answers NotImplemented does not pretend, but cannot be used either.
    Returns None when the store passed, else one line naming the store and the header it
    ignored. StoreUnavailable when it could not be asked: an unreachable store is not one
    that ignores conditions, the caller decides."""
    key = f"probe/{uuid.uuid4().hex}.json"
    where = store.describe()

    def refused(write: Callable[[], Any]) -> str:
        try:
            write()
        except StoreConflict:
            return "refused"
        except StoreUnavailable as e:
            if "NotImplemented" in str(e):
                return "not implemented"
            raise
        return "accepted"

    def body(step: str) -> bytes:
        return to_json({"probe": step, "time": iso_time(time.time())})

    first = refused(lambda: store.put(key, body("create"), if_absent=True))
    if first != "accepted":
        return (f"store {where} {first} a create with If-None-Match: * of {key}, which did "
                "not exist: conditional writes do not work there")
    def delete() -> None:
        with contextlib.suppress(StoreUnavailable):
            store.delete(key)

    try:
        again, wrong = in_parallel(
            IO_POOL, lambda: refused(lambda: store.put(key, body("again"), if_absent=True)),
            lambda: refused(lambda: store.put(key, body("wrong"), if_match=PROBE_WRONG_ETAG)))
    finally:
        IO_POOL.submit(delete)  # the pool's threads finish it before the process exits
    ignored = [f"{header} ({what if verdict == 'accepted' else 'answered NotImplemented'})"
               for header, what, verdict in (
                   ("If-None-Match: *", "a second create of the same key was accepted", again),
                   ("If-Match", "a PUT naming an ETag the object does not have was accepted",
                    wrong))
               if verdict != "refused"]
    if not ignored:
        return None
    return (f"store {where} ignores {' and '.join(ignored)} on PUT: on it the pager could "
            "page twice and lose updates; use a store that honours conditional writes (AWS "
            "S3, recent MinIO or R2)")


# ==============================================================================================
# Domain: the audit log, the operational config, quiet hours, contact tests, the page book;
# Pager (the shared parts) and its rooms Pages, Team, Alerts, LiveCalls, Commands
# ==============================================================================================


AUDIT_EVENTS = (
    "config.initialised",    # init put the first operational config into an empty store
    "config.changed",        # a write that did not change who is on call
    "oncall.changed",        # exactly one per write that changes who is on call
    "session.started",       # TAKE: a pending confirmation was stored
    "session.cancelled",     # X
    "override.added",        # TAKE 4h + C, or override add, that changed nobody on call now
    "override.removed",      # override remove (a running one ends now and hands back)
    "page.opened",           # a voicemail or a missed call opened a page
    "page.delivered",        # one channel of a page (or a message job) succeeded
    "page.delivery_failed",  # one attempt of a channel failed (it is retried) or gave up
    "page.acknowledged",     # ACK by SMS, 1 on a page call, or an Events API acknowledge
    "page.resolved",         # an Events API resolve, or the next ping of a missed heartbeat
    "page.escalated",        # an escalation step: a call to the on-call engineer or the team
    "page.closed",           # no acknowledgement within a day
    "outbound.capped",       # the hourly SMS+call budget is spent; only e-mail runs
    "alert.held",            # an integration's alert budget is spent: listed, not rung
    "page.repeated",         # a caller with an open page called again: joined to that page
    "page.transcribed",      # Twilio's transcript of a voicemail arrived; texted and e-mailed
    "page.recorded",         # the recording of a live call arrived; archived and e-mailed
    "page.transcript_failed",  # Twilio could not transcribe a voicemail
    "member.opted_out",      # a member sent STOP (or another opt-out word): called, not texted
    "member.opted_in",       # a member sent START, UNSTOP or YES
    "recording.refused",     # a recording callback named a URL outside our Twilio account
    "live.hunted",           # a caller pressed 2 and is put through (live/<number>.json)
    "live.held",             # a caller pressed 2 and went straight to voicemail (the reason)
    "page.waiting",          # a voicemail or missed call kept while no config is valid
    "change.received",       # a Change Event (/v2/change/enqueue): a deploy, a push; rings nobody
    "contact.tested",        # a test text (or call) went to a member: `oncall-pager test`, TEST
    "contact.confirmed",     # the member answered it: OK by SMS, or 1 on the test call

    "quiet.started",         # QUIET + C, or `oncall-pager quiet`: alerts are listed, not rung
    "quiet.ended",           # the quiet hours ran out, or QUIET OFF: alerts ring again
    "page.ringing",          # an alert listed during quiet hours rings now that they ended
)


# What an audit entry's key says of it besides its time, event and actor, so that `report`
# reads the log with LISTs alone: <stamp>-<uuid>~<event>~<actor>~<fact>....json
AUDIT_KEY_FACTS = {
    "page.opened": ("page", "kind"),
    "page.acknowledged": ("page", "number", "via"),
    "page.escalated": ("page", "number"),
    "page.resolved": ("page", "number"),
    "page.closed": ("page", "number"),
    "oncall.changed": ("from", "to"),
}
KEY_FACT_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@+-]")


def audit_key_name(event: str, actor: str, details: dict) -> str:
    """`~event~actor~fact...`: each fact's characters outside a safe set become `_`, at
    most 64 of them (ids and numbers are short; a fact is for reading, not for proof)."""
    facts = [event, actor, *(str(details.get(name, "")) for name in AUDIT_KEY_FACTS.get(event, ()))]
    return "".join("~" + KEY_FACT_UNSAFE.sub("_", fact)[:64] for fact in facts)


def audit_key_facts(key: str) -> dict | None:
    """The time, event, actor and facts an audit key carries, or None for a key written
    before keys carried them (its entry must be read)."""
    name = key.rsplit("/", 1)[-1].removesuffix(".json")
    stamp, sep, rest = name.partition("~")
    if not sep:
        return None
    event, _, rest = rest.partition("~")
    actor, _, rest = rest.partition("~")
    values = rest.split("~") if rest else []
    try:
        moment = dt.datetime.strptime(stamp[:23], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return {"time": moment.timestamp(), "event": event, "actor": actor,
            "details": dict(zip(AUDIT_KEY_FACTS.get(event, ()), values, strict=False))}


class AuditLog:
    """Append-only: one new object per event under audit/YYYY/MM/DD/, nothing is rewritten.
    An entry can be built apart from writing it (`entry`), so that a state change carries its
    own entry in the object it changes (a page's `audit_due`, the config's `last_change`) and
    whoever finds that object after a stop writes the entry again at the same key: a stop
    between a change and its entry loses neither. Writing an entry that is there already does
    nothing. When the store is unreachable the entry waits in memory for `flush` (the worker
    calls it), so an outage delays the audit log but does not lose it.
    """

    def __init__(self, store: Store, instance: str):
        self.store = store
        self.instance = instance
        self._pending: list[tuple[str, dict]] = []
        self._written: OrderedDict[str, None] = OrderedDict()  # keys this process wrote
        self._lock = threading.Lock()
        # Called with each entry before it is written (the worker queues the webhooks that
        # follow its event: Worker.follow). An entry counts as written only once both are
        # done, so whoever writes it again after a stop queues them again (at the same keys).
        self.follow: Callable[[str, dict], None] | None = None

    def entry(self, event: str, actor: str, details: dict | None = None) -> tuple[str, dict]:
        """A new entry and the key it is to be written at."""
        if event not in AUDIT_EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        now = time.time()
        entry = {"time": iso_time(now), "event": event, "actor": actor,
                 "instance": self.instance, "details": details or {}}
        day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y/%m/%d")
        return (f"audit/{day}/{sortable_stamp(now)}-{uuid.uuid4().hex}"
                f"{audit_key_name(event, actor, entry['details'])}.json", entry)

    def record(self, event: str, actor: str, details: dict | None = None) -> None:
        self.write(*self.entry(event, actor, details))

    def write(self, key: str, entry: dict) -> None:
        log.info("event=audit audit_event=%s actor=%s", entry["event"], entry["actor"])
        try:
            self._put(key, entry)
        except StoreUnavailable:
            log.warning("event=audit.deferred audit_event=%s", entry["event"])
            with self._lock:
                self._pending.append((key, entry))

    def _put(self, key: str, entry: dict, remember: bool = True) -> None:
        """`remember`: note the key as written (see `written`). flush does not: the objects
        its entries travel in keep them due, so that whoever looks at them next writes them
        again (a refused create when they are there)."""
        if self.follow is not None and entry.get("event") in WEBHOOK_EVENTS:
            try:
                self.follow(key, entry)
            except StoreUnavailable:
                raise
            except Exception:  # a bug there must not cost the audit entry
                log.exception("event=audit.follow_error audit_event=%s", entry["event"])
        try:
            self.store.put(key, to_json(entry), if_absent=True)
        except StoreConflict:
            pass  # written before: by this write's first try, or by an instance that stopped
        if not remember:
            return
        with self._lock:
            self._written[key] = None
            while len(self._written) > 10000:
                self._written.popitem(last=False)

    def written(self, key: str) -> bool:
        """Whether this process has seen the entry at `key` land in the store."""
        with self._lock:
            return key in self._written

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for i, (key, entry) in enumerate(pending):
            try:
                self._put(key, entry, remember=False)
            except StoreUnavailable:
                with self._lock:
                    self._pending[:0] = pending[i:]
                return

    def entries(self, limit: int | None = None, since: float | None = None) -> list[dict]:
        """Entries oldest first; `since` (epoch seconds) skips whole days before it."""
        keys = self.store.list("audit/")
        if since is not None:
            first_day = dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y/%m/%d")
            keys = [k for k in keys if k[len("audit/"):len("audit/") + 10] >= first_day]
        if limit is not None:
            keys = keys[-limit:] if limit > 0 else []
        found = []
        for key in keys:
            item = read_json(self.store, key)
            if item and (since is None or item[0].get("time", "") >= iso_time(since)):
                found.append(item[0])
        return found


class NoConfig(Exception):
    """The store holds no operational config yet (see `oncall-pager init`)."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    doc: dict
    etag: str
    stale: bool = False  # served from the last good copy because the store is unreachable
    # what TeamConfig.write queued: the message jobs it created, for this instance to start
    # (one that another instance's settle created first is that instance's to send)
    queued: tuple[tuple[str, dict], ...] = ()


CONFIG_CHANGE_TRIES = 5  # a change that lost the race is made again over the new version
CONFIG_PROBLEM_EVERY = 60.0  # seconds between two log lines of the same config problem


class TeamConfig:
    """The operational config, read through a cache keyed by its ETag: a webhook costs one
    conditional read (a 304 from S3, a `stat` on the directory store), never a full download.
    While the store is unreachable (or holds an invalid document) the last good copy answers,
    kept in memory and, when `cache_file` is set, on local disk across restarts.
    `write` is the one function that changes the config: validate, conditional write, audit.
    """

    def __init__(self, store: Store, key: str, audit: AuditLog, cache_file: Path | None):
        self.store = store
        self.key = key
        self.audit = audit
        self.cache_file = cache_file
        self._current: Snapshot | None = None
        self._checked = -math.inf  # time.monotonic() of the last read the store answered
        self._lock = threading.Lock()
        self.reachable = True
        self.problem = ""
        # Called when a read finds a version written elsewhere (the command line, the other
        # instance): the Pager wakes its worker, which acts on it (a handoff made due) at once.
        self.changed: Callable[[], None] = lambda: None
        self._told = -math.inf  # time.monotonic() the problem was last logged
        self._checking = False  # a check_soon runs

    def read(self, max_age: float = 0.0, *, background: bool = False) -> Snapshot:
        """The config, checked with the store unless it was checked less than `max_age`
        seconds ago (the page path allows a few seconds, see PAGE_CONFIG_MAX_AGE).
        `background`: the worker's check with each listing, which does not count as such a
        check (a webhook right after a change in the store sees it, as without the worker)."""
        current = self._current
        if (current is not None and not current.stale
                and time.monotonic() - self._checked < max_age):
            return current
        checked = time.monotonic()
        try:
            blob = self.store.get(self.key, unless_etag=current.etag if current else None)
        except StoreUnavailable as e:
            self._note(False, str(e))
            return self._last_good()
        if blob is UNCHANGED and current is not None:
            self._note(True, "")
            self._checked = self._checked if background else checked
            return current
        if blob is None:
            self._note(True, "no operational config in the store")
            raise NoConfig(f"{self.store.describe()} holds no {self.key}")
        try:
            doc = parse_oncall_config(blob.data)
        except ConfigError as e:
            self._note(True, f"invalid operational config: {e.problems[0]}")
            return self._last_good()
        self._note(True, "")
        self._checked = self._checked if background else checked
        snapshot = self._remember(Snapshot(doc, blob.etag))
        if current is not None and current.etag != blob.etag:
            self.changed()
        return snapshot

    def last_known(self) -> Snapshot | None:
        """The copy in memory, without asking the store: to plan requests, never to decide."""
        return self._current

    def check_soon(self, max_age: float) -> None:
        """Check the config in the background (one check at a time) if it was last checked
        `max_age` seconds ago or more; the caller goes on with the copy it has."""
        with self._lock:
            if self._checking or time.monotonic() - self._checked < max_age:
                return
            self._checking = True

        def check() -> None:
            try:
                self.read(max_age)
            except (NoConfig, StoreUnavailable):
                pass  # noted by read; the next caller asks again
            finally:
                self._checking = False

        IO_POOL.submit(check)

    def _note(self, reachable: bool, problem: str) -> None:
        """Remember how the last read went (for /healthz) and log a change once, and a
        problem that lasts once every CONFIG_PROBLEM_EVERY seconds (never once a request):
        /healthz tells the public only `unreachable` or `invalid`; the reason is for the
        operator."""
        with self._lock:
            changed = (reachable != self.reachable, problem != self.problem)
            self.reachable, self.problem = reachable, problem
            tell = bool(problem) and (changed[1] or time.monotonic() - self._told
                                      >= CONFIG_PROBLEM_EVERY)
            if tell:
                self._told = time.monotonic()
        if changed[0]:
            log.warning("event=store.%s store=%s", "back" if reachable else "unreachable",
                        self.store.describe())
        if tell:
            log.error("event=config.problem problem=%s", log_value(problem, 300))
        elif changed[1]:
            log.info("event=config.ok")

    def _remember(self, snapshot: Snapshot) -> Snapshot:
        with self._lock:
            self._current = snapshot
        if self.cache_file is not None:
            self._save(snapshot, self.cache_file)
        return snapshot

    @staticmethod
    def _save(snapshot: Snapshot, path: Path) -> None:
        """The local copy holds the SMTP password: mode 0600 from its first byte (mkstemp
        creates it so), renamed into place so a reader never sees half a file."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        except OSError:
            return  # `check` and serve's start say so; the in-memory copy still answers
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(to_json({"etag": snapshot.etag, "doc": snapshot.doc}))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _last_good(self) -> Snapshot:
        if self._current is None and self.cache_file is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, ConfigError):
                saved = json.loads(self.cache_file.read_bytes())
                parse_oncall_config(to_json(saved["doc"]))
                self._current = Snapshot(saved["doc"], saved["etag"])
                log.warning("event=config.from_cache file=%s", self.cache_file)
        if self._current is None and self.reachable:
            raise ConfigError([self.problem])  # reachable, but the stored config is invalid
        if self._current is None:
            raise StoreUnavailable(self.problem or "store unreachable")
        return dataclasses.replace(self._current, stale=True)

    def write(self, doc: dict, *, base: Snapshot, actor: str, details: dict | None = None,
              messages: Iterable[tuple[str, dict]] = (), event: str = "config.changed",
              oncall_by: str = "") -> Snapshot:
        """Validate, stamp, write conditionally over `base` (the snapshot the change was made
        from), audit. StoreConflict when the config changed since `base` was read; ConfigError
        (nothing written) when the result is invalid.

        The audit entry travels in the document (`current_config.last_change`), and so do
        `messages` (message jobs that follow from the change: the handoff SMS); all are
        written after the document, at once. A stop in between loses none: `reconcile`
        writes them at the next start (each at its own key, so never twice).

        A write that changes who is on call records when and by whom (`oncall_change`, for
        WHO): `oncall_by` (a handoff that a command-line change made due is the rotation's),
        else `actor`; any other write keeps the record, so a STOP or an unrelated setting
        does not pass for an on-call change."""
        messages = list(messages)
        doc = copy.deepcopy(doc)
        current = doc.get("current_config")
        if isinstance(current, dict):
            current["last_modified_time"] = int(time.time())
            current["last_modified_user_id"] = actor
            current.pop("last_change", None)
        errors, _ = check_oncall_config(doc)
        if errors:
            raise ConfigError(errors)
        doc["current_config"]["oncall_user"] = dict(oncall_member(doc))
        old_oncall, new_oncall = oncall_id_of(base.doc), oncall_member(doc)["id"]
        if old_oncall != new_oncall:
            doc["current_config"]["oncall_change"] = {
                "time": int(time.time()), "by": oncall_by or actor,
                "via": str((details or {}).get("via", ""))}
            key, entry = self.audit.entry("oncall.changed", actor, {
                "from": old_oncall, "to": new_oncall, **(details or {})})
        else:
            key, entry = self.audit.entry(event, actor, {"oncall": new_oncall, **(details or {})})
        last_change: dict[str, Any] = {"key": key, "entry": entry, "time": time.time()}
        if messages:
            last_change["messages"] = [{"key": key, "job": job} for key, job in messages]
        doc["current_config"]["last_change"] = last_change
        etag = self.store.put(self.key, to_json(doc), if_match=base.etag)
        snapshot = self._remember(Snapshot(doc, etag))
        self._checked = time.monotonic()
        def queue(message: tuple[str, dict]) -> Callable[[], bool]:
            def put() -> bool:
                try:
                    return put_once(self.store, *message)
                except StoreUnavailable:  # the worker writes it when it marks it sent
                    log.error("event=message.unqueued key=%s", message[0])
                    return True
            return put

        created = in_parallel(IO_POOL, lambda: self.audit.write(key, entry),
                              *map(queue, messages))[1:]
        return dataclasses.replace(snapshot, queued=tuple(
            message for message, mine in zip(messages, created, strict=True) if mine))

    def reconcile(self) -> None:
        """At start: the config's last change made whole (see settle)."""
        self.settle(self.read().doc)

    def settle(self, doc: dict) -> list[tuple[str, dict]]:
        """The audit entry and the message jobs of `doc`'s last change, in case a stop came
        between the change and them (each that is there costs a refused request); returns
        the jobs this call queued (for the worker to start). A message is queued again only
        within a day of the change: a sent job is kept that long, so its key still refuses a
        second one. (`message`: one job, as the first release kept it.) StoreUnavailable
        when the store did not answer: try again."""
        last = doc["current_config"].get("last_change")
        queued: list[tuple[str, dict]] = []
        if not isinstance(last, dict):
            return queued
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if str(last["key"]).startswith("audit/") and isinstance(last["entry"], dict):
                self.audit.write(check_key(last["key"]), last["entry"])
            messages = last.get("messages") or ([last["message"]] if "message" in last else [])
            if time.time() - float(last["time"]) < DAY:
                for message in messages:
                    key = check_key(message["key"])
                    if key.startswith("jobs/msg-") and put_once(self.store, key, message["job"]):
                        queued.append((key, message["job"]))
        return queued

    def initialise(self, doc: dict, actor: str) -> Snapshot:
        """Put a first config into an empty store; StoreConflict if one is there already."""
        errors, _ = check_oncall_config(doc)
        if errors:
            raise ConfigError(errors)
        etag = self.store.put(self.key, to_json(doc), if_absent=True)
        self.audit.record("config.initialised", actor, {"oncall": oncall_member(doc)["id"]})
        return self._remember(Snapshot(doc, etag))


# The team commands: the first word decides, case-insensitive, punctuation around it ignored.
COMMAND_WORDS = {
    "WHO": "who", "TAKE": "take", "C": "confirm", "CONFIRM": "confirm", "X": "cancel",
    "ACK": "ack", "STATUS": "status", "HALP": "help", "HELP": "help", "LOOK": "look",
    "NEXT": "next", "TEST": "test", "OK": "ok",
    "QUIET": "quiet",  # quiet hours for monitoring (QuietHours)
}
# Twilio's opt-out and opt-in words (the whole message): Twilio blocks texts to a number that
# sent one of the first until it sends one of the second, and forwards both to the webhook.
# CANCEL is one of them, so it is never offered as a command (X cancels a TAKE).
OPT_OUT_WORDS = ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT")
OPT_IN_WORDS = ("START", "UNSTOP", "YES")
PUNCTUATION = ".,;:!?'\"()[]{}<>-_*#/\\"


def parse_command(body: str) -> tuple[str | None, list[str]]:
    """(command, arguments); command is None for anything we do not recognise.
    "please take" is not TAKE and "mistake" is not either: only the whole first word counts.
    An opt-out or opt-in word counts only as the whole message, as Twilio counts it."""
    whole = (body or "").strip().upper()
    if whole in OPT_OUT_WORDS:
        return "optout", []
    if whole in OPT_IN_WORDS:
        return "optin", []
    words = [w.strip(PUNCTUATION) for w in (body or "").split()]
    words = [w for w in words if w]
    if not words:
        return None, []
    return COMMAND_WORDS.get(words[0].upper()), words[1:]


HELP_TEXT = ("Commands: WHO (who is on call), TAKE (become on call; TAKE 4h or TAKE UNTIL FRI "
             "09:00 for a while; then C to confirm or X to cancel), ACK [n] (acknowledge your "
             "pages), STATUS (recent pages), NEXT (the next handoff), "
             "QUIET 2h [reason] / QUIET OFF (alerts listed, not rung; C to confirm), "
             "TEST (a test text), HALP (this list).")
NO_ROTATION_TEXT = "No rotation is set: on-call changes only by TAKE."
LOOK_TEXT = ("You are in a maze of twisty little passages, all alike. "
             "There is a pager here. It is ringing.")
STORE_DOWN_TEXT = ("The pager's store is unreachable right now, so nothing changed. "
                   "Try again in a minute.")
HELP_REPEAT_SECONDS = 300
RECENT_PAGES = 50
STATUS_LINES = 5  # pages STATUS shows one a line; more are counted (an SMS stays readable)
# Commands that change something are carried out once per MessageSid (see Commands.handle_sms);
# their markers, replies/<MessageSid>.json, are kept at least REPLY_KEEP_DAYS days.
STATE_CHANGING = ("take", "confirm", "cancel", "ack", "optout", "optin", "quiet", "test",
                  "ok")
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-fA-F]{32}")
REPLY_KEEP_DAYS = 7


class ReplyLimiter:
    """At most one help reply per number in a window, so an auto-responder ("I'm driving")
    cannot ping-pong with the pager. Answers to real commands are never limited. In memory:
    with two instances a number may get the help text once from each."""

    def __init__(self, window: float):
        self.window = window
        self._last: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, number: str, now: float) -> bool:
        with self._lock:
            last = self._last.get(number)
            if last is not None and now - last < self.window:
                return False
            self._last[number] = now
            self._last.move_to_end(number)
            while len(self._last) > 10000:
                self._last.popitem(last=False)
            return True


def caller_text(page: dict) -> str:
    """`NAME <NUMBER>`: the caller-ID name, else the city and state, as Twilio gave them."""
    caller = page.get("caller", {})
    who = caller.get("name") or ", ".join(
        x for x in (caller.get("city"), caller.get("state")) if x) or "unknown caller"
    return f"{who} <{caller.get('number') or 'unknown number'}>"


def page_summary(page: dict) -> str:
    kind = page.get("kind")
    if kind in ("alert", "heartbeat"):
        return alert_text(page)
    what = (f"voicemail ({page.get('duration', 0)} sec)" if kind == "voicemail"
            else "live call" if kind == "call" else "missed call")
    return f"{what} from {caller_text(page)}"


SMS_SUMMARY = 200  # an alert's summary in texts: with the rest, about two SMS segments
SMS_SOURCE = 60


def alert_summary(page: dict) -> str:
    """The summary of an alert page as texts carry it: cut to SMS_SUMMARY characters (the
    e-mail has all of it)."""
    summary = str(page.get("alert", {}).get("summary"))
    return summary if len(summary) <= SMS_SUMMARY else summary[:SMS_SUMMARY - 3] + "..."


def alert_text(page: dict) -> str:
    """`[critical] Disk full (db1)`; a missed heartbeat says what it is on its own."""
    alert = page.get("alert", {})
    if page.get("kind") == "heartbeat":
        return alert_summary(page)
    source = str(alert.get("source"))
    source = source if len(source) <= SMS_SOURCE else source[:SMS_SOURCE - 3] + "..."
    return f"[{alert.get('severity')}] {alert_summary(page)} ({source})"


def recording_key(page: dict, extension: str) -> str:
    """recordings/<UTC stamp>_<RecordingSid>: a live call's recording has a sid of its own."""
    sid = page.get("recording_sid", page["id"])
    return f"recordings/{file_stamp(page['opened'])}_{sid}{extension}"


def new_page(page_id: str, kind: str, doc: dict, state: str = "open", **fields: Any) -> dict:
    """A page as it is first written: the on-call engineer paged, the first escalation step
    due `ack_timeout` from now. A page that rings nobody (`state` listed: a warning) has
    nobody paged and never escalates."""
    oncall = oncall_member(doc)
    now = time.time()
    return {
        "id": page_id, "number": None, "kind": kind, "opened": now,
        "oncall": {k: v for k, v in oncall.items() if k != "push"},
        "paged": [oncall["id"]] if state == "open" else [],
        "state": state, "acked_by": None, "acked_at": None, "deliveries": {},
        "escalation": {"next_due": now + escalation_settings(doc)["ack_timeout"],
                       "step": 0, "claimed_until": 0},
        **fields}


def page_rev(page: dict) -> int:
    """How many times a page was changed after its create: `rev`, which every change adds
    one to (Pages.write_page), so of two copies of a page the later one is known (PageBook:
    threads put what they read or wrote in any order). A page without it counts as 0."""
    rev = page.get("rev")
    return rev if isinstance(rev, int) and not isinstance(rev, bool) else 0


def add_delivery(page: dict, channel: str, claimed_until: float = 0.0, **extra: str) -> None:
    """Queue one more channel on a page (once: a channel that exists is left alone). With
    `claimed_until` the channel is claimed by the instance that adds it, which sends it at
    once: the write that queues it is also its claim."""
    page["deliveries"].setdefault(channel, {
        "state": "pending", "attempts": 1 if claimed_until else 0, "next_try": time.time(),
        "claimed_until": claimed_until, "last_error": "", **extra})


def pushed(page: dict, doc: dict) -> list[str]:
    """The channel `push` when the page rings and whom it is sent to has a push topic (see
    Push): the first notification goes there too, opted out of texts or not."""
    oncall = members(doc).get(page.get("oncall", {}).get("id"), {})
    return ["push"] if page.get("state") == "open" and oncall.get("push") else []


def message_of(page: dict, channel: str) -> dict:
    """The voicemail a channel of a page is about: the page's own, or, for a channel named
    `mms:<RecordingSid>` (and e-mail, archive, fallback alike), a later voicemail of the same
    caller that joined the page. `page_id` names the page either way."""
    _, _, repeat_id = channel.partition(":")
    for repeat in page.get("repeats", []):
        if repeat["id"] == repeat_id:
            return {**page, **repeat, "page_id": page["id"]}
    return page


def page_id_of(message: dict) -> str:
    return message.get("page_id", message["id"])


def hushed(page: dict) -> bool:
    """An alert page (or a missed heartbeat) that would have rung during quiet hours: listed
    (e-mailed, nobody rung), and it rings once they end (see ring_after_quiet)."""
    return page.get("state") == "listed" and bool(page.get("alert", {}).get("quiet_hours"))

def joined_page_id(message: dict) -> str:
    """The page a message is part of: the page a repeat joined (its number, its archive
    entry), else the page whose channel it is."""
    return message.get("joins") or page_id_of(message)


def new_repeat(page: dict, repeat_id: str, kind: str, caller: dict, call_sid: str,
               recording_url: str, duration: int) -> dict:
    """The record of a later call from a caller whose page is open (pages/<repeat id>.json):
    state `joined`, `joins` the page. It carries what its own deliveries need (the caller,
    the recording, whom the page was sent to, the page's number when known) and rings
    nobody: no escalation, nobody paged, nothing to acknowledge."""
    now = time.time()
    return {"id": repeat_id, "number": page.get("number"), "kind": kind, "opened": now,
            "oncall": dict(page["oncall"]), "paged": [], "state": "joined",
            "joins": page["id"], "acked_by": None, "acked_at": None, "deliveries": {},
            "escalation": {"next_due": now, "step": 0, "claimed_until": 0},
            "caller": caller, "call_sid": call_sid, "recording_url": recording_url,
            "duration": duration}


def fold_in(page: dict | None, repeat: dict) -> dict | None:
    """The change that lists a repeat in its page's `repeats` (once; None: nothing to do)."""
    if page is None or any(r["id"] == repeat["id"] for r in page.get("repeats", [])):
        return None
    page.setdefault("repeats", []).append(
        {name: repeat[name] for name in ("id", "kind", "call_sid", "opened", "recording_url",
                                         "duration")})
    return page


def has_work(page: dict) -> bool:
    """Open (escalation may be due), waiting for a valid config to open (see
    Pages.open_waiting), hushed by quiet hours (it rings when they end), or a channel still
    to send: the worker keeps an eye on it."""
    return page.get("state") in ("open", "waiting") or hushed(page) or any(
        d.get("state") == "pending" for d in page.get("deliveries", {}).values())


def archivable(page: dict) -> bool:
    """Nothing left to do, and nothing can reach it again: not open, no channel to send, and
    an alert page no longer one that its dedup_key can acknowledge or resolve (a listed or an
    acknowledged page stays until resolved). More checks with the store in Pages.archive."""
    if has_work(page):
        return False
    return page.get("kind") not in ("alert", "heartbeat") or page.get("state") not in ACTIVE


def page_state(page: dict, doc: dict | None) -> str:
    if hushed(page):
        return "listed (quiet hours: it rings when they end)"
    if page.get("state") == "acknowledged":
        member = members(doc).get(page.get("acked_by"), {}) if doc else {}
        return f"acknowledged by {member.get('name', page.get('acked_by'))}"
    return str(page.get("state", "open"))


def hurry_first_call(page: dict) -> None:
    """The text to the person being paged cannot reach them: their first call is due now."""
    if page.get("state") == "open" and page["escalation"]["step"] == 0:
        page["escalation"]["next_due"] = min(page["escalation"]["next_due"], time.time())


def settle_audit(page: dict, audit: AuditLog) -> None:
    """Drop from a page's `audit_due` the entries known to be in the store (done as part of
    a write the page gets anyway, never a write of its own)."""
    page["audit_due"] = [due for due in page.get("audit_due", []) if not audit.written(due["key"])]


def tell_paged(page: dict, doc: dict, kind: str, body: str, claimed_until: float,
               skip: str = "") -> list[str]:
    """Queue one SMS (`kind:<member id>`) to everyone the page reached so far but `skip`,
    leaving out who opted out of texts; returns the channels queued."""
    told = []
    for member_id in page.get("paged", []):
        member = members(doc).get(member_id)
        if member and member_id != skip and not member.get("opted_out"):
            add_delivery(page, f"{kind}:{member_id}", claimed_until, to=member["phone"],
                         body=body)
            told.append(f"{kind}:{member_id}")
    return told


# Alerts from monitoring: PagerDuty's Events API v2 (the event, checked as PagerDuty does).
SEVERITIES = ("critical", "error", "warning", "info")
RINGING = ("critical", "error")  # these ring (text, calls, escalation); the others are e-mailed
EVENT_ACTIONS = ("trigger", "acknowledge", "resolve")
ACTIVE = ("open", "acknowledged", "listed")  # an alert page that can be acknowledged, resolved
# What STATUS shows first, in this order: pages that ring (or wait for a valid config to ring),
# then pages that are listed (warnings, held alerts: e-mailed, nobody rung)
SHOWN_FIRST = ("open", "waiting", "listed")
ACKED_ALERT_HOLDS = DAY  # an acknowledged alert page takes its dedup_key's triggers this long
EVENT_TEXTS = {"summary": 1024, "source": 255, "component": 255, "group": 255, "class": 255,
               "timestamp": 64}


def joins(page: dict, now: float) -> bool:
    """Whether a trigger of its dedup_key joins this alert page (counted, nothing sent): open
    or listed, or acknowledged less than ACKED_ALERT_HOLDS ago. An alert still or again firing
    a day after its ACK (a monitor that never resolves, a nightly job) pages afresh, as
    PagerDuty's acknowledgement timeout does."""
    state = page.get("state")
    return state in ("open", "listed") or (
        state == "acknowledged" and page.get("acked_at", 0) > now - ACKED_ALERT_HOLDS)


def stopped_joining(page: dict) -> float:
    """When a trigger stopped joining this alert page (see joins): resolved, closed, or
    acknowledged ACKED_ALERT_HOLDS ago; infinity while it joins, 0 when unknown."""
    state = page.get("state")
    if state in ("open", "listed"):
        return math.inf
    if state == "acknowledged":
        return float(page.get("acked_at") or 0) + ACKED_ALERT_HOLDS
    return float(page.get("resolved_at") or page.get("closed_at") or 0)


def parse_event(event: object) -> tuple[dict, list[str]]:
    """An Events API v2 event, its text cleaned (clean_text, clean_json), and what is wrong
    with it in PagerDuty's words (empty when nothing is)."""
    if not isinstance(event, dict):
        return {}, ["Event object is invalid"]
    errors = []

    def text(value: object, name: str, limit: int, required: bool = False) -> str | None:
        if isinstance(value, str) and len(value) <= limit:
            value = clean_text(value)  # only controls, spaces or junk: blank
        if value is None or value == "":
            if required:
                errors.append(f"'{name}' is missing or blank")
            return None
        if not isinstance(value, str) or len(value) > limit:
            errors.append(f"'{name}' must be a string of at most {limit} characters")
            return None
        return value

    action = event.get("event_action")
    if action not in EVENT_ACTIONS:
        errors.append("'event_action' is invalid (must be one of the following: 'trigger', "
                      "'acknowledge' or 'resolve')")
    parsed: dict[str, Any] = {
        "event_action": action,
        "routing_key": event.get("routing_key") if isinstance(
            event.get("routing_key"), str) else None,
        "dedup_key": text(event.get("dedup_key"), "dedup_key", 255, action != "trigger")}
    if parsed["routing_key"] is None or not parsed["routing_key"].strip():
        errors.append("'routing_key' is missing or blank")
    if action != "trigger":
        return parsed, errors
    payload = event.get("payload")
    if not isinstance(payload, dict):
        return parsed, [*errors, "'payload' is missing or not an object"]
    alert: dict[str, Any] = {name: text(payload.get(name), f"payload.{name}", limit,
                                        name in ("summary", "source"))
                             for name, limit in EVENT_TEXTS.items()}
    if payload.get("severity") not in SEVERITIES:
        errors.append("'payload.severity' is invalid (must be one of the following: "
                      "'critical', 'warning', 'error' or 'info')")
    if alert["timestamp"] is not None:
        try:
            dt.datetime.fromisoformat(alert["timestamp"])
        except ValueError:
            errors.append("'payload.timestamp' is not an ISO 8601 time")
    alert["severity"] = payload.get("severity")
    if nesting(payload.get("custom_details")) > MAX_NESTING:
        errors.append(f"'payload.custom_details' nests deeper than {MAX_NESTING} levels")
    else:
        alert["custom_details"] = kept_details(clean_json(payload.get("custom_details")))
    for name in ("client", "client_url"):
        alert[name] = text(event.get(name), name, 1024)
    for name, field in (("links", "href"), ("images", "src")):
        items = event.get(name, [])
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get(field), str) for i in items):
            errors.append(f"'{name}' must be a list of objects with '{field}'")
            items = []
        alert[name] = [{k: clean_text(i[k][:KEPT_LINK_TEXT]) for k in LINK_FIELDS[name]
                        if isinstance(i.get(k), str)} for i in items[:KEPT_LINKS]]
    parsed["alert"] = {k: v for k, v in alert.items() if v not in (None, [])}
    return parsed, errors


def parse_change_event(event: object) -> tuple[dict, list[str]]:
    """A Change Event (PagerDuty's `/v2/change/enqueue`: `routing_key`, `payload.summary`,
    optional `payload.source` and `payload.timestamp`; `custom_details` and `links` are taken
    and not kept), its texts cleaned, and what is wrong with it in PagerDuty's words."""
    if not isinstance(event, dict):
        return {}, ["Event object is invalid"]
    errors = []
    routing_key = event.get("routing_key")
    if not isinstance(routing_key, str) or not routing_key.strip():
        errors.append("'routing_key' is missing or blank")
    payload = event.get("payload")
    if not isinstance(payload, dict):
        return {}, [*errors, "'payload' is missing or not an object"]
    change: dict[str, Any] = {"routing_key": routing_key}
    for name, limit, required in (("summary", 1024, True), ("source", 255, False),
                                  ("timestamp", 64, False)):
        value = payload.get(name)
        if isinstance(value, str) and len(value) <= limit:
            change[name] = clean_text(value) or None
        elif value is not None:
            errors.append(f"'payload.{name}' must be a string of at most {limit} characters")
            continue
        if required and not change.get(name):
            errors.append(f"'payload.{name}' is missing or blank")
    if change.get("timestamp"):
        try:
            dt.datetime.fromisoformat(change["timestamp"])
        except ValueError:
            errors.append("'payload.timestamp' is not an ISO 8601 time")
    return change, errors


MAX_NESTING = 32
# What a page keeps of an event (section 19): a page lives in memory (the PageBook) and in
# every write of it for as long as it is open, so it keeps a bounded part of what a monitor
# sent (an event may be 512 KiB; parsed, that is megabytes of small objects), not the event.
KEPT_DETAILS = 8 * 1024  # bytes of custom_details as compact JSON (UTF-8)
DETAILS_CUT = "…cut at 8 KiB"
KEPT_LINKS = 10  # links, and images
KEPT_LINK_TEXT = 2048  # characters of each of their fields (PagerDuty's, the rest dropped)
LINK_FIELDS = {"links": ("href", "text"), "images": ("src", "href", "alt")}


def kept_details(details: object) -> object:
    """An event's custom_details as a page keeps them: the value itself when its compact JSON
    fits in KEPT_DETAILS bytes, else that JSON as a string, cut at a character boundary so
    that with DETAILS_CUT appended it still fits (the e-mail shows it as it is). Only this
    bounded copy outlives the request; the parsed event goes with it."""
    if details is None:
        return None
    text = json.dumps(details, separators=(",", ":"), ensure_ascii=False)
    data = text.encode()  # cleaned before (clean_json): every character travels in UTF-8
    if len(data) <= KEPT_DETAILS:
        return details
    room = KEPT_DETAILS - len(DETAILS_CUT.encode())
    return data[:room].decode("utf-8", "ignore") + DETAILS_CUT  # "ignore": a cut character


def nesting(value: object) -> int:
    """How deeply objects and lists nest in a JSON value; counted without recursion, so
    that no depth a caller sends can reach Python's recursion limit here."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack += [(inner, level + 1) for inner in
                      (item.values() if isinstance(item, dict) else item)]
    return deepest


def alert_page_id(integration: str, dedup_key: str, generation: int) -> str:
    """The page of one generation of an alert: the same (integration, dedup_key) opens
    generation 0, and after that page is resolved, 1, and so on. Deterministic, so a retried
    POST and a second instance meet at the same conditional create."""
    digest = hashlib.sha256(f"{integration}\n{dedup_key}\n{generation}".encode()).hexdigest()
    return "AL" + digest[:32]


def alert_index_key(integration: str, dedup_key: str) -> str:
    digest = hashlib.sha256(f"{integration}\n{dedup_key}".encode()).hexdigest()
    return f"alerts/{digest[:32]}.json"


def alert_budget_key(integration: str) -> str:
    """counters/alerts-<hash>.json: the alert budget of one integration (see count_alert)."""
    return f"counters/alerts-{hashlib.sha256(integration.encode()).hexdigest()[:16]}.json"


HELD_KEPT = 100  # held dedup_keys named in an alert budget (beyond them, only counted)
BUDGET_TRIES = 30  # conditional writes of an alert budget before a trigger answers busy


def held_text(held: int, integration: str) -> str:
    """The one SMS of an hour in which an integration's alerts are held (section 19)."""
    return (f"{held} alert{'s' if held != 1 else ''} from {integration} held this hour "
            "(listed and e-mailed, not rung). STATUS lists them.")


# Quiet hours for monitoring (SPEC 21): the length QUIET and `oncall-pager quiet` take, in
# hours and minutes (2h, 30m, 1h30m; at most QUIET_MAX); the window itself is quiet_window.
QUIET_LENGTH = re.compile(r"(?:([0-9]{1,2})h)?(?:([0-9]{1,3})m(?:in)?)?", re.ASCII | re.I)
QUIET_USAGE = "QUIET 2h [reason] or QUIET 30m [reason] (at most 8 h), or QUIET OFF"


def quiet_length(text: str) -> int | None:
    """Seconds, from `2h`, `30m`, `1h30m`; None when it is not a length (0 is not one)."""
    found = QUIET_LENGTH.fullmatch(text)
    if found is None or not any(found.groups()):
        return None
    seconds = int(found.group(1) or 0) * 3600 + int(found.group(2) or 0) * 60
    return seconds or None


def quiet_reason(text: str) -> str:
    """A reason as it is kept: cleaned where it entered (clean_text: an SMS body is already),
    one line, at most QUIET_REASON_MAX characters."""
    reason = " ".join(clean_text(text).split())
    return reason if len(reason) <= QUIET_REASON_MAX else reason[:QUIET_REASON_MAX - 3] + "..."


def quiet_status(doc: dict, now: float) -> str | None:
    """STATUS's first line while quiet hours are on (None otherwise)."""
    until = quiet_until(doc, now)
    if until is None:
        return None
    window = quiet_window(doc) or {}
    by = members(doc).get(window.get("by", ""), {}).get("name", window.get("by") or "?")
    reason = f": {window['reason']}" if window.get("reason") else ""
    return (f"Quiet hours until {short_time(until)} (in {duration_text(until - now)}; "
            f"{by}{reason}): alerts are listed and e-mailed, not rung. QUIET OFF ends them.")


def quiet_ended_text(still_open: int) -> str:
    """The one text when quiet hours end, to the on-call engineer."""
    return (f"Quiet ended: {still_open} alert{'s' if still_open != 1 else ''} still open."
            + (" STATUS lists them; ACK acknowledges them." if still_open else ""))


def rings_after_quiet(page: dict) -> bool:
    """An alert page that rings once quiet hours end: hushed, or open (its escalation was
    held while they lasted: see Worker._consider_page)."""
    return page.get("kind") in ("alert", "heartbeat") and (
        page.get("state") == "open" or hushed(page))


def ring_after_quiet(page: dict, doc: dict, now: float) -> None:
    """A hushed page rings now that quiet hours ended, as if it had been opened now: the
    on-call engineer is paged (no text of its own: the one "Quiet ended" text stands for
    all of them), the first call `ack_timeout` from now (at once for an engineer opted out
    of texts), its day to ring counted from now."""
    oncall = oncall_member(doc)
    page.update(state="open", oncall=dict(oncall), paged=[oncall["id"]], ringing_since=now)
    page["escalation"]["next_due"] = now if oncall.get("opted_out") else (
        now + escalation_settings(doc)["ack_timeout"])


# A ping this close to its deadline also looks for the page of the miss: another instance,
# its clock a little ahead, may have opened it.
HEARTBEAT_SLACK = 60.0


def heartbeat_basis(state: dict) -> float:
    """What a heartbeat's next miss counts from: its last ping, or when it was first seen."""
    return float(state.get("last_ping") or state["since"])


def heartbeat_page_id(name: str, basis: float) -> str:
    """One page per miss: the heartbeat and the ping it missed name it."""
    return "HB" + hashlib.sha256(f"{name}\n{basis!r}".encode()).hexdigest()[:32]


def elapsed(seconds: float) -> str:
    """`45 s`, `12 min`, `26 h`, `3 d`: how long ago, as a person says it."""
    for unit, size, up_to in (("s", 1, 120), ("min", 60, 120 * 60), ("h", 3600, 72 * 3600)):
        if seconds < up_to:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds // DAY)} d"


# How old the config may be on the page path (seconds): a page opened within this time of a
# TAKE on another instance still goes to the previous engineer; every write to the config is
# conditional, so nothing is written over a stale copy.
PAGE_CONFIG_MAX_AGE = 10.0
# The same for TAKE and C (SPEC 20: TAKE + C at most 10 requests): a TAKE binds its session
# to the config version it was shown, and C writes over that version with If-Match, so a copy
# checked this recently errs safely ("changed since your TAKE", send TAKE again); a C whose
# session names a newer version than the copy reads the config afresh.
TEAM_CONFIG_MAX_AGE = PAGE_CONFIG_MAX_AGE
PAGE_ID = re.compile(r"[A-Z]{2}[0-9a-zA-Z]{32}")
DONE_PAGES = "pages-done/"  # pages with nothing left to do, moved out of pages/ (archive)
# The pages of pages/ known done with, each by the ETag it was read with (see DoneIndex): a
# start reads this one object instead of thousands of pages.
DONE_INDEX = "index/done-pages.json"
# What Twilio puts in `From` when the caller withholds the number: anonymous, unknown,
# restricted, blocked.
WITHHELD_NUMBERS = {"+266696687", "+86282452253", "+7378742833", "+2562533"}
# A caller who reached the live hunt this recently (seconds) is not put through again: the
# call goes straight to voicemail (live/<number>.json holds when, for every instance).
LIVE_REPEAT_SECONDS = 600.0
# The texts of a page whose fate Twilio reports: the first one, its fallback, those of a
# voicemail that joined the page, notices and escalation texts.
TEXT_CHANNEL = re.compile(r"(mms|sms|sms_fallback)(:[A-Z]{2}[0-9a-zA-Z]{32})?"
                          r"|(notice|resolved|escalation|transcript_sms):[A-Za-z0-9_.@:-]{1,100}")


class PageBook:
    """This instance's copies of the pages it has seen, each with the ETag it was read or
    written with. A page write starts from the copy (If-Match its ETag), so it costs one
    request unless another instance changed the page meanwhile; the worker plans from the
    copies, so a scan reads only pages whose ETag in the listing changed. Pages with nothing
    left to do keep only their ETag (and the last few their copy); those done with (neither
    ringing nor listed) are what the done index names (DoneIndex)."""

    def __init__(self) -> None:
        self._working: dict[str, tuple[dict, str]] = {}
        self._quiet: OrderedDict[str, tuple[dict, str]] = OrderedDict()
        self._quiet_etags: dict[str, str] = {}
        self._since: dict[str, float] = {}  # time.monotonic() each page was last put here
        self._gone: OrderedDict[str, None] = OrderedDict()  # no longer in pages/ (archived)
        # every page in pages/ that rings, waits or is listed, as last put here: its opening
        # time, whether or not its copy is kept (STATUS counts them without a request)
        self._active: dict[str, tuple[str, float]] = {}
        # pages put here done with (no work, not shown first by STATUS), by the ETag read or
        # written, with the keys of their audit entries not known written yet (DoneIndex)
        self._done: dict[str, tuple[str, tuple[str, ...]]] = {}
        # once pages/ has been listed, every page in it is known here (a copy or an ETag)
        self.listed = False
        self._lock = threading.Lock()

    def get(self, page_id: str) -> tuple[dict, str] | None:
        with self._lock:
            return self._working.get(page_id) or self._quiet.get(page_id)

    def etag(self, page_id: str) -> str | None:
        with self._lock:
            known = self._working.get(page_id)
            return known[1] if known else self._quiet_etags.get(page_id)

    def gone(self, page_id: str) -> bool:
        with self._lock:
            return page_id in self._gone

    def put(self, page: dict, etag: str) -> None:
        """Keep a page as read or written; a copy older than the one kept (by `rev`: a read
        that began before a write here, or a write put after a later one) is left out."""
        page_id = page["id"]
        with self._lock:
            kept = self._working.get(page_id) or self._quiet.get(page_id)
            if kept is not None and page_rev(kept[0]) > page_rev(page):
                return
            self._since[page_id] = time.monotonic()
            self._gone.pop(page_id, None)
            if page.get("state") in SHOWN_FIRST:
                self._active[page_id] = (page["state"], float(page.get("opened") or 0))
            else:
                self._active.pop(page_id, None)
            if has_work(page) or page.get("state") in SHOWN_FIRST:
                self._done.pop(page_id, None)
            else:
                self._done[page_id] = (etag, tuple(
                    due["key"] for due in page.get("audit_due", [])))
            if has_work(page):
                self._working[page_id] = (page, etag)
                self._quiet.pop(page_id, None)
                self._quiet_etags.pop(page_id, None)
                return
            self._working.pop(page_id, None)
            self._quiet[page_id] = (page, etag)
            self._quiet.move_to_end(page_id)
            self._quiet_etags[page_id] = etag
            while len(self._quiet) > 200:
                self._quiet.popitem(last=False)

    def note_quiet(self, page_id: str, etag: str) -> None:
        """A page known to have nothing to do, without reading it (old and unchanged)."""
        with self._lock:
            if page_id not in self._working:
                self._quiet_etags[page_id] = etag
                self._since[page_id] = time.monotonic()

    def note_gone(self, page_id: str) -> None:
        """A page found missing from pages/ (moved to pages-done/) by a read, not a listing."""
        with self._lock:
            if page_id not in self._working and page_id not in self._quiet_etags:
                self._gone[page_id] = None
                while len(self._gone) > RECENT_PAGES:
                    self._gone.popitem(last=False)

    def note_done(self, page_id: str, etag: str) -> None:
        """A page the done index names with the ETag the listing shows: done with, unread."""
        with self._lock:
            if page_id not in self._working:
                self._quiet_etags[page_id] = etag
                self._since[page_id] = time.monotonic()
                self._done[page_id] = (etag, ())

    def done(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """{id: (ETag, audit keys to check)} of the pages known done with (DoneIndex)."""
        with self._lock:
            return dict(self._done)

    def keep_only(self, page_ids: set[str], listed_at: float) -> None:
        """Forget pages that are no longer in pages/: those missing from a listing that began
        after they were last put here (and remember the last RECENT_PAGES such ids)."""
        with self._lock:
            gone = [p for p, since in self._since.items()
                    if p not in page_ids and since < listed_at]
            for page_id in gone:
                for known in (self._working, self._quiet, self._quiet_etags, self._since,
                              self._active, self._done):
                    known.pop(page_id, None)
                self._gone[page_id] = None
            while len(self._gone) > RECENT_PAGES:
                self._gone.popitem(last=False)
            self.listed = True

    def working(self) -> list[tuple[dict, str]]:
        with self._lock:
            return list(self._working.values())

    def active(self) -> dict[str, tuple[str, float]]:
        """Pages that ring, wait for a config or are listed, as last seen here: {id: (state,
        opened)}, from memory (every page of pages/ once it has been listed, but for one
        listed and left alone for QUIET_AFTER before this process started: never read)."""
        with self._lock:
            return dict(self._active)


CONTACT_TEST_TEXT = "Test from oncall-pager: reply OK"
CONTACT_TEST_HOURS = 24  # an OK (or 1) counts within this long of the test


class ContactTests:
    """Whether a member's phone really gets the pager's texts and calls: a test (the command
    line's `test MEMBER [--call]`, or TEST by SMS) is noted in contacts/<member id>.json,
    and the member's OK (or 1 on the test call) within CONTACT_TEST_HOURS confirms it. Each
    is one conditional write with its audit entry; `config show` lists the confirmations."""

    def __init__(self, store: Store, audit: AuditLog):
        self.store = store
        self.audit = audit

    def state(self, member_id: str) -> tuple[dict, str | None]:
        found = read_json(self.store, f"contacts/{member_id}.json")
        return found if found else ({"member": member_id}, None)

    def _write(self, member_id: str, change: Callable[[dict], bool], event: str, actor: str,
               details: dict) -> bool:
        """Read, change, write conditionally (again over a newer version); False when
        `change` found nothing to do."""
        for _ in range(CONFIG_CHANGE_TRIES):
            record, etag = self.state(member_id)
            record = copy.deepcopy(record)
            if not change(record):
                return False
            try:
                self.store.put(f"contacts/{member_id}.json", to_json(record),
                               **({"if_match": etag} if etag else {"if_absent": True}))
            except StoreConflict:
                continue
            self.audit.record(event, actor, {"member": member_id, **details})
            return True
        raise StoreUnavailable("contacts/ kept changing")

    def tested(self, member_id: str, via: str, actor: str) -> None:
        def note(record: dict) -> bool:
            record["tested"], record["tested_via"] = time.time(), via
            return True
        self._write(member_id, note, "contact.tested", actor, {"via": via})

    def confirmed(self, member_id: str, via: str) -> bool:
        """The member's answer: True when a test within CONTACT_TEST_HOURS waited for it."""
        def note(record: dict) -> bool:
            tested = record.get("tested") or 0
            if time.time() - tested > CONTACT_TEST_HOURS * 3600 or (
                    record.get("confirmed") or 0) >= tested:
                return False
            record["confirmed"], record["confirmed_via"] = time.time(), via
            return True
        return self._write(member_id, note, "contact.confirmed", member_id, {"via": via})

    def summary(self, doc: dict) -> str:
        """`contact last confirmed: alice 2026-12-06 15:02 UTC (sms), bob never`."""
        said = []
        for member_id in members(doc):
            record, _ = self.state(member_id)
            when = record.get("confirmed")
            said.append(f"{member_id} {short_time(when)} ({record.get('confirmed_via')})"
                        if when else f"{member_id} never")
        return "contact last confirmed: " + ", ".join(said)


class QuietHours:
    """Quiet hours for monitoring (SPEC 21): a maintenance window in which alert triggers
    and missed heartbeats are recorded, e-mailed and listed and nothing rings for them (their
    pages are *hushed*; the escalation of alert pages open already waits, see
    Worker._consider_page), while voicemails and live calls page as always: customers are
    never silenced. By SMS (`QUIET 2h [reason]`, confirmed with C like TAKE; `QUIET OFF`)
    or `oncall-pager quiet`.

    The window is `current_config.quiet` ({since, until, reason, by}): started and ended with
    one conditional write of the config each, with its audit entry (`quiet.started`,
    `quiet.ended`). It ends by itself: once `until` has passed, the worker of any instance
    writes its end (after a stop too, at the next start), and the one text "Quiet ended: N
    alerts still open." travels with that write as a message job keyed by the window (as a
    handoff's texts do), so it is sent once however many instances look. The hushed pages
    then ring, each by its own conditional write (Upkeep._ring_after_quiet), whoever sees
    the config without a window first: a stop in between loses none of them."""

    def __init__(self, team: TeamConfig, store: Store, book: PageBook, audit: AuditLog,
                 message_job: Callable[..., tuple[str, dict]],
                 start_message: Callable[[str, dict], None]):
        self.team = team
        self.store = store
        self.book = book
        self.audit = audit
        self.message_job = message_job
        self.start_message = start_message

    # --- by SMS: QUIET 2h [reason], C, QUIET OFF (X is Team.cancel) -------------------------

    def command(self, snap: Snapshot, member: dict, args: list[str], body: str) -> str:
        """QUIET alone: whether quiet hours are on. QUIET OFF: they end now. QUIET 2h
        [reason]: a pending confirmation (sessions/<member>.json, as TAKE's), replaced by a
        later TAKE or QUIET; nothing changes before C."""
        now = time.time()
        if not args:
            return quiet_status(snap.doc, now) or (
                f"Quiet hours are off: alerts ring. Send {QUIET_USAGE}.")
        if args[0].upper() == "OFF":
            if snap.stale:
                return STORE_DOWN_TEXT
            oncall = oncall_member(snap.doc)
            ended, still_open = self.end(member["id"], via="sms",
                                         tell=oncall["id"] != member["id"], snap=snap)
            if ended is None:
                return "Quiet hours are off already: alerts ring. Nothing changes."
            told = ("" if oncall["id"] == member["id"] else
                    f" {first_name(oncall)} has been told.")
            return f"Okay, {first_name(member)}. {quiet_ended_text(still_open)}{told}"
        seconds = quiet_length(args[0])
        if seconds is None:
            return f"Send {QUIET_USAGE}."
        if seconds > QUIET_MAX:
            return (f"Quiet hours last at most 8 h ({args[0]} is longer). Nothing changes; "
                    "send QUIET 8h or less.")
        parts = body.split(maxsplit=2)
        reason = quiet_reason(parts[2]) if len(parts) > 2 else ""
        lifetime = session_lifetime(snap.doc)
        session = {"member": member["id"], "created": now, "expires": now + lifetime,
                   "action": "quiet", "seconds": seconds, "reason": reason}
        in_parallel(IO_POOL, lambda: self.store.put(f"sessions/{member['id']}.json",
                                                    to_json(session)),
                    lambda: self.audit.record("session.started", member["id"], {
                        "action": "quiet", "seconds": seconds,
                        "expires": iso_time(now + lifetime)}))
        why = f" ({reason})" if reason else ""
        return (f"Quiet hours for {duration_text(seconds)}{why}: alerts will be listed and "
                "e-mailed, not rung; voicemails and calls still page. Reply C to confirm or "
                f"X to cancel (within {lifetime} seconds).")

    def confirm(self, snap: Snapshot, member: dict, session: tuple[dict, str]) -> str:
        """C after QUIET: the window starts now. A C sent again after a stop between the
        write and the session's delete finds its window (`asked`) and writes nothing."""
        asked = session[0]
        lifetime = session_lifetime(snap.doc)
        if asked.get("expires", 0) < time.time():
            return (f"No pending QUIET. Send QUIET again and reply C within {lifetime} "
                    "seconds.")
        window = quiet_window(snap.doc)
        if not window or window.get("asked") != asked.get("created"):
            snap = self.start(member["id"], int(asked["seconds"]), str(asked.get("reason", "")),
                              via="sms", asked=asked.get("created"), snap=snap)
        with contextlib.suppress(StoreUnavailable):
            self.store.delete(f"sessions/{member['id']}.json")
        until = quiet_until(snap.doc, time.time()) or time.time()
        return (f"Okay, {first_name(member)}, quiet hours until {short_time(until)}: alerts "
                "are listed and e-mailed, not rung; voicemails and calls still page. "
                "QUIET OFF ends them.")

    # --- the window: one conditional write of the config to start it, one to end it -------

    def start(self, actor: str, seconds: int, reason: str, via: str,
              asked: float | None = None, snap: Snapshot | None = None) -> Snapshot:
        """Quiet hours from now for `seconds` (at most QUIET_MAX: the config's check refuses
        more). A window in force is replaced (its end text is not sent: the new one's is).
        A race with another config change is made again over it."""
        snap = snap or self.team.read()
        for _ in range(CONFIG_CHANGE_TRIES):
            if snap.stale:
                raise StoreUnavailable(self.team.problem or "store unreachable")
            now = float(int(time.time()))  # whole seconds: `until - since` is exact
            doc = copy.deepcopy(snap.doc)
            previous = quiet_window(doc)
            window = {"since": iso_time(now), "until": iso_time(now + seconds),
                      "reason": reason, "by": actor}
            if asked is not None:
                window["asked"] = asked
            doc["current_config"]["quiet"] = window
            details = {"via": via, "since": window["since"], "until": window["until"],
                       "reason": reason}
            if previous:
                details["replaces"] = previous.get("until")
            try:
                return self.team.write(doc, base=snap, actor=actor, details=details,
                                       event="quiet.started")
            except StoreConflict:
                snap = self.team.read()
        raise StoreUnavailable("the config kept changing")

    def end(self, actor: str, via: str, tell: bool = True, snap: Snapshot | None = None
            ) -> tuple[Snapshot | None, int]:
        """The window ends now (`via` expired: only if `until` has passed, as the config
        says now). Returns the config written (None: no window to end) and how many alert
        pages ring again; with `tell`, the on-call engineer gets quiet_ended_text, queued
        with the write."""
        snap = snap or self.team.read()
        for _ in range(CONFIG_CHANGE_TRIES):
            if snap.stale:
                raise StoreUnavailable(self.team.problem or "store unreachable")
            window = quiet_window(snap.doc)
            if window is None or (via == "expired" and
                                  quiet_until(snap.doc, time.time()) is not None):
                return None, 0
            still_open = self.still_ringing()
            doc = copy.deepcopy(snap.doc)
            del doc["current_config"]["quiet"]
            oncall = oncall_member(doc)
            since = utc_seconds(window.get("since")) or time.time()
            told = [self.message_job(oncall["phone"], quiet_ended_text(still_open), "quiet",
                                     name=f"quiet-{sortable_stamp(since)}")
                    ] if tell and not oncall.get("opted_out") else []
            details = {"via": via, "still_open": still_open,
                       **{k: window.get(k) for k in ("since", "until", "reason", "by")}}
            try:
                new = self.team.write(doc, base=snap, actor=actor, details=details,
                                      messages=told, event="quiet.ended")
            except StoreConflict:
                snap = self.team.read()
                continue
            log.info("event=quiet.ended via=%s still_open=%d", via, still_open)
            for message in new.queued:
                self.start_message(*message)
            return new, still_open
        raise StoreUnavailable("the config kept changing")

    def still_ringing(self) -> int:
        """Alert pages that ring once quiet hours end (rings_after_quiet): from the book when
        the worker here has listed pages/; otherwise (the command line) the alert and
        heartbeat pages changed in the store within two days, read at once."""
        if self.book.listed:
            return sum(1 for page, _ in self.book.working() if rings_after_quiet(page))
        since = time.time() - 2 * DAY
        keys = [key for key, (_, modified) in self.store.versions("pages/").items()
                if modified >= since and key.startswith(("pages/AL", "pages/HB"))]
        found = IO_POOL.map(lambda key: read_json(self.store, key), keys)
        return sum(1 for item in found if item and rings_after_quiet(item[0]))


# A repeat of an open alert page's dedup_key is answered from memory (AlertRepeats) and its
# count written on the page at most once per page in this many seconds.
REPEAT_FLUSH_SECONDS = 2.0
OPENING_WAIT = 5.0  # s a trigger waits for the create of its dedup_key's page by another request
# dedup_key -> the generation of its page last seen here (alerts/ as last read or written):
# the first guess of a new trigger's page id, checked beside its create (see Alerts.trigger)
GENERATIONS_KEPT = 10_000


class AlertRepeats:
    """Repeats of open alert pages, counted in memory and written later: what a storm of
    events is made of (a monitor re-sending what still fires, several monitors sending the same
    dedup_key). A repeat of a page the book knows, that the trigger joins and does not change
    (see Alerts.trigger) is answered at once, with no store request; the worker writes its
    count on the page in one conditional write per page at most every REPEAT_FLUSH_SECONDS
    (`flush`, given by the Pager: Alerts._write_repeats, which also opens a new page for
    repeats that came after the page stopped joining, say resolved on the other instance
    since the book's copy). A stop may lose a count, never a page: a page is only ever opened
    by a create before its trigger is answered."""

    def __init__(self, flush: Callable[[str, dict], None], wake: Callable[[], None],
                 every: float = REPEAT_FLUSH_SECONDS):
        self._flush = flush
        self._wake = wake  # the worker: it plans the write of a page's first count waiting
        self.every = every
        # page id -> {"count", "integration", "dedup_key", "alert" (the latest), "since" (the
        # first, time.time()), "last" (the latest)}
        self._pending: dict[str, dict] = {}
        self._lock = threading.Lock()

    def add(self, page_id: str, integration: str, dedup_key: str, alert: dict) -> None:
        now = time.time()
        with self._lock:
            first = page_id not in self._pending
            pending = self._pending.setdefault(page_id, {
                "count": 0, "integration": integration, "dedup_key": dedup_key, "since": now})
            pending.update(count=pending["count"] + 1, alert=alert, last=now)
        METRICS.count("oncall_alert_repeats_total", path="memory")
        if first:
            self._wake()

    def pending(self) -> int:
        with self._lock:
            return sum(p["count"] for p in self._pending.values())

    def due_at(self) -> float | None:
        """When the oldest count waiting is to be written (time.time()), or None."""
        with self._lock:
            first = min((p["since"] for p in self._pending.values()), default=None)
        return None if first is None else first + self.every

    def flush_due(self, now: float | None = None) -> None:
        """Write the counts that waited REPEAT_FLUSH_SECONDS (all of them with now=inf); a
        count the store did not take waits for the next round."""
        before = (time.time() if now is None else now) - self.every
        with self._lock:
            due = {page_id: pending for page_id, pending in self._pending.items()
                   if pending["since"] <= before}
            for page_id in due:
                del self._pending[page_id]
        for page_id, pending in due.items():
            try:
                self._flush(page_id, pending)
            except (StoreUnavailable, StoreConflict, NoConfig, ConfigError) as e:
                log.warning("event=alert.repeats_unwritten page=%s repeats=%d error=%r",
                            page_id, pending["count"], str(e)[:200])
                with self._lock:
                    later = self._pending.get(page_id)
                    if later is None:
                        self._pending[page_id] = {**pending, "since": time.time()}
                    else:
                        later.update(count=later["count"] + pending["count"],
                                     since=min(later["since"], pending["since"]))


class Pager:
    """The domain's shared parts, and its rooms. It holds what every room uses (the
    store, the audit log, the operational config (`team`), the PageBook, the spool, this
    instance's name) and the hooks the Worker sets (`start_work`, `start_message`, `wake`);
    each room (Pages, Team, Alerts, LiveCalls, Commands) owns its own state changes and is
    reached as `pager.pages`, `pager.oncall`, `pager.alerts`, `pager.calls`,
    `pager.commands`. It knows the store only through the Store interface, and sends nothing
    itself: outbound messages are durable (a page's deliveries, or a message job), and the
    Worker sends them. A change that queues something marks it claimed by this instance and
    hands it to the worker at once (`hand_over`), so nothing waits for a scan."""

    def __init__(self, cfg: AppConfig, store: Store, instance: str | None = None):
        self.cfg = cfg
        self.store = store
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.audit = AuditLog(store, self.instance)
        # The last good config on local disk matters only for S3: a local directory store
        # that cannot be read cannot be backed up by a file beside it either.
        cache = (resolve_path(cfg, cfg.cache_file)
                 if cfg.cache_file and isinstance(store, S3Store) else None)
        self.team = TeamConfig(store, cfg.config_key, self.audit, cache)
        self.team.changed = lambda: self.wake()
        # Pages that arrive while S3 is unreachable wait here, on local disk (see open_page).
        self.spool = (DirectoryStore(resolve_path(cfg, cfg.spool_dir))
                      if isinstance(store, S3Store) and cfg.spool_dir else None)
        self.book = PageBook()
        self.contacts = ContactTests(store, self.audit)
        # Set by the Worker; without one, work is queued unclaimed for a worker elsewhere.
        self.start_work: Callable[..., None] | None = None
        self.start_message: Callable[[str, dict], None] | None = None
        self.wake: Callable[[], None] = lambda: None
        self.quiet_hours = QuietHours(
            self.team, store, self.book, self.audit,
            lambda *job, **named: self.oncall.message_job(*job, **named),
            lambda key, job: self.start_message(key, job) if self.start_message else None)

        self.overrides = Overrides(self)
        # The rooms, each the owner of its own state changes
        self.pages = Pages(self)
        self.oncall = Team(self)
        self.alerts = Alerts(self)
        self.heartbeats = Heartbeats(self)
        self.calls = LiveCalls(self)
        self.commands = Commands(self)

    def hand_over(self, store: Store, page: dict, etag: str, channels: list[str],
                  doc: dict | None = None) -> None:
        """After a write that queued `channels` (claimed for this instance, see claim_until):
        the worker sends them at once and writes the page's audit entries; with no worker
        here, or nothing to send, the entries are written now."""
        if channels and self.start_work is not None:
            self.start_work(store, page, etag, channels, doc)
            return
        for due in page.get("audit_due", []):
            if not self.audit.written(due["key"]):
                self.audit.write(due["key"], due["entry"])

    def claim_until(self) -> float:
        """The claim a change takes on what it queues: only when a worker here will send it."""
        return time.time() + self.cfg.claim_timeout if self.start_work is not None else 0.0


# --- Pages: open, join, number, acknowledge, resolve, archive ---------------------------------


class Pages:
    """Pages: open (or join) a page, find it, number it, acknowledge it, resolve it, note a
    text that failed or a call nobody took, and move it to pages-done/ once it is quiet. The
    other rooms open and change pages through it (_create_page, write_page): one conditional
    write over the PageBook's copy, handed to the worker (Pager.hand_over) with its audit
    entries."""

    def __init__(self, pager: Pager):
        self.pager = pager
        self.store, self.audit, self.team, self.book = (
            pager.store, pager.audit, pager.team, pager.book)
        self._counter: tuple[dict, str] | None = None  # counters/pages.json as last seen
        self._counter_lock = threading.Lock()

    def open_page_count(self) -> int:
        """Pages still ringing (open, not acknowledged): the book's, once the worker here has
        listed pages/; otherwise (the command line) read from the store, the pages changed
        in the last two days (an open page is closed a day after it started to ring)."""
        if self.book.listed:
            return sum(1 for page, _ in self.book.working() if page.get("state") == "open")
        since = time.time() - 2 * DAY  # QUIET_AFTER
        keys = [key for key, (_, modified) in self.store.versions("pages/").items()
                if modified >= since]
        found = IO_POOL.map(lambda key: read_json(self.store, key), keys)
        return sum(1 for item in found if item and item[0].get("state") == "open")

    # --- pages ---------------------------------------------------------------------------------

    def open_page(self, page_id: str, kind: str, caller: dict, call_sid: str,
                  recording_url: str = "", duration: int = 0,
                  live_tried: list[str] | None = None) -> tuple[dict, bool]:
        """Open a page (voicemail or missed call) and start its deliveries. Idempotent: the id
        comes from the RecordingSid (or CallSid), so Twilio's retried callback finds the same
        page. While S3 is unreachable the page goes to the local spool instead: the worker
        delivers it from there and moves it into the store when S3 is back.
        With no valid config to page by (none, or an invalid one, and no last good copy),
        the page waits for one (see wait_for_config). Returns (page, created)."""
        try:
            snap = self.team.read(max_age=PAGE_CONFIG_MAX_AGE)
            joined = self._join_open_page(snap, page_id, kind, caller, call_sid,
                                          recording_url, duration)
            if joined is not None:
                return joined, False
            return self._open_page(self.store, page_id, kind, caller, call_sid, recording_url,
                                   duration, live_tried)
        except (NoConfig, ConfigError):
            return self.wait_for_config(self.store, page_id, kind, caller, call_sid,
                                        recording_url, duration, live_tried)
        except StoreUnavailable as e:
            if self.pager.spool is None or isinstance(e, StoreUncertain):
                raise
            log.warning("event=page.spooled page=%s reason=store_unavailable", page_id)
            try:
                return self._open_page(self.pager.spool, page_id, kind, caller, call_sid,
                                       recording_url, duration, live_tried)
            except StoreUnavailable:  # and no config was ever known here
                return self.wait_for_config(self.pager.spool, page_id, kind, caller, call_sid,
                                            recording_url, duration, live_tried)

    def wait_for_config(self, store: Store, page_id: str, kind: str, caller: dict,
                        call_sid: str, recording_url: str, duration: int,
                        live_tried: list[str] | None = None) -> tuple[dict, bool]:
        """No config says whom to page (the stored one is invalid or missing and no last good
        copy is known), yet the caller's voicemail must not be lost: the page is created in
        state `waiting` (one conditional create, as a page is, with its `page.waiting`
        entry), it rings nobody, and the worker of any instance opens it (open_waiting) as
        soon as it reads a valid config. In the spool while the store is unreachable too."""
        now = time.time()
        page = {"id": page_id, "number": None, "kind": kind, "opened": now, "oncall": {},
                "paged": [], "state": "waiting", "acked_by": None, "acked_at": None,
                "deliveries": {}, "escalation": {"next_due": now, "step": 0,
                                                 "claimed_until": 0},
                "caller": caller, "call_sid": call_sid, "recording_url": recording_url,
                "duration": duration, **({"live_tried": live_tried} if live_tried else {})}
        key, entry = self.audit.entry("page.waiting", "twilio", {
            "page": page_id, "kind": kind, "caller": caller, "duration": duration,
            "reason": "no valid operational config"})
        page["audit_due"] = [{"key": key, "entry": entry}]
        log.error("event=page.waiting page=%s reason=no_valid_config", page_id)
        try:
            etag = store.put(f"pages/{page_id}.json", to_json(page), if_absent=True)
        except StoreConflict:  # Twilio's retry: the page waits (or was opened) already
            existing = read_json(store, f"pages/{page_id}.json")
            if existing is None:
                raise StoreUncertain(f"pages/{page_id}.json exists but cannot be read"
                                     ) from None
            return existing[0], False
        if store is self.store:
            self.book.put(page, etag)
            self.pager.hand_over(store, page, etag, [])  # its entry, now
        self.pager.wake()
        return page, True

    def open_waiting(self, page_id: str) -> bool:
        """Open a page that waited for a valid config, as open_page would have opened it then:
        the on-call engineer paged now, its first deliveries queued and claimed by this
        instance in the same conditional write (of two instances, one opens it), the
        escalation and the day it may ring counted from now; `opened` stays the time of the
        call. Returns whether this call opened it."""
        snap = self.team.read(max_age=PAGE_CONFIG_MAX_AGE)
        claimed_until = self.pager.claim_until()
        channels: list[str] = []

        def open_(waiting: dict | None) -> dict | None:
            if waiting is None or waiting.get("state") != "waiting":
                return None
            kind = waiting.get("kind", "voicemail")
            page = new_page(page_id, kind, snap.doc, caller=waiting.get("caller", {}),
                            call_sid=waiting.get("call_sid", ""),
                            recording_url=waiting.get("recording_url", ""),
                            duration=waiting.get("duration", 0),
                            **({"live_tried": waiting["live_tried"]}
                               if waiting.get("live_tried") else {}))
            page.update(number=waiting.get("number"), opened=waiting["opened"],
                        ringing_since=page["opened"])
            channels[:] = ["mms", "email", "archive"] if kind == "voicemail" else ["sms", "email"]
            if page["oncall"].get("opted_out"):  # texts are blocked: the first call at once
                channels[:] = [c for c in channels if c not in ("mms", "sms")]
                page["escalation"]["next_due"] = page["ringing_since"]
            channels.extend(pushed(page, snap.doc))
            for channel in channels:
                add_delivery(page, channel, claimed_until)
            key, entry = self.audit.entry("page.opened", "twilio", {
                "page": page_id, "kind": kind, "caller": page["caller"],
                "duration": page["duration"], "oncall": page["oncall"]["id"],
                "waited": round(page["ringing_since"] - page["opened"], 1)})
            page["audit_due"] = [*waiting.get("audit_due", []), {"key": key, "entry": entry}]
            return page

        written = self.write_page(self.store, page_id, open_)
        if written is None:
            return False
        METRICS.count("oncall_pages_opened_total", kind=written[0]["kind"])
        log.info("event=page.opened_after_wait page=%s", page_id)
        self.pager.hand_over(self.store, *written, channels, snap.doc)
        self.pager.wake()
        return True

    def _open_page(self, store: Store, page_id: str, kind: str, caller: dict, call_sid: str,
                   recording_url: str, duration: int, live_tried: list[str] | None = None
                   ) -> tuple[dict, bool]:
        """The page path: the config (from memory if checked within PAGE_CONFIG_MAX_AGE), then
        one conditional create (see _create_page). The worker sends the MMS as soon as this
        returns; the audit entry, the page number and the archive follow off this path."""
        snap = self.team.read(max_age=PAGE_CONFIG_MAX_AGE)
        page = new_page(page_id, kind, snap.doc, caller=caller, call_sid=call_sid,
                        recording_url=recording_url, duration=duration,
                        **({"live_tried": live_tried} if live_tried else {}))
        channels = ["mms", "email", "archive"] if kind == "voicemail" else ["sms", "email"]
        return self._create_page(store, page, channels, snap.doc, "twilio", {
            "caller": caller, "duration": duration})

    def _create_page(self, store: Store, page: dict, channels: list[str], doc: dict,
                     actor: str, details: dict) -> tuple[dict, bool]:
        """One conditional create of pages/<id>.json, which is the page, its queue entry, the
        claim of its first deliveries by this instance and its `page.opened` entry at once.
        No read first: the create's If-None-Match detects a retry (Twilio's, or a monitor's)
        and a second instance opening the same page. Returns (page, created)."""
        page_id = page["id"]
        channels = self._prepare_page(page, channels, doc, actor, details)
        try:
            etag = store.put(f"pages/{page_id}.json", to_json(page), if_absent=True)
        except StoreConflict:  # a retried write that had landed, or a concurrent duplicate
            existing = self._stored_after_conflict(store, page_id)
            if store is self.store:
                self.book.put(*existing)
            return existing[0], False
        METRICS.count("oncall_pages_opened_total", kind=page["kind"])
        if store is self.store:
            self.book.put(page, etag)
        self.pager.hand_over(store, page, etag, channels, doc)
        self.pager.wake()
        return page, True

    def _prepare_page(self, page: dict, channels: list[str], doc: dict, actor: str,
                      details: dict) -> list[str]:
        """A new page made ready for its create: its first deliveries claimed by this
        instance (no text for an engineer who opted out: the first call at once instead; the
        push topic too, see pushed) and its `page.opened` entry inside. Returns the channels
        queued."""
        claimed_until = self.pager.claim_until()
        if page["state"] == "open" and page["oncall"].get("opted_out"):
            # texts are blocked: the first call goes at once instead
            channels = [c for c in channels if c not in ("mms", "sms")]
            page["escalation"]["next_due"] = page["opened"]
        channels += pushed(page, doc)
        for channel in channels:
            add_delivery(page, channel, claimed_until)
        key, entry = self.audit.entry("page.opened", actor, {
            "page": page["id"], "kind": page["kind"], **details,
            "oncall": page["oncall"]["id"]})
        page["audit_due"] = [{"key": key, "entry": entry}, *page.get("audit_due", [])]
        return channels

    def _join_open_page(self, snap: Snapshot, page_id: str, kind: str, caller: dict,
                        call_sid: str, recording_url: str, duration: int) -> dict | None:
        """Junk calls must not be able to page again and again: a call from a number that has
        an open page joins that page (`page.repeated`, no new escalation). A missed call adds
        nothing to send; a voicemail is still delivered (MMS, e-mail, archive) as part of the
        open page. The open pages are the book's: this instance knows every page opened in
        the store up to `poll_interval` ago.

        A repeat is as fast as a page: one conditional create of its own record,
        pages/<RecordingSid or CallSid>.json in state `joined` (new_repeat), is all that
        comes before its MMS. The create makes it durable, claims its deliveries for this
        instance, carries its `page.repeated` entry, and meets Twilio's retry (or another
        instance that opened a page under the same id) with If-None-Match, so its MMS goes
        once. The open page learns of it after the MMS (the `join` channel, fold_repeat),
        retried like any delivery. Returns the page joined (or what Twilio's retry meets
        stored), or None to open a page of its own."""
        number = caller.get("number")
        if not is_e164(number) or number in WITHHELD_NUMBERS:
            return None  # different callers who withhold their number are not one caller
        candidates = sorted((p for p, _ in self.book.working() if p.get("state") == "open"
                             and number and p.get("caller", {}).get("number") == number
                             and p["id"] != page_id), key=lambda p: p["opened"])
        if not candidates:
            return None
        page = candidates[0]
        oncall = members(snap.doc).get(page["oncall"]["id"], {})
        texts = ["email", "archive"] if oncall.get("opted_out") else ["mms", "email", "archive"]
        channels = [*(texts if kind == "voicemail" else []), "join"]
        repeat = new_repeat(page, page_id, kind, caller, call_sid, recording_url, duration)
        claimed_until = self.pager.claim_until()
        for channel in channels:
            add_delivery(repeat, channel, claimed_until)
        key, entry = self.audit.entry("page.repeated", "twilio", {
            "page": page["id"], "number": page.get("number"), "repeat": page_id,
            "kind": kind, "caller": caller, "duration": duration})
        repeat["audit_due"] = [{"key": key, "entry": entry}]
        try:
            etag = self.store.put(f"pages/{page_id}.json", to_json(repeat), if_absent=True)
        except StoreConflict:  # Twilio's retry: joined (or opened) already
            existing = self._stored_after_conflict(self.store, page_id)
            self.book.put(*existing)
            return existing[0]
        self.book.put(repeat, etag)
        self.pager.hand_over(self.store, repeat, etag, channels, snap.doc)
        self.pager.wake()
        return page

    def _stored_after_conflict(self, store: Store, page_id: str) -> tuple[dict, str]:
        """What a create of pages/<id>.json that lost met there (a retried write that had
        landed, or a concurrent duplicate); StoreUncertain when it cannot be read."""
        try:
            existing = read_json(store, f"pages/{page_id}.json")
        except StoreUnavailable as e:
            raise StoreUncertain(str(e)) from None
        if existing is None:
            raise StoreUncertain(f"pages/{page_id}.json exists but cannot be read") from None
        return existing

    def fold_repeat(self, repeat: dict) -> None:
        """The open page learns of a repeat that joined it (its `repeats`, see fold_in): off
        the caller's path, the `join` channel of the repeat's record, so a stop before it is
        made good by whichever instance takes the channel over. A page moved out of pages/
        meanwhile is left alone (the repeat's record tells)."""
        self.write_page(self.store, repeat["joins"], lambda page: fold_in(page, repeat))

    def write_page(self, store: Store, page_id: str, change: Callable[[dict | None], dict | None],
                   tries: int = 8, from_copy: bool = True) -> tuple[dict, str] | None:
        """Every change to a page goes through here: a conditional write that starts from the
        book's copy (`from_copy`; see update_json for when a copy may be used), settles the
        page's audit entries known written, and keeps the book up to date."""
        def changed(page: dict | None) -> dict | None:
            rev = page_rev(page) + 1 if page is not None else 0
            new = change(page)
            if new is not None:
                new["rev"] = rev
                settle_audit(new, self.audit)
                if new.get("alert", {}).get("unchecked") and self.pager.alerts.checked(page_id):
                    del new["alert"]["unchecked"]  # (see Alerts.open_alert_at_once)
            return new

        in_book = store is self.store
        known = self.book.get(page_id) if from_copy and in_book else None
        written = update_json(store, f"pages/{page_id}.json", changed, tries, known,
                              seen=(lambda found: self.book.put(*found)) if in_book else None)
        if written is not None and store is self.store:
            self.book.put(*written)
        return written

    def read_page(self, page_id: str) -> tuple[dict, str] | None:
        """A page as the store has it now: a conditional read when the book has a copy (an
        unchanged page costs a 304), a plain one otherwise."""
        key = f"pages/{page_id}.json"
        known = self.book.get(page_id)
        blob = self.store.get(key, unless_etag=known[1] if known else None)
        if blob is UNCHANGED and known is not None:
            return known
        doc = json_object(blob.data) if blob is not None and blob is not UNCHANGED else None
        if doc is None or blob is None:
            return None
        self.book.put(doc, blob.etag)
        return doc, blob.etag

    def find_page(self, page_id: str) -> tuple[dict, str] | None:
        """A page wherever it is: in pages/, or moved to pages-done/ (see archive), for what
        shows pages (STATUS, ACK n, the command line); changes are made to pages/ only."""
        def done() -> tuple[dict, str] | None:
            return read_json(self.store, f"{DONE_PAGES}{page_id}.json")

        if self.book.gone(page_id):  # the worker's listing no longer has it: moved, most likely
            return done() or self.read_page(page_id)
        return self.read_page(page_id) or done()

    def archive(self, page: dict, etag: str, doc: dict | None) -> bool:
        """Move a page that is archivable and unchanged since QUIET_AFTER to pages-done/, so
        that pages/, which every instance lists once a poll_interval, holds only pages that
        can still need work. An alert page's dedup_key first moves on to the next generation
        (alerts/), so that it never opens a page with the id of a page moved out; a missed
        heartbeat's page stays while the heartbeat has not pinged since (a restart would
        open it again). The copy is written before the page is deleted, and only if the page
        is still unchanged (nothing changes a page like this, but a check is cheap): a stop in
        between leaves both, the same page, and the next try finishes the move. Returns
        whether it moved the page."""
        alert = page.get("alert", {})
        if page.get("kind") == "alert" and page.get("state") == "acknowledged" and \
                not has_work(page) and not joins(page, time.time()):
            # superseded: its dedup_key fired again a day after the ACK and has a later page
            index = read_json(self.store, alert_index_key(alert["integration"],
                                                          alert["dedup_key"]))
            if not index or int(index[0].get("generation", 0)) <= alert["generation"]:
                return False
        elif not archivable(page):
            return False
        if page.get("kind") == "heartbeat" and (doc is None or heartbeat_basis(
                self.pager.heartbeats.state(alert["heartbeat"])[0]) == alert["basis"]):
            return False
        if page.get("kind") == "alert":
            self._note_generation(alert["integration"], alert["dedup_key"],
                                  alert["generation"] + 1)
        self.store.put(f"{DONE_PAGES}{page['id']}.json", to_json(page))
        if self.store.get(f"pages/{page['id']}.json", unless_etag=etag) is not UNCHANGED:
            return False
        self.store.delete(f"pages/{page['id']}.json")
        return True

    def page(self, page_id: str) -> dict | None:
        """One page by id (as the page-call URLs carry it), or None; never a path outside
        pages/, whatever the id."""
        if not PAGE_ID.fullmatch(page_id):
            return None
        try:
            found = self.read_page(page_id)
        except StoreUnavailable:  # an outage: a page the spool holds still answers its call
            found = read_json(self.pager.spool,
                              f"pages/{page_id}.json") if self.pager.spool else None
            if found is None:
                raise
        return found[0] if found else None

    def page_number(self, page_id: str, opened: float) -> int:
        """A short number people can type (`ACK 3`), from counters/pages.json, which also lists
        the recent pages for STATUS and ACK without listing the whole pages/ folder. Asked
        again for the same page, it gives the same number. The counter as this instance last
        wrote it is the starting copy, so allocating costs one write. The number is indexed
        too (numbers/<n>.json, see index_number), so that `ACK n` finds a page however many
        came after it."""
        chosen: list[int] = []

        def allocate(doc: dict | None) -> dict | None:
            doc = doc or {"next": 1, "recent": []}
            for item in doc["recent"]:
                if item["id"] == page_id:
                    chosen[:] = [item["number"]]
                    return None
            chosen[:] = [doc["next"]]
            doc["recent"] = (doc["recent"] + [{"number": doc["next"], "id": page_id,
                                               "opened": opened}])[-RECENT_PAGES:]
            doc["next"] += 1
            return doc

        with self._counter_lock:
            written = update_json(self.store, "counters/pages.json", allocate,
                                  known=self._counter)
            if written is not None:
                self._counter = written
        IO_POOL.submit(self.index_number, chosen[0], page_id, opened)
        return chosen[0]

    def index_number(self, number: int, page_id: str, opened: float) -> None:
        """numbers/<n>.json: page number -> page id, one small object per number, created
        once (a conditional create, so a second instance or a second ask writes nothing
        new) and never listed: `ACK n` costs one read of it, at 10,000 pages as at 10. Off the
        page path (a text waits for its number, not for this); should a stop or an outage
        lose it, the counter's recent list still names the page for RECENT_PAGES more pages,
        and asking the page's number again writes it."""
        try:
            put_once(self.store, f"numbers/{number}.json",
                     {"number": number, "id": page_id, "opened": opened})
        except StoreUnavailable as e:
            log.warning("event=page.number_unindexed number=%d page=%s error=%r", number,
                        page_id, str(e)[:200])

    def recent_items(self) -> list[dict]:
        """The most recent pages ({number, id, opened}), newest first (a 304 when nothing was
        opened)."""
        with self._counter_lock:
            known = self._counter
        blob = self.store.get("counters/pages.json", unless_etag=known[1] if known else None)
        if blob is not UNCHANGED or known is None:
            doc = json_object(blob.data) if blob is not None else None
            known = (doc, blob.etag) if doc is not None and blob is not None else None
            with self._counter_lock:
                self._counter = known
        return list(reversed((known[0] if known else {}).get("recent", [])))

    def recent_pages(self, limit: int = RECENT_PAGES, fresh: bool = True,
                     skip_quiet: bool = False) -> list[dict]:
        """The most recent pages, newest first: as the store has them now, or with
        fresh=False from the book's copies where it has them (for ACK, which checks with its
        conditional write); `skip_quiet` leaves out pages the book knows are done with."""
        found = []
        for item in self.recent_items()[:limit]:
            page_id = item["id"]
            if skip_quiet and self.book.get(page_id) is None and (
                    self.book.etag(page_id) or self.book.gone(page_id) or (
                        self.book.listed and item["opened"] < time.time() - QUIET_AFTER)):
                continue  # quiet, or moved out of pages/ (see archive), or not in its listing
            known = None if fresh else self.book.get(page_id)
            page = known or (self.read_page(page_id) if skip_quiet else self.find_page(page_id))
            if page is not None:
                found.append(page[0])
        return found

    def page_by_number(self, number: int) -> dict | None:
        """Found through counters/pages.json, which gives the number before the page's own
        copy has it written, and for an older page through its entry in numbers/ (see
        index_number): a few requests whatever the number of pages, wherever the page is
        (pages/ or pages-done/)."""
        self.recent_items()
        with self._counter_lock:
            counter = self._counter[0] if self._counter else {}
        page_id = next((item["id"] for item in counter.get("recent", [])
                        if item["number"] == number), None)
        if page_id is None and 0 < number < int(counter.get("next", 1)):
            indexed = read_json(self.store, f"numbers/{number}.json")
            page_id = str(indexed[0].get("id", "")) if indexed else None
        if page_id is None or not PAGE_ID.fullmatch(page_id):
            return None
        found = self.book.get(page_id) or self.find_page(page_id)
        return {**found[0], "number": number} if found else None

    def number_of(self, page: dict) -> int | str:
        """A page's number, from the page or from the counter as last read ("?" if none)."""
        if page.get("number"):
            return page["number"]
        with self._counter_lock:
            recent = (self._counter[0] if self._counter else {}).get("recent", [])
        return next((i["number"] for i in recent if i["id"] == page.get("id")), "?")

    def acknowledge(self, page_id: str, member: dict, via: str) -> tuple[bool, dict]:
        """Mark a page acknowledged (once: a conditional write) and queue the notice to the
        others who were paged in the same write, so the escalation stops and nobody is left
        out. Returns (this call acknowledged it, the page)."""
        doc = self.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        known = self.book.get(page_id) or self.find_page(page_id)
        if known is None:
            return False, {}
        # A page acknowledged in the moment before its number was written gets it here.
        number = known[0].get("number") or self.page_number(page_id, known[0]["opened"])
        claimed_until = self.pager.claim_until()
        notices: list[str] = []

        def ack(page: dict | None) -> dict | None:
            if page is None or not (page.get("state") == "open" or hushed(page)):
                return None
            page.update(state="acknowledged", acked_by=member["id"], acked_at=time.time(),
                        number=page.get("number") or number)
            notices[:] = tell_paged(page, doc, "notice", f"Page {page['number']} acknowledged "
                                    f"by {first_name(member)}.", claimed_until, member["id"])
            key, entry = self.audit.entry("page.acknowledged", member["id"], {
                "page": page_id, "number": page.get("number"), "via": via})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        # a copy that says open errs safely (a change since fails the conditional write); one
        # that says otherwise may be behind a listed page that rings now: read it first
        written = self.write_page(self.store, page_id, ack,
                                  from_copy=known[0].get("state") == "open")
        if written is None:
            current = self.find_page(page_id)
            return False, current[0] if current else {}
        page, etag = written
        due = page["audit_due"][-1]
        self.audit.write(due["key"], due["entry"])
        if notices and self.pager.start_work is not None and claimed_until:
            self.pager.start_work(self.store, page, etag, notices, doc)
        self.pager.wake()
        return True, page

    def text_failed(self, page_id: str, channel: str, status: str,
                    code: int | None = None) -> bool:
        """Twilio reports a text of a page failed or undelivered (`code`: its ErrorCode). An
        MMS falls back to a plain SMS with the link, unless the code says no text can reach
        that number (a landline, an opt-out); when the text to the person being paged has
        finally failed, their first call is due at once instead of after ack_timeout.
        Anything else (an escalation text, a notice) is audited."""
        kind = channel.split(":")[0]
        fallback = (channel.replace("mms", "sms_fallback", 1)
                    if kind == "mms" and code not in NO_TEXT_CODES else None)
        claimed_until = self.pager.claim_until()
        failure = {"status": status, "code": code, "reason": carrier_reason(code),
                   "final": True, **({"fallback": fallback} if fallback else {})}

        def failed(page: dict | None) -> dict | None:
            delivery = (page or {}).get("deliveries", {}).get(channel)
            if page is None or (delivery is None and not channel.startswith("escalation:")) or \
                    (delivery or {}).get("state") == "failed" or \
                    (fallback is not None and fallback in page["deliveries"]):
                return None
            if delivery is not None:
                delivery.update(state="failed", last_error=f"{status} {code or ''}".strip(),
                                code=code, reason=carrier_reason(code))
            if fallback is not None:
                add_delivery(page, fallback, claimed_until)
            elif kind in ("mms", "sms", "sms_fallback"):
                hurry_first_call(page)
            key, entry = self.audit.entry("page.delivery_failed", "twilio", {
                "page": page_id, "number": page.get("number"), "deliveries": {channel: failure}})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        store = self.store
        try:
            written = self.write_page(store, page_id, failed, from_copy=False)
        except StoreUnavailable:
            if self.pager.spool is None:
                raise
            written = None
        if written is None and self.pager.spool is not None:  # sent from the spool during an outage
            store = self.pager.spool
            written = self.write_page(store, page_id, failed)
        if written is None:
            return False
        page, etag = written
        due = page["audit_due"][-1]
        self.audit.write(due["key"], due["entry"])
        if fallback is not None and self.pager.start_work is not None and claimed_until:
            self.pager.start_work(store, page, etag, [fallback])
        self.pager.wake()
        return True

    def _note_generation(self, integration: str, dedup_key: str, generation: int) -> None:
        """The index moves on (never back); `at` says when, so that check_alert can tell a
        page opened under a generation already done with from one opened before it moved."""
        key = alert_index_key(integration, dedup_key)
        update_json(self.store, key, lambda index: None
                    if index and index.get("generation", 0) >= generation else
                    {"integration": integration, "dedup_key": dedup_key,
                     "generation": generation, "at": time.time()})
        self.pager.alerts._note_seen_generation(key, generation)

    def resolve(self, page_id: str, actor: str, via: str) -> bool:
        """Its cause went away: the page is resolved (the escalation stops) and everyone it
        reached is told "Page N resolved: SUMMARY.", queued in the same conditional write.
        Returns whether this call resolved it."""
        doc = self.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        known = self.book.get(page_id) or self.read_page(page_id)
        if known is None or known[0].get("state") not in ACTIVE:
            return False
        number = known[0].get("number") or self.page_number(page_id, known[0]["opened"])
        claimed_until = self.pager.claim_until()
        notices: list[str] = []

        def close(page: dict | None) -> dict | None:
            if page is None or page.get("state") not in ACTIVE:
                return None
            page.update(state="resolved", resolved_at=time.time(),
                        number=page.get("number") or number)
            notices[:] = tell_paged(page, doc, "resolved", f"Page {page['number']} resolved: "
                                    f"{alert_summary(page)}.", claimed_until)
            key, entry = self.audit.entry("page.resolved", actor, {
                "page": page_id, "number": page["number"], "via": via})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        return self._change_and_hand_over(page_id, close, notices, doc) is not None

    def _change_and_hand_over(self, page_id: str, change: Callable[[dict | None], dict | None],
                              channels: list[str], doc: dict) -> tuple[dict, str] | None:
        """A page change that may queue `channels` (`change` fills the list in): written,
        then handed to the worker (or its audit entries written now)."""
        written = self.write_page(self.store, page_id, change)
        if written is not None:
            self.pager.hand_over(self.store, *written, channels, doc)
            self.pager.wake()
        return written


# --- Team: WHO, TAKE/C/X, opt-outs, rotation and handoffs -------------------------------------


class Team:
    """The team and who is on call: WHO, TAKE sessions and their C/X, STOP/START opt-outs,
    the rotation's handoffs and reminders: the changes of `oncall_user` and of sessions/.
    The texts it sends are message jobs (message_job) the worker delivers."""

    def __init__(self, pager: Pager):
        self.pager = pager
        self.store, self.audit, self.team = pager.store, pager.audit, pager.team
        self.pages = pager.pages
        self._reminded: set[str] = set()  # reminders this process queued or found queued
        self._settled: set[float] = set()  # shift starts whose handoff this process made whole

    # --- team: WHO, TAKE, C, X ----------------------------------------------------------------

    def who(self, snap: Snapshot) -> str:
        """WHO: who is on call, when and by whom that last changed, the next handoff. A
        handoff that the config makes due (changed in the store by hand, say, and not seen
        by the worker yet) is made first, so WHO never names anybody but the member of the
        shift that `schedule` marks `now` (unless a TAKE since holds)."""
        if not snap.stale and handoff_due(snap.doc, time.time()):
            with contextlib.suppress(StoreUnavailable):
                snap = self.rotate(snap)
        doc = snap.doc
        oncall = oncall_member(doc)
        text = f"Current on-call engineer: {oncall['name']} <{oncall['phone']}>"
        text += " (opted out of texts: called instead)." if oncall.get("opted_out") else "."
        changed = oncall_change(doc)
        if changed:
            by = members(doc).get(changed[1], {}).get("name", changed[1])
            text += f" Changed {short_time(changed[0])} by {by}."
        handoff = self.next_handoff(doc)
        return f"{text} {handoff}" if handoff else text

    def take(self, snap: Snapshot, member: dict, args: list[str] | None = None) -> str:
        """TAKE, or with a time (`TAKE 4h`, `TAKE UNTIL FRI 09:00`: an override, see
        Overrides), which the session keeps for C."""
        doc = snap.doc
        now = time.time()
        until = None
        if args:
            try:
                until = take_until(args, now, team_zone(doc))
            except ValueError as e:
                return str(e)
        elif oncall_member(doc)["id"] == member["id"]:
            return f"You are already on call, {first_name(member)}. Nothing changes."
        lifetime = session_lifetime(doc)
        session = {"member": member["id"], "created": now, "expires": now + lifetime,
                   "config_etag": snap.etag}
        if until is not None:
            session["until"] = until
        in_parallel(IO_POOL, lambda: self.store.put(f"sessions/{member['id']}.json",
                                                    to_json(session)),
                    lambda: self.audit.record("session.started", member["id"],
                                              {"expires": iso_time(now + lifetime)}))
        span = "" if until is None else f" until {local_text(team_zone(doc), until)}"
        return (f"{member['name']} to be made on-call engineer{span}, reply C to confirm or X "
                f"to cancel (within {lifetime} seconds).")

    def confirm(self, snap: Snapshot, member: dict, session: tuple[dict, str] | None) -> str:
        """C: make the member on call if the config is still the one his TAKE was shown.
        A session is bound to that config version (its ETag): once the config changes, by this
        confirmation or by anything else, the session is spent, so a confirmed session needs
        no delete. Two members confirming at once: the conditional write lets one win. The
        audit entry and the handoff SMS to the previous engineer are written together.
        `session` is sessions/<member>.json as read just before (or None)."""
        key = f"sessions/{member['id']}.json"
        lifetime = session_lifetime(snap.doc)
        no_take = f"No pending TAKE. Send TAKE again and reply C within {lifetime} seconds."
        if session is None or session[0].get("expires", 0) < time.time():
            return no_take
        session_doc = session[0]
        if session_doc.get("config_etag") != snap.etag:
            self.store.delete(key)
            return self._changed_under(snap.doc, member)
        if "until" in session_doc:  # TAKE 4h, TAKE UNTIL ...: an override
            return self.pager.overrides.confirm(snap, member, float(session_doc["until"]))
        previous = oncall_member(snap.doc)
        doc = copy.deepcopy(snap.doc)
        doc["current_config"]["oncall_user"] = dict(member)
        handoff = None if previous.get("opted_out") else self.message_job(
            previous["phone"], f"{member['name']} has taken on-call from you.", "handoff")
        try:
            new = self.team.write(doc, base=snap, actor=member["id"], details={"via": "sms"},
                                  messages=[handoff] if handoff else [])
        except StoreConflict:
            self.store.delete(key)
            return self._changed_under(self.team.read().doc, member)
        if self.pager.start_message is not None:
            for message in new.queued:
                self.pager.start_message(*message)
        pager_phone = new.doc["current_config"]["pager_phone"]
        told = ("has been told" if handoff else "was not told (opted out of texts)")
        return (f"Okay, {first_name(member)}, you are now on call. {previous['name']} {told}. "
                f"Leave a message at {pager_phone} to test delivery.")

    def opt(self, snap: Snapshot, member: dict, out: bool) -> None:
        """STOP (or another opt-out word) and START from a member: Twilio blocks texts to that
        number meanwhile, so the pager records it on the member (`opted_out` in the config)
        and reaches them by call instead. No reply: Twilio sends its own confirmation. A
        race with another config change is made again over it."""
        for _ in range(CONFIG_CHANGE_TRIES):
            doc = copy.deepcopy(snap.doc)
            record = members(doc)[member["id"]]
            if bool(record.get("opted_out")) == out:
                return
            if out:
                record["opted_out"] = True
            else:
                record.pop("opted_out", None)
            try:
                self.team.write(doc, base=snap, actor=member["id"], details={"via": "sms"},
                                event="member.opted_out" if out else "member.opted_in")
                return
            except StoreConflict:
                snap = self.team.read()
        raise StoreUnavailable("the config kept changing")

    def _changed_under(self, doc: dict, member: dict) -> str:
        oncall = oncall_member(doc)
        if oncall["id"] == member["id"]:
            return f"You are already on call, {first_name(member)}. Nothing changes."
        return (f"The on-call config changed since your TAKE (on call now: {oncall['name']}). "
                "Nothing changed; send TAKE again to try again.")

    def cancel(self, doc: dict, member: dict) -> str:
        key = f"sessions/{member['id']}.json"
        session = read_json(self.store, key)
        if session is not None:
            self.store.delete(key)
            self.audit.record("session.cancelled", member["id"])
        if session is not None and session[0].get("action") == "quiet":  # (QuietHours)
            until = quiet_until(doc, time.time())
            return f"Okay, {first_name(member)}, nothing changes: " + (
                f"quiet hours stay until {short_time(until)}." if until else
                "alerts ring as usual.")
        oncall = oncall_member(doc)
        return f"Okay, {first_name(member)}, nothing changes: {first_name(oncall)} remains on call."

    # --- messages: durable jobs the worker sends (the handoff SMS) --------------------------

    def message_job(self, to: str, body: str, purpose: str, name: str = ""
                    ) -> tuple[str, dict]:
        """One SMS as a durable job (jobs/msg-*.json) and its key, claimed by this instance's
        worker, which sends it as soon as it is written and retries it; another instance's
        worker takes it over if this one stops. A sent job is kept a day, marked sent.
        `name`: a key that two instances queuing the same message agree on (a reminder)."""
        now = time.time()
        claimed_until = self.pager.claim_until()
        job = {"kind": "sms", "to": to, "body": body, "purpose": purpose, "state": "pending",
               "attempts": 1 if claimed_until else 0, "next_try": now,
               "claimed_until": claimed_until, "created": now}
        return f"jobs/msg-{name or sortable_stamp(now) + '-' + uuid.uuid4().hex[:12]}.json", job

    # --- rotation: the handoff at each shift start, the reminder before it, NEXT -------------

    def next_handoff(self, doc: dict) -> str | None:
        """NEXT's answer (and WHO's last sentence): an override running ("Carol until Fri
        09:00 CET, covering Bob."), then the next handoff by the schedule (oncall_shifts);
        None when nothing is scheduled (no rotation, no override to come)."""
        if Rotation.of(doc) is None and not overrides(doc):
            return None
        now = time.time()
        zone, names = team_zone(doc), members(doc)
        text = []
        current = shift_at(doc, now)
        if current is not None and current.override is not None:
            text.append(override_text(doc, current, zone) + ".")
        after = next((s for s in next_shifts(doc, now, 3) if s.start > now), None)
        if after is None and not text:
            return None
        if after is not None:
            line = (f"Next handoff: {names[after.member]['name']} on "
                    f"{local_text(zone, after.start)} (in {duration_text(after.start - now)})")
            if after.override is not None:
                line += f", {override_text(doc, after, zone, named=False)}"
            text.append(line + ".")
        return " ".join(text)

    def rotation_due(self, doc: dict, now: float) -> float | None:
        """When `rotate` has something to do by `doc` (the config in memory: planning costs no
        request): `now`, if a shift (or an override, or its end) started without its
        handoff or a reminder is due; else when the next one is."""
        rotation = Rotation.of(doc)
        if rotation is None and not overrides(doc):
            return None
        if handoff_due(doc, now):
            return now
        change = next_change(doc, now)
        following = change if change is not None else math.inf
        if rotation is None:
            return None if change is None else following
        k = rotation.shift_at(now)
        upcoming = rotation.starts(max(k + 1, 0))
        remind_at = upcoming - rotation.remind.total_seconds()
        if rotation.remind and remind_at > now:
            return min(remind_at, following)
        if rotation.remind and reminder_name(upcoming) not in self._reminded:
            return now
        return min(upcoming, following)

    def rotate(self, snap: Snapshot | None = None) -> Snapshot:
        """The schedule's due work, by the config as stored (or `snap`, just read): the
        handoff of the shift (or override, or hand-back) that has started, then the reminder
        of the rotation's next shift. Returns the config as it is after."""
        snap = snap or self.team.read()
        if snap.stale:
            raise StoreUnavailable(self.team.problem or "store unreachable")
        rotation = Rotation.of(snap.doc)
        if rotation is None and not overrides(snap.doc):
            return snap
        due = handoff_due(snap.doc, time.time())
        if due is not None:
            snap = self.hand_off(snap, due)
        else:
            current = shift_at(snap.doc, time.time())
            if current is not None and current.start not in self._settled:
                # made by another instance, which may have stopped before its texts were queued
                self.settle_handoff(snap.doc, current.start)
        if rotation is not None:
            self.remind(snap.doc, rotation, max(rotation.shift_at(time.time()) + 1, 0))
        return snap

    def hand_off(self, snap: Snapshot, shift: Shift) -> Snapshot:
        """The shift's member becomes on call, unless already: one conditional write of the
        config that also records the handoff as made (`rotation_handoff`), so across
        instances and restarts it is made once, and a TAKE after it holds until the next
        shift. Both people are told (message jobs travel with the write, as C's do)."""
        for _ in range(CONFIG_CHANGE_TRIES):
            due = handoff_due(snap.doc, shift.start)
            if due is None or due.start != shift.start:  # made elsewhere meanwhile
                self.settle_handoff(snap.doc, shift.start)
                return snap
            doc = copy.deepcopy(snap.doc)
            told, details, actor = self.handoff_in(doc, due)
            try:
                snap = self.team.write(doc, base=snap, actor=actor, messages=told,
                                       details=details)
            except StoreConflict:
                snap = self.team.read()
                continue
            log.info("event=rotation.handoff member=%s", due.member)
            self._settled.add(shift.start)
            if self.pager.start_message is not None:
                for message in snap.queued:
                    self.pager.start_message(*message)
            return snap
        raise StoreUnavailable("the config kept changing")

    def handoff_in(self, doc: dict, shift: Shift) -> tuple[list[tuple[str, dict]], dict, str]:
        """Make the shift's handoff in `doc` (a copy about to be written): its member on
        call, the handoff recorded; returns the texts to both people (message jobs), the
        audit details and the actor (`rotation`, or `override` for an override's start and,
        without a rotation, its hand-back). The new engineer hears of the pages still
        ringing (they keep calling whom they were sent to, then the team: see
        Worker._claim)."""
        member, previous = members(doc)[shift.member], oncall_member(doc)
        current = doc["current_config"]
        current["rotation_handoff"] = {"shift_start": shift.start, "member": member["id"]}
        rotation = Rotation.of(doc)
        via = "override" if shift.override is not None or rotation is None else "rotation"
        details = {"via": via, "shift": iso_time(shift.start)}
        if shift.override is not None:
            details["override"] = shift.override + 1
            if rotation is None and not overrides(doc)[shift.override].get("covering"):
                overrides(doc)[shift.override]["covering"] = previous["id"]
        told: list[tuple[str, dict]] = []
        if member["id"] == previous["id"]:
            return told, details, via
        current["oncall_user"] = dict(member)
        team, zone = team_name(doc) or "the team", team_zone(doc)
        until = f" until {local_text(zone, shift.end)}" if math.isfinite(shift.end) else ""
        if not member.get("opted_out"):
            ringing = self.pages.open_page_count()
            pages = (f" {ringing} page{'s' if ringing != 1 else ''} open: STATUS lists "
                     f"{'them' if ringing != 1 else 'it'}." if ringing else "")
            told.append(self.message_job(member["phone"], f"You are now on call for {team}"
                                         f"{until}.{pages}", via))
        if not previous.get("opted_out"):
            ended = any(override_times(o)[1] == shift.start for o in overrides(doc))
            why = ("override" + until if shift.override is not None
                   else "override ended" if ended else "rotation")
            told.append(self.message_job(previous["phone"], f"{member['name']} has taken "
                                         f"on-call from you ({why}).", via))
        return told, details, via

    def handoff_with_change(self, doc: dict, details: dict
                            ) -> tuple[list[tuple[str, dict]], dict, str]:
        """A config change about to be written (by the command line) that makes a handoff
        due carries it out in the same write, at once, rather than leaving it to the next
        look of a running pager. Returns the texts to queue with the write, its audit
        details and who changed on-call ("rotation"); nothing when no handoff is due or
        `doc` is invalid (the write refuses it then)."""
        if check_oncall_config(doc)[0]:
            return [], details, ""
        due = handoff_due(doc, time.time())
        if due is None:
            return [], details, ""
        told, made, actor = self.handoff_in(doc, due)
        return told, {**details, **made, "with": details.get("via", "")}, actor

    def settle_handoff(self, doc: dict, start: float) -> None:
        """A handoff another instance made: its audit entry and texts, in case it stopped
        before them (the texts this queues are sent from here); once per shift."""
        for message in self.team.settle(doc):
            if self.pager.start_message is not None:
                self.pager.start_message(*message)
        self._settled.add(start)

    def remind(self, doc: dict, rotation: Rotation, k: int) -> None:
        """Shift k's member is reminded once, `remind_hours` before it starts (not when
        already on call, or opted out of texts). The job's key is the shift's, so two
        instances queue one reminder."""
        start = rotation.starts(k)
        name = reminder_name(start)
        now = time.time()
        if not rotation.remind or name in self._reminded or \
                not start - rotation.remind.total_seconds() <= now < start:
            return
        member = members(doc)[rotation.member(k)]
        running = shift_at(doc, start)  # an override then: its member is not reminded
        if running is not None and running.member != member["id"]:
            member = oncall_member(doc)
        if member["id"] != oncall_member(doc)["id"] and not member.get("opted_out"):
            key, job = self.message_job(
                member["phone"], f"Reminder: you go on call for {team_name(doc) or 'the team'} "
                f"at {rotation.local_text(start)}, in {duration_text(start - now)}.",
                "reminder", name=name)
            try:
                self.store.put(key, to_json(job), if_absent=True)
            except StoreConflict:
                pass  # queued by another instance, or by this one before a restart
            else:
                if self.pager.start_message is not None:
                    self.pager.start_message(key, job)
        self._reminded.add(name)


# --- Alerts: the Events API, change events, heartbeats ----------------------------------------


class Alerts:
    """Alerts from monitors: PagerDuty Events API events (trigger, acknowledge, resolve,
    the hourly budget per integration and its held pages) and change events, turned into
    calls on Pages (heartbeats: the room Heartbeats)."""

    def __init__(self, pager: Pager):
        self.pager = pager
        self.store, self.audit, self.team, self.book = (
            pager.store, pager.audit, pager.team, pager.book)
        self.pages = pager.pages
        self._budgets: dict[str, tuple[dict, str]] = {}  # counters/alerts-*.json, last seen
        # alerts/<hash>.json -> the generation last seen there (the first guess of a page id)
        self._generations: OrderedDict[str, int] = OrderedDict()
        # alert pages created here whose checks this instance made (or is making): their
        # `unchecked` mark is this instance's to clear (write_page), nobody's to check again
        self._checked: OrderedDict[str, bool | None] = OrderedDict()
        self._alerts_lock = threading.Lock()
        # count_alert's group commit: per budget key, the triggers waiting, and whether one
        # of them is writing
        self._budget_queues: dict[str, list[dict]] = {}
        self._budget_leaders: set[str] = set()
        # alerts/ keys whose page a request here is creating at once: a trigger of the same
        # dedup_key meanwhile waits for it and joins from memory (not a 412, then reads)
        self._opening: dict[str, threading.Event] = {}
        self.repeats = AlertRepeats(self._write_repeats, lambda: self.pager.wake())

    # --- alerts from monitoring: the Events API -----------------------------------------------

    def alert_event(self, integration: str, event: dict) -> str:
        """One event of `integration` (checked by parse_event); returns its dedup_key. An
        acknowledge or resolve for no open page is not an error: PagerDuty says so too."""
        dedup_key = event["dedup_key"] or uuid.uuid4().hex
        if event["event_action"] == "trigger":
            self.trigger(integration, dedup_key, event["alert"])
            return dedup_key
        found = self._current_alert(integration, dedup_key)[1]
        if found is None or found[0].get("state") not in ACTIVE:
            log.info("event=alert.nothing_to_do integration=%s action=%s", integration,
                     event["event_action"])
        elif event["event_action"] == "acknowledge":
            self.pages.acknowledge(found[0]["id"], {"id": f"events:{integration}",
                                              "name": integration}, via="events")
        else:
            self.pages.resolve(found[0]["id"], f"events:{integration}", via="events")
        return dedup_key

    def change_received(self, integration: str, change: dict) -> None:
        """A Change Event (a deploy, a config push): recorded for whoever reads the audit log
        next to the pages around it; nothing rings, no page opens. An audit entry that cannot
        be written now waits for the store (AuditLog.write), so the sender is answered 202."""
        self.audit.record("change.received", f"events:{integration}", {
            "integration": integration, "summary": change["summary"],
            "source": change.get("source") or ""})

    def trigger(self, integration: str, dedup_key: str, alert: dict) -> tuple[dict, bool]:
        """A trigger: the page of its dedup_key that it joins (see joins) gets it as a repeat
        (`page.repeated`, nothing new is sent); otherwise a page of kind alert opens, one
        conditional create like a voicemail's: critical and error ring as a voicemail does
        (a text, then calls) within the integration's alert budget (count_alert; beyond it
        they are held), warning and info are e-mailed and listed. Returns (page, opened).

        Two shortcuts keep the answer off the store's path under a storm. A repeat of a page
        the book knows, that it joins and does not change (all but a listed page that now
        rings), is answered from memory (AlertRepeats: its count reaches the page later). A
        ringing trigger of a dedup_key the book knows no page of (a new one, as a rule) is
        created at once, its checks beside the create (open_alert_at_once). The rest, and
        whatever those two cannot settle, take the path below: the dedup_key's page looked
        up, then joined or the next generation created."""
        rings = alert["severity"] in RINGING
        known = self._book_alert(integration, dedup_key)
        if known is None:
            with self._alerts_lock:
                opening = self._opening.get(alert_index_key(integration, dedup_key))
            if opening is not None:  # another request here is creating its page: that first
                opening.wait(OPENING_WAIT)
                known = self._book_alert(integration, dedup_key)
        if known is not None and self.pager.start_work is not None and not (
                rings and known.get("state") == "listed" and not known["alert"].get("held")):
            # (only with a worker here: it writes the count)
            self.repeats.add(known["id"], integration, dedup_key, alert)
            return known, False
        snap = self.team.read(max_age=PAGE_CONFIG_MAX_AGE)
        # quiet hours: what would ring is listed (hushed) and rings when they end
        quiet = rings and quiet_until(snap.doc, time.time()) is not None
        counted: list[tuple[int, bool]] = []  # count_alert's answer, once asked
        if rings and known is None and not quiet:
            opened = self.open_alert_at_once(snap, integration, dedup_key, alert, counted)
            if opened is not None:
                return opened, True
        for _ in range(4):
            generation, found = self._current_alert(integration, dedup_key)
            if found is not None and joins(found[0], time.time()):
                # a warning's page that this trigger makes ring is counted; nothing else is
                starts = (rings and found[0].get("state") == "listed"
                          and not found[0]["alert"].get("held"))
                if starts and not counted:
                    counted = [self.count_alert(snap.doc, integration, dedup_key)]
                elif counted and not starts:
                    if counted[0][1]:
                        INTAKE_POOL.submit(self.uncount_alert, integration, dedup_key)
                    counted = []
                joined = self._repeat_alert(snap.doc, found[0]["id"], integration, alert,
                                            counted[0][0] if counted else 0)
                if joined is not None:
                    METRICS.count("oncall_alert_repeats_total", path="store")
                    return joined, False
                continue  # resolved meanwhile: a new generation
            if found is not None:
                generation += 1
            if rings and not counted:
                counted = [self.count_alert(snap.doc, integration, dedup_key)]
            held = counted[0][0] if counted else 0
            ring_now = rings and not held and not quiet
            page = new_page(alert_page_id(integration, dedup_key, generation), "alert",
                            snap.doc, state="open" if ring_now else "listed",
                            alert={**alert, "integration": integration,
                                   "dedup_key": dedup_key, "generation": generation,
                                   **({"quiet_hours": True} if quiet and not held else {})})
            channels = ["sms", "email"] if ring_now else ["email"]
            if held:
                channels += self._hold(page, held, snap.doc, quiet)
            page, created = self.pages._create_page(
                self.store, page, channels, snap.doc,
                f"events:{integration}", {"dedup_key": dedup_key,
                                          "severity": alert["severity"],
                                          "summary": alert["summary"]})
            if created:
                if generation:
                    self.pages._note_generation(integration, dedup_key, generation)
                return page, True
        raise StoreConflict(f"alert {dedup_key}: too many concurrent changes")

    def open_alert_at_once(self, snap: Snapshot, integration: str, dedup_key: str,
                           alert: dict, counted: list[tuple[int, bool]]) -> dict | None:
        """A ringing trigger of a dedup_key this instance knows no page of: its page is
        created at once, at the generation last seen here (0 for a new dedup_key), by one
        conditional create as a voicemail's is; beside it, in parallel, the two checks that
        used to come first: the dedup_key's index (alerts/: has it moved on past this
        generation, that is, is this the id of a page done with?) and the alert budget
        (count_alert). The text then waits for one round trip, not four.

        The page is written `unchecked`, and claimed by this instance, which clears the mark
        with its next write of the page (write_page): another instance that finds it unchecked
        once the claim ran out (this one stopped meanwhile) makes the checks again before it
        sends anything (check_alert). The create's If-None-Match still settles a retry and a
        second instance (one page); the budget is enforced before the text: a page beyond it
        is turned into a held one (one more write) before anything is sent. Returns the page
        (it rings, or is held); None when the path of `trigger` must decide: the create found
        a page (a retry, the other instance, a page that no longer joins), or the index says
        this id was done with (the page is taken back). `counted`: the budget's answer."""
        index_key = alert_index_key(integration, dedup_key)
        with self._alerts_lock:
            generation = self._generations.get(index_key, 0)
            opening = self._opening.setdefault(index_key, threading.Event())
        try:
            return self._open_alert_at_once(snap, integration, dedup_key, alert, counted,
                                            generation)
        finally:
            with self._alerts_lock:
                if self._opening.get(index_key) is opening:
                    del self._opening[index_key]
            opening.set()

    def _open_alert_at_once(self, snap: Snapshot, integration: str, dedup_key: str,
                            alert: dict, counted: list[tuple[int, bool]], generation: int
                            ) -> dict | None:
        index_key = alert_index_key(integration, dedup_key)
        page = new_page(alert_page_id(integration, dedup_key, generation), "alert", snap.doc,
                        alert={**alert, "integration": integration, "dedup_key": dedup_key,
                               "generation": generation, "unchecked": True})
        page_id, key = page["id"], f"pages/{page['id']}.json"
        channels = self.pages._prepare_page(page, ["sms", "email"], snap.doc,
                                      f"events:{integration}", {
                                          "dedup_key": dedup_key, "severity": alert["severity"],
                                          "summary": alert["summary"]})
        body = to_json(page)

        def create() -> str | None:
            try:
                return self.store.put(key, body, if_absent=True)
            except StoreConflict:
                return None

        def index() -> int:
            found = read_json(self.store, index_key)
            return int(found[0].get("generation", 0)) if found else 0

        self._note_checked(page_id, None)  # this instance checks it: its worker waits
        try:
            etag, noted, verdict = in_parallel(
                INTAKE_POOL, create, index,
                lambda: self.count_alert(snap.doc, integration, dedup_key))
        except (StoreUnavailable, StoreConflict):
            self._note_checked(page_id, False)  # if it was created, a worker checks it
            raise
        self._note_seen_generation(index_key, noted)
        counted[:] = [verdict]
        if etag is None:
            self._note_checked(page_id, False)
            return None
        if noted > generation:  # the id of a page done with: the index names a later one
            METRICS.count("oncall_alert_checks_total", outcome="superseded")
            self._withdraw(page_id)
            return None
        METRICS.count("oncall_pages_opened_total", kind="alert")
        METRICS.count("oncall_alert_checks_total", outcome="held" if verdict[0] else "rings")
        self.book.put(page, etag)
        if verdict[0]:
            written = self._hold_unchecked(page_id, verdict[0], snap.doc)
            self._note_checked(page_id, True if written else False)  # (else: check_alert)
            return written[0] if written else page
        self._note_checked(page_id)
        self.pager.hand_over(self.store, page, etag, channels, snap.doc)
        self.pager.wake()
        return page

    def check_alert(self, page_id: str) -> None:
        """The checks of a page created at once (open_alert_at_once) by an instance that did
        not see them through (it stopped, or the store failed it): made now, before anything
        of the page is sent. A page whose index had moved past its generation before it was
        opened has the id of a page done with, and is taken back (its trigger was never
        answered 202: the monitor sends it again); a page beyond the alert budget is held."""
        found = self.pages.read_page(page_id)
        if found is None or not found[0].get("alert", {}).get("unchecked"):
            return
        page, alert = found[0], found[0]["alert"]
        doc = self.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        index_key = alert_index_key(alert["integration"], alert["dedup_key"])
        index = read_json(self.store, index_key)
        if index is not None and int(index[0].get("generation", 0)) > alert["generation"] \
                and float(index[0].get("at", 0)) <= page["opened"]:
            self._withdraw(page_id)
            return
        held = (self.count_alert(doc, alert["integration"], alert["dedup_key"])[0]
                if page.get("state") == "open" else 0)
        if held:
            self._hold_unchecked(page_id, held, doc)
        else:
            def checked(current: dict | None) -> dict | None:
                if current is None or not current.get("alert", {}).pop("unchecked", None):
                    return None
                return current

            self.pages.write_page(self.store, page_id, checked)
        # only now: until the verdict is written, this instance's worker must not claim it
        self._note_checked(page_id)
        log.info("event=alert.checked page=%s held=%d", page_id, held)

    def _hold_unchecked(self, page_id: str, held: int, doc: dict) -> tuple[dict, str] | None:
        """An unchecked page beyond the alert budget becomes a held one before anything of it
        is sent: listed, its text dropped, the e-mail kept (see _hold)."""
        channels: list[str] = []

        def hold(page: dict | None) -> dict | None:
            if page is None or not page.get("alert", {}).get("unchecked") or \
                    page.get("state") != "open":
                return None
            page.update(state="listed", paged=[])
            del page["alert"]["unchecked"]
            page["deliveries"].pop("sms", None)
            channels[:] = [c for c in page["deliveries"] if c == "email"]
            channels.extend(self._hold(page, held, doc))
            return page

        return self.pages._change_and_hand_over(page_id, hold, channels, doc)

    def _withdraw(self, page_id: str) -> None:
        """Take back a page created at once under the id of a page done with (see
        open_alert_at_once): nothing of it was sent, and its trigger was not answered."""
        log.warning("event=alert.withdrawn page=%s reason=generation_moved_on", page_id)
        self.store.delete(f"pages/{page_id}.json")
        self._note_checked(page_id, False)

    def checked(self, page_id: str) -> bool | None:
        """Whether this instance made the checks of an unchecked alert page (True), is making
        them (None: its worker leaves the page alone meanwhile), or neither (False)."""
        with self._alerts_lock:
            return self._checked.get(page_id, False)

    def _note_checked(self, page_id: str, checked: bool | None = True) -> None:
        with self._alerts_lock:
            if checked is False:
                self._checked.pop(page_id, None)
                return
            self._checked[page_id] = checked
            while len(self._checked) > RECENT_PAGES:
                self._checked.popitem(last=False)

    def _note_seen_generation(self, index_key: str, generation: int) -> None:
        with self._alerts_lock:
            if generation >= self._generations.get(index_key, 0):
                self._generations[index_key] = generation
                self._generations.move_to_end(index_key)
            while len(self._generations) > GENERATIONS_KEPT:
                self._generations.popitem(last=False)

    def _write_repeats(self, page_id: str, pending: dict) -> None:
        """AlertRepeats' write: the repeats answered from memory counted on their page, with
        one `page.repeated` entry. The book's copy said the page joins; if it stopped
        joining before the last of them came (resolved, or acknowledged a day ago, on the
        other instance since the book's copy), they are a trigger again (the latest of
        them), which opens the dedup_key's next page; repeats from before are counted."""
        integration, alert, count = pending["integration"], pending["alert"], pending["count"]

        def repeat(page: dict | None) -> dict | None:
            if page is None or not (joins(page, time.time())
                                    or pending["last"] <= stopped_joining(page)):
                return None
            page["alert"]["repeated"] = page["alert"].get("repeated", 0) + count
            key, entry = self.audit.entry("page.repeated", f"events:{integration}", {
                "page": page_id, "number": page.get("number"),
                "dedup_key": page["alert"]["dedup_key"], "severity": alert["severity"],
                "summary": alert["summary"], "repeats": count})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        if self.pages._change_and_hand_over(page_id, repeat, [], None) is None:
            log.info("event=alert.repeats_reopen page=%s repeats=%d", page_id, count)
            self.trigger(integration, pending["dedup_key"], alert)

    def _book_alert(self, integration: str, dedup_key: str) -> dict | None:
        """The page in this instance's book that a trigger of this dedup_key joins, if any
        (from memory: the first generation's id, or an open page of any generation)."""
        now = time.time()
        first = self.book.get(alert_page_id(integration, dedup_key, 0))
        if first is not None and joins(first[0], now):
            return first[0]
        return next((page for page, _ in self.book.working()
                     if page.get("kind") == "alert" and page["alert"].get("dedup_key") ==
                     dedup_key and page["alert"].get("integration") == integration
                     and joins(page, now)), None)

    def count_alert(self, doc: dict, integration: str, dedup_key: str) -> tuple[int, bool]:
        """The alert budget: per integration, `escalation.alert_pages_per_hour` dedup_keys
        ring in a clock hour; the later ones are held (listed and e-mailed, nobody called),
        so that a runaway monitor, or anyone holding its routing key, cannot run up the
        Twilio bill (a page's first text and call are never capped by the outbound budget).
        The count is counters/alerts-<hash>.json, shared by every instance and written
        conditionally before the page that it lets ring, so a stop between the two leaves a
        dedup_key counted and its retried trigger gets the same verdict. Starts from this
        instance's copy: one request while nobody else counts. Returns (0, added) to ring or
        (N, added): the Nth alert held this hour; `added`: this call counted it."""
        digest = hashlib.sha256(f"{integration}\n{dedup_key}".encode()).hexdigest()[:32]
        key = alert_budget_key(integration)
        # Group commit: the triggers of one integration that arrive while its budget is being
        # written wait, and the next write counts them all (one request for a burst, where
        # each writing alone lost the race to the others and read and wrote again).
        mine: dict[str, Any] = {"digest": digest, "done": threading.Event()}
        with self._alerts_lock:
            self._budget_queues.setdefault(key, []).append(mine)
            mine["lead"] = key not in self._budget_leaders
            self._budget_leaders.add(key)
        if not mine["lead"]:
            mine["done"].wait()  # counted by the write before, or told to write the next
        if mine["lead"]:
            self._write_budget_batch(doc, integration, key)
        if "error" in mine:
            raise mine["error"]
        return mine["verdict"]

    def _write_budget_batch(self, doc: dict, integration: str, key: str) -> None:
        """count_alert's writer: one conditional write counts every trigger waiting (the
        writer's own among them); then the first trigger that queued meanwhile writes the
        next batch, so that no answer waits for more than the write in progress and its own
        (a writer that went on writing for the others held its own answer for a second in a
        storm's first new dedup_keys)."""
        with self._alerts_lock:
            batch = self._budget_queues.pop(key, [])
        try:
            verdicts = self._count_alerts(doc, integration, [e["digest"] for e in batch])
            for entry, verdict in zip(batch, verdicts, strict=True):
                entry["verdict"] = verdict
        except (StoreUnavailable, StoreConflict) as e:
            for entry in batch:
                entry["error"] = e
        finally:
            with self._alerts_lock:
                waiting = self._budget_queues.get(key)
                if waiting:
                    waiting[0]["lead"] = True
                    waiting[0]["done"].set()
                else:
                    self._budget_leaders.discard(key)
            for entry in batch:
                entry["done"].set()

    def _count_alerts(self, doc: dict, integration: str, digests: list[str]
                      ) -> list[tuple[int, bool]]:
        """count_alert for several dedup_keys (their digests) in one conditional write."""
        limit = escalation_settings(doc)["alert_pages_per_hour"]
        hour = int(time.time() // 3600 * 3600)
        key = alert_budget_key(integration)
        verdicts: list[tuple[int, bool]] = []

        def count(budget: dict | None) -> dict | None:
            verdicts.clear()
            if budget is None or budget.get("hour") != hour:
                budget = {"integration": integration, "hour": hour, "rung": [], "held": [],
                          "held_count": 0}
            changed = False
            for digest in digests:
                if digest in budget["rung"]:
                    verdicts.append((0, False))
                elif digest in budget["held"]:
                    verdicts.append((budget["held"].index(digest) + 1, False))
                elif len(budget["rung"]) < limit:
                    budget["rung"].append(digest)
                    verdicts.append((0, True))
                    changed = True
                else:
                    budget["held_count"] += 1
                    if len(budget["held"]) < HELD_KEPT:
                        budget["held"].append(digest)
                    verdicts.append((budget["held_count"], True))
                    changed = True
            return budget if changed else None

        # every new dedup_key of the integration writes here: under a burst of them from
        # several instances the writers take turns, hence more tries than update_json's 8
        written = update_json(self.store, key, count, BUDGET_TRIES, self._budgets.get(key),
                              seen=lambda found: self._budgets.__setitem__(key, found))
        if written is not None:
            self._budgets[key] = written
        return verdicts

    def uncount_alert(self, integration: str, dedup_key: str) -> None:
        """Take back a count_alert made beside a look-up that then found a page to join."""
        digest = hashlib.sha256(f"{integration}\n{dedup_key}".encode()).hexdigest()[:32]
        key = alert_budget_key(integration)

        def uncount(budget: dict | None) -> dict | None:
            if budget is None or digest not in budget["rung"] + budget["held"]:
                return None
            if digest in budget["held"]:
                budget["held"].remove(digest)
                budget["held_count"] -= 1
            else:
                budget["rung"].remove(digest)
            return budget

        with contextlib.suppress(StoreUnavailable, StoreConflict):
            written = update_json(self.store, key, uncount, known=self._budgets.get(key),
                                  seen=lambda found: self._budgets.__setitem__(key, found))
            if written is not None:
                self._budgets[key] = written

    def held_this_hour(self, integration: str) -> int:
        """How many of an integration's alerts were held this hour, as this instance last saw
        its budget (for the held text: no request)."""
        known = self._budgets.get(alert_budget_key(integration))
        if known is None or known[0].get("hour") != int(time.time() // 3600 * 3600):
            return 0
        return int(known[0].get("held_count", 0))

    def _hold(self, page: dict, held: int, doc: dict, quiet: bool = False) -> list[str]:
        """An alert page over its integration's budget: listed, marked held, audited
        (`alert.held`); the first one held in the hour also texts the on-call engineer once
        (held_text, queued in the same write, claimed like a page's first text), unless
        during quiet hours (nothing rings then). Returns the channels it queued."""
        alert = page["alert"]
        alert["held"] = held
        limit = escalation_settings(doc)["alert_pages_per_hour"]
        key, entry = self.audit.entry("alert.held", f"events:{alert['integration']}", {
            "page": page["id"], "dedup_key": alert["dedup_key"], "severity": alert["severity"],
            "held_this_hour": held, "alert_pages_per_hour": limit})
        page.setdefault("audit_due", []).append({"key": key, "entry": entry})
        oncall = oncall_member(doc)
        if held != 1 or oncall.get("opted_out") or quiet:
            return []
        channel = f"held:{oncall['id']}"
        add_delivery(page, channel, self.pager.claim_until(), to=oncall["phone"])
        return [channel]

    def _current_alert(self, integration: str, dedup_key: str
                       ) -> tuple[int, tuple[dict, str] | None]:
        """The latest page of a dedup_key and its generation (None: no page yet). The
        generation is 0 unless alerts/<hash>.json says more: it is written when a dedup_key
        comes back to a page it no longer joins (resolved, closed, acknowledged a day ago),
        after the new page, so after a stop it may lag one behind; a page no longer joined is
        therefore followed by a look at the next generation (which repairs the index). It is
        also moved on before a page moves to pages-done/ (Pages.archive)."""
        index = read_json(self.store, alert_index_key(integration, dedup_key))
        noted = generation = int(index[0].get("generation", 0)) if index else 0
        # find_page: the page may have moved to pages-done/ since the index was read (the
        # index moves on before the page moves), and its id must not be opened again
        found = self.pages.find_page(alert_page_id(integration, dedup_key, generation))
        while found is not None and not joins(found[0], time.time()):
            later = self.pages.read_page(alert_page_id(integration, dedup_key, generation + 1))
            if later is None:
                break
            generation, found = generation + 1, later
        if generation > noted:
            self.pages._note_generation(integration, dedup_key, generation)
        self._note_seen_generation(alert_index_key(integration, dedup_key), generation)
        return generation, found

    def _repeat_alert(self, doc: dict, page_id: str, integration: str, alert: dict,
                      held: int = 0) -> dict | None:
        """A trigger for an open page: counted and audited, nothing sent; except that a
        listed page (a warning) whose alert turns critical or error starts to ring now,
        within the alert budget (`held`: count_alert's verdict; a held page stays listed)."""
        claimed_until = self.pager.claim_until()
        channels: list[str] = []

        def repeat(page: dict | None) -> dict | None:
            channels.clear()
            if page is None or not joins(page, time.time()):
                return None
            page["alert"]["repeated"] = page["alert"].get("repeated", 0) + 1
            starts = (page["state"] == "listed" and alert["severity"] in RINGING
                      and not page["alert"].get("held"))
            quiet = starts and quiet_until(doc, time.time()) is not None
            if starts and held:
                page["alert"].update(alert)
                channels.extend(self._hold(page, held, doc, quiet))
            elif quiet:  # it rings when quiet hours end (hushed)
                page["alert"].update(alert, quiet_hours=True)
            elif starts:
                now = time.time()
                oncall = oncall_member(doc)  # who is on call now, not when it was listed
                page.update(state="open", oncall=dict(oncall), paged=[oncall["id"]],
                            ringing_since=now)
                page["alert"].update(alert)  # the texts tell what rings: its summary, source
                page["escalation"]["next_due"] = now + escalation_settings(doc)["ack_timeout"]
                if page["oncall"].get("opted_out"):
                    page["escalation"]["next_due"] = now
                else:
                    add_delivery(page, "sms", claimed_until)
                    channels.append("sms")
            key, entry = self.audit.entry("page.repeated", f"events:{integration}", {
                "page": page_id, "number": page.get("number"),
                "dedup_key": page["alert"]["dedup_key"], "severity": alert["severity"],
                "summary": alert["summary"]})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        written = self.pages._change_and_hand_over(page_id, repeat, channels, doc)
        return written[0] if written else None


# --- Heartbeats: a job that pings, and the page of its miss -----------------------------------


class Heartbeats:
    """Heartbeats (`current_config.heartbeats`): a ping is recorded in heartbeats/<name>.json
    and resolves the page of a miss; no ping for interval + grace opens a page of kind
    heartbeat (the worker notices it: Upkeep._check_heartbeats, planned from `known`)."""

    def __init__(self, pager: Pager):
        self.pager = pager
        self.store, self.team, self.pages = pager.store, pager.team, pager.pages
        # heartbeats/<name>.json as last seen here: the worker plans its checks from these
        self.known: dict[str, tuple[dict, str]] = {}

    def state(self, name: str, fresh: bool = True) -> tuple[dict, str]:
        """heartbeats/<name>.json ({since, last_ping}) and its ETag: read (with fresh=False,
        only when this instance has no copy), and created when missing, so a heartbeat that
        never pings is missed counting from when the pager first saw it configured."""
        known = self.known.get(name)
        if known is not None and not fresh:
            return known
        key = f"heartbeats/{name}.json"
        found = read_json(self.store, key)
        if found is None:
            state = {"name": name, "since": time.time(), "last_ping": None}
            try:
                found = state, self.store.put(key, to_json(state), if_absent=True)
            except StoreConflict:
                found = read_json(self.store, key)
                if found is None:
                    raise
        self.known[name] = found
        return found

    def ping(self, name: str, window: float) -> dict:
        """A ping: recorded with a conditional write; then, if the heartbeat had been missed
        (`window`: interval + grace), the page of that miss is resolved. In that order, so
        that a worker opening the page at the same moment finds the ping when it looks again
        (see missed); a stop in between leaves the page to the worker, which
        resolves an open heartbeat page once it knows of a later ping."""
        for _ in range(5):
            state, etag = self.state(name)
            now = time.time()
            new = {**state, "last_ping": now}
            try:
                self.known[name] = new, self.store.put(
                    f"heartbeats/{name}.json", to_json(new), if_match=etag)
            except StoreConflict:
                continue
            if now >= heartbeat_basis(state) + window - min(HEARTBEAT_SLACK, window / 4):
                self.pages.resolve(heartbeat_page_id(name, heartbeat_basis(state)), "heartbeat",
                             via="ping")
            return new
        raise StoreConflict(f"heartbeats/{name}.json: too many concurrent pings")

    def missed(self, name: str, state: dict) -> tuple[dict, bool]:
        """No ping for interval + grace: a page of kind heartbeat, which rings as a critical
        alert does. Its id comes from the ping it missed, so instances sharing the store
        open it once. The state is read once more after the create: a ping that came in
        between (on any instance) resolves the page at once."""
        snap = self.team.read(max_age=PAGE_CONFIG_MAX_AGE)
        basis = heartbeat_basis(state)
        ago = elapsed(time.time() - basis)
        summary = (f"Heartbeat {name} missed: last ping {ago} ago" if state.get("last_ping")
                   else f"Heartbeat {name} missed: no ping since it was set up {ago} ago")
        quiet = quiet_until(snap.doc, time.time()) is not None  # listed, rung when it ends
        page = new_page(heartbeat_page_id(name, basis), "heartbeat", snap.doc,
                        state="listed" if quiet else "open", alert={
                            "summary": summary, "source": "heartbeat", "severity": "critical",
                            "heartbeat": name, "basis": basis,
                            **({"quiet_hours": True} if quiet else {})})
        page, created = self.pages._create_page(self.store, page,
                                          ["email"] if quiet else ["sms", "email"], snap.doc,
                                          "heartbeat", {"heartbeat": name,
                                                        "summary": summary})
        if created and heartbeat_basis(self.state(name)[0]) != basis:
            self.pages.resolve(page["id"], "heartbeat", via="ping")
        return page, created


# --- LiveCalls: the screened hunt and its live pages ------------------------------------------


class LiveCalls:
    """Live answer: who may reach the screened hunt (once in 10 minutes, not while their
    page is open), and the page a live call becomes: taken, accepted, recorded, transcribed,
    unanswered."""

    def __init__(self, pager: Pager):
        self.pager = pager
        self.store, self.instance, self.audit, self.team, self.book = (
            pager.store, pager.instance, pager.audit, pager.team, pager.book)
        self.pages = pager.pages
        # live/<number>.json as this instance last wrote or read it (see live_hunt); a copy
        # without an ETag was noted here while the store was unreachable
        self._hunts: OrderedDict[str, tuple[dict, str | None]] = OrderedDict()
        self._hunts_lock = threading.Lock()

    def live_targets(self, doc: dict) -> list[dict]:
        """Who a live call rings, in order: the on-call engineer, then `escalate_to`, up to
        `live_answer.max_targets` people in all."""
        oncall = oncall_member(doc)
        team = [members(doc)[m] for m in escalation_settings(doc)["escalate_to"]
                if m != oncall["id"] and m in members(doc)]
        return [oncall, *team][:live_settings(doc)["max_targets"]]

    def live_hunt(self, caller: dict) -> tuple[str | None, bool]:
        """A caller pressed 2: may they be put through? Every leg of a hunt counts against
        the hourly outbound budget, but a caller's first hunt is never capped; a caller who
        reached the hunt within LIVE_REPEAT_SECONDS, or whose page is open, goes straight to
        voicemail (which joins the open page), so ten calls from one number ring the team
        once. "Reached the hunt" is live/<number>.json, written conditionally (a create, or
        If-Match over the copy this instance holds), so two instances agree and the caller,
        who is waiting, costs one request; a repeat this instance saw costs none. Callers
        who withhold their number cannot be told apart: their legs are within the budget.
        While the store is unreachable the caller is put through (a person must be
        reachable; the budget is a cost control) and noted in memory here.
        Returns (why the caller goes to voicemail, or None; whether the legs are capped)."""
        number = caller.get("number", "")
        if not is_e164(number) or number in WITHHELD_NUMBERS:
            return None, True
        if any(p.get("state") == "open" and p.get("caller", {}).get("number") == number
               for p, _ in self.book.working()):
            return self.live_held(caller, "page open"), False
        now = time.time()
        with self._hunts_lock:
            known = self._hunts.get(number)
        if known is not None and now - known[0].get("hunted", 0) < LIVE_REPEAT_SECONDS:
            return self.live_held(caller, "hunted within 10 minutes"), False

        key = f"live/{number.lstrip('+')}.json"
        marker = {"number": number, "hunted": now, "instance": self.instance}
        etag = known[1] if known is not None else None
        try:
            # Written blind first (a create, or If-Match over this instance's copy): a first
            # hunt costs one request; only a conflict costs a read.
            for _ in range(3):
                try:
                    written = self.store.put(key, to_json(marker), if_match=etag,
                                             if_absent=etag is None)
                    break
                except StoreConflict:
                    found = read_json(self.store, key)
                    if found is not None:
                        self._note_hunt(number, *found)
                        if now - found[0].get("hunted", 0) < LIVE_REPEAT_SECONDS:
                            return self.live_held(caller, "hunted within 10 minutes"), False
                    etag = found[1] if found is not None else None
            else:  # others write it at this moment: they hunt, this one waits
                return self.live_held(caller, "hunted within 10 minutes"), False
        except StoreUnavailable:
            log.warning("event=live.unmarked reason=store_unavailable")
            self._note_hunt(number, marker, None)
            return None, False
        self._note_hunt(number, marker, written)
        IO_POOL.submit(self.audit.write, *self.audit.entry("live.hunted", "twilio", {
            "caller": number}))
        return None, False

    def _note_hunt(self, number: str, marker: dict, etag: str | None) -> None:
        with self._hunts_lock:
            self._hunts[number] = (marker, etag)
            self._hunts.move_to_end(number)
            while len(self._hunts) > 1000:
                self._hunts.popitem(last=False)

    def live_held(self, caller: dict, reason: str) -> str:
        """Audited off the caller's path (the entry waits in memory if the store is down)."""
        log.info("event=live.held reason=%s", log_value(reason))
        IO_POOL.submit(self.audit.write, *self.audit.entry("live.held", "twilio", {
            "caller": caller.get("number", ""), "reason": reason}))
        return reason

    def live_taken(self, call_sid: str) -> bool | None:
        """Whether a live call was taken: its page of kind call is in the store or, during
        an outage (or before the worker moved it), in the spool. None when the store could
        not answer and the spool does not have it: the caller is offered voicemail."""
        key = f"pages/{call_sid}.json"
        in_spool = read_json(self.pager.spool, key) if self.pager.spool is not None else None
        if in_spool is not None:
            return in_spool[0].get("kind") == "call"
        try:
            found = self.pages.read_page(call_sid)
        except StoreUnavailable:
            return None
        return found is not None and found[0].get("kind") == "call"

    def live_accepted(self, call_sid: str, caller: dict, member: dict, tried: list[str]
                      ) -> tuple[dict, bool]:
        """The engineer pressed 1 on a live call: a page of kind `call`, opened and
        acknowledged by them in one conditional create (its `page.opened` and
        `page.acknowledged` entries with it), so nothing escalates; the team gets an e-mail
        of the call (with the recording, when there is one, after it: see live_recorded).
        A second 1 (Twilio's retry) finds the page. While the store is unreachable the page
        goes to the spool, as a voicemail's does (see open_page): the call is connected
        whatever the store does. Returns (page, created)."""
        doc = self.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        now = time.time()
        record = live_settings(doc)["record"]
        page = {
            "id": call_sid, "number": None, "kind": "call", "opened": now, "caller": caller,
            "call_sid": call_sid, "recording_url": "", "duration": 0,
            "oncall": dict(oncall_member(doc)), "paged": list(tried), "live_tried": list(tried),
            "state": "acknowledged", "acked_by": member["id"], "acked_at": now,
            "deliveries": {}, "escalation": {"next_due": now, "step": 0, "claimed_until": 0},
            "audit_due": []}
        claimed_until = self.pager.claim_until()
        channels = [] if record else ["email"]  # with a recording, the e-mail waits for it
        for channel in channels:
            add_delivery(page, channel, claimed_until)
        for event, actor, details in (
                ("page.opened", "twilio", {"page": call_sid, "kind": "call", "caller": caller,
                                           "tried": tried}),
                ("page.acknowledged", member["id"], {"page": call_sid, "via": "live"})):
            key, entry = self.audit.entry(event, actor, details)
            page["audit_due"].append({"key": key, "entry": entry})
        key = f"pages/{call_sid}.json"
        spooled = read_json(self.pager.spool, key) if self.pager.spool is not None else None
        if spooled is not None:  # taken during the outage; the worker moves it to the store
            return spooled[0], False

        def create(store: Store) -> tuple[dict, bool]:
            try:
                etag = store.put(key, to_json(page), if_absent=True)
            except StoreConflict:
                try:
                    found = read_json(store, key)
                except StoreUnavailable as e:
                    raise StoreUncertain(str(e)) from None
                return (found[0] if found else page), False
            METRICS.count("oncall_pages_opened_total", kind="call")
            if store is self.store:
                self.book.put(page, etag)
            self.pager.hand_over(store, page, etag, channels, doc)
            self.pager.wake()
            return page, True

        try:
            return create(self.store)
        except StoreUnavailable as e:
            if self.pager.spool is None or isinstance(e, StoreUncertain):
                raise
            log.warning("event=page.spooled page=%s reason=store_unavailable", call_sid)
            return create(self.pager.spool)

    def live_recorded(self, call_sid: str, recording_sid: str, recording_url: str,
                      duration: int) -> bool:
        """The recording of an accepted live call: archived and e-mailed like a voicemail
        (`page.recorded`)."""
        claimed_until = self.pager.claim_until()

        def keep(page: dict | None) -> dict | None:
            if page is None or page.get("kind") != "call" or page.get("recording_url"):
                return None
            page.update(recording_url=recording_url, duration=duration,
                        recording_sid=recording_sid)
            for channel in ("email", "archive"):
                add_delivery(page, channel, claimed_until)
            key, entry = self.audit.entry("page.recorded", "twilio", {
                "page": call_sid, "number": page.get("number"), "recording": recording_sid,
                "duration": duration})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        written = self.pages.write_page(self.store, call_sid, keep, from_copy=False)
        if written is None:
            return False
        page, etag = written
        self.pager.hand_over(self.store, page, etag, ["email", "archive"])
        return True

    def transcribed(self, recording_sid: str, status: str, text: str) -> bool:
        """Twilio's transcript of a voicemail (the page's own, or one that joined it): kept on
        the page, texted to everyone paged so far ("Page N transcript: TEXT", at most 320
        characters in all), e-mailed in the voicemail's thread and put into the archive, all
        in the write that records it. A failed one is audited and nothing else happens.
        Twilio's retry finds the transcript there and changes nothing. A repeat's transcript
        goes on its page (listing the repeat there first, should its `join` not have run)."""
        page = self.pages.page(recording_sid) or next(
            (p for p, _ in self.book.working()
             if any(r["id"] == recording_sid for r in p.get("repeats", []))), None)
        repeat = None
        if page is not None and page.get("joins"):  # a repeat's own record: its page
            repeat, page = page, self.pages.page(page["joins"])
        if page is None:
            return False
        page_id = page["id"]
        if status != "completed":
            self.audit.record("page.transcript_failed", "twilio", {
                "page": page_id, "number": page.get("number"), "recording": recording_sid,
                "status": status})
            return True
        doc = self.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        claimed_until = self.pager.claim_until()
        suffix = "" if recording_sid == page_id else f":{recording_sid}"
        channels: list[str] = []

        def keep(current: dict | None) -> dict | None:
            channels.clear()
            if current is None:
                return None
            if repeat is not None:
                current = fold_in(current, repeat) or current
            target = current if not suffix else next(
                (r for r in current.get("repeats", []) if r["id"] == recording_sid), None)
            if target is None or target.get("transcript"):
                return None
            target["transcript"] = text
            number = current.get("number") or self.pages.number_of(current)
            prefix = f"Page {number} transcript: "
            body = prefix + (text if len(prefix + text) <= 320
                             else text[:320 - len(prefix) - 3] + "...")
            for member_id in current.get("paged", []):
                member = members(doc).get(member_id)
                if member and not member.get("opted_out"):
                    channels.append(f"transcript_sms:{member_id}{suffix}")
                    add_delivery(current, channels[-1], claimed_until, to=member["phone"],
                                 body=body)
            for channel in (f"transcript_email{suffix}", f"transcript_archive{suffix}"):
                channels.append(channel)
                add_delivery(current, channel, claimed_until)
            key, entry = self.audit.entry("page.transcribed", "twilio", {
                "page": page_id, "number": current.get("number"), "recording": recording_sid,
                "characters": len(text)})
            current.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return current

        written = self.pages.write_page(self.store, page_id, keep)
        if written is None:
            return True
        current, etag = written
        self.pager.hand_over(self.store, current, etag, channels, doc)
        return True

    def call_unanswered(self, page_id: str, step: int) -> None:
        """A page call to the on-call engineer ended busy / no-answer / failed: it counts as
        an attempt at once, so the next step is due now instead of after ack_timeout."""
        def hurry(page: dict | None) -> dict | None:
            escalation = (page or {}).get("escalation", {})
            if (not page or page.get("state") != "open" or escalation.get("step") != step + 1
                    or escalation.get("last_kind") != "oncall"
                    or escalation["next_due"] <= time.time()):
                return None
            escalation["next_due"] = time.time()
            return page

        if self.pages.write_page(self.store, page_id, hurry, from_copy=False) is not None:
            self.pager.wake()


# --- Commands: an SMS in, the right room called, the reply ------------------------------------


class Commands:
    """The team's SMS: handle_sms parses a text once per MessageSid (replay markers in
    replies/), calls the right room (Team for WHO/TAKE/C/X/NEXT/STOP/START, Pages for ACK
    and STATUS) and renders the reply."""

    def __init__(self, pager: Pager):
        self.pager = pager
        self.store, self.team, self.book = pager.store, pager.team, pager.book
        self.pages, self.oncall = pager.pages, pager.oncall
        self.help_limiter = ReplyLimiter(HELP_REPEAT_SECONDS)

    def ack_command(self, doc: dict, member: dict, args: list[str]) -> str:
        if args and args[0].isdecimal() and args[0].isascii():
            number = whole_number(args[0])
            page = self.pages.page_by_number(number) if number is not None else None
            if page is None:
                return f"There is no recent page {args[0][:12]}."
            targets = [page]
        else:
            targets = [page for page in self.ack_candidates(member)
                       if page.get("state") == "open" and member["id"] in page.get("paged", [])]
            if not targets:
                return "No open pages for you. Nothing to acknowledge."
        lines = []
        acked = in_parallel(IO_POOL, *(functools.partial(self.pages.acknowledge, page["id"], member,
                                                         "sms") for page in targets))
        for page, (done, current) in zip(targets, acked, strict=True):
            if done:
                lines.append(f"Page {current['number']} acknowledged: "
                             f"{page_summary(current)}.")
            else:
                lines.append(f"Page {self.pages.number_of(page)} was already "
                             f"{page_state(current, doc)}.")
        return " ".join(lines) + f" Thanks, {first_name(member)}."

    def ack_candidates(self, member: dict) -> list[dict]:
        """The pages a plain ACK looks at: those with work in the book and the recent ones
        (counters/pages.json) it holds copies of. A copy may predate an escalation that
        reached this member, or a warning that turned critical on another instance: the
        open and listed ones that do not name the member are read again (conditional reads,
        at once, with the counter's), and a recent page the book does not know (opened
        elsewhere since the last listing) after that. Two round trips at most, at 10,000
        pages as at 10 (a listing of pages/ would cost one request per 1,000)."""
        with self.pages._counter_lock:
            cached = self.pages._counter
        found: dict[str, dict] = {page["id"]: page for page, _ in self.book.working()}
        for item in (cached[0] if cached else {}).get("recent", []):
            known = self.book.get(str(item.get("id")))
            if known is not None:
                found.setdefault(known[0]["id"], known[0])
        behind = [page_id for page_id, page in found.items()
                  if page.get("state") in ("open", "listed")
                  and member["id"] not in page.get("paged", [])]
        answers = in_parallel(IO_POOL, self.pages.recent_items,
                              *(functools.partial(self.pages.read_page, p) for p in behind))
        for page_id, page in zip(behind, answers[1:], strict=True):
            if page is None:
                found.pop(page_id, None)
            else:
                found[page_id] = page[0]
        unknown = [item["id"] for item in answers[0] if item["id"] not in found and (
            self.book.get(item["id"]) is None and not self.book.etag(item["id"])
            and not self.book.gone(item["id"]) and not (
                self.book.listed and item["opened"] < time.time() - QUIET_AFTER))]
        if unknown:
            read = in_parallel(IO_POOL,
                               *(functools.partial(self.pages.read_page, p) for p in unknown))
            found.update((page[0]["id"], page[0]) for page in read if page is not None)
        return list(found.values())

    def status_pages(self) -> tuple[list[dict], list[dict], list[dict], int]:
        """What STATUS shows: (ringing, listed, recent others, listed ones not read), each
        newest first. Every page that rings comes first however many pages came after it,
        so that a storm of warnings cannot hide it. The candidates come from the book (every
        page in pages/ that rings, waits or is listed, from memory) and from the counter's
        recent list (pages another instance opened since the last listing). One round of
        reads at once: the counter, the pages that ring (afresh: an ACK elsewhere) and the
        newest listed ones (one may ring now); more only for recent pages the book does not
        know or holds no copy of. A few requests, at 10,000 pages as at 10."""
        active = self.book.active()
        by_age = sorted(active, key=lambda page_id: active[page_id][1], reverse=True)
        listed_ids = [p for p in by_age if active[p][0] == "listed"]

        def reader(page_id: str, fresh: bool) -> Callable[[], tuple[dict, str] | None]:
            known = None if fresh else self.book.get(page_id)
            return lambda: known or self.pages.find_page(page_id)

        def fetch(page_ids: list[str], fresh: bool) -> dict[str, dict]:
            found = in_parallel(IO_POOL, *(reader(p, fresh) for p in page_ids)
                                ) if page_ids else []
            return {page_id: page[0] for page_id, page in zip(page_ids, found, strict=True)
                    if page is not None}

        def state(page_id: str) -> str:
            return str(pages.get(page_id, {}).get("state"))

        first = [p for p in by_age if active[p][0] in ("open", "waiting")] + \
            listed_ids[:STATUS_LINES]
        found = in_parallel(IO_POOL, self.pages.recent_items, *(reader(p, True) for p in first))
        items: list[dict] = found[0]
        pages = {page_id: page[0] for page_id, page in zip(first, found[1:], strict=True)
                 if page is not None}
        opened = {page_id: when for page_id, (_, when) in active.items()}
        opened.update((item["id"], item["opened"]) for item in items)
        newest = sorted(opened, key=lambda page_id: opened[page_id], reverse=True)
        # the recent ones the book holds no copy of, whatever their state (one round)
        pages.update(fetch([p for p in newest if p not in active and p not in pages
                            and self.book.get(p) is None][:STATUS_LINES], fresh=True))
        ringing = [pages[p] for p in newest if state(p) in ("open", "waiting")]
        listed = [pages[p] for p in newest if state(p) == "listed"]
        room = max(0, STATUS_LINES - len(ringing) - len(listed))
        others = [p for p in (item["id"] for item in items) if (
            state(p) not in SHOWN_FIRST if p in pages else p not in active)][:room]
        pages.update(fetch([p for p in others if p not in pages], fresh=False))
        recent = [pages[p] for p in others if p in pages and state(p) not in SHOWN_FIRST]
        return ringing, listed, recent, len(listed_ids[STATUS_LINES:])

    def status(self, doc: dict) -> str:
        """Pages that ring first, newest first (up to STATUS_LINES, then how many more), then
        listed ones and the recent others as space allows (the listed ones left out are
        counted), so that the SMS stays readable."""
        ringing, listed, recent, unread = self.status_pages()
        quiet = quiet_status(doc, time.time())
        if not (ringing or listed or recent) and not any(
                m.get("opted_out") for m in members(doc).values()):
            return f"{quiet}\nNo open pages." if quiet else "No open pages."
        open_count = sum(1 for p in ringing if p.get("state") == "open")
        lines = [f"{open_count} open." if open_count else "No open pages."]
        if quiet:
            lines.insert(0, quiet)

        def line(page: dict) -> str:
            failures = list(dict.fromkeys(  # once each: an MMS and its SMS often share one
                f"{d['reason'] or 'failed'} ({d['code']})" for d in
                page.get("deliveries", {}).values() if d.get("code")))
            return (f"#{self.pages.number_of(page)} {short_time(page['opened'])} "
                    f"{page_summary(page)}: {page_state(page, doc)}."
                    + (f" Text failed: {', '.join(failures)}." if failures else ""))

        lines += map(line, ringing[:STATUS_LINES])
        if len(ringing) > STATUS_LINES:
            more = ringing[STATUS_LINES:]
            lines.append(f"+{len(more)} more open: " + ", ".join(
                f"#{self.pages.number_of(p)}" for p in more[:10]) + (" ..." if len(more) > 10
                                                               else "."))
        room = max(0, STATUS_LINES - len(ringing))
        lines += map(line, [*listed, *recent][:room])
        more_listed = len(listed) - min(len(listed), room) + unread
        if more_listed:
            lines.append(f"+{more_listed} listed (e-mailed, nobody rung).")
        opted_out = [m["name"] for m in members(doc).values() if m.get("opted_out")]
        if opted_out:
            lines.append(f"Opted out of texts (called instead): {', '.join(opted_out)}.")
        return "\n".join(lines)

    # --- one SMS from the control number -------------------------------------------------------

    def handle_sms(self, sender: str, body: str, message_sid: str = "") -> str | None:
        """The reply to one team SMS, or None for no reply (strangers, limited help).

        A command that changes something runs once per MessageSid, across restarts and
        instances: a marker (replies/<MessageSid>.json, a conditional create) is taken before
        it runs and given its reply after, so a replayed request, captured or retried, gets
        the first reply and changes nothing; one whose first run stopped half way gets no
        reply (the member sends the command again, as a new message).

        Requests that do not depend on each other go at once: for a sender whom the config
        in memory names as a member, the config's check, the marker and C's session read are
        one round trip (a stranger never gets that far, so leaves no marker)."""
        command, args = parse_command(body)
        marker = (f"replies/{message_sid}.json" if command in STATE_CHANGING
                  and MESSAGE_SID.fullmatch(message_sid) else None)
        known = self.team.last_known()
        expected = member_by_phone(known.doc, sender) if known and marker else None
        record = {"member": None, "command": command, "time": time.time(), "reply": None,
                  "done": False}

        def claim(member: dict) -> Callable[[], Any]:
            return lambda: self.store.put(marker, to_json({**record, "member": member["id"]}),
                                          if_absent=True)

        def session_of(member: dict) -> Callable[[], Any]:
            return lambda: read_json(self.store, f"sessions/{member['id']}.json")

        max_age = TEAM_CONFIG_MAX_AGE if command in ("take", "confirm") else 0.0
        calls: list[Callable[[], Any]] = [lambda: self.team.read(max_age=max_age)]
        if expected is not None:
            calls.append(claim(expected))
            if command == "confirm":
                calls.append(session_of(expected))
        try:
            found = in_parallel(IO_POOL, *calls)
        except StoreConflict:
            return self._first_reply(marker, message_sid)
        except StoreUnavailable:
            return STORE_DOWN_TEXT
        snap = found[0]
        member = member_by_phone(snap.doc, sender)
        if member is None:
            log.info("event=sms.stranger from=%s", log_value(sender, 40))
            return None
        log.debug("event=sms.command member=%s command=%s", member["id"], command)
        if command is None:
            return HELP_TEXT if self.help_limiter.allow(sender, time.time()) else None
        session_read = len(found) > 2 and expected["id"] == member["id"]
        session = found[2] if session_read else None
        reply: str | None = STORE_DOWN_TEXT
        if not (snap.stale and command in STATE_CHANGING):
            later: list[Callable[[], Any]] = []  # what could not go with the config's check
            if marker is not None and expected is None:
                later.append(claim(member))
            if command == "confirm" and not session_read:
                later.append(session_of(member))
            try:
                done = in_parallel(IO_POOL, *later) if later else []
            except StoreConflict:
                return self._first_reply(marker, message_sid)
            except StoreUnavailable:
                return STORE_DOWN_TEXT
            if command == "confirm" and not session_read:
                session = done[-1]
            if max_age and session and session[0].get("config_etag") != snap.etag:
                try:  # the TAKE was shown a newer config than the copy here
                    snap = self.team.read()
                except StoreUnavailable:
                    return STORE_DOWN_TEXT
            reply = self.run_command(command, args, snap, member, session, body=body)
        if marker is not None:  # after the answer: a replay in between gets no reply
            IO_POOL.submit(self._keep_reply, marker, {**record, "member": member["id"],
                                                      "reply": reply, "done": True})
        return reply

    def _first_reply(self, marker: str | None, message_sid: str) -> str | None:
        """A message seen before: the reply it got then (None if that run stopped first)."""
        first = read_json(self.store, marker) if marker else None
        log.warning("event=sms.replayed sid=%s", log_value(message_sid, 40))
        return first[0].get("reply") if first else None

    def _keep_reply(self, marker: str, record: dict) -> None:
        try:
            self.store.put(marker, to_json(record))
        except StoreUnavailable:
            log.warning("event=sms.reply_unkept marker=%s", marker)

    def run_command(self, command: str, args: list[str], snap: Snapshot, member: dict,
                    session: tuple[dict, str] | None = None, body: str = "") -> str | None:
        try:
            if command == "quiet":
                return self.pager.quiet_hours.command(snap, member, args, body)
            if command == "confirm" and session and session[0].get("action") == "quiet":
                return self.pager.quiet_hours.confirm(snap, member, session)
            if command == "who":
                return self.oncall.who(snap)
            if command == "take":
                return self.oncall.take(snap, member, args)
            if command == "confirm":
                return self.oncall.confirm(snap, member, session)
            if command == "cancel":
                return self.oncall.cancel(snap.doc, member)
            if command == "ack":
                return self.ack_command(snap.doc, member, args)
            if command == "status":
                return self.status(snap.doc)
            if command in ("optout", "optin"):
                self.oncall.opt(snap, member, out=command == "optout")
                return None
            if command == "next":
                return self.oncall.next_handoff(snap.doc) or NO_ROTATION_TEXT
            if command == "look":
                return LOOK_TEXT
            if command == "test":  # the reply is the test text
                self.pager.contacts.tested(member["id"], "sms", member["id"])
                return CONTACT_TEST_TEXT
            if command == "ok":
                if self.pager.contacts.confirmed(member["id"], "sms"):
                    return (f"Thanks, {first_name(member)}: your phone gets the pager's texts "
                            "(recorded).")
                # no test waits for an answer: an OK is then like any unknown word
                return HELP_TEXT if self.help_limiter.allow(member["phone"], time.time()) \
                    else None
            return HELP_TEXT
        except StoreUnavailable:
            return STORE_DOWN_TEXT


class Overrides:
    """Somebody on call instead for a while (SPEC 21): `TAKE 4h` / `TAKE UNTIL FRI 09:00`
    by SMS (confirmed with C), or planned ahead by the command line (`override add`).
    Each is `current_config.overrides[i]`; oncall_shifts lays them over the rotation, so
    the handoff at an override's start and its hand-back at the end are the rotation's own
    (Team.hand_off: one conditional write each, exactly once across instances and
    restarts). Each change here is one conditional write with its audit entry
    (`override.added` / `override.removed`, or `oncall.changed` when it changes who is on
    call now, the handoff made in the same write)."""

    def __init__(self, pager: Pager):
        self.pager = pager

    def change(self, change: Callable[[dict], str], actor: str, event: str, via: str,
               snap: Snapshot | None = None, tries: int = CONFIG_CHANGE_TRIES
               ) -> tuple[Snapshot, str]:
        """Read (or take `snap`), change a copy (`change` returns what it did; UsageError
        refuses), drop overrides ended long ago, make a handoff it makes due, write
        conditionally. A race lost is made again over the new version, `tries` times."""
        team = self.pager.team
        for attempt in range(tries):
            if snap is None or attempt:
                snap = team.read()
            if snap.stale:
                raise StoreUnavailable(team.problem or "store unreachable")
            doc = copy.deepcopy(snap.doc)
            what = change(doc)
            kept = [o for o in overrides(doc)
                    if override_times(o)[1] > time.time() - OVERRIDES_KEPT]
            if kept:
                doc["current_config"]["overrides"] = kept
            else:
                doc["current_config"].pop("overrides", None)
            told, details, handed = self.pager.oncall.handoff_with_change(
                doc, {"via": via, "change": what})
            phone = members(doc).get(actor, {}).get("phone")
            told = [job for job in told if job[1]["to"] != phone]  # C's reply tells them
            try:
                written = team.write(doc, base=snap, actor=actor, details=details,
                                     messages=told, event=event,
                                     oncall_by=actor if handed else "")
            except StoreConflict:
                if attempt + 1 == tries:
                    raise
                continue
            if self.pager.start_message is not None:
                for message in written.queued:
                    self.pager.start_message(*message)
            return written, what
        raise StoreConflict("the config kept changing")

    def confirm(self, snap: Snapshot, member: dict, until: float) -> str:
        """C after `TAKE 4h` / `TAKE UNTIL ...`: an override from now until then, and the
        member on call (unless already) in the same write; the previous engineer told."""
        doc, zone = snap.doc, team_zone(snap.doc)
        previous = oncall_member(doc)
        if until <= time.time():
            return "The time of your TAKE has passed. Nothing changed; send TAKE again."

        def add(doc: dict) -> str:
            return add_override(doc, member["id"], time.time(), until, member["id"])
        try:
            new, _ = self.change(add, member["id"], "override.added", "sms", snap=snap,
                                 tries=1)
        except (StoreConflict, ConfigError):
            self.pager.store.delete(f"sessions/{member['id']}.json")
            return self.pager.oncall._changed_under(self.pager.team.read().doc, member)
        pager_phone = new.doc["current_config"]["pager_phone"]
        if previous["id"] == member["id"]:
            return (f"Okay, {first_name(member)}, you stay on call until "
                    f"{local_text(zone, until)}.")
        told = ("was not told (opted out of texts)" if previous.get("opted_out")
                else "has been told")
        return (f"Okay, {first_name(member)}, you are on call until {local_text(zone, until)}"
                f". {previous['name']} {told}. Leave a message at {pager_phone} to test "
                "delivery.")


def add_override(doc: dict, member: str, start: float, end: float, by: str) -> str:
    """Add an override to `doc` (a copy about to be written); what was done, in a line.
    UsageError for one that is not a member, ends before it starts or now, or is longer
    than 14 days."""
    if member not in members(doc):
        raise UsageError(f"there is no member {member!r}")
    start, end = math.floor(start), math.ceil(end)
    if end <= start:
        raise UsageError("an override must end after it starts")
    if end <= time.time():
        raise UsageError("that override would have ended already")
    if end - start > MAX_OVERRIDE:
        raise UsageError(f"an override lasts at most 14 days (this one "
                         f"{duration_text(end - start)})")
    doc["current_config"].setdefault("overrides", []).append(
        {"member": member, "start": override_stamp(start), "end": override_stamp(end),
         "by": by})
    zone = team_zone(doc)
    return (f"override: {member} on call from {local_text(zone, start)} until "
            f"{local_text(zone, end)}")


def remove_override(doc: dict, number: int) -> str:
    """Remove override `number` (1-based, as `override list` shows): one running now ends
    now (so on-call is handed back at once); one planned or ended is deleted."""
    listed = overrides(doc)
    if not 1 <= number <= len(listed):
        raise UsageError(f"there is no override {number} (see: oncall-pager override list)")
    override = listed[number - 1]
    start, end = override_times(override)
    now = math.floor(time.time())
    if start <= now < end:  # running
        if now == start:  # it started this very second: it ends with the next (times are
            time.sleep(max(0.0, start + 1 - time.time()))  # whole seconds, end after start)
            now = start + 1
        override["end"] = override_stamp(now)
        return f"override {number} ({override['member']}) ended now"
    del listed[number - 1]
    return f"override {number} ({override['member']}) removed"



# ==============================================================================================
# Channels: Twilio (live and dry-run behind one interface), e-mail, the recording fetch
# ==============================================================================================


# Twilio's error codes for a text that cannot reach a person: refused at once by the REST API
# (21xxx) or reported later by the message status callback (30xxx), with a readable reason.
CARRIER_ERRORS = {
    21211: "invalid number", 21408: "region not enabled", 21610: "opted out (sent STOP)",
    21612: "unreachable from this number", 21614: "not a mobile number",
    30003: "unreachable handset", 30004: "blocked", 30005: "unknown number",
    30006: "landline or unreachable carrier", 30007: "carrier filtering",
    30008: "unknown error", 30034: "unregistered 10DLC number",
}
# Of those, the ones where a plain SMS would fail too: no MMS-to-SMS fallback, call instead.
NO_TEXT_CODES = {21211, 21408, 21610, 21612, 21614, 30005, 30006}


def carrier_reason(code: int | None) -> str:
    return CARRIER_ERRORS.get(code or 0, "")


class DeliveryError(Exception):
    """One attempt at a channel failed. `permanent` when retrying cannot help (Twilio said the
    request itself is wrong), so the channel gives up and falls back instead; `code` is
    Twilio's error code when it gave one."""

    def __init__(self, message: str, permanent: bool = False, code: int | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.code = code


class Telephony:
    """Outbound SMS/MMS and calls. `LiveTelephony` talks to Twilio's REST API; `DryRun`
    writes what it would send into the store's outbox/ (so `make run` shows the whole flow)."""

    def send_sms(self, to: str, from_: str, body: str, media_url: str = "",
                 status_callback: str = "") -> str:
        raise NotImplementedError

    def place_call(self, to: str, from_: str, url: str, status_callback: str) -> str:
        raise NotImplementedError


class LiveTelephony(Telephony):
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg

    def _client(self) -> Any:
        """A client per send: sends are rare, and this keeps threads from sharing a session."""
        from twilio.http.http_client import TwilioHttpClient
        from twilio.rest import Client

        client = Client(self.cfg.account_sid, self.cfg.auth_token,
                        http_client=TwilioHttpClient(timeout=self.cfg.http_timeout))
        client.api.base_url = self.cfg.api_base_url.rstrip("/")
        return client

    def warm_up(self) -> None:
        """Import what the first send would (the client loads its resources lazily, about
        0.1 s): at start, not on the first page."""
        client = self._client()
        for resource in (client.messages, client.calls):
            resource.list  # noqa: B018 (touching it imports it)

    def _send(self, what: Callable[[Any], Any]) -> str:
        from twilio.base.exceptions import TwilioException, TwilioRestException

        try:
            return str(what(self._client()).sid)
        except TwilioRestException as e:
            permanent = 400 <= e.status < 500 and e.status not in (401, 403, 408, 429)
            reason = carrier_reason(e.code)
            raise DeliveryError(f"twilio {e.status} code={e.code}"
                                + (f": {reason}" if reason else ""), permanent, e.code) from None
        except (TwilioException, OSError) as e:
            raise DeliveryError(f"twilio unreachable: {type(e).__name__}") from None
        except Exception as e:  # requests' own errors: connection refused, timeouts
            raise DeliveryError(f"twilio request failed: {type(e).__name__}") from None

    def send_sms(self, to: str, from_: str, body: str, media_url: str = "",
                 status_callback: str = "") -> str:
        params: dict[str, Any] = {"to": to, "from_": from_, "body": body}
        if media_url:
            params["media_url"] = [media_url]
        if status_callback:
            params["status_callback"] = status_callback
        return self._send(lambda client: client.messages.create(**params))

    def place_call(self, to: str, from_: str, url: str, status_callback: str) -> str:
        """A call; without a status_callback (a contact test) Twilio reports nothing back."""
        told = {"status_callback": status_callback, "status_callback_method": "POST",
                "status_callback_event": ["completed"]} if status_callback else {}
        return self._send(lambda client: client.calls.create(
            to=to, from_=from_, url=url, method="POST", **told))


class DryRunTelephony(Telephony):
    def __init__(self, store: Store):
        self.store = store

    def _write(self, kind: str, record: dict) -> str:
        sid = ("DRYSM" if kind != "call" else "DRYCA") + uuid.uuid4().hex[:27]
        record = {"sid": sid, "kind": kind, "time": iso_time(time.time()), **record}
        self.store.put(f"outbox/{sortable_stamp(time.time())}-{kind}-{sid}.json",
                       to_json(record), if_absent=True)
        return sid

    def send_sms(self, to: str, from_: str, body: str, media_url: str = "",
                 status_callback: str = "") -> str:
        return self._write("mms" if media_url else "sms", {
            "to": to, "from": from_, "body": body, "media_url": media_url,
            "status_callback": status_callback})

    def place_call(self, to: str, from_: str, url: str, status_callback: str) -> str:
        return self._write("call", {"to": to, "from": from_, "url": url,
                                    "status_callback": status_callback})


def mail_id(kind: str, message_id: str) -> str:
    """The Message-ID of a page's e-mail (`page`) or of its transcript (`transcript`), made
    from the RecordingSid, so a follow-up can name the first in In-Reply-To without storing
    it, and a resent copy keeps its id."""
    return f"<{kind}-{message_id}@oncall-pager>"


def build_email(mail: dict, subject: str, body: str,
                attachment: tuple[str, bytes] | None, message_id: str = "",
                reply_to: str = "") -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = mail["from_email"]
    message["To"] = mail["to_email"]
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(usegmt=True)
    message["Message-ID"] = message_id or email.utils.make_msgid(domain="oncall-pager")
    if reply_to:
        message["In-Reply-To"] = reply_to
        message["References"] = reply_to
    message.set_content(body)
    if attachment:
        message.add_attachment(attachment[1], maintype="audio", subtype="mpeg",
                               filename=attachment[0])
    return message


def send_email(mail: dict, message: email.message.EmailMessage, timeout: float) -> None:
    """Send through smtplib: port 465 is implicit TLS, `mail_use_tls` is STARTTLS, and a login
    happens only when a username is set. Any failure is a DeliveryError (retried)."""
    host, port = mail["mail_server"], int(mail["mail_port"])
    try:
        if port == 465:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout,
                                                  context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        with smtp:
            if port != 465 and mail.get("mail_use_tls"):
                smtp.starttls(context=ssl.create_default_context())
            if mail.get("mail_username"):
                smtp.login(mail["mail_username"], mail.get("mail_password") or "")
            smtp.send_message(message)
    except smtplib.SMTPAuthenticationError as e:
        raise DeliveryError(f"smtp authentication refused ({e.smtp_code})") from None
    except (smtplib.SMTPException, OSError) as e:
        raise DeliveryError(f"smtp {type(e).__name__}: {str(e)[:120]}") from None


def recording_url_allowed(cfg: AppConfig, url: str) -> bool:
    """Only recordings of our own account on the configured Twilio API host are fetched; the
    predecessor fetched (and e-mailed, and stored) whatever URL a request named."""
    prefix = f"{cfg.api_base_url.rstrip('/')}/2010-04-01/Accounts/{cfg.account_sid}/Recordings/"
    return url.startswith(prefix) and re.fullmatch(r"RE[0-9a-zA-Z]{32}", url[len(prefix):]) \
        is not None


# A few frames of a silent MPEG-1 Layer III stream: the "recording" of dry-run mode.
SAMPLE_MP3 = (b"\xff\xfb\x90\x64" + bytes(413)) * 40
MAX_RECORDING = 32 * 1024 * 1024


class CredentialsStayHome(urllib.request.HTTPRedirectHandler):
    """Twilio may redirect a recording to a pre-signed URL on another host: follow it without
    the account's credentials, and never from https down to http."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if old.scheme == "https" and new.scheme != "https":
            raise DeliveryError("recording redirected from https to http", permanent=True)
        follow = super().redirect_request(req, fp, code, msg, headers, newurl)
        if follow is not None and new.netloc != old.netloc:
            follow.remove_header("Authorization")
        return follow


def fetch_recording(cfg: AppConfig, url: str) -> bytes:
    """The mp3 of a recording, with the account's basic auth (accounts may require it)."""
    if not recording_url_allowed(cfg, url):
        raise DeliveryError(f"recording URL not allowed: {url[:100]}", permanent=True)
    if cfg.dry_run:
        return SAMPLE_MP3
    token = base64.b64encode(f"{cfg.account_sid}:{cfg.auth_token}".encode()).decode()
    request = urllib.request.Request(url + ".mp3", headers={"Authorization": f"Basic {token}"})
    opener = urllib.request.build_opener(CredentialsStayHome)
    try:
        with opener.open(request, timeout=cfg.http_timeout) as answer:
            data = answer.read(MAX_RECORDING + 1)
    except urllib.error.HTTPError as e:
        raise DeliveryError(f"recording fetch {e.code}", permanent=e.code == 404) from None
    except (OSError, ValueError) as e:
        raise DeliveryError(f"recording fetch failed: {type(e).__name__}") from None
    if len(data) > MAX_RECORDING:
        raise DeliveryError("recording larger than 32 MiB", permanent=True)
    return data


# --- push (ntfy) and chat webhooks: POSTs to the URLs of the operational config -----------

OUTSIDE_TIMEOUT = 5.0    # seconds, each POST to a push or webhook URL (and its answer)
OUTSIDE_ATTEMPTS = 12    # a push or webhook that keeps failing is given up after as many
HOOK_JOBS = "jobs/hook-"  # jobs/hook-<audit entry>-<webhook name>.json: one event, one webhook
HOOK_JOBS_KEPT = DAY - 3600  # an event older than this gets no job (a sent one is kept a day)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A push or webhook URL that redirects is not followed (the answer is an HTTP 3xx error):
    the body goes to the URL the operator wrote, nowhere else."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


def post_outside(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST `body` to a push or webhook URL (checked again here: only https://, or http://
    to a loopback address), OUTSIDE_TIMEOUT for each step, no redirect followed. Returns the
    HTTP status; DeliveryError otherwise, permanent for an answer that a retry cannot change
    (a redirect, a 4xx other than 408 and 429)."""
    problem = outbound_url_problem(url)
    if problem:
        raise DeliveryError(f"URL {problem}", permanent=True)
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "User-Agent": f"oncall-pager/{VERSION}", **headers})
    try:
        with urllib.request.build_opener(NoRedirects).open(
                request, timeout=OUTSIDE_TIMEOUT) as answer:
            answer.read(64 * 1024)
            return int(answer.status)
    except urllib.error.HTTPError as e:
        e.close()
        if 300 <= e.code < 400:
            raise DeliveryError(f"HTTP {e.code}: redirect not followed", permanent=True
                                ) from None
        raise DeliveryError(f"HTTP {e.code}", permanent=400 <= e.code < 500
                            and e.code not in (408, 429)) from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DeliveryError(f"POST failed: {type(reason).__name__}") from None


def header_text(text: str) -> str:
    """A header value http.client can send: ASCII as it is, anything else as RFC 2047
    (ntfy reads both), controls gone."""
    text = CONTROL_CHARACTERS.sub(" ", text).strip()
    if text.isascii():
        return text
    return "=?UTF-8?B?" + base64.b64encode(text.encode("utf-8", "replace")).decode() + "?="


class Push:
    """A member's push topic (`available_users.users.<id>.push`, an ntfy URL): the first
    notification of a page goes there too, as a channel `push` of the page (durable, retried,
    audited like the MMS, run on threads of its own so a slow push server delays no text).
    ntfy's headers: Title, Priority (max for a voicemail and a critical alert, else urgent),
    Tags. The body is the text, never a link to the recording (it carries the account)."""

    def __init__(self, post: Callable[[str, bytes, dict[str, str]], int] = post_outside):
        self.post = post

    @staticmethod
    def message(page: dict, number: int | str, doc: dict) -> tuple[str, str, str, str]:
        """(title, text, priority, tags) of a page's push."""
        kind = page.get("kind", "voicemail")
        if kind in ("alert", "heartbeat"):
            text = f"Page {number}{':' if kind == 'heartbeat' else ''} {alert_text(page)}."
            loud = kind == "alert" and page.get("alert", {}).get("severity") == "critical"
        elif kind == "voicemail":
            text = (f"Page {number}: on-call voicemail ({page.get('duration', 0)} sec) from "
                    f"{caller_text(page)}.")
            loud = True
        else:
            text = f"Page {number}: {page_summary(page)}."
            loud = False
        text += f" Text ACK {number} to {doc['current_config']['from_phone']} to acknowledge."
        title = " ".join(x for x in (team_name(doc), f"page {number}") if x)
        return (title, text, "max" if loud else "urgent",
                f"{'rotating_light' if loud else 'warning'},{kind}")

    def send(self, url: str, page: dict, number: int | str, doc: dict) -> int:
        title, text, priority, tags = self.message(page, number, doc)
        return self.post(url, text.encode(), {
            "Content-Type": "text/plain; charset=utf-8", "Title": header_text(title),
            "Priority": priority, "Tags": tags})


def hook_text(entry: dict, page: dict | None, doc: dict | None) -> str:
    """One line for a chat room: what happened, in the words of the texts."""
    details, event = entry.get("details", {}), entry.get("event")
    users = members(doc) if doc else {}

    def name(member_id: object) -> str:
        return str(users.get(member_id, {}).get("name") or member_id)

    number = (page or {}).get("number") or details.get("number")
    what = f"Page {number}" if number else "A page"
    about = f": {page_summary(page)}" if page else ""
    team = f"[{team_name(doc)}] " if doc and team_name(doc) else ""
    if event == "page.opened":
        text = f"{what if number else 'New page'}{about}. Paging {name(details.get('oncall'))}."
    elif event == "page.acknowledged":
        text = f"{what} acknowledged by {name(entry.get('actor'))}{about}."
    elif event == "page.resolved":
        text = f"{what} resolved{about}."
    elif event == "page.escalated":
        reached = ", ".join(name(t) for t in details.get("targets", []))
        text = (f"{what} escalated (step {int(details.get('step', 0)) + 1}): calling "
                f"{reached}{about}.")
    elif event == "oncall.changed":
        text = f"{name(details.get('to'))} is now on call (was {name(details.get('from'))})."
    else:
        text = f"{event}{about}."
    return team + text


def slack_escaped(text: str) -> str:
    """Slack's three control characters in message text (Mattermost and the rest agree)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Webhooks:
    """The team's webhooks (`current_config.webhooks`): page.opened, page.acknowledged,
    page.resolved, page.escalated and oncall.changed, as signed JSON or as a chat line
    (`{"text": ...}`: Slack, Mattermost, Rocket.Chat, Matrix hookshot, Teams workflows).

    Each event a webhook follows is a job, jobs/hook-<audit entry>-<name>.json, created
    (a conditional create, so once) before the audit entry of the event is written: whoever
    writes that entry again after a stop creates the job again or finds it there, so a
    webhook hears of every event at least once (receivers dedupe on `id`). The worker sends
    the jobs like the single messages (claims, retries with backoff, audited), on threads of
    their own: a dead webhook never delays a page. The secret of a webhook lives in the
    operational config next to it (like mail_password; `config show` masks it) and signs
    each body: X-Oncall-Signature: sha256=HMAC-SHA256(body, secret as printed)."""

    def __init__(self, store: Store,
                 post: Callable[[str, bytes, dict[str, str]], int] = post_outside):
        self.store = store
        self.post = post

    def queue(self, doc: dict | None, key: str, entry: dict, claimed_until: float
              ) -> list[tuple[str, dict]]:
        """The jobs of one audit entry (its key names them), created once; returns those
        this call created. No request when no webhook follows the event."""
        event_id = key.rsplit("/", 1)[-1].removesuffix(".json")
        made: list[tuple[str, dict]] = []
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            happened = dt.datetime.fromisoformat(str(entry.get("time"))).timestamp()
            if happened < time.time() - HOOK_JOBS_KEPT:
                # its job (sent, then kept a day) may be gone: an old entry written again
                # (a quiet page's, after a restart) must not post an old event again
                return made
        for hook in webhooks(doc):
            if entry.get("event") not in hook.get("events", ()):
                continue
            job_key = f"{HOOK_JOBS}{event_id}-{hook['name']}.json"
            job = {"kind": "webhook", "webhook": hook["name"], "id": event_id,
                   "entry": {k: entry.get(k) for k in ("time", "event", "actor", "details")},
                   "state": "pending", "attempts": 1 if claimed_until else 0,
                   "next_try": time.time(), "claimed_until": claimed_until}
            if put_once(self.store, job_key, job):
                made.append((job_key, job))
        return made

    def body(self, hook: dict, job: dict, page: dict | None, doc: dict | None) -> bytes:
        entry = job["entry"]
        text = hook_text(entry, page, doc)
        if hook.get("format") == "slack":
            return json.dumps({"text": slack_escaped(text)}).encode()
        shown = None if page is None else {
            "id": page.get("id"), "number": page.get("number"), "kind": page.get("kind"),
            "state": page.get("state"), "summary": page_summary(page)}
        return json.dumps({"id": job["id"], "event": entry["event"], "time": entry["time"],
                           "actor": entry["actor"], "team": team_name(doc) if doc else "",
                           "text": text, "details": entry["details"], "page": shown},
                          sort_keys=True).encode()

    def send(self, job: dict, page: dict | None, doc: dict | None) -> int:
        hook = next((h for h in webhooks(doc) if h.get("name") == job["webhook"]), None)
        if hook is None:
            raise DeliveryError(f"webhook {job['webhook']} was removed", permanent=True)
        body = self.body(hook, job, page, doc)
        signature = hmac.new(hook["secret"].encode(), body, hashlib.sha256).hexdigest()
        return self.post(hook["url"], body, {
            "Content-Type": "application/json", "X-Oncall-Event": job["entry"]["event"],
            "X-Oncall-Delivery": job["id"], "X-Oncall-Signature": f"sha256={signature}"})


# ==============================================================================================
# Worker: the durable delivery and escalation queue; Worker (the loop, claims: what
# schedules), Upkeep (rotation, heartbeats, housekeeping), Delivery (what delivers)
# ==============================================================================================


class OutboundCapped(Exception):
    """The hourly budget of outbound SMS and calls is spent."""


def spent_this_hour(counter: dict | None, now: float) -> list[float]:
    """The stamps in counters/outbound.json of the hour before `now`: the budget spent."""
    return [t for t in (counter or {}).get("sent", []) if t > now - 3600]


def escalation_targets(step: int, call_attempts: int, oncall_id: str,
                       escalate_to: list[str]) -> tuple[str, list[str]]:
    """Who escalation step `step` (0, 1, ...) reaches: `call_attempts` calls to the on-call
    engineer, then the team (SMS and a call each), then around again."""
    team = [m for m in escalate_to if m != oncall_id]
    cycle = call_attempts + (1 if team else 0)
    if cycle == 0 or step % cycle < call_attempts:
        return "oncall", [oncall_id]
    return "team", team


# The worker looks at the store once a poll_interval: pages/ is listed in full (one LIST per
# LIST_PAGE_KEYS keys) while it holds at most LIST_PAGE_KEYS pages, and one poll in
# ceil(pages / LIST_PAGE_KEYS) beyond, so a listing costs 60 LIST an hour however many pages
# are kept; the polls in between read the page counter conditionally instead (a 304 at rest),
# whose recent list names the pages opened since (Worker._read_new_pages). jobs/ is listed on
# every 12th poll (and at start); the config is checked with every poll (a conditional GET),
# so a change by the command line or by the other instance (a rotation, live_answer ...) is
# seen within poll_interval: 60 LIST + 5 LIST + 60 GET (+ 60 GET of the counter beyond
# LIST_PAGE_KEYS pages) an hour at rest (a GET costs a twelfth of a LIST on S3).
LIST_PAGE_KEYS = 1000
JOBS_LISTING_EVERY = 12
QUIET_AFTER = 2 * DAY     # a page unchanged for this long has nothing left to do: not read
HOUSEKEEPING_EVERY = DAY  # replay markers pruned, done pages moved out of pages/
RECORD_LINGER = 1.0       # seconds a finished delivery waits for the others of its batch
MAX_UNEXPECTED = 5        # attempts of a channel that fails with an unexpected exception
# The worker loop counts as stuck (and the systemd watchdog is no longer fed) when it has been
# busy this long without coming round or reaching the next page of a scan. Legitimately, that
# is a few store requests one after another, each bounded by its timeouts (about 30 s with
# the default http_timeout of 10 s) even while S3 does not answer; a restart in an outage
# would lose the audit entries waiting in memory, so the bound is generous.
WORKER_STUCK_AFTER = 180.0
# The channels sent on the threads for texts (the rest: e-mail, archive, on their own).
URGENT_CHANNELS = ("mms", "sms", "sms_fallback", "notice", "resolved", "transcript_sms",
                   "held")


class Batch:
    """The deliveries of one page claimed by one write. Their outcomes are recorded together
    (one audit entry per outcome, one page write) unless the others take longer than
    RECORD_LINGER after the first one finished, so a slow SMTP server does not hold back the
    record of a sent MMS."""

    def __init__(self, channels: list[str], doc: dict | None):
        self.doc = doc  # the config the claim was made with, for the first attempts
        self.running = set(channels)
        self.done: dict[str, tuple[str, dict]] = {}
        self.waiting = False
        self.cond = threading.Condition()

    def finish(self, channel: str, outcome: str | None, details: dict) -> str:
        """Note one outcome. Returns what the caller is to do: "record" the outcomes now (it
        finished last and nobody waits), "wait" for the others (it finished first: see
        `take`), or "" (somebody waiting records this one too)."""
        with self.cond:
            self.running.discard(channel)
            if outcome is not None:
                self.done[channel] = (outcome, details)
            self.cond.notify_all()
            if self.waiting:
                return ""
            if self.running:
                self.waiting = True
                return "wait"
            return "record"

    def take(self, wait: bool) -> dict[str, tuple[str, dict]]:
        """The outcomes to record, after waiting (up to RECORD_LINGER) for the others."""
        with self.cond:
            if wait:
                self.cond.wait_for(lambda: not self.running, timeout=RECORD_LINGER)
                self.waiting = False
            ready, self.done = self.done, {}
            return ready


# Seconds between two writes of the done index at most (DoneIndex): a busy hour costs six.
DONE_INDEX_EVERY = 600.0


class DoneIndex:
    """index/done-pages.json: the pages of pages/ known done with (nothing to send, neither
    ringing nor listed, their audit entries written), each with the ETag it had when it was
    read. A start reads this one object, and its first listing reads only the pages whose
    ETag the index does not name: the open ones and those changed since, not the thousands
    done with over the last two days (QUIET_AFTER) that a busy pager leaves in pages/.

    It is a cache, never the truth: an entry counts only while the listing shows that very
    ETag (a page written since has another one, and is read), so an index that is old, lost,
    half a day behind, or written by an instance that stopped costs reads, never a page. It is
    written with If-Match (If-None-Match when new) over the version last read or written, and
    a writer that loses reads the other's and merges (the entries whose ETag it knows too,
    and its own), so two instances agree after one round and then write nothing. Written by
    the worker after a listing when it changed, at most every DONE_INDEX_EVERY (and at once
    after the first listing): nothing at rest."""

    def __init__(self, store: Store, book: PageBook, audit: AuditLog):
        self.store = store
        self.book = book
        self.audit = audit
        self._known: tuple[dict, str] | None = None  # the index as last read or written
        self._next_write = 0.0  # time.monotonic()

    def read(self) -> dict[str, str]:
        """{page id: ETag} as stored ({} when there is none, or it cannot be read)."""
        try:
            blob = self.store.get(DONE_INDEX)
        except StoreUnavailable as e:
            log.warning("event=pages.done_index_unread error=%r", str(e)[:200])
            return {}
        if blob is None:
            return {}
        doc = json_object(blob.data)
        if doc is None:  # not JSON: written over (If-Match its ETag) at the next write
            log.error("event=store.bad_json key=%s", DONE_INDEX)
        self._known = (doc or {}, blob.etag)
        return self.entries(doc)

    @staticmethod
    def entries(doc: dict | None) -> dict[str, str]:
        pages = (doc or {}).get("pages")
        return {page_id: etag for page_id, etag in pages.items()
                if isinstance(etag, str) and PAGE_ID.fullmatch(str(page_id))
                } if isinstance(pages, dict) else {}

    def write_if_changed(self, now: bool = False) -> None:
        """Write the index when what this instance knows differs from it (not before
        DONE_INDEX_EVERY since the last write unless `now`)."""
        if not now and time.monotonic() < self._next_write:
            return
        mine = {page_id: etag for page_id, (etag, due) in self.book.done().items()
                if all(self.audit.written(key) for key in due)}

        def merge(doc: dict | None) -> dict | None:
            stored = self.entries(doc)
            pages = {page_id: etag for page_id, etag in stored.items()
                     if self.book.etag(page_id) == etag} | mine
            if pages == stored and (doc is not None or not pages):
                return None  # as stored (or nothing to say, and no index yet)
            return {"written": iso_time(time.time()), "pages": dict(sorted(pages.items()))}

        if self._known is None and not mine:
            return  # nothing to say (and no read to find that out, at rest)
        if self._known is not None and merge(self._known[0]) is None:
            return  # as stored (as far as this instance knows: a write would find out)
        self._next_write = time.monotonic() + DONE_INDEX_EVERY
        written = update_json(self.store, DONE_INDEX, merge, tries=3, known=self._known,
                              seen=self._seen)
        if written is not None:
            self._known = written
            log.info("event=pages.done_index_written pages=%d", len(written[0]["pages"]))

    def _seen(self, found: tuple[dict, str]) -> None:
        self._known = found


class Worker:
    """Carries out what the Pager queued in the store, so nothing slow runs inside a webhook.

    A page is its own queue entry: each delivery and the escalation carry their due time and
    their claim. What this instance queues it has claimed already and starts at once
    (`start_work`, `Messages.start`); the rest it finds by looking at the store every
    `poll_interval` seconds: a listing of pages/ (over LIST_PAGE_KEYS pages, one poll in
    ceil(pages / LIST_PAGE_KEYS) lists, the others read the page counter for the pages opened
    since), jobs/ (the single messages) on every twelfth poll, the config with every poll (a
    conditional read, so a change made elsewhere acts here within `poll_interval`, and the
    texts a command-line change queued are sent at once): the listing carries each page's
    ETag, so only pages that changed are read, and due work is planned from the PageBook's
    copies in between, with no request. A step is *claimed* with one
    conditional write over the copy (a claim expires after `claim_timeout`, covering an
    instance killed mid-step), so two instances sharing a bucket never both run it.
    Deliveries are at least once: a claim that expires is retried. Escalation steps are at
    most once: the claim itself advances the step, so a crash can skip one call but never
    doubles it, and the next step follows anyway. Each channel has its own attempts and
    capped exponential backoff, and runs in its own thread from a small pool, so a dead SMTP
    server does not delay the MMS. The scan also opens the page of a heartbeat that missed
    its ping (`_check_heartbeats`, planned from memory like the rest), and ends quiet hours
    at their `until` (`_plan_quiet_end`), after which the hushed pages ring.
    """

    def __init__(self, pager: Pager, telephony: Telephony):
        self.pager = pager
        self.cfg = pager.cfg
        self.store = pager.store
        self.telephony = telephony
        self.queue_depth = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Liveness, for the watchdog: when the loop last came round or made progress in a
        # scan (time.monotonic()), and whether it is waiting for work now.
        self.progress = time.monotonic()
        self._waiting = False
        self.stuck_after = max(WORKER_STUCK_AFTER, 12 * self.cfg.http_timeout)
        # Texts and calls have threads of their own, so a dead SMTP server holding the e-mail
        # and archive threads cannot hold back an MMS or an escalation call.
        self._urgent = ThreadPoolExecutor(self.cfg.worker_threads, thread_name_prefix="send")
        self._pool = ThreadPoolExecutor(self.cfg.worker_threads, thread_name_prefix="deliver")
        # Reads of a listing's changed pages, apart from both, so that thousands of them after
        # a start queue behind neither a delivery nor a webhook's writes (IO_POOL).
        self._readers = ThreadPoolExecutor(LISTING_READERS, thread_name_prefix="read")
        # POSTs to URLs outside (push, webhooks): threads of their own, two each, so a push
        # server or a webhook that hangs for its OUTSIDE_TIMEOUT holds back nothing else.
        self.push = Push()
        self.hooks = Webhooks(self.store)
        self._outside = {"push": ThreadPoolExecutor(2, thread_name_prefix="push"),
                         "hook": ThreadPoolExecutor(2, thread_name_prefix="hook")}
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._next_listing = 0.0  # time.monotonic() of the next listing of pages/
        self.done_index = DoneIndex(self.store, pager.book, pager.audit)
        self._indexed: dict[str, str] = {}  # the done index as read at start (first listing)
        self._listings = 0  # polls of the store so far
        self._listed_at_poll = 0  # the poll of the last full listing of pages/
        self._pages_kept = 0  # how many pages it found in pages/
        self._next_housekeeping = 0.0  # time.monotonic() of the next (replies/, done pages)
        self._next_quiet_end = 0.0  # time.time() before which ending quiet hours is not retried
        self.started = time.time()  # (again in start): heartbeats count their grace from it
        pager.start_work = self.start_work
        pager.wake = self.wake
        pager.audit.follow = self.follow
        # The rooms, each the owner of its own state changes
        self.upkeep = Upkeep(self)
        self.delivery = Delivery(self)
        self.messages = Messages(self)
        pager.start_message = self.messages.start

    def start(self) -> None:
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._urgent.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True, cancel_futures=True)
        for pool in self._outside.values():
            pool.shutdown(wait=False, cancel_futures=True)  # a hanging POST ends by itself

    def wake(self) -> None:
        self._wake.set()

    def busy_for(self) -> float:
        """Seconds the loop has been busy without coming round or making progress (0 while
        it waits for work: an idle worker is a healthy one, however long it sleeps)."""
        return 0.0 if self._waiting else time.monotonic() - self.progress

    def alive(self) -> bool:
        """The loop runs and is not stuck (see WORKER_STUCK_AFTER): the systemd watchdog is
        fed only while this holds."""
        return (self._thread is not None and self._thread.is_alive()
                and self.busy_for() < self.stuck_after)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.progress = time.monotonic()
            self._waiting = False
            next_due = time.time() + self.cfg.poll_interval
            try:
                next_due = min(next_due, self.scan())
            except StoreUnavailable as e:
                log.warning("event=worker.store_unavailable error=%r", str(e))
            except Exception:
                log.exception("event=worker.error")
            self.pager.audit.flush()
            self._waiting = True
            self._wake.wait(max(0.01, next_due - time.time()))
            self._wake.clear()

    # --- the scan: find what is due, claim it, start it --------------------------------------

    def scan(self) -> float:
        """Claim and start what is due; returns when to look again. Pages spooled locally
        while the store was unreachable are worked on from the spool (so they are delivered
        during the outage) and moved into the store once it is back; a copy in the store
        (the write landed, its answer was lost) waits until then."""
        now = time.time()
        if time.monotonic() >= self._next_listing:
            self._next_listing = time.monotonic() + self.cfg.poll_interval
            self._listings += 1
            try:
                if self._listings == 1:
                    self._read_recent_pages()
                if self._listings - self._listed_at_poll >= math.ceil(
                        max(1, self._pages_kept) / LIST_PAGE_KEYS):
                    self._list_pages()
                    self._listed_at_poll = self._listings
                else:
                    self._read_new_pages()
                if self._listings % JOBS_LISTING_EVERY == 1:
                    self.messages.list_jobs()
                # every listing reads the config (a 304 at rest): a change made elsewhere
                # acts within poll_interval, and while it is missing or invalid a fix is
                # seen as soon (pages wait for it)
                self.pager.team.read(background=True)
            except StoreUnavailable as e:
                log.warning("event=worker.listing_failed error=%r", str(e))
            except (NoConfig, ConfigError) as e:  # TeamConfig logs it, once a minute
                log.debug("event=worker.no_config error=%r", str(e))
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
            self._submit("prune", self.upkeep._prune_replies)
            self._submit("prune-live", self.upkeep._prune_hunts)
            self._submit("archive", self.upkeep._archive_pages)
        next_due = min(now + max(0.0, self._next_listing - time.monotonic()),
                       self._apart("rotation", lambda: self.upkeep._plan_rotation(now), now),
                       self._apart("quiet", lambda: self.upkeep._plan_quiet_end(now), now))
        depth = 0
        spool = self.pager.spool
        spooled: list[str] = []
        if spool is not None:
            spooled = spool.list("pages/")
            for key in spooled:
                found = read_json(spool, key)
                if found is not None and has_work(found[0]):
                    depth += 1
                    next_due = min(next_due, self._look_at(spool, *found, now))
            for key in spooled:
                if not self.upkeep._move_into_store(key[len("pages/"):].removesuffix(".json")):
                    break  # the store is still unreachable: try again next scan
        in_spool = {key[len("pages/"):].removesuffix(".json") for key in spooled}
        for page, etag in self.pager.book.working():
            if page["id"] in in_spool:  # worked on from the spool until it has moved
                continue
            depth += 1
            next_due = min(next_due, self._look_at(self.store, page, etag, now))
        next_due = min(next_due,
                       self._apart("heartbeats", lambda: self.upkeep._check_heartbeats(now),
                                             now))
        repeats = self.pager.alerts.repeats.due_at()  # counts of repeats answered from memory
        if repeats is not None and repeats <= now and not self._busy("repeats"):
            self._submit("repeats", lambda: self.pager.alerts.repeats.flush_due(now))
        elif repeats is not None:
            next_due = min(next_due, max(repeats, now + 0.05))
        waiting, due = self.messages.scan(now)
        self.queue_depth = depth + waiting
        next_due = min(next_due, due)
        return next_due

    def _apart(self, what: str, look: Callable[[], float], now: float) -> float:
        """One part of the scan whose failure must not stop the others (pages, messages):
        logged, and looked at again a poll_interval later."""
        try:
            return look()
        except Exception:
            log.exception("event=worker.%s_failed", what)
            return now + self.cfg.poll_interval

    def _look_at(self, store: Store, page: dict, etag: str, now: float) -> float:
        self.progress = time.monotonic()  # progress: a long scan in an outage is not stuck
        try:
            due = self._consider_page(store, page, etag, now)
        except (StoreUnavailable, StoreConflict, KeyError, TypeError, ValueError) as e:
            log.error("event=worker.page_skipped page=%s error=%r", page.get("id"), str(e)[:200])
            return now + self.cfg.poll_interval
        return now + self.cfg.poll_interval if due is None else due

    def _list_pages(self) -> None:
        """One listing of pages/: read the pages whose ETag is not the book's. A page seen for
        the first time (another instance's, or any page after a restart) gets its due audit
        entries written again, in case its writer stopped before writing them.

        After a start that would be every page changed within QUIET_AFTER, thousands after
        a busy day; the done index (DoneIndex, read at start) names those done with by their
        ETags, and a page listed with the ETag it names is not read. The rest (the open ones,
        those changed since the index was written, all of them when there is none) are read
        bounded and in parallel (LISTING_READERS at once), newest first (an open page is
        written at every escalation step; a done one is not written again), and a page with
        work is looked at as soon as it is read: an open page rings before the old ones are
        read. Each page read counts as progress for the watchdog. Then the index is written
        if what this instance knows changed it (in the background)."""
        listed_at = time.monotonic()
        now = time.time()
        seen = set()
        changed: list[tuple[float, str]] = []
        first_seen = set()
        for key, (etag, modified) in self.store.versions("pages/").items():
            page_id = key[len("pages/"):].removesuffix(".json")
            seen.add(page_id)
            known = self.pager.book.etag(page_id)
            if known == etag:
                continue
            if known is None and modified < now - QUIET_AFTER:
                self.pager.book.note_quiet(page_id, etag)
                continue
            if known is None and self._indexed.get(page_id) == etag:
                self.pager.book.note_done(page_id, etag)  # as the index says: not read
                continue
            changed.append((modified, key))
            if known is None:
                first_seen.add(key)
        self.progress = time.monotonic()
        changed.sort(reverse=True)
        spooled = self._spooled()
        for key, found in self._read_pages([key for _, key in changed]):
            self._take_in(key, found, key in first_seen, spooled)
        first = not self.pager.book.listed
        if first:  # how long a start took to know the store, for the log
            log.info("event=worker.first_listing pages=%d read=%d indexed=%d seconds=%.1f",
                     len(seen), len(changed), len(self._indexed), time.monotonic() - listed_at)
            self._indexed = {}
        self.pager.book.keep_only(seen, listed_at)
        self._pages_kept = len(seen)
        if not self._busy("done-index"):
            self._submit("done-index", lambda: self.done_index.write_if_changed(now=first))

    def _read_recent_pages(self) -> None:
        """At a start, before the first listing, which over a long history costs a LIST
        request per 1,000 pages and then thousands of reads: the pages of counters/pages.json's
        recent list (one read, then RECENT_PAGES at once), where an open page is, so that it
        rings within a few round trips of the start. The listing finds them known, unchanged,
        and does not read them again. The done index is read with the counter."""
        items, self._indexed = in_parallel(IO_POOL, self.pager.pages.recent_items,
                                           self.done_index.read)
        self._read_recent(items)

    def _read_new_pages(self) -> None:
        """A poll between two full listings of a large pages/ (see LIST_PAGE_KEYS): the page
        counter, read conditionally (a 304 while no page was opened), names the pages opened
        since, by any instance; those the book does not know are read, as a listing would.
        That is what failover needs: an instance that stopped after numbering its page (just
        before its first text) leaves it to the others within a poll. A page it stopped with
        before that, and what the other instance changed in pages known here, wait for the
        next full listing (or a conditional write here, which reads the page on a conflict);
        its own restart lists pages/ at once."""
        book = self.pager.book
        self._read_recent([item for item in self.pager.pages.recent_items()
                           if book.etag(str(item.get("id"))) is None
                           and not book.gone(str(item.get("id")))])

    def _read_recent(self, items: list[dict]) -> None:
        """The pages of these items of the counter's recent list, read and taken in; one no
        longer in pages/ is noted gone (not read again until a listing finds it)."""
        keys = [f"pages/{item['id']}.json" for item in items
                if PAGE_ID.fullmatch(str(item.get("id", "")))]
        spooled = self._spooled()
        for key, found in self._read_pages(keys):
            if found is not None:
                self._take_in(key, found, True, spooled)
            else:  # moved to pages-done/ (or never stored)
                self.pager.book.note_gone(key[len("pages/"):].removesuffix(".json"))

    def _spooled(self) -> set[str]:
        """The keys of the pages in the local spool: the spool works on those (see scan)."""
        return set(self.pager.spool.list("pages/")) if self.pager.spool else set()

    def _take_in(self, key: str, found: tuple[dict, str] | None, first_seen: bool,
                 spooled: set[str]) -> None:
        """A page just read into the book; seen for the first time, its due audit entries are
        written again (its writer may have stopped before); with work, it is looked at now."""
        self.progress = time.monotonic()
        if found is None or not PAGE_ID.fullmatch(str(found[0].get("id", ""))) or \
                not isinstance(found[0].get("opened"), (int, float)):
            log.error("event=worker.page_unreadable key=%s", log_value(key, 80))
            return
        self.pager.book.put(*found)
        if first_seen and found[0].get("audit_due"):
            self._submit(f"{found[0]['id']}/audit", lambda page=found[0]: self._write_due(page))
        if has_work(found[0]) and key not in spooled:
            # without a valid config the listing goes on; the scan meets the problem after it
            with contextlib.suppress(NoConfig, ConfigError):
                self._look_at(self.store, *found, time.time())

    def _read_pages(self, keys: list[str]) -> Iterator[tuple[str, tuple[dict, str] | None]]:
        """Each of `keys` read (read_json) on the reader threads, LISTING_READERS at once and
        as many more queued, so memory stays bounded however many there are: (key, what was
        read), in the order the reads finish. A failed read stops the rest and raises: the
        pages not read yet are read at the next listing."""
        todo = iter(keys)
        running: dict[Future, str] = {}
        try:
            while True:
                for key in todo:
                    running[self._readers.submit(read_json, self.store, key)] = key
                    if len(running) >= 2 * LISTING_READERS:
                        break
                if not running:
                    return
                finished, _ = wait_for_any(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield running.pop(future), future.result()
        finally:
            for future in running:
                future.cancel()

    def _tasks(self) -> list[str]:
        with self._lock:
            return list(self._inflight)

    def _submit(self, task: str, work: Callable[[], None], urgent: bool = False,
                outside: str = "") -> None:
        """Run `work` in the background as `task` (so a scan does not start it twice), on the
        threads for texts and calls when `urgent`, on those for push or webhooks (`outside`),
        else on those for e-mail, archive and bookkeeping."""
        with self._lock:
            self._inflight.add(task)

        def run() -> None:
            try:
                work()
            except Exception:
                log.exception("event=worker.task_error task=%s", task)
            finally:
                with self._lock:
                    self._inflight.discard(task)
                self.wake()

        try:
            (self._outside[outside] if outside else self._urgent if urgent
             else self._pool).submit(run)
        except RuntimeError:  # the pool is shutting down; the claim expires and is retried
            with self._lock:
                self._inflight.discard(task)

    def _busy(self, task: str) -> bool:
        with self._lock:
            return task in self._inflight

    # --- push and webhooks (the rooms Push and Webhooks; here their queue) ------------------

    def follow(self, key: str, entry: dict) -> None:
        """AuditLog.follow: the webhooks that follow `entry`'s event get a job each, claimed
        here and sent at once (see Webhooks). Raises StoreUnavailable: the entry waits."""
        known = self.pager.team.last_known()
        for job_key, job in self.hooks.queue(known.doc if known else None, key, entry,
                                             time.time() + self.cfg.claim_timeout):
            self.messages.start(job_key, job)

    # --- pages: claims, deliveries, escalation, closing --------------------------------------

    def start_work(self, store: Store, page: dict, etag: str, channels: list[str],
                   doc: dict | None = None) -> None:
        """Run the deliveries a write of this instance claimed, at once; the first
        notification first, then the page's audit entries still to write, then the rest.
        `doc` is the config the write was made with: first attempts use it, no read."""
        batch = Batch(channels, doc)
        for i, channel in enumerate(sorted(channels, key=lambda c: c.split(":")[0] not in (
                "mms", "sms"))):
            self._submit(f"{page['id']}/{channel}",
                         lambda c=channel: self.delivery._deliver(store, page, c, batch),
                         urgent=channel.split(":")[0] in URGENT_CHANNELS,
                         outside="push" if channel == "push" else "")
            if i == 0 and any(not self.pager.audit.written(d["key"])
                              for d in page.get("audit_due", [])):
                self._submit(f"{page['id']}/audit", lambda: self._write_due(page))

    def _write_due(self, page: dict) -> None:
        """The page's audit entries not known written; a step's entry waits while its calls
        run here (they write it with their results)."""
        escalating = self._busy(f"{page['id']}/escalate")
        for due in page.get("audit_due", []):
            if escalating and due["entry"]["event"] == "page.escalated":
                continue
            if not self.pager.audit.written(due["key"]):
                self.pager.audit.write(due["key"], due["entry"])

    def _consider_page(self, store: Store, page: dict, etag: str, now: float) -> float | None:
        """Claim what is due on one page (from its copy: no request unless something is due)
        and return when its next step is due."""
        page_id = page["id"]
        if page.get("state") == "waiting":  # for a valid config: opened in the store only
            if store is self.store and self.pager.team.last_known() is not None and \
                    not self._busy(f"{page_id}/open"):
                self._submit(f"{page_id}/open", lambda: self._open_waiting(page_id),
                             urgent=True)
            return None
        if page.get("state") == "open" and now - page.get("ringing_since",
                                                          page["opened"]) >= DAY:
            self.upkeep._close(store, page_id)
            return None
        channels: list[str] = []
        next_due: float | None = None
        for channel, delivery in page.get("deliveries", {}).items():
            if delivery["state"] != "pending" or self._busy(f"{page_id}/{channel}"):
                continue
            due = max(delivery["next_try"], delivery["claimed_until"])
            if due <= now:
                channels.append(channel)
            else:
                next_due = min(next_due or due, due)
        escalate = False
        known = self.pager.team.last_known()
        quiet = quiet_until(known.doc, now) if known is not None else None
        if hushed(page) and known is not None and quiet_window(known.doc) is None and \
                store is self.store and not self._busy(f"{page_id}/ring"):
            self._submit(f"{page_id}/ring", lambda: self.upkeep._ring_after_quiet(page_id),
                         urgent=True)
        # A spooled page waits for the store to escalate, except for its first call: during
        # an outage that call may be all that reaches an opted-out engineer.
        if page.get("state") == "open" and (store is self.store
                                            or page["escalation"]["step"] == 0):
            due = page["escalation"]["next_due"]
            if quiet is not None and page.get("kind") in ("alert", "heartbeat"):
                due = max(due, quiet)  # nothing rings for alerts during quiet hours
            if due <= now and not self._busy(f"{page_id}/escalate"):
                escalate = True
            else:
                next_due = min(next_due or due, due)
        checked = (self.pager.alerts.checked(page_id) if page.get("alert", {}).get("unchecked")
                   and store is self.store else True)
        if (channels or escalate) and checked is not True:
            # created at once, its checks not seen through (None: the webhook here is at them;
            # False: by an instance that stopped): they come first (Alerts.check_alert), then
            # the next scan claims what is due
            if checked is False and not self._busy(f"{page_id}/check"):
                self._submit(f"{page_id}/check", lambda: self.pager.alerts.check_alert(page_id),
                             urgent=True)
            return next_due
        if channels or escalate:
            self._claim(store, page_id, channels, escalate, now)
        return next_due

    def _open_waiting(self, page_id: str) -> None:
        try:
            self.pager.pages.open_waiting(page_id)
        except (StoreUnavailable, StoreConflict, NoConfig, ConfigError) as e:
            log.warning("event=page.still_waiting page=%s error=%r", page_id, str(e)[:200])

    def _claim(self, store: Store, page_id: str, channels: list[str], escalate: bool,
               now: float) -> None:
        """Claim the due deliveries and the due escalation step of a page with one conditional
        write, then run them. The escalation claim advances the step and its due time, so no
        instance can run it twice. A lost race means another instance claimed it: that is the
        point, nothing to do here."""
        doc = self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        settings = escalation_settings(doc)
        claimed: list[str] = []
        plan: list[Any] = []

        def claim(page: dict | None) -> dict | None:
            claimed.clear()
            plan.clear()
            if page is None:
                return None
            for channel in channels:
                delivery = page["deliveries"].get(channel)
                if delivery and delivery["state"] == "pending" and max(
                        delivery["next_try"], delivery["claimed_until"]) <= now:
                    delivery["claimed_until"] = now + self.cfg.claim_timeout
                    delivery["attempts"] += 1
                    claimed.append(channel)
            if escalate and page.get("state") == "open" and \
                    page["escalation"]["next_due"] <= now:
                step = page["escalation"]["step"]
                # the engineer the page was sent to (who got its MMS), even after a handoff
                # since: then the team, which includes the new on-call engineer
                sent_to = page.get("oncall", {}).get("id")
                if sent_to not in members(doc):
                    sent_to = oncall_member(doc)["id"]  # removed from the team since
                kind, targets = escalation_targets(
                    step, int(settings["call_attempts"]), sent_to,
                    escalation_settings(doc, sent_to)["escalate_to"])
                page["escalation"].update(step=step + 1, last_kind=kind,
                                          next_due=now + settings["ack_timeout"])
                page["paged"] = page["paged"] + [t for t in targets if t not in page["paged"]]
                key, entry = self.pager.audit.entry("page.escalated", "worker", {
                    "page": page_id, "number": page.get("number"), "step": step, "kind": kind,
                    "targets": targets})
                page.setdefault("audit_due", []).append({"key": key, "entry": entry})
                plan[:] = [step, kind, targets, key, entry]
            return page if claimed or plan else None

        try:
            written = self.pager.pages.write_page(store, page_id, claim, tries=2)
        except StoreConflict:
            return
        if written is None:
            return
        page, etag = written
        if claimed:
            self.start_work(store, page, etag, claimed, doc)
        if plan:
            self._submit(f"{page_id}/escalate", lambda: self.delivery._escalate(page, *plan),
                         urgent=True)


# --- Messages: single texts and webhook jobs, each a durable job ------------------------------


class Messages:
    """The worker's single messages: jobs/msg-* (texts not tied to a page: handoffs,
    reminders, notices, a page's acknowledgement told to the others) and jobs/hook-* (a
    webhook's POST), each a durable job with its own claim, attempts and backoff. The
    instance that queues one has claimed it and sends it at once (`start`); the others are
    found by the listing of jobs/ on every twelfth poll (`list_jobs`: an instance stopped
    before sending), or in the config's last change (`adopt`: queued by the command line,
    where no worker runs). `scan` claims and starts those that are due."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.cfg, self.store, self.pager = worker.cfg, worker.store, worker.pager
        self._lock = threading.Lock()
        self._messages: dict[str, tuple[dict, str | None, float]] = {}  # key: job, ETag, since
        self._adopted_from = ""  # the config version whose unclaimed texts were looked at

    def scan(self, now: float) -> tuple[int, float]:
        """Claim and start the messages that are due: (how many wait, when to look again)."""
        known = self.pager.team.last_known()
        if known is not None:  # read by the listing, or by a webhook (which woke the worker)
            self.adopt(known)
        with self._lock:
            messages = list(self._messages.items())
        depth, next_due = 0, math.inf
        for key, (job, etag, _) in messages:
            depth += job.get("state", "pending") == "pending"
            next_due = min(next_due, self._consider(key, job, etag, now))
        return depth, next_due

    def start(self, key: str, job: dict) -> None:
        """A message job this instance just queued (and claimed): send it now."""
        with self._lock:
            self._messages[key] = (job, None, time.monotonic())
        if job.get("claimed_until", 0) > time.time():
            self._send(key, job)

    def keep(self, key: str, job: dict) -> None:
        """A job's outcome (Delivery._keep_job): this instance does not send it again."""
        with self._lock:
            self._messages[key] = (job, None, time.monotonic())

    def _send(self, key: str, job: dict) -> None:
        self.worker._submit(key, lambda: self.worker.delivery._send_message(key, job),
                            urgent=True, outside="hook" if key.startswith(HOOK_JOBS) else "")

    def adopt(self, snap: Snapshot) -> None:
        """The texts of a config change written where no worker runs (a handoff that a
        command-line change made): queued unclaimed, so this worker looks at them now rather
        than at the next listing of jobs/ (up to 12 polls away). Once per config version;
        a job sent meanwhile is read, found sent and left alone."""
        if snap.etag == self._adopted_from:
            return
        self._adopted_from = snap.etag
        last = snap.doc["current_config"].get("last_change")
        if not isinstance(last, dict) or not isinstance(last.get("time"), (int, float)) \
                or time.time() - last["time"] >= DAY:
            return
        entry = last.get("entry")
        if isinstance(entry, dict) and any(entry.get("event") in h.get("events", ())
                                           for h in webhooks(snap.doc)):
            # an on-call change the command line made: its webhooks (queued once; a change
            # made here finds its jobs there already)
            self.worker._submit(f"adopt-hooks-{snap.etag}", lambda: self.worker.follow(
                check_key(str(last.get("key"))), entry), outside="hook")
        for message in last.get("messages") or []:
            key, job = message.get("key"), message.get("job")
            if not isinstance(key, str) or not key.startswith("jobs/msg-") or \
                    "/" in key[len("jobs/"):] or not isinstance(job, dict) or \
                    job.get("claimed_until", 0):
                continue  # (claimed by the instance that wrote it, which sends it)
            with self._lock:
                if key not in self._messages:  # the ETag unknown: read before it is claimed
                    self._messages[key] = (job, None, time.monotonic())

    def list_jobs(self) -> None:
        """Message jobs queued by instances that stopped before sending them. Jobs unchanged
        for a day are deleted (sent ones are kept that long, see TeamConfig.reconcile). A job
        of the first release's kind (jobs/<page id>.json) is not needed: a page is its own
        queue entry now."""
        listed_at = time.monotonic()
        versions = self.store.versions("jobs/")
        for key, (etag, modified) in versions.items():
            if not key.startswith(("jobs/msg-", HOOK_JOBS)) or (
                    modified < time.time() - DAY and not reminder_ahead(key)):
                self.store.delete(key)
                continue
            with self._lock:
                known = self._messages.get(key)
            if known is None or (known[1] is not None and known[1] != etag):
                found = read_json(self.store, key)
                if found is not None:
                    with self._lock:
                        self._messages[key] = (*found, time.monotonic())
        with self._lock:
            for key in [k for k, v in self._messages.items()
                        if k not in versions and v[2] < listed_at and not self.worker._busy(k)]:
                del self._messages[key]

    def _consider(self, key: str, job: dict, etag: str | None, now: float) -> float:
        later = now + self.cfg.poll_interval
        if job.get("state", "pending") != "pending" or self.worker._busy(key):
            return later
        wait_until = max(job.get("claimed_until", 0), job.get("next_try", 0))
        if wait_until > now:
            return wait_until
        job = {**job, "claimed_until": now + self.cfg.claim_timeout,
               "attempts": job.get("attempts", 0) + 1}
        try:
            if etag is None:
                raise StoreConflict(key)  # written here, ETag unknown: read it first
            etag = self.store.put(key, to_json(job), if_match=etag)
        except (StoreConflict, StoreUnavailable):
            found = read_json(self.store, key)  # changed elsewhere: look again at what it is
            with self._lock:
                self._messages[key] = ((*found, time.monotonic()) if found else
                                       ({**job, "state": "gone"}, None, time.monotonic()))
            return now
        with self._lock:
            self._messages[key] = (job, etag, time.monotonic())
        self._send(key, job)
        return later


# --- Upkeep: the rotation's timing, heartbeat checks, housekeeping ----------------------------


class Upkeep:
    """What the worker does besides pages' own work, each on its own timer: the rotation
    (hand off at a shift start, remind before it), heartbeats that missed their ping,
    housekeeping (replay markers, live/ records, quiet pages moved to pages-done/), and
    pages spooled on local disk while S3 was down, moved into the store."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.cfg, self.store, self.pager = worker.cfg, worker.store, worker.pager
        self._next_rotation = 0.0  # time.time() before which rotate is not tried again
        # each heartbeat missed here: (the ping it missed, when this instance last read it)
        self._heartbeat_misses: dict[str, tuple[float, float]] = {}

    def _plan_rotation(self, now: float) -> float:
        """Start the rotation's due work (a handoff, a reminder) when the config in memory
        says it is due; returns when to look again. A try that changed nothing (the store
        unreachable) is made again after retry_base seconds."""
        known = self.pager.team.last_known()
        due = self.pager.oncall.rotation_due(known.doc, now) if known is not None else None
        if due is None:
            return math.inf
        if due > now:
            return due
        if self.worker._busy("rotation"):
            return math.inf  # the task's end wakes the worker
        if now < self._next_rotation:
            return self._next_rotation
        self._next_rotation = now + self.cfg.retry_base
        self.worker._submit("rotation", self._rotate)
        return math.inf

    def _rotate(self) -> None:
        try:
            self.pager.oncall.rotate()
        except (StoreUnavailable, NoConfig, ConfigError) as e:
            log.warning("event=rotation.deferred error=%r", str(e))

    def _plan_quiet_end(self, now: float) -> float:
        """End the quiet hours once their `until` has passed, by the config in memory (it
        is checked with every listing): planned like a handoff, and only once this instance
        has listed pages/, so that it can count the alerts still open."""
        known = self.pager.team.last_known()
        window = quiet_window(known.doc) if known is not None else None
        if window is None:
            return math.inf
        until = utc_seconds(window.get("until")) or now
        if until > now:
            return until
        if not self.pager.book.listed or self.worker._busy("quiet"):
            return math.inf  # the listing, or the task's end, wakes the worker
        if now < self.worker._next_quiet_end:
            return self.worker._next_quiet_end
        self.worker._next_quiet_end = now + self.cfg.retry_base
        self.worker._submit("quiet", self._end_quiet, urgent=True)
        return math.inf

    def _end_quiet(self) -> None:
        try:
            self.pager.quiet_hours.end("worker", via="expired")
        except (StoreUnavailable, NoConfig, ConfigError) as e:
            log.warning("event=quiet.end_deferred error=%r", str(e))
        known = self.pager.team.last_known()
        if known is not None and quiet_window(known.doc) is None:
            for page, _ in self.pager.book.working():  # at once, not at the next scan
                if hushed(page) and not self.worker._busy(f"{page['id']}/ring"):
                    self.worker._submit(f"{page['id']}/ring",
                                 lambda page_id=page["id"]: self._ring_after_quiet(page_id),
                                 urgent=True)

    def _ring_after_quiet(self, page_id: str) -> None:
        """A hushed page rings, once no quiet hours are in the config (ring_after_quiet):
        one conditional write with its `page.ringing` entry; its calls follow from the
        escalation as for any page."""
        doc = self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        if quiet_window(doc) is not None:
            return

        def ring(page: dict | None) -> dict | None:
            if page is None or not hushed(page):
                return None
            ring_after_quiet(page, doc, time.time())
            key, entry = self.pager.audit.entry("page.ringing", "worker", {
                "page": page_id, "number": page.get("number"), "oncall": page["oncall"]["id"],
                "reason": "quiet hours ended"})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        try:
            written = self.pager.pages.write_page(self.store, page_id, ring)
        except (StoreUnavailable, StoreConflict) as e:
            log.warning("event=page.ring_deferred page=%s error=%r", page_id, str(e)[:200])
            return
        if written is not None:
            self.worker._write_due(written[0])
            self.worker.wake()

    def _check_heartbeats(self, now: float) -> float:
        """Open a page for each heartbeat that missed its ping; returns when the next one is
        due. Planned from memory (the config as last read, each heartbeat's state as last
        seen here, read once when first seen), so a heartbeat costs a request only when it
        looks due; then its state is read afresh first, since a ping may have reached another
        instance. A missed heartbeat is read again every interval + grace, to learn of a ping
        elsewhere. An open heartbeat page whose heartbeat pinged since is resolved here (the
        instance that took the ping stopped before it could).

        After a start every heartbeat gets one full interval + grace counted from the start
        before a miss is paged: while no pager ran, its pings had nowhere to go (a cron
        `curl` fails and is not retried), so a window that ran out then says nothing about
        the job. A heartbeat already missed before the stop is known by its page: the page
        of a miss is opened when the window runs out on a running pager (by any instance), it
        is in the store, and it goes on ringing and escalating by itself after the restart;
        the grace only holds back a page that does not exist yet, and when it ends the same
        page id makes the look a no-op for a miss paged before (one refused create)."""
        snap = self.pager.team.last_known()
        next_due = math.inf
        if snap is None:
            return next_due
        for name, settings in heartbeats(snap.doc).items():
            self.worker.progress = time.monotonic()  # each may cost a read: not stuck in an outage
            window = settings["interval"] + settings.get("grace", 0)
            try:
                basis = heartbeat_basis(self.pager.heartbeats.state(name, fresh=False)[0])
                missed = self._heartbeat_misses.get(name)
                due = max(missed[1] if missed and missed[0] == basis else basis,
                          self.worker.started) + window
                if due <= now:
                    state = self.pager.heartbeats.state(name)[0]
                    basis = heartbeat_basis(state)
                    due = max(basis, self.worker.started) + window
                    if due <= now:
                        if not missed or missed[0] != basis:  # its page opened already
                            self.pager.heartbeats.missed(name, state)
                        self._heartbeat_misses[name] = (basis, now)
                        due = now + window
            except (StoreUnavailable, StoreConflict) as e:
                log.warning("event=heartbeat.check_failed heartbeat=%s error=%r", name,
                            str(e)[:200])
                due = now + self.cfg.poll_interval
            except Exception:  # one broken heartbeat must not stop the others
                log.exception("event=heartbeat.check_failed heartbeat=%s", name)
                due = now + self.cfg.poll_interval
            next_due = min(next_due, due)
        for page, _ in self.pager.book.working():
            alert = page.get("alert", {})
            known = self.pager.heartbeats.known.get(alert.get("heartbeat", ""))
            if page.get("kind") == "heartbeat" and (page.get("state") == "open" or hushed(page)) \
                    and known and heartbeat_basis(known[0]) > alert["basis"]:
                with contextlib.suppress(StoreUnavailable, StoreConflict):
                    self.pager.pages.resolve(page["id"], "heartbeat", via="ping")
        return next_due

    def _prune_replies(self) -> None:
        """Replay markers older than REPLY_KEEP_DAYS (a day more, to be sure) go: one
        listing a day."""
        for key, (_, modified) in self.store.versions("replies/").items():
            if modified < time.time() - (REPLY_KEEP_DAYS + 1) * DAY:
                self.store.delete(key)

    def _prune_hunts(self) -> None:
        """Live-hunt markers (live/<number>.json) say something for LIVE_REPEAT_SECONDS only;
        older ones go, so the folder holds about the callers of the last day: one listing a
        day. (A marker rewritten between the listing and its delete is lost: that caller may
        hunt once more within the 10 minutes, once a day at worst.)"""
        try:
            for key, (_, modified) in self.store.versions("live/").items():
                if modified < time.time() - LIVE_REPEAT_SECONDS - 60:
                    self.store.delete(key)
        except StoreUnavailable as e:
            log.warning("event=live.prune_failed error=%r", str(e)[:200])

    def _archive_pages(self) -> None:
        """Pages unchanged for QUIET_AFTER that can no longer need work move to pages-done/
        (Pages.archive): one listing a day, and four to six requests a page, once. A page
        being sent here, or any page after a failed request, is left for the next day."""
        moved = 0
        known = self.pager.team.last_known()
        try:
            for key, (etag, modified) in self.store.versions("pages/").items():
                page_id = key[len("pages/"):].removesuffix(".json")
                if modified >= time.time() - QUIET_AFTER or not PAGE_ID.fullmatch(page_id) or \
                        any(task.startswith(page_id + "/") for task in self.worker._tasks()):
                    continue
                found = read_json(self.store, key)
                if found is not None and found[1] == etag and \
                        self.pager.pages.archive(*found, known.doc if known else None):
                    moved += 1
        except (StoreUnavailable, StoreConflict, KeyError, TypeError, ValueError) as e:
            log.warning("event=pages.archive_failed error=%r", str(e)[:200])
        if moved:
            log.info("event=pages.archived count=%d", moved)

    def _move_into_store(self, page_id: str) -> bool:
        """A spooled page goes into the store (with its page number) once the store answers
        and none of its channels is running here; from then on it is an ordinary page.
        Returns False while the store is unreachable."""
        spool = self.pager.spool
        if spool is None or any(task.startswith(page_id + "/") for task in self.worker._tasks()):
            return True
        found = read_json(spool, f"pages/{page_id}.json")
        if found is None:
            return True
        page = found[0]

        def merge(stored: dict | None) -> dict | None:
            """The page reached the store too (before the outage began, or through another
            instance): keep what the spool already delivered and the escalation steps it
            already called, so none is sent or called again."""
            if stored is None:
                return page
            for channel, delivery in page["deliveries"].items():
                if delivery["state"] != "pending" or channel not in stored["deliveries"]:
                    stored["deliveries"][channel] = delivery
            if stored.get("state") == "open" and \
                    page["escalation"]["step"] > stored["escalation"]["step"]:
                stored["escalation"] = page["escalation"]
                stored["paged"] = list(dict.fromkeys(stored["paged"] + page["paged"]))
            return stored

        try:
            page["number"] = self.pager.pages.page_number(page_id, page["opened"])
            self.pager.pages.write_page(self.store, page_id, merge, from_copy=False)
        except StoreConflict:
            return True
        except StoreUnavailable:
            return False
        spool.delete(f"pages/{page_id}.json")
        log.info("event=page.unspooled page=%s number=%s", page_id, page["number"])
        return True

    def _close(self, store: Store, page_id: str) -> None:
        """No acknowledgement within a day: stop escalating, abandon what is pending, and
        e-mail the team once (claimed by this write, sent at once)."""
        claimed_until = time.time() + self.cfg.claim_timeout

        def close(page: dict | None) -> dict | None:
            if not page or page.get("state") != "open":
                return None
            page.update(state="closed", closed_at=time.time())
            for delivery in page["deliveries"].values():
                if delivery["state"] == "pending":
                    delivery["state"] = "abandoned"
            add_delivery(page, "closing_email", claimed_until)
            key, entry = self.pager.audit.entry("page.closed", "worker", {
                "page": page_id, "number": page.get("number"),
                "reason": "not acknowledged within a day"})
            page.setdefault("audit_due", []).append({"key": key, "entry": entry})
            return page

        with contextlib.suppress(StoreConflict):
            written = self.pager.pages.write_page(store, page_id, close, tries=2)
            if written is not None:
                self.worker._write_due(written[0])
                self.worker.start_work(store, *written, ["closing_email"])


# --- Delivery: what the worker sends, and the outbound budget ---------------------------------


class Delivery:
    """What delivers: a page's channels (MMS, SMS, notices, e-mail, the archive, the
    escalation's calls), single message jobs, the page number and recording a delivery
    needs, and the hourly outbound budget every text and call is counted against. The
    Worker decides when (claims, the pool); this room sends and records the outcome."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.cfg, self.store, self.pager, self.telephony, self._lock = (
            worker.cfg, worker.store, worker.pager, worker.telephony, worker._lock)
        self._recordings: OrderedDict[str, bytes] = OrderedDict()
        self._numbers: OrderedDict[str, int] = OrderedDict()
        self._page_locks: dict[str, threading.Lock] = {}
        self._outbound: tuple[dict, str] | None = None  # counters/outbound.json as last seen

    def outbound_left(self, doc: dict | None) -> int | None:
        """The hourly budget left as this instance last saw counters/outbound.json, without
        a request (for /metrics); None until it has spent from it, or without a config."""
        known = self._outbound
        if known is None or doc is None:
            return None
        limit = escalation_settings(doc)["max_outbound_per_hour"]
        return max(0, limit - len(spent_this_hour(known[0], time.time())))

    def _send_message(self, key: str, job: dict) -> None:
        """Send one message job and write what happened to it: sent (kept a day), failed for
        good, or due again after a backoff. These writes need no If-Match: only the claim
        decides who sends."""
        if key.startswith(HOOK_JOBS):
            self._send_hook(key, job)
            return
        sms = {"to": job["to"], "attempt": job["attempts"]}
        details = {"purpose": job.get("purpose"), "deliveries": {"sms": sms}}
        try:
            doc = self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
            sms["sid"] = self._send_within_budget(doc, details, lambda: self.telephony.send_sms(
                job["to"], doc["current_config"]["from_phone"], job["body"],
                status_callback=self.cfg.url(
                    f"/public/mmsstatuscb?job={key.removeprefix('jobs/').removesuffix('.json')}")))
        except OutboundCapped:
            job = {**job, "state": "capped"}
        except (DeliveryError, StoreUnavailable) as e:
            sms["error"] = str(e)
            if isinstance(e, DeliveryError) and e.code:
                sms.update(code=e.code, reason=carrier_reason(e.code))
            self.pager.audit.record("page.delivery_failed", "worker", details)
            if isinstance(e, DeliveryError) and e.permanent:
                job = {**job, "state": "failed"}
            else:
                job = {**job, "claimed_until": 0, "next_try": time.time() + backoff(
                    job["attempts"], self.cfg.retry_base, self.cfg.retry_cap)}
        else:
            self.pager.audit.record("page.delivered", "worker", details)
            job = {**job, "state": "sent", "sid": sms["sid"]}
        self._keep_job(key, job, "message")

    def _keep_job(self, key: str, job: dict, channel: str) -> None:
        """A single job's outcome (a message or a webhook): counted, kept in memory (this
        instance does not send it again, even if the write below fails), and written."""
        METRICS.count("oncall_deliveries_total", channel=channel,
                      result="retry" if job["state"] == "pending" else job["state"])
        self.worker.messages.keep(key, job)
        try:
            self.store.put(key, to_json(job))
        except StoreUnavailable:
            log.error("event=message.unrecorded key=%s state=%s", key, job["state"])

    def _send_hook(self, key: str, job: dict) -> None:
        """One attempt of a webhook job, audited (page.delivered / page.delivery_failed, the
        channel `webhook:<name>`), then its state written: sent, failed for good (an answer a
        retry cannot change, or OUTSIDE_ATTEMPTS tries), or due again after a backoff."""
        entry = job["entry"]
        page_id = entry.get("details", {}).get("page")
        known = self.pager.book.get(page_id) if isinstance(page_id, str) else None
        attempt = {"attempt": job["attempts"], "event": entry["event"]}
        details = {"purpose": "webhook", "page": page_id,
                   "deliveries": {f"webhook:{job['webhook']}": attempt}}
        try:
            doc = self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
            attempt["status"] = self.worker.hooks.send(job, known[0] if known else None, doc)
        except (DeliveryError, StoreUnavailable, NoConfig, ConfigError) as e:
            final = (isinstance(e, DeliveryError) and e.permanent) or \
                job["attempts"] >= OUTSIDE_ATTEMPTS
            attempt.update(error=str(e)[:200], final=final)
            self.pager.audit.record("page.delivery_failed", "worker", details)
            job = {**job, "state": "failed"} if final else {
                **job, "claimed_until": 0, "next_try": time.time() + backoff(
                    job["attempts"], self.cfg.retry_base, self.cfg.retry_cap)}
        else:
            self.pager.audit.record("page.delivered", "worker", details)
            job = {**job, "state": "sent"}
        log.info("event=webhook.%s webhook=%s hook_event=%s attempt=%s",
                 job["state"] if job["state"] != "pending" else "retry", job["webhook"],
                 entry["event"], job["attempts"])
        self._keep_job(key, job, "webhook")

    def _deliver_push(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        """The page's first notification on the push topic of whom it was sent to (read from
        the config now: a topic changed since is the one used). A retry after the page was
        acknowledged or closed is not sent: it would ring for nothing."""
        member_id = page.get("oncall", {}).get("id")
        url = members(doc).get(member_id, {}).get("push")
        delivery = page["deliveries"][channel]
        if not url:
            raise DeliveryError(f"{member_id} has no push URL any more", permanent=True)
        if delivery["attempts"] > 1 and page.get("state") != "open":
            raise DeliveryError(f"page {page.get('state')} before the push went",
                                permanent=True)
        try:
            status = self.worker.push.send(url, page, self._number(store, page), doc)
        except DeliveryError as e:
            if delivery["attempts"] >= OUTSIDE_ATTEMPTS:
                raise DeliveryError(str(e), permanent=True) from None
            raise
        return {"to": member_id, "status": status}

    def _deliver(self, store: Store, page: dict, channel: str, batch: Batch) -> None:
        delivery = page["deliveries"][channel]
        details: dict[str, Any] = {"attempt": delivery["attempts"]}
        if time.time() > delivery["claimed_until"]:
            # waited in the pool past its claim: another instance may have taken it over
            log.warning("event=worker.claim_expired page=%s channel=%s", page["id"], channel)
            outcome: str | None = None
        else:
            try:
                # a retry reads the config afresh: the fault may be a setting being fixed
                doc = (batch.doc if batch.doc is not None and delivery["attempts"] <= 1
                       else self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE
                                                 if delivery["attempts"] <= 1 else 0.0).doc)
                details.update(DELIVER[channel.split(":")[0]](
                    self, store, message_of(page, channel), channel, doc))
                outcome = "sent"
            except OutboundCapped:
                outcome = "capped"
            except (DeliveryError, StoreUnavailable) as e:
                permanent = isinstance(e, DeliveryError) and e.permanent
                details.update(error=str(e), final=permanent)
                if isinstance(e, DeliveryError) and e.code:
                    details.update(code=e.code, reason=carrier_reason(e.code))
                outcome = "failed" if permanent else "retry"
            except Exception as e:  # a bug or a surprise: audited, retried a few times
                log.exception("event=worker.delivery_error page=%s channel=%s", page["id"],
                              channel)
                final = delivery["attempts"] >= MAX_UNEXPECTED
                details.update(error=f"unexpected {type(e).__name__}: {str(e)[:200]}",
                               final=final)
                outcome = "failed" if final else "retry"
        METRICS.count("oncall_deliveries_total", channel=channel.split(":")[0],
                      result=outcome or "expired")
        todo = batch.finish(channel, outcome, details)
        if todo == "wait":  # a text's thread does not wait for the e-mail: the slow pool does
            self.worker._submit(f"{page['id']}/record", lambda: self._record(
                store, page["id"], batch.take(wait=True)), urgent=False)
        elif todo == "record":
            self._record(store, page["id"], batch.take(wait=False))

    def _record(self, store: Store, page_id: str, outcomes: dict[str, tuple[str, dict]]
                ) -> None:
        """Audit a batch of outcomes (one entry per kind of outcome), then write them on the
        page with its number. The entry comes first: a stop between the two sends the channel
        again and audits that too, so the log never misses a delivery the page records. An
        outcome whose claim was taken over meanwhile (another attempt) is not recorded. A
        permanently failed MMS falls back to SMS."""
        number = self._numbers.get(page_id)
        for event, kinds in (("page.delivered", ("sent",)),
                             ("page.delivery_failed", ("failed", "retry"))):
            group = {c: d for c, (o, d) in outcomes.items() if o in kinds}
            if group:
                self.pager.audit.record(event, "worker", {"page": page_id, "number": number,
                                                          "deliveries": group})

        def record(page: dict | None) -> dict | None:
            if page is None:
                return None
            if number and not page.get("number"):
                page["number"] = number
            for channel, (outcome, details) in outcomes.items():
                delivery = page["deliveries"].get(channel)
                if delivery is None or delivery["attempts"] != details["attempt"] or \
                        delivery["state"] == "failed":  # Twilio reported it failed already
                    continue
                delivery["claimed_until"] = 0
                delivery["last_error"] = details.get("error", "")
                if details.get("code"):
                    delivery.update(code=details["code"], reason=details["reason"])
                if outcome == "retry" and page["state"] == "closed" and \
                        channel != "closing_email":
                    delivery["state"] = "abandoned"
                elif outcome == "retry":
                    delivery["next_try"] = time.time() + backoff(
                        delivery["attempts"], self.cfg.retry_base, self.cfg.retry_cap)
                else:
                    delivery["state"] = outcome
                kind = channel.split(":")[0]
                if kind == "mms" and outcome == "failed" and \
                        details.get("code") not in NO_TEXT_CODES:
                    add_delivery(page, channel.replace("mms", "sms_fallback", 1))
                elif kind in ("mms", "sms", "sms_fallback") and outcome == "failed":
                    hurry_first_call(page)  # no text reaches the person being paged
            return page

        try:
            self.pager.pages.write_page(store, page_id, record)
        except (StoreUnavailable, StoreConflict):
            log.error("event=worker.finish_unrecorded page=%s channels=%s", page_id,
                      ",".join(outcomes))

    def _number(self, store: Store, page: dict) -> int | str:
        """The page's number, allocated once per page (the e-mail and the archive both need
        it); a page spooled during an outage gets its number when it moves into the store."""
        if page.get("number"):
            return page["number"]
        if store is not self.store:
            return "?"
        page_id = joined_page_id(page)
        with self._lock:
            lock = self._page_locks.setdefault(page_id, threading.Lock())
        with lock:
            with self._lock:
                number = self._numbers.get(page_id)
            if number is None:
                number = self.pager.pages.page_number(page_id, page["opened"])
                with self._lock:
                    self._numbers[page_id] = number
                    while len(self._numbers) > 100:
                        old, _ = self._numbers.popitem(last=False)
                        self._page_locks.pop(old, None)
        return number

    def _spend_outbound(self, doc: dict, details: dict, capped: bool = True) -> float | None:
        """Take one from the hourly budget of outbound SMS and calls (counters/outbound.json,
        shared by all instances), or raise OutboundCapped after auditing why. Returns the
        stamp spent (None when the store could not count), for `_refund_outbound`. The
        counter as last seen here is the starting copy; a verdict of "spent" is checked
        against the store before it is believed. Not `capped`: counted even when spent."""
        limit = escalation_settings(doc)["max_outbound_per_hour"]
        verdict: list[bool] = []
        stamp = time.time()

        def spend(counter: dict | None) -> dict | None:
            sent = spent_this_hour(counter, stamp)
            verdict[:] = [len(sent) < limit or not capped]
            return {"sent": sent + [stamp]} if verdict[0] else None

        try:
            for known in (self._outbound, None):
                written = update_json(self.store, "counters/outbound.json", spend, known=known)
                if written is not None:
                    self._outbound = written
                if verdict[0] or known is None:
                    break
        except (StoreUnavailable, StoreConflict):
            # The budget is a cost control, not a safety one: a page must get through.
            log.warning("event=outbound.uncounted reason=store_unavailable")
            return None
        if not verdict[0]:
            self.pager.audit.record("outbound.capped", "worker", {
                **details, "limit_per_hour": limit,
                "reason": "hourly budget of outbound SMS and calls spent; only e-mail runs"})
            raise OutboundCapped()
        return stamp

    def _refund_outbound(self, stamp: float | None) -> None:
        """An attempt Twilio refused does not use up the budget (an outage would otherwise
        spend it on retries and cap the next page)."""
        if stamp is None:
            return
        with contextlib.suppress(StoreUnavailable, StoreConflict):
            written = update_json(self.store, "counters/outbound.json", lambda counter: {
                "sent": [t for t in (counter or {}).get("sent", []) if t != stamp]},
                known=self._outbound)
            self._outbound = written

    def _outbound_call(self, doc: dict, details: dict, send: Callable[[], str],
                       capped: bool = True) -> str:
        """One escalation SMS or call (within the budget unless `capped` is False); returns
        its sid or what happened."""
        try:
            stamp = self._spend_outbound(doc, details) if capped else None
        except OutboundCapped:
            return "capped"
        try:
            return send()
        except DeliveryError as e:
            self._refund_outbound(stamp)
            return f"failed: {e}"

    def spend_live_leg(self, doc: dict, details: dict, capped: bool) -> bool:
        """One leg of a live hunt: Twilio dials it from our <Dial>, so no REST request of
        ours passes the budget; every leg counts all the same. A leg of a caller's first hunt
        (not `capped`) is counted off the caller's path and always rings; a capped one is
        counted first, and False means the budget is spent (audited `outbound.capped`)."""
        if not capped:
            IO_POOL.submit(self._spend_outbound, doc, details, False)
            return True
        try:
            self._spend_outbound(doc, details)
        except OutboundCapped:
            return False
        return True

    def _send_within_budget(self, doc: dict, details: dict, send: Callable[[], str]) -> str:
        """An SMS that is not a page's first notification: spend from the budget
        (OutboundCapped when spent), refund it when Twilio refuses, and let the DeliveryError
        through for the retry."""
        stamp = self._spend_outbound(doc, details)
        try:
            return send()
        except DeliveryError:
            self._refund_outbound(stamp)
            raise

    def _send_counted_after(self, doc: dict, details: dict, send: Callable[[], str]) -> str:
        """A repeat's MMS, within the budget but not behind it: while the budget as last
        seen here (or none seen yet) has room, it is sent at once and counted after, off the
        caller's path (so one conditional create is all that comes before it); once the copy
        says spent, it is counted first (_send_within_budget). The budget is a cost control:
        instances that count at once may pass it by a text each, and a stop between the send
        and the count leaves one uncounted, never a page unsent."""
        known = self._outbound
        limit = escalation_settings(doc)["max_outbound_per_hour"]
        if known is not None and len(spent_this_hour(known[0], time.time())) >= limit:
            return self._send_within_budget(doc, details, send)
        sid = send()
        IO_POOL.submit(self._spend_outbound, doc, details, False)
        return sid

    def _recording(self, page: dict) -> bytes:
        """The recording's bytes, fetched from Twilio once and shared by e-mail and archive."""
        page_id = page.get("recording_sid", page["id"])
        with self._lock:
            fetch_lock = self._page_locks.setdefault(page_id + "/recording", threading.Lock())
        with fetch_lock:
            with self._lock:
                if page_id in self._recordings:
                    return self._recordings[page_id]
            data = fetch_recording(self.cfg, page["recording_url"])
            with self._lock:
                self._recordings[page_id] = data
                while len(self._recordings) > 8:
                    old, _ = self._recordings.popitem(last=False)
                    self._page_locks.pop(old + "/recording", None)
            return data

    # The channels. The first notification of a page (its MMS or SMS, and the SMS that
    # replaces an undelivered MMS) is never held back by the hourly budget: junk calls must
    # not be able to silence a real page. Notices and escalation are within the budget.

    def _deliver_mms(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        if channel != "mms" or page.get("joins"):  # a later voicemail: a repeat, budgeted
            sid = self._send_counted_after(doc, {"page": page_id_of(page), "channel": channel},
                                           lambda: self._send_mms(page, channel, doc))
        else:
            sid = self._send_mms(page, channel, doc)
        return {"to": page["oncall"]["phone"], "sid": sid}

    def _send_mms(self, page: dict, channel: str, doc: dict) -> str:
        return self.telephony.send_sms(
            page["oncall"]["phone"], doc["current_config"]["from_phone"],
            f"On-call voicemail ({page['duration']} sec) from {caller_text(page)}. "
            "Reply ACK to acknowledge.",
            media_url=page["recording_url"] + ".mp3",
            status_callback=self._status_url(page, channel))

    def _deliver_sms(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        if page["kind"] in ("alert", "heartbeat"):
            number = self._number(store, page)
            body = (f"Page {number}{':' if page['kind'] == 'heartbeat' else ''} "
                    f"{alert_text(page)}. Reply ACK {number} to acknowledge.")
        elif page["kind"] == "voicemail":
            body = (f"On-call voicemail ({page['duration']} sec) from {caller_text(page)}: "
                    f"{page['recording_url']}.mp3 Reply ACK to acknowledge.")
        else:
            body = (f"Missed call to the pager from {caller_text(page)}: no message was left. "
                    "Reply ACK to acknowledge.")
        sid = self.telephony.send_sms(page["oncall"]["phone"],
                                      doc["current_config"]["from_phone"], body,
                                      status_callback=self._status_url(page, channel))
        return {"to": page["oncall"]["phone"], "sid": sid}

    def _status_url(self, page: dict, channel: str) -> str:
        """Where Twilio reports what became of a text of a page (see WebApp.public_textstatus)."""
        return self.cfg.url(f"/public/mmsstatuscb?page={page_id_of(page)}&channel={channel}")

    def _deliver_notice(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        delivery = page["deliveries"][channel]
        sid = self._send_within_budget(doc, {"page": page["id"], "channel": channel},
                                       lambda: self.telephony.send_sms(
                                           delivery["to"], doc["current_config"]["from_phone"],
                                           delivery["body"],
                                           status_callback=self._status_url(page, channel)))
        return {"to": delivery["to"], "sid": sid}

    def _deliver_held(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        """The one text of an hour in which an integration's alerts are held (Alerts._hold):
        not capped by the outbound budget, as a page's first text is not (it stands for the
        texts that were held). N is as many as this instance knows held by now."""
        delivery, alert = page["deliveries"][channel], page["alert"]
        held = max(int(alert.get("held", 1)),
                   self.pager.alerts.held_this_hour(alert["integration"]))
        sid = self.telephony.send_sms(delivery["to"], doc["current_config"]["from_phone"],
                                      held_text(held, alert["integration"]))
        return {"to": delivery["to"], "sid": sid}

    def _deliver_email(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        mail = doc["current_config"]["mail_settings"]
        if page["kind"] in ("alert", "heartbeat"):
            self._send_email(build_email(mail, alert_text(page)[:200], self._alert_body(
                store, page, doc), None, mail_id("page", page["id"])), doc)
            return {"to": mail["to_email"]}
        if page["kind"] == "call":
            taken = members(doc).get(page.get("acked_by"), {}).get("name", page.get("acked_by"))
            subject = f"Live call from {caller_text(page)}, taken by {taken}"
            attachment = ((f"{page['id']}.mp3", self._recording(page))
                          if page.get("recording_url") else None)
        elif page["kind"] == "voicemail":
            subject = f"On-call voicemail ({page['duration']} sec) from {caller_text(page)}"
            attachment = (f"{page['id']}.mp3", self._recording(page))
        else:
            subject = f"Missed call to the pager from {caller_text(page)}"
            attachment = None
        body = (f"Page {self._number(store, page)}: {page_summary(page)}.\n"
                f"Opened {short_time(page['opened'])}; on call: {page['oncall']['name']}.\n"
                f"Call SID: {page['call_sid']}\n")
        message = build_email(mail, subject, body, attachment, mail_id("page", page["id"]))
        self._send_email(message, doc)
        return {"to": mail["to_email"]}

    def _alert_body(self, store: Store, page: dict, doc: dict) -> str:
        """An alert's e-mail: what it is, whether it rings, and what the monitor sent along."""
        alert = page["alert"]
        rings = (f"on call: {page['oncall']['name']}" if page["state"] != "listed" else
                 "quiet hours: listed, nobody is called until they end" if hushed(page) else
                 f"listed only, nobody is called ({alert['severity']})")
        if alert.get("held"):
            rings = (f"held, nobody is called: alert {alert['held']} from "
                     f"{alert['integration']} held this hour, beyond its "
                     f"{escalation_settings(doc)['alert_pages_per_hour']} ringing pages an hour")
        lines = [f"Page {self._number(store, page)}: {alert_text(page)}.",
                 f"Opened {short_time(page['opened'])}; {rings}.", ""]
        for name in ("source", "component", "group", "class", "timestamp", "client",
                     "client_url", "integration", "dedup_key"):
            if alert.get(name):
                lines.append(f"{name}: {alert[name]}")
        lines += [f"link: {link.get('text', '')} {link['href']}".replace("  ", " ")
                  for link in alert.get("links", [])]
        lines += [f"image: {image['src']}" for image in alert.get("images", [])]
        details = alert.get("custom_details")
        if isinstance(details, str) and details.endswith(DETAILS_CUT):  # see kept_details
            lines += ["", "custom_details (compact JSON, the first 8 KiB):", details]
        elif details is not None:
            lines += ["", "custom_details:", json.dumps(details, indent=2)]
        return "\n".join(lines) + "\n"

    def _deliver_transcript_email(self, store: Store, page: dict, channel: str,
                                  doc: dict) -> dict:
        """The transcript, in the thread of the voicemail's e-mail."""
        mail = doc["current_config"]["mail_settings"]
        subject = f"Re: On-call voicemail ({page['duration']} sec) from {caller_text(page)}"
        body = (f"Transcript of page {self._number(store, page)} ({page_summary(page)}):\n\n"
                f"{page['transcript']}\n")
        message = build_email(mail, subject, body, None, mail_id("transcript", page["id"]),
                              reply_to=mail_id("page", page["id"]))
        self._send_email(message, doc)
        return {"to": mail["to_email"]}

    def _deliver_transcript_archive(self, store: Store, page: dict, channel: str,
                                    doc: dict) -> dict:
        """The transcript into the archive's .json; retried until the archive is there."""
        key = recording_key(page, ".json")
        found = read_json(self.store, key)
        if found is None:
            raise DeliveryError("the recording is not archived yet")
        self.store.put(key, to_json({**found[0], "transcript": page["transcript"]}))
        return {"key": key}

    def _deliver_closing_email(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        mail = doc["current_config"]["mail_settings"]
        number = self._number(store, page)
        message = build_email(
            mail, f"Page {number} closed unacknowledged",
            f"Page {number} ({page_summary(page)}) was opened "
            f"{short_time(page['opened'])} and nobody acknowledged it within a day. "
            "The pager has stopped calling.\n", None)
        self._send_email(message, doc)
        return {"to": mail["to_email"]}

    def _send_email(self, message: email.message.EmailMessage, doc: dict) -> None:
        if self.cfg.dry_run:
            self.store.put(f"outbox/{sortable_stamp(time.time())}-email-"
                           f"{uuid.uuid4().hex[:12]}.eml", bytes(message))
            return
        send_email(doc["current_config"]["mail_settings"], message, self.cfg.smtp_timeout)

    def _deliver_archive(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        """The mp3 and its metadata, written at once (independent writes)."""
        data = self._recording(page)
        metadata = to_json({
            "page": joined_page_id(page), "number": self._number(store, page),
            "recording_sid": page.get("recording_sid", page["id"]),
            "recording_url": page["recording_url"],
            "duration": page["duration"], "caller": page["caller"],
            "call_sid": page["call_sid"], "time": iso_time(page["opened"]), "bytes": len(data),
            **({"transcript": page["transcript"]} if page.get("transcript") else {})})
        in_parallel(IO_POOL, lambda: self.store.put(recording_key(page, ".mp3"), data),
                    lambda: self.store.put(recording_key(page, ".json"), metadata))
        return {"key": recording_key(page, ".mp3"), "bytes": len(data)}

    def _deliver_join(self, store: Store, page: dict, channel: str, doc: dict) -> dict:
        """A repeat's record (see Pages._join_open_page) listed on the page it joined."""
        if store is not self.store:
            raise DeliveryError("the page is in the store, not the spool")
        self.pager.pages.fold_repeat(page)
        return {"joins": page["joins"]}

    def _escalate(self, page: dict, step: int, kind: str, targets: list[str],
                  audit_key: str, entry: dict) -> None:
        """Text (team steps) and phone each target. The SMS and the call are separate: a
        number that refuses SMS (STOP) still gets the call. Before each target the page is
        read again (a 304 while unchanged), so nobody is called after somebody acknowledged.
        The first call to the on-call engineer is never held back by the budget. The step's
        audit entry, planned in the claim, is written with the results (or, after a stop, as
        planned by whoever finds the page next)."""
        METRICS.count("oncall_escalation_steps_total", kind=kind)
        doc = self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        current_config = doc["current_config"]
        try:
            page = {**page, "number": self._number(self.store, page)}
        except (StoreUnavailable, StoreConflict):  # the call matters more than its number
            page = {**page, "number": page.get("number") or "?"}
        results: dict[str, Any] = {}
        for member_id in targets:
            member = members(doc).get(member_id)
            try:
                current = self.pager.pages.read_page(page["id"])
            except StoreUnavailable:
                current = None  # call anyway: a page call says so if it was acknowledged
            if member is None or (current and current[0].get("state") != "open"):
                continue
            details = {"page": page["id"], "number": page["number"], "step": step,
                       "kind": kind, "member": member_id}
            phone = member["phone"]

            def text(phone: str = phone, member_id: str = member_id) -> str:
                return self.telephony.send_sms(
                    phone, current_config["from_phone"],
                    f"Escalated page {page['number']}: {page_summary(page)}, not "
                    f"acknowledged yet. Reply ACK {page['number']} to acknowledge.",
                    status_callback=self._status_url(page, f"escalation:{member_id}"))

            def call(phone: str = phone) -> str:
                return self.telephony.place_call(
                    phone, current_config["pager_phone"],
                    self.cfg.url(f"/oncall/answer?page={page['id']}"),
                    self.cfg.url(f"/oncall/callstatus?page={page['id']}&step={step}"))

            if kind == "team":  # an opted-out member is called, not texted
                results[member_id] = {
                    "sms": "opted out" if member.get("opted_out") else self._outbound_call(
                        doc, {**details, "channel": "sms"}, text),
                    "call": self._outbound_call(doc, {**details, "channel": "call"}, call)}
            else:
                results[member_id] = self._outbound_call(
                    doc, {**details, "channel": "call"}, call, capped=step > 0)
        entry = {**entry, "details": {**entry["details"], "results": results}}
        self.pager.audit.write(audit_key, entry)


DELIVER: dict[str, Callable[[Delivery, Store, dict, str, dict], dict]] = {
    "mms": Delivery._deliver_mms,
    "sms": Delivery._deliver_sms,
    "sms_fallback": Delivery._deliver_sms,
    "notice": Delivery._deliver_notice,
    "resolved": Delivery._deliver_notice,
    "transcript_sms": Delivery._deliver_notice,
    "held": Delivery._deliver_held,
    "transcript_email": Delivery._deliver_transcript_email,
    "transcript_archive": Delivery._deliver_transcript_archive,
    "email": Delivery._deliver_email,
    "archive": Delivery._deliver_archive,
    "closing_email": Delivery._deliver_closing_email,
    "join": Delivery._deliver_join,
    "push": Delivery._deliver_push,
}


# ==============================================================================================
# Views: the status page and its command-line twin (read-only; the calendar feed is pure,
# calendar_feed, above)
# ==============================================================================================


def health_words(pager: Pager, worker: Worker | None, max_age: float = 0.0
                 ) -> tuple[bool, dict]:
    """The pager's status words (GET /healthz, the status page): whether it is healthy, and
    words only: the reason, which can quote the config, goes to the log and to `check`.
    /healthz asks the store (max_age 0); the status page, which has just read the config,
    does not ask twice."""
    try:
        # a copy from memory because the store's config is invalid is `invalid` (it
        # must not depend on whether this instance had read a good one before)
        config = ("loaded" if not pager.team.read(max_age).stale else
                  "stale" if not pager.team.reachable else "invalid")
    except NoConfig:
        config = "missing"
    except ConfigError:
        config = "invalid"
    except StoreUnavailable:
        config = "unavailable"
    healthy = pager.team.reachable and config == "loaded"
    known = pager.team.last_known()
    quiet = known is not None and quiet_until(known.doc, time.time()) is not None
    # `config-invalid`: the pager runs but pages nobody (calls are answered and their
    # pages wait for a valid config): what the operator must fix first
    return healthy, {"status": "ok" if healthy else "config-invalid" if config == "invalid"
                     else "unhealthy",
                     "store": "reachable" if pager.team.reachable else "unreachable",
                     "config": config, "queue_depth": worker.queue_depth if worker else 0,
                     "quiet": "on" if quiet else "off",  # quiet hours: alerts listed, not rung
                     "version": VERSION}


def quiet_in_force(doc: dict, now: float) -> tuple[float, str] | None:
    """The quiet hours running at `now`: until when, and why; or None."""
    until = quiet_until(doc, now)
    return None if until is None else (until, str((quiet_window(doc) or {}).get("reason") or ""))


class StatusBoard:
    """What the status page (`GET /status/TOKEN`) and `oncall-pager status` show: who is on
    call and until when, the next handoffs, the open pages, the last pages, the health words.

    The cost is bounded whatever the number of pages: the open pages come from the page book
    (the worker's copies of every page in pages/ that rings, waits or is listed), the last
    ones from the counter's recent list (one conditional read), each page from the book's
    copy where it has one. Where no worker has listed pages/ (the command line, a pager just
    started) one listing of pages/ stands in for the book: the pages changed in the last two
    days (an open page changes at least daily), the newest OPEN_READ of them read."""

    COLUMNS = {"number": "#", "kind": "kind", "summary": "what", "age": "age",
               "paged": "paged", "ack": "acknowledged"}
    OPEN_SHOWN = 50  # open pages listed one a line; more are counted
    OPEN_READ = 200  # pages read at most to find the open ones (a storm: the newest)
    LAST = 20

    def __init__(self, pager: Pager, worker: Worker | None = None):
        self.pager = pager
        self.worker = worker

    def gather(self, doc: dict, now: float) -> dict:
        users = members(doc)
        oncall = oncall_member(doc)
        current = next((s for s in oncall_shifts(doc, now, now, limit=2)
                        if s.start <= now < s.end), None)
        # a TAKE holds until the stretch running ends, as the rotation's shift does; with no
        # rotation and no override, on-call changes only by TAKE: no end
        until = current.end if current and current.end != math.inf else None
        covering = (users.get(current.covering, {}).get("name", current.covering)
                    if current and current.covering and current.member == oncall["id"] else "")
        open_pages, more, last = self.pages(now)
        healthy, health = health_words(self.pager, self.worker, PAGE_CONFIG_MAX_AGE)
        return {"team": team_name(doc) or "on-call", "now": now, "zone": team_zone(doc),
                "oncall": oncall, "until": until, "covering": covering,
                "quiet": quiet_in_force(doc, now),
                "handoffs": [(s, users[s.member]) for s in next_handoffs(doc, now, 5)],
                "open": open_pages, "open_more": more, "last": last, "doc": doc,
                "healthy": healthy, "health": health}

    def pages(self, now: float) -> tuple[list[dict], int, list[dict]]:
        """(open pages newest first, up to OPEN_SHOWN; how many more; the last LAST pages)."""
        book = self.pager.book
        opened = {page_id: when for page_id, (_, when) in book.active().items()}
        if not book.listed:  # the one listing
            since = now - QUIET_AFTER
            opened.update((key.removeprefix("pages/").removesuffix(".json"), modified)
                          for key, (_, modified) in self.pager.store.versions("pages/").items()
                          if modified >= since)
        candidates = sorted(opened, key=lambda page_id: opened[page_id],
                            reverse=True)[:self.OPEN_READ]
        recent = [item["id"] for item in self.pager.pages.recent_items()[:self.LAST]]
        wanted = list(dict.fromkeys(candidates + recent))

        def read(page_id: str) -> Callable[[], tuple[dict, str] | None]:
            return lambda: self.pager.book.get(page_id) or self.pager.pages.find_page(page_id)

        found = in_parallel(IO_POOL, *map(read, wanted)) if wanted else []
        pages = {page_id: page[0] for page_id, page in zip(wanted, found, strict=True)
                 if page is not None}
        open_pages = sorted((p for p in pages.values() if p.get("state") in SHOWN_FIRST or (
            p.get("state") == "acknowledged" and p.get("kind") in ("alert", "heartbeat"))),
            key=lambda page: float(page.get("opened") or 0), reverse=True)
        return (open_pages[:self.OPEN_SHOWN], max(0, len(open_pages) - self.OPEN_SHOWN),
                [pages[p] for p in recent if p in pages])

    def row(self, page: dict, board: dict) -> dict[str, str]:
        """One page as the page and the terminal show it (text from outside, not escaped)."""
        users = members(board["doc"])
        paged = [users.get(m, {}).get("name", str(m)) for m in page.get("paged") or []]
        state = page_state(page, board["doc"])
        return {"number": str(self.pager.pages.number_of(page)), "kind": str(page.get("kind")),
                "summary": page_summary(page),
                "age": elapsed(max(0.0, board["now"] - float(page.get("opened") or 0))),
                "paged": ", ".join(paged) or "nobody (listed)",
                "ack": state if state.startswith("acknowledged") else f"not acknowledged "
                f"({state})" if state in ("open", "waiting") else state}

    def local(self, ts: float, board: dict) -> str:
        return dt.datetime.fromtimestamp(ts, board["zone"]).strftime("%a %Y-%m-%d %H:%M %Z")

    def headline(self, board: dict) -> list[str]:
        """Who is on call, until when, covering whom; the quiet window."""
        line = f"On call: {board['oncall']['name']}"
        if board["until"] is not None:
            line += f" until {self.local(board['until'], board)}"
        else:
            line += " (no rotation: until somebody TAKEs on-call)"
        if board["covering"]:
            line += f", covering {board['covering']}"
        lines = [line + "."]
        if board["quiet"]:
            until, reason = board["quiet"]
            lines.append(f"Quiet until {self.local(until, board)}"
                         + (f" ({reason})" if reason else "") + ": alerts ring nobody.")
        return lines

    def text(self, board: dict) -> str:
        """The terminal's version (`oncall-pager status`)."""
        lines = [f"{board['team']}: status at {self.local(board['now'], board)}",
                 *self.headline(board), "", "Next handoffs:"]
        lines += [f"  {self.local(s.start, board)}  {m['name']}" for s, m in board["handoffs"]
                  ] or ["  none (no rotation)"]
        for title, pages in (("Open pages:", board["open"]), ("Last pages:", board["last"])):
            lines += ["", title]
            for page in pages:
                r = self.row(page, board)
                lines.append(f"  #{r['number']}  {r['kind']:<9} {r['age']:>7} ago  "
                             f"{r['summary']}  paged: {r['paged']}  {r['ack']}")
            if not pages:
                lines.append("  none")
            if title == "Open pages:" and board["open_more"]:
                lines.append(f"  +{board['open_more']} more open")
        health = board["health"]
        lines += ["", "Health: " + " ".join(f"{k}={v}" for k, v in health.items())]
        return "\n".join(CONTROL_CHARACTERS.sub(" ", line) for line in lines) + "\n"

    def html(self, board: dict) -> str:
        """The page: server-rendered, no script, readable on a phone (the viewport), fetched
        again every 60 s (meta refresh). Every value is HTML-escaped here, once."""
        def e(value: object) -> str:
            return html.escape(str(value), quote=True)

        def table(pages: list[dict], empty: str) -> str:
            if not pages:
                return f"<p class=none>{e(empty)}</p>"
            rows = "".join("<tr>" + "".join(
                f'<td class={name} data-label="{self.COLUMNS[name]}">{e(value)}</td>'
                for name, value in self.row(page, board).items()) + "</tr>" for page in pages)
            return ("<table><thead><tr>" + "".join(f"<th>{title}</th>" for title in
                                                   self.COLUMNS.values())
                    + "</tr></thead><tbody>" + rows + "</tbody></table>")

        handoff_items = "".join(
            f"<li><time>{e(self.local(s.start, board))}</time> {e(m['name'])}</li>"
            for s, m in board["handoffs"]) or "<li>none (no rotation)</li>"
        more = (f"<p class=more>+{board['open_more']} more open</p>" if board["open_more"]
                else "")
        health = " ".join(f"{k}={v}" for k, v in board["health"].items())
        return "".join([
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
            '<meta name=viewport content="width=device-width, initial-scale=1">',
            '<meta http-equiv=refresh content="60">',
            f"<title>{e(board['team'])}: on call</title><style>",
            "body{font:16px/1.4 system-ui,sans-serif;margin:1em;max-width:60em}",
            "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ccc;",
            "padding:.3em;text-align:left;vertical-align:top}.ok{color:#060}.bad{color:#b00}",
            "@media (max-width:40em){thead{display:none}td{display:block;border:0;",
            "padding:.1em}td::before{content:attr(data-label) ': ';color:#555}",
            "tr{display:block;border-bottom:1px solid #ccc;padding:.4em 0}}</style></head><body>",
            f"<h1>{e(board['team'])}</h1>",
            "".join(f"<p class=oncall>{e(line)}</p>" for line in self.headline(board)),
            f"<h2>Next handoffs</h2><ol class=handoffs>{handoff_items}</ol>",
            f"<h2>Open pages</h2><div id=open>{table(board['open'], 'No open pages.')}{more}",
            f"</div><h2>Last {self.LAST} pages</h2><div id=last>",
            f"{table(board['last'], 'No pages yet.')}</div>",
            f"<p id=health class={'ok' if board['healthy'] else 'bad'}>Health: {e(health)}</p>",
            f"<p><small>As of {e(self.local(board['now'], board))}; this page refreshes every",
            " 60 s.</small></p></body></html>\n"])


# ==============================================================================================
# Web: request parsing, the signature gate, the router, one short handler per webhook;
# WebApp (the gate and Twilio's webhooks), Monitors (Events API, heartbeats, health)
# ==============================================================================================


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    body: bytes = b""  # as sent, for the routes that take JSON
    authorization: str = ""  # the Authorization header (/metrics, /heartbeat/NAME)


@dataclasses.dataclass
class Response:
    status: int
    body: str
    content_type: str = "text/xml"
    headers: tuple[tuple[str, str], ...] = ()


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class FormFields(dict):
    """Posted fields as name -> list of values. `getall` lets Twilio's RequestValidator sign
    repeated fields exactly as received."""

    def getall(self, name: str) -> list[str]:
        return self[name]


STATUS_TEXT = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
               403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
               413: "Content Too Large", 414: "URI Too Long", 429: "Too Many Requests",
               500: "Internal Server Error",
               503: "Service Unavailable"}


def read_body(environ: dict, limit: int = MAX_BODY) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HTTPError(400, "bad Content-Length") from None
    if length > limit:
        raise HTTPError(413, f"request body over {limit} bytes")
    if length <= 0:
        return b""
    body = environ["wsgi.input"].read(length)
    if len(body) > limit:
        raise HTTPError(413, f"request body over {limit} bytes")
    return body


def parse_fields(text: str) -> FormFields:
    """Form or query fields, as parse_qsl would give them with blank values kept (Twilio signs
    them too). Written out because it is a third of a webhook's cost: most names and values
    have nothing to unquote, and skipping unquote_plus for those halves the time."""
    fields = FormFields()
    pairs = text.split("&") if text else []
    if len(pairs) > 500:
        raise HTTPError(400, "too many form fields")
    try:
        for pair in pairs:
            if not pair:
                continue
            name, _, value = pair.partition("=")
            if "%" in name or "+" in name:
                name = urllib.parse.unquote_plus(name, errors="strict")
            if "%" in value or "+" in value:
                value = urllib.parse.unquote_plus(value, errors="strict")
            fields.setdefault(name, []).append(value)
    except UnicodeDecodeError:
        raise HTTPError(400, "malformed form encoding") from None
    return fields


def signed_url(cfg: AppConfig, environ: dict) -> str:
    """The URL Twilio signed: public_url (not the Host header, which differs behind nginx)
    plus the path and query exactly as requested."""
    raw = environ.get("REQUEST_URI") or urllib.parse.quote(environ.get("PATH_INFO", "")) + (
        "?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
    if "://" in raw.split("?")[0]:
        parts = urllib.parse.urlsplit(raw)
        raw = parts.path + ("?" + parts.query if parts.query else "")
    return cfg.public_url.rstrip("/") + raw


def tried_query(tried: list[str]) -> str:
    """`tried=alice,bob` for the next callback URL, quoted: an id is text, and TwiML's
    URLs must stay URLs (and XML)."""
    return urllib.parse.urlencode({"tried": ",".join(tried)}, safe=",")


def twiml(response: Any) -> Response:
    return Response(200, str(response))


def speech(doc: dict | None) -> dict[str, str]:
    """The attributes of every <Say>: `current_config.voice` (name, language) where set."""
    voice = (doc or {}).get("current_config", {}).get("voice", {})
    said = {}
    if voice.get("name"):
        said["voice"] = voice["name"]
    if voice.get("language"):
        said["language"] = voice["language"]
    return said


def greeting(doc: dict | None) -> str:
    """The first sentence a caller hears: `current_config.greeting` ({team}: the team's
    name), else the pager's own."""
    current = (doc or {}).get("current_config", {})
    team = current.get("team_name") or ""
    if current.get("greeting"):
        return current["greeting"].replace("{team}", team or "on-call")
    return f"You have reached the {team} on-call pager." if team else \
        "You have reached the on-call pager."


# What a live caller hears before the voicemail flow: the hunt ended with nobody, or the
# caller was not put through (a repeat, an open page, the budget: see LiveCalls.live_hunt).
LIVE_NOBODY_TEXT = "Nobody could take your call. Please leave a message after the tone."
LIVE_HELD_TEXT = ("The on-call engineer cannot take a call right now. Please leave a message "
                  "after the tone.")


def say_and_hang_up(text: str, voice_of: dict[str, str]) -> Response:
    from twilio.twiml.voice_response import VoiceResponse

    voice = VoiceResponse()
    voice.say(text, **voice_of)
    voice.hangup()
    return twiml(voice)


def empty_messaging() -> Response:
    from twilio.twiml.messaging_response import MessagingResponse

    return twiml(MessagingResponse())


@functools.lru_cache(maxsize=256)
def message_reply(text: str | None) -> Response:
    """Replies repeat (WHO between changes, HALP): building TwiML costs more than the rest of
    a WHO, so the rendered ones are kept. Response is not mutated after this."""
    from twilio.twiml.messaging_response import MessagingResponse

    reply = MessagingResponse()
    if text:
        reply.message(text)
    return twiml(reply)


def json_response(status: int, body: dict, headers: tuple = ()) -> Response:
    return Response(status, json.dumps(body) + "\n", "application/json", headers)


RETRY_AFTER = (("Retry-After", "1"),)  # seconds: what a refusal for rate asks the sender


def busy() -> Response:
    """Too many writers at once on one object (a flood of one dedup_key or one heartbeat): a
    refusal for rate, so a 429 with Retry-After, as PagerDuty answers a flood. Monitors retry
    it as they retry a 5xx, but a 5xx reads as the pager being broken."""
    log.warning("event=request.busy")
    return json_response(429, {"status": "busy", "message": "too many concurrent changes; "
                                                            "try again"}, RETRY_AFTER)


def invalid_event(errors: list[str]) -> Response:
    """PagerDuty's answer to an event it refuses."""
    return json_response(400, {"status": "invalid event", "message": "Event object is invalid",
                               "errors": errors})


@dataclasses.dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    handler: Callable[[Any, Request], Response]  # a method of WebApp, or of its `room`
    required: tuple[str, ...] = ()
    signed: bool = True
    max_body: int = MAX_BODY
    room: str = ""  # the WebApp's room that serves it (its attribute), or the WebApp itself


JSON_PATHS = ("/v2/", "/heartbeat/")  # the monitors' routes: every answer there is JSON


def error_response(path: str, error: HTTPError) -> Response:
    """An HTTPError as the caller reads it: JSON on the monitors' routes (a PagerDuty client
    parses any answer from /v2/ as JSON, so even a 404 or a 429 there is JSON), plain text
    everywhere else (Twilio's routes, /healthz, /metrics)."""
    if path.startswith(JSON_PATHS):
        word = STATUS_TEXT.get(error.status, "error").lower()
        return json_response(error.status, {"status": word, "message": error.message},
                             error.headers)
    return Response(error.status, error.message + "\n", "text/plain; charset=utf-8",
                    error.headers)


def route_pattern(path: str) -> str | None:
    """The key in ROUTES that serves `path`: the path itself, or `/heartbeat/*` for
    /heartbeat/<name> (the one route with a name in its path)."""
    for pattern in (path, path[:path.rfind("/") + 1] + "*"):
        if pattern in ROUTES:
            return pattern
    return None


def route_label(path: str) -> str:
    """A request's path as /metrics names it: its route, or `other`, so that a caller cannot
    add a series with every path it makes up."""
    return route_pattern(path) or "other"


def config_stale(team: TeamConfig) -> bool:
    """Whether the last read of the operational config failed (store unreachable, config
    missing or invalid), so that the last good copy answers: from memory, no request."""
    return not team.reachable or bool(team.problem)


STATUS_PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"))


class WebApp:
    """The WSGI application. Every request goes: request line (414) -> route (404/405) ->
    size (413) -> parse (400) -> signature (403) -> required fields (400) -> handler.
    Nothing a handler raises reaches the caller as a traceback: store outages are 503,
    anything else a logged 500."""

    def __init__(self, cfg: AppConfig, pager: Pager, worker: Worker | None = None):
        from twilio.request_validator import RequestValidator

        self.cfg = cfg
        self.pager = pager
        self.worker = worker
        self.validator = RequestValidator(cfg.auth_token)
        # While Twilio's auth token is rotated, requests signed with the other one still pass.
        self.secondary = (RequestValidator(cfg.auth_token_secondary)
                          if cfg.auth_token_secondary else None)
        # The rooms, each the owner of its own state changes
        self.monitors = Monitors(self)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        try:
            response = self.dispatch(environ, method, path)
        except HTTPError as e:
            response = error_response(path, e)
        except StoreUnavailable:
            response = Response(503, "store unavailable\n", "text/plain; charset=utf-8")
        except (ConfigError, NoConfig):
            response = Response(503, "no valid operational config\n",
                                "text/plain; charset=utf-8")
        except Exception:
            log.exception("event=request.error method=%s path=%s", log_value(method),
                          log_value(path, 80))
            response = Response(500, "internal error\n", "text/plain; charset=utf-8")
        body = response.body.encode("utf-8")
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(body))),
                   *response.headers]
        start_response(f"{response.status} {STATUS_TEXT.get(response.status, 'Error')}",
                       headers)
        if method == "HEAD":  # the headers GET would have, no body (waitress sends what it gets)
            body = b""
        seconds = time.perf_counter() - started
        log.info("event=request method=%s path=%s status=%d ms=%.1f", log_value(method),
                 log_value(path, 80), response.status, seconds * 1000)
        route = route_label(path)
        METRICS.count("oncall_http_requests_total", path=route, status=str(response.status))
        METRICS.observe("oncall_http_request_seconds", seconds, path=route)
        return [body]

    def dispatch(self, environ: dict, method: str, path: str) -> Response:
        # Sizes first: an oversized request line costs no routing, parsing or HMAC. Bytes as
        # sent (PATH_INFO is decoded, REQUEST_URI is not).
        raw_path = (environ.get("REQUEST_URI") or path).partition("?")[0]
        if len(raw_path) > MAX_PATH or len(path) > MAX_PATH:
            raise HTTPError(414, f"request path over {MAX_PATH} bytes")
        if len(environ.get("QUERY_STRING", "")) > MAX_QUERY:
            raise HTTPError(414, f"query string over {MAX_QUERY} bytes")
        pattern = route_pattern(path)
        if pattern is None:
            raise HTTPError(404, "not found" if not path.startswith("/v2/") else
                            "no such endpoint: the Events API is POST /v2/enqueue, Change "
                            "Events POST /v2/change/enqueue")
        route = ROUTES[pattern]
        if method not in route.methods:
            raise HTTPError(405, "method not allowed", (("Allow", ", ".join(route.methods)),))
        body = read_body(environ, route.max_body)
        fields = FormFields()
        if route.signed:
            malformed = None
            try:
                fields = parse_fields(body.decode("utf-8"))
            except (UnicodeDecodeError, HTTPError) as e:
                malformed = e  # the signature is checked first: unsigned garbage is a 403
            self.check_signature(environ, fields)
            if malformed is not None:
                raise HTTPError(400, "malformed form body (not UTF-8, bad encoding or too "
                                "many fields)")
        query = {k: v[0] for k, v in parse_fields(environ.get("QUERY_STRING", "")).items()}
        form = {k: v[0] for k, v in fields.items()}
        missing = [name for name in route.required if not form.get(name)]
        if missing:
            raise HTTPError(400, f"missing field: {', '.join(missing)}")
        owner = self.monitors if route.room == "monitors" else self
        return route.handler(owner, Request(method, path, query, form, body,
                                           environ.get("HTTP_AUTHORIZATION", "")))

    def check_signature(self, environ: dict, fields: FormFields) -> None:
        if not self.cfg.validate_signatures:
            return
        signature = environ.get("HTTP_X_TWILIO_SIGNATURE", "")
        url = signed_url(self.cfg, environ)
        if signature and hmac.compare_digest(
                self.validator.compute_signature(url, fields).encode(), signature.encode()):
            return  # the common case, one HMAC; validate() below also tries the port variants
        if signature and (self.validator.validate(url, fields, signature) or (
                self.secondary is not None
                and self.secondary.validate(url, fields, signature))):
            return
        log.warning("event=signature.rejected path=%s",
                    log_value(environ.get("PATH_INFO", ""), 80))
        raise HTTPError(403, "invalid or missing X-Twilio-Signature")

    # --- the customer's call -------------------------------------------------------------------

    def public_answer(self, request: Request) -> Response:
        from twilio.twiml.voice_response import VoiceResponse

        retry = request.query.get("retry") == "1"
        doc = self.voice_config()
        said = speech(doc)
        voice = VoiceResponse()
        gather = voice.gather(num_digits=1, action=self.cfg.url("/public/keypress"),
                              method="POST", timeout=6)
        if not retry:
            gather.say(greeting(doc), **said)
        if live_settings(doc)["enabled"]:
            gather.say("Press 1 to leave a message. Press 2 to speak to the on-call engineer "
                       "now.", **said)
        else:
            gather.say("Press 1 to leave a message for the on-call engineer.", **said)
        if retry:
            voice.say("Goodbye.", **said)
            voice.hangup()
        else:
            voice.redirect(self.cfg.url("/public/answer?retry=1"), method="POST")
        return twiml(voice)

    def voice_config(self) -> dict | None:
        """The config for what calls hear (the team's name, the voice), from memory when it
        was checked in the last PAGE_CONFIG_MAX_AGE seconds; None when there is none."""
        try:
            return self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        except (NoConfig, ConfigError, StoreUnavailable):
            return None

    def say_and_hang_up(self, text: str) -> Response:
        return say_and_hang_up(text, speech(self.voice_config()))

    def caller_query(self, request: Request) -> str:
        """The caller's details, carried in the callback URLs: Twilio's recording callback
        does not repeat them. Fields Twilio left out are simply absent. Caller-ID names come
        from the phone network, not from Twilio: cleaned here, before they travel on."""
        form = request.form
        details = {"caller": form.get("From", "") or request.query.get("caller", ""),
                   "name": form.get("CallerName", "") or request.query.get("name", ""),
                   "city": form.get("FromCity", "") or request.query.get("city", ""),
                   "state": form.get("FromState", "") or request.query.get("state", ""),
                   "call": form.get("CallSid", "")}
        details = {k: clean_text(v) for k, v in details.items()}
        return urllib.parse.urlencode({k: v for k, v in details.items() if v})

    # --- live answer: the caller put through to a person ---------------------------------------

    def live_start(self, request: Request, doc: dict) -> Response:
        """The caller pressed 2: put through (LiveCalls.live_hunt decides), or straight to the
        voicemail flow."""
        held, capped = self.pager.calls.live_hunt(
            {"number": clean_text(request.form.get("From", ""))})
        if held is not None:
            return self.live_voicemail(request, doc, LIVE_HELD_TEXT, tried=[])
        return self.live_dial(request, doc, tried=[], capped=capped)

    def live_voicemail(self, request: Request, doc: dict | None, text: str,
                       tried: list[str]) -> Response:
        """The voicemail flow for a live caller, with the ids tried on its page."""
        from twilio.twiml.voice_response import VoiceResponse

        voice = VoiceResponse()
        voice.say(text, **speech(doc))
        self.record_prompt(request, voice, again=False, tried=tried)
        return twiml(voice)

    def live_dial(self, request: Request, doc: dict | None, tried: list[str],
                  capped: bool | None = None) -> Response:
        """Ring the next person for a live call (the on-call engineer first, then
        `escalate_to`, up to `max_targets`), from the pager number, with a screening whisper:
        only their 1 connects the caller, so a personal voicemail cannot take the call.
        Each leg counts against the hourly budget; only a caller who withholds the number is
        `capped` by it (the others reach a hunt once in LIVE_REPEAT_SECONDS: LiveCalls.live_hunt).
        Nobody left: the voicemail flow, with the ids tried on its page."""
        from twilio.twiml.voice_response import VoiceResponse

        said = speech(doc)
        voice = VoiceResponse()
        targets = [m for m in self.pager.calls.live_targets(doc) if m["id"] not in tried] \
            if doc else []
        if not targets or len(tried) >= live_settings(doc)["max_targets"]:
            return self.live_voicemail(request, doc, LIVE_NOBODY_TEXT, tried)
        target = targets[0]
        number = clean_text(request.form.get("From", "") or request.query.get("caller", ""))
        if capped is None:
            capped = not is_e164(number) or number in WITHHELD_NUMBERS
        if self.worker is not None and doc is not None and not self.worker.delivery.spend_live_leg(
                doc, {"channel": "live", "caller": number, "to": target["id"]}, capped):
            if not tried:
                self.pager.calls.live_held({"number": number}, "budget spent")
            return self.live_voicemail(request, doc, LIVE_NOBODY_TEXT if tried
                                       else LIVE_HELD_TEXT, tried)
        settings = live_settings(doc)
        query = self.caller_query(request) + "&" + tried_query([*tried, target["id"]])
        if not tried:
            voice.say("Connecting you to the on-call engineer. Please hold.", **said)
        dial = voice.dial(caller_id=doc["current_config"]["pager_phone"],
                          timeout=settings["ring_seconds"], method="POST",
                          action=self.cfg.url("/public/dialdone?" + query),
                          **({"record": "record-from-answer-dual",
                              "recording_status_callback": self.cfg.url(
                                  "/public/recordingcb?" + query + "&live=1"),
                              "recording_status_callback_method": "POST"}
                             if settings["record"] else {}))
        dial.number(target["phone"], url=self.cfg.url(
            f"/public/screen?{query}&member={target['id']}"), method="POST")
        return twiml(voice)

    def live_tried(self, request: Request) -> list[str]:
        """Who was rung already, from the pager's own URL: cleaned all the same (a signed
        request can carry anything there)."""
        return [m for m in map(clean_text, request.query.get("tried", "").split(",")) if m][:10]

    def public_screen(self, request: Request) -> Response:
        """The engineer's leg, before it is connected: who calls, and 1 to accept. No key
        (a personal voicemail, a missed key) hangs up this leg; the caller's Dial goes on."""
        from twilio.twiml.voice_response import VoiceResponse

        doc = self.voice_config()
        said = speech(doc)
        team = team_name(doc or {"current_config": {}})
        caller = {"number": request.query.get("caller", ""),
                  "name": request.query.get("name", ""), "city": request.query.get("city", ""),
                  "state": request.query.get("state", "")}
        voice = VoiceResponse()
        gather = voice.gather(num_digits=1, timeout=8, method="POST", action=self.cfg.url(
            "/public/screenkey?" + urllib.parse.urlencode(request.query)))
        gather.say(f"Call for the {team + ' ' if team else ''}pager from "
                   f"{caller_text({'caller': {k: clean_text(v) for k, v in caller.items()}})}. "
                   "Press 1 to accept.", **said)
        voice.hangup()
        return twiml(voice)

    def public_screenkey(self, request: Request) -> Response:
        """1: the engineer takes the call (a page of kind call, acknowledged by them); the
        whisper ends and Twilio connects the caller. Anything else: this leg hangs up."""
        from twilio.twiml.voice_response import VoiceResponse

        query = request.query
        call_sid = query.get("call", "")
        doc = self.voice_config()
        member = members(doc).get(query.get("member", "")) if doc else None
        if request.form.get("Digits") != "1" or member is None or \
                not re.fullmatch(r"CA[0-9a-zA-Z]{32}", call_sid):
            return self.say_and_hang_up("Goodbye.")
        caller = {k: clean_text(query[q]) for k, q in (
            ("number", "caller"), ("name", "name"), ("city", "city"), ("state", "state"))
            if q in query}
        try:
            self.pager.calls.live_accepted(call_sid, caller, member, self.live_tried(request))
        except (StoreUnavailable, NoConfig, ConfigError) as e:
            # (no spool, or the page's create landed and its answer was lost): the engineer
            # takes the call all the same; the page is missing, and the log says so
            log.error("event=live.page_unrecorded call=%s error=%r", call_sid, str(e)[:200])
        voice = VoiceResponse()
        voice.say("Connecting.", **speech(doc))
        return twiml(voice)

    def public_dialdone(self, request: Request) -> Response:
        """The caller's Dial ended: the call was taken (its page exists: goodbye), or the
        next person is rung, or the voicemail flow starts. A store that cannot say whether
        it was taken means not taken: the caller is offered voicemail, never an error."""
        call_sid = request.query.get("call", "")
        taken = self.pager.calls.live_taken(call_sid) if PAGE_ID.fullmatch(call_sid) else False
        if taken:
            return self.say_and_hang_up("Goodbye.")
        doc = self.voice_config()
        if taken is None:
            log.warning("event=live.dialdone_unknown call=%s reason=store_unavailable",
                        call_sid)
            return self.live_voicemail(request, doc, LIVE_NOBODY_TEXT, self.live_tried(request))
        return self.live_dial(request, doc, self.live_tried(request))

    def record_prompt(self, request: Request, voice: Any, again: bool,
                      tried: list[str] | None = None) -> None:
        query = self.caller_query(request)
        tried = tried if tried is not None else self.live_tried(request)  # a second chance
        if tried:
            query += "&" + tried_query(tried)
        doc = self.voice_config()
        transcribe = bool((doc or {}).get("current_config", {}).get("transcribe"))
        voice.record(action=self.cfg.url("/public/afterrec?" + query
                                         + ("&second=1" if again else "")),
                     method="POST", max_length=300, finish_on_key="#", play_beep=True,
                     recording_status_callback=self.cfg.url("/public/recordingcb?" + query),
                     recording_status_callback_method="POST",
                     recording_status_callback_event="completed absent",
                     **({"transcribe": True, "transcribe_callback": self.cfg.url(
                         "/public/transcriptioncb?" + query)} if transcribe else {}))

    def public_transcriptioncb(self, request: Request) -> Response:
        """Twilio's transcript of a voicemail (messages of 2 to 120 s): see
        LiveCalls.transcribed. The text comes from the caller's words: cleaned first."""
        form = request.form
        sid = form["RecordingSid"]
        if not PAGE_ID.fullmatch(sid):
            raise HTTPError(400, "RecordingSid is not a recording sid")
        status = form["TranscriptionStatus"]
        log.info("event=transcript recording=%s status=%s", sid, log_value(status))
        self.pager.calls.transcribed(sid, status, clean_text(form.get("TranscriptionText", "")))
        return empty_messaging()

    def public_keypress(self, request: Request) -> Response:
        from twilio.twiml.voice_response import VoiceResponse

        doc = self.voice_config()
        if request.form.get("Digits") == "2" and live_settings(doc)["enabled"] and doc:
            return self.live_start(request, doc)
        if request.form.get("Digits") != "1":
            return self.say_and_hang_up("Goodbye.")
        voice = VoiceResponse()
        voice.say("Please leave your message after the tone. When you are done, hang up or "
                  "press the pound key.", **speech(self.voice_config()))
        self.record_prompt(request, voice, again=False)
        return twiml(voice)

    def public_afterrec(self, request: Request) -> Response:
        from twilio.twiml.voice_response import VoiceResponse

        duration = request.form.get("RecordingDuration", "0")
        seconds = whole_number(duration) or 0
        if seconds > 0 and request.form.get("RecordingUrl"):
            team = team_name(self.voice_config() or {"current_config": {}})
            who = f"the {team} on-call engineer" if team else "the on-call engineer"
            return self.say_and_hang_up(f"I'm going to deliver your {seconds} second message "
                                        f"to {who} now. Goodbye.")
        if request.query.get("second") == "1":
            return self.say_and_hang_up("I still did not hear a message. Goodbye.")
        voice = VoiceResponse()
        voice.say("I did not hear a message. Please try again after the tone.",
                  **speech(self.voice_config()))
        self.record_prompt(request, voice, again=True)
        return twiml(voice)

    def public_recordingcb(self, request: Request) -> Response:
        form, query = request.form, request.query
        caller = {k: clean_text(query[q]) for k, q in (
            ("number", "caller"), ("name", "name"), ("city", "city"), ("state", "state"))
            if q in query}
        call_sid = form["CallSid"]
        status = form["RecordingStatus"]
        if status == "completed":
            url = form.get("RecordingUrl", "")
            sid = form.get("RecordingSid", "")
            if not recording_url_allowed(self.cfg, url) or not re.fullmatch(
                    r"RE[0-9a-zA-Z]{32}", sid) or not url.endswith(sid):
                # Never fetched. The request is signed, so a customer really called (say the
                # API host changed under us): page a missed call rather than nobody.
                self.pager.audit.record("recording.refused", "twilio", {
                    "recording_url": url[:200], "recording_sid": sid[:40], "call_sid": call_sid})
                if re.fullmatch(r"CA[0-9a-zA-Z]{32}", call_sid):
                    self.pager.pages.open_page(call_sid, "missed", caller, call_sid)
                raise HTTPError(400, "recording URL is not one of this account's recordings")
            duration = form.get("RecordingDuration", "0")
            seconds = whole_number(duration) or 0
            if query.get("live") == "1" and PAGE_ID.fullmatch(query.get("call", "")):
                self.pager.calls.live_recorded(query["call"], sid, url, seconds)
                return empty_messaging()
            self.pager.pages.open_page(sid, "voicemail", caller, call_sid, url, seconds,
                                 live_tried=self.live_tried(request) or None)
        elif status in ("absent", "failed"):
            if not re.fullmatch(r"CA[0-9a-zA-Z]{32}", call_sid):
                raise HTTPError(400, "CallSid is not a call sid")
            self.pager.pages.open_page(call_sid, "missed", caller, call_sid)
        return empty_messaging()

    def public_textstatus(self, request: Request) -> Response:
        """Twilio's status callback of every text the pager sends (the path keeps its first
        name, /public/mmsstatuscb, so URLs already handed to Twilio still work). A failed or
        undelivered text of a page goes to Pages.text_failed; one of a message job (the
        handoff) is audited with its code and reason."""
        form, query = request.form, request.query
        status = form["MessageStatus"]
        code_text = form.get("ErrorCode", "")
        code = whole_number(code_text)
        page_id, channel = query.get("page", ""), query.get("channel", "mms")
        log.info("event=text.status page=%s channel=%s job=%s status=%s code=%s",
                 log_value(page_id, 40), log_value(channel, 60),
                 log_value(query.get("job", ""), 60), log_value(status), code)
        if status not in ("failed", "undelivered"):
            return empty_messaging()
        if PAGE_ID.fullmatch(page_id) and TEXT_CHANNEL.fullmatch(channel):
            self.pager.pages.text_failed(page_id, channel, status, code)
        elif re.fullmatch(r"msg-[0-9TZ.]+-[0-9a-f]{12}", query.get("job", "")):
            self.pager.audit.record("page.delivery_failed", "twilio", {
                "job": query["job"], "deliveries": {"sms": {
                    "status": status, "code": code, "reason": carrier_reason(code),
                    "final": True}}})
        return empty_messaging()

    # --- the team's SMS ------------------------------------------------------------------------

    def msgcontrol_entry(self, request: Request) -> Response:
        """A retry or replay of the same MessageSid gets the first answer again, not a second
        execution (see Commands.handle_sms)."""
        try:
            reply = self.pager.commands.handle_sms(clean_text(request.form["From"]),
                                          clean_text(request.form.get("Body", "")),
                                          request.form.get("MessageSid", ""))
        except (NoConfig, ConfigError):
            # Without a valid config nobody is a member, so nobody gets an answer (an empty
            # <Response/>, as a stranger does); the log and /healthz say why, once a minute.
            log.debug("event=sms.no_config")
            reply = None
        return message_reply(reply)

    def wrongnumber_sms(self, request: Request) -> Response:
        if request.form.get("CallSid"):
            return self.wrongnumber_voice(request)
        try:
            snap = self.pager.team.read()
        except (NoConfig, ConfigError):  # nobody is a member without a valid config
            return empty_messaging()
        if member_by_phone(snap.doc, request.form.get("From", "")) is None:
            return empty_messaging()
        return message_reply("This is a voice-only number, text "
                             f"{snap.doc['current_config']['from_phone']} instead.")

    def wrongnumber_voice(self, request: Request) -> Response:
        return self.say_and_hang_up("This number does not accept calls.")

    # --- page calls ----------------------------------------------------------------------------

    def page_for(self, request: Request) -> dict | None:
        return self.pager.pages.page(request.query.get("page", ""))

    def oncall_answer(self, request: Request) -> Response:
        from twilio.twiml.voice_response import VoiceResponse

        page = self.page_for(request)
        if page is None:
            return self.say_and_hang_up("This page no longer exists. Goodbye.")
        number = self.pager.pages.number_of(page)
        if page["state"] != "open":
            return self.say_and_hang_up(f"Page {number} is {page['state']} already. Goodbye.")
        doc = self.voice_config()
        said = speech(doc)
        voice = VoiceResponse()
        gather = voice.gather(num_digits=1, method="POST", timeout=8,
                              action=self.cfg.url(f"/oncall/keypress?page={page['id']}"))
        if page["kind"] in ("alert", "heartbeat"):
            alert = page["alert"]
            what = (f"{alert['summary']}." if page["kind"] == "heartbeat" else
                    f"a {alert['severity']} alert from {alert['source']}: {alert['summary']}.")
            keys = "Press 1 to acknowledge. Press 2 to hear it again."
        else:
            what = (f"a {page['duration']} second voicemail" if page["kind"] == "voicemail"
                    else "a missed call") + f" from {caller_text(page)}."
            keys = "Press 1 to acknowledge. Press 2 to hear the message."
        team = team_name(doc or {"current_config": {}})
        gather.say(f"This is the {team} pager. " if team else "This is the on-call pager. ",
                   **said)
        gather.say(f"Page {number}: {what} {keys}", **said)
        voice.say("Not acknowledged. Goodbye.", **said)
        voice.hangup()
        return twiml(voice)

    def oncall_keypress(self, request: Request) -> Response:
        from twilio.twiml.voice_response import VoiceResponse

        page = self.page_for(request)
        if page is None:
            return self.say_and_hang_up("This page no longer exists. Goodbye.")
        number = self.pager.pages.number_of(page)
        digits = request.form.get("Digits", "")
        if digits == "1":
            member = member_by_phone(self.pager.team.read().doc, request.form.get("To", ""))
            if member is None:
                return twiml(VoiceResponse())
            done, current = self.pager.pages.acknowledge(page["id"], member, via="call")
            if done:
                return self.say_and_hang_up(f"Page {number} acknowledged. Thank you, "
                                            f"{first_name(member)}. Goodbye.")
            return self.say_and_hang_up(f"Page {number} was already "
                                        f"{page_state(current, None)}. Goodbye.")
        voice = VoiceResponse()
        if digits == "2" and page["kind"] == "voicemail":
            voice.play(page["recording_url"] + ".mp3")
        elif digits == "2" and page["kind"] not in ("alert", "heartbeat"):
            voice.say("There is no recording: the caller did not leave a message.",
                      **speech(self.voice_config()))
        voice.redirect(self.cfg.url(f"/oncall/answer?page={page['id']}"), method="POST")
        return twiml(voice)

    def oncall_test(self, request: Request) -> Response:
        """The test call (`oncall-pager test MEMBER --call`) asks the member for a 1."""
        from twilio.twiml.voice_response import VoiceResponse

        said = speech(self.voice_config())
        voice = VoiceResponse()
        gather = voice.gather(num_digits=1, method="POST", timeout=8,
                              action=self.cfg.url("/oncall/testkey"))
        gather.say("Test from oncall-pager. Press 1 to confirm that pages reach you.", **said)
        voice.say("Not confirmed. Goodbye.", **said)
        voice.hangup()
        return twiml(voice)

    def oncall_testkey(self, request: Request) -> Response:
        member = member_by_phone(self.pager.team.read().doc, request.form.get("To", ""))
        if member is None or request.form.get("Digits", "") != "1":
            return self.say_and_hang_up("Not confirmed. Goodbye.")
        self.pager.contacts.confirmed(member["id"], "call")
        return self.say_and_hang_up(f"Confirmed. Thank you, {first_name(member)}. Goodbye.")

    def oncall_callstatus(self, request: Request) -> Response:
        page = self.page_for(request)
        status = request.form["CallStatus"]
        step = whole_number(request.query.get("step", ""))
        log.info("event=call.status page=%s status=%s", (page or {}).get("id"),
                 log_value(status))
        if page and status in ("busy", "no-answer", "failed", "canceled") and step is not None:
            self.pager.calls.call_unanswered(page["id"], step)
        return empty_messaging()


# --- Monitors: the Events API, heartbeats, /healthz and /metrics ------------------------------


class Monitors:
    """The unsigned routes, for monitors and for readers holding a token (no Twilio
    signature; a routing key or a token instead): PagerDuty's Events API and Change Events,
    heartbeat pings, /healthz, /metrics, and the feeds. Served through WebApp.dispatch like
    Twilio's routes (Route.room names this room)."""

    def __init__(self, app: WebApp):
        self.app = app
        self.cfg, self.pager, self.worker = app.cfg, app.pager, app.worker
        self._key_lookup = -math.inf  # time.monotonic() of the last store read for a key

    # --- alerts from monitoring: not Twilio's routes, the routing key is the credential ------

    def integration_for(self, routing_key: str) -> tuple[str | None, dict]:
        """The integration of a routing key and the config that says so. The config from
        memory first (as on the page path); a key it does not know is looked up once more in
        the store, so a key added a moment ago (on any host) works at once: at most once a
        second, so that a flood of bad keys cannot become a flood of store requests. A key
        that could not be looked up for that limit is refused for rate: HTTPError 429 with
        Retry-After, which monitors retry (a 400 would lose the alert of a key just added;
        a 5xx would read as the pager being broken)."""
        team = self.pager.team
        known = team.last_known()
        if known is not None and not known.stale and integration_of(known.doc, routing_key):
            # a key the copy in memory knows: no request on the answer's path (a storm of
            # repeats is answered from memory); a copy older than PAGE_CONFIG_MAX_AGE is
            # checked beside it, so a removed key stops working a round trip later
            team.check_soon(PAGE_CONFIG_MAX_AGE)
            doc = known.doc
        else:
            doc = team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        integration = integration_of(doc, routing_key)
        if integration is None:
            doc = self.fresh_config("unknown routing key")
            integration = integration_of(doc, routing_key)
        return integration, doc

    def fresh_config(self, what: str) -> dict:
        """The config read from the store now, for a name or key the copy in memory does not
        know (one added a moment ago, on any host, works at once): at most once a second
        across all callers, else a refusal for rate (429 with Retry-After, which monitors
        retry), so that a flood of bad names cannot become a flood of store requests."""
        if time.monotonic() - self._key_lookup < 1.0:
            log.warning("event=request.key_lookup_limited")
            raise HTTPError(429, f"{what}; try again in a second", RETRY_AFTER)
        self._key_lookup = time.monotonic()
        return self.pager.team.read().doc

    def events_enqueue(self, request: Request) -> Response:
        """PagerDuty's Events API v2 (`/v2/enqueue`), answered in PagerDuty's words, so
        Alertmanager, Grafana, Uptime Kuma and the rest page through it unchanged."""
        accepted = self.accepted_event(request, parse_event)
        if isinstance(accepted, Response):
            return accepted
        parsed, integration = accepted
        try:
            dedup_key = self.pager.alerts.alert_event(integration, parsed)
        except StoreConflict:
            return busy()
        log.info("event=events.processed integration=%s action=%s", integration,
                 parsed["event_action"])
        return json_response(202, {"status": "success", "message": "Event processed",
                                   "dedup_key": dedup_key})

    def accepted_event(self, request: Request,
                       parse: Callable[[object], tuple[dict, list[str]]]
                       ) -> tuple[dict, str] | Response:
        """An Events API body (an event, or a Change Event), parsed, and the integration its
        routing key names; or the 400 that refuses it in PagerDuty's words."""
        try:
            event = json.loads(request.body)
        except (ValueError, RecursionError):
            return invalid_event(["Event object is invalid: the body is not JSON"])
        parsed, errors = parse(event)
        if errors:
            return invalid_event(errors)
        integration = self.event_integration(parsed["routing_key"])
        if isinstance(integration, Response):
            return integration
        return parsed, integration

    def event_integration(self, routing_key: str) -> str | Response:
        """The integration that may send events with this key, or PagerDuty's 400 "Invalid
        routing key". A heartbeats-only key gets that 400 too, with a reason: it is what a
        PagerDuty client does not retry and shows its user (pdpyras, pdjs, Alertmanager log
        `errors`), where a 401/403 is not a status the Events API answers and a 5xx or 429
        would be retried for ever. The key still cannot page."""
        integration, doc = self.integration_for(routing_key)
        if integration is None:
            log.warning("event=events.unknown_key")
            return invalid_event(["Invalid routing key"])
        if heartbeats_only(doc, integration):
            log.warning("event=events.heartbeats_only_key integration=%s", integration)
            return invalid_event([f"Invalid routing key: the key of {integration} is for "
                                  "heartbeats only (it can ping /heartbeat/NAME, not send "
                                  "events)"])
        return integration

    def change_enqueue(self, request: Request) -> Response:
        """PagerDuty's Change Events (`/v2/change/enqueue`, sent by the `pagerduty` and `pdjs`
        clients, CI pipelines, deploy tools): audited for whoever reads what happened before a
        page; nothing rings. Refused in the words of /v2/enqueue."""
        accepted = self.accepted_event(request, parse_change_event)
        if isinstance(accepted, Response):
            return accepted
        change, integration = accepted
        self.pager.alerts.change_received(integration, change)
        log.info("event=events.change integration=%s", integration)
        return json_response(202, {"status": "success", "message": "Change event processed"})

    def heartbeat(self, request: Request) -> Response:
        """`GET`, `HEAD` or `POST /heartbeat/NAME` (cron's `curl URL`, healthchecks-style
        pingers send GET) with any integration's routing key, heartbeats-only or not
        (`Authorization: Bearer KEY`, or `?key=KEY`): 401 without a key, 403 with a wrong
        one, 404 for a heartbeat the config does not name (asked of the store once more, see
        fresh_config)."""
        name = clean_text(request.path.removeprefix("/heartbeat/"))
        bearer = request.authorization.partition(" ")
        key = (bearer[2].strip() if bearer[0].lower() == "bearer"
               else request.query.get("key", ""))
        if not key:
            return json_response(401, {"status": "unauthorized", "message": "a routing key "
                                       "is required (Authorization: Bearer KEY, or ?key=KEY)"},
                                 (("WWW-Authenticate", "Bearer"),))
        integration, doc = self.integration_for(key)
        if integration is None:
            log.warning("event=heartbeat.unknown_key")
            return json_response(403, {"status": "forbidden", "message": "unknown routing key"})
        settings = heartbeats(doc).get(name)
        if settings is None and NAME.fullmatch(name):  # one added a moment ago pings at once
            settings = heartbeats(self.fresh_config("unknown heartbeat")).get(name)
        if settings is None:
            return json_response(404, {"status": "not found",
                                       "message": "no heartbeat of that name is configured"})
        try:
            state = self.pager.heartbeats.ping(name, settings["interval"]
                                              + settings.get("grace", 0))
        except StoreConflict:
            return busy()
        return json_response(200, {"status": "ok", "heartbeat": name,
                                   "last_ping": iso_time(state["last_ping"])})

    # --- monitoring ----------------------------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        healthy, body = health_words(self.pager, self.worker)
        return Response(200 if healthy else 503, json.dumps(body) + "\n", "application/json")

    # --- read-only views behind a token in the URL (SPEC 21) ----------------------------------

    def feed_config(self, feed: str, token: str) -> dict:
        """The config, when `token` opens `feed` (from memory, at most PAGE_CONFIG_MAX_AGE
        old: a new token works within seconds); else 404, as for a page that is not there,
        and never a store request a stranger can cause."""
        doc = self.pager.team.read(max_age=PAGE_CONFIG_MAX_AGE).doc
        if not feed_token(doc, feed, token):
            log.warning("event=%s.unknown_token", feed)
            raise HTTPError(404, "not found")
        return doc

    def calendar(self, request: Request) -> Response:
        """`GET /calendar/TOKEN.ics`: the on-call shifts as an iCalendar feed."""
        name = request.path.removeprefix("/calendar/")
        doc = self.feed_config("calendar", name.removesuffix(".ics") if name.endswith(".ics")
                               else "")
        domain = urllib.parse.urlsplit(self.cfg.public_url).hostname or "oncall-pager"
        return Response(200, calendar_feed(doc, time.time(), domain),
                        "text/calendar; charset=utf-8",
                        (("Cache-Control", "private, max-age=300"),
                         ("Content-Disposition", 'inline; filename="oncall.ics"')))

    def status_page(self, request: Request) -> Response:
        """`GET /status/TOKEN`: the status page (StatusBoard), locked down: no script may
        run, no frame may hold it, no referrer leaks the token, no cache keeps it."""
        doc = self.feed_config("status", request.path.removeprefix("/status/"))
        board = StatusBoard(self.pager, self.worker)
        return Response(200, board.html(board.gather(doc, time.time())),
                        "text/html; charset=utf-8", STATUS_PAGE_HEADERS)

    def metrics(self, request: Request) -> Response:
        """Prometheus's text format, for a scraper holding `[server] metrics_token` as a
        bearer token; without a token configured there is no such page. Everything comes
        from memory: a scrape costs the store nothing."""
        token = self.cfg.metrics_token
        if not token:
            raise HTTPError(404, "not found")
        scheme, _, offered = request.authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                offered.strip().encode(), token.encode()):
            raise HTTPError(401, "bearer token required",
                            (("WWW-Authenticate", 'Bearer realm="metrics"'),))
        team = self.pager.team
        known = team.last_known()
        left = self.worker.delivery.outbound_left(
            known.doc if known else None) if self.worker else None
        gauges: dict[str, list[tuple[Labels, float]]] = {
            "oncall_build_info": [((("version", VERSION),), 1.0)],
            "oncall_queue_depth": [((), float(self.worker.queue_depth if self.worker else 0))],
            "oncall_outbound_budget_left": [] if left is None else [((), float(left))],
            "oncall_config_stale": [((), float(config_stale(team)))],
            "oncall_store_reachable": [((), float(team.reachable))],
            "oncall_quiet": [((), float(known is not None and
                                       quiet_until(known.doc, time.time()) is not None))],
            "oncall_worker_busy_seconds": [((), self.worker.busy_for())] if self.worker else [],
            "oncall_alert_repeats_pending": [((), float(self.pager.alerts.repeats.pending()))],
        }
        return Response(200, METRICS.render(gauges), "text/plain; version=0.0.4; charset=utf-8")


ROUTES: dict[str, Route] = {
    "/public/answer": Route(("POST",), WebApp.public_answer, ("CallSid",)),
    "/public/keypress": Route(("POST",), WebApp.public_keypress, ("CallSid",)),
    "/public/afterrec": Route(("POST",), WebApp.public_afterrec, ("CallSid",)),
    "/public/recordingcb": Route(("POST",), WebApp.public_recordingcb,
                                 ("CallSid", "RecordingStatus")),
    "/public/screen": Route(("POST",), WebApp.public_screen, ("CallSid",)),
    "/public/screenkey": Route(("POST",), WebApp.public_screenkey, ("CallSid",)),
    "/public/dialdone": Route(("POST",), WebApp.public_dialdone, ("CallSid",)),
    "/public/transcriptioncb": Route(("POST",), WebApp.public_transcriptioncb,
                                     ("RecordingSid", "TranscriptionStatus")),
    "/public/mmsstatuscb": Route(("POST",), WebApp.public_textstatus,
                                 ("MessageSid", "MessageStatus")),
    "/msgcontrol/entry": Route(("POST",), WebApp.msgcontrol_entry, ("From",)),
    "/wrongnumber/sms": Route(("POST",), WebApp.wrongnumber_sms),
    "/wrongnumber/voice": Route(("POST",), WebApp.wrongnumber_voice),
    "/oncall/answer": Route(("POST",), WebApp.oncall_answer, ("CallSid",)),
    "/oncall/keypress": Route(("POST",), WebApp.oncall_keypress, ("CallSid",)),
    "/oncall/callstatus": Route(("POST",), WebApp.oncall_callstatus, ("CallSid", "CallStatus")),
    "/oncall/test": Route(("POST",), WebApp.oncall_test, ("CallSid",)),
    "/oncall/testkey": Route(("POST",), WebApp.oncall_testkey, ("CallSid",)),
    "/healthz": Route(("GET",), Monitors.healthz, signed=False, room="monitors"),
    "/metrics": Route(("GET",), Monitors.metrics, signed=False, room="monitors"),
    "/v2/enqueue": Route(("POST",), Monitors.events_enqueue, signed=False,
                         max_body=MAX_EVENT_BODY, room="monitors"),
    "/v2/change/enqueue": Route(("POST",), Monitors.change_enqueue, signed=False,
                                max_body=MAX_EVENT_BODY, room="monitors"),
    "/heartbeat/*": Route(("GET", "HEAD", "POST"), Monitors.heartbeat, signed=False,
                          room="monitors"),
    "/calendar/*": Route(("GET", "HEAD"), Monitors.calendar, signed=False, room="monitors"),
    "/status/*": Route(("GET", "HEAD"), Monitors.status_page, signed=False, room="monitors"),
}


# ==============================================================================================
# Command line: serve (and its systemd notifier), check, init, sms, call, config, integration,
# audit, pages, schedule, vcard
# ==============================================================================================


class OneLineFormatter(logging.Formatter):
    """The last guard against a forged log line: whatever a message holds, it stays one line
    (control characters escaped), for values that were not passed through log_value. A
    traceback, appended after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = CONTROL_CHARACTERS.sub(
            lambda m: m.group().encode("unicode_escape").decode("ascii"), record.message)
        return super().formatMessage(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s level=%(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def build_pager(cfg: AppConfig) -> Pager:
    return Pager(cfg, open_store(cfg))


def initialise_if_empty(cfg: AppConfig, pager: Pager) -> None:
    """serve's embedded default: an empty store gets `init_from` (the example config). It
    looks for the config with a plain read first, so that a first start, which is expected
    to find none, logs no config problem."""
    if not cfg.init_from:
        return
    try:
        if pager.store.get(cfg.config_key) is not None:
            return
        doc = load_json_file(resolve_path(cfg, cfg.init_from))
        with contextlib.suppress(StoreConflict):
            pager.team.initialise(doc, actor="serve")
            log.info("event=config.initialised from=%s", cfg.init_from)
    except StoreUnavailable:  # serve runs on, and says so (see cmd_serve)
        pass


STATUS_EVERY = 10.0  # seconds between two looks at the pager's state for systemd's STATUS=


class ServiceNotifier:
    """systemd's notify protocol (Type=notify), spoken with the standard library: one
    datagram per message to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading `@` means
    Linux's abstract namespace). READY=1 once serve listens; WATCHDOG=1 every quarter of
    $WATCHDOG_USEC, but only while the worker loop is alive (Worker.alive), so that systemd
    kills and restarts a pager whose worker is stuck, not one that is merely idle; STATUS=, a
    line for `systemctl status`, whenever it changes. Without $NOTIFY_SOCKET (not under
    systemd, or Type=simple) it does nothing."""

    def __init__(self, pager: Pager, worker: Worker, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.pager = pager
        self.worker = worker
        # The watchdog is ours when WATCHDOG_USEC is set and WATCHDOG_PID, if set, is us.
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog = usec.isdigit() and int(usec) > 0 and environ.get(
            "WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.interval = min(STATUS_EVERY, int(usec) / 4e6) if self.watchdog else STATUS_EVERY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = ""
        self._failing = False  # the last message could not be sent (logged once a streak)

    def send(self, message: str) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as e:
            if not self._failing:
                log.warning("event=systemd.notify_failed error=%s",
                            log_value(e.strerror or type(e).__name__))
            self._failing = True
            return
        self._failing = False

    def status(self) -> str:
        team = self.pager.team
        busy = self.worker.busy_for()
        known = team.last_known()
        until = quiet_until(known.doc, time.time()) if known is not None else None
        return (f"queue {self.worker.queue_depth}, "
                + (f"quiet until {short_time(until)}, " if until else "")
                + f"store {'reachable' if team.reachable else 'unreachable'}, "
                f"config {'stale' if config_stale(team) else 'current'}, "
                f"worker {'alive' if self.worker.alive() else f'stuck for {busy:.0f} s'}")

    def start(self) -> None:
        """READY=1 (the server socket listens already: waitress binds it when it is made)."""
        if not self.address:
            return
        self._status = self.status()
        self.send("READY=1\n" + ("WATCHDOG=1\n" if self.watchdog and self.worker.alive()
                                 else "") + f"STATUS={self._status}")
        self._thread = threading.Thread(target=self._run, name="systemd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stuck = False
        while not self._stop.wait(self.interval):
            alive = self.worker.alive()
            if not alive and not stuck:  # once per episode, for whoever reads the journal
                log.error("event=watchdog.worker_stuck busy_s=%.0f watchdog=%s",
                          self.worker.busy_for(), "stopped" if self.watchdog else "off")
            elif alive and stuck:
                log.warning("event=watchdog.worker_alive")
            stuck = not alive
            status = self.status()
            message = [*(["WATCHDOG=1"] if self.watchdog and alive else []),
                       *([f"STATUS={status}"] if status != self._status else [])]
            self._status = status
            if message:
                self.send("\n".join(message))

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(5)
        self.send("STOPPING=1")


def ready_for_requests() -> None:
    """At start, what would otherwise make one webhook in fifty slow (SPEC 20: the
    recording callback's p99): the imports the handlers make on first use, and the garbage
    collector's full passes. Some 85,000 objects live after start-up (boto3's and twilio's
    models, mostly) and as long as the process; a full collection walks them all (40 to 130
    ms here) about once per hundred young ones, inside whichever request happens to
    allocate then. Frozen (gc.freeze), they are out of the collector's sight, and a full
    pass walks only what came after. The first page's deliveries, which run beside its
    callback's answer, would do some first-time work too (the e-mail package's policy
    modules, 15 ms; the platform facts twilio puts in its User-Agent, 10 ms and more): done
    here instead."""
    import platform

    from twilio.request_validator import RequestValidator  # noqa: F401
    from twilio.twiml.messaging_response import MessagingResponse  # noqa: F401
    from twilio.twiml.voice_response import VoiceResponse  # noqa: F401

    platform.system(), platform.machine(), platform.python_version()
    bytes(build_email({"from_email": "pager@localhost", "to_email": "team@localhost"},
                      "start", "start", ("start.mp3", b""), "<start@oncall-pager>"))
    gc.collect()
    gc.freeze()


def probe_at_start(probing: Future, reachable: bool) -> bool:
    """serve's probe of the store (probe_store, started with the first reads so that it
    costs no round trip of its own): a store that ignores conditional writes is refused
    before anything listens (ConfigError: one line, exit 1), since a pager that cannot detect
    a double page must not pretend to. An unreachable store is not one that ignores them:
    serve starts as it always has (from the last good copy), without waiting for the probe's
    own time-outs, and the answer is True, for probe_until_answered to finish it."""
    if not reachable and not probing.done():
        log.warning("event=store.probe_deferred problem=unreachable")
        return True
    try:
        problem = probing.result()
    except StoreUnavailable as e:
        log.warning("event=store.probe_deferred problem=%s", log_value(str(e)))
        return True
    if problem:
        raise ConfigError([problem])
    log.info("event=store.probed conditions=honoured")
    return False


def probe_until_answered(store: Store, probing: Future, every: float,
                         refuse: Callable[[str], None]) -> None:
    """The probe of a store that was unreachable at start: the one under way, then another
    every `every` seconds until the store answers once. A store then found ignoring
    conditions stops serve (`refuse`), as it would have been refused at start."""
    answer: Callable[[], str | None] = probing.result
    while True:
        try:
            problem = answer()
            break
        except StoreUnavailable:
            time.sleep(every)
            answer = functools.partial(probe_store, store)
    if problem:
        refuse(problem)
    else:
        log.info("event=store.probed conditions=honoured late=yes")


def cmd_serve(args: argparse.Namespace) -> int:
    import waitress

    cfg = load_app_config(args.config)
    setup_logging(cfg.log_level)
    pager = build_pager(cfg)
    probing = IO_POOL.submit(probe_store, pager.store)
    for problem in local_file_problems(cfg):
        log.error("event=serve.unwritable problem=%s", log_value(problem, 400))
    initialise_if_empty(cfg, pager)
    try:
        pager.team.read()
    except (NoConfig, StoreUnavailable, ConfigError) as e:
        # Never exit for a config: a restart loop answers nobody. Calls are answered and
        # their pages wait (Pages.wait_for_config); the worker reads the config again every
        # poll_interval; /healthz says config-invalid meanwhile.
        log.error("event=serve.degraded problem=%s", log_value(str(e), 300))
    if cfg.dry_run:
        telephony: Telephony = DryRunTelephony(pager.store)
    else:
        telephony = LiveTelephony(cfg)
        telephony.warm_up()
    worker = Worker(pager, telephony)
    with contextlib.suppress(NoConfig, ConfigError, StoreUnavailable):
        pager.team.reconcile()
    probe_later = probe_at_start(probing, pager.team.reachable)
    server = waitress.create_server(
        WebApp(cfg, pager, worker), host=cfg.host, port=cfg.port, threads=cfg.threads,
        max_request_body_size=WAITRESS_BODY_LIMIT, ident="oncall-pager")

    refused: list[str] = []

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    def refuse(problem: str) -> None:
        refused.append(problem)
        log.error("event=serve.refused problem=%s", log_value(problem, 400))
        print(f"error: {problem}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if probe_later:
        threading.Thread(target=probe_until_answered, name="probe", daemon=True,
                         args=(pager.store, probing, cfg.poll_interval, refuse)).start()
    # The systemd watchdog kills a stuck pager with SIGABRT: every thread's stack goes to
    # the journal first, to show where it was stuck.
    faulthandler.enable()
    notifier = ServiceNotifier(pager, worker)
    ready_for_requests()
    worker.start()
    log.info("event=serve.started host=%s port=%s store=%s mode=%s version=%s", cfg.host,
             server.effective_port, pager.store.describe(), cfg.mode, VERSION)
    notifier.start()
    try:
        server.run()
    finally:
        notifier.stop()
        worker.stop()
        server.close()
        log.info("event=serve.stopped")
    return 1 if refused else 0  # waitress's run() takes the SystemExit of stop() itself


def load_json_file(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"{path}: not valid JSON: {e}"]) from None
    errors, _ = check_oncall_config(doc)
    if errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    return doc


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when both configs are valid and the store honours conditional writes
    (probe_store; warnings are printed), 1 with a line per error."""
    cfg = load_app_config(args.config)
    warnings = []
    mode = os.stat(args.config).st_mode
    own = ConfigParser(interpolation=None)
    own.read(args.config, encoding="utf-8")
    # In dry-run mode the Twilio tokens reach nobody (the example file's is a placeholder).
    secrets_held = ([] if cfg.dry_run else [("twilio", "auth_token"),
                                            ("twilio", "auth_token_secondary")])
    if mode & 0o044 and any(own.get(section, key, fallback="").strip() for section, key in (
            *secrets_held, ("server", "metrics_token"))):
        warnings.append(f"{args.config} holds secrets and is readable by others "
                        f"(mode {mode & 0o777:o}; chmod 600 it)")
    local = local_file_problems(cfg)
    store = open_store(cfg)
    try:
        blob = store.get(cfg.config_key)
    except StoreUnavailable as e:
        raise ConfigError([*local, f"store {store.describe()} is unreachable: {e}"]) from None
    if blob is None:
        raise ConfigError([*local, f"store {store.describe()} holds no {cfg.config_key} "
                           "(put one there with: oncall-pager init)"])
    try:
        doc = json.loads(blob.data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([*local, f"{cfg.config_key}: not valid JSON: {e}"]) from None
    errors, more = check_oncall_config(doc)
    try:
        ignored = probe_store(store)
    except StoreUnavailable as e:
        ignored = (f"store {store.describe()} could not be probed for conditional writes (a "
                   f"write under probe/ failed: {e})")
    for line in warnings + more:
        print(f"warning: {line}", file=sys.stderr)
    if local or errors or ignored:
        raise ConfigError(local + errors + ([ignored] if ignored else []))
    print(f"ok: {args.config} and {store.describe()}{cfg.config_key} are valid "
          f"({len(members(doc))} members, on call: {oncall_member(doc)['id']})")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    cfg = load_app_config(args.config)
    source = args.file or (str(resolve_path(cfg, cfg.init_from)) if cfg.init_from else "")
    if not source:
        raise UsageError("init needs a JSON file (or [store] init_from in config.ini)")
    doc = load_json_file(Path(source))
    pager = build_pager(cfg)
    try:
        pager.team.initialise(doc, actor=operator(args))
    except StoreConflict:
        raise UsageError(f"{pager.store.describe()} already holds {cfg.config_key}; refusing "
                         "to overwrite it (use oncall-pager config edit)") from None
    print(f"initialised {pager.store.describe()}{cfg.config_key} from {source}")
    return 0


def operator(args: argparse.Namespace) -> str:
    return getattr(args, "as_member", None) or getpass.getuser()


def post_webhook(cfg: AppConfig, base_url: str, path: str,
                 params: dict[str, str]) -> tuple[int, str]:
    """Post a form the way Twilio does: signed over public_url + path (with its query)."""
    from twilio.request_validator import RequestValidator

    signature = RequestValidator(cfg.auth_token).compute_signature(cfg.url(path), params)
    request = urllib.request.Request(
        base_url.rstrip("/") + path, data=urllib.parse.urlencode(params).encode(),
        headers={"X-Twilio-Signature": signature,
                 "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except OSError as e:
        raise UsageError(f"cannot reach {base_url}: {getattr(e, 'reason', e)}") from None


def server_url(cfg: AppConfig, url: str | None) -> str:
    return url or f"http://{cfg.host}:{cfg.port}"


def twiml_messages(body: str) -> list[str]:
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return []
    return [(m.text or "").strip() for m in root.iter("Message")]


def cmd_sms(args: argparse.Namespace) -> int:
    cfg = load_app_config(args.config)
    if not is_e164(args.sender):
        raise UsageError(f"FROM {args.sender!r} is not an E.164 number (+ and the country "
                         "code, like +19195551002)")
    params = {"MessageSid": "SM" + uuid.uuid4().hex, "AccountSid": cfg.account_sid,
              "From": args.sender, "Body": args.body, "NumMedia": "0"}
    status, body = post_webhook(cfg, server_url(cfg, args.url), "/msgcontrol/entry", params)
    if status != 200:
        raise UsageError(f"the pager answered {status}: {body.strip()[:200]}")
    replies = twiml_messages(body)
    print("\n".join(replies) if replies else "(no reply)")
    return 0


def local_path(cfg: AppConfig, url: str) -> str:
    """A callback URL the app gave Twilio, as a path for post_webhook."""
    return url[len(cfg.public_url.rstrip("/")):] if url.startswith(cfg.public_url) else url


def cmd_call(args: argparse.Namespace) -> int:
    """Walk the voicemail flow as Twilio would, printing each TwiML step; with --digits 2
    and live answer, the engineer's side too: the whisper, then 1 (--accept), no answer
    (--no-answer), or answered without a key (neither: a personal voicemail)."""
    import xml.etree.ElementTree as ElementTree

    if (args.accept or args.no_answer) and args.digits != "2":
        raise UsageError(f"{'--accept' if args.accept else '--no-answer'} is the engineer's "
                         "side of a live call: it needs --digits 2")
    cfg = load_app_config(args.config)
    base = server_url(cfg, args.url)
    call = {"CallSid": "CA" + uuid.uuid4().hex, "AccountSid": cfg.account_sid,
            "From": args.sender, "To": "", "CallStatus": "in-progress", "Direction": "inbound"}

    def step(title: str, path: str, params: dict[str, str]) -> str:
        status, body = post_webhook(cfg, base, path, params)
        print(f"--- {title}: POST {path} -> {status}\n{body.strip()}")
        if status != 200:
            raise UsageError(f"the pager answered {status} to {path}")
        return body

    step("the call comes in", "/public/answer", call)
    body = step(f"caller presses {args.digits}", "/public/keypress",
                {**call, "Digits": args.digits})
    while (dial := ElementTree.fromstring(body).find("Dial")) is not None:
        # live answer: the engineer's leg hears the whisper; --accept presses 1
        number = dial.find("Number")
        leg = {"CallSid": "CA" + uuid.uuid4().hex, "ParentCallSid": call["CallSid"],
               "AccountSid": cfg.account_sid, "From": dial.get("callerId", ""),
               "To": (number.text or "").strip() if number is not None else "",
               "CallStatus": "in-progress", "Direction": "outbound-dial"}
        accepted = False
        if number is not None and not args.no_answer:
            whisper = step(f"{leg['To']} answers and hears", local_path(
                cfg, number.get("url", "")), leg)
            gather = ElementTree.fromstring(whisper).find("Gather")
            if args.accept and gather is not None:
                step(f"{leg['To']} presses 1", local_path(cfg, gather.get("action", "")),
                     {**leg, "Digits": "1"})
                accepted = True
        outcome = "completed" if accepted or not args.no_answer else "no-answer"
        body = step(f"the dial ends ({outcome})", local_path(cfg, dial.get("action", "")), {
            **call, "DialCallStatus": outcome, "DialCallSid": leg["CallSid"],
            "DialCallDuration": "30" if accepted else "0"})
        if accepted:
            print("--- the caller and the engineer talked; the page is acknowledged")
            return 0
    record = ElementTree.fromstring(body).find("Record")
    if record is None:
        print("--- the pager hung up; no recording")
        return 0
    sid = "RE" + uuid.uuid4().hex
    recording = {"RecordingSid": sid, "RecordingDuration": str(args.seconds),
                 "RecordingUrl": f"{cfg.api_base_url.rstrip('/')}/2010-04-01/Accounts/"
                                 f"{cfg.account_sid}/Recordings/{sid}"}
    step("the caller hangs up after the message", local_path(cfg, record.get("action", "")),
         {**call, **recording, "Digits": "hangup"})
    step("Twilio reports the recording", local_path(
        cfg, record.get("recordingStatusCallback", "")), {
        **recording, "CallSid": call["CallSid"], "AccountSid": cfg.account_sid,
        "RecordingStatus": "completed", "RecordingChannels": "1",
        "RecordingSource": "RecordVerb"})
    if cfg.dry_run:
        print(f"--- dry-run: the page's MMS and e-mail go to outbox/, the recording to "
              f"recordings/ in {cfg.store_url}")
    return 0


# `config set` keys: name -> (path in the document, parser of the command-line value)
def parse_bool_value(text: str) -> bool:
    return bool(parse_setting(text, bool))


SETTABLE: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "from_phone": (("from_phone",), str),
    "pager_phone": (("pager_phone",), str),
    "session_lifetime": (("session_lifetime",), int),
    "team_name": (("team_name",), str),
    "timezone": (("timezone",), str),
    "transcribe": (("transcribe",), parse_bool_value),
    "live_answer.enabled": (("live_answer", "enabled"), parse_bool_value),
    "live_answer.ring_seconds": (("live_answer", "ring_seconds"), int),
    "live_answer.max_targets": (("live_answer", "max_targets"), int),
    "live_answer.record": (("live_answer", "record"), parse_bool_value),
    "greeting": (("greeting",), str),
    "voice.name": (("voice", "name"), str),
    "voice.language": (("voice", "language"), str),
    "oncall": (("oncall_user",), lambda v: {"id": v}),
    "mail.from_email": (("mail_settings", "from_email"), str),
    "mail.to_email": (("mail_settings", "to_email"), str),
    "mail.mail_server": (("mail_settings", "mail_server"), str),
    "mail.mail_port": (("mail_settings", "mail_port"), int),
    "mail.mail_use_tls": (("mail_settings", "mail_use_tls"), parse_bool_value),
    "mail.mail_username": (("mail_settings", "mail_username"), str),
    "mail.mail_password": (("mail_settings", "mail_password"), str),
    "escalation.ack_timeout": (("escalation", "ack_timeout"), float),
    "escalation.call_attempts": (("escalation", "call_attempts"), int),
    "escalation.escalate_to": (("escalation", "escalate_to"),
                               lambda v: [m.strip() for m in v.split(",") if m.strip()]),
    "escalation.max_outbound_per_hour": (("escalation", "max_outbound_per_hour"), int),
    "escalation.alert_pages_per_hour": (("escalation", "alert_pages_per_hour"), int),
    "rotation.members": (("rotation", "members"),
                         lambda v: [m.strip() for m in v.split(",") if m.strip()]),
    "rotation.start": (("rotation", "start"), str),
    "rotation.timezone": (("rotation", "timezone"), str),
    "rotation.shift_hours": (("rotation", "shift_hours"), float),
    "rotation.remind_hours": (("rotation", "remind_hours"), float),
}


def masked(doc: dict) -> dict:
    shown = copy.deepcopy(doc)
    mail = shown.get("current_config", {}).get("mail_settings", {})
    if mail.get("mail_password"):
        mail["mail_password"] = "********"
    for hook in webhooks(shown):
        if isinstance(hook, dict):  # the secret signs; a chat URL is a credential itself
            hook.update(secret="********", url=url_shown(hook.get("url")))
    return shown


def url_shown(url: object) -> str:
    """A push or webhook URL as listings show it: where it goes, not its token."""
    parts = urllib.parse.urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}/..." if parts.path.strip("/") else str(url)


PUSH_KEY = re.compile(r"members\.([A-Za-z0-9_.-]+)\.push")
NO_PUSH = ("", "off", "none", "-")


def set_push(pager: Pager, args: argparse.Namespace, member_id: str) -> int:
    """`config set members.ID.push URL` (or `off`): a member's push topic (see Push)."""
    url = args.value.strip()
    problem = outbound_url_problem(url) if url.lower() not in NO_PUSH else ""
    if problem:
        raise UsageError(f"members.{member_id}.push {url!r} {problem}")

    def set_value(doc: dict) -> str:
        member = members(doc).get(member_id)
        if member is None:
            raise UsageError(f"there is no member {member_id!r}")
        if url.lower() in NO_PUSH:
            member.pop("push", None)
            return f"removed {member_id}'s push topic"
        member["push"] = url
        return f"set members.{member_id}.push = {url_shown(url)}"
    return change_config(pager, args, set_value)



def handed_over_to(before: dict, after: dict) -> None:
    """Say so when a change made a handoff (see Team.handoff_with_change): the operator
    learns that on-call moved, and that the texts wait for a running pager to send them."""
    oncall = oncall_member(after)
    if oncall["id"] != oncall_id_of(before):
        print(f"handed over to {oncall['id']} ({oncall['name']}), whose shift it is now; "
              "a running pager sends the handoff texts")


def change_config(pager: Pager, args: argparse.Namespace,
                  change: Callable[[dict], str]) -> int:
    """Read, change a copy, write conditionally over what was read (validated, audited).
    A change that lost the race to another writer is made again over the new version (so
    two operators adding members at once both succeed), and checked again: a member added
    meanwhile with the same id is refused then. `config edit` never does this: a person
    made that change while looking at the old version."""
    for attempt in range(CONFIG_CHANGE_TRIES):
        snap = pager.team.read()
        if snap.stale:
            raise StoreUnavailable(pager.team.problem)
        doc = copy.deepcopy(snap.doc)
        what = change(doc)
        told, details, oncall_by = pager.oncall.handoff_with_change(doc,
                                                                    {"via": "cli", "change": what})
        try:
            written = pager.team.write(doc, base=snap, actor=operator(args), details=details,
                                       messages=told, oncall_by=oncall_by)
        except StoreConflict:
            if attempt + 1 < CONFIG_CHANGE_TRIES:
                time.sleep(0.05 + secrets.randbelow(200) / 1000)
            continue
        print(what)
        if oncall_by:
            handed_over_to(snap.doc, written.doc)
        return 0
    raise UsageError(f"the config kept changing in the store ({CONFIG_CHANGE_TRIES} tries); "
                     "nothing was written, run the command again")


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    if args.action == "show":
        doc = pager.team.read().doc
        print(json.dumps(masked(doc), indent=2, sort_keys=True))
        # for the reader, beside the JSON (which stays the config, for jq and config edit)
        print(pager.contacts.summary(doc), file=sys.stderr)
        return 0
    if args.action == "user-add":
        def add(doc: dict) -> str:
            if args.id in members(doc):
                raise UsageError(f"member {args.id!r} exists already")
            members(doc)[args.id] = {"id": args.id, "name": args.name, "phone": args.phone}
            return f"added member {args.id} ({args.name} <{args.phone}>)"
        return change_config(pager, args, add)
    if args.action == "user-remove":
        def remove(doc: dict) -> str:
            if args.id not in members(doc):
                raise UsageError(f"there is no member {args.id!r}")
            if oncall_member(doc)["id"] == args.id:
                raise UsageError(f"{args.id} is on call; make somebody else on call first "
                                 "(TAKE, or config set oncall ID), then remove")
            del members(doc)[args.id]
            escalation = doc["current_config"].get("escalation", {})
            if args.id in (escalation.get("escalate_to") or []):
                escalation["escalate_to"].remove(args.id)
            return f"removed member {args.id}"
        return change_config(pager, args, remove)
    if args.action == "set":
        if PUSH_KEY.fullmatch(args.key):
            return set_push(pager, args, PUSH_KEY.fullmatch(args.key).group(1))
        if args.key not in SETTABLE:
            raise UsageError(f"unknown key {args.key!r}; settable: {', '.join(SETTABLE)}")
        path, parse = SETTABLE[args.key]

        def set_value(doc: dict) -> str:
            try:
                value = parse(args.value)
            except ValueError:
                raise UsageError(f"{args.key}: {args.value!r} is not a valid value") from None
            if path[0] == "rotation" and not doc["current_config"].get("rotation"):
                raise UsageError("there is no rotation block to change; add one with "
                                 "`oncall-pager config edit` (members, start, timezone, "
                                 "shift_hours: see docs/features.md)")
            target = doc["current_config"]
            for name in path[:-1]:
                target = target.setdefault(name, {})
            target[path[-1]] = value
            shown = "********" if args.key == "mail.mail_password" else args.value
            return f"set {args.key} = {shown}"
        return change_config(pager, args, set_value)
    if args.action == "edit":
        return config_edit(pager, args)
    return config_history(pager, args)


def cmd_integration(args: argparse.Namespace) -> int:
    """Routing keys for monitoring (the Events API and heartbeats): a new key is printed
    once; the config keeps only its SHA-256, so neither the store nor a backup of it can
    page."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    if args.action == "list":
        found = integrations(pager.team.read().doc)
        if not found:
            print("no integrations (add one with: oncall-pager integration add NAME)")
        for name, integration in sorted(found.items()):
            created = integration.get("created")
            print(f"{name:<24} created {short_time(created) if created else '-'}"
                  + ("  heartbeats only" if integration.get("heartbeats_only") else ""))
        return 0
    if not NAME.fullmatch(args.name):
        raise UsageError(f"{args.name!r} is not a name (letters, digits, . _ -; at most 64)")
    key = secrets.token_hex(16)
    pings_only = getattr(args, "heartbeats_only", False)

    def add(doc: dict) -> str:
        added = doc["current_config"].setdefault("integrations", {})
        if args.name in added:
            raise UsageError(f"integration {args.name!r} exists already (remove it first to "
                             "change its key)")
        added[args.name] = {"key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                            "created": int(time.time())}
        if pings_only:
            added[args.name]["heartbeats_only"] = True
            return f"added integration {args.name} (heartbeats only)"
        return f"added integration {args.name}"

    def remove(doc: dict) -> str:
        if args.name not in integrations(doc):
            raise UsageError(f"there is no integration {args.name!r}")
        del doc["current_config"]["integrations"][args.name]
        return f"removed integration {args.name}; its routing key no longer works"

    if change_config(pager, args, add if args.action == "add" else remove) == 0 and \
            args.action == "add":
        print(f"routing key: {key}")
        if pings_only:
            print("It is shown only this once: put it into the cron line now (curl "
                  f"{cfg.url('/heartbeat/NAME')}?key=KEY); it cannot send events.")
        else:
            print("It is shown only this once: put it into the monitor now "
                  f"(events: {cfg.url('/v2/enqueue')}).")
    return 0


def cmd_feed_token(args: argparse.Namespace) -> int:
    """`calendar-token` / `status-token`: a new random token for the calendar feed or the
    status page, printed once in its URL; the config keeps only its SHA-256 (one conditional
    write and its audit entry), and the previous token stops working."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    token = secrets.token_urlsafe(24)

    def make(doc: dict) -> str:
        tokens = doc["current_config"].setdefault("feed_tokens", {})
        replaced = args.feed in tokens
        tokens[args.feed] = {"sha256": hashlib.sha256(token.encode()).hexdigest(),
                             "created": int(time.time())}
        return f"made a new {args.feed} token" + ("; the previous one no longer works"
                                                   if replaced else "")

    change_config(pager, args, make)
    path = f"/calendar/{token}.ics" if args.feed == "calendar" else f"/status/{token}"
    print(f"{args.feed} URL: {cfg.url(path)}")
    print("It is shown only this once: whoever has the URL can read "
          + ("the on-call schedule." if args.feed == "calendar" else
             "the status page (who is on call, the pages and their callers)."))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The status page in the terminal (StatusBoard, as GET /status/TOKEN shows it)."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    snap = pager.team.read()
    board = StatusBoard(pager)
    sys.stdout.write(board.text(board.gather(snap.doc, time.time())))
    if snap.stale:
        print(f"warning: the store's config could not be read ({pager.team.problem}); "
              "this is the last copy known here", file=sys.stderr)
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    """The team's webhooks (see Webhooks): `add` prints the new signing secret once; the
    config keeps it (it must sign), masked wherever the config is shown."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    if args.action == "list":
        found = webhooks(pager.team.read().doc)
        if not found:
            print("no webhooks (add one with: oncall-pager webhook add NAME URL)")
        for hook in found:
            print(f"{hook.get('name'):<24} {hook.get('format', 'json'):<6} "
                  f"{url_shown(hook.get('url'))}  {','.join(hook.get('events', []))}")
        return 0
    if not NAME.fullmatch(args.name):
        raise UsageError(f"{args.name!r} is not a name (letters, digits, . _ -; at most 64)")
    if args.action == "remove":
        def remove(doc: dict) -> str:
            kept = [h for h in webhooks(doc) if h.get("name") != args.name]
            if len(kept) == len(webhooks(doc)):
                raise UsageError(f"there is no webhook {args.name!r}")
            doc["current_config"]["webhooks"] = kept
            return f"removed webhook {args.name}"
        return change_config(pager, args, remove)
    problem = outbound_url_problem(args.url)
    if problem:
        raise UsageError(f"webhook URL {args.url!r} {problem}")
    events = [e.strip() for e in (args.events or ",".join(WEBHOOK_EVENTS)).split(",")
              if e.strip()]
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if unknown or not events:
        raise UsageError(f"--events {','.join(unknown) or '(none)'}: choose from "
                         f"{','.join(WEBHOOK_EVENTS)}")
    secret = secrets.token_hex(32)

    def add(doc: dict) -> str:
        if any(h.get("name") == args.name for h in webhooks(doc)):
            raise UsageError(f"webhook {args.name!r} exists already (remove it first)")
        doc["current_config"]["webhooks"] = [*webhooks(doc), {
            "name": args.name, "url": args.url, "events": events, "format": args.format,
            "secret": secret}]
        return f"added webhook {args.name} ({args.format}: {','.join(events)})"

    change_config(pager, args, add)
    print(f"secret: {secret}")
    print("It is shown only this once. Each POST carries X-Oncall-Signature: sha256=HEX, "
          "the HMAC-SHA256 of the body keyed with this secret.")
    return 0


def config_edit(pager: Pager, args: argparse.Namespace) -> int:
    """$EDITOR on the JSON as stored (so an invalid config can be repaired here too);
    validated and written conditionally over what was read, or nothing is written."""
    blob = pager.store.get(pager.team.key)
    if blob is None:
        raise NoConfig(f"{pager.store.describe()} holds no {pager.team.key} "
                       "(put one there with: oncall-pager init)")
    try:
        stored: object = json.loads(blob.data)
        text = json.dumps(stored, indent=2, sort_keys=True)
    except (UnicodeDecodeError, json.JSONDecodeError):
        stored, text = None, blob.data.decode("utf-8", "replace")
    snap = Snapshot(stored if isinstance(stored, dict) else {}, blob.etag)
    fd, name = tempfile.mkstemp(prefix="oncall_config.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    if subprocess.call([*shlex.split(editor), name]) != 0:
        raise UsageError(f"the editor failed; nothing was written (your edit: {name})")
    try:
        doc = json.loads(Path(name).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"not valid JSON ({e}); nothing was written (your edit: {name})"
                         ) from None
    if doc == snap.doc:
        os.unlink(name)
        print("no change")
        return 0
    told, details, oncall_by = pager.oncall.handoff_with_change(doc, {"via": "cli edit"})
    try:
        written = pager.team.write(doc, base=snap, actor=operator(args), details=details,
                                   messages=told, oncall_by=oncall_by)
    except ConfigError as e:
        raise ConfigError([*e.problems, f"nothing was written (your edit: {name})"]) from None
    except StoreConflict:
        raise UsageError("the config changed in the store while you edited it; nothing was "
                         f"written (your edit: {name})") from None
    os.unlink(name)
    print("config written")
    if oncall_by:
        handed_over_to(snap.doc, written.doc)
    return 0


def config_history(pager: Pager, args: argparse.Namespace) -> int:
    """Previous versions when the bucket keeps them; otherwise the audit log's config events."""
    store = pager.store
    if isinstance(store, S3Store):
        answer = store._call("list_object_versions", Prefix=store.prefix + pager.team.key) or {}
        versions = [v for v in answer.get("Versions", [])
                    if v["Key"] == store.prefix + pager.team.key]
        if len(versions) > 1 or (versions and versions[0].get("VersionId") not in (None,
                                                                                    "null")):
            for v in versions:
                print(f"{v['LastModified']:%Y-%m-%d %H:%M:%S}  {v['VersionId']}  "
                      f"{v['Size']} bytes{'  (current)' if v.get('IsLatest') else ''}")
            return 0
    events = [e for e in pager.audit.entries() if e.get("event") in (
        "config.initialised", "config.changed", "oncall.changed")]
    if not events:
        print("no config changes recorded")
    for e in events:
        print(f"{e['time']}  {e['event']:<18} {e['actor']:<12} {json.dumps(e['details'])}")
    return 0


def parse_since(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r} is not a date like 2026-11-26") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = load_app_config(args.config)
    since = parse_since(args.since) if args.since else None
    entries = build_pager(cfg).audit.entries(limit=args.n, since=since)
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    for e in entries:
        details = " ".join(f"{k}={json.dumps(v)}" for k, v in e.get("details", {}).items())
        print(f"{e.get('time', '')}  {e.get('event', ''):<20} {e.get('actor', ''):<10} {details}")
    return 0


REPORT_READERS = 32    # audit entries `report` reads at once
REPORT_MAX_DAYS = 366  # the longest range one report reads
REPORT_EVENTS = ("page.opened", "page.acknowledged", "page.escalated", "page.resolved",
                 "page.closed", "oncall.changed")
NIGHT = (22, 7)        # pages opened from 22:00 to 07:00 local time count as at night


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with `share` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class Report:
    """`oncall-pager report`: what happened to each page opened in a range, time to
    acknowledge, pages at night and on-call hours per member, from the audit log alone. Its
    keys say what the report needs (audit_key_facts), so it LISTs each UTC day's prefix once
    (REPORT_READERS days at a time) and reads no entry but those written before keys said
    it. Who was on call when the range starts is the `from` of its first on-call change; with
    none in the range, the days after it are listed until one is found, or the config says
    who is on call now."""

    def __init__(self, store: Store, doc: dict, start: float, end: float):
        self.store, self.doc, self.start, self.end = store, doc, start, end
        self.zone = team_zone(doc)
        self.pages: dict[str, dict] = {}
        self.changes: list[dict] = []  # oncall.changed entries in the range, oldest first
        self.hours: dict[str, float] = {}

    def read(self) -> Report:
        # the pages first: another instance's clock may put an acknowledgement a moment
        # before the opening it acknowledges
        for entry in sorted(self._entries(self.start, self.end),
                            key=lambda e: e["event"] != "page.opened"):
            self._take(entry)
        self.hours = self._oncall_hours(self._oncall_at_start())
        return self

    def _entries(self, start: float, end: float) -> list[dict]:
        with ThreadPoolExecutor(REPORT_READERS, thread_name_prefix="report") as pool:
            keys = [key for day in pool.map(lambda d: self.store.list(f"audit/{d}/"),
                                            utc_days(start, end)) for key in day]
            told = [(key, audit_key_facts(key)) for key in keys]
            found = [facts for _, facts in told if facts is not None]
            found += [entry for entry in pool.map(self._read_entry, [
                key for key, facts in told if facts is None]) if entry is not None]
        return sorted((e for e in found if e["event"] in REPORT_EVENTS
                       and start <= e["time"] < end), key=lambda e: e["time"])

    def _read_entry(self, key: str) -> dict | None:
        """An entry written before its key told what it was."""
        found = read_json(self.store, key)
        entry = found[0] if found else None
        if (entry is None or not isinstance(entry.get("time"), str)
                or not isinstance(entry.get("details"), dict)):
            return None
        try:
            when = dt.datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
        return {"time": when, "event": entry.get("event"), "actor": str(entry.get("actor")),
                "details": {k: str(v) for k, v in entry["details"].items()}}

    def _take(self, entry: dict) -> None:
        event, details, when = entry["event"], entry["details"], entry["time"]
        if event == "oncall.changed":
            self.changes.append({"time": when, "from": details.get("from", ""),
                                 "to": details.get("to", "")})
            return
        page_id = details.get("page", "")
        if event == "page.opened":
            self.pages.setdefault(page_id, {
                "id": page_id, "number": "", "kind": details.get("kind", ""), "opened": when,
                "acked_by": "", "acked": None, "via": "", "steps": 0, "ended": "",
                "ended_at": None})
            return
        page = self.pages.get(page_id)
        if page is None:  # opened before the range
            return
        if details.get("number", "").isdigit():
            page["number"] = details["number"]
        if event == "page.acknowledged" and page["acked"] is None:
            page["acked"], page["acked_by"] = when, entry["actor"]
            page["via"] = details.get("via", "")
        elif event == "page.escalated":
            page["steps"] += 1
        elif event in ("page.resolved", "page.closed") and not page["ended"]:
            page["ended"], page["ended_at"] = event.removeprefix("page."), when

    def _oncall_at_start(self) -> str:
        if self.changes:
            return self.changes[0]["from"]
        day, now = self.end, time.time()
        while day < now:  # the first change after the range says who had it
            later = [e for e in self._entries(day, min(day + 7 * DAY, now))
                     if e["event"] == "oncall.changed"]
            if later:
                return later[0]["details"].get("from", "")
            day += 7 * DAY
        return oncall_id_of(self.doc)

    def _oncall_hours(self, first: str) -> dict[str, float]:
        hours: dict[str, float] = {}
        holder, since = first, self.start
        for change in [*self.changes, {"time": min(self.end, time.time()), "to": ""}]:
            if holder:
                hours[holder] = hours.get(holder, 0.0) + (change["time"] - since) / 3600
            holder, since = change["to"], change["time"]
        return hours

    def rows(self) -> list[dict]:
        return sorted(self.pages.values(), key=lambda p: p["opened"])

    def local(self, ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, self.zone).strftime("%Y-%m-%d %H:%M")

    def at_night(self, page: dict) -> bool:
        hour = dt.datetime.fromtimestamp(page["opened"], self.zone).hour
        return hour >= NIGHT[0] or hour < NIGHT[1]

    def to_ack(self, page: dict) -> float | None:
        """Seconds from opening to the first acknowledgement; a live call is answered by
        the engineer who acknowledges it, so it does not count."""
        if page["acked"] is None or page["via"] == "live":
            return None
        return max(0.0, page["acked"] - page["opened"])

    def totals(self) -> list[str]:
        rows = self.rows()
        kinds: dict[str, int] = {}
        for page in rows:
            kinds[page["kind"]] = kinds.get(page["kind"], 0) + 1
        waits = [w for w in map(self.to_ack, rows) if w is not None]
        lines = [f"{len(rows)} page{'' if len(rows) == 1 else 's'}" + (": " + ", ".join(
            f"{n} {kind}" for kind, n in sorted(kinds.items())) if rows else "")]
        if waits:
            lines.append(f"time to acknowledge ({len(waits)} pages): median "
                         f"{duration_text(statistics.median(waits))}, 90th percentile "
                         f"{duration_text(percentile(waits, 0.9))}")
        else:
            lines.append("time to acknowledge: no page was acknowledged")
        lines.append(f"at night ({NIGHT[0]:02d}:00-{NIGHT[1]:02d}:00 {self.zone.key}): "
                     f"{sum(map(self.at_night, rows))}")
        lines.append("on-call hours: " + (", ".join(
            f"{member} {hours:.1f}" for member, hours in sorted(self.hours.items()))
            or "nobody"))
        return lines

    def print_text(self) -> None:
        print(f"Pages opened from {self.local(self.start)} to {self.local(self.end)} "
              f"({self.zone.key})")
        for page in self.rows():
            wait = self.to_ack(page)
            ended = f"{page['ended']} {self.local(page['ended_at'])}" if page["ended"] else "-"
            print(f"#{page['number'] or '-'}  {self.local(page['opened'])}  {page['kind']:<9} "
                  f"acked_by={page['acked_by'] or '-'}  "
                  f"to_ack={duration_text(wait) if wait is not None else '-'}  "
                  f"steps={page['steps']}  ended={ended}")
        print("\n".join(self.totals()))

    def print_csv(self) -> None:
        """Two tables, each with its header row: the pages, then the on-call hours."""
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["number", "page", "kind", "opened", "acked_by", "seconds_to_ack",
                      "escalation_steps", "ended", "ended_at", "at_night"])
        for page in self.rows():
            wait = self.to_ack(page)
            out.writerow([page["number"], page["id"], page["kind"], iso_time(page["opened"]),
                          page["acked_by"], "" if wait is None else round(wait), page["steps"],
                          page["ended"], iso_time(page["ended_at"]) if page["ended_at"] else "",
                          int(self.at_night(page))])
        out.writerow([])
        out.writerow(["member", "oncall_hours"])
        for member, hours in sorted(self.hours.items()):
            out.writerow([member, f"{hours:.2f}"])


def utc_days(start: float, end: float) -> list[str]:
    """The audit log's day prefixes (YYYY/MM/DD, UTC) from `start` up to `end`."""
    day = dt.datetime.fromtimestamp(start, dt.UTC).date()
    last = dt.datetime.fromtimestamp(max(start, end - 0.001), dt.UTC).date()
    days = []
    while day <= last:
        days.append(day.strftime("%Y/%m/%d"))
        day += dt.timedelta(days=1)
    return days


def report_range(args: argparse.Namespace, zone: zoneinfo.ZoneInfo) -> tuple[float, float]:
    """--from and --to are whole local days, both included; by default the last 30."""
    def day(text: str, option: str) -> dt.date:
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            raise UsageError(f"{option} {text!r} is not a date like 2026-11-26") from None

    last = day(args.to, "--to") if args.to else dt.datetime.now(zone).date()
    first = day(args.since, "--from") if args.since else last - dt.timedelta(days=29)
    if first > last:
        raise UsageError(f"--from {first} is after --to {last}")
    if (last - first).days >= REPORT_MAX_DAYS:
        raise UsageError(f"give at most {REPORT_MAX_DAYS} days (from {first} to {last} is "
                         f"{(last - first).days + 1})")
    start = dt.datetime.combine(first, dt.time(), zone).timestamp()
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), zone).timestamp()
    return start, end


def cmd_report(args: argparse.Namespace) -> int:
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    doc = pager.team.read().doc
    start, end = report_range(args, team_zone(doc))
    report = Report(pager.store, doc, start, end).read()
    if args.csv:
        report.print_csv()
    else:
        report.print_text()
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """A test text (and with --call a test call) to a member, sent at once from here; the
    member's OK (or 1) is recorded by the running pager."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    doc = pager.team.read().doc
    member = members(doc).get(args.member)
    if member is None:
        raise UsageError(f"there is no member {args.member!r}")
    current = doc["current_config"]
    telephony = DryRunTelephony(pager.store) if cfg.dry_run else LiveTelephony(cfg)
    pager.contacts.tested(member["id"], "call" if args.call else "sms", operator(args))
    try:
        if not member.get("opted_out"):
            telephony.send_sms(member["phone"], current["from_phone"], CONTACT_TEST_TEXT)
        if args.call:
            telephony.place_call(member["phone"], current["pager_phone"],
                                 cfg.url("/oncall/test"), "")
    except DeliveryError as e:
        raise UsageError(f"Twilio refused the test: {e}") from None
    what = ("a test text" if not member.get("opted_out") else "no text (opted out)") + (
        " and a test call" if args.call else "")
    print(f"sent {what} to {member['name']} <{member['phone']}>; their OK (or 1) within "
          f"{CONTACT_TEST_HOURS} h is recorded by the running pager (config show lists it)")
    return 0


def cmd_pages(args: argparse.Namespace) -> int:
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    found_pages: dict[str, dict] = {}
    # pages-done/ first: a page being moved is in both for a moment, and pages/ has it current
    done = [] if args.open else pager.store.list(DONE_PAGES)
    for key in done + pager.store.list("pages/"):
        found = read_json(pager.store, key)
        if found and (not args.open or found[0].get("state") == "open"):
            found_pages[found[0].get("id", key)] = found[0]
    pages = sorted(found_pages.values(), key=lambda p: p.get("opened", 0))
    if args.json:
        print(json.dumps(pages, indent=1))
        return 0
    if not pages:
        print("no open pages" if args.open else "no pages")
    for p in pages:
        deliveries = ",".join(
            f"{c}:{d['state']}" + (f"({d['code']} {d.get('reason') or 'error'})"
                                   if d.get("code") else "")
            for c, d in p.get("deliveries", {}).items())
        print(f"#{p.get('number') or '-'}  {short_time(p.get('opened', 0))}  "
              f"{p.get('state', ''):<12} {page_summary(p)}  "
              f"oncall={p.get('oncall', {}).get('id') or '-'}  "
              f"acked_by={p.get('acked_by') or '-'}  {deliveries}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """The current shift and the next ones (overrides included): local start, UTC start,
    member."""
    if not 1 <= args.n <= 1000:
        raise UsageError(f"-n {args.n}: give a number of shifts from 1 to 1000")
    cfg = load_app_config(args.config)
    doc = build_pager(cfg).team.read().doc
    now = time.time()
    shifts = next_shifts(doc, now, args.n)
    if not shifts:
        print(NO_ROTATION_TEXT)
        return 0
    oncall, zone = oncall_member(doc), team_zone(doc)
    # a TAKE (or `config set oncall`) after this shift's handoff holds until the next one:
    # said here too, so that `schedule` and WHO tell the same (a handoff due is made at once)
    for shift in shifts:
        member = members(doc)[shift.member]
        utc = dt.datetime.fromtimestamp(shift.start, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{local_text(zone, shift.start)}  {utc}  {member['id']}  {member['name']}"
        if shift.override is not None:
            line += f"  ({override_text(doc, shift, zone, named=False)})"
        if shift.start <= now < shift.end:
            line += "  now"
            if handoff_due(doc, now) is None and oncall["id"] != shift.member:
                line += (f" (on call instead until the next shift: {oncall['id']} "
                         f"{oncall['name']})")
        print(line)
    return 0


def cli_time(text: str, zone: zoneinfo.ZoneInfo, what: str) -> float:
    """`now`, a local time in the team's zone (`2026-12-24T09:00`), or one with an offset."""
    if text.strip().lower() == "now":
        return time.time()
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a time: now, or 2026-12-24T09:00 (in "
                         f"{zone.key}), or one with an offset") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.timestamp()


def cmd_override(args: argparse.Namespace) -> int:
    """Plan overrides ahead (a holiday swap): add, list, remove. Each change is one
    conditional write with its audit entry; one that starts (or, removed, ends) now hands
    over in the same write."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    if args.action == "list":
        doc = pager.team.read().doc
        zone, now = team_zone(doc), time.time()
        listed = overrides(doc)
        if not listed:
            print("No overrides.")
        times = [now, *(t for o in listed for t in override_times(o))]
        covering = {s.override: s.covering for s in oncall_shifts(doc, min(times), max(times))
                    if s.override is not None}
        for number, override in enumerate(listed, 1):
            start, end = override_times(override)
            state = "now" if start <= now < end else "ended" if end <= now else "planned"
            whose = covering.get(number - 1) or override.get("covering") or "-"
            print(f"{number}  {override['member']}  {local_text(zone, start)} -> "
                  f"{local_text(zone, end)}  covering {whose}  by {override.get('by') or '-'}"
                  f"  {state}")
        return 0
    if args.action == "add":
        zone = team_zone(pager.team.read().doc)
        start = cli_time(args.start, zone, "FROM")
        end = cli_time(args.end, zone, "TO")

        def change(doc: dict) -> str:
            return add_override(doc, args.member, start, end, operator(args))
        event = "override.added"
    else:
        def change(doc: dict) -> str:
            return remove_override(doc, args.number)
        event = "override.removed"
    try:
        written, what = pager.overrides.change(change, operator(args), event, "cli")
    except StoreConflict:
        raise UsageError(f"the config kept changing in the store ({CONFIG_CHANGE_TRIES} "
                         "tries); nothing was written, run the command again") from None
    print(what)
    oncall = oncall_member(written.doc)
    if written.doc["current_config"]["last_change"]["entry"]["event"] == "oncall.changed":
        print(f"handed over to {oncall['id']} ({oncall['name']}) now; a running pager sends "
              "the handoff texts")
    return 0


def cmd_quiet(args: argparse.Namespace) -> int:
    """Quiet hours for monitoring (QuietHours): `quiet 2h [--reason TEXT]` starts them now
    (one conditional write, audited as the operator), `quiet off` ends them, `quiet` alone
    says whether they are on. A running pager sends the "Quiet ended" text."""
    cfg = load_app_config(args.config)
    pager = build_pager(cfg)
    actor = quiet_reason(operator(args))
    if args.length is None:
        if args.reason is not None:
            raise UsageError("--reason goes with a length: quiet 2h --reason TEXT")
        doc = pager.team.read().doc
        print(quiet_status(doc, time.time()) or "quiet hours are off: alerts ring")
        return 0
    if args.length.lower() == "off":
        if args.reason is not None:
            raise UsageError("quiet off takes no --reason")
        ended, still_open = pager.quiet_hours.end(actor, via="cli")
        if ended is None:
            print("quiet hours are off already: alerts ring; nothing changed")
            return 0
        print(f"quiet hours ended: {still_open} alert{'s' if still_open != 1 else ''} still "
              "open, ringing now; a running pager texts the on-call engineer")
        return 0
    seconds = quiet_length(args.length)
    if seconds is None:
        raise UsageError(f"quiet {args.length!r}: give a length such as 2h, 30m or 1h30m "
                         "(at most 8h), or off")
    if seconds > QUIET_MAX:
        raise UsageError(f"quiet {args.length}: quiet hours last at most 8h; nothing changed")
    reason = quiet_reason(args.reason or "")
    written = pager.quiet_hours.start(actor, seconds, reason, via="cli")
    until = quiet_until(written.doc, time.time()) or time.time()
    print(f"quiet hours until {short_time(until)}" + (f" ({reason})" if reason else "")
          + ": alerts are listed and e-mailed, not rung; voicemails and calls still page")
    return 0


def vcard_text(value: str) -> str:
    """A vCard 3.0 text value: backslash, comma and semicolon escaped, a line break written
    as \\n (RFC 2426 5.8.4, RFC 6350 3.4), so a team name cannot add a line or a field to
    the card; other control characters become spaces."""
    value = value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
    value = re.sub(r"\r\n|\r|\n", r"\\n", value)
    return CONTROL_CHARACTERS.sub(" ", value)


def cmd_vcard(args: argparse.Namespace) -> int:
    """A contact card with the pager's two numbers, so members can let it through Do Not
    Disturb (README: how on iOS and Android)."""
    cfg = load_app_config(args.config)
    doc = build_pager(cfg).team.read().doc
    current = doc["current_config"]
    team = team_name(doc) or "On-call"
    name = f"{team} pager"
    lines = ["BEGIN:VCARD", "VERSION:3.0", f"FN:{vcard_text(name)}",
             f"N:{vcard_text(name)};;;;", f"ORG:{vcard_text(team)}",
             f"TEL;TYPE=CELL,VOICE:{current['pager_phone']}",
             f"TEL;TYPE=CELL,MSG:{current['from_phone']}",
             "NOTE:" + vcard_text(f"Pages and their calls come from {current['pager_phone']}; "
                                  f"texts come from and go to {current['from_phone']} (WHO, "
                                  "TAKE, ACK, HALP). Let both through Do Not Disturb."),
             "END:VCARD"]
    card = "\r\n".join(lines) + "\r\n"
    if args.output:
        try:
            Path(args.output).write_text(card, encoding="utf-8", newline="")
        except OSError as e:
            raise UsageError(f"{args.output}: cannot write: {e.strerror}") from None
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(card)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oncall-pager", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=VERSION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", default=None, help="config.ini to use (default: "
                         "$ONCALL_PAGER_CONFIG, else ./config.ini, else ./config.ini.example)")
        sub.set_defaults(handler=handler)
        return sub

    command("serve", cmd_serve, "run the app (waitress) and the delivery worker")
    command("check", cmd_check, "validate config.ini and the operational config")
    init = command("init", cmd_init, "put an operational config into an empty store")
    init.add_argument("file", nargs="?", help="the JSON (default: [store] init_from)")
    init.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    sms = command("sms", cmd_sms, "send a signed SMS webhook to the pager, print the reply")
    sms.add_argument("sender", metavar="FROM")
    sms.add_argument("body", metavar="BODY")
    sms.add_argument("--url", help="the running pager (default: http://HOST:PORT)")
    call = command("call", cmd_call, "walk the voicemail flow as Twilio would")
    call.add_argument("sender", metavar="FROM")
    call.add_argument("--digits", default="1", help="the key the caller presses (default 1; "
                      "2 asks for a person, with live_answer enabled)")
    answer = call.add_mutually_exclusive_group()
    answer.add_argument("--accept", action="store_true",
                        help="with --digits 2: the engineer presses 1 and takes the call")
    answer.add_argument("--no-answer", action="store_true",
                        help="with --digits 2: nobody answers; the call goes on to voicemail")
    call.add_argument("--seconds", type=int, default=12, help="length of the message")
    call.add_argument("--url", help="the running pager (default: http://HOST:PORT)")
    config = command("config", cmd_config, "show or change the operational config safely")
    config.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, actions: Any = actions) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        # -c may also follow the action (`config show -c FILE`)
        sub.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config.ini to use")
        sub.add_argument("--as", dest="as_member", default=argparse.SUPPRESS,
                         help="operator recorded in the audit log")
        return sub

    action("show", "print it (secrets masked)")
    add = action("user-add", "add a member")
    add.add_argument("id")
    add.add_argument("name")
    add.add_argument("phone")
    remove = action("user-remove", "remove a member (not the one on call)")
    remove.add_argument("id")
    setter = action("set", "set one setting: " + ", ".join(SETTABLE)
                    + ", members.ID.push (an ntfy topic URL, or off)")
    setter.add_argument("key")
    setter.add_argument("value")
    action("edit", "edit the JSON in $EDITOR")
    action("history", "previous versions, or the audit log's config events")
    integration = command("integration", cmd_integration, "routing keys for monitoring "
                          "(the Events API at /v2/enqueue, heartbeats)")
    integration.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    kinds = integration.add_subparsers(dest="action", required=True, metavar="ACTION")
    added = action("add", "add an integration and print its new routing key (once)", kinds)
    added.add_argument("name")
    added.add_argument("--heartbeats-only", action="store_true",
                       help="a key that can ping /heartbeat/NAME and cannot send events "
                       "(the one to put into crontabs)")
    action("list", "list the integrations (names and when added; never keys)", kinds)
    action("remove", "remove an integration: its routing key stops working",
           kinds).add_argument("name")
    webhook = command("webhook", cmd_webhook, "webhooks: page and on-call events POSTed as "
                      "signed JSON or to a chat room (Slack, Mattermost ...)")
    webhook.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    hook_actions = webhook.add_subparsers(dest="action", required=True, metavar="ACTION")
    hook_add = action("add", "add a webhook and print its signing secret (once)", hook_actions)
    hook_add.add_argument("name")
    hook_add.add_argument("url", help="https:// (or http:// to a loopback address)")
    hook_add.add_argument("--events", help="comma-separated, from: " + ",".join(
        WEBHOOK_EVENTS) + " (default: all)")
    hook_add.add_argument("--format", choices=WEBHOOK_FORMATS, default="json",
                          help="json (signed) or slack ({\"text\": ...}: Slack, Mattermost, "
                          "Rocket.Chat, Matrix hookshot, Teams workflows)")
    action("list", "list the webhooks (names, formats, hosts, events; never secrets)",
           hook_actions)
    action("remove", "remove a webhook", hook_actions).add_argument("name")
    audit = command("audit", cmd_audit, "read the audit log")
    audit.add_argument("-n", type=int, default=None, help="only the last N entries")
    audit.add_argument("--since", help="entries from this date (YYYY-MM-DD, UTC) on")
    audit.add_argument("--json", action="store_true")
    test = command("test", cmd_test, "a test text (and call) to a member, who replies OK")
    test.add_argument("member", metavar="MEMBER")
    test.add_argument("--call", action="store_true", help="also a call that asks for a 1")
    test.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    report = command("report", cmd_report, "pages, time to acknowledge, night pages and "
                     "on-call hours, from the audit log")
    report.add_argument("--from", dest="since", metavar="DATE",
                        help="first day, YYYY-MM-DD in the team's time zone (default: 29 days "
                        "before --to)")
    report.add_argument("--to", metavar="DATE", help="last day, included (default: today)")
    report.add_argument("--csv", action="store_true",
                        help="CSV: the pages, a blank line, then on-call hours per member")
    pages = command("pages", cmd_pages, "list the pages")
    pages.add_argument("--open", action="store_true", help="only open pages")
    pages.add_argument("--json", action="store_true")
    schedule = command("schedule", cmd_schedule, "the rotation: the current shift and the "
                       "next ones")
    schedule.add_argument("-n", type=int, default=8, help="how many shifts (default 8)")
    quiet = command("quiet", cmd_quiet, "quiet hours for monitoring: alerts are listed and "
                    "e-mailed, not rung (voicemails and calls still page)")
    quiet.add_argument("length", nargs="?", metavar="LENGTH|off",
                       help="2h, 30m or 1h30m from now (at most 8h), or off; none: show them")
    quiet.add_argument("--reason", help="why (shown by STATUS, kept in the audit log)")
    quiet.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    for feed, what in (("calendar", "the calendar feed (iCalendar, GET /calendar/TOKEN.ics)"),
                       ("status", "the status page (GET /status/TOKEN)")):
        token = command(f"{feed}-token", cmd_feed_token, f"make a new token for {what}, print "
                        "its URL once (the previous token stops working)")
        token.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
        token.set_defaults(feed=feed)
    command("status", cmd_status, "who is on call, the next handoffs, the open and the last "
            "pages, health: the status page in the terminal")

    override = command("override", cmd_override, "somebody on call instead for a while "
                       "(a holiday swap): planned overrides")
    override.add_argument("--as", dest="as_member", help="operator recorded in the audit log")
    plans = override.add_subparsers(dest="action", required=True, metavar="ACTION")
    planned = action("add", "MEMBER is on call from FROM to TO (now, or 2026-12-24T09:00 in "
                     "the team's time zone, or with an offset; at most 14 days)", plans)
    planned.add_argument("member", metavar="MEMBER")
    planned.add_argument("start", metavar="FROM")
    planned.add_argument("end", metavar="TO")
    action("list", "list the overrides, numbered", plans)
    action("remove", "remove override N (one running now ends now: on-call is handed back)",
           plans).add_argument("number", metavar="N", type=int)
    vcard = command("vcard", cmd_vcard, "write a contact card (vCard 3.0) with the pager's "
                    "numbers, to let them through Do Not Disturb")
    vcard.add_argument("-o", "--output", help="the file to write (default: standard output)")
    return parser


def default_config() -> str:
    """$ONCALL_PAGER_CONFIG, else ./config.ini; in a checkout without one, the example (the
    embedded default that `make run` serves), so `oncall-pager sms ...` talks to it."""
    if os.environ.get("ONCALL_PAGER_CONFIG"):
        return os.environ["ONCALL_PAGER_CONFIG"]
    if not os.path.exists("config.ini") and os.path.exists("config.ini.example"):
        print("note: no config.ini here, using config.ini.example", file=sys.stderr)
        return "config.ini.example"
    return "config.ini"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is None:
        args.config = default_config()
    if args.command != "serve":
        log.addHandler(logging.NullHandler())
        log.propagate = False
    try:
        status = args.handler(args)
        sys.stdout.flush()  # a reader gone (`pages | head`) shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader of our output closed it (`oncall-pager pages | head`): it has what it
        # wanted. End quietly, as a tool killed by SIGPIPE does (128 + 13), and point stdout
        # at /dev/null so the interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except (UsageError, NoConfig) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NoConfig) else 2
    except StoreUnavailable as e:
        print(f"error: store unreachable: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
