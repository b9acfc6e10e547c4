"""Prompt templates and chat views: both views go through the chat template; replies end with one end-of-turn."""

import pytest

from ssb.core.prompts import (
    DEFAULT_PROMPTS,
    SYSTEM_PROMPT,
    PromptSet,
    chat_text,
    end_of_turn_id,
    hinted_user_prompt,
    prompt_ids,
    reply_ids,
    student_messages,
    teacher_messages,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION = r"If $f(x) = \frac{x}{2}$, what is $f(\{4\})$? Use {correct} literally."
CORRECT = r"f(4) = 4/2 = 2, so \boxed{2}."
WRONG = r"f(4) = 4*2 = 8, so \boxed{8}."


def _bpe_tokenizer(specials: tuple[str, ...], eos: str, chat_template: str | None):
    """A small byte-level BPE (merges, like real tokenizers) trained in memory, with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [SYSTEM_PROMPT, DEFAULT_PROMPTS.hinted, QUESTION, CORRECT, WRONG] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=specials[0])
    if chat_template:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def chatml():
    return _bpe_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|endoftext|>", CHATML)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_student_view_goes_through_the_chat_template(chatml):
    msgs = student_messages(QUESTION)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == QUESTION
    expected = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    expected += "<|im_start|>assistant\n"
    assert chat_text(chatml, msgs) == expected
    ids = prompt_ids(chatml, msgs)
    assert ids == _encode(chatml, expected)
    im_start = chatml.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3 and ids[0] == im_start  # system, user, assistant turns: not flattened text


def test_teacher_view_holds_question_and_both_rollouts(chatml):
    msgs = teacher_messages(QUESTION, CORRECT, WRONG)
    assert msgs[0] == student_messages(QUESTION)[0]  # same system prompt as the student
    user = msgs[1]["content"]
    assert user == hinted_user_prompt(QUESTION, CORRECT, WRONG)
    # values are inserted verbatim (LaTeX braces, a literal "{correct}" in the question), in template order
    assert user.index(QUESTION) < user.index(CORRECT) < user.index(WRONG)
    assert r"\boxed{}" in user and "{question}" not in user
    ids = prompt_ids(chatml, msgs)
    assert chatml.decode(ids) == chat_text(chatml, msgs)
    assert len(ids) > len(prompt_ids(chatml, student_messages(QUESTION)))


def test_prompt_set_is_editable_and_hashed():
    custom = PromptSet(system="Be brief.", hinted="Q: {question}\nRight: {correct}\nWrong: {incorrect}")
    msgs = teacher_messages("1+1?", "2", "3", custom)
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 1+1?\nRight: 2\nWrong: 3"},
    ]
    assert custom.digest() != DEFAULT_PROMPTS.digest() and PromptSet().digest() == DEFAULT_PROMPTS.digest()


@pytest.mark.parametrize(
    "reply",
    [
        "The answer is \\boxed{2}.",
        "The answer is \\boxed{2}.<|im_end|>",
        "The answer is \\boxed{2}.<|im_end|><|im_end|>",
        "The answer is \\boxed{2}.<|im_end|>\n",  # raw chat text
    ],
)
def test_reply_ends_with_exactly_one_end_of_turn(chatml, reply):
    eot = chatml.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(chatml) == eot  # the ChatML end-of-turn wins over eos (<|endoftext|> here)
    ids = reply_ids(chatml, reply)
    assert ids[-1] == eot and ids.count(eot) == 1
    assert ids[:-1] == _encode(chatml, "The answer is \\boxed{2}.")


def test_prompt_plus_reply_equals_the_templated_conversation(chatml):
    """Teacher/student sequences are built as prompt_ids + reply_ids: that must be the chat template's own tokens."""
    reply = "f(4) = 2, so \\boxed{2}."
    msgs = student_messages(QUESTION) + [{"role": "assistant", "content": reply}]
    full = chatml.apply_chat_template(msgs, tokenize=False)
    assert prompt_ids(chatml, msgs[:-1]) + reply_ids(chatml, reply) == _encode(chatml, full.removesuffix("\n"))


def test_end_of_turn_inside_a_reply_is_an_error(chatml):
    with pytest.raises(ValueError, match="end-of-turn token"):
        reply_ids(chatml, "first turn<|im_end|>\n<|im_start|>user\nmore")


def test_end_of_turn_falls_back_to_eos():
    tok = _bpe_tokenizer(("<pad>", "<s>", "</s>"), "</s>", None)
    eos = tok.convert_tokens_to_ids("</s>")
    assert end_of_turn_id(tok) == eos
    ids = reply_ids(tok, "done</s>")
    assert ids[-1] == eos and ids.count(eos) == 1


def test_paper_template_digest_is_unchanged():
    """Stores captured before the template registry record this digest; the paper template must keep it."""
    from ssb.core.prompts import TEMPLATES

    assert TEMPLATES["paper"] is DEFAULT_PROMPTS and DEFAULT_PROMPTS.digest() == "a0f17925f95518c4"
    assert len({t.digest() for t in TEMPLATES.values()}) == len(TEMPLATES)


@pytest.mark.parametrize("name", ["paper", "short", "multiturn"])
def test_every_template_renders_through_the_chat_template(name, tiny_chat_model_dir):
    """Each hinted view goes through the tiny test model's own chat template, turn by turn."""
    from transformers import AutoTokenizer

    from ssb.core.prompts import TEMPLATES

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    msgs = teacher_messages(QUESTION, CORRECT, WRONG, TEMPLATES[name])
    text = chat_text(tok, msgs)
    assert prompt_ids(tok, msgs) == _encode(tok, text) and text.endswith("<|im_start|>assistant\n")
    assert msgs[0]["content"] == SYSTEM_PROMPT and msgs[-1]["role"] == "user" and QUESTION in text
    roles = [m["role"] for m in msgs]
    if name == "multiturn":  # the correct attempt as the model's own earlier answer, then "solve it again"
        assert roles == ["system", "user", "assistant", "user"]
        assert msgs[1]["content"] == QUESTION and msgs[2]["content"] == CORRECT
        assert "again" in msgs[3]["content"] and WRONG not in text
    elif name == "short":  # the correct attempt only, one line of instruction
        assert roles == ["system", "user"] and CORRECT in text and WRONG not in text
        assert len(msgs[1]["content"]) < len(QUESTION) + len(CORRECT) + 150
    else:
        assert roles == ["system", "user"] and CORRECT in text and WRONG in text
