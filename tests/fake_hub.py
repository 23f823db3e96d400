"""A loopback HTTP server answering the part of the Hugging Face Hub API that ``huggingface_hub`` uses to push and
pull: repo creation, branch creation, YAML validation, preupload, NDJSON commits, revision info, the file tree, and
``resolve`` HEAD/GET. Files are always "regular" uploads (base64 in the commit), so no LFS or Xet traffic happens.

It checks ``Authorization: Bearer <token>`` against ``tokens`` (a rejected token gets 401 with the Hub's
"Invalid credentials" message), keeps every commit, and can serve a damaged body for a path (``corrupt``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """``with FakeHub(tokens={"hf_good": "alice"}) as hub: hub.url``"""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {"hf_good": "alice"})
        self.repos: dict[str, Repo] = {}
        self.corrupt: dict[str, bytes] = {}   # path in repo → body served instead of the real one
        self.requests: list[str] = []
        self._counter = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes]) -> str:
        with self._lock:
            self._counter += 1
            sha = hashlib.sha1(f"commit {self._counter}".encode()).hexdigest()
        repo.commits[sha] = {**(repo.commits[parent] if parent else {}), **files}
        return sha


_REPO_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|revision|tree|branch)/([^/?]+)(/.*)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing -------------------------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json", head: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
            self._send(status, json.dumps(obj).encode(), headers, head=head)

        def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _user(self) -> tuple[bool, str | None]:
            """(credentials acceptable, user name); no Authorization header is acceptable for public reads."""
            auth = self.headers.get("Authorization", "")
            if not auth:
                return True, None
            token = auth.removeprefix("Bearer ").strip()
            return (token in hub.tokens), hub.tokens.get(token)

        def _authorised(self, write: bool, head: bool = False) -> str | None | bool:
            ok, user = self._user()
            if not ok:
                self._error(401, None, "Invalid credentials in Authorization header", head=head)
                return False
            if write and user is None:
                self._error(401, None, "You must be authenticated to write", head=head)
                return False
            return user

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._user()[1]):
                self._error(404, "RepoNotFound", "Repository not found", head=head)
                return None
            return repo

        def _commit(self, repo_id: str, revision: str, head: bool) -> tuple[Repo | None, str | None]:
            """(repo, commit sha) of a readable repo's revision; (…, None) after answering 404."""
            repo = self._repo(repo_id, head)
            if repo is None:
                return None, None
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return repo, sha

        # -- verbs ----------------------------------------------------------------------------------------------
        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(f"POST {path}")
            body = self._body()
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            user = self._authorised(write=True)
            if user is False:
                return None
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or user}/{payload['name']}"
                if repo_id in hub.repos:
                    return self._error(409, None, "You already created this model repo")
                repo = Repo(private=payload.get("private") is True or payload.get("visibility") == "private")
                repo.branches["main"] = hub.new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs\n"})
                hub.repos[repo_id] = repo
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            m = _REPO_API.match(path)
            if not m:
                return self._error(404, None, f"no route for POST {path}")
            repo_id, verb, revision = m.group(1), m.group(2), unquote(m.group(3))
            repo = self._repo(repo_id)
            if repo is None:
                return None
            if verb == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                   "oid": None} for f in files]})
            if verb == "branch":
                if revision in repo.branches:
                    return self._error(409, None, "Reference already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[revision] = repo.resolve(start)
                return self._json(200, {})
            if verb == "commit":
                parent = repo.resolve(revision)
                if parent is None or revision not in repo.branches:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                files = {}
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] != "header":
                        return self._error(400, None, f"unsupported commit operation {item['key']}")
                sha = hub.new_commit(repo, parent, files)
                repo.branches[revision] = sha
                return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None})
            return self._error(404, None, f"no route for POST {path}")

        def do_GET(self, head: bool = False) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(f"{'HEAD' if head else 'GET'} {path}")
            if self._authorised(write=False, head=head) is False:
                return None
            m = _REPO_API.match(path)
            if m:
                repo_id, verb, revision = m.group(1), m.group(2), unquote(m.group(3))
                repo, sha = self._commit(repo_id, revision, head)
                if sha is None:
                    return None
                files = repo.commits[sha]
                if verb == "revision":
                    return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                            "siblings": [{"rfilename": p} for p in sorted(files)]}, head=head)
                if verb == "tree":  # the recursive listing is the only one used; folders are not modelled
                    return self._json(200, [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                                            for p, d in sorted(files.items())], head=head)
            m = _RESOLVE.match(path)
            if m:
                repo_id, revision, name = m.group(1), unquote(m.group(2)), unquote(m.group(3))
                repo, sha = self._commit(repo_id, revision, head)
                if sha is None:
                    return None
                if name not in repo.commits[sha]:
                    return self._error(404, "EntryNotFound", f"{name} does not exist", head=head)
                data = repo.commits[sha][name]
                served = hub.corrupt.get(name, data)
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'}
                return self._send(200, served, headers, content_type="application/octet-stream", head=head)
            return self._error(404, None, f"no route for GET {path}", head=head)

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

    return Handler
