"""The advisor service serving an image advisor over real HTTP: a `mondrian serve` process on
the tiny Qwen2-VL with two registry versions (mlx-vlm adapters), image uploads (multipart and
OpenAI image_url data URLs), A/B arms sticky by image hash, production swapped under load, and
every answer equal to what a fresh `mlx_vlm.load(base, adapter_path=version)` generates alone."""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3
import uuid
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mondrian.registry.store import Registry
from tests.helpers import ServeProcess, flip_production_while, write_random_vision_adapter

ADV = "photo-critic"
TOKEN = "vision-token"
MAX_TOKENS = 6


def png(seed: int) -> bytes:
    """A small Mondrian-like PNG, different per seed."""
    img = Image.new("RGB", (56, 56), (246, 244, 236))
    colours = [(212, 32, 39), (24, 72, 160), (247, 208, 32), (22, 22, 22)]
    for k in range(3):
        x, y = (seed * 7 + k * 19) % 40, (seed * 13 + k * 11) % 40
        img.paste(colours[(seed + k) % 4], (x, y, x + 16, y + 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [png(s) for s in range(6)]


class Server(ServeProcess):
    def upload(self, image: bytes | None, fields: dict | None = None) -> tuple[int, dict]:
        """POST the analyze endpoint as multipart/form-data (image file + form fields)."""
        boundary = uuid.uuid4().hex
        body = b""
        for k, v in (fields or {}).items():
            body += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        if image is not None:
            body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        return self.call("POST", f"/v1/advisors/{ADV}/analyze", raw=body,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.fixture(scope="module")
def base(mondrian_home):
    from mondrian.models.sources import resolve

    return resolve("tiny:qwen2-vl")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base) -> Path:
    root = tmp_path_factory.mktemp("vision_adapters")
    reg = Registry(root)
    for seed in (1, 2):
        src = write_random_vision_adapter(root.parent / f"vsrc{seed}", str(base.path), seed=seed)
        reg.publish(src, ADV, base_model="tiny:qwen2-vl", base_model_fingerprint=base.fingerprint)
    reg.set_alias(ADV, "production", "v1")
    return root


@pytest.fixture(scope="module")
def reference(registry, base) -> dict:
    """(version, image index) -> the greedy answer of a fresh mlx-vlm load of that version alone,
    for the prompt the service builds (the advisor's system prompt, the image as the user turn)."""
    import mlx_vlm
    from mlx_vlm.prompt_utils import apply_chat_template

    from mondrian.core.contracts import get_advisor

    messages = [{"role": "system", "content": get_advisor(ADV).system_prompt},
                {"role": "user", "content": [{"type": "image"}]}]
    out = {}
    for version in (None, "v1", "v2"):
        model, processor = mlx_vlm.load(str(base.path), adapter_path=str(registry / ADV / version) if version else None)
        prompt = apply_chat_template(processor, model.config, messages, add_generation_prompt=True, num_images=1)
        for i, data in enumerate(IMAGES):
            r = mlx_vlm.generate(model, processor, prompt, image=[Image.open(io.BytesIO(data))],
                                 max_tokens=MAX_TOKENS, temperature=0.0)
            out[(version, i)] = r.text
    assert len({tuple(out[(v, i)] for i in range(len(IMAGES))) for v in (None, "v1", "v2")}) == 3
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, registry):
    tmp = tmp_path_factory.mktemp("served_vision")
    routing = tmp / "routing.yaml"
    routing.write_text(yaml.safe_dump({"advisors": {ADV: {
        "model": "tiny:qwen2-vl", "max_tokens": MAX_TOKENS, "fallback": "none", "sticky": "image",
        "arms": [{"name": "control", "version": "production", "weight": 1},
                 {"name": "candidate", "version": "v2", "weight": 1}]}}}))
    server = Server(tmp, "--routing", str(routing), "--root", str(registry), "--db", str(tmp / "m.db"),
                    token=TOKEN, timeout=180)
    server.db = tmp / "m.db"
    yield server
    assert server.stop() == 0, server.log.read_text()[-2000:]


def test_image_requests_under_swaps_answer_as_their_version_alone(served, reference):
    def client(n: int):
        k = n % len(IMAGES)
        if n % 5 == 0:  # the OpenAI route, image as a data URL, pinned to v2
            url = "data:image/png;base64," + base64.b64encode(IMAGES[k]).decode()
            status, body = served.call("POST", "/v1/chat/completions", {"model": f"{ADV}@v2", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
            return status, {"text": body.get("choices", [{}])[0].get("message", {}).get("content"),
                            **body.get("mondrian", {}), "raw": body}, k
        status, body = served.upload(IMAGES[k])
        return status, body, k

    results, flips = flip_production_while(served, ADV, client, 60, 4)
    assert not [(s, b) for s, b, _ in results if s != 200], [(s, b) for s, b, _ in results if s != 200][:3]
    assert len(flips) >= 5
    arms_by_image: dict[int, set] = {}
    for _, body, k in results:
        assert body["text"] == reference[(body["version"], k)], (body["version"], k)
        if body["arm"] != "pinned":
            arms_by_image.setdefault(k, set()).add(body["arm"])
    assert all(len(a) == 1 for a in arms_by_image.values())  # sticky by image: one arm per image
    assert {"control", "candidate"} == set().union(*arms_by_image.values())
    conn = sqlite3.connect(served.db)
    conn.row_factory = sqlite3.Row
    rows = {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM requests")}
    conn.close()
    for _, body, k in results:
        row = rows[body["request_id"]]
        assert row["served_version"] == body["version"]
        assert row["prompt_tokens"] > 10  # the image's tokens are counted
        if body["arm"] != "pinned":
            assert row["sticky_key"] == hashlib.sha256(IMAGES[k]).hexdigest()
        # log_payloads full: the image's hash on the row, the image kept once by that hash
        assert row["image_sha256"] == hashlib.sha256(IMAGES[k]).hexdigest() and row["answer_text"] == body["text"]
    kept = sorted(p.name for p in (served.db.parent / "request-images").iterdir())
    assert kept == sorted(f"{hashlib.sha256(img).hexdigest()}.png" for img in IMAGES)


def test_image_advisor_bad_input(served):
    status, body = served.call("POST", f"/v1/advisors/{ADV}/analyze", {"text": "how is it?"})
    assert status == 400 and "takes an image" in body["error"]["message"]
    status, body = served.upload(b"\x89PNG\r\n\x1a\nnot really")
    assert status == 400 and "not a readable image" in body["error"]["message"]
    status, body = served.call("POST", "/v1/chat/completions", {"model": ADV, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    assert status == 400 and "data URL" in body["error"]["message"]
    status, body = served.upload(IMAGES[0], {"version": "v9"})
    assert status == 404
    status, body = served.upload(IMAGES[0], {"text": "and the colours?", "version": "v1"})
    assert status == 200 and body["version"] == "v1"  # text beside the image is fine
