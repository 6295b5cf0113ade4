"""Replays the request shapes Claude Code, Codex CLI and opencode were seen to send
(data/client-requests, copied from shared/reference; see shared/notes/agent-clients.md)
and checks each answer is well formed in its API's shape."""
import json
import re
from pathlib import Path

import httpx
import pytest

DATA = Path(__file__).parent / "data" / "client-requests"
SKIP_HEADERS = {"host", "content-length", "connection", "accept-encoding", "authorization", "x-api-key"}


def schema_from_keys(keys):
    s = {"type": "object", "properties": {}}
    if "$schema" in keys:
        s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    if "additionalProperties" in keys:
        s["additionalProperties"] = False
    if "required" in keys:
        s["required"] = []
    return s


def realistic(body):
    """Undo the compaction of tool schemas (keys only) into real schema objects."""
    body = json.loads(json.dumps(body))
    for t in body.get("tools") or []:
        for k, real in (("input_schema_keys", "input_schema"), ("parameters_keys", "parameters")):
            if k in t:
                t[real] = schema_from_keys(t.pop(k))
        if "function" in t and "parameters_keys" in t["function"]:
            t["function"]["parameters"] = schema_from_keys(t["function"].pop("parameters_keys"))
        if t.get("type") == "namespace" and all(isinstance(x, str) for x in t.get("tools", [])):
            t["tools"] = [{"type": "function", "name": n, "parameters": schema_from_keys([])} for n in t["tools"]]
    return body


def records():
    out = []
    for f in sorted(DATA.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            r = json.loads(line)
            if "body" in r or r["method"] == "GET":
                out.append(pytest.param(r, id=f"{f.stem}-{i}"))
    return out


def check_sse(path, text):
    if path.startswith("/v1/messages"):
        events = re.findall(r"^event: (\S+)", text, re.M)
        assert events[0] == "message_start" and events[-1] == "message_stop", events
    elif path.startswith("/v1/chat/completions"):
        assert text.rstrip().endswith("data: [DONE]")
        for line in text.splitlines():
            if line.startswith("data: {"):
                json.loads(line[6:])
    elif path.startswith("/v1/responses"):
        types = [json.loads(l[6:])["type"] for l in text.splitlines() if l.startswith("data: {")]
        assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete"), types


@pytest.mark.parametrize("rec", records())
def test_replay(make_server, rec):
    ctxerr = rec.get("status") == 400
    s = make_server([rec.get("mock_model_text", "ok")], args=["--ctx", "512"] if ctxerr else ["--ctx", "65536"])
    headers = {k: v for k, v in rec["headers"] if k.lower() not in SKIP_HEADERS}
    if rec["method"] == "GET":
        r = httpx.get(s.url + rec["path"], headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"]
        return
    body = realistic(rec["body"])
    with httpx.stream("POST", s.url + rec["path"], json=body, headers=headers, timeout=120) as r:
        text = "".join(r.iter_text())
        status = r.status_code
    if ctxerr:
        assert status == 400, text
        err = json.loads(text)
        if rec["path"].startswith("/v1/messages"):
            assert re.fullmatch(r"prompt is too long: \d+ tokens > 512 maximum", err["error"]["message"])
        else:
            assert err["error"]["code"] == "context_length_exceeded"
        return
    assert status == 200, text[:500]
    if body.get("stream"):
        check_sse(rec["path"], text)
    else:
        json.loads(text)


CODEX_TOOLS = [
    {"type": "function", "name": "exec_command", "strict": False, "description": "Runs a command",
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"], "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}},
    {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents",
     "tools": [{"type": "function", "name": "spawn_agent", "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}}]},
    {"type": "web_search"},
    {"type": "tool_search", "execution": "client", "description": "Search tools", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
]


def test_codex_shapes_round_trip(make_server):
    """Codex: developer messages, no instructions, reasoning items echoed back, namespace and
    custom tools, function_call_output / custom_tool_call_output, no max_output_tokens."""
    call = ('Look.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="exec_command">\n'
            '<｜DSML｜parameter name="cmd" string="true">cat secret.txt</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    s = make_server([call, "Done.</think>The magic word is PAPAYA-42.", '{"title": "Magic word"}'])
    base = {"model": "deepseek-v4-flash", "stream": True, "tool_choice": "auto", "parallel_tool_calls": True,
            "reasoning": {"effort": "high", "summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "abc", "client_metadata": {"session_id": "abc"}, "tools": CODEX_TOOLS}
    inp = [
        {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "message", "id": "msg_2", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
        {"type": "message", "id": "msg_3", "role": "user", "content": [{"type": "input_text", "text": "read secret.txt"}]},
    ]

    def run(body):
        with httpx.stream("POST", s.url + "/v1/responses", json=body, timeout=60, headers={"session-id": "abc"}) as r:
            assert r.status_code == 200
            evs = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
        assert evs[-1]["type"] == "response.completed"
        return evs[-1]["response"]

    r1 = run({**base, "input": inp})
    kinds = [o["type"] for o in r1["output"]]
    assert kinds == ["reasoning", "function_call"]
    assert r1["output"][0]["encrypted_content"] == "Look."
    fc = r1["output"][1]
    inp2 = inp + r1["output"] + [
        {"type": "function_call_output", "call_id": fc["call_id"], "output": "The magic word is PAPAYA-42.\n"},
        {"type": "custom_tool_call", "call_id": "call_x", "name": "apply_patch", "input": "*** Begin Patch\n*** End Patch", "status": "completed"},
        {"type": "custom_tool_call_output", "call_id": "call_x", "output": "ok"},
        {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": None},
    ]
    r2 = run({**base, "input": inp2})
    msg = [o for o in r2["output"] if o["type"] == "message"][0]
    assert msg["content"][0]["text"] == "The magic word is PAPAYA-42."
    assert r2["usage"]["input_tokens_details"]["cached_tokens"] >= r1["usage"]["input_tokens"]
    # Concurrent title request shape: tools [] + tool_choice auto + text.format json_schema.
    title = {"model": "deepseek-v4-flash", "stream": False, "tools": [], "tool_choice": "auto",
             "input": [{"role": "user", "content": "title?"}],
             "text": {"format": {"type": "json_schema", "name": "t", "strict": True, "schema": {"type": "object"}}}}
    r3 = httpx.post(s.url + "/v1/responses", json=title, timeout=60)
    assert r3.status_code == 200 and r3.json()["status"] == "completed"
