"""The Telegram bot end to end: aiogram polls a small Bot API server (aiohttp) that the test runs."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from search import Searcher
from facesearch.errors import ConfigurationError
from search.bot import REDACTED, BotSettings, DownloadGate, RateLimiter, RedactSecrets, run_bot
from tests.conftest import PHOTOS

pytestmark = pytest.mark.needs_data
TOKEN = "123456:TEST-token"
SECRET = TOKEN.split(":")[1]  # the token's secret part, which a percent-encoded URL would still hold
USER, STRANGER = 100, 200


class FakeBotAPI:
    """getMe, getUpdates, getFile, file download, sendPhoto, sendMediaGroup, sendMessage; records replies."""

    def __init__(self) -> None:
        self.updates: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.sent: list[dict] = []
        self.downloads: list[str] = []
        self.failures: dict[str, str] = {}  # file id -> "500" (an error status) or "drop" (connection cut mid-body)
        self.download_delay = None  # async callable awaited by each download (a slow Telegram)
        self.in_flight = self.max_in_flight = 0
        self.next_update = 1
        self.next_message = 1000

    def add_photo(self, user: int, data: bytes, declared_size: int | None = None, as_document: bool = False) -> None:
        file_id = f"file{len(self.files) + 1}"
        self.files[file_id] = data
        size = len(data) if declared_size is None else declared_size
        message = {"message_id": self.next_update, "date": 1_700_000_000, "chat": {"id": user, "type": "private"},
                   "from": {"id": user, "is_bot": False, "first_name": "Tester"}}
        if as_document:
            message["document"] = {"file_id": file_id, "file_unique_id": file_id, "file_name": "me.jpg",
                                   "mime_type": "image/jpeg", "file_size": size}
        else:
            message["photo"] = [{"file_id": file_id, "file_unique_id": file_id, "width": 1920, "height": 1280, "file_size": size}]
        self.updates.append({"update_id": self.next_update, "message": message})
        self.next_update += 1

    def add_text(self, user: int, text: str) -> None:
        message = {"message_id": self.next_update, "date": 1_700_000_000, "chat": {"id": user, "type": "private"},
                   "from": {"id": user, "is_bot": False, "first_name": "Tester"}, "text": text}
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        self.updates.append({"update_id": self.next_update, "message": message})
        self.next_update += 1

    def _message(self, chat_id) -> dict:  # noqa: ANN001
        self.next_message += 1
        return {"message_id": self.next_message, "date": 1_700_000_000, "chat": {"id": int(chat_id), "type": "private"}}

    async def handle(self, request):  # noqa: ANN001, ANN201
        from aiohttp import web

        assert request.match_info["token"] == TOKEN
        method = request.match_info["method"]
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        uploads = {k: v.file.read() for k, v in form.items() if not isinstance(v, str)}
        if method == "getMe":
            result = {"id": 42, "is_bot": True, "first_name": "FaceBot", "username": "face_test_bot"}
        elif method == "getUpdates":
            offset = int(fields.get("offset", 0) or 0)
            pending = [u for u in self.updates if u["update_id"] >= offset]
            if not pending:
                await asyncio.sleep(0.1)
            result = pending[:1]  # one at a time, so the order of answers is the order of updates
        elif method == "getFile":
            file_id = fields["file_id"]
            result = {"file_id": file_id, "file_unique_id": file_id, "file_size": len(self.files[file_id]),
                      "file_path": f"photos/{file_id}.jpg"}
        elif method in ("sendPhoto", "sendMessage", "sendMediaGroup"):
            reply_to = json.loads(fields.get("reply_parameters", "{}")).get("message_id", fields.get("reply_to_message_id"))
            record = {"method": method, "chat_id": int(fields["chat_id"]), "fields": fields, "uploads": uploads,
                      "reply_to": None if reply_to is None else int(reply_to)}
            self.sent.append(record)
            if method == "sendMediaGroup":
                result = [self._message(fields["chat_id"]) for _ in json.loads(fields["media"])]
            else:
                result = self._message(fields["chat_id"])
        else:
            result = True
        return web.json_response({"ok": True, "result": result})

    async def download(self, request):  # noqa: ANN001, ANN201
        from aiohttp import web

        file_id = Path(request.match_info["path"]).stem
        self.downloads.append(file_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.download_delay is not None:
                await self.download_delay()
            data = self.files[file_id]
            failure = self.failures.get(file_id)
            if failure == "500":
                return web.Response(status=500, text="Internal Server Error")
            if failure == "drop":  # headers promise the whole file, half of it comes, then the connection closes
                response = web.StreamResponse(headers={"Content-Length": str(len(data)), "Content-Type": "image/jpeg"})
                await response.prepare(request)
                await response.write(data[: len(data) // 2])
                request.transport.close()
                return response
            return web.Response(body=data, content_type="image/jpeg")
        finally:
            self.in_flight -= 1


async def _run_conversation(gallery_dir, api: FakeBotAPI, settings_kw: dict, expected_replies: int, during=None) -> None:
    """Run the bot against ``api`` until ``expected_replies`` arrived (``during()`` runs then, with the bot up)."""
    from aiohttp import web

    app = web.Application(client_max_size=50 * 2**20)
    app.router.add_route("*", "/bot{token}/{method}", api.handle)
    app.router.add_get("/file/bot{token}/{path:.+}", api.download)
    runner = web.AppRunner(app, access_log=None)  # the fake Telegram's own access log is not the bot's
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    settings = BotSettings(gallery=str(gallery_dir), api_server=f"http://127.0.0.1:{port}", **settings_kw)
    task = asyncio.create_task(run_bot(settings, TOKEN, searcher=Searcher(gallery_dir)))
    try:
        for _ in range(600):
            await asyncio.sleep(0.1)
            if task.done():
                task.result()
            if len(api.sent) >= expected_replies:
                break
        await asyncio.sleep(0.5)  # nothing more should arrive
        if during is not None:
            during()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 500
    return image


def test_bot_answers_each_face_and_enforces_limits(celeba_gallery, tmp_path, monkeypatch):
    gallery_dir = celeba_gallery[0]
    before = sorted(p.relative_to(gallery_dir) for p in gallery_dir.rglob("*"))
    # Nothing may be written: the working directory and the temp dir are fresh and must stay empty.
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    group = (PHOTOS / "group1.jpg").read_bytes()
    api = FakeBotAPI()
    api.add_text(USER, "/start")                                          # 1: help text
    api.add_photo(USER, group)                                            # 2: album, one image per face
    api.add_photo(USER, (PHOTOS / "group2.jpg").read_bytes(), as_document=True)  # 3: as a document
    api.add_photo(USER, group, declared_size=30 * 2**20)                  # 4: over the size limit
    api.add_photo(USER, group)                                            # 5: over the rate limit (2 per minute)
    api.add_photo(STRANGER, group)                                        # 6: not on the allowlist
    api.add_photo(STRANGER + 1, b"\x89PNG not really")                    # 7: unreadable (allowed user)
    blank = cv2.imencode(".jpg", np.full((300, 300, 3), 127, np.uint8))[1].tobytes()
    api.add_photo(STRANGER + 1, blank)                                    # 8: no face
    settings = {"allowed_users": frozenset({USER, STRANGER + 1}), "rate_limit": 2, "rate_window": 60.0,
                "max_file_bytes": 5 * 2**20}
    asyncio.run(_run_conversation(gallery_dir, api, settings, expected_replies=8))

    # Updates are handled concurrently; each answer replies to its message (update i = message i).
    assert len(api.sent) == 8, [(s["method"], s["fields"].get("text")) for s in api.sent]
    sent = {s["reply_to"]: s for s in api.sent}
    assert sorted(sent) == list(range(1, 9))
    assert sent[1]["method"] == "sendMessage" and "Send me a photo" in sent[1]["fields"]["text"]
    # group1.jpg: 3 faces, one reply image each, in an album with captions holding cosine values
    album = sent[2]
    assert album["method"] == "sendMediaGroup" and album["chat_id"] == USER
    media = json.loads(album["fields"]["media"])
    assert len(media) == 3 and len(album["uploads"]) == 3
    for item in media:
        assert "cosine" in item["caption"] and item["caption"].startswith("Face ")
        values = [float(v) for v in item["caption"].split("Top: ")[1].split(", ")]
        assert len(values) == 8 and values == sorted(values, reverse=True) and all(0 < v <= 1 for v in values)
    for data in album["uploads"].values():
        _decode(data)
    assert sent[3]["method"] in ("sendMediaGroup", "sendPhoto")  # the document is answered like a photo
    assert all(_decode(d) is not None for d in sent[3]["uploads"].values())
    assert sent[4]["method"] == "sendMessage" and "too large" in sent[4]["fields"]["text"]
    assert sent[5]["method"] == "sendMessage" and "please wait" in sent[5]["fields"]["text"]
    assert "private" in sent[6]["fields"]["text"] and sent[6]["chat_id"] == STRANGER
    assert "could not read" in sent[7]["fields"]["text"]
    assert "could not find a face" in sent[8]["fields"]["text"]
    # The oversized, rate-limited and refused photos were never downloaded.
    assert sorted(api.downloads) == ["file1", "file2", "file6", "file7"]
    assert list(work.iterdir()) == [] and list(temp.iterdir()) == []
    assert sorted(p.relative_to(gallery_dir) for p in gallery_dir.rglob("*")) == before


def test_rate_limiter_window():
    now = [0.0]
    limiter = RateLimiter(2, 10.0, clock=lambda: now[0])
    assert limiter.allow(1) == 0 and limiter.allow(1) == 0
    assert limiter.allow(1) == pytest.approx(10.0)
    assert limiter.allow(2) == 0  # per user
    now[0] = 10.5
    assert limiter.allow(1) == 0


def _texts(api: FakeBotAPI) -> dict[int, str]:
    return {s["reply_to"]: s["fields"].get("text", "") for s in api.sent}


def test_failed_downloads_log_no_token(celeba_gallery, caplog):
    """A download that fails (HTTP 500, a connection cut mid-file) or grows past the limit gets a polite
    answer, and no log record of any logger, traceback included, holds the token."""
    caplog.set_level(logging.DEBUG)  # the root: every logger (aiogram's, aiohttp's, asyncio's) at DEBUG
    api = FakeBotAPI()
    photo = (PHOTOS / "group1.jpg").read_bytes()
    api.add_photo(USER, photo)                                   # 1: Telegram's file server answers 500
    api.add_photo(USER, photo)                                   # 2: the connection drops mid-file
    api.add_photo(USER, (PHOTOS / "group6.jpg").read_bytes(), declared_size=1000)  # 3: declared small, is over the limit
    api.failures = {"file1": "500", "file2": "drop"}
    seen: dict[str, bool] = {}

    def during() -> None:
        # A library that logs the file URL, or an error holding it, while the bot runs: the filter run_bot
        # installed on the handlers must redact them (the bot's own lines must not need it).
        url = f"https://api.telegram.org/file/bot{TOKEN}/photos/file1.jpg"
        logging.getLogger("aiohttp.client").debug("GET %s", url)
        logging.getLogger("aiogram.event").error("download failed", exc_info=RuntimeError(f"500, url={url!r}"))
        seen["installed"] = any(isinstance(f, RedactSecrets) for f in caplog.handler.filters)

    settings = {"allowed_users": frozenset({USER}), "max_file_bytes": 250_000}  # group6.jpg: 302 kB
    asyncio.run(_run_conversation(celeba_gallery[0], api, settings, expected_replies=3, during=during))

    texts = _texts(api)
    assert sorted(texts) == [1, 2, 3], texts
    assert "could not fetch your photo" in texts[1] and "could not fetch your photo" in texts[2]
    assert "too large" in texts[3]
    assert seen["installed"]
    assert not any(isinstance(f, RedactSecrets) for f in caplog.handler.filters)  # removed when run_bot ends

    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    rendered = [(r, formatter.format(r)) for r in caplog.records]
    assert any(r.name.startswith("aiogram") for r, _ in rendered)  # other libraries' records were captured too
    for record, text in rendered:
        assert TOKEN not in text and SECRET not in text, text
    # The bot's own lines name the failure without its text (which holds the URL), so they needed no redaction.
    failures = [text for r, text in rendered if r.name == "facesearch.bot" and "could not download" in text]
    assert len(failures) == 2, [t for _, t in rendered if "facesearch" in t]
    assert "HTTP 500" in failures[0]
    assert all(REDACTED not in text for text in failures)
    # The library-style lines were redacted by the filter, traceback included.
    injected = [text for r, text in rendered if r.name in ("aiohttp.client", "aiogram.event") and REDACTED in text]
    assert len(injected) == 2 and "RuntimeError" in injected[1] and "Traceback" not in injected[0]


def test_redact_secrets_filter():
    redactor = RedactSecrets(TOKEN)
    formatter = logging.Formatter("%(message)s %(url)s")
    try:
        raise ValueError(f"GET /file/bot{TOKEN}/x.jpg") from OSError(f"/file/bot123456%3A{SECRET}/x.jpg")
    except ValueError as err:
        error = err
    record = logging.LogRecord("aiohttp.client", logging.ERROR, __file__, 1, "GET %s (%d)",
                               (f"/file/bot{TOKEN}/x.jpg", 500), (type(error), error, error.__traceback__))
    record.url = f"https://api.telegram.org/file/bot{TOKEN}/x.jpg"  # an extra={...} field
    record.stack_info = f"Stack: {TOKEN}"
    assert redactor.filter(record) is True  # redacts, never drops
    text = formatter.format(record)
    assert TOKEN not in text and SECRET not in text
    assert f"GET /file/bot{REDACTED}/x.jpg (500)" in text and "ValueError" in text and "OSError" in text
    clean = logging.LogRecord("x", logging.INFO, __file__, 1, "user %s", (5,), None)
    redactor.filter(clean)
    assert clean.msg == "user %s" and clean.args == (5,)  # records without a secret are left as they are


def test_downloads_are_capped_globally(celeba_gallery):
    """With max_in_flight=2, five photos at once: two are fetched (never more than two at a time), and the
    other three get the busy answer at once instead of waiting in a queue. Also: --public answers anyone."""
    api = FakeBotAPI()
    blank = cv2.imencode(".jpg", np.full((300, 300, 3), 127, np.uint8))[1].tobytes()
    for user in range(1, 6):
        api.add_photo(1000 + user, blank)

    async def slow() -> None:  # hold the downloads until the three busy answers went out
        for _ in range(300):
            if sum("busy" in s["fields"].get("text", "") for s in api.sent) >= 3:
                return
            await asyncio.sleep(0.05)

    api.download_delay = slow
    settings = {"public": True, "max_in_flight": 2}
    asyncio.run(_run_conversation(celeba_gallery[0], api, settings, expected_replies=5))

    texts = _texts(api)
    assert sorted(texts) == [1, 2, 3, 4, 5], texts
    busy = [i for i, t in texts.items() if "busy" in t and "try again in a minute" in t]
    answered = [i for i, t in texts.items() if "could not find a face" in t]
    assert len(busy) == 3 and len(answered) == 2, texts
    assert len(api.downloads) == 2 and api.max_in_flight == 2


def test_download_gate_counts_photos_and_bytes():
    gate = DownloadGate(max_items=2, max_bytes=100)
    assert gate.try_enter(60)
    assert not gate.try_enter(60)  # bytes
    assert gate.try_enter(40)
    assert not gate.try_enter(0)  # photos
    gate.leave(60)
    assert gate.try_enter(50) and (gate.items, gate.bytes) == (2, 90)


def test_rate_limiter_prunes_idle_users():
    now = [0.0]
    limiter = RateLimiter(2, 60.0, clock=lambda: now[0])
    for user in range(10_000):
        assert limiter.allow(user) == 0
    assert len(limiter) == 10_000
    now[0] = 30.0
    assert limiter.allow(7) == 0  # user 7 is active again: kept
    now[0] = 61.0
    assert limiter.allow(10_001) == 0
    assert len(limiter) == 2  # user 7 (last seen at 30 s) and the new one
    assert limiter.allow(7) == 0 and limiter.allow(7) == pytest.approx(29.0)  # 2 in the window: 30 s and 61 s
    # A steady stream of new users (one a second) never holds more than two windows of them.
    sizes = []
    for second in range(1000):
        now[0] = 100.0 + second
        limiter.allow(20_000 + second)
        sizes.append(len(limiter))
    assert max(sizes) <= 2 * 60 + 2


def test_bot_refuses_to_start_without_an_allowlist(tmp_path, monkeypatch):
    with pytest.raises(ConfigurationError, match="--allow.*--public"):
        BotSettings(gallery=str(tmp_path)).validate()
    with pytest.raises(ConfigurationError, match="--allow.*--public"):
        BotSettings(gallery=str(tmp_path), allowed_users=frozenset()).validate()
    with pytest.raises(ConfigurationError, match="not both"):
        BotSettings(gallery=str(tmp_path), allowed_users=frozenset({1}), public=True).validate()
    BotSettings(gallery=str(tmp_path), public=True).validate()
    BotSettings(gallery=str(tmp_path), allowed_users=frozenset({1})).validate()
    with pytest.raises(ConfigurationError, match="--max-mb-in-flight"):  # the budget must hold one largest file
        BotSettings(gallery=str(tmp_path), public=True, max_file_bytes=10, max_bytes_in_flight=5).validate()
    # run_bot refuses before it loads anything (the searcher here would fail if touched).
    with pytest.raises(ConfigurationError, match="--public"):
        asyncio.run(run_bot(BotSettings(gallery=str(tmp_path)), TOKEN, searcher=object()))

    from click.testing import CliRunner

    from search.cli import main as face_search

    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    result = CliRunner().invoke(face_search, ["bot", "--gallery", str(tmp_path)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "--allow" in error[0] and "--public" in error[0], result.output
    result = CliRunner().invoke(face_search, ["bot", "--gallery", str(tmp_path), "--public", "--allow", "5"])
    assert result.exit_code == 1 and "not both" in result.output, result.output
