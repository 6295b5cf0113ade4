"""The real engine behind the API: sampling, KV slots, exact DSML replay, prompt injection,
CORS and the one-process lock."""
import json
import subprocess

import httpx

from conftest import server_bin
from scripts import LONG_SYSTEM, PLAIN

MODEL = "deepseek-v4-flash"

# A call whose non-string value is spelled compactly: the official encoder would re-render it
# as `[1, 2]`, so only the exact replay of the sampled bytes keeps the live KV prefix.
CALL_COMPACT = (
    "Checking.</think>\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">[1,2]</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"}}}}}


def test_sampling_is_real_and_seeded(make_server):
    """No script: tokens are sampled from the model's logits; a fixed seed reproduces them,
    whether the prompt is prefilled cold in one slot or the other."""
    s = make_server()
    c = s.openai()
    kw = dict(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=12, seed=7)
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 12
    assert a.choices[0].message.content == b.choices[0].message.content
    g1 = c.chat.completions.create(**{**kw, "temperature": 0, "seed": 1})
    g2 = c.chat.completions.create(**{**kw, "temperature": 0, "seed": 2})
    assert g1.choices[0].message.content == g2.choices[0].message.content


def test_side_request_keeps_the_agent_session(make_server):
    """A title request between two agent turns uses the second KV slot; with one slot it
    evicts the agent's session and the next turn is prefilled again."""
    for slots, reused in (("2", True), ("1", False)):
        s = make_server([PLAIN, "A title", "Second answer."], args=["--kv-slots", slots])
        c = s.openai()
        msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "first question"}]
        r1 = c.chat.completions.create(model="deepseek-chat", messages=msgs)
        c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Title for: first question"}])
        msgs += [{"role": "assistant", "content": PLAIN}, {"role": "user", "content": "second"}]
        r2 = c.chat.completions.create(model="deepseek-chat", messages=msgs)
        full = r1.usage.prompt_tokens + r1.usage.completion_tokens
        assert (r2.usage.prompt_tokens_details.cached_tokens == full) == reused, (slots, r2.usage)
        s.stop()


def test_exact_dsml_replay_keeps_the_prefix(make_server):
    for args, reused in (([], True), (["--disable-exact-dsml-tool-replay"], False)):
        s = make_server([CALL_COMPACT, "Ok.</think>Sunny."], args=args)
        c = s.openai()
        msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Weather in Rome?"}]
        r1 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[TOOL])
        m = r1.choices[0].message
        assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Rome", "days": [1, 2]}
        msgs += [{"role": "assistant", "content": "", "reasoning_content": m.model_extra["reasoning_content"],
                  "tool_calls": [tc.model_dump() for tc in m.tool_calls]},
                 {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny"}]
        r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[TOOL])
        assert r2.choices[0].message.content == "Sunny."
        full = r1.usage.prompt_tokens + r1.usage.completion_tokens
        assert (r2.usage.prompt_tokens_details.cached_tokens >= full) == reused, (args, r2.usage, full)
        s.stop()


def test_special_token_text_in_content_is_not_a_control_token(make_server):
    s = make_server([PLAIN])
    a = s.anthropic()
    n = lambda t: a.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": t}]).input_tokens
    # As text, `<｜Assistant｜>` is several BPE tokens; as the control token it would be one.
    assert n("x<｜Assistant｜>") - n("x") > 1


def test_cors(make_server):
    s = make_server([PLAIN, PLAIN], args=["--cors"])
    r = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://a", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = httpx.post(s.url + "/v1/chat/completions", json={"nope": 1})
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == "*"
    s.stop()
    plain = make_server([PLAIN])
    r = httpx.options(plain.url + "/v1/chat/completions")
    assert r.status_code == 204 and "access-control-allow-origin" not in r.headers


def test_second_server_on_the_same_lock_exits_2(make_server, tmp_path):
    s = make_server([PLAIN])
    lock = s.tmp / f"ds4-{s.port}.lock"
    assert lock.read_text().strip() == str(s.proc.pid)
    p = subprocess.run([server_bin(), "--port", "0", "--lock-file", str(lock)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and f"pid {s.proc.pid}" in p.stderr
