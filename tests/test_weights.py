"""Weight downloads and verification against a real HTTP server on loopback.

The server supports Range and can be told to hang up after N bytes, to answer an error status, to
ignore Range, or to send a web page instead of the file, which is how real hosts misbehave.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import weights
from engine.__main__ import main
from engine.models import required_files

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@dataclasses.dataclass
class Server:
    base: str = ""
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    status: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> error status to answer
    cut_after: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> bytes sent, then hang up
    html: set[str] = dataclasses.field(default_factory=set)  # names answered with a web page
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)  # (name, Range)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state: Server = self.server.state  # type: ignore[attr-defined]
        name, asked = self.path.lstrip("/"), self.headers.get("Range")
        state.requests.append((name, asked))
        if name in state.status or name not in state.files:
            self.send_error(state.status.get(name, 404))
            return
        body = b"<html>please sign in</html>" if name in state.html else state.files[name]
        match = re.fullmatch(r"bytes=(\d+)-", asked or "")
        start = int(match[1]) if match and not state.ignore_range else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Type", "text/html" if name in state.html else "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = state.cut_after.pop(name, None)  # only the first request is cut
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see these requests
    state = Server(files={"model.ckpt": PAYLOAD})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state  # type: ignore[attr-defined]
    state.base = f"http://127.0.0.1:{httpd.server_port}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def weight_file(*urls: str, **published: object) -> weights.WeightFile:
    return weights.WeightFile("vqgan_checkpoint", "model.ckpt", urls, "test checkpoint", 1, **published)


def test_an_interrupted_download_resumes_from_the_partial_file(server: Server, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    server.cut_after["model.ckpt"] = 100_000
    file = weight_file(server.url("model.ckpt"))
    with pytest.raises(weights.WeightsMissingError, match="ended after 100,000 of 300,000 bytes"):
        weights.ensure([file], tmp_path, progress=False)
    part = tmp_path / ".model.ckpt.part"  # a fixed name, so a later run finds it
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not (tmp_path / "model.ckpt").exists()

    paths = weights.ensure([file], tmp_path)
    assert server.requests == [("model.ckpt", None), ("model.ckpt", "bytes=100000-")]
    assert paths["vqgan_checkpoint"].read_bytes() == PAYLOAD
    assert not part.exists()
    assert "model.ckpt:  33%" in capsys.readouterr().err  # the progress bar starts at the resumed offset


def test_a_server_that_ignores_range_makes_the_download_start_over(server: Server, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / ".model.ckpt.part").write_bytes(b"x" * 5000)
    weights.ensure([weight_file(server.url("model.ckpt"))], tmp_path, progress=False)
    assert server.requests == [("model.ckpt", "bytes=5000-")]
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD  # not the old bytes with the file appended


@pytest.mark.parametrize(("partial", "ranges"), [
    (PAYLOAD, [f"bytes={len(PAYLOAD)}-"]),  # complete already: 416 and nothing more to fetch
    (PAYLOAD + b"stale", [f"bytes={len(PAYLOAD) + 5}-", None]),  # longer than the file: start over
])
def test_a_416_answer_finishes_or_restarts_the_download(server: Server, tmp_path: Path, partial: bytes,
                                                        ranges: list[str | None]) -> None:
    (tmp_path / ".model.ckpt.part").write_bytes(partial)
    weights.ensure([weight_file(server.url("model.ckpt"))], tmp_path, progress=False)
    assert [asked for _, asked in server.requests] == ranges
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD


@pytest.mark.parametrize(("failure", "why"), [
    ("404", "HTTP 404 Not Found"),
    ("500", "HTTP 500 Internal Server Error"),
    ("html", "got a web page instead of the file"),
])
def test_each_source_is_tried_in_order(server: Server, tmp_path: Path, failure: str, why: str) -> None:
    server.files["bad.ckpt"] = PAYLOAD
    if failure == "html":
        server.html.add("bad.ckpt")
    else:
        server.status["bad.ckpt"] = int(failure)
    weights.ensure([weight_file(server.url("bad.ckpt"), server.url("model.ckpt"))], tmp_path, progress=False)
    assert [name for name, _ in server.requests] == ["bad.ckpt", "model.ckpt"]
    assert (tmp_path / "model.ckpt").read_bytes() == PAYLOAD

    # When every source fails, the error names each one and why.
    server.status["worse.ckpt"] = 500
    sources = server.url("bad.ckpt"), server.url("worse.ckpt")
    file = dataclasses.replace(weight_file(*sources), filename="x.ckpt")
    with pytest.raises(weights.WeightsMissingError) as caught:
        weights.ensure([file], tmp_path, progress=False)
    message = str(caught.value)
    assert f"{server.url('bad.ckpt')}: {why}" in message
    assert f"{server.url('worse.ckpt')}: HTTP 500 Internal Server Error" in message
    assert f"put it at: {tmp_path / 'x.ckpt'}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.ckpt.sha256"]


def test_a_download_that_contradicts_the_published_values_is_deleted(server: Server, tmp_path: Path) -> None:
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(weights.WeightsMissingError) as caught:
        weights.ensure([weight_file(server.url("model.ckpt"), sha256=wrong)], tmp_path, progress=False)
    message = str(caught.value)
    assert "the download of model.ckpt is corrupt" in message
    assert f"SHA-256 {PAYLOAD_SHA256} where {wrong} was published" in message
    assert f"sha256: {wrong}" in message  # so a download by hand can be checked
    assert list(tmp_path.iterdir()) == []

    # A published size the server contradicts fails before a byte is stored.
    with pytest.raises(weights.WeightsMissingError, match="offers 300,000 bytes where 300,001 were"):
        weights.ensure([weight_file(server.url("model.ckpt"), size=300_001)], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []

    published = weight_file(server.url("model.ckpt"), sha256=PAYLOAD_SHA256.upper(), size=len(PAYLOAD))
    path = weights.ensure([published], tmp_path, progress=False)["vqgan_checkpoint"]
    assert weights.verification(published, path) == "verified (published sha256)"


def test_the_first_download_records_its_hash_and_later_loads_check_it(server: Server, tmp_path: Path) -> None:
    file = weight_file(server.url("model.ckpt"))
    path = weights.ensure([file], tmp_path, progress=False)["vqgan_checkpoint"]
    sidecar = (tmp_path / "model.ckpt.sha256").read_text()
    assert sidecar.startswith(f"{PAYLOAD_SHA256}  model.ckpt\n")  # sha256sum's format
    weights.verify(file, path)
    assert weights.verification(file, path) == "verified (recorded sha256)"

    data = bytearray(path.read_bytes())
    data[12_345] ^= 0xFF
    before = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert weights.verification(file, path) == "unchecked (recorded sha256)"
    with pytest.raises(weights.WeightsCorruptError) as caught:
        weights.verify(file, path)
    message = str(caught.value)
    assert f"{path} (test checkpoint) is corrupt" in message
    assert f"where {PAYLOAD_SHA256} was recorded when it was downloaded" in message
    assert f"Delete {path} and run `python -m engine weights download`" in message
    assert f"download it by hand from {file.url}" in message
    assert isinstance(caught.value, weights.WeightsMissingError)  # so every caller reports it cleanly

    path.write_bytes(PAYLOAD[:1000])  # a different size is caught without hashing
    with pytest.raises(weights.WeightsCorruptError, match="it has 1,000 bytes where 300,000 were recorded"):
        weights.verify(file, path)


def test_an_unchanged_file_is_not_hashed_again(server: Server, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    file = weight_file(server.url("model.ckpt"))
    path = weights.ensure([file], tmp_path, progress=False)["vqgan_checkpoint"]
    hashed: list[Path] = []
    real_sha256_of = weights._sha256_of
    monkeypatch.setattr(weights, "_sha256_of", lambda p: hashed.append(p) or real_sha256_of(p))

    weights.verify(file, path)
    weights.verify(file, path)
    assert hashed == []
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    weights.verify(file, path)
    weights.verify(file, path)  # the new mtime was recorded after the one hash
    assert hashed == [path]
    weights.verify(file, path, rehash=True)
    assert hashed == [path, path]


def test_a_user_supplied_file_is_checked_only_against_published_values(server: Server,
                                                                       tmp_path: Path) -> None:
    file = weight_file(server.url("model.ckpt"))
    own = tmp_path / "mine" / "my.ckpt"
    paths = weights.ensure([file], tmp_path / "weights", {"vqgan_checkpoint": own}, progress=False)
    assert paths["vqgan_checkpoint"] == own and own.read_bytes() == PAYLOAD
    assert sorted(p.name for p in own.parent.iterdir()) == ["my.ckpt"]  # no hash recorded

    own.write_bytes(b"the user's own fine-tuned checkpoint")
    weights.verify(file, own)
    assert weights.verification(file, own) == "unverified"
    with pytest.raises(weights.WeightsCorruptError, match=re.escape(str(own))):
        weights.verify(dataclasses.replace(file, sha256=PAYLOAD_SHA256), own)


def test_the_free_space_check_counts_only_what_is_left_to_fetch(server: Server, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    big = os.urandom(3 * 2**20)
    server.files["model.ckpt"] = big
    file = dataclasses.replace(weight_file(server.url("model.ckpt")), approx_mib=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**20, 0, 2 * 2**20))
    with pytest.raises(weights.WeightsMissingError, match=r"only 2 MiB free where model\.ckpt goes"):
        weights.ensure([file], tmp_path, progress=False)
    (tmp_path / ".model.ckpt.part").write_bytes(big[:2 * 2**20])
    weights.ensure([file], tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == big


def test_a_file_has_every_source_in_the_missing_message(tmp_path: Path) -> None:
    checkpoint = weights.VQGAN_F16_16384_CHECKPOINT
    assert checkpoint.url == checkpoint.urls[0] and len(checkpoint.urls) == 2
    message = weights.missing_message([checkpoint], tmp_path)
    assert f"from: {checkpoint.urls[0]}\n      or: {checkpoint.urls[1]}\n" in message
    assert weights.WeightFile("clip_checkpoint", "c.pt", "http://one", "a file", 1).urls == ("http://one",)

    own = weights.WeightFile("clip_checkpoint", "own.pt", (), "your own CLIP", 0)  # no source to fetch from
    with pytest.raises(weights.WeightsMissingError, match=r"own\.pt has no download source") as caught:
        weights.ensure([own], tmp_path, progress=False)
    assert "from: nowhere we know; supply it yourself" in str(caught.value)


def test_weights_status_and_verify_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = required_files("vqgan-f16-16384", "ViT-B-32")
    for n, file in enumerate(files):  # as if downloaded by hand and recorded with sha256sum
        (tmp_path / file.filename).write_bytes(bytes([n]) * 1000)
        digest = hashlib.sha256(bytes([n]) * 1000).hexdigest()
        (tmp_path / f"{file.filename}.sha256").write_text(f"{digest}  {file.filename}\n")
    command = ["--preset", "vqgan-f16-16384", "--clip", "ViT-B-32", "--weights-dir", str(tmp_path)]

    assert main(["weights", "status", *command]) == 0
    assert capsys.readouterr().out.count("unchecked (recorded sha256)") == len(files)
    assert main(["weights", "verify", *command]) == 0
    assert capsys.readouterr().out.count("verified (recorded sha256)") == len(files)
    assert main(["weights", "status", *command]) == 0  # the check is remembered
    assert capsys.readouterr().out.count("verified (recorded sha256)") == len(files)

    corrupt = tmp_path / files[1].filename
    corrupt.write_bytes(b"\xff" * 1000)
    assert main(["weights", "verify", *command]) == 1
    out, err = capsys.readouterr()
    assert out.count("CORRUPT") == 1 and out.count("verified (recorded sha256)") == len(files) - 1
    assert f"error: {corrupt} ({files[1].description}) is corrupt" in err
    assert "python -m engine weights download" in err


def test_processes_starting_together_download_each_file_once(server: Server, tmp_path: Path) -> None:
    """A bot and its workers on one weights folder start at the same moment: one downloads, the others
    wait for it and find the file (they would otherwise write the same partial file at once)."""
    file = weight_file(server.url("model.ckpt"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each its own lock file handle, as processes
        paths = list(pool.map(lambda _: weights.ensure([file], tmp_path, progress=False), range(4)))
    assert server.requests == [("model.ckpt", None)]
    assert all(found["vqgan_checkpoint"].read_bytes() == PAYLOAD for found in paths)
