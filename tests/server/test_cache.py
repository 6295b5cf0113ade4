"""KV reuse: live prefix follow-ups, disk checkpoints across restarts, corrupt cache files."""
from pathlib import Path

import httpx
import pytest

from scripts import LONG_SYSTEM, PLAIN

MODEL = "deepseek-v4-flash"
KV_ARGS = ["--kv-cache-min-tokens", "64"]
# Three layers: the third is a compressed (ratio 4) layer with an indexer, so checkpoints
# carry compressor and indexer state through snapshot/restore.
LAYERS = 3


def chat(s, msgs, **kw):
    return s.openai().chat.completions.create(model="deepseek-chat", messages=msgs, **kw)


def test_follow_up_hits_live_prefix(make_server):
    s = make_server([PLAIN, "Second answer."], layers=LAYERS)
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "first question"}]
    r1 = chat(s, msgs)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "second"}]
    r2 = chat(s, msgs)
    assert r2.choices[0].message.content == "Second answer."
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    m = s.metrics()
    assert m['ds4_cache_hits_total{kind="memory-token"}'] == 1


def test_restart_then_disk_cache_hit(make_server, tmp_path):
    kv = tmp_path / "kv"
    args = KV_ARGS + ["--kv-disk-dir", str(kv)]
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "first question"}]
    s = make_server([PLAIN], args=args, layers=LAYERS)
    r1 = chat(s, msgs)
    assert s.stop() == 0
    log = s.log_text()
    assert "stored cold checkpoint" in log and "stored shutdown checkpoint" in log
    files = list(kv.glob("*.kv"))
    assert len(files) == 2 and not list(kv.glob("*.tmp.*"))
    # After a restart the follow-up is served from the shutdown checkpoint (whole first turn).
    s2 = make_server(["After restart."], args=args, layers=LAYERS)
    msgs2 = msgs + [{"role": "assistant", "content": PLAIN}, {"role": "user", "content": "again"}]
    r2 = chat(s2, msgs2)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    assert s2.metrics()['ds4_cache_hits_total{kind="disk-text"}'] == 1
    # A different conversation with the same system prompt reuses the cold (system) checkpoint,
    # reported as Anthropic cache_read_input_tokens.
    s2.stop()
    s3 = make_server(["x"], args=args, layers=LAYERS)
    r3 = s3.anthropic().messages.create(model=MODEL, max_tokens=16, system=LONG_SYSTEM,
                                        messages=[{"role": "user", "content": "another topic"}])
    assert 64 <= r3.usage.cache_read_input_tokens < r1.usage.prompt_tokens


def test_corrupt_truncated_and_foreign_files_are_removed(make_server, tmp_path):
    kv = tmp_path / "kv"
    args = KV_ARGS + ["--kv-disk-dir", str(kv)]
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "q"}]
    s = make_server([PLAIN], args=args, layers=LAYERS)
    chat(s, msgs)
    s.stop()
    files = sorted(kv.glob("*.kv"), key=lambda p: p.stat().st_size)
    assert len(files) == 2
    small, big = files
    b = bytearray(big.read_bytes())
    b[-10] ^= 0xFF  # payload bit flip: checksum mismatch
    big.write_bytes(bytes(b))
    small.write_bytes(small.read_bytes()[:60])  # truncated
    foreign = kv / ("ab" * 20 + ".kv")
    foreign.write_bytes(b"this is not a cache file at all, just text")
    s2 = make_server([PLAIN, PLAIN], args=args, layers=LAYERS)
    r = chat(s2, msgs + [{"role": "assistant", "content": PLAIN}, {"role": "user", "content": "more"}])
    assert r.choices[0].message.content == PLAIN
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    log = s2.log_text()
    assert "removing invalid file" in log and "removing corrupt file" in log
    assert not foreign.exists() and not big.exists()
    # The truncated cold checkpoint was removed, then rewritten whole by this request.
    assert not small.exists() or small.stat().st_size > 60
    # The server kept working and wrote fresh checkpoints.
    assert httpx.get(s2.url + "/health").status_code == 200


def test_disk_budget_evicts(make_server, tmp_path):
    kv = tmp_path / "kv"
    s = make_server([PLAIN] * 6, args=KV_ARGS + ["--kv-disk-dir", str(kv), "--kv-disk-space-mb", "1",
                                                 "--kv-cache-cold-max-tokens", "100000"])
    for i in range(6):
        chat(s, [{"role": "system", "content": f"{i} " + LONG_SYSTEM * 3}, {"role": "user", "content": "q"}])
    total = sum(p.stat().st_size for p in kv.glob("*.kv"))
    assert total <= 1 << 20


def test_trace_file_records_each_request_and_the_cache_decision(make_server, tmp_path):
    from scripts import ANSWER, CALL, WEATHER_OPENAI

    trace = tmp_path / "trace.log"
    s = make_server([CALL, ANSWER], args=["--trace", str(trace)], layers=LAYERS)
    c = s.openai()
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    r1 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_OPENAI])
    m = r1.choices[0].message
    call = m.tool_calls[0]
    msgs += [
        {"role": "assistant", "content": m.content or "", "reasoning_content": m.model_extra["reasoning_content"],
         "tool_calls": [tc.model_dump() for tc in m.tool_calls]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_OPENAI], stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    s.stop()
    text = trace.read_text()
    records = [r for r in text.split("\n\n===== request ") if r]
    assert len(records) == 2, text
    first, second = records
    assert first.startswith("===== request 1 ") and first.rstrip().endswith("===== end request 1 =====")
    assert second.startswith("2 ") and second.rstrip().endswith("===== end request 2 =====")
    for r in (first, second):
        for key in ("kind: chat.completions", "think_mode: high", "tools: 1 [\"get_weather\"]",
                    "--- cache decision ---", "--- raw request json ---", "--- rendered prompt ---",
                    "--- generated text ---", "--- parsed message ---"):
            assert key in r, (key, r)
    assert "stream: false" in first and "stream_include_usage: true" in second
    assert "memory_miss_reason: no live session" in first and "cache_source: cold" in first
    assert "finish: tool_calls" in first and f"tool_call[0]: {call.id} get_weather" in first
    # The follow-up replays the sampled DSML bytes and reuses the live session.
    assert "tool_replay: mem=1 disk=0 canonical=0 missing_ids=[]" in second
    assert "cache_source: memory-token" in second
    assert '"tool_call_id": "' + call.id in second
    assert "finish: stop" in second and 'content: "It is sunny in Rome."' in second


def test_thinking_follow_up_keeps_the_hidden_reasoning_kv(make_server):
    # Thinking mode without tools drops earlier reasoning from the rendered prompt, so the
    # live session is no prefix of the follow-up: the toolless-thinking binding (protocol.md
    # §5.3) reuses it anyway, Chat Completions and Messages alike.
    from scripts import THINK

    s = make_server([THINK, THINK, THINK, THINK], layers=LAYERS)
    c = s.openai()
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "first question"}]
    r1 = c.chat.completions.create(model=MODEL, messages=msgs)
    assert r1.choices[0].message.content == "Hello there, world!"
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "second"}]
    r2 = c.chat.completions.create(model=MODEL, messages=msgs)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    assert s.metrics()['ds4_cache_hits_total{kind="thinking-visible"}'] == 1
    # An edited answer is not what the session holds: no binding hit.
    msgs += [{"role": "assistant", "content": "edited"}, {"role": "user", "content": "third"}]
    c.chat.completions.create(model=MODEL, messages=msgs)
    assert s.metrics()['ds4_cache_hits_total{kind="thinking-visible"}'] == 1
    a = s.anthropic()
    am = [{"role": "user", "content": "hello"}]
    think = {"type": "enabled", "budget_tokens": 1024}
    m1 = a.messages.create(model=MODEL, max_tokens=256, thinking=think, system=LONG_SYSTEM, messages=am)
    am += [{"role": "assistant", "content": m1.content[1].text}, {"role": "user", "content": "more"}]
    m2 = a.messages.create(model=MODEL, max_tokens=256, thinking=think, system=LONG_SYSTEM, messages=am)
    assert m2.usage.cache_read_input_tokens == m1.usage.input_tokens + m1.usage.output_tokens
    assert s.metrics()['ds4_cache_hits_total{kind="thinking-visible"}'] == 2


def test_thinking_session_restored_after_restart_by_its_visible_transcript(make_server, tmp_path):
    # The shutdown checkpoint of a toolless-thinking session is keyed by what the next request
    # renders (protocol.md §5.6, ext bit 2), so the follow-up after a restart reuses it whole.
    from scripts import THINK

    kv = tmp_path / "kv"
    args = KV_ARGS + ["--kv-disk-dir", str(kv)]
    msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "first question"}]
    s = make_server([THINK], args=args, layers=LAYERS)
    r1 = s.openai().chat.completions.create(model=MODEL, messages=msgs)
    assert s.stop() == 0
    assert "stored shutdown checkpoint" in s.log_text()
    flags = sorted(f.read_bytes()[6] for f in kv.glob("*.kv"))
    assert 4 in flags, flags
    s2 = make_server(["Again."], args=args, layers=LAYERS)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "second"}]
    r2 = s2.openai().chat.completions.create(model=MODEL, messages=msgs)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    assert s2.metrics()['ds4_cache_hits_total{kind="disk-text"}'] == 1


def test_responses_follow_up_without_returned_reasoning_keeps_the_live_session(make_server, tmp_path):
    # A Responses client that does not ask for reasoning (no summary, no encrypted content)
    # sends back the call without it; the Responses binding (protocol.md §5.3) still continues
    # the live session, which holds the reasoning, instead of prefilling everything again.
    from scripts import ANSWER, CALL, WEATHER_FLAT

    kv = tmp_path / "kv"
    s = make_server([CALL, ANSWER], args=KV_ARGS + ["--kv-disk-dir", str(kv)], layers=LAYERS)
    c = s.openai()
    inp = [{"role": "developer", "content": LONG_SYSTEM}, {"role": "user", "content": "Weather in Rome?"}]
    r1 = c.responses.create(model=MODEL, input=inp, tools=[WEATHER_FLAT])
    assert [o.type for o in r1.output] == ["function_call"]
    call = r1.output[0]
    inp2 = inp + [call.model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r2 = c.responses.create(model=MODEL, input=inp2, tools=[WEATHER_FLAT])
    assert r2.output_text == "It is sunny in Rome."
    assert r2.usage.input_tokens_details.cached_tokens == r1.usage.input_tokens + r1.usage.output_tokens
    assert s.metrics()['ds4_cache_hits_total{kind="responses-visible"}'] == 1
    # The shutdown checkpoint of the second turn is keyed by its visible transcript (ext bit 1).
    assert s.stop() == 0
    assert 2 in [f.read_bytes()[6] & 6 for f in kv.glob("*.kv")]


def hits(s, kind):
    return s.metrics().get(f'ds4_cache_hits_total{{kind="{kind}"}}', 0)


def test_responses_tool_outputs_continue_the_live_tool_turn(make_server, tmp_path):
    # Tool outputs that answer exactly the calls of the live Responses tool-call turn are
    # appended to the live session (protocol.md §5.2 step 2, `responses-tool-output`), even
    # when the replayed history is not what the session holds (here: the reasoning the client
    # asked for is not sent back) or is not replayed at all (outputs only).
    from scripts import ANSWER, CALL, CALL2, WEATHER_FLAT

    trace = tmp_path / "trace.log"
    s = make_server([CALL, ANSWER, CALL2, ANSWER], args=["--trace", str(trace)], layers=LAYERS)
    c = s.openai()
    summary = {"summary": "auto"}
    inp = [{"role": "developer", "content": LONG_SYSTEM}, {"role": "user", "content": "Weather in Rome?"}]
    r1 = c.responses.create(model=MODEL, input=inp, tools=[WEATHER_FLAT], reasoning=summary)
    assert [o.type for o in r1.output] == ["reasoning", "function_call"]
    call = r1.output[1]
    inp2 = inp + [call.model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r2 = c.responses.create(model=MODEL, input=inp2, tools=[WEATHER_FLAT], reasoning=summary)
    assert r2.output_text == "It is sunny in Rome."
    assert r2.usage.input_tokens_details.cached_tokens == r1.usage.input_tokens + r1.usage.output_tokens
    assert hits(s, "responses-tool-output") == 1 and hits(s, "responses-visible") == 0
    # §4.7: the replayed call came without the reasoning the model wrote before it.
    assert "replayed tool-call turn(s) without their reasoning" in s.log_text()
    # A turn with two calls, then a request of outputs only (nothing replayed).
    r3 = c.responses.create(model=MODEL, input=inp + [{"role": "user", "content": "And Paris?"}],
                            tools=[WEATHER_FLAT])
    ids = [o.call_id for o in r3.output if o.type == "function_call"]
    assert len(ids) == 2
    outs = [{"type": "function_call_output", "call_id": i, "output": "sunny"} for i in ids]
    # Outputs for only one of the live calls: the live tool state they need is not there.
    r = httpx.post(s.url + "/v1/responses", json={"model": MODEL, "input": outs[:1], "tools": [WEATHER_FLAT]})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["message"] == (
        "Responses continuation state is not available; retry by replaying the full input history")
    assert hits(s, "conflict") == 1
    # An output for a call that is neither replayed nor live.
    r = httpx.post(s.url + "/v1/responses", json={"model": MODEL, "input": [
        {"type": "function_call_output", "call_id": "call_nope", "output": "x"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == ("Responses continuation state is not available for call_id "
                                            "call_nope; retry by replaying the full input history")
    events = list(c.responses.create(model=MODEL, input=outs[::-1], tools=[WEATHER_FLAT], stream=True))
    r4 = events[-1].response
    assert r4.status == "completed" and r4.output_text == "It is sunny in Rome."
    assert r4.usage.input_tokens_details.cached_tokens == r3.usage.input_tokens + r3.usage.output_tokens
    assert hits(s, "responses-tool-output") == 2
    # The binding is gone with the answer: the same outputs are now unknown.
    r = httpx.post(s.url + "/v1/responses", json={"model": MODEL, "input": outs})
    assert r.status_code == 400, r.text
    s.stop()
    text = trace.read_text()
    assert text.count("cache_source: responses-tool-output") == 2, text
    assert "cache_source: none (live tool state not available: 409)" in text


def test_anthropic_tool_results_continue_the_live_tool_turn(make_server, tmp_path):
    # The same for Messages (§5.2 step 3, `anthropic-tool-output`): after a tool_use turn,
    # tool_result messages for exactly its calls continue the live session.
    import anthropic

    from scripts import ANSWER, CALL, CALL2, WEATHER_ANTHROPIC

    trace = tmp_path / "trace.log"
    s = make_server([CALL, ANSWER, CALL2, ANSWER], args=["--trace", str(trace)], layers=LAYERS)
    a = s.anthropic()
    kw = dict(model=MODEL, max_tokens=256, system=LONG_SYSTEM, tools=[WEATHER_ANTHROPIC],
              thinking={"type": "enabled", "budget_tokens": 1024})
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    r1 = a.messages.create(messages=msgs, **kw)
    assert r1.stop_reason == "tool_use"
    tu = [b for b in r1.content if b.type == "tool_use"][0]
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in r1.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu.id, "content": "sunny"}]}]
    r2 = a.messages.create(messages=msgs, **kw)
    assert r2.content[-1].text == "It is sunny in Rome."
    assert r2.usage.cache_read_input_tokens == r1.usage.input_tokens + r1.usage.output_tokens
    assert hits(s, "anthropic-tool-output") == 1
    # Two calls; then tool results only (the history is not replayed).
    msgs += [{"role": "assistant", "content": r2.content[-1].text}, {"role": "user", "content": "And Paris?"}]
    r3 = a.messages.create(messages=msgs, **kw)
    ids = [b.id for b in r3.content if b.type == "tool_use"]
    assert len(ids) == 2
    results = [{"type": "tool_result", "tool_use_id": i, "content": "sunny"} for i in ids]
    # One result of the two live calls: 409, streamed or not.
    with pytest.raises(anthropic.APIStatusError) as e:
        a.messages.create(messages=[{"role": "user", "content": results[:1]}], **kw)
    assert e.value.status_code == 409
    assert e.value.body["error"]["message"] == (
        "Anthropic continuation state is not available; retry by replaying the full messages history")
    with pytest.raises(anthropic.APIStatusError) as e:
        with a.messages.stream(messages=[{"role": "user", "content": results[1:]}], **kw) as st:
            st.get_final_message()
    assert e.value.status_code == 409
    assert hits(s, "conflict") == 2
    with a.messages.stream(messages=[{"role": "user", "content": results}], **kw) as st:
        r4 = st.get_final_message()
    assert r4.content[-1].text == "It is sunny in Rome."
    assert r4.usage.cache_read_input_tokens == r3.usage.input_tokens + r3.usage.output_tokens
    assert hits(s, "anthropic-tool-output") == 2
    # Answered: the ids are no longer live (and not replayed): 400.
    with pytest.raises(anthropic.BadRequestError):
        a.messages.create(messages=[{"role": "user", "content": results}], **kw)
    s.stop()
    text = trace.read_text()
    assert text.count("cache_source: anthropic-tool-output") == 2, text
