"""The official `openai` Python client against `iapt serve` (run by crates/cli/tests/serve_openai.rs).

argv[1] is a JSON object: base_url, api_key, base (the base model's id), adapter (an adapter's name),
prompt, and expected: the greedy texts of `iapt run` for "completion" and "chat", each per model id.
Every check is an assert: the process exits non-zero on the first mismatch.
"""

import json
import sys

import openai

cfg = json.loads(sys.argv[1])
client = openai.OpenAI(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=60)
base, adapter, prompt = cfg["base"], cfg["adapter"], cfg["prompt"]

models = {m.id: m for m in client.models.list().data}
assert set(models) == {base, adapter}, models
assert models[adapter].model_extra.get("parent") == base, models[adapter]

for model in (adapter, base):
    want = cfg["expected"]["completion"][model]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want, (model, r.choices[0].text, want)
    assert r.model == model and r.usage.completion_tokens > 0, r
    text = "".join(c.choices[0].text for c in client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert text == want, (model, "streamed", text, want)

    want = cfg["expected"]["chat"][model]
    messages = [{"role": "user", "content": prompt}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == want, (model, r.choices[0].message.content, want)
    assert r.choices[0].message.role == "assistant"
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content), r
    assert all(t.logprob <= 0 for t in content)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want, (model, "chat streamed", text, want)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1]

try:
    client.completions.create(model="no-such-adapter", prompt=prompt, max_tokens=2)
    raise AssertionError("an unknown model must be refused")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": prompt}], n=99)
    raise AssertionError("more choices than sequence slots must be refused")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
try:
    openai.OpenAI(base_url=cfg["base_url"], api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong API key must be refused")
except openai.AuthenticationError:
    pass
print("openai client: all checks passed")
