"""IaptDataCollator: soft slots right after the chat-templated instruction, loss on the response."""

import pytest
import torch

from iapt_train import IaptDataCollator
from tinymodels import tiny_tokenizer


def test_chat_template_instruction_then_slots_then_response():
    tok = tiny_tokenizer(chat=True)
    c = IaptDataCollator(tok, n_soft_tokens=3, slot_token_id=0)
    assert c.chat_template
    recs = [{"instruction": "reverse the words : owl pen", "response": "pen owl"},
            {"instruction": "say the first word : apple bird cake", "response": "apple", "extra": 1}]
    b = c(recs)
    for i, r in enumerate(recs):
        want_instr = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}],
                                             add_generation_prompt=True, tokenize=True)
        if hasattr(want_instr, "keys"):
            want_instr = want_instr["input_ids"]
        want_instr = list(want_instr)
        # <s> <|user|> ... <|assistant|>: BOS and template tokens are part of the instruction.
        assert want_instr[0] == tok.bos_token_id and want_instr[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        n = len(want_instr)
        resp = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        L = n + 3 + len(resp)
        assert int(b["instruction_lengths"][i]) == n
        assert b["input_ids"][i, :n].tolist() == want_instr
        assert b["input_ids"][i, n: n + 3].tolist() == [0, 0, 0]
        assert b["input_ids"][i, n + 3: L].tolist() == resp
        assert b["attention_mask"][i].tolist() == [1] * L + [0] * (b["input_ids"].shape[1] - L)
        # Loss only on the response (EOS included): the first response token is the label at
        # position n+m, i.e. predicted from the logits at n+m-1 (the last soft slot).
        assert b["labels"][i, :n + 3].tolist() == [-100] * (n + 3)
        assert b["labels"][i, n + 3: L].tolist() == resp
        assert (b["labels"][i, L:] == -100).all()
        assert (b["input_ids"][i, L:] == tok.pad_token_id).all()
    assert c.encode_instruction(recs[0]["instruction"]) == b["input_ids"][0, : int(b["instruction_lengths"][0])].tolist()


def test_without_chat_template_the_tokenizer_adds_bos():
    tok = tiny_tokenizer(chat=False)
    c = IaptDataCollator(tok, n_soft_tokens=2)
    assert not c.chat_template
    assert c.slot_token_id == tok.pad_token_id
    ids = c.encode_instruction("sort the words : egg fish")
    assert ids == [tok.bos_token_id] + tok("sort the words : egg fish", add_special_tokens=False)["input_ids"]
    # A system prompt goes into the chat template only.
    tc = tiny_tokenizer(chat=True)
    cs = IaptDataCollator(tc, n_soft_tokens=2, system_prompt="say")
    assert tc.convert_tokens_to_ids("<|system|>") in cs.encode_instruction("sort")


def test_pre_tokenized_records_pass_through():
    c = IaptDataCollator(None, n_soft_tokens=4, slot_token_id=3, pad_token_id=2)
    b = c([{"instruction_ids": [1, 7, 8], "response_ids": [9, 2]}, {"instruction_ids": [1], "response_ids": [5]}])
    assert b["input_ids"].tolist() == [[1, 7, 8, 3, 3, 3, 3, 9, 2], [1, 3, 3, 3, 3, 5, 2, 2, 2]]
    assert b["labels"].tolist() == [[-100] * 7 + [9, 2], [-100] * 5 + [5, -100, -100, -100]]
    assert b["instruction_lengths"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="n >= 1"):
        c([{"instruction_ids": [], "response_ids": [5]}])


def test_max_length():
    c = IaptDataCollator(None, n_soft_tokens=2, max_length=6)
    assert c.fits({"instruction_ids": [1, 2], "response_ids": [3, 4]})
    assert not c.fits({"instruction_ids": [1, 2, 3], "response_ids": [3, 4]})
    with pytest.raises(ValueError, match="max_length"):
        c([{"instruction_ids": [1, 2, 3], "response_ids": [3, 4]}])
    assert isinstance(c([{"instruction_ids": [1], "response_ids": [3]}])["input_ids"], torch.Tensor)
