"""Training: with the Hugging Face Trainer, with the package's loop in bf16, and the `iapt-train`
command line on a JSONL file (progress, periodic evaluation, the adapter written at the end)."""

import json

import pytest
import torch

from conftest import validate_json
from iapt_train import IaptCheckpointCallback, IaptDataCollator, IaptModel, TrainArgs, evaluate_loss, exact_match, get_iapt_model, train
from iapt_train.cli import main as cli_main
from tinymodels import random_llama, tiny_tokenizer, word_records


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_hugging_face_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer(chat=True)
    base = random_llama(seed=2)
    base_before = snapshot(base)
    torch.manual_seed(0)
    model = get_iapt_model(base, n_soft_tokens=2, bottleneck=8)
    collator = IaptDataCollator(tok, model=model)
    records = word_records(32, seed=3, task="first")
    gen_before = snapshot(model.generators)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
                             save_steps=6, report_to=[], use_cpu=True, remove_unused_columns=False,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=records, data_collator=collator,
                      callbacks=[IaptCheckpointCallback()])
    loss_before = evaluate_loss(model, collator, records)
    trainer.train()
    loss_after = evaluate_loss(model, collator, records)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)
    # Every checkpoint holds a valid adapter (the callback) and the Trainer's own adapter-sized weights.
    for step in (6, 12):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        v = validate_json(ckpt / "adapter.iapt.safetensors")
        assert v["rc"] == 0 and v["findings"] == [], v
        from safetensors.torch import load_file

        saved = load_file(str(ckpt / "model.safetensors"))
        assert set(saved) == set(model.state_dict()) and all(k.startswith("generators.") for k in saved)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_before.items())
    assert any(not torch.equal(v, model.generators.state_dict()[k]) for k, v in gen_before.items())
    # The last checkpoint's adapter is the trained model; loading it gives the same function.
    again = IaptModel.from_pretrained(random_llama(seed=2), str(tmp_path / "run" / "checkpoint-12"))
    batch = collator(records[:4])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_plain_loop_in_bfloat16(tmp_path):
    tok = tiny_tokenizer(chat=False)
    base = random_llama(seed=4, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = get_iapt_model(base, n_soft_tokens=3, bottleneck=8, rational_variant="A")
    assert all(p.dtype == torch.float32 for p in model.generators.parameters())
    collator = IaptDataCollator(tok, model=model)
    records = word_records(32, seed=5, task="first")
    model.init_up_bias_from_batch(collator(records))
    log = train(model, collator, records, TrainArgs(steps=10, batch_size=8, lr=3e-2, warmup_steps=2, eval_every=5,
                                                    progress=False), eval_records=records[:8])
    losses = [e["loss"] for e in log if "loss" in e]
    evals = [e for e in log if e.get("eval")]
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(e["eval_loss"])) for e in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 1.0
    assert all(torch.isfinite(torch.tensor(x)) for x in losses)
    out = model.generate(torch.tensor([collator.encode_instruction(records[0]["instruction"])]), max_new_tokens=3,
                         do_sample=False)
    assert out.shape[1] <= len(collator.encode_instruction(records[0]["instruction"])) + 3
    path = model.save_pretrained(tmp_path)
    assert validate_json(path)["rc"] == 0


def test_command_line(tmp_path, capsys):
    tok = tiny_tokenizer(chat=True)
    model_dir = tmp_path / "tiny-llama"
    random_llama(seed=6).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    rows = word_records(40, seed=7, task="first") + [{"instruction": "say " * 200, "response": "x"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = cli_main(["--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "8",
                   "--batch-size", "8", "--lr", "3e-2", "--warmup-steps", "2", "--eval-every", "4",
                   "--eval-fraction", "0.2", "--eval-generate", "4", "--max-new-tokens", "4", "--soft-tokens", "2",
                   "--bottleneck", "8", "--rational-variant", "C", "--rational-groups", "2", "--layers", "0",
                   "--max-length", "64", "--no-progress", "--name", "tiny"])
    assert rc == 0
    err = capsys.readouterr()
    assert "skipped 1 records longer than --max-length 64" in err.err
    assert "eval: step 4" in err.out and "eval: step 8" in err.out
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e.get("eval")] == [4, 8]
    assert all("eval_exact_match" in e for e in log if e.get("eval"))
    path = out / "adapter.iapt.safetensors"
    v = validate_json(path)
    assert v["rc"] == 0 and v["findings"] == [], v
    summary = json.loads((out / "train_summary.json").read_text())["summary"]
    assert summary["train_records"] == 32 and summary["eval_records"] == 8
    # Only layer 0 trained; layer 1 kept its initial generator (a constant row: up.weight is zero).
    from transformers import AutoModelForCausalLM

    loaded = IaptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    assert loaded.iapt_config.layers == [0] and loaded.iapt_config.rational_variant == "C"
    assert loaded.generators[1].up.weight.abs().max() == 0
    assert loaded.generators[0].up.weight.abs().max() > 0
    # The saved adapter is the trained model: the loss of the last evaluation again, on the same
    # held-out records (the command's split: Random(seed).shuffle of the kept records, 20% first).
    import random

    kept = rows[:40]
    random.Random(0).shuffle(kept)
    collator = IaptDataCollator(tok, model=loaded)
    assert abs(evaluate_loss(loaded, collator, kept[:8]) - log[-1]["eval_loss"]) < 1e-6
    acc, preds = exact_match(loaded, collator, kept[:4], max_new_tokens=4)
    assert acc == 100.0 * sum(p == r["response"] for p, r in zip(preds, kept[:4])) / 4


def test_command_line_refuses_an_unsupported_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    with pytest.raises(ValueError, match="not supported"):
        cli_main(["--model", str(d), "--data", str(data), "--output", str(tmp_path / "o"), "--no-progress"])


def test_micro_batches_give_the_batch_gradient_and_chunked_init_the_same_bias():
    from iapt_train import accumulate_gradients

    tok = tiny_tokenizer(chat=True)
    torch.manual_seed(0)
    model = get_iapt_model(random_llama(seed=8), n_soft_tokens=2, bottleneck=8)
    collator = IaptDataCollator(tok, model=model)
    records = word_records(10, seed=9)  # responses of different lengths: unequal token shares
    model.init_up_bias_from_batch(collator(records))
    whole = [g.up.bias.detach().clone() for g in model.generators]
    model.init_up_bias_from_batch(collator(records), chunk_size=3)
    for a, g in zip(whole, model.generators):
        assert torch.allclose(a, g.up.bias, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for g in model.generators:
            g.up.weight.normal_(0.0, 0.1)  # so that every generator tensor gets a gradient
    params = [p for p in model.generators.parameters()]
    loss_a = accumulate_gradients(model, collator, records)
    grads_a = [p.grad.clone() for p in params]
    model.generators.zero_grad(set_to_none=True)
    loss_b = accumulate_gradients(model, collator, records, micro_batch_size=3)
    assert abs(float(loss_a) - float(loss_b)) < 1e-5
    for ga, p in zip(grads_a, params):
        assert ga.abs().max() > 0
        assert torch.allclose(ga, p.grad, rtol=1e-4, atol=1e-6)
