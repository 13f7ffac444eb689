"""The advisor service over real HTTP on 127.0.0.1: a `mondrian serve` process on a tiny llama
with LoRA versions from a real registry, hot swaps under concurrent load, A/B routing, shadow,
fallback, the requests table surviving kill -9, and 4xx on bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mondrian.registry.store import Registry
from tests.helpers import ServeProcess, flip_production_while, write_random_adapter

ADV = "fit-query"
TOKEN = "s3cret-token"
QUESTIONS = ["wind sites over 100kw in kent", "solar in devon", "hydro schemes", "fit rate for fit id 12",
             "compare wind and solar in wales", "micro chp under 5kw", "anaerobic digestion in essex",
             "large solar farms in cornwall"]
MAX_TOKENS = 8


# ---- a server process and a small HTTP client


class Server(ServeProcess):
    def ask(self, text: str, **extra) -> tuple[int, dict]:
        return self.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": text, **extra})


def start_server(tmp: Path, *args: str) -> Server:
    return Server(tmp, *args, token=TOKEN, timeout=120)


# ---- fixtures: a registry with three versions, and what each version answers alone


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    reg = Registry(root)
    for seed in (1, 2, 3):  # v3 has another layout: a swap to it re-wraps the layers
        lora = {"rank": 4 if seed < 3 else 8, "scale": 10.0, "dropout": 0.0}
        src = write_random_adapter(root.parent / f"src{seed}", str(tiny_llama.path), seed=seed,
                                   num_layers=2 if seed < 3 else 3, lora=lora, amplitude=0.2)
        reg.publish(src, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    reg.set_alias(ADV, "production", "v1")
    return root


@pytest.fixture(scope="module")
def reference(registry, tiny_llama) -> dict:
    """version -> question -> the greedy answer of a fresh mlx_lm.load(base, adapter) alone: its
    tokens from mlx-lm's stream_generate, decoded whole (the streaming detokenizer drops a
    leading space that the tokens have)."""
    from mlx_lm import load, stream_generate

    from mondrian.core.contracts import get_advisor
    from mondrian.models.generation import chat_prompt

    advisor = get_advisor(ADV)  # these versions pin no prompt: asked as the advisor asks now
    out = {}
    for version in (None, "v1", "v2", "v3"):
        model, tok = load(str(tiny_llama.path), adapter_path=str(registry / ADV / version) if version else None)
        out[version] = {}
        for q in QUESTIONS:
            prompt = chat_prompt(tok, advisor.messages(q))  # "5kw" reads "5 kw" (input_units)
            tokens = [r.token for r in stream_generate(model, tok, prompt, max_tokens=MAX_TOKENS)
                      if r.token not in tok.eos_token_ids]
            out[version][q] = tok.decode(tokens)
    assert len({tuple(v.values()) for v in out.values()}) == 4  # every version answers differently
    return out


def write_routing(path: Path, **route) -> None:
    base = {"model": "tiny:llama", "max_tokens": MAX_TOKENS, "fallback": "none", "sticky": "user",
            "arms": [{"name": "control", "version": "production", "weight": 1}]}
    path.write_text(yaml.safe_dump({"advisors": {ADV: base | route}}))


@pytest.fixture(scope="module")
def served(tmp_path_factory, registry):
    tmp = tmp_path_factory.mktemp("served")
    routing = tmp / "routing.yaml"
    write_routing(routing, arms=[{"name": "control", "version": "production", "weight": 1},
                                 {"name": "candidate", "version": "v3", "weight": 1}])
    server = start_server(tmp, "--routing", str(routing), "--root", str(registry), "--db", str(tmp / "m.db"))
    server.tmp, server.routing, server.db = tmp, routing, tmp / "m.db"
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]  # SIGTERM: a clean exit


def rows(db: Path, where: str = "1", args=()) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM requests WHERE {where}", args)]
    finally:
        conn.close()


# ---- the acceptance test: production swapped every 50 ms under 8 concurrent clients


def test_swaps_under_concurrent_load_never_mix_adapters(served, reference):
    def client(n: int) -> tuple[int, dict, str]:
        q = QUESTIONS[n % len(QUESTIONS)]
        if n % 10 == 0:  # some clients pin a version, as advisor@version through the OpenAI route
            status, body = served.call("POST", "/v1/chat/completions", {
                "model": f"{ADV}@v2", "messages": [{"role": "user", "content": q}], "user": f"u{n}"})
            return status, {"text": body.get("choices", [{}])[0].get("message", {}).get("content"),
                            **body.get("mondrian", {}), "raw": body}, q
        status, body = served.ask(q, user=f"user-{n % 37}")
        return status, body, q

    results, swaps = flip_production_while(served, ADV, client, 500, 8)
    failed = [(s, b) for s, b, _ in results if s != 200]
    assert not failed, failed[:3]
    assert len(swaps) >= 10 and {"v1", "v2"} <= set(swaps)
    served_by = {}
    for _, body, q in results:
        version = body["version"]
        served_by[version] = served_by.get(version, 0) + 1
        assert body["text"] == reference[version][q], (version, q)  # exactly what that version says alone
    assert {"v1", "v2", "v3"} <= set(served_by)  # both production targets and the candidate arm served
    recorded = {r["request_id"]: r for r in rows(served.db)}
    for _, body, _ in results:
        assert recorded[body["request_id"]]["served_version"] == body["version"]
    (model,) = served.call("GET", "/admin/state", token=TOKEN)[1]["models"].values()
    assert model["mixed_version_calls"] > 10  # rows of different versions really shared batches


def test_sticky_assignment_and_weights(served):
    arms = {}
    for user in ("alice", "bob", "carol", "dave"):
        got = {served.ask("solar in devon", user=user)[1]["arm"] for _ in range(3)}
        assert len(got) == 1  # the same user keeps one arm
        arms[user] = got.pop()
    from mondrian.serve.routing import Plan, ResolvedArm

    plan = Plan(ADV, (ResolvedArm("control", None, None, 1), ResolvedArm("candidate", None, None, 1)),
                None, "user", "none", None, 8)
    assert arms == {u: plan.assign(u).name for u in arms}  # the documented pure function
    share = sum(plan.assign(f"user-{i}").name == "control" for i in range(4000)) / 4000
    assert 0.47 < share < 0.53


def test_openai_client_and_models(served, reference):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ADV in ids and f"{ADV}@v1" in ids and f"{ADV}@v3" in ids
    r = client.chat.completions.create(model=f"{ADV}@v2", messages=[{"role": "user", "content": QUESTIONS[1]}])
    assert r.model == f"{ADV}@v2" and r.choices[0].message.content == reference["v2"][QUESTIONS[1]]
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
    with pytest.raises(NotFoundError, match="no version or alias 'v99'"):
        client.chat.completions.create(model=f"{ADV}@v99", messages=[{"role": "user", "content": "hi"}])
    assert served.call("GET", "/health")[1]["status"] == "ok"


def test_payloads_and_feedback_over_http(served):
    """The row keeps the input and the answer (log_payloads full, the default); the OpenAI id
    is the request id, and feedback on it is recorded once per user, checked, and 4xx else."""
    from openai import OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=ADV, messages=[{"role": "user", "content": QUESTIONS[2]}], user="ann")
    (row,) = rows(served.db, "request_id = ?", (r.id,))
    assert row["payloads"] == "full" and row["input_text"] == QUESTIONS[2]
    assert row["answer_text"] == r.choices[0].message.content
    assert row["answer_sha256"] == hashlib.sha256(row["answer_text"].encode()).hexdigest()
    path = f"/v1/requests/{r.id}/feedback"
    status, body = served.call("POST", path, {"verdict": "accepted", "user": "ann"})
    assert status == 200 and body["changed"] and body["revision"] == 1 and body["advisor"] == ADV, body
    assert served.call("POST", path, {"verdict": "accepted", "user": "ann"})[1]["changed"] is False
    fixed = {"query_type": "search", "technology": "Hydro"}
    status, body = served.call("POST", path, {"verdict": "corrected", "answer": fixed, "user": "ann"})
    assert status == 200 and body["revision"] == 2 and body["answer"] == fixed
    status, body = served.call("POST", path, {"verdict": "corrected", "answer": {"query_type": "search",
                                                                                 "fit_id": "twelve"}})
    assert status == 422 and "$.fit_id" in body["error"]["message"], body
    assert served.call("POST", "/v1/requests/req-nope/feedback", {"verdict": "accepted"})[0] == 404
    assert served.call("POST", path, {"verdict": "maybe"})[0] == 400
    assert served.call("POST", path, raw=b"not json")[0] == 400
    with sqlite3.connect(served.db) as conn:
        assert conn.execute("SELECT verdict, revision FROM feedback WHERE request_id = ?", (r.id,)).fetchall() == \
            [("corrected", 2)]
        assert conn.execute("SELECT count(*) FROM feedback_history WHERE request_id = ?", (r.id,)).fetchone() == (2,)


def oversized_headers_only(server: Server, length: int) -> tuple[int, dict]:
    """Announce a huge body and send none of it: the service must refuse from the headers
    alone (reading 9 MB first is what the limit is there to avoid)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/advisors/{ADV}/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_bad_input_gets_4xx_and_the_service_keeps_serving(served):
    ok = served.ask("solar in devon")
    assert ok[0] == 200
    cases = [
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", raw=b"{not json"), 400, "not JSON"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", raw=b"[1, 2]"), 400, "JSON object"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": 5}), 400, "'text' must be str"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", {"question": "x"}), 400, "unknown field(s) question"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": "   "}), 400, "empty"),
        (served.call("POST", "/v1/advisors/no-such/analyze", {"text": "x"}), 404, "not served here"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": "x", "version": "v42"}), 404, "v42"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": "x" * 5000}), 413, "limit"),
        (oversized_headers_only(served, 9 << 20), 413, "limit"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": "x", "max_tokens": 0}), 400, "max_tokens"),
        (served.call("POST", "/v1/chat/completions", {"model": ADV}), 400, "'messages' is required"),
        (served.call("POST", "/v1/chat/completions", {"model": ADV, "messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 0}), 400, "max_tokens 0"),
        (served.call("POST", f"/v1/advisors/{ADV}/analyze", raw=b'{"text": "x \\ud800"}'), 400, "lone surrogate"),
        (served.call("POST", "/v1/chat/completions", {"model": ADV, "messages": [{"role": "user", "content": "x"}],
                                                      "stream": True}), 400, "stream"),
        (served.call("POST", "/v1/chat/completions", {"model": "nope", "messages": []}), 404, "no such advisor"),
        (served.call("GET", "/admin/state"), 401, "Bearer"),
        (served.call("GET", "/admin/state", token="wrong"), 401, "Bearer"),
        (served.call("POST", f"/admin/advisors/{ADV}/activate", {"version": "v2"}), 401, "Bearer"),
    ]
    for (status, body), want, text in cases:
        assert status == want and text in body["error"]["message"], (want, text, status, body)
    # a corrupt image in a multipart upload
    boundary = "b0undary"
    png_ish = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png_ish + f"\r\n--{boundary}--\r\n".encode()
    status, body = served.call("POST", f"/v1/advisors/{ADV}/analyze", raw=form,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "not a readable image" in body["error"]["message"]
    assert served.ask("solar in devon")[0] == 200  # still serving


def test_refused_versions_leave_the_old_one_serving(served, registry, tiny_llama, reference):
    import mlx.core as mx

    reg = Registry(registry)
    # v4: NaN weights (checksums fine: published that way) -> the smoke generation refuses it
    bad = write_random_adapter(served.tmp / "nan", str(tiny_llama.path), seed=9)
    w = mx.load(str(bad / "adapters.safetensors"))
    w = {k: (v * float("nan") if k.endswith("lora_b") else v) for k, v in w.items()}
    mx.save_safetensors(str(bad / "adapters.safetensors"), w)
    v4 = reg.publish(bad, ADV, base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint).version
    # v5: one flipped byte after publishing -> verification refuses it
    v5 = reg.publish(write_random_adapter(served.tmp / "flip", str(tiny_llama.path), seed=10), ADV,
                     base_model="tiny:llama", base_model_fingerprint=tiny_llama.fingerprint)
    target = v5.path / "adapters.safetensors"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    assert served.call("POST", f"/admin/advisors/{ADV}/activate", {"version": "v1"}, token=TOKEN)[0] == 200
    status, body = served.call("POST", f"/admin/advisors/{ADV}/activate", {"version": v4}, token=TOKEN)
    assert status == 409 and "not finite" in body["error"]["message"]
    status, body = served.call("POST", f"/admin/advisors/{ADV}/activate", {"version": v5.version}, token=TOKEN)
    assert status == 409 and "sha256" in body["error"]["message"]
    assert reg.aliases(ADV)["production"] == "v1"  # the alias never moved
    status, body = served.ask(QUESTIONS[0], version="production")
    assert status == 200 and body["version"] == "v1" and body["text"] == reference["v1"][QUESTIONS[0]]
    status, body = served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": "x", "version": v5.version})
    assert status == 409 and "refused" in body["error"]["message"]


def test_routing_reload_shadow_and_fallback_without_restart(served, reference):
    before = served.call("GET", "/admin/state", token=TOKEN)[1]["advisors"][ADV]["routing_id"]
    write_routing(served.routing, arms=[{"name": "control", "version": "v2", "weight": 1}],
                  shadow="v3", fallback="production")
    deadline = time.time() + 30
    while served.call("GET", "/admin/state", token=TOKEN)[1]["advisors"][ADV]["routing_id"] == before:
        assert time.time() < deadline, "the routing file change was not picked up"
        time.sleep(0.1)
    status, body = served.ask(QUESTIONS[2], user="zed")
    assert status == 200 and body["arm"] == "control"
    # random adapters never meet the contract: the fallback (production) answers, and it is recorded
    row = rows(served.db, "request_id = ?", (body["request_id"],))[0]
    assert row["contract_ok"] == 0 and row["fallback"] == "production" and row["fallback_reason"].startswith("contract")
    assert row["assigned_version"] == "v2" and row["served_version"] == body["version"]
    assert body["text"] == reference[body["version"]][QUESTIONS[2]]
    deadline = time.time() + 30  # the shadow row is written off the request path
    while not rows(served.db, "shadow_of = ?", (body["request_id"],)):
        assert time.time() < deadline
        time.sleep(0.05)
    shadow = rows(served.db, "shadow_of = ?", (body["request_id"],))[0]
    assert shadow["assigned_version"] == "v3" and shadow["served_version"] == "v3" and shadow["status"] == 200
    # the served row keeps the answer it returned (the fallback's); the shadow row, the shadow's
    assert row["answer_text"] == body["text"] and row["input_text"] == shadow["input_text"] == QUESTIONS[2]
    assert shadow["answer_text"] == reference["v3"][QUESTIONS[2]]
    # a broken routing file is refused; the old plan keeps serving
    served.routing.write_text("advisors: {fit-query: {arms: [{name: a, version: v77}]}}")
    deadline = time.time() + 30
    while served.call("GET", "/admin/state", token=TOKEN)[1]["last_reload"].get("ok") is not False:
        assert time.time() < deadline
        time.sleep(0.1)
    assert "v77" in served.call("GET", "/admin/state", token=TOKEN)[1]["last_reload"]["error"]
    assert served.ask(QUESTIONS[2])[1]["arm"] == "control"


def test_kill_9_under_load_loses_no_answered_row(tmp_path, registry):
    db = tmp_path / "m.db"
    server = start_server(tmp_path, "--advisor", ADV, "--root", str(registry), "--db", str(db))
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                status, body = server.call("POST", f"/v1/advisors/{ADV}/analyze",
                                           {"text": QUESTIONS[i % len(QUESTIONS)], "max_tokens": 4}, timeout=30)
            except (urllib.error.URLError, ConnectionError, OSError):
                return  # the server is gone
            if status == 200:
                with lock:
                    answered.append(body["request_id"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(answered) < 40 and time.time() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(answered) >= 40
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    have = {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    assert set(answered) <= have, f"{len(set(answered) - have)} answered rows lost"


def test_service_without_any_adapter(tmp_path, tiny_llama, reference):
    server = start_server(tmp_path, "--advisor", ADV, "--model", "tiny:llama", "--root", str(tmp_path / "empty"),
                          "--db", "")
    try:
        status, body = server.ask(QUESTIONS[3], max_tokens=MAX_TOKENS)
        assert status == 200 and body["arm"] == "base" and body["version"] is None
        assert body["text"] == reference[None][QUESTIONS[3]]
    finally:
        server.stop()


def test_rows_it_cannot_keep_are_never_acknowledged(tmp_path, tiny_llama):
    """A failing write is a JSON 503 and a log line; a database deleted under the running
    service is noticed (on /health and per request), and no request gets a 200 after it."""
    db = tmp_path / "m.db"
    server = start_server(tmp_path, "--advisor", ADV, "--model", "tiny:llama", "--root", str(tmp_path / "empty"),
                          "--db", str(db))
    try:
        assert server.ask(QUESTIONS[0], max_tokens=MAX_TOKENS)[0] == 200
        with sqlite3.connect(db) as conn:  # every insert now fails inside SQLite
            conn.execute("CREATE TRIGGER no BEFORE INSERT ON requests BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        status, body = server.ask(QUESTIONS[1], max_tokens=MAX_TOKENS)
        assert status == 503 and "could not be recorded" in body["error"]["message"], body
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TRIGGER no")
        assert server.ask(QUESTIONS[1], max_tokens=MAX_TOKENS)[0] == 200
        db.unlink()  # what an operator's cleanup script did
        deadline = time.time() + 10
        while server.call("GET", "/health")[0] != 503:
            assert time.time() < deadline, "the deleted database went unnoticed"
            time.sleep(0.1)
        health = server.call("GET", "/health")[1]
        assert health["status"] == "error" and "was deleted" in health["problems"][0]
        for q in QUESTIONS[:3]:
            status, body = server.ask(q, max_tokens=MAX_TOKENS)
            assert status == 503 and "deleted" in body["error"]["message"], body
    finally:
        server.stop()
    assert "not recorded" in server.log.read_text()  # the log line for the failed write


def test_text_advisors_decode_under_their_contract_by_default(tmp_path, tiny_llama):
    """Without --unconstrained the random tiny model still answers within the contract (free,
    it never does), lists hold no repeats, and every row records how it was decoded."""
    db = tmp_path / "requests.db"
    held = Server(tmp_path, "--advisor", ADV, "--model", "tiny:llama", "--root", str(tmp_path / "empty"),
                  "--db", str(db), token=TOKEN, timeout=120, constrained=True)
    try:
        answers = [held.ask(q, max_tokens=256) for q in QUESTIONS[:4]]
    finally:
        held.stop()
    free = start_server(tmp_path, "--advisor", ADV, "--model", "tiny:llama", "--root", str(tmp_path / "empty"),
                        "--db", str(db), "--log-payloads", "hash")
    try:
        free_answers = [free.ask(q, max_tokens=256) for q in QUESTIONS[:4]]
    finally:
        free.stop()
    for status, body in answers:
        assert status == 200 and body["contract_ok"] and body["finish_reason"] == "stop", body
        lists = [v for v in body["answer"].values() if isinstance(v, list)]
        assert all(len(v) == len(set(v)) for v in lists), body["answer"]
    assert not any(body["contract_ok"] for _, body in free_answers)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT constrained, contract_ok FROM requests ORDER BY received_at").fetchall()
        payloads = conn.execute("SELECT payloads, input_text, input_sha256, answer_text IS NULL, "
                                "length(answer_sha256) FROM requests ORDER BY received_at").fetchall()
    assert rows == [(1, 1)] * 4 + [(0, 0)] * 4
    sha = [hashlib.sha256(q.encode()).hexdigest() for q in QUESTIONS[:4]]
    assert payloads == [("full", q, h, 0, 64) for q, h in zip(QUESTIONS[:4], sha, strict=True)] + \
        [("hash", None, h, 1, 64) for h in sha]  # --log-payloads hash keeps only the hashes


def test_an_older_requests_table_gets_the_new_column(tmp_path):
    """A requests table written before `constrained` and `examples` existed is extended in
    place, old rows kept with NULL (not recorded)."""
    from mondrian.core.db import REQUEST_COLUMNS, create_request_tables

    db = tmp_path / "old.db"
    old = list(REQUEST_COLUMNS)[:list(REQUEST_COLUMNS).index("constrained")]
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE requests ({', '.join(old)})")
        conn.execute("INSERT INTO requests (request_id, advisor) VALUES ('r1', 'fit-query')")
    create_request_tables(db)
    with sqlite3.connect(db) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
        assert cols == list(REQUEST_COLUMNS)
        assert conn.execute("SELECT request_id, constrained, examples FROM requests").fetchall() == \
            [("r1", None, None)]


def test_image_helper_accepts_real_images():
    from PIL import Image

    from mondrian.serve.errors import ServiceError
    from mondrian.serve.uploads import image_sha256

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    assert len(image_sha256(buf.getvalue())) == 64
    with pytest.raises(ServiceError, match="empty"):
        image_sha256(b"")


def test_versions_a_plan_serves_are_never_evicted(tmp_path, registry, reference):
    """With two slots and a plan on v1 and v2, a pinned v3 cannot push either out (409), every
    routed request is still answered by its own version, and a plan that needs three versions
    is refused while the old one keeps serving. The token comes from --admin-token-file."""
    Registry(registry).set_alias(ADV, "production", "v1")
    routing = tmp_path / "routing.yaml"
    write_routing(routing, arms=[{"name": "control", "version": "production", "weight": 1},
                                 {"name": "candidate", "version": "v2", "weight": 1}])
    (tmp_path / "token").write_text(TOKEN + "\n")
    server = Server(tmp_path, "--routing", str(routing), "--root", str(registry), "--db", "",
                    "--max-versions", "2", "--admin-token-file", str(tmp_path / "token"), timeout=120)
    try:
        status, body = server.ask(QUESTIONS[0], version="v3")
        assert status == 409 and "no free slot" in body["error"]["message"], body
        for i, q in enumerate(QUESTIONS):
            status, body = server.ask(q, user=f"user-{i}")
            assert status == 200 and body["version"] in ("v1", "v2"), body
            assert body["text"] == reference[body["version"]][q]
        write_routing(routing, arms=[{"name": "control", "version": "production", "weight": 1},
                                     {"name": "candidate", "version": "v2", "weight": 1}], shadow="v3")
        deadline = time.time() + 30
        while server.call("GET", "/admin/state", token=TOKEN)[1]["last_reload"].get("ok") is not False:
            assert time.time() < deadline, "the routing change was not picked up"
            time.sleep(0.1)
        assert "the limit is 2" in server.call("GET", "/admin/state", token=TOKEN)[1]["last_reload"]["error"]
        status, body = server.ask(QUESTIONS[1], user="after")
        assert status == 200 and body["text"] == reference[body["version"]][QUESTIONS[1]]
    finally:
        assert server.stop() == 0


def _ask_and_judge(server, i: int) -> None:
    """Request i, and the verdict the rollout tests' users give: candidate accepted, control rejected."""
    status, body = server.ask(QUESTIONS[i % len(QUESTIONS)], user=f"u{i}")
    assert status == 200, body
    verdict = "accepted" if body["arm"] == "candidate" else "rejected"
    assert server.call("POST", f"/v1/requests/{body['request_id']}/feedback", {"verdict": verdict})[0] == 200


def test_a_rollout_advances_and_promotes_by_itself(tmp_path, registry):
    """A routing file with a rollout policy, served by two service processes on one database
    and registry: the candidate starts at 10%, and as users accept its answers (and reject
    control's) the services advance it to 50% and then promote it (the production alias
    moves), each decision written once to rollout_events."""
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(registry, root)  # the promotion moves this copy's alias, not the shared one
    routing = tmp_path / "routing.yaml"
    write_routing(routing, arms=[{"name": "control", "version": "production", "weight": 1},
                                 {"name": "candidate", "version": "v2", "weight": 1}],
                  rollout={"steps": [10, 50], "min_samples": 8, "check_every_s": 0.2})
    db = tmp_path / "m.db"
    servers = [start_server(tmp_path, "--routing", str(routing), "--root", str(root), "--db", str(db))
               for _ in range(2)]
    try:
        events = []
        for i in range(600):
            _ask_and_judge(servers[i % 2], i)
            with sqlite3.connect(db) as conn:
                events = conn.execute("SELECT action, share, decided_by FROM rollout_events ORDER BY seq").fetchall()
            if events[-1][0] == "promote":
                break
        decisions = [(a, share) for a, share, _ in events if a != "hold"]
        assert decisions == [("start", 10.0), ("advance", 50.0), ("promote", 100.0)], events
        assert Registry(root).aliases(ADV)["production"] == "v2"
        for server in servers:  # both re-planned on the promotion
            deadline = time.time() + 10
            while server.ask(QUESTIONS[0], user="after")[1]["version"] != "v2":
                assert time.time() < deadline
                time.sleep(0.2)
    finally:
        for server in servers:
            server.stop()


def test_replicas_with_their_own_logs_decide_a_rollout_once(tmp_path, registry):
    """Two service replicas, each recording to its own requests file, one shared rollout
    timeline (`--rollout-db`) and each judging on both logs (`--rollout-evidence`): the
    rollout advances and promotes once per step, though each replica alone saw half the
    traffic; `ab report` over both files counts every request once."""
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(registry, root)
    routing = tmp_path / "routing.yaml"
    write_routing(routing, arms=[{"name": "control", "version": "production", "weight": 1},
                                 {"name": "candidate", "version": "v2", "weight": 1}],
                  rollout={"steps": [10, 50], "min_samples": 8, "check_every_s": 0.2})
    dbs, shared = [tmp_path / "a.db", tmp_path / "b.db"], tmp_path / "rollouts.db"
    servers = [start_server(tmp_path, "--routing", str(routing), "--root", str(root), "--db", str(db),
                            "--rollout-db", str(shared), "--rollout-evidence", str(other))
               for db, other in ((dbs[0], dbs[1]), (dbs[1], dbs[0]))]
    sent = 0
    try:
        events = []
        for i in range(600):
            _ask_and_judge(servers[i % 2], i)
            sent += 1
            with sqlite3.connect(shared) as conn:
                events = conn.execute("SELECT action, share FROM rollout_events ORDER BY seq").fetchall()
            if events and events[-1][0] == "promote":
                break
        assert [e for e in events if e[0] != "hold"] == [("start", 10.0), ("advance", 50.0), ("promote", 100.0)]
        for db in dbs:  # nothing was decided in a replica's own file
            with sqlite3.connect(db) as conn:
                assert conn.execute("SELECT count(*) FROM rollout_events").fetchone()[0] == 0
        assert Registry(root).aliases(ADV)["production"] == "v2"
    finally:
        for server in servers:
            server.stop()
    from mondrian.ab.report import ab_report

    arms = ab_report(dbs)["advisors"][ADV]["arms"]
    assert sum(a["requests"] for a in arms.values()) == sent
