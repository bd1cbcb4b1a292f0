"""Stdlib-only local stand-in for the Hugging Face Hub HTTP API.

Good enough for the real `huggingface_hub` client (checked against 2.4.0) to run
`create_repo`, `create_branch`, `upload_folder` / `create_commit` (regular + basic-LFS files),
`repo_info` / `model_info` and `whoami` against it.

Client-side requirement: set HF_HUB_DISABLE_XET=1 in the environment BEFORE importing
huggingface_hub (or set `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`). The client picks
Xet purely locally (`is_xet_available()`: hf_xet installed and not disabled); no server answer can
steer it back to LFS. If Xet is left on, the client asks GET /api/{t}/{repo}/xet-write-token/{rev};
this server answers 500 naming the env var and records it in `unexpected`, and hf_xet retries for
~2 min before raising a builtin ConnectionError.

Endpoints (`{t}` = models|datasets|spaces, `{repo}` = "namespace/name", `{rev}` URL-quoted):
  POST /api/repos/create                      -> {"url": ...}; 409 (+ "url") if it exists
  POST /api/{t}/{repo}/branch/{rev}           -> {}; 409 if branch exists; body {"startingPoint"?}
  GET  /api/{t}/{repo}[/revision/{rev}]       -> repo info {"id", "sha", "private", "siblings"}
  GET  /api/whoami-v2                         -> {"type": "user", "name": ...}
  POST /api/validate-yaml                     -> {"errors": [], "warnings": []}
  POST /api/{t}/{repo}/preupload/{rev}        -> {"files": [{path, uploadMode, shouldIgnore, oid}]}
  POST /[{t}/]{repo}.git/info/lfs/objects/batch -> basic transfer, href = PUT /_lfs_upload/...
  PUT  /_lfs_upload/{oid}/{nonce}             -> stores the bytes (sha256 + size checked, else 400)
  POST /api/{t}/{repo}/commit/{rev}           -> NDJSON commit; {"commitUrl", "commitOid", ...}
  GET  /api/agent-harnesses                   -> 404 (see below)

Auth: with `token=...`, every request must carry `Authorization: Bearer <token>` (else 401),
except (a) the LFS PUT: like the S3 presigned URL it stands for, the client sends it WITHOUT auth
headers; its random nonce is the credential (the user's token is never put in a URL), and
(b) GET /api/agent-harnesses: unless HF_HUB_DISABLE_TELEMETRY=1, the client fetches this registry
once per process, unauthenticated, while building its first User-Agent. It is answered 404 so the
client keeps going (it swallows errors) and caches nothing under HF_HOME.

Fault knobs (set on the instance at any time; thread-safe):
  fail_auth = True  -> EVERY request (LFS PUT included) answers 401 {"error": "Invalid credentials..."}.
  fail_5xx = N      -> the next N requests of route `fail_5xx_on` (default "commit"; any route name
                       from ROUTES below, or "any") answer 503, then behave normally.
  fail_413 = True   -> the LFS PUT answers 413 (bytes discarded). fail_413 = "commit": the commit does.
Anything unknown is appended to `unexpected` and answered 500 with a JSON error.
Client retry behaviour (2.4.0, non-Xet path): preupload, LFS batch and LFS PUT go through
`http_backoff` (retries 408/429/5xx and connection errors 5 times, sleeping 1, 2, 4, 8, 8 s);
commit, create_repo, create_branch, validate-yaml, repo_info and whoami are NOT retried.
So a 500 for an unknown endpoint reached through http_backoff costs ~23 s before failing.
"""
import base64
import fnmatch
import hashlib
import json
import re
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub's default .gitattributes stores in LFS (subset), plus binary or >= 10 MiB files.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.gguf",
                "*.msgpack", "*.npy", "*.npz", "*.pkl", "*.zip", "*.tar.gz", "*.parquet", "*.arrow")
LFS_SIZE = 10 * 1024 * 1024
T = r"(?P<t>models|datasets|spaces)"
R = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [  # (method, compiled regex, route name); matched against the raw (still quoted) path
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(rf"^/api/{T}/{R}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/{T}/{R}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{T}/{R}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/(?:(?:datasets|spaces)/)?{R}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/_lfs_upload/(?P<oid>[0-9a-f]{64})/(?P<nonce>[0-9a-f]+)$"), "lfs_put"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
    ("GET", re.compile(rf"^/api/{T}/{R}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
]


class HubError(Exception):
    """Raised by handlers: becomes a JSON error response (plus optional X-Error-Code header)."""

    def __init__(self, status, message, code=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path, size, sample):
    return size >= LFS_SIZE or b"\0" in sample or any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)


class FakeHub:
    def __init__(self, token=None, user="fake-user"):
        self.token, self.user = token, user
        # repo_id -> {"type", "private", "created", "branches": {name: head oid|None}, "commits": [
        #             {"oid", "message", "description", "revision", "parent", "files": {path: bytes}}]}
        self.repos = {}
        self.blobs = {}        # sha256 hex -> bytes, filled by LFS PUTs
        self.pending = {}      # nonce -> (oid, size) handed out by the LFS batch endpoint
        self.requests = []     # {"method", "path", "headers": [(k, v)], "body": bytes, "route", "status"}
        self.unexpected = []   # {"method", "path", "reason"}
        self.fail_auth, self.fail_5xx, self.fail_5xx_on, self.fail_413 = False, 0, "commit", False
        self._lock = threading.RLock()
        self._server = self._thread = self.url = None
        self._conns = set()    # open client sockets, closed by stop() (keep-alive would outlive it)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self):
        handler = type("Handler", (_Handler,), {"hub": self})  # per-instance handler class
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            with self._lock:
                for conn in list(self._conns):  # so a client sees "connection refused" afterwards
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---- test helpers ----------------------------------------------------------------------
    def commits(self, repo_id):
        return list(self.repos[repo_id]["commits"]) if repo_id in self.repos else []

    def files(self, repo_id, revision="main"):
        """Full tree {path: bytes} at the head of `revision` (a branch name or a commit oid)."""
        return dict(self._tree(self.repos[repo_id], revision))

    def token_leaks(self):
        """Requests where the token appears anywhere but an `Authorization: Bearer` header."""
        tok = (self.token or "").encode()
        bad = []
        for r in self.requests:
            where = [k for k, v in r["headers"] if tok in v.encode() and not
                     (k.lower() == "authorization" and v == "Bearer " + self.token)]
            if tok in r["path"].encode() or tok in unquote(r["path"]).encode() or tok in r["body"]:
                where.append("path/query/body")
            if where:
                bad.append((r["method"], r["path"], where))
        return bad if tok else []

    # ---- internals -------------------------------------------------------------------------
    def _repo(self, repo_id):
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _head(self, repo, rev):
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if any(c["oid"] == rev for c in repo["commits"]):
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _tree(self, repo, rev):
        oid = self._head(repo, rev)
        return next((c["files"] for c in repo["commits"] if c["oid"] == oid), {})

    def handle(self, route, m, query, body, base):
        """Dispatch one authorised request; returns (status, json_obj)."""
        g = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
        if route == "whoami":
            return 200, {"type": "user", "name": self.user, "auth": {"type": "access_token"}}
        if route == "agent_harnesses":
            raise HubError(404, "fake hub: no agent-harnesses registry")
        if route == "validate_yaml":
            return 200, {"errors": [], "warnings": []}
        if route == "create_repo":
            p = json.loads(body or b"{}")
            repo_id = f"{p.get('organization') or self.user}/{p['name']}"
            prefix = "" if p.get("type", "model") == "model" else p["type"] + "s/"
            url = f"{base}/{prefix}{repo_id}"
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            self.repos[repo_id] = {"type": p.get("type", "model"), "created": True, "commits": [],
                                   "private": p.get("visibility") == "private", "branches": {"main": None}}
            return 200, {"url": url, "name": repo_id}
        if route == "lfs_put":
            oid, size = self.pending.pop(g["nonce"], (None, None))
            if oid != g["oid"]:
                raise HubError(403, "Unknown or already used LFS upload URL")
            if hashlib.sha256(body).hexdigest() != oid or len(body) != size:
                raise HubError(400, f"LFS upload does not match oid {oid} / size {size}")
            self.blobs[oid] = body
            return 200, None
        repo = self._repo(g["repo"])
        if route == "repo_info":  # enough for ModelInfo/DatasetInfo(**json)
            rev = g.get("rev", "main")
            return 200, {"id": g["repo"], "sha": self._head(repo, rev), "private": repo["private"],
                         "siblings": [{"rfilename": p} for p in sorted(self._tree(repo, rev))]}
        if route == "create_branch":
            start = json.loads(body or b"{}").get("startingPoint", "main")
            if g["rev"] in repo["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{g['rev']}")
            repo["branches"][g["rev"]] = self._head(repo, start)
            return 200, {}
        if route == "preupload":
            if "create_pr" in query:
                raise HubError(500, "fake hub: create_pr is not supported")
            tree, out = self._tree(repo, g["rev"]), []
            for f in json.loads(body)["files"]:
                lfs = _is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
                old = tree.get(f["path"])  # oid as the client computes it, so unchanged files are skipped
                oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else _git_sha1(old)
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
            return 200, {"files": out}
        if route == "lfs_batch":
            p, objects = json.loads(body), []
            if p.get("operation") != "upload" or "basic" not in p.get("transfers", ["basic"]):
                raise HubError(500, f"fake hub: unsupported LFS batch request {p}")
            for o in p["objects"]:
                obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in self.blobs:  # already stored => no "actions" => client skips the PUT
                    nonce = secrets.token_hex(16)
                    self.pending[nonce] = (o["oid"], o["size"])
                    obj["actions"] = {"upload": {"href": f"{base}/_lfs_upload/{o['oid']}/{nonce}"}}
                objects.append(obj)
            return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        if route == "commit":
            return 200, self._commit(g["repo"], repo, g["rev"], query, body, base)
        raise HubError(500, f"fake hub: no handler for {route}")

    def _commit(self, repo_id, repo, rev, query, body, base):
        if "create_pr" in query or "hot_reload" in query:
            raise HubError(500, f"fake hub: unsupported commit params {sorted(query)}")
        if rev not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First NDJSON line must be the commit header")
        header, files, added = lines[0]["value"], dict(self._tree(repo, rev)), {}
        parent = header.get("parentCommit")
        if parent is not None and parent != repo["branches"][rev]:
            raise HubError(412, f"A commit has happened since. parentCommit {parent} is not the head")
        for item in lines[1:]:
            key, v = item.get("key"), item.get("value", {})
            if key == "file":
                if v.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {v.get('encoding')!r}")
                files[v["path"]] = added[v["path"]] = base64.b64decode(v["content"])
            elif key == "lfsFile":
                data = self.blobs.get(v["oid"])
                if data is None or v.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                if "size" in v and v["size"] != len(data):
                    raise HubError(400, f"LFS object {v['oid']}: size {v['size']} != {len(data)}")
                files[v["path"]] = added[v["path"]] = data
            elif key == "deletedFile":
                if files.pop(v["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = v["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(500, f"fake hub: unknown commit line key {key!r}")
        oid = hashlib.sha1(b"%d:%s" % (len(repo["commits"]), secrets.token_bytes(8))).hexdigest()
        repo["commits"].append({"oid": oid, "message": header.get("summary"), "revision": rev,
                                "description": header.get("description", ""), "files": files, "added": added,
                                "parent": repo["branches"][rev]})
        repo["branches"][rev] = oid
        prefix = "" if repo["type"] == "model" else repo["type"] + "s/"
        return {"success": True, "commitOid": oid, "commitUrl": f"{base}/{prefix}{repo_id}/commit/{oid}",
                "pullRequestUrl": None}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like the real Hub; we always read the full body
    hub: FakeHub = None

    def log_message(self, *args):  # silence the default stderr access log
        pass

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self):
        super().finish()
        with self.hub._lock:
            self.hub._conns.discard(self.connection)

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status, obj, headers=()):
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self):
        hub, body = self.hub, self._read_body()
        split = urlsplit(self.path)
        base = "http://{}:{}".format(*self.server.server_address[:2])
        rec = {"method": self.command, "path": self.path, "headers": list(self.headers.items()),
               "body": body, "route": None, "status": None}
        with hub._lock:
            hub.requests.append(rec)
            route, m = next(((n, rx.match(split.path)) for meth, rx, n in ROUTES
                             if meth == self.command and rx.match(split.path)), (None, None))
            rec["route"] = route
            status, obj, headers = self._answer(hub, route, m, split, body, base)
            rec["status"] = status
        self._send(status, obj, headers)

    def _answer(self, hub, route, m, split, body, base):
        exempt = route in ("lfs_put", "agent_harnesses")
        if hub.fail_auth or (hub.token and not exempt and
                             self.headers.get("Authorization") != f"Bearer {hub.token}"):
            # This X-Error-Message makes the client raise a plain HfHubHTTPError (not RepositoryNotFound)
            msg = "Invalid credentials in Authorization header"
            return 401, {"error": msg}, [("X-Error-Message", msg)]
        if route is None:
            reason = "unknown endpoint or method"
            if "xet-write-token" in split.path or "xet-read-token" in split.path:
                reason = "Xet is not supported: set HF_HUB_DISABLE_XET=1 before importing huggingface_hub"
            hub.unexpected.append({"method": self.command, "path": self.path, "reason": reason})
            return 500, {"error": f"fake hub: {reason}: {self.command} {split.path}"}, []
        if hub.fail_5xx > 0 and hub.fail_5xx_on in (route, "any"):
            hub.fail_5xx -= 1
            return 503, {"error": "Service Unavailable (injected by fake hub)"}, []
        if hub.fail_413 and route == ("commit" if hub.fail_413 == "commit" else "lfs_put"):
            return 413, {"error": "Payload Too Large (injected by fake hub)"}, []
        try:
            status, obj = hub.handle(route, m, parse_qs(split.query), body, base)
            return status, obj, []
        except HubError as e:
            if e.status == 500:
                hub.unexpected.append({"method": self.command, "path": self.path, "reason": e.message})
            return e.status, {"error": e.message, **e.extra}, [("X-Error-Code", e.code)] if e.code else []
        except (KeyError, ValueError, TypeError) as e:  # malformed request body
            hub.unexpected.append({"method": self.command, "path": self.path, "reason": repr(e)})
            return 500, {"error": f"fake hub: cannot handle request: {e!r}"}, []

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch
