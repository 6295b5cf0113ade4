"""Regressions found by the real agent clients (tests/agents): streamed output must add up to the
final message, DSML is a tool call only for tools the request offered, and Anthropic's
`message_start` reports the real cached / uncached prompt split."""
import json

import httpx

from scripts import LONG_SYSTEM, PLAIN, THINK, WEATHER_ANTHROPIC, WEATHER_OPENAI

MODEL = "deepseek-v4-flash"
OFF = {"thinking": {"type": "disabled"}}

BLOCK = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
# Thinking off, but the model still writes a `</think>` before its tool call.
STRAY_CALL = "Checking the weather.</think>" + BLOCK
STRAY_TEXT = "First part.</think> Second part."
# A call with no tools offered (opencode's title request) / to a tool that was not offered.
TITLE_DSML = "Title: weather" + BLOCK
OTHER_TOOL = BLOCK.replace("get_weather", "rm_rf")


def chat(s, stream, **kw):
    c = s.openai()
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], extra_body=OFF, **kw)
    if not stream:
        r = c.chat.completions.create(**args)
        m = r.choices[0].message
        calls = [(t.function.name, json.loads(t.function.arguments)) for t in (m.tool_calls or [])]
        return m.content, (m.model_extra or {}).get("reasoning_content"), calls, r.choices[0].finish_reason
    content, reasoning, calls, finish = "", "", {}, None
    for ch in c.chat.completions.create(stream=True, **args):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        for t in d.tool_calls or []:
            e = calls.setdefault(t.index, ["", ""])
            e[0] += t.function.name or ""
            e[1] += t.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, reasoning or None, [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())], finish


def test_stray_think_end_with_thinking_off_stream_equals_final(make_server):
    s = make_server([STRAY_CALL])
    want_call = [("get_weather", {"city": "Rome"})]
    for stream in (False, True):
        content, reasoning, calls, finish = chat(s, stream, tools=[WEATHER_OPENAI])
        assert (content, reasoning, calls, finish) == ("Checking the weather.", None, want_call, "tool_calls"), stream
    s2 = make_server([STRAY_TEXT])
    outs = [chat(s2, stream) for stream in (False, True)]
    assert outs[0] == outs[1] == ("First part. Second part.", None, [], "stop")
    # Anthropic: no thinking block appears, the tool call survives, stream == final.
    a = s.anthropic()
    req = dict(model=MODEL, max_tokens=256, tools=[WEATHER_ANTHROPIC], messages=[{"role": "user", "content": "Weather?"}])
    r = a.messages.create(**req)
    with a.messages.stream(**req) as st:
        text = "".join(st.text_stream)
        final = st.get_final_message()
    for m in (r, final):
        assert [b.type for b in m.content] == ["text", "tool_use"] and m.stop_reason == "tool_use"
        assert m.content[0].text == "Checking the weather." and m.content[1].input == {"city": "Rome"}
    assert text == "Checking the weather."


def test_dsml_without_tools_is_text(make_server):
    s = make_server([TITLE_DSML])
    for stream in (False, True):
        assert chat(s, stream) == (TITLE_DSML, None, [], "stop"), stream
    # Thinking on: reasoning stays reasoning, the block is answer text.
    s2 = make_server(["Hmm.</think>" + TITLE_DSML])
    c = s2.openai()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "title"}])
    assert r.choices[0].message.content == TITLE_DSML and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].message.model_extra["reasoning_content"] == "Hmm."
    # Anthropic and Responses too.
    a = s.anthropic()
    with a.messages.stream(model=MODEL, max_tokens=256, messages=[{"role": "user", "content": "t"}]) as st:
        final = st.get_final_message()
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == TITLE_DSML
    assert final.stop_reason == "end_turn"
    resp = s.openai().responses.create(model=MODEL, input="t", reasoning={"effort": "none"})
    assert [i.type for i in resp.output] == ["message"] and resp.output_text == TITLE_DSML


def test_call_to_tool_not_offered_is_text(make_server):
    s = make_server([OTHER_TOOL])
    for stream in (False, True):
        assert chat(s, stream, tools=[WEATHER_OPENAI]) == (OTHER_TOOL, None, [], "stop"), stream


def anthropic_events(s, body):
    events = []
    with httpx.stream("POST", s.url + "/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=60) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_anthropic_message_start_reports_cached_split(make_server):
    s = make_server([PLAIN, PLAIN])
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "system": LONG_SYSTEM,
            "messages": [{"role": "user", "content": "hi"}]}
    starts, deltas = [], []
    turn2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PLAIN},
             {"role": "user", "content": "again"}]
    for msgs in ([{"role": "user", "content": "hi"}], turn2):
        body["messages"] = msgs
        ev = anthropic_events(s, body)
        assert ev[0][0] == "message_start" and ev[-1][0] == "message_stop"
        starts.append(ev[0][1]["message"]["usage"])
        deltas.append([d for n, d in ev if n == "message_delta"][0]["usage"])
    for st, de in zip(starts, deltas):
        assert st["cache_read_input_tokens"] == de["cache_read_input_tokens"]
        assert st["input_tokens"] == de["input_tokens"]
    assert starts[0]["cache_read_input_tokens"] == 0
    assert starts[1]["cache_read_input_tokens"] > 0
    assert starts[1]["input_tokens"] < starts[0]["input_tokens"]


def test_anthropic_queued_stream_keeps_alive_before_message_start(make_server):
    """While a stream waits in the queue it gets SSE comments (no event may precede
    `message_start`), then `message_start` once its prefix lookup is done."""
    import threading

    s = make_server([PLAIN], args=["--test-delay-ms", "10", "--keepalive-secs", "1"])
    long = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 2000}]}
    t = threading.Thread(target=lambda: httpx.post(s.url + "/v1/messages", json=long, timeout=120))
    t.start()
    import time

    time.sleep(0.5)
    body = {"model": MODEL, "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", s.url + "/v1/messages", json=body, timeout=120) as r:
        text = "".join(r.iter_text())
    t.join()
    before, sep, _ = text.partition("event: message_start")
    assert sep and before.startswith(": keep-alive"), text[:300]
    assert "event:" not in before and "data:" not in before
    assert text.rstrip().endswith('{"type":"message_stop"}')
