"""Helpers of bench/lm-eval/run.sh (standard library only). None of them scores lm-eval's run:
lm-eval's own exact_match does that; these check that both tools saw the same prompts and put the
numbers side by side.

  check.py tokenize URL DATA FORMAT OUT.json [LIMIT]
      POST /tokenize every instruction as /v1/completions tokenizes a text prompt
      ("add_special": true, "parse_special": false) and compare with the row's prompt_ids (what
      `iapt eval` feeds): with the adapter the engine appends its soft tokens where `iapt eval`
      drops its slot ids, so text ids + [slot] * n must equal prompt_ids; without it `iapt eval`
      feeds the slot ids as ordinary tokens, which a text prompt cannot give.
  check.py base-ids URL MODEL DATA OUT.jsonl [LIMIT]
      /v1/completions with the row's prompt_ids as the prompt (token ids, fed as given) on the base
      model: the very ids `iapt eval` feeds the base, through the server, without lm-eval.
  check.py chat-probe URL MODEL DATA OUT.json
      One /v1/chat/completions request shaped as lm-eval's local-chat-completions sends it;
      writes the status and the body.
  check.py report WORK OUT_DIR
      Reads WORK/summary.json (written by run.sh) and the files it names, writes OUT_DIR/results.json
      and OUT_DIR/results.md, prints the table and exits 1 when a comparison that must hold fails.
"""

import glob
import json
import os
import sys
import urllib.error
import urllib.request


def post(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def rows(path, limit=None):
    out = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
    return out[: int(limit)] if limit else out


def tokenize(url, data, fmt_path, out, limit=None):
    fmt = json.load(open(fmt_path))
    slot, n = fmt["slot_id"], fmt["n_soft_tokens"]
    same_adapter = same_base = 0
    first_diff = None
    ex = rows(data, limit)
    for i, r in enumerate(ex):
        st, b = post(url + "/tokenize", {"content": r["instruction"], "add_special": True})
        if st == 404:
            sys.exit(f"POST /tokenize: 404 {b}: this iapt predates /tokenize (f1632c3); rebuild it: cargo build --release -p iapt")
        if st != 200:
            sys.exit(f"POST /tokenize: {st} {b}")
        ids = b["tokens"]
        if ids + [slot] * n == r["prompt_ids"]:
            same_adapter += 1
        elif first_diff is None:
            first_diff = {"row": i, "text_ids": ids, "prompt_ids": r["prompt_ids"]}
        st, b = post(url + "/tokenize", {"content": r["instruction"] + "<slot>" * n, "add_special": True})
        same_base += b["tokens"] == r["prompt_ids"]
    st, b = post(url + "/tokenize", {"content": ex[0]["instruction"], "add_special": True})
    res = {
        "n": len(ex),
        "adapter_prompt_same": same_adapter,
        "base_prompt_same": same_base,
        "first_difference": first_diff,
        "example": {"instruction": ex[0]["instruction"], "text_prompt_ids": b["tokens"], "iapt_eval_prompt_ids": ex[0]["prompt_ids"]},
    }
    json.dump(res, open(out, "w"), indent=1)
    print(f"tokenize: {same_adapter}/{len(ex)} text prompts + {n} soft tokens = iapt eval's adapter prompt; "
          f"{same_base}/{len(ex)} text prompts + '<slot>' x {n} = iapt eval's base prompt")


def base_ids(url, model, data, out, limit=None):
    with open(out, "w") as f:
        for r in rows(data, limit):
            body = {"model": model, "prompt": r["prompt_ids"], "max_tokens": 24, "temperature": 0, "stop": ["\n"]}
            st, b = post(url + "/v1/completions", body)
            if st != 200:
                sys.exit(f"POST /v1/completions {json.dumps(body)}: {st} {b}")
            text = b["choices"][0]["text"].strip()
            f.write(json.dumps({"instruction": r["instruction"], "response": r["response"], "answer": text}) + "\n")


def chat_probe(url, model, data, out):
    r = rows(data, 1)[0]
    body = {"messages": [{"role": "user", "content": r["instruction"]}], "model": model, "max_tokens": 24,
            "temperature": 0.0, "stop": ["\n"], "seed": 1234}
    st, b = post(url + "/v1/chat/completions", body)
    json.dump({"request": body, "status": st, "response": b}, open(out, "w"), indent=1)
    print(f"chat probe: {st}")


def lm_eval_run(d):
    """The newest results_*.json and samples_*.jsonl lm-eval wrote under d."""
    res = sorted(glob.glob(os.path.join(d, "**", "results_*.json"), recursive=True))
    smp = sorted(glob.glob(os.path.join(d, "**", "samples_*.jsonl"), recursive=True))
    if not res or not smp:
        return None
    agg = json.load(open(res[-1]))
    samples = sorted((json.loads(l) for l in open(smp[-1])), key=lambda s: s["doc_id"])
    metrics = next(iter(agg["results"].values()))  # one task per run
    return {
        "n": len(samples),
        "correct": int(sum(s["exact_match"] for s in samples)),
        "exact_match": metrics["exact_match,strip"],
        "lm_eval_version": agg.get("lm_eval_version") or agg.get("config", {}).get("lm_eval_version"),
        "answers": [s["filtered_resps"][0] for s in samples],
        "results_file": res[-1],
    }


def report(work, out_dir):
    s = json.load(open(os.path.join(work, "summary.json")))
    ie = json.load(open(s["iapt_eval_json"]))
    answers = rows(s["iapt_eval_answers"])
    tok = json.load(open(s["tokenize_json"]))
    refs = [a["response"] for a in answers]

    def side(label, run, key, must_match, note):
        iapt = ie["with_adapter" if key == "adapter" else "without_adapter"]
        iapt_answers = [a[key] for a in answers]
        if run is None:
            return {"label": label, "status": "not run", "note": note, "must_match": must_match}
        diff = [i for i, (x, y) in enumerate(zip(run["answers"], iapt_answers)) if x != y]
        same = run["correct"] == iapt["correct"] and run["n"] == iapt["n"] and not diff
        return {
            "label": label, "n": run["n"], "correct": run["correct"], "exact_match": run["exact_match"],
            "iapt_eval_correct": iapt["correct"], "iapt_eval_n": iapt["n"], "answers_differing": len(diff),
            "first_differing_rows": [{"row": i, "this": run["answers"][i], "iapt_eval": iapt_answers[i],
                                      "expected": refs[i]} for i in diff[:3]],
            "same_as_iapt_eval": same, "must_match": must_match, "note": note,
        }

    checks = [
        side("lm-eval local-completions, model = adapter", lm_eval_run(s["lm_eval_adapter_dir"]), "adapter", True,
             "text prompt; the server appends the adapter's soft tokens, as iapt eval does"),
        side("lm-eval local-completions, model = base (task iapt_demo_reverse_base)", lm_eval_run(s["lm_eval_base_dir"]), "base", True,
             "text prompt: instruction + \"<slot>\" x 4 (special-token text, parsed as llama-server does): "
             "[BOS] + instruction + the 4 slot ids, iapt eval's base prompt"),
    ]
    base_ids_rows = rows(s["base_ids_answers"]) if os.path.exists(s["base_ids_answers"]) else None
    if base_ids_rows is not None:
        run = {"n": len(base_ids_rows), "correct": sum(r["answer"] == r["response"] for r in base_ids_rows),
               "exact_match": None, "answers": [r["answer"] for r in base_ids_rows]}
        run["exact_match"] = run["correct"] / max(run["n"], 1)
        checks.append(side("iapt serve, token-id prompt = iapt eval's ids, model = base (no lm-eval)", run, "base", True,
                           "the base's prompt exactly as iapt eval feeds it, sent as token ids"))
    chat = json.load(open(s["chat_probe_json"])) if os.path.exists(s["chat_probe_json"]) else None
    chat_run = lm_eval_run(s["lm_eval_chat_dir"]) if chat and chat["status"] == 200 else None
    if chat is not None:
        if chat["status"] == 200:
            checks.append(side("lm-eval local-chat-completions, model = adapter", chat_run, "adapter", True,
                               "one user message, rendered by the model's chat template"))
        else:
            checks.append({"label": "lm-eval local-chat-completions, model = adapter", "status": "refused",
                           "must_match": False, "note": f"probe: HTTP {chat['status']}: {json.dumps(chat['response'])}"})
    failed = [c["label"] for c in checks if c.get("must_match") and not c.get("same_as_iapt_eval")]
    result = {"machine": s["machine"], "lm_eval_version": s["lm_eval_version"], "iapt": s["iapt"],
              "commit": s["commit"], "commands": s["commands"], "seconds": s["seconds"], "venv_mib": s["venv_mib"],
              "iapt_eval": {k: ie[k] for k in ("with_adapter", "without_adapter", "seconds")},
              "tokenization": tok, "checks": checks, "failed": failed}
    json.dump(result, open(os.path.join(out_dir, "results.json"), "w"), indent=1)

    L = ["# lm-evaluation-harness against iapt serve: results", "",
         f"Written by `bench/lm-eval/run.sh` on {s['date']} (commit {s['commit']}); machine: {s['machine']}; "
         f"lm-eval {s['lm_eval_version']}; iapt binary: {s['iapt']}.", "",
         f"Data: `{s['data']}` ({tok['n']} examples); base `{s['model']}`, adapter `{s['adapter']}`.", "",
         "| run | exact match | iapt eval | answers differing | same | must match |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for c in checks:
        if "n" in c:
            L.append(f"| {c['label']} | {c['correct']}/{c['n']} ({100 * c['correct'] / c['n']:.1f}%) | "
                     f"{c['iapt_eval_correct']}/{c['iapt_eval_n']} | {c['answers_differing']} | "
                     f"{'yes' if c['same_as_iapt_eval'] else 'no'} | {'yes' if c['must_match'] else 'no'} |")
        else:
            L.append(f"| {c['label']} | {c['status']} | | | | {'yes' if c['must_match'] else 'no'} |")
    L += ["", "Notes:", ""] + [f"- {c['label']}: {c['note']}" for c in checks]
    L += ["", f"Tokenization (`POST /tokenize`, as /v1/completions tokenizes a text prompt): "
          f"{tok['adapter_prompt_same']}/{tok['n']} text prompts + the adapter's 4 soft tokens = iapt eval's prompt "
          f"ids; {tok['base_prompt_same']}/{tok['n']} text prompts + `<slot>` x 4 (the base task's) = iapt eval's base prompt ids. Row 0: text "
          f"`{tok['example']['text_prompt_ids']}`, iapt eval `{tok['example']['iapt_eval_prompt_ids']}`.", "",
          "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()) + f"; venv {s['venv_mib']} MiB.", "",
          "Commands:", "", "```"] + s["commands"] + ["```", ""]
    L.append("Result: " + ("FAILED: " + "; ".join(failed) if failed else "every comparison that must hold holds."))
    open(os.path.join(out_dir, "results.md"), "w").write("\n".join(L) + "\n")
    print("\n".join(L[6:6 + 2 + len(checks)]))
    print("FAILED: " + "; ".join(failed) if failed else "OK: every comparison that must hold holds")
    return 1 if failed else 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tokenize":
        tokenize(*args)
    elif cmd == "base-ids":
        base_ids(*args)
    elif cmd == "chat-probe":
        chat_probe(*args)
    elif cmd == "report":
        sys.exit(report(*args))
    else:
        sys.exit(f"unknown command {cmd}")
