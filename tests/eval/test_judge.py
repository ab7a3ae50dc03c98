"""Judge-scored benchmarks: a fake OpenAI-compatible endpoint, LLaVA-W relative score, MM-Vet, no judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

from eval.benchmarks import get_benchmark
from eval.judge import NOT_SCORED, Judge, JudgeConfig, parse_score_pair, score_llava_wild, score_mmvet
from eval.runner import markdown_table, score_records


@pytest.fixture()
def endpoint():
    """A local chat-completions server replying with queued texts; records the requests."""
    replies, seen = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            out = json.dumps({"choices": [{"message": {"content": replies.pop(0)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", replies, seen
    server.shutdown()


def test_llava_wild_relative_score_per_category(endpoint, monkeypatch):
    url, replies, seen = endpoint
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = Judge(JudgeConfig(url=url, model="judge-1", max_retries=1))
    records = [{"text": "q1", "context": "c", "reference": "r", "prediction": "p", "category": "conv"},
               {"text": "q2", "context": "c", "reference": "r", "prediction": "p", "category": "detail"},
               {"text": "q3", "context": "c", "reference": "r", "prediction": "p", "category": "detail"}]
    replies += ["8 6\nbecause", "10, 5\n...", "no scores here"]
    scores, metrics = score_llava_wild(records, judge)
    assert scores == [6.0, 5.0, None] and metrics["unparsed"] == 1
    assert metrics["relative_score"] == pytest.approx(100 * (11 / 2) / (18 / 2))  # mean(6,5) / mean(8,10)
    assert metrics["per_category"] == {"conv": pytest.approx(75.0), "detail": pytest.approx(50.0)}
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sk-test"
    assert seen[0]["body"]["model"] == "judge-1" and seen[0]["body"]["temperature"] == 0.0


def test_mmvet_scores_and_clamps(endpoint):
    url, replies, _ = endpoint
    judge = Judge(JudgeConfig(url=url, model="j"))
    records = [{"text": "q", "answer": "a", "prediction": "p", "capability": ["ocr"]},
               {"text": "q", "answer": "a", "prediction": "p", "capability": ["ocr", "math"]}]
    replies += ["0.5", "Correctness: 1.7"]
    scores, metrics = score_mmvet(records, judge)
    assert scores == [0.5, 1.0] and metrics["total"] == pytest.approx(75.0)
    assert metrics["per_capability"] == {"math": pytest.approx(100.0), "ocr": pytest.approx(75.0)}


def test_without_a_judge_nothing_is_a_number(tmp_path):
    bench = get_benchmark("mmvet")
    entry = score_records(bench, [{"text": "q", "answer": "a", "prediction": "p", "prompt": "x"}], tmp_path, 0.0)
    assert entry["metrics"] == {"status": NOT_SCORED, "n": 1}
    table = markdown_table([{"benchmarks": {"mmvet": entry}}], ["run"])
    assert "| mmvet (total) | not scored: no judge |" in table


def test_loaders_and_errors(tmp_path):
    root = tmp_path / "llava-bench-in-the-wild"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "001.jpg")
    (root / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "001.jpg", "text": "What?",
                                                      "category": "conv"}) + "\n")
    (root / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "A cat."}) + "\n")
    (root / "context.jsonl").write_text(json.dumps({"id": "001", "image": "001.jpg", "caption": "a cat"}) + "\n")
    bench = get_benchmark("llava_wild")
    samples = bench.load(bench.resolve(tmp_path))
    assert samples == [{"question_id": 0, "image": "001.jpg", "text": "What?", "category": "conv",
                        "reference": "A cat.", "context": "a cat"}]
    assert parse_score_pair("7 9\nx") == (7.0, 9.0) and parse_score_pair("seven nine") is None
    with pytest.raises(ValueError, match="judge url must be http"):
        JudgeConfig(url="localhost:8000", model="m")
    with pytest.raises(FileNotFoundError, match=r"mmvet: questions file expected at .*mm-vet/llava-mm-vet.jsonl"):
        get_benchmark("mmvet").resolve(tmp_path)
