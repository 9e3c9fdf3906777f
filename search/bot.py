"""``face-search bot``: a Telegram bot (aiogram 3) that answers a photo with look-alikes.

For each face of a photo (largest first, up to ``max_faces``) it replies with
one image: the face beside its 8 most similar gallery faces, cosine values and
colour coding by the gallery's calibration, and a short caption. Photos are
held in memory only. The bot serves an allowlist of users, or everyone only
when its owner says so explicitly (``public``); users are rate limited, files over
a size limit are refused before download, a global gate bounds the photos (and
bytes) held at once, and the bot token never reaches a log line.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from data.images import ImageLoadError, load_image_bytes
from facesearch.errors import ConfigurationError
from search.calibration import VERDICT_BGR, Calibration, verdict_label
from search.html import encode_jpeg, face_crop
from search.live import LiveSearch
from search.searcher import FaceResult, Match, Searcher

log = logging.getLogger("facesearch.bot")

TOKEN_ENV = "TELEGRAM_BOT_TOKEN"
HELP = (
    "Send me a photo (or an image file) and I will show, for each face in it, the {k} most similar "
    "faces of my gallery of {faces:,} faces, with their cosine similarity.\n\n"
    "Green: the same person, yellow: uncertain, red: a different person{calibrated}.\n"
    "I keep your photo in memory only while I answer, and never store it."
)


@dataclass(frozen=True)
class BotSettings:
    gallery: str
    allowed_users: frozenset[int] | None = None  # who may use the bot; None only together with public=True
    public: bool = False  # answer everyone: must be asked for explicitly (--public)
    rate_limit: int = 6  # photos per user ...
    rate_window: float = 60.0  # ... per this many seconds
    max_file_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_faces: int = 5  # reply images per photo (Telegram albums hold at most 10)
    k: int = 8
    concurrency: int = 2  # searches at once
    max_in_flight: int = 8  # photos held at once (downloading, waiting for or in a search, answering)
    max_bytes_in_flight: int = 64 * 2**20  # their declared sizes together (an unknown size counts as max_file_bytes)
    api_server: str | None = None  # a Bot API server other than api.telegram.org (tests, self-hosted)
    reload_interval: float = 1.0  # seconds between checks for a gallery changed by another process

    def validate(self) -> None:
        """Raise ConfigurationError unless exactly one of an allowlist and ``public`` is set,
        or when the byte budget could not hold one photo of the largest accepted size.

        A Telegram bot is reachable by anyone who finds its name, so answering
        everyone is never a default. FaceBot itself (no Telegram) does not need this:
        build_dispatcher and run_bot call it.
        """
        if self.public and self.allowed_users is not None:
            raise ConfigurationError("the bot is either public (--public) or limited to an allowlist (--allow), not both")
        if not self.public and not self.allowed_users:
            raise ConfigurationError("the bot needs an allowlist: pass --allow USER_ID (repeatable), "
                                     "or --public to answer every Telegram user")
        if self.max_bytes_in_flight < self.max_file_bytes:
            raise ConfigurationError("the bytes in flight (--max-mb-in-flight) must be at least the largest file "
                                     "accepted (--max-file-mb)")


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key (sliding window).

    Keys whose last event is older than the window are dropped, at most once per
    window, so the table holds only the keys seen in the last two windows.
    """

    def __init__(self, limit: int, window: float, clock=time.monotonic) -> None:  # noqa: ANN001
        self.limit, self.window, self.clock = limit, window, clock
        self._events: dict[int, deque[float]] = {}
        self._last_prune = clock()

    def __len__(self) -> int:
        return len(self._events)

    def allow(self, key: int) -> float:
        """0 when allowed (and counted), else the seconds to wait."""
        now = self.clock()
        if now - self._last_prune >= self.window:
            self.prune(now)
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return events[0] + self.window - now
        events.append(now)
        return 0.0

    def prune(self, now: float | None = None) -> None:
        """Drop every key whose events have all left the window."""
        now = self.clock() if now is None else now
        self._last_prune = now
        stale = [key for key, events in self._events.items() if not events or events[-1] <= now - self.window]
        for key in stale:
            del self._events[key]


class DownloadGate:
    """A global cap on photos held at once and on their bytes; it never queues.

    ``try_enter`` says no at once when the cap is reached, so the bot can answer
    "busy" instead of letting downloads pile up. It runs on the event loop only
    (no lock needed: nothing awaits between the check and the count).
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items = self.bytes = 0

    def try_enter(self, nbytes: int) -> bool:
        if self.items >= self.max_items or self.bytes + nbytes > self.max_bytes:
            return False
        self.items += 1
        self.bytes += nbytes
        return True

    def leave(self, nbytes: int) -> None:
        self.items -= 1
        self.bytes -= nbytes


class FileTooLargeError(Exception):
    """A download grew past the size limit (its declared size was missing or wrong)."""


class _CappedBuffer(io.BytesIO):
    """A BytesIO that refuses to grow past ``limit`` bytes while a download streams in."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:  # noqa: ANN001
        if self.tell() + len(data) > self.limit:
            raise FileTooLargeError(f"over {self.limit} bytes")
        return super().write(data)


REDACTED = "[redacted]"


class RedactSecrets(logging.Filter):
    """Removes secrets (the bot token) from log records: message, arguments, traceback, stack and extras.

    Telegram's file URLs hold the token (``/file/bot<TOKEN>/<path>``) and aiohttp
    puts the URL into its errors' text, so a traceback can carry the token even
    when no message does. A record that holds a secret gets its rendered message
    redacted (and its arguments dropped), and its traceback rendered and redacted
    into ``exc_text`` (``exc_info`` is dropped so no formatter renders it again).
    The token's secret part (after the ``:``) is redacted on its own too.
    """

    def __init__(self, *secrets: str) -> None:
        super().__init__()
        found: set[str] = set()
        for secret in filter(None, secrets):
            found.add(secret)
            tail = secret.partition(":")[2]
            if len(tail) >= 6:
                found.add(tail)
        self.secrets = sorted(found, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def holds(self, text: str | None) -> bool:
        return bool(text) and any(secret in text for secret in self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format must not leak through the error report
            message = f"{record.msg} (arguments dropped: they did not format)"
            record.msg, record.args = self.redact(message), ()
        else:
            if self.holds(message):
                record.msg, record.args = self.redact(message), ()
        if record.exc_info and not record.exc_text:
            text = _PLAIN.formatException(record.exc_info)
            if self.holds(text):
                record.exc_text, record.exc_info = self.redact(text), None
        elif self.holds(record.exc_text):
            record.exc_text, record.exc_info = self.redact(record.exc_text), None
        if self.holds(record.stack_info):
            record.stack_info = self.redact(record.stack_info)
        for name, value in list(vars(record).items()):  # extra={...} fields
            if isinstance(value, str) and name not in ("msg", "exc_text", "stack_info") and self.holds(value):
                setattr(record, name, self.redact(value))
        return True


_PLAIN = logging.Formatter()


@contextmanager
def redacting_logs(*secrets: str) -> Iterator[RedactSecrets]:
    """Install a RedactSecrets filter on every handler configured now (the root's, any
    logger's and logging's last resort) and remove it on exit. A handler filter sees
    the records of every logger that propagates to it, aiogram's and aiohttp's included."""
    redactor = RedactSecrets(*secrets)
    handlers: list[logging.Handler] = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.extend(logger.handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    unique = list({id(h): h for h in handlers}.values())
    for handler in unique:
        handler.addFilter(redactor)
    try:
        yield redactor
    finally:
        for handler in unique:
            handler.removeFilter(redactor)


def describe_error(err: BaseException) -> str:
    """An error's type (and HTTP status), never its text: aiohttp's text holds the URL, and a file URL the token."""
    status = getattr(err, "status", None)
    return type(err).__name__ + (f" (HTTP {status})" if isinstance(status, int) else "")


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, colour=(30, 30, 30), bold: int = 1) -> None:  # noqa: ANN001
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, bold, cv2.LINE_AA)


def render_reply(query: np.ndarray, matches: Sequence[Match], crops: Sequence[np.ndarray | None], title: str) -> np.ndarray:
    """One reply image (RGB): the query face left, its matches in a 4-column grid right."""
    tile, pad, caption_h, cols = 112, 10, 34, 4
    rows = max(1, (len(matches) + cols - 1) // cols)
    qsize = 2 * tile + caption_h
    width = pad + qsize + 2 * pad + cols * (tile + pad)
    height = 30 + max(qsize + caption_h, rows * (tile + caption_h + pad)) + pad
    canvas = np.full((height, width, 3), 250, np.uint8)  # BGR while drawing
    _text(canvas, title[:90], (pad, 20), 0.5, bold=1)
    y0 = 30
    q = cv2.resize(query, (qsize, qsize), interpolation=cv2.INTER_AREA if query.shape[0] > qsize else cv2.INTER_LINEAR)
    canvas[y0:y0 + qsize, pad:pad + qsize] = q[:, :, ::-1]
    cv2.rectangle(canvas, (pad - 2, y0 - 2), (pad + qsize + 1, y0 + qsize + 1), (40, 40, 40), 2)
    _text(canvas, "query face", (pad, y0 + qsize + 18))
    x_grid = pad + qsize + 2 * pad
    for i, (m, crop) in enumerate(zip(matches, crops)):
        r, c = divmod(i, cols)
        x, y = x_grid + c * (tile + pad), y0 + r * (tile + caption_h + pad)
        colour = VERDICT_BGR.get(m.verdict, VERDICT_BGR[None])
        if crop is None:
            cv2.rectangle(canvas, (x, y), (x + tile, y + tile), (221, 221, 221), -1)
            _text(canvas, "?", (x + tile // 2 - 8, y + tile // 2 + 8), 1.0, (136, 136, 136), 2)
        else:
            canvas[y:y + tile, x:x + tile] = cv2.resize(crop, (tile, tile))[:, :, ::-1]
        cv2.rectangle(canvas, (x - 2, y - 2), (x + tile + 1, y + tile + 1), colour, 4)
        _text(canvas, f"{m.cosine:.3f}", (x, y + tile + 15), 0.5, colour, 2)
        _text(canvas, f"id {m.identity}"[:16] if m.identity is not None else "no id", (x, y + tile + 30), 0.4)
    return canvas[:, :, ::-1].copy()


def reply_caption(result: FaceResult, index: int, total: int, shown: int, calibration: Calibration | None) -> str:
    lines = [f"Face {index + 1} of {total}" + (f" (the {shown} largest are shown)" if total > shown and index == 0 else "")]
    if result.matches:
        best = result.matches[0]
        verdict = f", {verdict_label(best.verdict)}" if calibration is not None else ""
        lines.append(f"Most similar: id {best.identity}, cosine {best.cosine:.3f}{verdict}")
        lines.append("Top: " + ", ".join(f"{m.cosine:.3f}" for m in result.matches))
    return "\n".join(lines)[:1024]


class FaceBot:
    """The bot's logic, independent of Telegram: photo bytes in, reply images and captions out."""

    def __init__(self, searcher: Searcher, settings: BotSettings) -> None:
        self.searcher = searcher
        self.settings = settings
        self.live = LiveSearch(searcher)  # follows changes made by other processes (watch() starts it)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_window)
        self.gate = DownloadGate(settings.max_in_flight, settings.max_bytes_in_flight)
        self._slots = asyncio.Semaphore(settings.concurrency)

    def help_text(self) -> str:
        calibration = self.live.snapshot().gallery.calibration
        note = f" (thresholds {calibration.threshold:.3f} / {calibration.uncertain_threshold:.3f})" if calibration else \
            "; this gallery is not calibrated yet, so all are grey"
        return HELP.format(k=self.settings.k, faces=len(self.live.snapshot().gallery), calibrated=note)

    def answer(self, data: bytes) -> list[tuple[bytes, str]]:
        """(JPEG, caption) per face shown; [] when no face. Raises ImageLoadError."""
        image = load_image_bytes(data, self.settings.max_pixels)
        snap = self.live.snapshot()  # one generation for the whole answer
        results = self.searcher.search(image, k=self.settings.k, gallery=snap.gallery)
        shown = results[: self.settings.max_faces]
        calibration = snap.gallery.calibration
        replies = []
        for i, result in enumerate(shown):
            crops = [snap.thumbnails.crop(m.face_id) for m in result.matches]
            title = f"face {i + 1} of {len(results)}: the {len(result.matches)} most similar gallery faces"
            picture = render_reply(face_crop(image, result.face.detection.box, 224), result.matches, crops, title)
            replies.append((encode_jpeg(picture, 88), reply_caption(result, i, len(results), len(shown), calibration)))
        return replies

    async def answer_async(self, data: bytes) -> list[tuple[bytes, str]]:
        async with self._slots:
            return await asyncio.to_thread(self.answer, data)


def build_dispatcher(face_bot: FaceBot):  # noqa: ANN201 - aiogram is optional
    from aiogram import Dispatcher, F, Router
    from aiogram.filters import Command, CommandStart
    from aiogram.types import BufferedInputFile, InputMediaPhoto, Message

    settings = face_bot.settings
    settings.validate()
    router = Router(name="facesearch")

    def allowed(message: Message) -> bool:
        user = message.from_user.id if message.from_user else None
        return settings.public or (settings.allowed_users is not None and user in settings.allowed_users)

    @router.message(CommandStart())
    @router.message(Command("help"))
    async def start(message: Message) -> None:
        if not allowed(message):
            await message.reply("Sorry, this bot is private.")
            return
        await message.reply(face_bot.help_text())

    async def handle_image(message: Message, file_id: str, size: int | None) -> None:
        user = message.from_user.id if message.from_user else 0
        if not allowed(message):
            log.info("refused user %s: not on the allowlist", user)
            await message.reply("Sorry, this bot is private.")
            return
        if size is not None and size > settings.max_file_bytes:
            await message.reply(f"That file is too large ({size / 2**20:.1f} MB). "
                                 f"Please send one under {settings.max_file_bytes / 2**20:.0f} MB.")
            return
        # The global gate before the per-user limit, so a busy answer does not use up the user's photos;
        # nothing awaits between the two, so no other photo can slip in between.
        held = settings.max_file_bytes if size is None else size
        if not face_bot.gate.try_enter(held):
            log.info("busy: refused a photo of user %s (%d photos, %d bytes in flight)",
                     user, face_bot.gate.items, face_bot.gate.bytes)
            await message.reply("I am busy with other photos right now; please try again in a minute.")
            return
        try:
            wait = face_bot.limiter.allow(user)
            if wait:
                await message.reply(f"You are sending photos quickly; please wait {wait:.0f} s and try again.")
                return
            await answer_image(message, user, file_id)
        finally:
            face_bot.gate.leave(held)

    async def answer_image(message: Message, user: int, file_id: str) -> None:
        buffer = _CappedBuffer(settings.max_file_bytes)  # memory only: the photo never touches the disk
        try:
            try:
                await message.bot.download(file_id, destination=buffer)
            except FileTooLargeError:
                await message.reply("That file is too large.")
                return
            except Exception as err:  # noqa: BLE001 - never log the error's text or traceback: they hold the file URL
                log.warning("could not download the photo of user %s: %s", user, describe_error(err))
                await message.reply("Sorry, I could not fetch your photo from Telegram. Please send it again.")
                return
            replies = await face_bot.answer_async(buffer.getvalue())
        except ImageLoadError as err:
            log.info("user %s sent an unreadable image: %s", user, err.reason)
            await message.reply("Sorry, I could not read that image. Please send a JPEG or PNG photo.")
            return
        except Exception:  # noqa: BLE001 - any failure gets a polite answer; the log has the details
            log.exception("failed to answer user %s", user)
            await message.reply("Sorry, something went wrong on my side. Please try again later.")
            return
        finally:
            buffer.close()
        if not replies:
            await message.reply("I could not find a face in this photo. Try one where a face is clearly "
                                 "visible, facing the camera, and at least about 80 pixels tall.")
            return
        files = [BufferedInputFile(jpeg, filename=f"face-{i + 1}.jpg") for i, (jpeg, _) in enumerate(replies)]
        if len(replies) == 1:
            await message.reply_photo(files[0], caption=replies[0][1])
        else:
            await message.reply_media_group([InputMediaPhoto(media=f, caption=c) for f, (_, c) in zip(files, replies)])
        log.info("answered user %s: %d face(s)", user, len(replies))

    @router.message(F.photo)
    async def photo(message: Message) -> None:
        largest = message.photo[-1]
        await handle_image(message, largest.file_id, largest.file_size)

    @router.message(F.document)
    async def document(message: Message) -> None:
        doc = message.document
        if not (doc.mime_type or "").startswith("image/"):
            await message.reply("Please send a photo or an image file.")
            return
        await handle_image(message, doc.file_id, doc.file_size)

    @router.message()
    async def other(message: Message) -> None:
        if allowed(message):
            await message.reply("Send me a photo with a face in it. /help says more.")

    dispatcher = Dispatcher()
    dispatcher.include_router(router)
    return dispatcher


def make_bot(token: str, api_server: str | None = None) -> Any:
    from aiogram import Bot
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer

    session = AiohttpSession(api=TelegramAPIServer.from_base(api_server)) if api_server else AiohttpSession()
    return Bot(token, session=session)


async def run_bot(settings: BotSettings, token: str, searcher: Searcher | None = None) -> None:
    """Load the gallery and models, then poll Telegram until cancelled.

    Refuses to start (ConfigurationError) without an allowlist unless ``public``.
    While it runs, every configured log handler redacts the token (configure
    logging before calling it).
    """
    settings.validate()
    with redacting_logs(token):
        searcher = searcher or await asyncio.to_thread(Searcher, settings.gallery)
        await asyncio.to_thread(searcher.search, np.zeros((64, 64, 3), np.uint8), 1)  # load the models now
        face_bot = FaceBot(searcher, settings)
        face_bot.live.watch(settings.reload_interval)
        try:
            dispatcher = build_dispatcher(face_bot)
            bot = make_bot(token, settings.api_server)
            log.info("bot ready: %d gallery faces, %s", len(searcher.gallery),
                     "public: answers everyone" if settings.public else f"allowlist of {len(settings.allowed_users)} users")
            try:
                await dispatcher.start_polling(bot, handle_signals=False)
            finally:
                await bot.session.close()
        finally:
            face_bot.live.stop()
