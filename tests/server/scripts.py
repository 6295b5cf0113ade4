"""Scripted model outputs for --test-output (what a real model would generate)."""

THINK = "Let me think.</think>Hello there, world!"
PLAIN = "Hello there, world!"
CALL = (
    "I need the weather.</think>\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
CALL2 = (
    "Two cities.</think>\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
ANSWER = "Got it.</think>It is sunny in Rome."
PATCH = (
    "Patch it.</think>\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="apply_patch">\n'
    '<｜DSML｜parameter name="input" string="true">*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)

WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
WEATHER_FLAT = {"type": "function", **WEATHER_OPENAI["function"]}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "Get the weather for a city.",
    "input_schema": WEATHER_OPENAI["function"]["parameters"],
}
LONG_SYSTEM = "You are a careful coding agent. " + " ".join(f"Rule {i}: be precise and kind." for i in range(120))
