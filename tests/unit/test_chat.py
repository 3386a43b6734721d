"""Chat prompts without Ray: the built-in model's template (and old caches without it), the 400 for a base model
without a template, templates that refuse, a doubled BOS, and the ingress's messages for bad chat bodies."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from transformers import AutoTokenizer

from hotswap.builtin import TINY_CHAT_TEMPLATE, materialize_builtin_model
from hotswap.chat import ChatRenderer
from hotswap.errors import RequestError
from hotswap.settings import HotswapSettings

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _without_template(tiny_base, out):
    """A copy of the built-in checkpoint whose tokenizer has no chat template (as a base model's has none)."""
    shutil.copytree(tiny_base, out, ignore=shutil.ignore_patterns("chat_template.jinja"))
    return out


def test_builtin_model_renders_messages_with_its_template(tiny_base):
    assert (tiny_base / "chat_template.jinja").read_text() == TINY_CHAT_TEMPLATE
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tiny_base), base_model="builtin:tiny-llama")
    prompt = renderer.render(CONVERSATION)
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = renderer.tokenizer(prompt)["input_ids"]
    # each turn ends in the one end-of-sequence token the model stops on, not in the bytes of "</s>"
    assert ids.count(renderer.tokenizer.eos_token_id) == 2
    assert renderer.count_tokens(prompt) == len(ids)


def test_an_old_cache_without_the_template_is_generated_again(tmp_path, tiny_base):
    """A cache written before the template existed (format v1) is not reused: the model is generated beside it."""
    old = _without_template(tiny_base, tmp_path / "models" / "tiny-llama-v1")
    assert AutoTokenizer.from_pretrained(old).chat_template is None  # control: the old files really lack it
    path = materialize_builtin_model("tiny-llama", cache_dir=tmp_path)
    assert path != old and (path / "chat_template.jinja").is_file()
    assert ChatRenderer.load(HotswapSettings(cache_dir=tmp_path)).render(CONVERSATION).endswith("<|assistant|>\n")
    assert not (old / "chat_template.jinja").exists()  # the old cache is left alone


def test_a_base_model_without_a_chat_template_is_a_400_naming_the_fix(tmp_path, tiny_base):
    plain = _without_template(tiny_base, tmp_path / "plain")
    renderer = ChatRenderer.load(HotswapSettings(base_model=str(plain), cache_dir=tmp_path))
    assert not renderer.has_template
    with pytest.raises(RequestError) as caught:
        renderer.render(CONVERSATION)
    message = str(caught.value)
    assert f"base model {str(plain)!r} has no chat template" in message
    assert "/v1/completions" in message and "chat_template" in message
    assert caught.value.http_status == 400


def test_a_template_that_refuses_the_messages_is_a_request_error(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must come from the user') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    renderer = ChatRenderer(tokenizer, base_model="m")
    assert renderer.render([{"role": "user", "content": "ok"}]) == "ok"  # control
    with pytest.raises(RequestError, match="chat template of base model 'm' refused the messages: the first message "
                                           "must come from the user"):
        renderer.render(CONVERSATION)


def test_lone_surrogates_are_a_request_error(tiny_base):
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tiny_base), base_model="m")
    with pytest.raises(RequestError, match="not valid unicode"):
        renderer.render([{"role": "user", "content": "\ud800"}])


def test_a_tokenizer_that_adds_bos_does_not_get_a_second_from_the_template(tiny_base):
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    raw = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer(raw)["input_ids"].count(bos) == 2  # control: without the fix the prompt starts <s> <s>
    prompt = ChatRenderer(tokenizer, base_model="m").render(CONVERSATION)
    assert prompt == "[Be brief.][Hi]"
    assert tokenizer(prompt)["input_ids"][:2] == [bos, tokenizer("[")["input_ids"][1]]


def _rejection(model, body) -> dict:
    """What the ingress answers for ``body``: the same handler FastAPI calls on a validation error."""
    from deployments.ingress import _invalid

    try:
        model.model_validate(body)
    except ValidationError as e:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]  # as FastAPI reports them
        response = asyncio.run(_invalid(None, RequestValidationError(errors)))
        assert response.status_code == 400
        return json.loads(response.body)["error"]
    raise AssertionError(f"{body} was accepted")


BAD_CHAT_BODIES = [
    ("unknown-role", {"messages": [{"role": "robot", "content": "x"}]}, "'messages[0].role'", "got 'robot'"),
    ("tool-role", {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
     "'messages[1].role'", "got 'tool'"),
    ("empty-messages", {"messages": []}, "'messages'", "at least 1"),
    ("missing-messages", {"max_tokens": 3}, "'messages' is required", ""),
    ("messages-string", {"messages": "hi"}, "'messages'", "list"),
    ("content-number", {"messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string",
     '"type": "text"'),
    ("content-image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "'messages[0].content' must be", "parts"),
    ("missing-content", {"messages": [{"role": "user"}]}, "'messages[0].content' is required", ""),
    ("tool-calls", {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
     "unknown field 'messages[0].tool_calls'", ""),
    ("tools", {"messages": [{"role": "user", "content": "x"}], "tools": []}, "unknown field 'tools'", ""),
    ("n-two", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "'n'", ""),
    ("max-completion-tokens-zero", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "'max_completion_tokens'", ""),
]


@pytest.mark.parametrize(("body", "message", "detail"), [c[1:] for c in BAD_CHAT_BODIES],
                         ids=[c[0] for c in BAD_CHAT_BODIES])
def test_bad_chat_bodies_name_the_field(body, message, detail):
    from deployments.ingress import ChatCompletionRequest

    error = _rejection(ChatCompletionRequest, body)
    assert message in error["message"] and detail in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"].startswith(message.split("'")[1][:8])


def test_completion_bodies_keep_their_messages():
    from deployments.ingress import CompletionRequest

    assert _rejection(CompletionRequest, {"prompt": 5})["message"] == (
        "'prompt' must be a non-empty string, or a list holding one")
    assert _rejection(CompletionRequest, {"prompt": "x", "best_of": 2})["message"] == "unknown field 'best_of'"


def test_messages_reach_the_template_as_templates_read_them():
    from deployments.ingress import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}], "name": "ann"},
    ]})
    assert [m.for_template() for m in body.messages] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere", "name": "ann"}]
    assert body.to_replica("p", window_left=40)["max_tokens"] == 40  # no max_tokens: the rest of the window
    assert body.model_copy(update={"max_completion_tokens": 7}).to_replica("p", window_left=40)["max_tokens"] == 7
    assert body.to_replica("p", window_left=-3)["max_tokens"] == 1  # the replica then names the full window
