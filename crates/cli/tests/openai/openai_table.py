"""Issue 33's table, re-run with the official `openai` Python client on the demo model (run by
crates/cli/tests/serve_openai.rs): every row the issue builds must answer correctly, every row it
leaves unsupported must raise the client's own error naming the parameter.

argv[1] is a JSON object: base_url (…/v1), api_key, base (the base model's id), adapter (an
adapter's name), instructions (two held-out instructions). Prints one line per row and exits
non-zero if any row failed.
"""

import json
import sys
import urllib.request

import openai

cfg = json.loads(sys.argv[1])
client = openai.OpenAI(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=120)
root = cfg["base_url"].rsplit("/v1", 1)[0]
auth = {"Authorization": "Bearer " + cfg["api_key"]}
base, adapter = cfg["base"], cfg["adapter"]
p1, p2 = cfg["instructions"]
rows = []


def post(path, body):
    """llama-server's routes beside the OpenAI API (the client has no method for them)."""
    req = urllib.request.Request(root + path, data=json.dumps(body).encode(), headers={**auth, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def row(name):
    def wrap(check):
        try:
            check()
            rows.append((name, "ok"))
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
            rows.append((name, "FAILED: %r" % (e,)))
        return check

    return wrap


def refused(call, param, error=openai.BadRequestError):
    try:
        call()
    except error as e:
        assert e.body.get("param") == param, e.body
        return
    raise AssertionError("not refused")


def completion_tokens(r, i=0):
    return r.choices[i].logprobs.tokens


@row("chat.completions on the demo model = completions on the rendered prompt, token for token (T=0)")
def _():
    for model in (adapter, base):
        c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p1}], max_tokens=16, temperature=0, logprobs=True)
        r = client.completions.create(model=model, prompt=p1, max_tokens=16, temperature=0, logprobs=0)
        assert [t.token for t in c.choices[0].logprobs.content] == completion_tokens(r), (model, c, r)
        assert c.choices[0].message.content == r.choices[0].text
        assert c.usage.prompt_tokens == r.usage.prompt_tokens


@row("models.retrieve (GET /v1/models/{id})")
def _():
    m = client.models.retrieve(adapter)
    assert m.id == adapter and m.model_extra.get("parent") == base, m
    refused(lambda: client.models.retrieve("no-such-model"), "model", openai.NotFoundError)


@row("n=2 (completions and chat): choice i = the request with seed + i")
def _():
    two = client.completions.create(model=adapter, prompt=p1, max_tokens=8, temperature=1, seed=3, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    for i in range(2):
        one = client.completions.create(model=adapter, prompt=p1, max_tokens=8, temperature=1, seed=3 + i)
        assert two.choices[i].text == one.choices[0].text, (i, two, one)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens, "the prompt counted once"
    chat = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": p1}], max_tokens=8, temperature=1, seed=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[1].message.content == two.choices[1].text, chat


@row("prompt=[p1, p2]: one choice per prompt")
def _():
    r = client.completions.create(model=adapter, prompt=[p1, p2], max_tokens=16, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for i, p in enumerate((p1, p2)):
        one = client.completions.create(model=adapter, prompt=p, max_tokens=16, temperature=0)
        assert r.choices[i].text == one.choices[0].text, (i, r, one)


@row("logit_bias: +100 makes a token the first one")
def _():
    ids = post("/tokenize", {"content": " zebra"})["tokens"]
    want = post("/detokenize", {"tokens": [ids[-1]]})["content"]
    r = client.completions.create(model=adapter, prompt=p1, max_tokens=1, temperature=0, logprobs=0, logit_bias={str(ids[-1]): 100})
    assert completion_tokens(r) == [want], (r, want)


@row("response_format json_object and json_schema (strict)")
def _():
    r = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": p1}], max_tokens=60, temperature=1, seed=1,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "count"], "additionalProperties": False}
    r = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": p1}], max_tokens=80, temperature=1, seed=2, n=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": schema}})
    for c in r.choices:
        v = json.loads(c.message.content)
        assert set(v) == {"answer", "count"} and isinstance(v["answer"], str) and len(v["answer"]) <= 12, v
        assert isinstance(v["count"], int) and 0 <= v["count"] <= 9, v


@row("stream_options include_usage: a final usage chunk")
def _():
    chunks = list(client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": p1}], max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0, chunks[-1]


@row("/tokenize and /detokenize (llama-server's shapes)")
def _():
    ids = post("/tokenize", {"content": p1})["tokens"]
    text = post("/detokenize", {"tokens": ids})["content"]
    assert text.strip() == p1, (ids, text)


@row("max_completion_tokens")
def _():
    r = client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": p1}], max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3, r


@row("still refused, naming the parameter: echo, best_of, suffix, tools; /v1/embeddings 404")
def _():
    refused(lambda: client.completions.create(model=adapter, prompt=p1, max_tokens=2, echo=True), "echo")
    refused(lambda: client.completions.create(model=adapter, prompt=p1, max_tokens=2, best_of=2), "best_of")
    refused(lambda: client.completions.create(model=adapter, prompt=p1, max_tokens=2, suffix="x"), "suffix")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused(lambda: client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": p1}], tools=[tool]), "tools")
    try:
        client.embeddings.create(model=adapter, input="x")
        raise AssertionError("embeddings answered")
    except openai.NotFoundError:
        pass


for name, result in rows:
    print("%-100s %s" % (name, result))
failed = [r for r in rows if r[1] != "ok"]
if failed:
    sys.exit(1)
print("openai table: all %d rows passed" % len(rows))
