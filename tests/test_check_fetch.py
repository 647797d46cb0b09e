"""`cardtune check --fetch` against a fake hub on 127.0.0.1, and `--changed-since` in a git repository.

The fake hub serves real fixture folders through the endpoints huggingface_hub calls: the
model-info API at a revision (``siblings`` with sizes, ``sha``), the tree API, and
``resolve/{commit}/{file}`` (HEAD and GET, with X-Repo-Commit, ETag and Content-Length).
It records every request, so a test sees what was and was not downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from cardtune.cli import main
from cardtune.registry.changes import changed_model_ids
from cardtune.registry.errors import CardError
from tests.conftest import require_fixture

REPO = Path(__file__).resolve().parents[1]
QWEN = "fakeorg/qwen2.5-7b-instruct"
SMALL = ["config.json", "generation_config.json", "merges.txt", "tokenizer_config.json", "vocab.json"]
NOT_SMALL = ["model.safetensors", "model.safetensors.index.json", "modeling_qwen2.py", "README.md"]


@dataclass
class FakeRepo:
    revisions: dict[str, dict[str, bytes]]
    """revision name -> its files."""
    declared_sizes: dict[str, int] = field(default_factory=dict)
    """A size the API lists instead of the file's (a file too big to serve for real)."""
    gated: bool = False
    """Its files listed, their downloads refused (HTTP 401, X-Error-Code GatedRepo)."""

    def commit(self, revision: str) -> str:
        h = hashlib.sha1(revision.encode())
        for name, data in sorted(self.revisions[revision].items()):
            h.update(name.encode() + data)
        return h.hexdigest()

    def files_at(self, rev_or_commit: str) -> tuple[str, dict[str, bytes]] | None:
        for name, files in self.revisions.items():
            if rev_or_commit in (name, self.commit(name)):
                return self.commit(name), files
        return None


@dataclass
class FakeHub:
    url: str
    repos: dict[str, FakeRepo]
    requests: list[str] = field(default_factory=list)


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, body: bool) -> None:
            self._send(status, json.dumps({"error": code}).encode(), body, {"X-Error-Code": code})

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(f"{self.command} {unquote(path)}")
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            match = api or resolve
            if match is None:
                return self._error(404, "NotFound", body)
            repo = hub.repos.get(unquote(match.group(1)))
            if repo is None:
                return self._error(404, "RepoNotFound", body)
            if repo.gated and resolve is not None:  # the hub lists a gated repository's files to anyone
                return self._error(401, "GatedRepo", body)
            at = repo.files_at(unquote((match.group(3) or "main") if api else match.group(2)))
            if at is None:
                return self._error(404, "RevisionNotFound", body)
            commit, files = at
            if resolve is not None:
                name = unquote(resolve.group(3))
                if name not in files:
                    return self._error(404, "EntryNotFound", body)
                data = files[name]
                return self._send(200, data, body, {"X-Repo-Commit": commit, "ETag": f'"{_blob_id(data)}"'})
            listed = [(name, repo.declared_sizes.get(name, len(data)), _blob_id(data)) for name, data in files.items()]
            if api.group(2) != "tree":
                reply = {"id": match.group(1), "sha": commit,
                         "siblings": [{"rfilename": n, "size": s, "blobId": b} for n, s, b in listed]}
            else:
                reply = [{"type": "file", "path": n, "size": s, "oid": b} for n, s, b in listed]
            return self._send(200, json.dumps(reply).encode(), body, {"Content-Type": "application/json"})

    return Handler


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    qwen = {name: (require_fixture("qwen2.5-7b-instruct") / name).read_bytes() for name in SMALL}
    qwen |= {
        "model.safetensors": b"\0" * 4096,
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "modeling_qwen2.py": b"raise SystemExit('remote code ran')\n",
        "README.md": b"# a model\n",
    }
    repos = {
        QWEN: FakeRepo({"v1.0": qwen, "main": {**qwen, "only-on-main.json": b"{}"}}),
        "fakeorg/gated": FakeRepo({"main": qwen}, gated=True),
        "fakeorg/huge": FakeRepo({"main": qwen}, declared_sizes={"vocab.json": 300 * 2**20}),
        "fakeorg/weights-only": FakeRepo({"main": {"model.safetensors": b"\0" * 16}}),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    fake = FakeHub(f"http://127.0.0.1:{server.server_address[1]}", repos)
    server.RequestHandlerClass = _handler(fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def _cards(folder: Path, entries: list[dict[str, str]]) -> Path:
    """A user card folder: the qwen2-instruct family, renamed, with ``entries`` as its models."""
    card = yaml.safe_load((REPO / "configs" / "models" / "qwen2-instruct.yaml").read_text(encoding="utf-8"))
    card |= {"family": "fakeqwen", "models": entries}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fakeqwen.yaml").write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    return folder


ENTRIES = [
    {"model_id": "fakeqwen-7b", "hf_path": QWEN, "revision": "v1.0"},
    {"model_id": "fakeqwen-missing", "hf_path": "fakeorg/no-such-model"},
    {"model_id": "fakeqwen-gated", "hf_path": "fakeorg/gated"},
    {"model_id": "fakeqwen-badrev", "hf_path": QWEN, "revision": "v9"},
    {"model_id": "fakeqwen-huge", "hf_path": "fakeorg/huge"},
    {"model_id": "fakeqwen-noweights", "hf_path": "fakeorg/weights-only"},
]


def _cardtune(tmp_path: Path, endpoint: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m cardtune.cli check ... --fetch` online, against ``endpoint``, with its own caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env |= {"HF_ENDPOINT": endpoint, "CARDTUNE_CACHE": str(cache or tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    cards = _cards(tmp_path / "cards", ENTRIES)
    return subprocess.run(
        [sys.executable, "-m", "cardtune.cli", "check", *args, "--fetch", "--cards", str(cards)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_fetch_checks_the_card_on_the_small_files_at_its_revision(tmp_path: Path, hub: FakeHub) -> None:
    hub.requests.clear()
    done = _cardtune(tmp_path, hub.url, "fakeqwen-7b")
    assert done.returncode == 0, done.stderr
    repo = hub.repos[QWEN]
    commit = repo.commit("v1.0")
    assert commit != repo.commit("main")
    snapshot = tmp_path / "cache" / "hub" / "models--fakeorg--qwen2.5-7b-instruct" / "snapshots" / commit
    size = sum(len(repo.revisions["v1.0"][n]) for n in SMALL) / 2**20
    lines = done.stdout.splitlines()
    assert lines[0] == f"fetch fakeqwen-7b: {QWEN}@v1.0 (commit {commit[:12]}): 5 small files, {size:.1f} MB"
    assert lines[1] == f"fakeqwen-7b on {snapshot} (card: {tmp_path / 'cards' / 'fakeqwen.yaml'})"
    assert "  OK   end of turn trained: 3/3 answers end with '<|im_end|>' in the labels" in lines
    assert any(line.startswith("  OK   masked-label round trip: 3 answers supervised exactly") for line in lines)
    assert lines[-1] == "ok: 1 model checked on their folders"

    # The revision was asked for by name; every file came from its commit.
    assert f"GET /api/models/{QWEN}/revision/v1.0" in hub.requests
    resolved = {r.rsplit("/", 1)[1] for r in hub.requests if "/resolve/" in r}
    assert resolved == set(SMALL)
    assert all(f"/{QWEN}/resolve/{commit}/" in r for r in hub.requests if "/resolve/" in r)
    assert not [r for r in hub.requests if any(name in r for name in [*NOT_SMALL, "only-on-main.json"])]
    # Exactly the small files were written, nothing else anywhere in the cache.
    assert sorted(p.name for p in snapshot.iterdir()) == SMALL
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [name for name in cached if name.endswith((".safetensors", ".py", ".md", ".index.json"))]
    for name in SMALL:
        assert (snapshot / name).read_bytes() == repo.revisions["v1.0"][name]


def test_fetch_failures_are_one_line_each(tmp_path: Path, hub: FakeHub) -> None:
    hub.requests.clear()
    done = _cardtune(tmp_path, hub.url, "fakeqwen-missing", "fakeqwen-gated", "fakeqwen-badrev", "fakeqwen-huge",
                     "fakeqwen-noweights")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "FAIL fakeqwen-missing (fakeorg/no-such-model): cannot fetch its small files: no such repository on the hub "
        "(a private one needs HF_TOKEN): check the entry's hf_path",
        "FAIL fakeqwen-gated (fakeorg/gated): cannot fetch its small files: the repository is gated: accept its terms "
        "on its hub page and set HF_TOKEN to a token of that account",
        f"FAIL fakeqwen-badrev ({QWEN}@v9): cannot fetch its small files: the repository has no revision 'v9': "
        "check the entry's revision",
        "FAIL fakeqwen-huge (fakeorg/huge): cannot fetch its small files: vocab.json is 300 MB, too big for a "
        "tokenizer or config file (at most 200 MB): check a local copy with --model-path DIR",
        "FAIL fakeqwen-noweights (fakeorg/weights-only): cannot fetch its small files: the repository holds no "
        "tokenizer or config file (*.json, *.jinja, *.model, *.tiktoken, *.txt)",
    ]
    assert not [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]  # nothing downloaded
    assert not [r for r in hub.requests if "/resolve/" in r and "/gated/" not in r]  # refused before downloading
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "trees" not in p.parts]


def test_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _cardtune(tmp_path, f"http://127.0.0.1:{port}", "fakeqwen-7b")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"FAIL fakeqwen-7b ({QWEN}@v1.0): cannot fetch its small files: "
                           f"the hub at http://127.0.0.1:{port} cannot be reached (ConnectError: ")


def test_a_cache_it_cannot_write_is_one_line(tmp_path: Path, hub: FakeHub) -> None:
    cache = tmp_path / "not-a-folder"
    cache.write_text("")
    done = _cardtune(tmp_path, hub.url, "fakeqwen-7b", cache=cache)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"FAIL fakeqwen-7b ({QWEN}@v1.0): cannot fetch its small files: Not a directory: "
        f"{cache / 'hub'} (set CARDTUNE_CACHE to a folder it can write)"
    ]


def test_offline_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # conftest runs the tests with HF_HUB_OFFLINE=1
    rc = main(["check", "fakeqwen-7b", "--fetch", "--cards", str(_cards(tmp_path, ENTRIES))])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.out == ""
    assert captured.err == (
        f"FAIL fakeqwen-7b ({QWEN}@v1.0): cannot fetch its small files: the hub is offline (HF_HUB_OFFLINE or "
        "TRANSFORMERS_OFFLINE is set): unset it, or check a local copy with --model-path DIR\n"
    )


@pytest.mark.parametrize(("args", "message"), [
    (["--fetch"], "--fetch downloads each model's files: give MODEL_IDs or --changed-since GIT_REF"),
    (["x", "--fetch", "--models-dir", "."],
     "--fetch downloads the models' files: give it without --model-path and --models-dir"),
    (["--changed-since", "HEAD"],
     "--changed-since selects the models to check on their files: give --fetch or --models-dir"),
    (["x", "--fetch", "--changed-since", "HEAD"], "give MODEL_IDs or --changed-since, not both"),
])
def test_option_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *args]) == 2
    assert capsys.readouterr().err == f"cardtune check: {message}\n"


# -- --changed-since --------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def card_repo(tmp_path: Path) -> Path:
    """A git repository holding cards/fakeqwen.yaml with two entries, committed."""
    repo = tmp_path / "repo"
    _cards(repo / "cards", ENTRIES[:2])
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "cards")
    return repo


def _edit(repo: Path, edit) -> None:  # noqa: ANN001 - a function of the card dict
    path = repo / "cards" / "fakeqwen.yaml"
    card = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(card)
    path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")


def test_changed_since_selects_the_changed_entries(card_repo: Path) -> None:
    cards = [card_repo / "cards", REPO / "configs" / "models"]  # the built-in folder is another repository's
    assert changed_model_ids("HEAD", cards, cwd=card_repo) == []
    _edit(card_repo, lambda c: c["models"].append({"model_id": "fakeqwen-new", "hf_path": "fakeorg/new"}))
    assert changed_model_ids("HEAD", cards, cwd=card_repo) == ["fakeqwen-new"]
    _edit(card_repo, lambda c: c["models"][1].update(revision="v2"))
    assert changed_model_ids("HEAD", cards, cwd=card_repo) == ["fakeqwen-missing", "fakeqwen-new"]
    _git(card_repo, "commit", "-q", "-am", "two entries")
    assert changed_model_ids("HEAD", cards, cwd=card_repo) == []
    assert changed_model_ids("HEAD~1", cards, cwd=card_repo) == ["fakeqwen-missing", "fakeqwen-new"]
    _edit(card_repo, lambda c: c.update(description="edited"))  # a family field: every id
    assert changed_model_ids("HEAD", cards, cwd=card_repo) == ["fakeqwen-7b", "fakeqwen-missing", "fakeqwen-new"]
    # A card file the ref does not have: all its ids are new.
    (card_repo / "cards" / "other.yml").write_text(
        "family: other\nmodel_class: X\nmodules: {llm: [model]}\nmodels: [{model_id: o-1, hf_path: a/b}]\n")
    assert "o-1" in changed_model_ids("HEAD", cards, cwd=card_repo)


def test_changed_since_errors(card_repo: Path, tmp_path: Path) -> None:
    cards = [card_repo / "cards"]
    with pytest.raises(CardError) as bad_ref:
        changed_model_ids("nope", cards, cwd=card_repo)
    assert str(bad_ref.value) == f"--changed-since nope: no such commit in {card_repo} (fetch it: `git fetch origin`)"
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(CardError) as no_git:
        changed_model_ids("HEAD", cards, cwd=outside)
    assert str(no_git.value) == (f"--changed-since HEAD: {outside} is not in a git repository: "
                                 "run it in the clone of the change")
    with pytest.raises(CardError) as no_cards:
        changed_model_ids("HEAD", [REPO / "configs" / "models"], cwd=card_repo)
    assert str(no_cards.value) == (f"--changed-since HEAD: no card folder is inside the git repository {card_repo} "
                                   "(give --cards DIR)")


def test_models_dir_changed_since_checks_the_new_entry(
    card_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "fakeqwen-new").symlink_to(require_fixture("qwen2.5-7b-instruct"))
    (models / "fakeqwen-7b").symlink_to(require_fixture("qwen2.5-7b-instruct"))  # unchanged: not checked
    monkeypatch.chdir(card_repo)
    args = ["check", "--models-dir", str(models), "--changed-since", "HEAD", "--cards", str(card_repo / "cards")]
    assert main(args) == 0
    assert capsys.readouterr().out == "ok: no model entry changed since HEAD\n"
    _edit(card_repo, lambda c: c["models"].append({"model_id": "fakeqwen-new", "hf_path": "fakeorg/new"}))
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "changed since HEAD: fakeqwen-new"
    assert lines[1] == f"fakeqwen-new on {models / 'fakeqwen-new'} (card: {card_repo / 'cards' / 'fakeqwen.yaml'})"
    assert lines[-1] == "ok: 1 model checked on their folders"
