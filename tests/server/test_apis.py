"""Each API through its official SDK: streaming and not, thinking on/off, tool round trips."""
import json

import httpx
import pytest

from scripts import ANSWER, CALL, LONG_SYSTEM, PATCH, PLAIN, THINK, WEATHER_ANTHROPIC, WEATHER_FLAT, WEATHER_OPENAI

MODEL = "deepseek-v4-flash"


def test_health_models_metrics(make_server):
    s = make_server([PLAIN])
    assert httpx.get(s.url + "/health").json()["status"] == "ok"
    models = s.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    m = httpx.get(s.url + "/v1/models").json()["data"][0]
    assert m["demo"] is True and "synthetic" in m["note"] and m["context_length"] == 32768
    assert m["backend"] == "cpu"
    assert httpx.get(s.url + "/v1/models/" + MODEL).status_code == 200
    r = httpx.get(s.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "ds4_queue_depth" in httpx.get(s.url + "/metrics").text


def test_chat_nonstream_and_stream_thinking(make_server):
    s = make_server([THINK, THINK])
    c = s.openai()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    msg = r.choices[0].message
    assert msg.content == "Hello there, world!"
    assert msg.model_extra["reasoning_content"] == "Let me think."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
        )
    )
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks if ch.choices)
    assert content == "Hello there, world!" and reasoning == "Let me think."
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_chat_thinking_off(make_server):
    s = make_server([PLAIN, PLAIN])
    c = s.openai()
    for kw in ({"model": "deepseek-chat"}, {"model": MODEL, "extra_body": {"thinking": {"type": "disabled"}}}):
        r = c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
        assert r.choices[0].message.content == PLAIN
        assert "reasoning_content" not in (r.choices[0].message.model_extra or {})


def test_completions(make_server):
    s = make_server([THINK, THINK])
    c = s.openai()
    r = c.completions.create(model=MODEL, prompt="Say hi")
    assert r.choices[0].text == THINK
    text = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="Say hi", stream=True) if ch.choices)
    assert text == THINK


def test_chat_tool_round_trip_hits_live_prefix(make_server):
    s = make_server([CALL, ANSWER, CALL])
    c = s.openai()
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Weather in Rome?"}]
    r1 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_OPENAI])
    m = r1.choices[0].message
    assert r1.choices[0].finish_reason == "tool_calls"
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Rome", "days": 2}
    assert m.tool_calls[0].id.startswith("call_")
    msgs += [
        {"role": "assistant", "content": m.content or "", "reasoning_content": m.model_extra["reasoning_content"],
         "tool_calls": [tc.model_dump() for tc in m.tool_calls]},
        {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny, 24C"},
    ]
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_OPENAI])
    assert r2.choices[0].message.content == "It is sunny in Rome."
    # The whole first turn (prompt + generated call) is reused from the live KV session.
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1, (cached, r1.usage)
    # Streaming tool call: argument deltas assemble to the same JSON.
    args, names = "", []
    for ch in c.chat.completions.create(model=MODEL, messages=msgs[:2], tools=[WEATHER_OPENAI], stream=True):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            args += (tc.function.arguments or "") if tc.function else ""
    assert names == ["get_weather"] and json.loads(args) == {"city": "Rome", "days": 2}


def test_anthropic_messages_and_tool_round_trip(make_server):
    s = make_server([THINK, THINK, PLAIN, CALL, ANSWER])
    a = s.anthropic()
    think = {"type": "enabled", "budget_tokens": 2048}
    r = a.messages.create(model=MODEL, max_tokens=256, thinking=think, messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == "Let me think." and r.content[1].text == "Hello there, world!"
    assert r.stop_reason == "end_turn" and r.usage.output_tokens > 0
    with a.messages.stream(model=MODEL, max_tokens=256, thinking=think, messages=[{"role": "user", "content": "hi"}]) as st:
        final = st.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "Hello there, world!"
    # No `thinking` field = thinking off (what Claude Code sends when the user disables it).
    r = a.messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == PLAIN
    # Tool round trip, streamed.
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    with a.messages.stream(model=MODEL, max_tokens=256, system=LONG_SYSTEM, thinking=think, tools=[WEATHER_ANTHROPIC], messages=msgs) as st:
        r1 = st.get_final_message()
    assert r1.stop_reason == "tool_use"
    tu = [b for b in r1.content if b.type == "tool_use"][0]
    assert tu.name == "get_weather" and tu.input == {"city": "Rome", "days": 2} and tu.id.startswith("toolu_")
    msgs += [
        {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu.id, "content": "sunny, 24C"}]},
    ]
    r2 = a.messages.create(model=MODEL, max_tokens=256, system=LONG_SYSTEM, thinking=think, tools=[WEATHER_ANTHROPIC], messages=msgs)
    assert r2.content[-1].text == "It is sunny in Rome."
    assert r2.usage.cache_read_input_tokens > 0
    assert r2.usage.cache_read_input_tokens + r2.usage.input_tokens >= r1.usage.input_tokens


def test_anthropic_unknown_tool_result_is_400(make_server):
    s = make_server([PLAIN])
    r = httpx.post(s.url + "/v1/messages", json={"model": MODEL, "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert "toolu_nope" in r.json()["error"]["message"]


def test_count_tokens(make_server):
    s = make_server([PLAIN])
    n = s.anthropic().messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    assert n.input_tokens > 2


def test_responses_stream_and_tool_round_trip(make_server):
    s = make_server([THINK, CALL, ANSWER])
    c = s.openai()
    r = c.responses.create(model=MODEL, input="hi", reasoning={"summary": "auto"})
    assert r.status == "completed" and r.output_text == "Hello there, world!"
    assert r.output[0].type == "reasoning" and r.output[0].summary[0].text == "Let me think."
    inp = [{"role": "developer", "content": LONG_SYSTEM}, {"role": "user", "content": "Weather in Rome?"}]
    events = list(c.responses.create(model=MODEL, input=inp, tools=[WEATHER_FLAT], reasoning={"summary": "auto"}, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.function_call_arguments.done" in types
    r1 = events[-1].response
    calls = [o for o in r1.output if o.type == "function_call"]
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Rome", "days": 2}
    seq = [e.sequence_number for e in events]
    assert seq == list(range(len(seq)))
    inp2 = inp + [o.model_dump(exclude_none=True) for o in r1.output] + [
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 24C"}]
    r2 = c.responses.create(model=MODEL, input=inp2, tools=[WEATHER_FLAT], reasoning={"summary": "auto"})
    assert r2.output_text == "It is sunny in Rome."
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens


def test_responses_custom_tool_call(make_server):
    s = make_server([PATCH])
    body = {"model": MODEL, "stream": True, "input": [{"role": "user", "content": "add a file"}],
            "tools": [{"type": "custom", "name": "apply_patch", "description": "Apply a patch",
                       "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}]}
    with httpx.stream("POST", s.url + "/v1/responses", json=body, timeout=30) as r:
        evs = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: ")]
    types = [e["type"] for e in evs]
    assert "response.custom_tool_call_input.done" in types
    done = [e for e in evs if e["type"] == "response.completed"][0]["response"]
    item = [o for o in done["output"] if o["type"] == "custom_tool_call"][0]
    assert item["name"] == "apply_patch" and item["input"].startswith("*** Begin Patch\n")


def test_errors_in_api_shapes(make_server):
    s = make_server([PLAIN], args=["--ctx", "64", "--api-key", "k1", "--body-limit-mb", "1"])
    h = {"Authorization": "Bearer k1"}
    r = httpx.post(s.url + "/v1/chat/completions", content=b"{nope", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, headers=h)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing messages"
    r = httpx.post(s.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401
    r = httpx.post(s.url + "/v1/messages", json={"messages": []}, headers={"x-api-key": "bad"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    big = {"messages": [{"role": "user", "content": "word " * 400}]}
    r = httpx.post(s.url + "/v1/chat/completions", json=big, headers=h)
    e = r.json()["error"]
    assert r.status_code == 400 and e["code"] == "context_length_exceeded" and e["n_ctx"] == 64
    r = httpx.post(s.url + "/v1/messages?beta=true", json={**big, "max_tokens": 5}, headers=h)
    assert r.status_code == 400
    import re
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 64 maximum", r.json()["error"]["message"])
    r = httpx.post(s.url + "/v1/chat/completions", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    r = httpx.post(s.url + "/v1/responses", json={"input": "x", "previous_response_id": "resp_1"}, headers=h)
    assert r.status_code == 400
    assert httpx.get(s.url + "/nope").status_code == 404
    # The SDKs surface these as their own exception types.
    import openai
    with pytest.raises(openai.BadRequestError):
        s.openai(api_key="k1").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])
