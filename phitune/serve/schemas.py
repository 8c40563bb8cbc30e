"""The request bodies `phitune serve` accepts, in OpenAI's shapes, and its errors in OpenAI's
error JSON.

Validation is strict: an unknown field, a wrong type, or an OpenAI option this server cannot
honour (n > 1, logprobs, penalties) is a 400 naming the field, never silently ignored and
never a 500.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    # strict: "3" is not an int and true is not a number, as in OpenAI's API
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """What both endpoints share. Options OpenAI has but this server cannot honour are
    accepted only at their no-op value, so a client that sends the defaults still works."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class CompletionRequest(_Generation):
    # a string, a batch of one string, or token ids (OpenAI's three accepted forms for n=1)
    prompt: str | list[str] | list[int]
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt is empty")
        if isinstance(value, list) and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("this server answers one prompt per request (send them apart)")
        return value

    def limit(self) -> int | None:
        return self.max_tokens


def parse(body: bytes, kind: type[_Strict]):
    """The request body as `kind`, or ApiError(400) saying what is wrong and where."""
    too_deep = ApiError(400, "the body nests arrays or objects too deeply",
                        code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:  # the decoder recurses per level: 50,000 nested arrays end here
        raise too_deep from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except RecursionError:
        raise too_deep from None


def _validation_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    # a union reports one error per member; the first names the field well enough
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    param = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}",
                        param=param, code="unknown_parameter")
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{'.'.join(loc)}'", param=param,
                        code="missing_required_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"Invalid '{'.'.join(loc)}': {message}", param=param,
                    code="invalid_value")
