"""Reading W&B's offline run files, and a stub W&B server for `wandb sync`: shared by the W&B tests.

The offline checks read what wandb wrote to disk: the run's ``.wandb`` file, a LevelDB-style log of
protobuf records (what ``wandb sync`` replays), decoded with wandb's own protobuf classes. This reader
is the tests' own (strict: it checks the file header and waits for the run's exit record), independent
of ``marl_exp.run.tracking.wandb_history_steps``.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


# ------------------------------------------------------------------------------- reading .wandb files
def wandb_records(run_dir: Path, timeout_s: float = 60.0) -> list:
    """Every record of the one offline W&B run under ``run_dir``."""
    (path,) = (Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")
    return wandb_file_records(path, timeout_s)


def wandb_file_records(path: Path, timeout_s: float = 60.0) -> list:
    """Every record of one ``.wandb`` file.

    wandb-core writes the file in the background and may still be writing when ``run.finish()``
    returns, so read until the run's exit record is there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = _parse_wandb_log(Path(path).read_bytes())
        if records is not None and any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.2)


def killed_wandb_file_records(path: Path) -> list:
    """The records of the ``.wandb`` file of a killed process: those before the record it was writing."""
    records = _parse_wandb_log(Path(path).read_bytes(), cut=True)
    assert not any(r.WhichOneof("record_type") == "exit" for r in records)
    return records


def _parse_wandb_log(data: bytes, cut: bool = False) -> list | None:
    """Records of a LevelDB-style log (header ':W&B', 32 KiB blocks of 7-byte-header chunks). When the
    data ends inside a record: None, or with ``cut`` the records before it."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    if len(data) < header:
        return [] if cut else None
    ident, magic, _version = struct.unpack("<4sHB", data[:header])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, chunks, pos = [], [], header
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # block trailer
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        if pos + header + length > len(data):
            return records if cut else None
        chunks.append(data[pos + header:pos + header + length])
        pos += header + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records if cut or not chunks else None


class StubWandbServer:
    """Enough of a W&B server for `wandb sync` (wandb 0.31): answers the GraphQL operations a sync sends,
    keeps one artifact version per (name, digest) as the real server does, keeps each run's history rows,
    summary and config as its file stream and upserts send them (and answers `RunResumeStatus` from them,
    so a resumed run continues where the server's copy ends), and records every operation. Unknown
    operations get an empty answer."""

    def __init__(self):
        self.operations: list[tuple[str, dict, dict]] = []  # (name, input variables, data answered)
        self.versions: dict[tuple[str, str], dict] = {}
        self.runs: dict[str, dict] = {}  # run id → {"history": [row dicts], "summary": {}, "config": {}}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # GraphQL, file stream, telemetry
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/file_stream"):  # /files/<entity>/<project>/<run id>/file_stream
                    stub.file_stream(self.path.split("/")[-2], json.loads(body))
                if not self.path.startswith("/graphql"):
                    return self._reply({})
                request = json.loads(body)
                variables = request.get("variables") or {}
                variables = variables.get("input") or variables
                data = stub.answer(request.get("operationName", ""), variables)
                stub.operations.append((request.get("operationName", ""), variables, data))
                self._reply({"data": data})

            def do_PUT(self):  # file uploads to the URLs handed out
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def run(self, run_id: str) -> dict:
        return self.runs.setdefault(run_id, {"history": [], "summary": {}, "config": {}})

    def file_stream(self, run_id: str, payload: dict) -> None:
        """History lines land at their offset (a resumed run's start after the rows the server has)."""
        run = self.run(run_id)
        for name, chunk in (payload.get("files") or {}).items():
            if name == "wandb-history.jsonl":
                run["history"][chunk["offset"]:] = [json.loads(line) for line in chunk["content"]]
            elif name == "wandb-summary.json" and chunk["content"]:
                run["summary"] = json.loads(chunk["content"][-1])

    def answer(self, operation: str, v: dict) -> dict:
        if operation == "RunResumeStatus":
            project = {"id": "p", "name": v.get("project") or "p", "entity": {"id": "e", "name": "e"}}
            run = self.runs.get(v["name"])
            if run is None:
                return {"model": {**project, "bucket": None}}
            return {"model": {**project, "bucket": {
                "id": v["name"], "name": v["name"], "displayName": v["name"],
                "summaryMetrics": json.dumps(run["summary"]),
                "logLineCount": 0, "historyLineCount": len(run["history"]), "eventsLineCount": 0,
                "historyTail": json.dumps([json.dumps(row) for row in run["history"][-10:]]), "eventsTail": "[]",
                "config": json.dumps(run["config"]), "tags": [], "notes": None, "wandbConfig": json.dumps({"t": 1})}}}
        if operation == "UpsertBucket":
            if v.get("config"):
                self.run(v["name"])["config"] = json.loads(v["config"])
            return {"upsertBucket": {"inserted": True, "bucket": {
                "id": v.get("name"), "name": v.get("name"), "displayName": v.get("name"),
                "project": {"id": "p", "name": v.get("project") or "p", "entity": {"id": "e", "name": "e"}}}}}
        if operation == "CreateRunFiles":
            return {"createRunFiles": {"runID": "r", "uploadHeaders": [],
                                       "files": [{"name": f, "uploadUrl": f"{self.url}/up/{f}"} for f in v["files"]]}}
        if operation == "CreateArtifact":
            version = self.versions.setdefault((v["artifactCollectionName"], v["digest"]),
                                               {"id": f"artifact-{len(self.versions)}", "state": "PENDING"})
            return {"createArtifact": {"artifact": {**version, "artifactSequence": {"latestArtifact": None}}}}
        if operation == "CreateArtifactManifest":
            return {"createArtifactManifest": {"artifactManifest": {"id": "manifest", "file": {
                "id": "f", "uploadUrl": f"{self.url}/up/manifest", "uploadHeaders": []}}}}
        if operation == "CreateArtifactFiles":
            return {"createArtifactFiles": {"files": {"edges": [
                {"node": {"id": spec["name"], "uploadUrl": f"{self.url}/up/{spec['name']}", "uploadHeaders": [],
                          "artifact": {"id": spec["artifactID"]}}} for spec in v["artifactFiles"]]}}}
        if operation == "CommitArtifact":
            for version in self.versions.values():
                if version["id"] == v["artifactID"]:
                    version["state"] = "COMMITTED"
            return {"commitArtifact": {"artifact": {"id": v["artifactID"]}}}
        if operation == "UseArtifact":
            return {"useArtifact": {"artifact": {"id": v["artifactID"]}}}
        return {}

    def __enter__(self) -> "StubWandbServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
